"""Python side of the registered ops: fake kernels (for torch.compile and
torch.export), vmap rules, autocast rules, and thin wrappers.

The schemas live in csrc/ops.cpp, the kernels in csrc/cpu and csrc/cuda, and the
autograd in csrc/autograd.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from birnn_ext import _onnx
from birnn_ext._loader import ensure_loaded

ensure_loaded()

_ops = torch.ops.birnn_ext


# ---------------------------------------------------------------- fake kernels


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math type: float64 for float64, float32 for every other storage type."""
    return torch.float64 if dtype == torch.float64 else torch.float32



def _check_devices(op: str, x: Tensor, **tensors: Tensor | None) -> None:
    """The real kernels check that every tensor is on x's device; so must the fake
    ones, or a call with one tensor on the meta device would dispatch here and quietly
    return shapes instead of failing."""
    for name, t in tensors.items():
        torch._check(
            t is None or t.device == x.device,
            lambda: f"{op}: {name} must be on the device of x ({x.device}), got {t.device}",
        )


@torch.library.register_fake("birnn_ext::lstm_layer_forward")
def _(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse,
      w_hr_reverse, training):
    _check_devices("lstm_layer_forward", x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr,
                   w_ih_reverse=w_ih_reverse, w_hh_reverse=w_hh_reverse, b_ih_reverse=b_ih_reverse,
                   b_hh_reverse=b_hh_reverse, w_hr_reverse=w_hr_reverse)
    T, B, _ = x.shape
    D = 2 if w_hh_reverse is not None else 1
    G, P = w_hh.shape
    H = G // 4
    outputs = x.new_empty((T, B, D * P)), x.new_empty((D, B, P)), x.new_empty((D, B, H))
    if not training:  # nothing saved for backward: None, as the kernels leave them undefined
        return *outputs, None, None, None, None
    return (
        *outputs,
        x.new_empty((T, B, D * G)),
        x.new_empty((T, B, D * H), dtype=_math_dtype(x.dtype)),  # the cell state is kept in the math type
        x.new_empty((D, T, B, P)),
        x.new_empty((D, T if w_hr is not None else 0, B, H)),
    )


@torch.library.register_fake("birnn_ext::lstm_layer_backward")
def _(grad_y, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_hr, w_ih_reverse, w_hh_reverse, w_hr_reverse, gates,
      c_prev, h_prev, h_raw, input_grad=True, weight_grad=True):
    T, B, I = x.shape
    D = 2 if w_hh_reverse is not None else 1
    G, P = w_hh.shape
    H = G // 4
    return (
        x.new_empty((T, B, I) if input_grad else (0,)),
        x.new_empty((D, B, P)),
        x.new_empty((D, B, H)),
        x.new_empty((D, G, I) if weight_grad else (0,)),
        x.new_empty((D, G, P) if weight_grad else (0,)),
        x.new_empty((D, G)),
        x.new_empty((D if w_hr is not None else 0, P, H) if weight_grad else (0,)),
    )


@torch.library.register_fake("birnn_ext::lstm_cell_forward")
def _(x, h, c, w_ih, w_hh, bias, training):
    _check_devices("lstm_cell_forward", x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, bias=bias)
    B, H = h.shape
    return h.new_empty((B, H)), c.new_empty((B, H)), x.new_empty((B, 4 * H)) if training else None


@torch.library.register_fake("birnn_ext::lstm_cell_backward")
def _(grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, gates, input_grad=True, weight_grad=True):
    return (x.new_empty(x.shape if input_grad else (0,)), h.new_empty(h.shape), c.new_empty(c.shape),
            w_ih.new_empty(w_ih.shape if weight_grad else (0,)), w_hh.new_empty(w_hh.shape if weight_grad else (0,)),
            w_hh.new_empty((w_hh.shape[0],)))


# ---------------------------------------------------------------- autograd
#
# The forward ops' autograd is registered in C++ (csrc/autograd.cpp), for every
# backend: it saves what the backward ops need and calls them. Calls that need no
# gradient go straight to the backend kernel.


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _returns_activations() -> bool:
    """The forward ops' `training` flag as the modules and the wrappers below pass it:
    whether the op returns the activations backward needs. Where a gradient will be
    asked, the op's autograd saves them whatever the flag says (csrc/autograd.cpp), and
    the callers have no use for them: False, a constant, which also keeps the graph of
    torch.jit.trace the same in both grad modes. True under torch.export: AOTInductor
    (torch 2.14) cannot compile an op output declared Tensor that comes back absent, and
    declaring them Tensor? would break the TorchScript tracer and vmap; so an exported
    graph computes them, unused (the demo's classifier, batch 100, CPU inference, three
    runs: 13.8-14.6 ms with them, 12.3-13.7 without)."""
    return torch.compiler.is_exporting()


