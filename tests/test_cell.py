"""FusedLSTMCell against nn.LSTMCell: outputs, gradients, API, errors, and a
hand-written loop over time that trains with the same losses."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from birnn_ext import FusedLSTMCell
from helpers import DEVICES, assert_close


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
    torch.library.opcheck(ops.lstm_cell_backward, (torch.randn(2, 4, dtype=torch.float64), None, x.detach(),
                                                  h.detach(), c.detach(), w_ih, w_hh, gates))


BAD = [
    ("input 3-D", (torch.randn(2, 3, 4),)),
    ("hx 3-D", (torch.randn(2, 4), (torch.randn(1, 2, 6), torch.randn(2, 6)))),
    ("input_size", (torch.randn(2, 5),)),
    ("batch mismatch", (torch.randn(2, 4), (torch.randn(3, 6), torch.randn(3, 6)))),
    ("hidden mismatch", (torch.randn(2, 4), (torch.randn(2, 6), torch.randn(2, 7)))),
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
