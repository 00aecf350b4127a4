"""Gradients of gradients, forward-mode AD and torch.func's transforms, against nn.LSTM
and nn.LSTMCell.

A backward with create_graph=True (gradient penalties, Hessian-vector products,
second-order meta-learning) must return gradients that are differentiable themselves,
torch.autograd.forward_ad's tangents must come through, and torch.func's grad,
vmap(grad) and jvp must run: nn.LSTM does all of it on the CPU. The fused ops have no
derivative of their own beyond the first backward, so the ops' autograd computes these from the
same layer written in ATen ops (csrc/reference.h); these tests hold that path to
nn.LSTM's own second derivatives, in float64 (TOL[float64]: both sides sum the same terms
in another order), nn.LSTM on the CPU (cuDNN has no double backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

from birnn_ext import FusedLSTM, FusedLSTMCell
from helpers import DEVICES, assert_close, run_with_lengths

F64 = torch.float64


def _pair(device, **kw):
    torch.manual_seed(0)
    ref = nn.LSTM(dtype=F64, **kw)
    fused = FusedLSTM.from_lstm(ref).to(device)
    return ref, fused


def _first_and_second_order(module, x, hx, lengths):
    """The gradients of a fixed weighting of (y, h_n, c_n) with create_graph=True, then
    the gradients of a fixed weighting of those: every input's and parameter's, both
    orders, by name."""
    x = x.detach().requires_grad_()
    hx = tuple(t.detach().requires_grad_() for t in hx) if hx is not None else None
    y, (h, c) = run_with_lengths(module, x, lengths) if hx is None else module(x, hx)
    g = torch.Generator().manual_seed(1)

    def weighting(ts):
        return sum((t * torch.randn(t.shape, generator=g, dtype=F64).to(t.device)).sum() for t in ts)

    names = ["x"] + (["h0", "c0"] if hx else []) + [n for n, _ in module.named_parameters()]
    inputs = [x, *(hx or ())] + list(module.parameters())
    first = torch.autograd.grad(weighting([y, h, c]), inputs, create_graph=True)
    second = torch.autograd.grad(weighting(first), inputs, allow_unused=True)
    out = {f"d {n}": t for n, t in zip(names, first)}
    out.update({f"d2 {n}": torch.zeros_like(i) if t is None else t for n, t, i in zip(names, second, inputs)})
    return out


CASES = [
    dict(input_size=3, hidden_size=4),
    dict(input_size=3, hidden_size=4, bidirectional=True, num_layers=2),
    dict(input_size=3, hidden_size=5, bidirectional=True, proj_size=2),
    dict(input_size=3, hidden_size=4, bidirectional=True, bias=False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_create_graph_backward_matches_nn_lstm(device, kw, with_lengths):
    ref, fused = _pair(device, **kw)
    T, B = 6, 3
    x = torch.randn(T, B, kw["input_size"], dtype=F64)
    lengths = torch.tensor([6, 2, 4]) if with_lengths else None
    want = _first_and_second_order(ref, x, None, lengths)
    got = _first_and_second_order(fused, x.to(device), None, lengths)
    for k in want:
        assert_close(got[k].cpu(), want[k], F64, k)


@pytest.mark.parametrize("device", DEVICES)
def test_create_graph_backward_with_initial_state(device):
    ref, fused = _pair(device, input_size=3, hidden_size=4, bidirectional=True, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=F64)
    hx = (torch.randn(4, 2, 4, dtype=F64), torch.randn(4, 2, 4, dtype=F64))
    want = _first_and_second_order(ref, x, hx, None)
    got = _first_and_second_order(fused, x.to(device), tuple(t.to(device) for t in hx), None)
    for k in want:
        assert_close(got[k].cpu(), want[k], F64, k)


@pytest.mark.parametrize("device", DEVICES)
def test_create_graph_backward_of_the_cell(device):
    torch.manual_seed(0)
    ref = nn.LSTMCell(3, 4, dtype=F64)
    fused = FusedLSTMCell.from_cell(ref).to(device)

    def orders(cell, dev):
        x, h, c = (torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(k)).to(dev).requires_grad_()
                   for k, n in enumerate((3, 4, 4)))
        inputs = [x, h, c, *cell.parameters()]
        h1, c1 = cell(x, (h, c))
        first = torch.autograd.grad((h1 * h1).sum() + (c1 * h1).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in first), inputs)
        return [t.cpu() for t in first + second]

    for k, (g, w) in enumerate(zip(orders(fused, device), orders(ref, "cpu"))):
        assert_close(g, w, F64, f"gradient {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_mode_tangents_match_nn_lstm(device, grad_mode):
    """Tangents on the input and the initial state, through two bidirectional layers with
    a projection and lengths, and through the cell. Without grad mode the fused ops used
    to drop the tangent (None), with it refuse the call."""
    ref, fused = _pair(device, input_size=3, hidden_size=5, bidirectional=True, num_layers=2, proj_size=2)
    g = torch.Generator().manual_seed(4)
    x, vx = (torch.randn(6, 3, 3, dtype=F64, generator=g) for _ in range(2))
    h0, vh = (torch.randn(4, 3, 2, dtype=F64, generator=g) for _ in range(2))
    c0 = torch.randn(4, 3, 5, dtype=F64, generator=g)
    lengths = torch.tensor([6, 2, 4])

    def tangents(module, dev):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            hx = (fwAD.make_dual(h0.to(dev), vh.to(dev)), c0.to(dev))
            xd = fwAD.make_dual(x.to(dev), vx.to(dev))
            if isinstance(module, nn.LSTM):  # packing has no forward AD: one sequence at a time
                runs = [module(xd[:n, b : b + 1], (hx[0][:, b : b + 1], hx[1][:, b : b + 1]))
                        for b, n in enumerate(lengths.tolist())]
                y = torch.cat([nn.functional.pad(y, (0, 0, 0, 0, 0, 6 - y.size(0))) for y, _ in runs], 1)
                h, c = (torch.cat([state[k] for _, state in runs], 1) for k in range(2))
            else:
                y, (h, c) = module(xd, hx, lengths=lengths)
            return [fwAD.unpack_dual(t).tangent for t in (y, h, c)]

    for name, got, want in zip(("y", "h_n", "c_n"), tangents(fused, device), tangents(ref, "cpu")):
        assert got is not None, name
        assert_close(got.cpu(), want, F64, name)

    torch.manual_seed(0)
    ref_cell = nn.LSTMCell(3, 4, dtype=F64)
    fused_cell = FusedLSTMCell.from_cell(ref_cell).to(device)
    xc, vc = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    for cell, dev in ((fused_cell, device), (ref_cell, "cpu")):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            h, c = cell(fwAD.make_dual(xc.to(dev), vc.to(dev)))
            out = [fwAD.unpack_dual(t).tangent for t in (h, c)]
        if cell is fused_cell:
            got = out
    for name, g_, w in zip(("h'", "c'"), got, out):
        assert g_ is not None, name
        assert_close(g_.cpu(), w, F64, name)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_only_create_graph_leaves_the_fused_backward():
    _, fused = _pair("cpu", input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=F64)
    for create_graph, fused_backward in ((False, True), (True, False)):
        y, _ = fused(x)
        with _OpLog() as log:
            torch.autograd.grad(y.sum(), list(fused.parameters()), create_graph=create_graph)
        assert ("birnn_ext.lstm_layer_backward" in log.ops) == fused_backward, sorted(log.ops)


def test_compiled_backward_keeps_the_fused_op():
    """AOTAutograd traces the backward without create_graph: its graph calls the fused
    backward op, not the ATen-op layer."""
    from functorch.compile import aot_module_simplified, make_boxed_func

    graphs = {}

    def backend(gm, example_inputs):
        def compiler(name):
            def compile_graph(g, _):
                graphs[name] = {str(n.target) for n in g.graph.nodes if n.op == "call_function"}
                return make_boxed_func(g.forward)
            return compile_graph
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler("forward"),
                                     bw_compiler=compiler("backward"))

    _, fused = _pair("cpu", input_size=3, hidden_size=4, bidirectional=True, num_layers=2)
    step = torch.compile(lambda x: fused(x)[0].sum(), backend=backend, fullgraph=True)
    step(torch.randn(5, 2, 3, dtype=F64)).backward()
    assert "birnn_ext.lstm_layer_forward.default" in graphs["forward"]
    assert "birnn_ext.lstm_layer_backward.default" in graphs["backward"]
    assert not any("sigmoid" in op for op in graphs["backward"]), sorted(graphs["backward"])


def _loss(module, params, x):
    """A many-to-one loss of one sequence x [T,I], for torch.func."""
    y, (h, _) = functional_call(module, params, (x.unsqueeze(1),))
    return (y[-1] ** 2).sum() + h.sum()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_per_sample_gradients(device):
    """vmap(grad(...)): each sequence's own gradient, as in differentially private training.
    nn.LSTM fails under vmap(grad) (an in-place broadcast in its kernel), so its side takes
    the sequences one at a time."""
    ref, fused = _pair(device, input_size=3, hidden_size=4, bidirectional=True, num_layers=2)
    xs = torch.randn(4, 5, 3, dtype=F64)  # four sequences [T,I]
    params = {k: v.detach() for k, v in fused.named_parameters()}
    got = vmap(grad(lambda p, x: _loss(fused, p, x)), in_dims=(None, 0))(params, xs.to(device))
    ref_params = {k: v.detach() for k, v in ref.named_parameters()}
    for i, x in enumerate(xs):
        want = grad(lambda p: _loss(ref, p, x))(ref_params)
        assert want.keys() == got.keys()
        for k in want:
            assert_close(got[k][i].cpu(), want[k], F64, f"sequence {i}: {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_jvp_and_cell_grad(device):
    ref, fused = _pair(device, input_size=3, hidden_size=4, bidirectional=True)
    x, v = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    params = {k: p.detach() for k, p in ref.named_parameters()}
    want = jvp(lambda x: _loss(ref, params, x), (x,), (v,))
    got = jvp(lambda x: _loss(fused, {k: p.to(device) for k, p in params.items()}, x), (x.to(device),), (v.to(device),))
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, F64, "jvp")

    torch.manual_seed(0)
    ref_cell = nn.LSTMCell(3, 4, dtype=F64)
    fused_cell = FusedLSTMCell.from_cell(ref_cell).to(device)
    xc = torch.randn(2, 3, dtype=F64)

    def cell_grads(cell, dev):
        params = {k: p.detach().to(dev) for k, p in cell.named_parameters()}
        return grad(lambda p: functional_call(cell, p, (xc.to(dev),))[0].pow(2).sum())(params)

    want, got = cell_grads(ref_cell, "cpu"), cell_grads(fused_cell, device)
    for k in want:
        assert_close(got[k].cpu(), want[k], F64, k)
