"""The fused modules among torch.nn's own tools: the way back to nn.LSTM (to_lstm,
to_lstm_cell, to_torch_nn) for tools that know only that class, what quantization and
TorchScript say, and the tools that work on the fused modules as they are
(parametrizations, pruning, meta-device construction, vmap)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import quantize_dynamic

from birnn_ext import FusedBiLSTM, FusedLSTM, FusedLSTMCell, to_torch_nn
from helpers import TOL, run_python

F32 = TOL[torch.float32]

CONFIGS = {
    "bidirectional 2 layers": dict(num_layers=2, bidirectional=True),
    "batch_first no bias": dict(batch_first=True, bias=False),
    "projection": dict(proj_size=3, bidirectional=True),
    "dropout": dict(num_layers=2, dropout=0.25),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_to_lstm_gives_nn_lstm_with_the_same_weights_and_mode(config):
    torch.manual_seed(0)
    fused = FusedLSTM(5, 7, **CONFIGS[config]).eval()
    lstm = fused.to_lstm()
    assert type(lstm) is nn.LSTM
    assert not lstm.training
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size"):
        assert getattr(lstm, attr) == getattr(fused, attr), attr
    assert lstm.state_dict().keys() == fused.state_dict().keys()
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        (y, (h, c)), (y_ref, (h_ref, c_ref)) = fused(x), lstm(x)
    for got, want in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want, **F32)
    # Copies: training the fused module afterwards leaves the nn.LSTM as it was.
    before = lstm.weight_hh_l0.clone()
    with torch.no_grad():
        fused.weight_hh_l0.add_(1.0)
    torch.testing.assert_close(lstm.weight_hh_l0, before, rtol=0, atol=0)
    assert fused.train().to_lstm().training


def test_to_lstm_takes_the_weights_the_forward_sees():
    """Under a parametrization the weight is computed; to_lstm copies that value."""
    torch.manual_seed(0)
    fused = FusedBiLSTM(5, 7)
    nn.utils.parametrizations.weight_norm(fused, "weight_hh_l0")
    with torch.no_grad():
        fused.parametrizations.weight_hh_l0.original0.mul_(2.0)  # the norm: the weight changes
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused.to_lstm()(x)[0], fused(x)[0], **F32)


def test_to_lstm_cell_gives_nn_lstm_cell():
    torch.manual_seed(0)
    for bias in (True, False):
        fused = FusedLSTMCell(5, 7, bias=bias)
        cell = fused.to_lstm_cell()
        assert type(cell) is nn.LSTMCell and cell.bias == bias
        x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
        with torch.no_grad():
            for got, want in zip(fused(x, (h, c)), cell(x, (h, c))):
                torch.testing.assert_close(got, want, **F32)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 6))
        self.lstm = FusedBiLSTM(6, 8, num_layers=2, batch_first=True)
        self.cell = FusedLSTMCell(16, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.lstm(self.encoder(x))
        h, _ = self.cell(y[:, -1])
        return self.head(h)


def test_to_torch_nn_replaces_every_fused_module_in_place():
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        expected = model(x)
    assert to_torch_nn(model) is model
    assert type(model.lstm) is nn.LSTM and type(model.cell) is nn.LSTMCell
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **F32)
    alone = FusedLSTM(3, 4)
    assert type(to_torch_nn(alone)) is nn.LSTM


def test_quantize_dynamic_warns_about_fused_modules_and_quantizes_after_to_torch_nn():
    torch.manual_seed(0)
    model = Tagger().eval()
    with pytest.warns(UserWarning, match=r"does not quantize FusedBiLSTM.*to_torch_nn") as record:
        still_float = quantize_dynamic(model, {nn.LSTM, nn.LSTMCell, nn.Linear})
    assert any("FusedLSTMCell" in str(w.message) for w in record)
    assert type(still_float.lstm) is FusedBiLSTM  # what the warning is about

    reference = copy.deepcopy(model)
    to_torch_nn(reference)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quantized = quantize_dynamic(to_torch_nn(model), {nn.LSTM, nn.LSTMCell, nn.Linear})
    assert not [w for w in record if "does not quantize" in str(w.message)]  # nothing fused is left
    assert type(quantized.lstm) is nnqd.LSTM and type(quantized.cell) is nnqd.LSTMCell
    # The same float weights quantize to the same model as an nn.LSTM model's would.
    expected_model = quantize_dynamic(reference, {nn.LSTM, nn.LSTMCell, nn.Linear})
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(quantized(x), expected_model(x), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: FusedBiLSTM(5, 7), lambda: FusedLSTMCell(5, 7), Tagger],
                         ids=["FusedBiLSTM", "FusedLSTMCell", "model holding both"])
def test_jit_script_points_to_torch_export(make):
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile Fused\w+.*torch\.export\.export"):
        torch.jit.script(make())


# ---------------------------------------------------------------- tools that work as they are


def _reference_pair(**kw):
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, **kw)
    return ref, FusedLSTM.from_lstm(ref)


def test_weight_norm_parametrization_trains_like_nn_lstm():
    ref, fused = _reference_pair(bidirectional=True)
    for m in (ref, fused):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    x = torch.randn(4, 3, 5)
    ref(x)[0].sum().backward()
    fused(x)[0].sum().backward()
    for (name, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, **F32, msg=name)


def test_pruning_masks_the_weights_as_in_nn_lstm():
    ref, fused = _reference_pair(bidirectional=True)
    for m in (ref, fused):
        prune.l1_unstructured(m, "weight_ih_l0", amount=0.5)
    assert (fused.weight_ih_l0 == 0).sum() == fused.weight_ih_l0.numel() // 2
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], ref(x)[0], **F32)


def test_meta_device_construction_then_to_empty():
    fused = FusedBiLSTM(5, 7, num_layers=2, device="meta")
    assert fused.weight_ih_l0.is_meta
    fused.to_empty(device="cpu")
    fused.reset_parameters()
    ref = fused.to_lstm()
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[0], ref(x)[0], **F32)


def test_vmap_over_a_batch_of_inputs():
    ref, fused = _reference_pair(bidirectional=True, num_layers=2)
    xs = torch.randn(3, 4, 2, 5)  # three independent [T,B,I] inputs
    with torch.no_grad():
        got = torch.vmap(lambda x: fused(x)[0])(xs)
        want = torch.stack([ref(x)[0] for x in xs])
    torch.testing.assert_close(got, want, **F32)


def test_vmap_with_lengths_states_gradients_and_the_cell():
    """ops.py folds the vmapped dimension into the batch rows: vmapped lengths and initial
    states (the vmapped dimension where each puts it), gradients through the vmapped call,
    and the cell, against one sample at a time."""
    ref, fused = _reference_pair(bidirectional=True, num_layers=2)
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(2, 3, 6, 5, generator=g)  # vmapped at dimension 1: three [T,B,I] inputs
    h0s = torch.randn(4, 3, 2, 7, generator=g)  # vmapped at dimension 1
    lengths = torch.tensor([[6, 1], [3, 6], [2, 2]])  # vmapped at dimension 0

    def fused_run(x, h0, n):
        y, (h, c) = fused(x.transpose(0, 1), (h0, torch.zeros_like(h0)), lengths=n)
        return y, h, c

    got = torch.vmap(fused_run, in_dims=(1, 1, 0))(xs, h0s, lengths)
    (got[0].square().sum() + got[1].sum() + got[2].sum()).backward()
    want = [[], [], []]
    for i in range(3):
        packed = nn.utils.rnn.pack_padded_sequence(xs[:, i].transpose(0, 1), lengths[i], enforce_sorted=False)
        y, (h, c) = ref(packed, (h0s[:, i], torch.zeros_like(h0s[:, i])))
        y = nn.utils.rnn.pad_packed_sequence(y, total_length=6)[0]
        (y.square().sum() + h.sum() + c.sum()).backward()
        for k, t in enumerate((y, h, c)):
            want[k].append(t)
    for k in range(3):
        torch.testing.assert_close(got[k], torch.stack(want[k]), **F32)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **F32, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T = 6\], got values from 0 to 6"):
        torch.vmap(fused_run, in_dims=(1, 1, 0))(xs, h0s, torch.tensor([[6, 1], [0, 6], [2, 2]]))

    torch.manual_seed(0)
    cell_ref = nn.LSTMCell(5, 7)
    cell = FusedLSTMCell.from_cell(cell_ref)
    with torch.no_grad():
        got = torch.vmap(lambda x: cell(x)[1])(xs[0])
        torch.testing.assert_close(got, torch.stack([cell_ref(x)[1] for x in xs[0]]), **F32)


def test_vmap_over_an_ensemble_of_modules():
    """Per-sample weights (torch.func.stack_module_state): one call per model."""
    torch.manual_seed(0)
    models = [FusedBiLSTM(5, 7) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(4, 2, 5)
    base = copy.deepcopy(models[0]).to("meta")

    def run(p, b):
        return torch.func.functional_call(base, (p, b), (x,))[0]

    with torch.no_grad():
        got = torch.vmap(run)(params, buffers)
        torch.testing.assert_close(got, torch.stack([m(x)[0] for m in models]), **F32)


def test_vmap_needs_no_per_sample_fallback():
    """functorch warns when it has to call an op once per sample; the rules spare that."""
    out = run_python(
        "import torch, birnn_ext\n"
        "m, cell = birnn_ext.FusedBiLSTM(5, 7), birnn_ext.FusedLSTMCell(5, 7)\n"
        "with torch.no_grad():\n"
        "    torch.vmap(lambda x: m(x)[0])(torch.randn(3, 4, 2, 5))\n"
        "    torch.vmap(lambda x: cell(x)[0])(torch.randn(3, 2, 5))\n"
        "print('ran')\n")
    assert out.returncode == 0 and "ran" in out.stdout, out.stderr
    assert "batching rule" not in out.stderr, out.stderr


class _Lengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = FusedBiLSTM(5, 7)

    def forward(self, x, lengths):
        return self.lstm(x, lengths=lengths)[0]


def test_fx_symbolic_trace_keeps_the_fused_modules_as_leaves():
    """As it keeps nn.LSTM: one call_module node each, run by the module at call time."""
    torch.manual_seed(0)
    model = Tagger()
    traced = torch.fx.symbolic_trace(model)
    leaves = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert "lstm" in leaves and "cell" in leaves, leaves
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with_lengths = _Lengths()
    traced = torch.fx.symbolic_trace(with_lengths)
    (node,) = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert "lengths" in node.kwargs
    x, lengths = torch.randn(6, 2, 5), torch.tensor([6, 3])
    torch.testing.assert_close(traced(x, lengths), with_lengths(x, lengths), rtol=0, atol=0)


def test_jit_trace_serves_inference_and_training():
    """torch.jit.trace's own check re-runs the module under no_grad, and the trace
    records the ops' `training` flag as a constant: a module traced in either mode, with
    or without a gradient, runs inference and trains."""
    torch.manual_seed(0)
    model = Tagger()
    x = torch.randn(3, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        training = torch.jit.trace(model, x)  # the default check_trace=True
        eval_model = copy.deepcopy(model).eval()  # Tagger has no dropout: the same function
        inference = torch.jit.trace(eval_model, x)
    other = torch.randn(2, 6, 5)  # another batch size and sequence length
    saved = io.BytesIO()
    torch.jit.save(inference, saved)
    saved.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(saved)(other), model(other), **F32)
        torch.testing.assert_close(inference(other), model(other), **F32)
        torch.testing.assert_close(training(other), model(other), **F32)
    want = copy.deepcopy(model)
    want(other).sum().backward()
    for traced, module in ((training, model), (inference, eval_model)):
        traced(other).sum().backward()
        for (name, p), q in zip(module.named_parameters(), want.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **F32, msg=lambda m, n=name: f"{n}: {m}")
