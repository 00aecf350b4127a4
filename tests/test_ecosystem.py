"""birnn_ext inside the PyTorch ecosystem: torch.compile with no graph break,
torch.export with a dynamic batch, DistributedDataParallel, bitwise determinism (on the
CPU for any thread count, on a GPU from run to run)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from birnn_ext import FusedBiLSTM, FusedLSTM, FusedLSTMCell
from helpers import WeightGradFlags, run_python


class Classifier(nn.Module):
    def __init__(self, lstm_cls=FusedBiLSTM, bidirectional=True):
        super().__init__()
        self.lstm = lstm_cls(8, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(32 if bidirectional else 16, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.fc(out[:, -1])


class CellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = FusedLSTMCell(8, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = c = x.new_zeros(x.size(0), 16)
        for t in range(x.size(1)):
            h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


MODELS = {
    "FusedBiLSTM": lambda: Classifier(FusedBiLSTM, True),
    "FusedLSTM": lambda: Classifier(FusedLSTM, False),
    "FusedLSTMCell": CellLoop,
}


def twin_models(name):
    """Two MODELS[name] with the same weights, one for eager and one to compile."""
    torch.manual_seed(0)
    eager = MODELS[name]()
    compiled_model = MODELS[name]()
    compiled_model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    return eager, compiled_model


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_forward_and_training_step(name):
    from torch._dynamo.utils import counters

    eager, compiled_model = twin_models(name)
    counters.clear()
    # fullgraph=True makes any graph break an error; aot_eager traces forward and
    # backward through the fake kernels and the registered autograd.
    step = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(4, 5, 8), torch.tensor([0, 2, 1, 0])
    torch.testing.assert_close(step(x), eager(x), rtol=1e-5, atol=1e-5)
    for model, fn in ((eager, eager), (compiled_model, step)):
        nn.functional.cross_entropy(fn(x), y).backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=n)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_with_frozen_weight_matrices(name):
    # The compiled backward calls the fused backward with weight_grad=False (fake kernels
    # with empty weight gradients) and gives eager's gradients of x, the biases and fc.
    eager, compiled_model = twin_models(name)
    for model in (eager, compiled_model):
        for n, p in model.named_parameters():
            p.requires_grad_("weight_ih" not in n and "weight_hh" not in n)
    step = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(4, 5, 8), torch.tensor([0, 2, 1, 0])
    op = "lstm_cell_backward" if name == "FusedLSTMCell" else "lstm_layer_backward"
    grads = []
    for model, fn in ((eager, eager), (compiled_model, step)):
        x_ = x.clone().requires_grad_()
        loss = nn.functional.cross_entropy(fn(x_), y)
        with WeightGradFlags(op) as calls:  # the backward only: Dynamo traces no frame under a dispatch mode
            loss.backward()
        assert calls.flags and not any(calls.flags), calls.flags
        grads.append([x_.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_with_lengths(dynamic):
    # The module checks the lengths' range on the host in eager mode; compiled, it leaves
    # the check to the op, since reading the values would break the graph.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = FusedBiLSTM(8, 16, num_layers=2, batch_first=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for B, T in [(4, 5), (3, 9)]:
        x = torch.randn(B, T, 8)
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(B))
        want, got = model(x, lengths=lengths), compiled(x, lengths=lengths)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        got[0].sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T = 9\], got values from 0 to"):
        compiled(torch.randn(3, 9, 8), lengths=torch.tensor([9, 0, 2]))


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(4, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_with_dynamic_batch(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(4, 5, 8)
    batch = torch.export.Dim("batch", min=2, max=1024)
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        ops = [n for n in ep.graph.nodes if n.op == "call_function" and "birnn_ext" in str(n.target)]
        assert ops, [str(n.target) for n in ep.graph.nodes]
        # Every output present (training=True): AOTInductor cannot compile an absent one
        # (ops._returns_activations), in either grad mode.
        assert all(n.args[-1] is True for n in ops), [n.args[-1] for n in ops]
    with torch.no_grad():
        for b in (2, 7, 33):
            xb = torch.randn(b, 5, 8)
            torch.testing.assert_close(ep.module()(xb), model(xb), rtol=1e-5, atol=1e-5)


def _ddp_worker(rank, world, init_file, init_state, data, steps, out_file):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = Classifier()
    model.load_state_dict(init_state)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for x, y in data[:steps]:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = nn.functional.cross_entropy(ddp(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out_file)
    dist.barrier()  # both ranks done before gloo tears its connections down
    dist.destroy_process_group()


def test_distributed_data_parallel_matches_single_process(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 5, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), init_state, data, 3, str(tmp_path / "ddp.pt")), nprocs=2)
    # The same steps in one process on the whole batch: DDP averages the two halves'
    # gradients, which for a mean loss over equal halves is the whole batch's gradient.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ddp_state = torch.load(tmp_path / "ddp.pt")
    # Training moved the model (weight_hh_l1_reverse alone gets no gradient: at the last
    # step, which the head reads, the top reverse direction has only just started from h0 = 0).
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, init_state[k])]
    assert "fc.weight" in moved and "lstm.weight_ih_l0" in moved and "lstm.weight_hh_l0_reverse" in moved, moved
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _run_once(threads, loss_on_last_step=False, T=60, B=40):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = FusedBiLSTM(48, 64, num_layers=2, proj_size=0)
    x = torch.randn(T, B, 48, requires_grad=True)
    y, (h, c) = m(x, lengths=torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(3)))
    if loss_on_last_step:  # most of the top layer's backward skipped; blocks taken while the sweep runs
        y[-1].square().sum().backward()
    else:
        (y.square().sum() + h.sum() + c.sum()).backward()
    return [y, h, c, x.grad, *[p.grad for p in m.parameters()]]


# 2400 rows: weight gradients in blocks on oneDNN, summed; 40 rows: one block each, in place.
@pytest.mark.parametrize("T,B", [(60, 40), (20, 2)])
@pytest.mark.parametrize("loss_on_last_step", [False, True])
def test_bitwise_determinism_whatever_the_thread_count(loss_on_last_step, T, B):
    threads = torch.get_num_threads()
    try:
        runs = [_run_once(t, loss_on_last_step, T, B) for t in (1, 1, 2, max(2, threads), 3)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def _cell_grads(threads, batch, hidden, dtype):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cell = FusedLSTMCell(24, hidden, dtype=dtype)
    x = torch.randn(batch, 24, dtype=dtype, requires_grad=True)
    h, c = cell(x)
    (h.square().sum() + c.sum()).backward()
    return [h, c, x.grad, *[p.grad for p in cell.parameters()]]


# Batch 1 and 3: the products in place (H 288: in spans of columns split between threads);
# 48: in column tiles, the weight gradients in place; 200: in column tiles, the weight
# gradients in tiles of rows; 64 with H 300: three column tiles (4H 1200), more than two
# threads share; 96 with H 300: three tiles of the weight gradients' rows too. bfloat16
# (on oneDNN, dg W in tiles of the batch's rows; or over widened float32 GEMMs).
@pytest.mark.parametrize("batch,hidden,dtype", [
    (1, 40, torch.float32), (3, 288, torch.float32), (48, 40, torch.float32), (200, 40, torch.float32),
    (64, 300, torch.float32), (96, 300, torch.float32), (200, 40, torch.bfloat16), (96, 300, torch.bfloat16)])
def test_cell_bitwise_determinism_whatever_the_thread_count(batch, hidden, dtype):
    threads = torch.get_num_threads()
    try:
        runs = [_cell_grads(t, batch, hidden, dtype) for t in (1, 2, max(2, threads), 3)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def _cuda_run(B, H, dtype):
    torch.manual_seed(0)
    m = FusedBiLSTM(32, H, num_layers=2).to("cuda", dtype)
    x = torch.randn(30, B, 32, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, 31, (B,), generator=torch.Generator().manual_seed(3)).cuda()
    y, (h, c) = m(x, lengths=lengths)
    (y.float().square().sum() + h.float().sum() + c.float().sum()).backward()
    return [y, h, c, x.grad, *[p.grad for p in m.parameters()]]


# The CUDA kernels use no atomics: their sums (the sweeps' partial products, the bias
# gradient) run in orders fixed by the shapes, and cuBLAS repeats its results run to run
# on one device, so two runs must agree bit for bit. Grid sweeps forward
# and backward at H 64 and 128; per-step launches at B 64, H 512 (B H^2 >= 2^23).
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("B,H", [(16, 64), (100, 128), (64, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_runs_repeat_bit_for_bit(B, H, dtype):
    first, second = _cuda_run(B, H, dtype), _cuda_run(B, H, dtype)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# A process's first calls, each small enough to run on the calling thread alone (MKL held
# to that thread meanwhile), before anything else has asked torch for its thread count.
FIRST_CALLS = {
    "cell inference": "with torch.no_grad():\n    FusedLSTMCell(16, 16)(torch.randn(1, 16))",
    "cell forward+backward": "h, c = FusedLSTMCell(16, 16)(torch.randn(1, 16))\n(h.sum() + c.sum()).backward()",
    "layer inference": "with torch.no_grad():\n    FusedBiLSTM(16, 16)(torch.randn(3, 1, 16))",
    "layer forward+backward": "FusedBiLSTM(16, 16)(torch.randn(3, 1, 16))[0].sum().backward()",
}


@pytest.mark.parametrize("first_call", FIRST_CALLS)
def test_a_small_first_call_leaves_torch_threads_alone(first_call):
    """ATen sizes a thread's OpenMP pool from MKL's thread count the first time that thread
    asks; asked inside a call that holds MKL to one thread, it left all of torch on one
    thread for the rest of the process (nn.LSTMCell and torch.mm ran at half speed after
    one FusedLSTMCell step at batch 1)."""
    code = "import torch\nfrom birnn_ext import FusedBiLSTM, FusedLSTMCell\n{}\nprint(torch.get_num_threads())"
    untouched = run_python(code.format("pass"), OMP_NUM_THREADS="2")
    after = run_python(code.format(FIRST_CALLS[first_call]), OMP_NUM_THREADS="2")
    assert untouched.returncode == 0 and after.returncode == 0, untouched.stderr + after.stderr
    assert untouched.stdout.split()[-1] == "2"
    assert after.stdout.split()[-1] == "2", f"{first_call} left torch with {after.stdout.split()[-1]} thread(s)"


class Mixed(nn.Module):
    """Linear -> FusedBiLSTM -> Linear: under autocast the LSTM receives a lower-precision
    input and full-precision weights."""

    def __init__(self, lstm_cls=FusedBiLSTM):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.lstm = lstm_cls(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        out, _ = self.lstm(self.inp(x))
        return self.fc(out[:, -1])


def test_cpu_autocast_runs_a_bfloat16_kernel():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(4, 5, 8)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inner = model.inp(x)
        assert inner.dtype == torch.bfloat16
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out, (h, c) = model.lstm(inner)
        y = model(x)
    # bfloat16 storage for the outputs and the saved gates; the cell state in float32.
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    big = [t for t in saved if t.dim() == 3 and t.size(0) == 5]  # [T, B, ...] activations
    assert {t.dtype for t in big} == {torch.bfloat16, torch.float32}, [t.dtype for t in big]
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(y.float(), model(x), rtol=5e-2, atol=5e-2)
    # Inference takes the same rule: a float32 input runs the bfloat16 kernel.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.lstm(inner.float())[0].dtype == torch.bfloat16
    # In inference the layer op takes the float32 weights as they are (csrc/autocast.cpp):
    # no cast of a weight matrix is made (the kernel rounds the biases, 4H values, itself);
    # in training each is cast.
    matrices = [p for p in model.lstm.parameters() if p.dim() == 2]
    weight_shapes = {tuple(p.shape) for p in matrices}

    def casts_of_weights(train):
        with torch.autograd.profiler.profile(record_shapes=True) as prof:
            with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
                model.lstm(inner.float())
        return [e for e in prof.function_events if e.name == "aten::_to_copy" and e.input_shapes
                and tuple(e.input_shapes[0]) in weight_shapes]

    assert not casts_of_weights(False)
    assert len(casts_of_weights(True)) == len(matrices)
    # A float16 region has no float16 CPU kernel to use: the op runs in float32.
    with torch.autocast("cpu", dtype=torch.float16):
        assert model.lstm(model.inp(x))[0].dtype == torch.float32


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_cpu_autocast_under_compile_matches_eager(train):
    """torch.compile traces with the Python dispatcher, which takes ops.py's autocast rule
    instead of csrc/autocast.cpp's: both must give the same results."""
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(4, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if train:
        want.float().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got.float().sum().backward()
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_runs_the_lstm_in_the_region_dtype(dtype):
    torch.manual_seed(0)
    model = Mixed().cuda()
    x = torch.randn(4, 5, 8, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, (h, c) = model.lstm(model.inp(x))
        y = model(x)
    assert out.dtype == h.dtype == c.dtype == dtype
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(y.float(), model(x), rtol=5e-2, atol=5e-2)
