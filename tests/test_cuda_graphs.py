"""What CUDA graphs need from the ops, and whole training steps in CUDA graphs.

Every output of every op owns its storage: the fake kernels declare each a fresh tensor,
and torch.compile's CUDA graphs (mode="reduce-overhead") account for each output's
memory by that. The forward sweep once returned h_n as a view into its ping-pong
buffer of both halves. On a GPU, training steps compiled with reduce-overhead and a
forward+backward captured by hand with torch.cuda.graph match eager, step by step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from birnn_ext import FusedBiLSTM, FusedLSTM
from helpers import DEVICES, layer_weight_args
from test_ecosystem import MODELS as ECOSYSTEM_MODELS
from test_ecosystem import Classifier


def needs_gpu(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")(test))


def _owns_storage(t: torch.Tensor) -> bool:
    return (t._base is None and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


# The forward ops' outputs that hold what backward needs (gates, c_prev, h_prev, h_raw).
SAVED_FOR_BACKWARD = {"forward[3]", "forward[4]", "forward[5]", "forward[6]", "cell forward[2]"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [5, 6])  # the sweep's ping-pong buffer ends in either half
@pytest.mark.parametrize("training", [False, True])
def test_every_op_output_owns_its_storage(device, T, training):
    ops = torch.ops.birnn_ext
    g = torch.Generator().manual_seed(0)
    D, B, I, H = 2, 3, 5, 8  # small enough for the CUDA path's single-launch sweep
    x = torch.randn(T, B, I, generator=g).to(device)
    h0, c0 = (torch.randn(D, B, H, generator=g).to(device) for _ in range(2))
    w_ih, w_hh = torch.randn(D, 4 * H, I, generator=g).to(device), torch.randn(D, 4 * H, H, generator=g).to(device)
    bias = torch.randn(D, 4 * H, generator=g).to(device)
    fwd = ops.lstm_layer_forward(x, None, h0, c0, *layer_weight_args(w_ih, w_hh, bias), training)
    outputs = {f"forward[{i}]": t for i, t in enumerate(fwd)}
    if training:
        y, h_n, c_n, gates, c_prev, h_prev, h_raw = fwd
        bwd = ops.lstm_layer_backward(torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n), x, None,
                                      *layer_weight_args(w_ih, w_hh, backward=True), gates, c_prev, h_prev, h_raw)
        outputs |= {f"backward[{i}]": t for i, t in enumerate(bwd)}
    cell = ops.lstm_cell_forward(x[0], h0[0], c0[0], w_ih[0], w_hh[0], bias[0], training)
    outputs |= {f"cell forward[{i}]": t for i, t in enumerate(cell)}
    if training:
        cell_bwd = ops.lstm_cell_backward(torch.ones_like(cell[0]), torch.ones_like(cell[1]), x[0], h0[0], c0[0],
                                          w_ih[0], w_hh[0], cell[2])
        outputs |= {f"cell backward[{i}]": t for i, t in enumerate(cell_bwd)}
    if not training:  # nothing saved for backward: no tensor at all, not even an empty one
        unsaved = {name: t for name, t in outputs.items() if name in SAVED_FOR_BACKWARD}
        assert all(t is None for t in unsaved.values()), unsaved
        outputs = {name: t for name, t in outputs.items() if name not in SAVED_FOR_BACKWARD}
    views = [name for name, t in outputs.items() if not _owns_storage(t)]
    assert not views, f"outputs that are views of a larger buffer: {views}"


# ---------------------------------------------------------------- on a GPU


def _projected_classifier():
    model = Classifier(FusedLSTM, False)
    model.lstm = FusedLSTM(8, 16, num_layers=2, batch_first=True, proj_size=8)
    model.fc = nn.Linear(8, 3)
    return model


# test_ecosystem's models (8 input features, 3 classes), and one with proj_size.
MODELS = {**ECOSYSTEM_MODELS, "FusedLSTM proj_size": _projected_classifier}


@needs_gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_reduce_overhead_training_steps_match_eager(name):
    torch.manual_seed(0)
    eager = MODELS[name]().cuda()
    compiled = copy.deepcopy(eager)
    opts = {m: torch.optim.Adam(m.parameters(), lr=1e-3, capturable=True) for m in (eager, compiled)}

    def step(model, x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opts[model].step()
        opts[model].zero_grad(set_to_none=False)
        return loss

    compiled_step = torch.compile(lambda x, y: step(compiled, x, y), mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(1)
    for i in range(12):
        x = torch.randn(8, 7, 8, device="cuda", generator=g)
        y = torch.randint(0, 3, (8,), device="cuda", generator=g)
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled_step(x, y).item()
        want = step(eager, x, y).item()
        # The same fused kernels on both sides; inductor's own kernels for the linear layer
        # and the loss may sum in another order: float32 rounding, compounded over Adam steps.
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), f"step {i}"
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


@needs_gpu
def test_forward_and_backward_captured_by_hand_match_eager():
    torch.manual_seed(0)
    model = FusedBiLSTM(6, 16, num_layers=2).cuda()
    reference = copy.deepcopy(model)
    static_x = torch.randn(7, 8, 6, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(static_x)[0].square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)[0]
        static_y.square().sum().backward()
    for seed in range(3):
        static_x.copy_(torch.randn(7, 8, 6, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        reference.zero_grad(set_to_none=True)
        want = reference(static_x)[0]
        want.square().sum().backward()
        torch.testing.assert_close(static_y, want, rtol=1e-5, atol=1e-5)  # the same kernels: float32 rounding only
        for (n, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=n)


@needs_gpu
def test_lengths_on_the_gpu_take_no_host_sync():
    """lengths given on the GPU stay there: the ops check their range with a device-side
    assert, so a call and its backward never wait for the device (nor could a CUDA graph
    hold them otherwise)."""
    torch.manual_seed(0)
    model = FusedBiLSTM(6, 16, num_layers=2).cuda()
    x = torch.randn(7, 5, 6, device="cuda")
    lengths = torch.tensor([7, 3, 1, 5, 7], device="cuda")
    want_y, (want_h, want_c) = model(x, lengths=lengths.cpu())
    xi = x.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call in between raises
    try:
        y, (h, c) = model(xi, lengths=lengths)
        (y.sum() + h.sum() + c.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in ((y, want_y), (h, want_h), (c, want_c)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same kernels, the same lengths
    assert xi.grad is not None and torch.isfinite(xi.grad).all()


@needs_gpu
def test_gpu_lengths_out_of_range_fail():
    """The device-side check fails the process's next synchronisation (it cannot raise
    where the op is called without waiting for the GPU): in a process of its own."""
    from helpers import run_python

    code = (
        "import torch\n"
        "from birnn_ext import FusedBiLSTM\n"
        "m = FusedBiLSTM(6, 16).cuda()\n"
        "y, _ = m(torch.randn(7, 3, 6, device='cuda'), lengths=torch.tensor([7, 8, 1], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n"
    )
    run = run_python(code)
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout
