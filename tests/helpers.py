"""Shared by the tests: the per-dtype tolerances and the nn.LSTM comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Tolerances against nn.LSTM with the very same weights. Both sides compute the same
# sums in a different order (BLAS blocking, bias folded in before or after), so they
# differ by rounding: a few ulps per step, compounded over T steps and accumulated
# over T*B rows in the weight gradients. float64 (eps 2.2e-16) lands near 1e-14 on
# the shapes tested; 1e-10 leaves room for larger sums and still catches any real
# error. float32 (eps 1.2e-7) lands at 1e-6; 1e-5 is a tenfold margin. bfloat16 and
# float16 keep 8 and 11 bits of mantissa in storage: one rounding of a value of size
# 1 is 4e-3 and 5e-4, so 2e-2 and 1e-2.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU")])]


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def outputs_and_grads(module: nn.Module, x, hx=None, seed=1, **kw):
    """Runs module on x, then backprops a fixed random weighting of output, h_n and
    c_n. Returns the outputs and the gradients of x, of hx and of every parameter,
    by name, so two modules with the same weights can be compared entry by entry."""
    packed = isinstance(x, nn.utils.rnn.PackedSequence)
    if packed:
        x = x._replace(data=x.data.detach().requires_grad_())
    else:
        x = x.detach().requires_grad_()
    if hx is not None:
        hx = tuple(t.detach().requires_grad_() for t in hx)
    y, (h, c) = module(x, hx, **kw) if kw else module(x, hx)
    if packed:
        y, x = y.data, x.data
    # The weights are drawn in float64 and rounded to each output's dtype: drawn in that
    # dtype, they would not be the same numbers (randn takes another path per dtype).
    g = torch.Generator(device="cpu").manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)).sum() for t in (y, h, c))
    inputs = [x, *(hx or ())]
    names = [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, inputs + [p for _, p in module.named_parameters()])
    out = {"output": y, "h_n": h, "c_n": c, "grad_input": grads[0]}
    if hx is not None:
        out["grad_h0"], out["grad_c0"] = grads[1], grads[2]
    out.update({f"grad_{n}": gr for n, gr in zip(names, grads[len(inputs):])})
    return out


def assert_same_results(fused, ref, dtype):
    assert fused.keys() == ref.keys()
    for k in ref:
        assert_close(fused[k], ref[k], dtype, k)


ROOT = Path(__file__).resolve().parents[1]


def run_with_lengths(module: nn.Module, x, lengths):
    """module(x) for [T,B,I] x with per-sequence lengths (or None): a fused module takes
    them as lengths=, nn.LSTM as a PackedSequence, padded back to T steps."""
    if lengths is None:
        return module(x)
    if not isinstance(module, nn.LSTM):
        return module(x, lengths=lengths)
    packed, hc = module(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
    return nn.utils.rnn.pad_packed_sequence(packed, total_length=x.size(0))[0], hc


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter from the repository root, with env added to the
    environment: settings the library reads once, at load time."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def layer_weight_args(w_ih, w_hh, bias=None, w_hr=None, backward=False):
    """The layer ops' weight arguments from weights stacked over directions (w_ih
    [D,4H,I], w_hh [D,4H,P], bias [D,4H] = b_ih + b_hh or None, w_hr [D,P,H] or None):
    per direction w_ih, w_hh, b_ih, b_hh, w_hr for the forward op (bias as b_ih, zeros as
    b_hh: the sum is bias exactly), w_ih, w_hh, w_hr for the backward op; None for the
    reverse direction of a one-direction layer."""
    args = []
    for d in range(2):
        if d >= w_hh.size(0):
            args += [None] * (3 if backward else 5)
            continue
        hr = w_hr[d] if w_hr is not None else None
        if backward:
            args += [w_ih[d], w_hh[d], hr]
        else:
            b_ih, b_hh = (bias[d], torch.zeros_like(bias[d])) if bias is not None else (None, None)
            args += [w_ih[d], w_hh[d], b_ih, b_hh, hr]
    return args


class WeightGradFlags(TorchDispatchMode):
    """The weight_grad argument of every call of the backward op `name`
    (lstm_layer_backward or lstm_cell_backward) made under it, in order."""

    def __init__(self, name: str):
        super().__init__()
        self.op = getattr(torch.ops.birnn_ext, name).default
        self.index = [a.name for a in self.op._schema.arguments].index("weight_grad")
        self.flags: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.op:
            self.flags.append(kwargs.get("weight_grad", args[self.index] if len(args) > self.index else True))
        return func(*args, **kwargs)
