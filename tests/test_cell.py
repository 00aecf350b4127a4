"""FusedLSTMCell against nn.LSTMCell: outputs, gradients, API, errors, and a
hand-written loop over time that trains with the same losses."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

from birnn_ext import FusedLSTMCell
from helpers import DEVICES, WeightGradFlags, assert_close


def pair(I, H, bias=True, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    ref = nn.LSTMCell(I, H, bias=bias, dtype=dtype, device=device)
    return ref, FusedLSTMCell.from_cell(ref)


def run(cell, x, hx):
    x = x.detach().requires_grad_()
    hx = tuple(t.detach().requires_grad_() for t in hx) if hx is not None else None
    h, c = cell(x, hx)
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum() for t in (h, c))
    inputs = [x, *(hx or ()), *cell.parameters()]
    return [h, c, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_matches_nn_lstm_cell(device, dtype, bias, with_state, batched):
    ref, fused = pair(7, 13, bias, dtype, device)
    shape = (5, 7) if batched else (7,)
    x = torch.randn(shape, dtype=dtype, device=device)
    hshape = (5, 13) if batched else (13,)
    hx = (torch.randn(hshape, dtype=dtype, device=device), torch.randn(hshape, dtype=dtype, device=device)) \
        if with_state else None
    for got, want in zip(run(fused, x, hx), run(ref, x, hx)):
        assert_close(got, want, dtype)


# Each engine of the CPU step products (fixed_order.h's CellProducts): batch 3 in place in
# spans of columns split between threads (in_place_rows_split), 16 in place at the limit
# (cpu_rules::kCellInPlaceMaxRows), 17 in column tiles of uneven widths (4H 400: 208 and 192;
# dx's 72 columns: 48 and 24), 40 in column tiles with the weight gradients in place, 96 in
# three column tiles (4H 1200) and the weight gradients in three tiles of rows (96 > 64 rows).
# float64 goes to BLAS in tiles at every batch. bfloat16 (column tiles over oneDNN or
# widened float32 GEMMs): h and c against the float32 cell on the same bfloat16-rounded
# values, as test_lstm_parity's bfloat16 cell test (its gradients are sums over the batch
# of products of bfloat16-rounded gate gradients, whose error grows with the batch).
@pytest.mark.parametrize("B,I,H", [(3, 72, 288), (16, 72, 64), (17, 72, 100), (40, 72, 64), (96, 72, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_nn_lstm_cell_at_every_batch(B, I, H, dtype):
    ref, fused = pair(I, H, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    x = torch.randn(B, I, dtype=dtype)
    hx = (torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype))
    if dtype == torch.bfloat16:
        ref.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
        with torch.no_grad():
            got = fused.to(dtype)(x, hx)
            want = ref(x.float(), tuple(t.float() for t in hx))
        for g, w in zip(got, want):
            assert g.dtype == dtype
            assert_close(g.float(), w, dtype)
        return
    for got, want in zip(run(fused, x, hx), run(ref, x, hx)):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True])
def test_activations_over_the_whole_range(training, dtype):
    """The CPU cell's float32 math (lstm_cell.h's exp polynomial and tanh split near 0,
    and their AVX-512 form in csrc/cpu/cell_avx512.cpp where the processor has it)
    against float64, with pre-activations set exactly: W_ih the identity, W_hh zero,
    b_hh zero. x covers [-100, 100], both sides of the tanh split (|x| = 0.625), the exp
    clamps (-87, 88), values far outside them, +-0 and tiny values; +-inf and NaN come
    in through b_ih (through x, the identity's zeros would multiply them). H = 37 puts a
    partial vector at the end of every gate. Each activation is within about 2 ulp of
    the exact value, and c and h add two or three rounded products of them: the error
    allowed is 3 float32 eps times max(|reference|, 1) (1.0 eps was measured). bfloat16
    storage (float32 math) rounds c and h once more when it stores them: at most the
    unit roundoff, half of bfloat16's eps (2^-8), relative, more."""
    H = 37
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.6249, 0.6251, -0.6251, 87.5, -88.5, 1e4, -1e4])
    grid = torch.cat([torch.linspace(-100, 100, 4001), special])
    x = grid[torch.randint(grid.numel(), (160, 4 * H), generator=g)]
    cell = FusedLSTMCell(4 * H, H)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.eye(4 * H))
        cell.weight_hh.zero_()
        cell.bias_hh.zero_()
        cell.bias_ih.zero_()
        # i, f, g and o of unit 3 +inf, -inf, NaN, -inf; g of unit 20 +inf; o of unit 36 NaN.
        cell.bias_ih[[3, H + 3, 2 * H + 3, 3 * H + 3, 2 * H + 20, 3 * H + 36]] = torch.tensor(
            [float("inf"), float("-inf"), float("nan"), float("-inf"), float("inf"), float("nan")])
    c0 = torch.randn(x.shape[0], H, generator=g) * 3
    cell, x, c0 = cell.to(dtype), x.to(dtype), c0.to(dtype)
    with torch.set_grad_enabled(training):
        h, c = cell(x.requires_grad_(training), (torch.zeros(x.shape[0], H, dtype=dtype), c0))
    i, f, gate, o = (x.detach().double() + cell.bias_ih.detach().double()).chunk(4, 1)
    c_ref = torch.sigmoid(f) * c0.double() + torch.sigmoid(i) * torch.tanh(gate)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    eps = torch.finfo(torch.float32).eps
    for name, got, want in (("c", c, c_ref), ("h", h, h_ref)):
        got = got.detach().double()
        assert torch.equal(got.isnan(), want.isnan()), name
        assert got.isnan().any() and not got.isnan().all(), name
        ok = ~want.isnan()
        assert torch.equal(got[ok].isinf(), want[ok].isinf()), name
        ok &= ~want.isinf()
        err = (got[ok] - want[ok]).abs() / want[ok].abs().clamp(min=1)
        allowed = 3 * eps + (torch.finfo(dtype).eps / 2 if dtype == torch.bfloat16 else 0.0)
        assert err.max() <= allowed, f"{name}: {err.max() / eps:.2f} float32 eps"

