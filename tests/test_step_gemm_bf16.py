"""The bfloat16 step products (csrc/cpu/small_gemm_bf16.cpp) against nn.LSTM in float32
on the same bfloat16-rounded weights and inputs, at sizes that reach every part of both
builds: K odd (a last pair half zero), column panels of 64 with a partial one, row
blocks of 4 with 1, 2 and 3 left over, products that add to their output (dh += dg
W_hh), projections, lengths, inference input chunks; under autocast as users run it.
Each build is forced by BIRNN_EXT_BF16 (and the widened one's float32 kernel by
BIRNN_EXT_SMALL_GEMM), in a fresh process, since the build is picked at load time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_ext import FusedLSTM
from helpers import TOL, run_python

BF16 = torch.bfloat16
# (T, B, I, H, proj_size): K = P, 4H, I, H in the products; M = B (steps) or chunk * B.
CASES = [
    (9, 5, 7, 17, 0),    # K 17 odd, N 68 = a panel + 4 columns, M 5 = 4 + 1
    (8, 6, 33, 40, 0),   # N 160 = 2 panels + 32, M 6 = 4 + 2, I 33 odd
    (6, 7, 8, 64, 11),   # projection: h W_hh^T with K 11, h_raw W_hr^T with N 11; M 7 = 4 + 3
    (30, 1, 3, 16, 5),   # batch 1 over a longer sweep, projection
    (5, 4, 9, 3, 0),     # H 3: one partial panel of 12 columns
]


def compare(T, B, I, H, proj_size, with_lengths):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=proj_size)
    ref.load_state_dict({k: v.to(BF16).float() for k, v in ref.state_dict().items()})
    fused = FusedLSTM.from_lstm(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g).to(BF16).float()
    lengths = torch.randint(1, T + 1, (B,), generator=g) if with_lengths else None
    weights = torch.randn(T, B, 2 * (proj_size or H), generator=torch.Generator().manual_seed(2))

    def run(m, autocast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            if lengths is None:
                out, (h, c) = m(xi)
            elif m is fused:
                out, (h, c) = m(xi, lengths=lengths)
            else:
                packed, (h, c) = m(pack_padded_sequence(xi, lengths, enforce_sorted=False))
                out, _ = pad_packed_sequence(packed, total_length=T)
            if autocast:
                assert out.dtype == BF16
        loss = (out.float() * weights).sum() + h.float().sum() + c.float().sum()
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):  # the inference chunks
            inf = m(x, lengths=lengths)[0] if m is fused else None
        return [out, h, c, *grads] + ([inf] if inf is not None else [])

    want, got = run(ref, False), run(fused, True)
    want.append(want[0])  # inference against the training forward's output
    names = ["output", "h_n", "c_n", "grad_x"] + [n for n, _ in fused.named_parameters()] + ["inference output"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.float(), b, **TOL[BF16], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-B{}-I{}-H{}-P{}".format(*c))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_bfloat16_step_products_match_nn_lstm(case, with_lengths):
    compare(*case, with_lengths)


@pytest.mark.parametrize("env", [{"BIRNN_EXT_BF16": "widen"},
                                 {"BIRNN_EXT_BF16": "widen", "BIRNN_EXT_SMALL_GEMM": "avx2"},
                                 {"BIRNN_EXT_BF16": "widen", "BIRNN_EXT_SMALL_GEMM": "baseline"}],
                         ids=["widened-avx512", "widened-avx2", "widened-baseline"])
def test_the_widened_builds_match_too(env):
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from birnn_ext import ops\n"
        "print(ops.cpu_step_product_builds())\n"
        "from test_step_gemm_bf16 import CASES, compare\n"
        "for case in CASES: compare(*case, False); compare(*case, True)\n"
        "print('ok')\n"
    )
    run = run_python(code, **env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    assert "'bfloat16': 'widen'" in run.stdout, run.stdout  # the switch took


def test_the_default_build_is_the_processors_best():
    from birnn_ext import ops

    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    expected = "avx512bf16" if " avx512_bf16" in flags and " avx512bw" in flags and " avx512vl" in flags else "widen"
    assert ops.cpu_step_product_builds()["bfloat16"] == expected
