"""Whatever a data loader produces: property tests against nn.LSTM, odd memory layouts,
empty batches, NaN and Inf, very long sequences, memory over many steps, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from birnn_ext import FusedLSTM, FusedLSTMCell
from helpers import assert_close, outputs_and_grads

# A fixed seed, so every run tries the same cases, and a database in the repository's
# build folder, so a failure found once is replayed first until it is fixed.
DATABASE = DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parent.parent / "build" / "hypothesis"))


@st.composite
def lstm_cases(draw):
    H = draw(st.integers(1, 40))
    return dict(
        B=draw(st.integers(1, 9)), T=draw(st.integers(1, 40)), I=draw(st.integers(1, 40)), H=H,
        num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
        bias=draw(st.booleans()), with_state=draw(st.booleans()), with_lengths=draw(st.booleans()),
        proj_size=draw(st.integers(0, H - 1)) if H > 1 and draw(st.booleans()) else 0,
        dtype=draw(st.sampled_from([torch.float64, torch.float32])), data_seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_case(c, device):
    """The fused module on `device` against nn.LSTM on the CPU, same weights and inputs:
    outputs, states and every gradient."""
    torch.manual_seed(c["data_seed"])
    ref = nn.LSTM(c["I"], c["H"], c["num_layers"], bias=c["bias"], batch_first=c["batch_first"],
                  bidirectional=c["bidirectional"], proj_size=c["proj_size"], dtype=c["dtype"])
    fused = FusedLSTM.from_lstm(ref).to(device)
    D, B, T = 2 if c["bidirectional"] else 1, c["B"], c["T"]
    g = torch.Generator().manual_seed(c["data_seed"])
    x = torch.randn((B, T, c["I"]) if c["batch_first"] else (T, B, c["I"]), generator=g, dtype=c["dtype"])
    hx = None
    if c["with_state"]:
        P = c["proj_size"] or c["H"]
        hx = (torch.randn(c["num_layers"] * D, B, P, generator=g, dtype=c["dtype"]),
              torch.randn(c["num_layers"] * D, B, c["H"], generator=g, dtype=c["dtype"]))
    hx_dev = tuple(t.to(device) for t in hx) if hx is not None else None
    cpu = lambda results: {k: v.cpu() for k, v in results.items()}  # noqa: E731
    if c["with_lengths"]:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        packed = pack_padded_sequence(x, lengths, batch_first=c["batch_first"], enforce_sorted=False)
        want = outputs_and_grads(ref, packed, hx)
        got = cpu(outputs_and_grads(fused, packed.to(device), hx_dev))
        # And the padded batch with lengths= gives the same output and states.
        with torch.no_grad():
            y_pad, (h, cn) = fused(x.to(device), hx_dev, lengths=lengths)
            y_ref, _ = pad_packed_sequence(ref(packed, hx)[0], batch_first=c["batch_first"], total_length=T)
        assert_close(y_pad.cpu(), y_ref, c["dtype"], "padded output")
        assert_close(h.cpu(), want["h_n"], c["dtype"], "padded h_n")
    else:
        want = outputs_and_grads(ref, x, hx)
        got = cpu(outputs_and_grads(fused, x.to(device), hx_dev))
    for k in want:
        assert_close(got[k], want[k], c["dtype"], k)


@seed(20261122)
@settings(max_examples=300, deadline=None, database=DATABASE, suppress_health_check=[HealthCheck.too_slow])
@given(case=lstm_cases())
def test_property_matches_nn_lstm(case):
    check_case(case, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@seed(20261127)
@settings(max_examples=100, deadline=None, database=DATABASE, suppress_health_check=[HealthCheck.too_slow])
@given(case=lstm_cases())
def test_property_matches_nn_lstm_on_the_gpu(case):
    check_case(case, "cuda")


def _pair(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, 2, bidirectional=True, dtype=dtype, **kw)
    return ref, FusedLSTM.from_lstm(ref)


LAYOUTS = {
    "transposed input": lambda: (torch.randn(3, 6, 5, dtype=torch.float64).transpose(0, 1), None),
    "sliced input": lambda: (torch.randn(6, 3, 10, dtype=torch.float64)[:, :, ::2], None),
    "expanded input": lambda: (torch.randn(6, 1, 5, dtype=torch.float64).expand(6, 3, 5), None),
    "expanded states": lambda: (torch.randn(6, 3, 5, dtype=torch.float64),
                                (torch.randn(4, 1, 7, dtype=torch.float64).expand(4, 3, 7),
                                 torch.randn(1, 3, 7, dtype=torch.float64).expand(4, 3, 7))),
    "h0 and c0 the same tensor": lambda: (torch.randn(6, 3, 5, dtype=torch.float64),
                                          (lambda s: (s, s))(torch.randn(4, 3, 7, dtype=torch.float64))),
    "non-contiguous states": lambda: (torch.randn(6, 3, 5, dtype=torch.float64),
                                      tuple(torch.randn(4, 7, 3, dtype=torch.float64).transpose(1, 2) for _ in "hc")),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_odd_layouts_match_nn_lstm(name):
    ref, fused = _pair()
    x, hx = LAYOUTS[name]()
    with torch.no_grad():
        want, got = ref(x, hx), fused(x, hx)
    assert_close(got[0], want[0], torch.float64, "output")
    assert_close(got[1][0], want[1][0], torch.float64, "h_n")
    # Gradients flow to the strided originals too.
    assert_close(outputs_and_grads(fused, x.contiguous(), hx)["grad_input"],
                 outputs_and_grads(ref, x.contiguous(), hx)["grad_input"], torch.float64, "grad")


def test_empty_batch_works_as_in_nn_lstm():
    ref, fused = _pair()
    x = torch.randn(4, 0, 5, dtype=torch.float64, requires_grad=True)
    for m in (ref, fused):
        y, (h, c) = m(x)
        assert y.shape == (4, 0, 14) and h.shape == (4, 0, 7)
        (y.sum() + h.sum()).backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        x.grad = None
    y, _ = fused(x, lengths=torch.zeros(0, dtype=torch.int64))
    assert y.shape == (4, 0, 14)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_propagate_as_in_nn_lstm(value):
    ref, fused = _pair()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    x[2, 1, 3] = value
    with torch.no_grad():
        want, got = ref(x), fused(x)
    for a, b in ((got[0], want[0]), (got[1][0], want[1][0]), (got[1][1], want[1][1])):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)
    # The other sequences of the batch are untouched.
    assert not got[0][:, [0, 2]].isnan().any()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_non_finite_recurrent_weight_reaches_the_first_step(value, proj_size):
    """Started from zeros (no hx), the first step's h W_hh^T is zero and the float32 sweep
    leaves it out, but only where W_hh is finite: nn.LSTM multiplies those zeros by it,
    and 0 * inf is NaN from the first step on. float32 and 20 x 2 rows: the sweep packs
    W_hh, which is where it learns whether the weight is finite."""
    ref = nn.LSTM(5, 7, proj_size=proj_size, bidirectional=True)
    fused = FusedLSTM.from_lstm(ref)
    with torch.no_grad():
        for m in (ref, fused):
            m.weight_hh_l0[3, 2] = value  # forward direction only
    x = torch.randn(20, 2, 5)
    with torch.no_grad():
        want, got = ref(x), fused(x)
    assert want[0][0, :, : proj_size or 7].isnan().any(), "nn.LSTM's first forward output holds NaN"
    for a, b in ((got[0], want[0]), (got[1][0], want[1][0]), (got[1][1], want[1][1])):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("B", [1, 3])
def test_no_hx_gives_what_zero_hx_gives(B, proj_size):
    """No hx (the first recurrent product left out) and hx of zeros (computed): the same
    outputs, states and gradients, to the bit. float32, long enough to pack W_hh."""
    torch.manual_seed(0)
    m = FusedLSTM(5, 7, num_layers=2, proj_size=proj_size, bidirectional=True)
    x = torch.randn(24, B, 5)
    zeros = (torch.zeros(4, B, proj_size or 7), torch.zeros(4, B, 7))
    with torch.no_grad():
        for a, b in zip(outputs_of(m(x)), outputs_of(m(x, zeros))):
            assert torch.equal(a, b)
    without, with_zeros = outputs_and_grads(m, x, None), outputs_and_grads(m, x, zeros)
    for k in without:
        assert torch.equal(without[k], with_zeros[k]), k


def outputs_of(result):
    y, (h, c) = result
    return y, h, c


def _weight_grads(module, *args, **kw):
    module.zero_grad()
    y, (h, c) = module(*args, **kw)
    ((y.data if isinstance(y, PackedSequence) else y).sum() + h.sum() + c.sum()).backward()
    return y, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("with_states", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_inputs_made_in_inference_mode_train_as_plain_ones(with_lengths, with_states):
    # Features from a frozen front end computed under torch.inference_mode(), fed to a
    # trained LSTM. Autograd refuses to save such tensors; nn.LSTM takes them in some
    # layouts (batch_first input and no states) and not others. The fused layer takes them
    # in all, with the gradients that plain copies give nn.LSTM.
    ref, fused = _pair(batch_first=True)
    with torch.inference_mode():
        x = torch.randn(3, 6, 5, dtype=torch.float64)
        hx = (torch.randn(4, 3, 7, dtype=torch.float64), torch.randn(4, 3, 7, dtype=torch.float64))
        lengths = torch.tensor([6, 2, 4])
    assert x.is_inference() and lengths.is_inference()
    hx_ref = tuple(t.clone() for t in hx) if with_states else None
    hx = hx if with_states else None
    if with_lengths:
        packed = pack_padded_sequence(x.clone(), lengths.clone(), batch_first=True, enforce_sorted=False)
        y_ref, want = _weight_grads(ref, packed, hx_ref)
        y_ref = pad_packed_sequence(y_ref, batch_first=True, total_length=6)[0]
        y, got = _weight_grads(fused, x, hx, lengths=lengths)
    else:
        y_ref, want = _weight_grads(ref, x.clone(), hx_ref)
        y, got = _weight_grads(fused, x, hx)
    assert_close(y, y_ref, torch.float64, "output")
    for name in want:
        assert_close(got[name], want[name], torch.float64, name)


def test_cell_trains_on_inputs_made_in_inference_mode():
    # nn.LSTMCell refuses them; the fused cell gives the gradients plain copies give.
    cell = FusedLSTMCell(5, 7, dtype=torch.float64)
    with torch.inference_mode():
        x, h, c = (torch.randn(3, n, dtype=torch.float64) for n in (5, 7, 7))
    grads = []
    for args in ((x, h, c), (x.clone(), h.clone(), c.clone())):
        cell.zero_grad()
        h_new, c_new = cell(args[0], args[1:])
        (h_new.sum() + c_new.sum()).backward()
        grads.append([p.grad.clone() for p in cell.parameters()])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_float64_module_and_inputs_stay_float64():
    _, fused = _pair(torch.float64)
    y, (h, c) = fused(torch.randn(3, 2, 5, dtype=torch.float64))
    assert y.dtype == h.dtype == c.dtype == torch.float64


@pytest.mark.slow
def test_long_sequence_matches_and_saves_linear_memory():
    T, B, H = 20000, 2, 64
    torch.manual_seed(0)
    ref = nn.LSTM(8, H, bidirectional=True)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(T, B, 8)
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x.clone().requires_grad_())  # what the module's forward saves, alone
    got = outputs_and_grads(fused, x)
    want = outputs_and_grads(ref, x)
    for k in want:
        assert torch.isfinite(got[k]).all(), k
        # float32 over 20000 steps: the same rounding budget per step as the short tests.
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)
    # Saved for backward: gates (8H), c_prev (2H), h_prev (2H) per step and row, plus x
    # and the weights: linear in T*B*H.
    per_step = T * B * (8 + 2 + 2) * H * 4
    assert sum(saved_bytes) <= per_step + x.numel() * 4 + 1_000_000, (sum(saved_bytes), per_step)


def _rss_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.slow
def test_no_memory_growth_over_2000_training_steps():
    torch.manual_seed(0)
    model = FusedLSTM(16, 32, num_layers=2, bidirectional=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(12, 8, 16)
    lengths = torch.tensor([12, 3, 7, 1, 12, 5, 9, 2])

    def step():
        y, (h, c) = model(x, lengths=lengths)
        loss = y.square().mean() + h.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(200):  # warm-up: allocator caches, oneDNN primitives
        step()
    before = _rss_bytes()
    for _ in range(2000):
        step()
    growth = _rss_bytes() - before
    # A leak of even one 768-byte state tensor per step would add 1.5 MB.
    assert growth < 1_000_000, f"resident memory grew by {growth / 1e6:.1f} MB over 2000 steps"


def test_four_threads_running_inference_at_once():
    _, fused = _pair(torch.float32)
    fused.eval()
    inputs = [torch.randn(20, 6, 5) for _ in range(4)]
    with torch.no_grad():
        expected = [fused(x)[0] for x in inputs]
    results, errors = [None] * 4, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(50):
                    results[i] = fused(inputs[i])[0]
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert torch.equal(got, want)