def test_api_like_nn_lstm_cell():
    for kw in (dict(), dict(bias=False)):
        torch.manual_seed(5)
        ref = nn.LSTMCell(4, 6, **kw)
        torch.manual_seed(5)
        fused = FusedLSTMCell(4, 6, **kw)
        assert list(dict(fused.named_parameters())) == list(dict(ref.named_parameters()))
        for (n, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
            assert torch.equal(p, q), n
        assert repr(fused) == repr(ref).replace("LSTMCell(", "FusedLSTMCell(", 1)
        ref.load_state_dict(fused.state_dict())
        fused.load_state_dict(ref.state_dict())
        assert (fused.bias_ih is None) == (ref.bias_ih is None)


def test_gradcheck_and_opcheck():
    torch.manual_seed(0)
    cell = FusedLSTMCell(3, 4, dtype=torch.float64)
    x, h, c = (torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in (3, 4, 4))
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    names = [n for n, _ in cell.named_parameters()]

    def f(x, h, c, *ps):
        return torch.func.functional_call(cell, dict(zip(names, ps)), (x, (h, c)))

    assert torch.autograd.gradcheck(f, (x, h, c, *params))
    ops = torch.ops.birnn_ext
    w_ih, w_hh, b = cell.weight_ih.detach(), cell.weight_hh.detach(), torch.randn(16, dtype=torch.float64)
    for bias in (b, None):
        torch.library.opcheck(ops.lstm_cell_forward, (x.detach(), h.detach(), c.detach(), w_ih, w_hh, bias, False))
        args = [t.detach().clone().requires_grad_() for t in (x, h, c, w_ih, w_hh)]
        torch.library.opcheck(ops.lstm_cell_forward, (*args, bias, True))
    _, _, gates = ops.lstm_cell_forward(x.detach(), h.detach(), c.detach(), w_ih, w_hh, b, True)
    for input_grad, weight_grad in itertools.product((True, False), repeat=2):
        torch.library.opcheck(ops.lstm_cell_backward, (torch.randn(2, 4, dtype=torch.float64), None, x.detach(),
                                                      h.detach(), c.detach(), w_ih, w_hh, gates, input_grad,
                                                      weight_grad))


# The sizes of the tests of a backward that leaves products out: batch 3 in place, 40
# and 96 in tiles (CellProducts).
SKIP_SIZES = pytest.mark.parametrize("B,H", [(3, 64), (40, 64), (96, 300)])


def cell_and_inputs(device, B, H):
    torch.manual_seed(0)
    cell = FusedLSTMCell(72, H, device=device)
    return cell, *(torch.randn(B, n, device=device) for n in (72, H, H))


# Where x is data (no gradient asked of it), the backward skips dx = dg W_ih, a quarter of
# its products, as nn.LSTMCell's autograd does (the op's input_grad): the other gradients
# are the same bits as when dx is computed.
@pytest.mark.parametrize("device", DEVICES)
@SKIP_SIZES
def test_backward_without_the_input_gradient(device, B, H):
    cell, x, h0, c0 = cell_and_inputs(device, B, H)

    def grads(x_grad):
        x_ = x.clone().requires_grad_(x_grad)
        hx = (h0.clone().requires_grad_(), c0.clone().requires_grad_())
        h, c = cell(x_, hx)
        (h.square().sum() + c.sum()).backward()
        out = [hx[0].grad, hx[1].grad, *(p.grad.clone() for p in cell.parameters())]
        cell.zero_grad()
        return out

    for got, want in zip(grads(False), grads(True), strict=True):
        assert torch.equal(got, want)
    ops = torch.ops.birnn_ext
    w = (cell.weight_ih.detach(), cell.weight_hh.detach())
    _, _, gates = ops.lstm_cell_forward(x, h0, c0, *w, cell.bias_ih + cell.bias_hh, True)
    dh = torch.randn(B, H, device=device)
    skipped = ops.lstm_cell_backward(dh, None, x, h0, c0, *w, gates, False)
    full = ops.lstm_cell_backward(dh, None, x, h0, c0, *w, gates)
    assert skipped[0].shape == (0,) and full[0].shape == (B, 72)
    for got, want in zip(skipped[1:], full[1:], strict=True):
        assert torch.equal(got, want)


# Frozen weight matrices (the biases still trained), or a gradient asked of the input
# alone: the backward skips dW_ih and dW_hh, half its products (the op's weight_grad);
# the other gradients are the same bits as when they are computed.
@pytest.mark.parametrize("device", DEVICES)
@SKIP_SIZES
def test_backward_without_the_weight_gradients(device, B, H):
    cell, x, h0, c0 = cell_and_inputs(device, B, H)

    def grads(frozen):
        cell.weight_ih.requires_grad_(not frozen), cell.weight_hh.requires_grad_(not frozen)
        x_, h_, c_ = (t.clone().requires_grad_() for t in (x, h0, c0))
        h, c = cell(x_, (h_, c_))
        with WeightGradFlags("lstm_cell_backward") as calls:
            (h.square().sum() + c.sum()).backward()
        assert calls.flags == [not frozen]
        assert (cell.weight_ih.grad is None) == frozen
        out = [x_.grad, h_.grad, c_.grad, cell.bias_ih.grad.clone(), cell.bias_hh.grad.clone()]
        cell.zero_grad(set_to_none=True)
        return out

    for got, want in zip(grads(True), grads(False), strict=True):
        assert torch.equal(got, want)
    # Every weight trainable, the gradient asked of the input alone.
    x_ = x.clone().requires_grad_()
    h, c = cell(x_, (h0, c0))
    with WeightGradFlags("lstm_cell_backward") as calls:
        (dx,) = torch.autograd.grad(h.square().sum(), [x_], retain_graph=True)
    assert calls.flags == [False]
    assert torch.equal(dx, torch.autograd.grad(h.square().sum(), [x_, *cell.parameters()])[0])
    ops = torch.ops.birnn_ext
    w = (cell.weight_ih.detach(), cell.weight_hh.detach())
    _, _, gates = ops.lstm_cell_forward(x, h0, c0, *w, cell.bias_ih + cell.bias_hh, True)
    dh, dc = torch.randn(B, H, device=device), torch.randn(B, H, device=device)
    for input_grad in (True, False):
        skipped = ops.lstm_cell_backward(dh, dc, x, h0, c0, *w, gates, input_grad, False)
        full = ops.lstm_cell_backward(dh, dc, x, h0, c0, *w, gates, input_grad)
        assert skipped[3].shape == skipped[4].shape == (0,) and full[3].shape == (4 * H, 72)
        for k in (0, 1, 2, 5):
            assert torch.equal(skipped[k], full[k])


BAD = [
    ("input 3-D", (torch.randn(2, 3, 4),)),
    ("hx 3-D", (torch.randn(2, 4), (torch.randn(1, 2, 6), torch.randn(2, 6)))),
    ("input_size", (torch.randn(2, 5),)),
    ("batch mismatch", (torch.randn(2, 4), (torch.randn(3, 6), torch.randn(3, 6)))),
    ("hidden mismatch", (torch.randn(2, 4), (torch.randn(2, 6), torch.randn(2, 7)))),
    ("one hidden state", (torch.randn(2, 4), (torch.randn(2, 6),))),
]


@pytest.mark.parametrize("case,args", BAD, ids=[c for c, _ in BAD])
def test_errors_match_nn_lstm_cell(case, args):
    ref = nn.LSTMCell(4, 6)
    fused = FusedLSTMCell.from_cell(ref)
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(type(want.value), match=f"^{re.escape(str(want.value))}$"):
        fused(*args)
    assert fused(torch.randn(2, 4))[0].shape == (2, 6)


def test_hand_written_loop_trains_like_nn_lstm_cell():
    torch.manual_seed(0)
    ref_cell, head = nn.LSTMCell(8, 16), nn.Linear(16, 3)
    fused_cell, fused_head = FusedLSTMCell.from_cell(ref_cell), nn.Linear(16, 3)
    fused_head.load_state_dict(head.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(6)]
    losses = {}
    for name, cell, lin in (("ref", ref_cell, head), ("fused", fused_cell, fused_head)):
        opt = torch.optim.Adam([*cell.parameters(), *lin.parameters()], lr=0.01)
        losses[name] = []
        for x, y in data:
            h = c = torch.zeros(4, 16)
            for t in range(x.size(0)):
                h, c = cell(x[t], (h, c))
            loss = nn.functional.cross_entropy(lin(h), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["ref"]), rtol=1e-5, atol=1e-5)
    assert losses["ref"][0] != losses["ref"][-1]
