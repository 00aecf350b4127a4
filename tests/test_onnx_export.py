"""ONNX export under both of torch.onnx.export's exporters: each fused layer becomes
one ONNX LSTM node, and ONNX Runtime reproduces the module, at the exported shapes and
at other batch sizes and sequence lengths."""

from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_ext import FusedBiLSTM, FusedLSTM, FusedLSTMCell

# float32 on both sides, the same sums in another order (ONNX Runtime's own GEMMs and
# activations): the parity tests' float32 tolerance.
TOL = dict(rtol=1e-5, atol=1e-5)
EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


class LayerModel(nn.Module):
    """The module under test with every output returned, and its optional arguments as
    graph inputs where the case has them."""

    def __init__(self, lstm: nn.Module, with_lengths: bool, with_state: bool):
        super().__init__()
        self.lstm, self.with_lengths, self.with_state = lstm, with_lengths, with_state

    def forward(self, x, *extra):
        extra = list(extra)
        lengths = extra.pop(0) if self.with_lengths else None
        hx = (extra[0], extra[1]) if self.with_state else None
        y, (h, c) = self.lstm(x, hx, lengths=lengths) if lengths is not None else self.lstm(x, hx)
        return y, h, c


def _export(model, args, path, dynamo, dynamic):
    """torch.onnx.export with `dynamic` = {input index: {dim: name}} made dynamic."""
    names = [f"in{k}" for k in range(len(args))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation and tracer notes
        if dynamo:
            dims, shapes = {}, torch.export.ShapesCollection()
            for k, spec in dynamic.items():
                shapes[args[k]] = {d: dims.setdefault(n, torch.export.Dim(n)) for d, n in spec.items()}
            torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=shapes.dynamic_shapes(model, args),
                              input_names=names)
        else:
            torch.onnx.export(model, args, path, dynamo=False, input_names=names,
                              dynamic_axes={names[k]: d for k, d in dynamic.items()})
    return names


def _run_onnx(path, names, args):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})


def _inputs(B, T, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, 6) if cfg["batch_first"] else (T, B, 6), generator=g)
    args = [x]
    if cfg["lengths"]:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T  # one full-length sequence, one of length 1
        lengths[-1] = 1
        args.append(lengths)
    if cfg["state"]:
        LD = cfg["layers"] * (2 if cfg["bidirectional"] else 1)
        args += [torch.randn(LD, B, 10, generator=g), torch.randn(LD, B, 10, generator=g)]
    return args


