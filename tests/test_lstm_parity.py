"""FusedLSTM / FusedBiLSTM against nn.LSTM with the very same weights: outputs, final
states and every gradient, over the constructor's flags and odd shapes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from birnn_ext import FusedBiLSTM, FusedLSTM, FusedLSTMCell
from helpers import DEVICES, TOL, assert_close, assert_same_results, layer_weight_args, outputs_and_grads, run_python

DTYPES = [torch.float32, torch.float64]


def make_pair(I, H, device, dtype, **kw):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, device=device, dtype=dtype, **kw)
    return ref, FusedLSTM.from_lstm(ref)


def make_input(T, B, I, D, L, H, device, dtype, batch_first, with_state):
    g = torch.Generator().manual_seed(2)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device)
    hx = None
    if with_state:
        hx = tuple(torch.randn(L * D, B, H, generator=g, dtype=dtype).to(device) for _ in range(2))
    return x, hx


def reference_results(ref, x, hx, dtype):
    """nn.LSTM's outputs and gradients, to compare the fused module's with. On a GPU in
    float32 they are those of nn.LSTM run in float64 on the same weights, rounded to
    float32: cuDNN's own float32 results (TF32 off) were measured on an H100 to be off
    the float64 ones by up to 4.4x the float32 tolerance in the weight gradients, where
    the fused CUDA path and both CPU paths stay under 0.1x at these sizes, so comparing
    with them would test cuDNN's rounding, not the fused path."""
    if dtype != torch.float32 or not is_cuda(x):
        return outputs_and_grads(ref, x, hx)
    ref64 = copy.deepcopy(ref).double()
    got = outputs_and_grads(ref64, x.double(), tuple(t.double() for t in hx) if hx is not None else None)
    return {k: v.float() for k, v in got.items()}