def lstm_layer(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    w_ih: Sequence[Tensor],
    w_hh: Sequence[Tensor],
    b_ih: Sequence[Tensor] = (),
    b_hh: Sequence[Tensor] = (),
    lengths: Tensor | None = None,
    w_hr: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over all steps, D = len(w_hh) directions in one sweep.

    x [T,B,I]; h0 [D,B,P] and c0 [D,B,H], each None for zeros; one tensor per direction
    of each of nn.LSTM's weights: w_ih [4H,I], w_hh [4H,P], b_ih and b_hh [4H] (both
    empty: no bias), w_hr [P,H] (empty: no projection, P = H); lengths [B] int64 or None.
    Returns y [T,B,D*P], h_n [D,B,P], c_n [D,B,H]. The op's autograd saves the
    activations backward needs where a gradient will be asked.
    """
    D = len(w_hh)
    if D not in (1, 2):
        raise ValueError(f"lstm_layer: w_hh must hold one tensor per direction, 1 or 2, got {D}")
    kinds = (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr))
    for name, seq in kinds:
        if len(seq) not in ((D,) if name in ("w_ih", "w_hh") else (0, D)):
            raise ValueError(f"lstm_layer: {name} must hold one tensor per direction ({D}), got {len(seq)}")
    forward = [seq[0] if len(seq) else None for _, seq in kinds]
    reverse = [seq[1] if len(seq) > 1 else None for _, seq in kinds]
    y, h_n, c_n, *_ = _ops.lstm_layer_forward(x, lengths, h0, c0, *forward, *reverse, _returns_activations())
    return y, h_n, c_n


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One LSTM step: x [B,I], h, c [B,H], w_ih [4H,I], w_hh [4H,H], bias [4H]
    (b_ih + b_hh) or None. Returns h', c' [B,H]; the op's autograd saves the gates where
    a gradient will be asked."""
    h_new, c_new, _ = _ops.lstm_cell_forward(x, h, c, w_ih, w_hh, bias, _returns_activations())
    return h_new, c_new


def cpu_cache_stats() -> dict[str, int]:
    """The pool that the CPU kernels take their large buffers from (activations saved
    for backward, outputs, gate gradients): bytes kept free for reuse, the limit
    (BIRNN_EXT_CPU_CACHE_MB, default 1024 MB; 0 turns the pool off), and how many requests
    were served from kept blocks (hits) or went to the system (misses)."""
    cached, limit, hits, misses = _ops.cpu_cache_stats()
    return {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses}


def cpu_kernel_builds() -> dict[str, str]:
    """Which builds of the CPU kernels the processor got: the float32 step products
    ("avx512", "avx2" or "baseline"), the bfloat16 ones ("avx512bf16": vdpbf16ps, where
    the processor runs it at least at its float32 rate; "widen": bfloat16 widened for the
    float32 kernel; "widen+avx512bf16", where vdpbf16ps runs at half the float32 rate:
    vdpbf16ps at batch 1 and 2, widened above, and without AMX the large bfloat16
    products widened for float32 GEMMs too), and the forward cell row ("avx512" or
    "generic"). BIRNN_EXT_SMALL_GEMM=avx2|baseline, BIRNN_EXT_BF16=widen|avx512bf16 and
    BIRNN_EXT_CELL=generic, read at load time, pick others."""
    float32, bfloat16, cell = _ops.cpu_kernel_builds()
    return {"float32": float32, "bfloat16": bfloat16, "cell": cell}


def empty_cpu_cache() -> int:
    """Returns every block the CPU pool keeps to the system; returns the bytes freed.
    Tensors in use are not affected."""
    return _ops.empty_cpu_cache()


# ---------------------------------------------------------------- vmap
#
# A sequence's batch rows never meet another's, so torch.vmap over the forward ops folds
# the vmapped dimension into the batch rows: one fused call for the whole vmapped batch.
# Without these rules functorch would call the op once per sample (and warn that it
# does). Per-sample weights (an ensemble's stacked parameters) take one call per sample.
# A gradient through a vmapped call runs the ATen-op layer (csrc/reference.h).


def _fold(t: Tensor | None, dim: int | None, n: int, batch_dim: int) -> Tensor | None:
    """t's vmapped dimension `dim` (None: not vmapped, repeated n times) merged into its
    batch dimension `batch_dim`, sample by sample: [.., n * B, ..]."""
    if t is None:
        return None
    if dim is None:
        t = t.unsqueeze(batch_dim).expand(*t.shape[:batch_dim], n, *t.shape[batch_dim:])
    else:
        t = t.movedim(dim, batch_dim)
    return t.flatten(batch_dim, batch_dim + 1)