CASES = {
    "bidirectional 2 layers batch_first lengths": dict(bidirectional=True, layers=2, batch_first=True, bias=True,
                                                        lengths=True, state=False),
    "bidirectional 1 layer given states": dict(bidirectional=True, layers=1, batch_first=False, bias=True,
                                                lengths=False, state=True),
    "bidirectional no bias lengths and states": dict(bidirectional=True, layers=2, batch_first=False, bias=False,
                                                      lengths=True, state=True),
    "one direction 3 layers": dict(bidirectional=False, layers=3, batch_first=True, bias=True, lengths=False,
                                   state=False),
    "one direction lengths no bias": dict(bidirectional=False, layers=1, batch_first=False, bias=False, lengths=True,
                                          state=True),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", list(CASES))
def test_layers_export_as_onnx_lstm_nodes(tmp_path, case, dynamo):
    cfg = CASES[case]
    torch.manual_seed(0)
    lstm = FusedLSTM(6, 10, num_layers=cfg["layers"], bias=cfg["bias"], batch_first=cfg["batch_first"],
                     bidirectional=cfg["bidirectional"], dropout=0.3 if cfg["layers"] > 1 else 0.0)
    model = LayerModel(lstm, cfg["lengths"], cfg["state"]).eval()
    args = _inputs(3, 5, cfg, seed=1)
    b, t = (0, 1) if cfg["batch_first"] else (1, 0)
    dynamic = {0: {b: "batch", t: "time"}}
    if cfg["lengths"]:
        dynamic[1] = {0: "batch"}
    if cfg["state"]:
        k = 2 if cfg["lengths"] else 1
        dynamic[k] = dynamic[k + 1] = {1: "batch"}
    path = tmp_path / "model.onnx"
    names = _export(model, tuple(args), path, dynamo, dynamic)

    graph = onnx.load(path).graph
    lstm_nodes = [n for n in graph.node if n.op_type == "LSTM"]
    assert len(lstm_nodes) == cfg["layers"], [n.op_type for n in graph.node]
    direction = "bidirectional" if cfg["bidirectional"] else "forward"
    for node in lstm_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["hidden_size"] == 10
        assert attrs.get("direction", b"forward").decode() == direction
        assert (len(node.input) > 4 and node.input[4] != "") == cfg["lengths"]  # sequence_lens

    # The exported shapes, then another batch size and sequence length.
    for B, T, seed in ((3, 5, 1), (7, 9, 2), (1, 2, 3)):
        args = _inputs(B, T, cfg, seed)
        with torch.no_grad():
            expected = model(*args)
        for got, want, what in zip(_run_onnx(path, names, args), expected, ("y", "h_n", "c_n")):
            torch.testing.assert_close(torch.from_numpy(got), want, **TOL, msg=lambda m: f"{what} B={B} T={T}: {m}")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_a_bare_module_exports(tmp_path, dynamo):
    """The fused module itself as the exported model, called with its input alone."""
    torch.manual_seed(0)
    model = FusedBiLSTM(6, 10, num_layers=2).eval()
    x = torch.randn(5, 3, 6)
    path = tmp_path / "bare.onnx"
    names = _export(model, (x,), path, dynamo, {0: {1: "batch"}})
    xb = torch.randn(5, 4, 6)
    with torch.no_grad():
        y, (h, c) = model(xb)
    for got, want in zip(_run_onnx(path, names, [xb]), (y, h, c)):
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_fused_bilstm_classifier_exports(tmp_path, dynamo):
    """A whole model (FusedBiLSTM then Linear), as a user exports it: only x is given."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedBiLSTM(6, 10, num_layers=2, batch_first=True)
            self.fc = nn.Linear(20, 4)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(2, 7, 6)
    path = tmp_path / "classifier.onnx"
    names = _export(model, (x,), path, dynamo, {0: {0: "batch"}})
    for B in (2, 5):
        xb = torch.randn(B, 7, 6)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(_run_onnx(path, names, [xb])[0]), model(xb), **TOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_loop_exports(tmp_path, dynamo, bias):
    class CellLoop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = FusedLSTMCell(6, 10, bias=bias)

        def forward(self, x, h, c):
            for t in range(x.size(1)):
                h, c = self.cell(x[:, t], (h, c))
            return h, c

    torch.manual_seed(0)
    model = CellLoop().eval()
    args = (torch.randn(3, 4, 6), torch.randn(3, 10), torch.randn(3, 10))
    path = tmp_path / "cell.onnx"
    names = _export(model, args, path, dynamo, {0: {0: "batch"}, 1: {0: "batch"}, 2: {0: "batch"}})
    assert sum(n.op_type == "LSTM" for n in onnx.load(path).graph.node) == 4  # one per step
    for B in (3, 6):
        args = (torch.randn(B, 4, 6), torch.randn(B, 10), torch.randn(B, 10))
        with torch.no_grad():
            expected = model(*args)
        for got, want in zip(_run_onnx(path, names, args), expected):
            torch.testing.assert_close(torch.from_numpy(got), want, **TOL)


def test_packed_sequence_exports_with_the_torchscript_exporter(tmp_path):
    """nn.LSTM's PackedSequence path exports with dynamo=False only (the dynamo exporter
    cannot trace pack_padded_sequence); so does FusedBiLSTM's, as sequence_lens."""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedBiLSTM(6, 10)

        def forward(self, x, lengths):
            y, (h, c) = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
            return pad_packed_sequence(y, total_length=x.size(0))[0], h, c

    torch.manual_seed(0)
    model = Packed().eval()
    x, lengths = torch.randn(5, 3, 6), torch.tensor([5, 2, 4])
    path = tmp_path / "packed.onnx"
    names = _export(model, (x, lengths), path, False, {})
    other = torch.tensor([3, 5, 1])  # another order, so that the sorting is exercised too
    with torch.no_grad():
        expected = model(x, other)
    for got, want in zip(_run_onnx(path, names, [x, other]), expected):
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL)


def test_packed_sequence_is_refused_by_the_dynamo_exporter_with_the_way_out(tmp_path):
    packed = pack_padded_sequence(torch.randn(5, 3, 6), torch.tensor([5, 4, 2]))

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedBiLSTM(6, 10)

        def forward(self, data):
            return self.lstm(packed._replace(data=data))[0].data

    with pytest.raises(Exception, match="cannot trace a PackedSequence.*lengths=.*dynamo=False"):
        _export(Packed().eval(), (packed.data,), tmp_path / "p.onnx", True, {})


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_projection_is_refused_with_a_clear_message(tmp_path, dynamo):
    model = FusedLSTM(6, 10, proj_size=4).eval()
    with pytest.raises(Exception, match="proj_size > 0 cannot be exported to ONNX.*AOTInductor"):
        _export(model, (torch.randn(5, 3, 6),), tmp_path / "p.onnx", dynamo, {})