def is_cuda(x):
    return (x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x).is_cuda


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,bias,with_state",
    list(itertools.product([1, 2, 3], [False, True], [False, True], [True, False], [True, False])),
)
def test_matches_nn_lstm(device, dtype, num_layers, bidirectional, batch_first, bias, with_state):
    T, B, I, H = 6, 4, 7, 13
    ref, fused = make_pair(I, H, device, dtype, num_layers=num_layers, bidirectional=bidirectional,
                           batch_first=batch_first, bias=bias)
    x, hx = make_input(T, B, I, 2 if bidirectional else 1, num_layers, H, device, dtype, batch_first, with_state)
    assert_same_results(outputs_and_grads(fused, x, hx), reference_results(ref, x, hx, dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,B,I,H", [(1, 3, 7, 13), (9, 1, 1, 1), (3, 5, 16, 3), (40, 2, 5, 33)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes(device, dtype, T, B, I, H, bidirectional):
    ref, fused = make_pair(I, H, device, dtype, num_layers=2, bidirectional=bidirectional)
    x, hx = make_input(T, B, I, 2 if bidirectional else 1, 2, H, device, dtype, False, True)
    assert_same_results(outputs_and_grads(fused, x, hx), reference_results(ref, x, hx, dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(device, with_state, batch_first):
    dtype = torch.float64
    ref, fused = make_pair(5, 6, device, dtype, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(7, 5, dtype=dtype, device=device)
    hx = tuple(torch.randn(4, 6, dtype=dtype, device=device) for _ in range(2)) if with_state else None
    got, want = outputs_and_grads(fused, x, hx), outputs_and_grads(ref, x, hx)
    assert got["output"].shape == (7, 12) and got["h_n"].shape == (4, 6)
    assert_same_results(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_inference_matches(device):
    ref, fused = make_pair(7, 13, device, torch.float32, num_layers=2, bidirectional=True)
    x = torch.randn(6, 4, 7, device=device)
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = ref(x)
        y, (h, c) = fused(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)


def test_inter_layer_dropout_in_training_only():
    # dropout=1 zeroes the whole input of layer 2 in training mode, in both
    # implementations, so the results are deterministic and comparable.
    ref, fused = make_pair(4, 5, "cpu", torch.float64, num_layers=2, bidirectional=True, dropout=1.0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    assert_same_results(outputs_and_grads(fused, x), outputs_and_grads(ref, x), torch.float64)
    ref.eval(), fused.eval()
    assert_same_results(outputs_and_grads(fused, x), outputs_and_grads(ref, x), torch.float64)
    # And a dropout in (0, 1) really drops in training mode and not in eval mode.
    fused = FusedBiLSTM(4, 5, num_layers=2, dropout=0.5, dtype=torch.float64)
    with torch.no_grad():
        fused.eval()
        a, b = fused(x)[0], fused(x)[0]
        assert torch.equal(a, b)
        fused.train()
        assert not torch.equal(fused(x)[0], a)


def test_gradcheck_float64():
    for bidirectional, bias in itertools.product([False, True], [False, True]):
        torch.manual_seed(0)
        m = FusedLSTM(3, 4, num_layers=2, bidirectional=bidirectional, bias=bias, dtype=torch.float64)
        D = m.num_directions
        x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(2 * D, 2, 4, dtype=torch.float64, requires_grad=True)
        c0 = torch.randn(2 * D, 2, 4, dtype=torch.float64, requires_grad=True)
        names = [n for n, _ in m.named_parameters()]

        def f(x, h0, c0, *ps):
            y, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x, (h0, c0)))
            return y, h, c

        params = [p.detach().clone().requires_grad_() for p in m.parameters()]
        assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def test_opcheck_layer_ops():
    ops = torch.ops.birnn_ext
    g = torch.Generator().manual_seed(0)
    T, B, I, H, D = 4, 3, 5, 6, 2

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    lengths = torch.tensor([4, 1, 3])
    for ln, with_bias, P in [(None, True, H), (lengths, False, H), (lengths, True, 4)]:
        x, h0, c0 = r(T, B, I), r(D, B, P), r(D, B, H)
        w_ih, w_hh = r(D, 4 * H, I), r(D, 4 * H, P)
        b = r(D, 4 * H) if with_bias else None
        w_hr = r(D, P, H) if P != H else None
        weights = layer_weight_args(w_ih, w_hh, b, w_hr)
        torch.library.opcheck(ops.lstm_layer_forward, (x, ln, h0, c0, *weights, False))
        torch.library.opcheck(ops.lstm_layer_forward, (x, ln, None, None, *weights, False))
        grad_args = [t.clone().requires_grad_() if t is not None else None for t in (x, h0, c0, *weights)]
        x_, h0_, c0_, *weights_ = grad_args
        torch.library.opcheck(ops.lstm_layer_forward, (x_, ln, h0_, c0_, *weights_, True))
        _, _, _, gates, cp, hp, hr = ops.lstm_layer_forward(x, ln, h0, c0, *weights, True)
        for input_grad, weight_grad in itertools.product((True, False), repeat=2):
            torch.library.opcheck(
                ops.lstm_layer_backward,
                (r(T, B, D * P), r(D, B, P), None, x, ln, *layer_weight_args(w_ih, w_hh, w_hr=w_hr, backward=True),
                 gates, cp, hp, hr, input_grad, weight_grad),
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", [6, 4], ids=["no-proj", "proj"])
def test_layer_op_takes_none_for_zero_states(device, P):
    # h0 or c0 None: the op starts from zeros of its own (what FusedLSTM passes without
    # hx), bit for bit as from given zeros, forward and backward, and no gradient goes
    # to the state that was left out.
    ops = torch.ops.birnn_ext
    g = torch.Generator().manual_seed(0)
    T, B, I, H, D = 5, 3, 4, 6, 2

    def r(*s):
        return torch.randn(*s, generator=g).to(device)

    x = r(T, B, I)
    lengths = torch.tensor([5, 2, 4], device=device)
    w_ih, w_hh, b = r(D, 4 * H, I), r(D, 4 * H, P), r(D, 4 * H)
    w_hr = r(D, P, H) if P != H else None
    zeros = {"h0": torch.zeros(D, B, P, device=device), "c0": torch.zeros(D, B, H, device=device)}
    for given in ([], ["h0"], ["c0"]):
        weights = [w.clone().requires_grad_() if w is not None else None
                   for w in layer_weight_args(w_ih, w_hh, b, w_hr)]
        ref_weights = [w.detach().clone().requires_grad_() if w is not None else None for w in weights]
        xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        states = {k: zeros[k].clone().requires_grad_() for k in given}
        out = ops.lstm_layer_forward(xs[0], lengths, states.get("h0"), states.get("c0"), *weights, True)
        ref = ops.lstm_layer_forward(xs[1], lengths, zeros["h0"], zeros["c0"], *ref_weights, True)
        for a, e in zip(out, ref):
            assert torch.equal(a, e)
        seed = torch.Generator().manual_seed(1)
        grads = [torch.randn(t.shape, generator=seed).to(device) for t in out[:3]]
        torch.autograd.backward(out[:3], grads)
        torch.autograd.backward(ref[:3], grads)
        assert torch.equal(xs[0].grad, xs[1].grad)
        for w, e in zip(weights, ref_weights):
            if w is not None:
                assert torch.equal(w.grad, e.grad)
        for t in states.values():
            assert t.grad is not None and t.grad.shape == t.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_proj_size_matches(device, dtype, num_layers, bidirectional, bias):
    T, B, I, H, P = 5, 3, 7, 13, 4
    ref, fused = make_pair(I, H, device, dtype, num_layers=num_layers, bidirectional=bidirectional, bias=bias,
                           proj_size=P)
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, B, I, generator=g, dtype=dtype).to(device)
    hx = (torch.randn(num_layers * D, B, P, generator=g, dtype=dtype).to(device),
          torch.randn(num_layers * D, B, H, generator=g, dtype=dtype).to(device))
    for state in (hx, None):
        assert_same_results(outputs_and_grads(fused, x, state), reference_results(ref, x, state, dtype), dtype)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False)
    assert_same_results(outputs_and_grads(fused, packed, hx), reference_results(ref, packed, hx, dtype), dtype)


@pytest.mark.parametrize("lengths", [None, [5, 1, 3, 4] * 16])
def test_large_products_match(lengths):
    # B=64, H=128 puts every GEMM of the CPU path (per step and after the sweep) above
    # the size where it moves from BLAS to oneDNN; the small tests above cover BLAS.
    T, B, I, H = 5, 64, 96, 128
    ref, fused = make_pair(I, H, "cpu", torch.float32, num_layers=2, bidirectional=True)
    x, hx = make_input(T, B, I, 2, 2, H, "cpu", torch.float32, False, True)
    if lengths is None:
        want = outputs_and_grads(ref, x, hx)
        got = outputs_and_grads(fused, x, hx)
    else:
        lengths = torch.tensor(lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        want = outputs_and_grads(ref, packed, hx)
        got = outputs_and_grads(fused, packed, hx)
    assert_same_results(got, want, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("B,H", [(3, 13), (64, 256), (520, 128)])
def test_cuda_sweep_and_per_step_paths_match(B, H):
    # The CUDA layer forward and backward each have two paths: the one-launch sweep while
    # B H^2 < 2^23 (csrc/cuda/lstm_cuda.cpp, use_sweep), and a GEMM and a launch per step
    # beyond: B 520, H 128 takes the second. The other tests' shapes all take the first;
    # B 64, H 256 in float64 cuts the batch into several tiles in both sweeps.
    ref, fused = make_pair(7, H, "cuda", torch.float64, bidirectional=True)
    x, hx = make_input(4, B, 7, 2, 1, H, "cuda", torch.float64, False, True)
    assert_same_results(outputs_and_grads(fused, x, hx), outputs_and_grads(ref, x, hx), torch.float64)
    with torch.no_grad():
        y, (h, c) = fused(x, hx)
        y_ref, (h_ref, c_ref) = ref(x, hx)
    for got, want in ((y, y_ref), (h, h_ref), (c, c_ref)):
        assert_close(got, want, torch.float64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("switch", ["BIRNN_EXT_CUDA_SWEEP_BLOCK", "BIRNN_EXT_CUDA_SWEEP_CLUSTER"])
def test_cuda_opt_in_sweeps_match(switch):
    """The sweeps behind a switch (read once, at load: a fresh process each) against
    nn.LSTM in float64: a block per direction (H 13 and 64 fit one block), a cluster per
    direction forward and backward (sm_90, where H 13, 64 and 128 spread over 13 and 16
    blocks), with lengths
    on the GPU (against the CPU path), in float64 and float32."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests')\n"
        "torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # as conftest.py sets\n"
        "from test_lstm_parity import make_pair, make_input, reference_results, outputs_and_grads\n"
        "from helpers import assert_same_results\n"
        "for B, H, dtype in [(3, 13, torch.float64), (5, 64, torch.float64), (4, 128, torch.float64),\n"
        "                    (6, 64, torch.float32)]:\n"
        "    ref, fused = make_pair(7, H, 'cuda', dtype, bidirectional=True)\n"
        "    x, hx = make_input(9, B, 7, 2, 1, H, 'cuda', dtype, False, True)\n"
        "    assert_same_results(outputs_and_grads(fused, x, hx), reference_results(ref, x, hx, dtype), dtype)\n"
        "    lengths = torch.randint(1, 10, (B,))\n"
        "    with torch.no_grad():\n"
        "        y = fused(x, hx, lengths=lengths.cuda())[0]\n"
        "        y_ref = fused.cpu()(x.cpu(), tuple(t.cpu() for t in hx), lengths=lengths)[0]\n"
        "    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    run = run_python(code, **{switch: "1"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("B,H", [(3, 13), (520, 128)])
def test_cuda_float32_follows_cudnn_allow_tf32(B, H):
    """float32 products follow nn.LSTM's own switch, torch.backends.cudnn.allow_tf32: on,
    the cuBLAS products run on TF32 tensor cores and the results move; off, IEEE float32.
    TF32 rounds the products' operands to a 10-bit mantissa, float16's, so float16's
    tolerance bounds the fused path's results against the float64 reference there."""
    ref, fused = make_pair(7, H, "cuda", torch.float32, bidirectional=True)
    x, hx = make_input(4, B, 7, 2, 1, H, "cuda", torch.float32, False, True)
    want = reference_results(ref, x, hx, torch.float32)
    ieee = outputs_and_grads(fused, x, hx)
    assert_same_results(ieee, want, torch.float32)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        tf32 = outputs_and_grads(fused, x, hx)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert_same_results(tf32, want, torch.float16)
    assert any(not torch.equal(tf32[k], ieee[k]) for k in ieee), "allow_tf32 on changed no result"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths", [None, [6, 2, 5, 1]])
def test_cuda_half_storage_matches_float32(dtype, lengths):
    # fp16/bf16 storage with fp32 math and cell state on the GPU, against the float32
    # CPU path on the same (rounded) weights and inputs.
    ref32, _ = make_pair(7, 13, "cpu", torch.float32, num_layers=2, bidirectional=True)
    ref32.load_state_dict({k: v.to(dtype).float() for k, v in ref32.state_dict().items()})
    fused32 = FusedLSTM.from_lstm(ref32)
    fused = FusedLSTM.from_lstm(ref32).to("cuda", dtype)
    x, hx = make_input(6, 4, 7, 2, 2, 13, "cpu", torch.float32, False, True)
    x, hx = x.to(dtype).float(), tuple(t.to(dtype).float() for t in hx)
    kw = {"lengths": lengths} if lengths else {}
    want = outputs_and_grads(fused32, x, hx, **kw)
    got = outputs_and_grads(fused, x.to("cuda", dtype), tuple(t.to("cuda", dtype) for t in hx), **kw)
    for k in want:
        torch.testing.assert_close(got[k].float().cpu(), want[k], **TOL[dtype], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lengths", [None, [6, 2, 5, 1]])
@pytest.mark.parametrize("proj_size", [0, 4])
def test_cpu_16_bit_storage_matches_float32(dtype, lengths, proj_size):
    # bfloat16 and float16 storage with float32 gate math, cell state and sums on the
    # CPU (float16 through the float32 kernels, csrc/cpu/float16.h), against the float32
    # path on the same (rounded) weights and inputs.
    ref32, _ = make_pair(7, 13, "cpu", torch.float32, num_layers=2, bidirectional=True, proj_size=proj_size)
    ref32.load_state_dict({k: v.to(dtype).float() for k, v in ref32.state_dict().items()})
    fused32 = FusedLSTM.from_lstm(ref32)
    fused = FusedLSTM.from_lstm(ref32).to(dtype)
    x, _ = make_input(6, 4, 7, 2, 2, 13, "cpu", torch.float32, False, False)
    x = x.to(dtype).float()
    kw = {"lengths": lengths} if lengths else {}
    want = outputs_and_grads(fused32, x, **kw)
    got = outputs_and_grads(fused, x.to(dtype), **kw)
    assert got["output"].dtype == dtype
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], **TOL[dtype], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_16_bit_cell_matches_float32(dtype):
    torch.manual_seed(0)
    cell32 = FusedLSTMCell(7, 13)
    cell32.load_state_dict({k: v.to(dtype).float() for k, v in cell32.state_dict().items()})
    cell = FusedLSTMCell(7, 13)
    cell.load_state_dict(cell32.state_dict())
    cell = cell.to(dtype)
    x = torch.randn(5, 7).to(dtype).requires_grad_()
    hx = (torch.randn(5, 13).to(dtype), torch.randn(5, 13).to(dtype))
    x32 = x.detach().float().requires_grad_()
    h32, c32 = cell32(x32, tuple(t.float() for t in hx))
    h, c = cell(x, hx)
    assert h.dtype == c.dtype == dtype
    torch.testing.assert_close(h.float(), h32, **TOL[dtype])
    torch.testing.assert_close(c.float(), c32, **TOL[dtype])
    (h32.sum() + 2 * c32.sum()).backward()
    (h.float().sum() + 2 * c.float().sum()).backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, **TOL[dtype])
    for (name, p), p32 in zip(cell.named_parameters(), cell32.parameters()):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.float(), p32.grad, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


# At batch 150 the bfloat16 cell's products run in several tiles (on oneDNN, dg W in tiles
# of the batch's rows, the weight gradients over dg^T transposed once; or over widened
# float32 GEMMs): each gradient against the float32 cell on the same rounded values, as a
# whole. A weight gradient sums 150 products of gate gradients rounded to bfloat16, so its
# small elements carry the rounding of the large ones: the bound is on the norm of the
# error, two bfloat16 roundings (2^-7) of the norm of the gradient; a tile misplaced or
# missing is off by the size of the gradient itself.
def test_cpu_bfloat16_cell_in_tiles_matches_float32():
    torch.manual_seed(0)
    cell32 = FusedLSTMCell(40, 300)
    cell32.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in cell32.state_dict().items()})
    cell = FusedLSTMCell(40, 300)
    cell.load_state_dict(cell32.state_dict())
    cell = cell.to(torch.bfloat16)
    x = torch.randn(150, 40).to(torch.bfloat16).requires_grad_()
    hx = tuple(torch.randn(150, 300).to(torch.bfloat16).requires_grad_() for _ in range(2))
    x32, *hx32 = (t.detach().float().requires_grad_() for t in (x, *hx))
    h32, c32 = cell32(x32, tuple(hx32))
    h, c = cell(x, hx)
    (h32.sum() + 2 * c32.sum()).backward()
    (h.float().sum() + 2 * c.float().sum()).backward()
    pairs = [("h", h, h32), ("c", c, c32), ("x", x.grad, x32.grad), ("h0", hx[0].grad, hx32[0].grad),
             ("c0", hx[1].grad, hx32[1].grad)]
    pairs += [(n, p.grad, p32.grad) for (n, p), p32 in zip(cell.named_parameters(), cell32.parameters())]
    for name, got, want in pairs:
        assert got.dtype == torch.bfloat16
        error = (got.float() - want).norm() / want.norm()
        assert error < 2 ** -7, f"{name}: relative error {error:.2e}"
