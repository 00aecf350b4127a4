"""ONNX export: every fused layer becomes one ONNX `LSTM` node (both directions in
one), with `lengths` as its sequence_lens, under both of torch.onnx.export's exporters.

- dynamo=True (the default) traces the model with torch.export and translates ATen
  ops; a custom op reaches a translation only through a table the caller passes. So the
  modules themselves, when they see that export (`dynamo_export()`), emit the node with
  torch.onnx.ops.symbolic_multi_out (`lstm_layer`, `lstm_cell` below).
- dynamo=False traces with TorchScript, where the ops appear as
  birnn_ext::lstm_layer_forward and lstm_cell_forward; the symbolic functions
  registered here (`register_torchscript_symbolics`) turn each into the same node.

ONNX's LSTM takes W [D,4H,I], R [D,4H,H], B [D,8H] (input bias, then recurrent bias)
with the gates in the order i, o, f, c; nn.LSTM's tensors hold i, f, g, o. Its output Y
is [T,D,B,H], which becomes the layer output [T,B,D*H].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# nn.LSTM's gate blocks (i, f, g, o = 0..3) in the order ONNX's LSTM wants them.
_ONNX_GATE_ORDER = (0, 3, 1, 2)
# LSTM's latest definition (opset 14); every opset from 7 on reads these inputs alike.
_LSTM_OPSET = 14


def gate_rows(hidden_size: int) -> Tensor:
    """Row indices that reorder a [4H, ...] tensor of nn.LSTM's from i, f, g, o to ONNX's i, o, f, c."""
    H = hidden_size
    return torch.cat([torch.arange(k * H, (k + 1) * H) for k in _ONNX_GATE_ORDER])


def _attributes(hidden_size: int, directions: int) -> dict:
    return {"hidden_size": hidden_size, "direction": "bidirectional" if directions == 2 else "forward"}


def refuse_projection(module_name: str) -> None:
    raise RuntimeError(
        f"{module_name} with proj_size > 0 cannot be exported to ONNX: ONNX's LSTM has no projection. "
        "Export a model without proj_size, or deploy this one with torch.export and AOTInductor "
        "(README, Deploying)."
    )


# ---------------------------------------------------------------- dynamo=True


def _onnx_dynamo_exporting() -> bool:
    # torch.onnx.is_in_onnx_export() reads this flag, but torch.compile and strict
    # torch.export fold that function to False, and the ONNX exporter falls back to a
    # strict export when a non-strict one fails: read the flag itself, which both see.
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:  # a torch that moved it: the public function still serves non-strict export
        return torch.onnx.is_in_onnx_export()
    return _flags._is_onnx_exporting


def dynamo_export() -> bool:
    """Whether torch.onnx.export(..., dynamo=True) is tracing this call. is_exporting() is
    checked first: it costs 0.1 us (measured), and every forward call asks."""
    return torch.compiler.is_exporting() and _onnx_dynamo_exporting()


def _stack_onnx(tensors: Sequence[Tensor], rows: Tensor) -> Tensor:
    return torch.stack([t.index_select(0, rows) for t in tensors])


def lstm_layer(
    x: Tensor, h0: Tensor | None, c0: Tensor | None, weights: Sequence[Tensor | None], lengths: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """lstm_layer_forward's arguments (weights: its ten weight arguments, w_ih, w_hh,
    b_ih, b_hh, w_hr, then the reverse direction's, None where absent; no projection;
    h0 and c0 None for zeros, which ONNX's LSTM also takes as absent inputs) and first
    three results, as one ONNX LSTM node."""
    directions = [weights[:5]] + ([weights[5:]] if weights[6] is not None else [])
    T, B = x.shape[0], x.shape[1]
    D, H = len(directions), weights[1].shape[1]
    rows = gate_rows(H).to(x.device)
    W, R = _stack_onnx([d[0] for d in directions], rows), _stack_onnx([d[1] for d in directions], rows)
    bias = None
    if weights[2] is not None:
        bias = torch.cat([_stack_onnx([d[2] for d in directions], rows), _stack_onnx([d[3] for d in directions], rows)],
                         dim=1)
    seq_lens = lengths.to(torch.int32) if lengths is not None else None
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM", [x, W, R, bias, seq_lens, h0, c0], _attributes(H, D),
        dtypes=[x.dtype] * 3, shapes=[[T, D, B, H], [D, B, H], [D, B, H]], version=_LSTM_OPSET,
    )
    return y.permute(0, 2, 1, 3).reshape(T, B, D * H), h_n, c_n


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One step (x [B,I], h, c [B,H]) as a one-step ONNX LSTM node."""
    weights = [w_ih, w_hh, b_ih, b_hh, None] + [None] * 5
    _, h_new, c_new = lstm_layer(x.unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0), weights)
    return h_new.squeeze(0), c_new.squeeze(0)