def _unfold(t: Tensor | None, n: int, rows: int, batch_dim: int) -> Tensor | None:
    """_fold's inverse: [.., n * rows, ..] to [.., n, rows, ..]."""
    return None if t is None else t.unflatten(batch_dim, (n, rows))


def _per_sample(op, n: int, in_dims, args):
    """op once per sample, for vmapped weights; the outputs stacked along dimension 0."""
    runs = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]) for i in range(n)]
    outs = tuple(None if r[0] is None else torch.stack(r) for r in zip(*runs))
    return outs, tuple(None if o is None else 0 for o in outs)


@torch.library.register_vmap("birnn_ext::lstm_layer_forward")
def _(info, in_dims, x, lengths, h0, c0, *weights_and_training):
    n, args = info.batch_size, (x, lengths, h0, c0, *weights_and_training)
    if any(d is not None for d in in_dims[_LAYER_WEIGHTS]):
        return _per_sample(_ops.lstm_layer_forward, n, in_dims, args)
    x_d, len_d, h0_d, c0_d = in_dims[:4]
    if lengths is not None:  # [B] per sample: [n * B]
        lengths = lengths.movedim(len_d, 0).flatten() if len_d is not None else lengths.repeat(n)
    # x and y [T,B,..] and the activations [T,B,..] fold at dimension 1; the states
    # [D,B,..] at 1; h_prev and h_raw [D,T,B,..] at 2.
    x = _fold(x, x_d, n, 1)
    outs = _ops.lstm_layer_forward(x, lengths, _fold(h0, h0_d, n, 1), _fold(c0, c0_d, n, 1), *weights_and_training)
    batch_dims, rows = (1, 1, 1, 1, 1, 2, 2), x.size(1) // n
    return (tuple(_unfold(o, n, rows, b) for o, b in zip(outs, batch_dims)),
            tuple(None if o is None else b for o, b in zip(outs, batch_dims)))


@torch.library.register_vmap("birnn_ext::lstm_cell_forward")
def _(info, in_dims, x, h, c, w_ih, w_hh, bias, training):
    n, args = info.batch_size, (x, h, c, w_ih, w_hh, bias, training)
    if any(d is not None for d in in_dims[3:6]):
        return _per_sample(_ops.lstm_cell_forward, n, in_dims, args)
    x = _fold(x, in_dims[0], n, 0)
    outs = _ops.lstm_cell_forward(x, _fold(h, in_dims[1], n, 0), _fold(c, in_dims[2], n, 0), w_ih, w_hh, bias, training)
    return tuple(_unfold(o, n, x.size(0) // n, 0) for o in outs), tuple(None if o is None else 0 for o in outs)


# ---------------------------------------------------------------- autocast
#
# The forward ops' autocast rule is C++ (csrc/autocast.cpp), which says what it does and
# why; at batch 1 the same rule in Python cost about 50 us a call. The Python dispatcher,
# which torch.compile traces with, takes the Python kernels registered here instead: the
# same rule, kept in step with the C++ one.

# The layer op's weight arguments (w_ih .. w_hr_reverse) and its `training` flag.
_LAYER_WEIGHTS = slice(4, 14)
_LAYER_TRAINING = 14


def _keeps_float32_weights(opname: str, device_type: str, dtype: torch.dtype, args) -> bool:
    """Whether autocast passes the layer op its float32 weights as they are: on the CPU,
    in a bfloat16 region, in inference (csrc/autocast.cpp)."""
    if opname != "lstm_layer_forward" or device_type != "cpu" or dtype != torch.bfloat16 or args[_LAYER_TRAINING]:
        return False
    weights = [w for w in args[_LAYER_WEIGHTS] if w is not None]
    return all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights) and \
        not _needs_grad(args[0], args[2], args[3], *weights)


def _register_autocast(opname: str, device_type: str, dtype_of_region) -> None:
    """For the Python dispatcher: under autocast, cast the op's floating-point tensors on
    `device_type` to the dtype dtype_of_region() returns, then run the op with autocast off."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    op = getattr(_ops, opname).default

    @op.py_impl(key)
    def autocast_kernel(*args):
        dtype = dtype_of_region()
        keep = range(_LAYER_WEIGHTS.start, _LAYER_WEIGHTS.stop) \
            if _keeps_float32_weights(opname, device_type, dtype, args) else ()
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.device.type == device_type
                and i not in keep else a for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast)


for _name in ("lstm_layer_forward", "lstm_cell_forward"):
    _register_autocast(_name, "cuda", lambda: torch.get_autocast_dtype("cuda"))
    _register_autocast(_name, "cpu", lambda: torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16
                       else torch.float32)


# torch.onnx.export(..., dynamo=False) translates the forward ops into ONNX LSTM nodes.
_onnx.register_torchscript_symbolics()
