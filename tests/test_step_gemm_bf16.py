"""The bfloat16 step products (csrc/cpu/small_gemm_bf16.cpp) against nn.LSTM in float32
on the same bfloat16-rounded weights and inputs, at sizes that reach every part of both
builds: K odd (a last pair half zero), column panels of 64 with a partial one, row
blocks of 4 with 1, 2 and 3 left over, products that add to their output (dh += dg
W_hh), projections, lengths, inference input chunks; under autocast as users run it.
Each build is forced by BIRNN_EXT_BF16 (and the widened one's float32 kernel by
BIRNN_EXT_SMALL_GEMM), in a fresh process, since the build is picked at load time; the
large products (projections, gradients) follow the widened build into float32 GEMMs
where the processor's bfloat16 dot products are slow, so each run covers one of their
two engines too."""

from __future__ import annotations

import ast

import pytest
import torch
from torch import nn

from birnn_ext import FusedLSTM
from helpers import TOL, run_python, run_with_lengths

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
            out, (h, c) = run_with_lengths(m, xi, lengths)
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


def compare_float32_weights(T, B, I, H, proj_size, with_lengths):
    """Inference under autocast passes the layer op its float32 weights, which the CPU
    kernel rounds to bfloat16 as it packs them: bit for bit what the same model gives with
    its weights cast to bfloat16 first. The weights are not bfloat16-exact here, so the
    rounding itself is under test (and b_ih + b_hh, each rounded before the sum)."""
    torch.manual_seed(0)
    fused = FusedLSTM(I, H, 2, bidirectional=True, proj_size=proj_size).eval()
    cast = FusedLSTM(I, H, 2, bidirectional=True, proj_size=proj_size).eval()
    cast.load_state_dict(fused.state_dict())
    cast.bfloat16()
    assert all(p.dtype == torch.float32 for p in fused.parameters())
    assert any((p != p.to(BF16).float()).any() for p in fused.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if with_lengths else None
    with torch.no_grad():
        with torch.autocast("cpu", dtype=BF16):
            got = run_with_lengths(fused, x, lengths)
        want = run_with_lengths(cast, x.to(BF16), lengths)
    for name, a, b in zip(["output", "h_n", "c_n"], [got[0], *got[1]], [want[0], *want[1]]):
        assert a.dtype == BF16 and torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-B{}-I{}-H{}-P{}".format(*c))
def test_autocast_inference_rounds_float32_weights_as_a_cast_would(case):
    compare_float32_weights(*case, with_lengths=True)


def test_float32_weights_with_a_bfloat16_x_only_in_inference():
    """The op takes float32 weights with a bfloat16 x in inference only, every weight of
    the layer float32; anything else names the weight, what it must be and what came."""
    from test_bad_calls import layer_args

    ops = torch.ops.birnn_ext
    args = layer_args(x=torch.randn(4, 3, 5, dtype=BF16), h0=torch.zeros(2, 3, 6, dtype=BF16),
                      c0=torch.zeros(2, 3, 6, dtype=BF16))
    y = ops.lstm_layer_forward(*args.values(), False)[0]
    assert y.dtype == BF16
    with pytest.raises(RuntimeError, match=r"w_ih must have the dtype of x \(BFloat16\), got Float"):
        ops.lstm_layer_forward(*args.values(), True)
    mixed = dict(args, b_hh_reverse=args["b_hh_reverse"].to(BF16))
    with pytest.raises(RuntimeError, match=r"b_hh_reverse must have the dtype of x \(BFloat16\) or, in inference, "
                                           r"be float32 like every other weight of the layer, got BFloat16"):
        ops.lstm_layer_forward(*mixed.values(), False)


CPU_FLAGS = set(open("/proc/cpuinfo").read().split())
AVX512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= CPU_FLAGS
HAS_DOT_PRODUCTS = AVX512 and "avx512_bf16" in CPU_FLAGS
INTEL = "GenuineIntel" in CPU_FLAGS  # vendor_id

FORCED = {
    "dot-products": {"BIRNN_EXT_BF16": "avx512bf16"},
    "widened-avx512": {"BIRNN_EXT_BF16": "widen"},
    "widened-avx2-generic-cell": {"BIRNN_EXT_BF16": "widen", "BIRNN_EXT_SMALL_GEMM": "avx2", "BIRNN_EXT_CELL": "generic"},
    "widened-baseline-generic-cell": {"BIRNN_EXT_BF16": "widen", "BIRNN_EXT_SMALL_GEMM": "baseline",
                                      "BIRNN_EXT_CELL": "generic"},
    "default-products-generic-cell": {"BIRNN_EXT_CELL": "generic"},
}


@pytest.mark.parametrize("name", list(FORCED))
def test_the_forced_builds_match_too(name):
    env = FORCED[name]
    if env.get("BIRNN_EXT_BF16") == "avx512bf16" and not HAS_DOT_PRODUCTS:
        pytest.skip("the processor has no AVX512_BF16: the dot-product build cannot run here")
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from birnn_ext import ops\n"
        "print(ops.cpu_kernel_builds())\n"
        "from test_step_gemm_bf16 import CASES, compare\n"
        "from test_step_gemm_bf16 import compare_float32_weights\n"
        "for case in CASES: compare(*case, False); compare(*case, True); compare_float32_weights(*case, True)\n"
        "print('ok')\n"
    )
    run = run_python(code, **env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    builds = ast.literal_eval(run.stdout.splitlines()[0])  # the dict the child printed: the switches took
    if "BIRNN_EXT_BF16" in env:
        assert builds["bfloat16"] == env["BIRNN_EXT_BF16"], builds
    if "BIRNN_EXT_SMALL_GEMM" in env:
        assert builds["float32"] == env["BIRNN_EXT_SMALL_GEMM"], builds
    if "BIRNN_EXT_CELL" in env:
        assert builds["cell"] == "generic", builds


def test_the_default_builds_are_the_processors_best():
    """The bfloat16 dot products where the processor has them and they run at its float32
    rate; on Intel's (half that rate, csrc/cpu/dispatch_rules.h) at batch 1 and 2 only;
    widened otherwise."""
    from birnn_ext import ops

    builds = ops.cpu_kernel_builds()
    bf16 = ("widen+avx512bf16" if INTEL else "avx512bf16") if HAS_DOT_PRODUCTS else "widen"
    assert builds["bfloat16"] == bf16, builds
    assert builds["cell"] == ("avx512" if AVX512 else "generic"), builds


# ---------------------------------------------------------------- a broken kernel is caught

HARNESS = r"""
#include <torch/extension.h>
#include "small_gemm.h"

// c = a b + beta c through small_gemm_bf16, b packed first into dot-product or widened
// panels: a [M,K], b [K,N] (any strides), c [M,N] contiguous, all bfloat16.
void product(at::Tensor a, at::Tensor b, double beta, at::Tensor c, bool dot) {
  auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const auto panels = dot ? birnn::Bf16Panels::dot : birnn::Bf16Panels::widened;
  at::Tensor packed = at::empty({birnn::small_gemm_bf16_packed_bytes(panels, K, N)}, b.options().dtype(at::kByte));
  birnn::small_gemm_bf16_pack(panels, K, N, bits(b), b.stride(0), b.stride(1), packed.data_ptr());
  birnn::small_gemm_bf16(panels, M, N, K, bits(a), a.stride(0), a.stride(1), packed.data_ptr(), float(beta), bits(c),
                         N);
}
"""


def _harness(defines: tuple[str, ...]):
    """small_gemm_bf16.cpp (with small_gemm.cpp for its widened build) and a driver, built
    on their own: with BIRNN_BREAK_* defined, a deliberately broken kernel."""
    from torch.utils.cpp_extension import load_inline

    from birnn_ext._build import CSRC, build_dir

    name = "bf16_harness" + "".join(f"_{d.lower()}" for d in defines)
    # Beside the library's own build, one folder per torch version: load_inline reuses what
    # it finds for the same sources, and a library built against another torch crashes.
    out = build_dir(False).parent / f"{name}-{build_dir(False).name}"
    out.mkdir(parents=True, exist_ok=True)
    sources = [HARNESS] + [(CSRC / "cpu" / f).read_text() for f in ("small_gemm.cpp", "small_gemm_bf16.cpp")]
    return load_inline(name, cpp_sources=sources, functions=["product"], extra_include_paths=[str(CSRC / "cpu")],
                       extra_cflags=["-O1", *[f"-D{d}" for d in defines]], build_directory=str(out))


def _products_agree(ext, dot: bool) -> bool:
    """The harness's products against float32 ones over the bfloat16 inputs, at shapes
    with odd K, a partial panel, every row remainder, a strided A, and beta 0 and 1. One
    rounding of each output to bfloat16 (2^-8 relative) plus float32 sums: 1e-2."""
    g = torch.Generator().manual_seed(0)
    for M, K, N, beta in ((1, 17, 68, 0.0), (6, 40, 160, 1.0), (7, 11, 256, 0.0), (4, 128, 512, 1.0), (3, 3, 5, 1.0)):
        a = torch.randn(M, K, generator=g).to(BF16)
        b = torch.randn(N, K, generator=g).to(BF16).t()  # a weight's transpose, as h W_hh^T reads it
        c = torch.randn(M, N, generator=g).to(BF16)
        want = a.float() @ b.float() + beta * c.float()
        for a_in in (a, a.t().contiguous().t()):  # rows contiguous, and columns contiguous
            got = c.clone()
            ext.product(a_in, b, beta, got, dot)
            if not torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2):
                return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DOT_PRODUCTS, reason="the processor has no AVX512_BF16: the broken kernel cannot run")
def test_the_product_check_catches_a_broken_kernel():
    sound = _harness(())
    assert _products_agree(sound, dot=True) and _products_agree(sound, dot=False)
    # The two k values of each packed pair swapped: every product of K >= 2 goes wrong.
    assert not _products_agree(_harness(("BIRNN_BREAK_BF16_PAIR_ORDER",)), dot=True)