# ---------------------------------------------------------------- dynamo=False


def _unused(g):
    """An absent optional input of an ONNX node."""
    n = g.op("prim::Constant")
    n.setType(torch._C.OptionalType.ofTensor())
    return n


def _is_none(v) -> bool:
    return v is None or v.node().mustBeNone()


def _stack_onnx_ts(g, tensors, rows):
    zero = g.op("Constant", value_t=torch.tensor([0]))
    return g.op("Concat", *[g.op("Unsqueeze", g.op("Gather", t, rows, axis_i=0), zero) for t in tensors], axis_i=0)


def _lstm_node_ts(g, x, h0, c0, w_ih, w_hh, bias_pairs, lengths, hidden_size):
    """The ONNX LSTM node for TorchScript graphs; bias_pairs [(b_in, b_rec)] per direction or None."""
    D = len(w_hh)
    rows = g.op("Constant", value_t=gate_rows(hidden_size))
    W, R = _stack_onnx_ts(g, w_ih, rows), _stack_onnx_ts(g, w_hh, rows)
    if bias_pairs is None:
        bias = _unused(g)
    else:
        bias = g.op("Concat", _stack_onnx_ts(g, [b for b, _ in bias_pairs], rows),
                    _stack_onnx_ts(g, [b for _, b in bias_pairs], rows), axis_i=1)
    seq_lens = _unused(g) if _is_none(lengths) else g.op("Cast", lengths, to_i=6)  # 6: INT32
    attrs = _attributes(hidden_size, D)
    h0, c0 = (_unused(g) if _is_none(t) else t for t in (h0, c0))  # None: zeros, as in ONNX
    return g.op("LSTM", x, W, R, bias, seq_lens, h0, c0, outputs=3,
                hidden_size_i=attrs["hidden_size"], direction_s=attrs["direction"])


def _hidden_size(w_hh) -> int:
    sizes = w_hh.type().sizes()
    return sizes[0] // 4


def _empty(g):
    """Stands for the op's outputs that only training uses (never read after export)."""
    return g.op("Constant", value_t=torch.empty(0))


def _lstm_layer_forward_ts(g, x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse, w_hh_reverse,
                           b_ih_reverse, b_hh_reverse, w_hr_reverse, training):
    if not _is_none(w_hr):
        refuse_projection("an LSTM layer")
    reverse = not _is_none(w_hh_reverse)
    w_ih_all = [w_ih, w_ih_reverse] if reverse else [w_ih]
    w_hh_all = [w_hh, w_hh_reverse] if reverse else [w_hh]
    bias_pairs = None
    if not _is_none(b_ih):
        bias_pairs = [(b_ih, b_hh), (b_ih_reverse, b_hh_reverse)] if reverse else [(b_ih, b_hh)]
    H = _hidden_size(w_hh)
    y, h_n, c_n = _lstm_node_ts(g, x, h0, c0, w_ih_all, w_hh_all, bias_pairs, lengths, H)
    # Y [T,D,B,H] -> [T,B,D,H] -> [T,B,D*H]
    y = g.op("Reshape", g.op("Transpose", y, perm_i=[0, 2, 1, 3]), g.op("Constant", value_t=torch.tensor([0, 0, -1])))
    return y, h_n, c_n, _empty(g), _empty(g), _empty(g), _empty(g)


def _lstm_cell_forward_ts(g, x, h, c, w_ih, w_hh, bias, training):
    H = _hidden_size(w_hh)
    axis0 = g.op("Constant", value_t=torch.tensor([0]))
    # The op takes one bias (b_ih + b_hh); ONNX adds its two, so the second is zeros.
    bias_pairs = None if _is_none(bias) else [(bias, g.op("Sub", bias, bias))]
    _, h_new, c_new = _lstm_node_ts(g, g.op("Unsqueeze", x, axis0), g.op("Unsqueeze", h, axis0),
                                    g.op("Unsqueeze", c, axis0), [w_ih], [w_hh], bias_pairs, None, H)
    return g.op("Squeeze", h_new, axis0), g.op("Squeeze", c_new, axis0), _empty(g)


def register_torchscript_symbolics() -> None:
    """Teaches torch.onnx.export(..., dynamo=False) the two forward ops."""
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("birnn_ext::lstm_layer_forward", _lstm_layer_forward_ts, _LSTM_OPSET)
    register_custom_op_symbolic("birnn_ext::lstm_cell_forward", _lstm_cell_forward_ts, _LSTM_OPSET)
