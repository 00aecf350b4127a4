"""The float32 step products on small_gemm (csrc/cpu/small_gemm.cpp). A sweep packs a
weight it reads transposed (h W_hh^T, x W_ih^T) from 16 rows (steps x batch), one it
reads by rows (dg W_hh) from 256; shorter ones multiply the weights where they lie
(small_gemm_in_place: B's rows contiguous, or dot products against W's rows), and so
does a weight gradient over 64 rows or fewer with 64 columns or more (dW_hh, dW_hr).
Parity with nn.LSTM at sizes that reach every part of both: row blocks of 1-4, a last
panel or column block narrower than the kernel's width, packing transposed blocks with
ragged edges, dot products with a tail past the vector width (over many rows, and short
ones over up to 3 rows) and ones the dot kernel does not take (those go to BLAS), projections, inference input chunks, lengths; for each
of the three builds (AVX-512, AVX2, baseline x86-64) that this CPU can run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from birnn_ext import FusedLSTM
from helpers import assert_close, run_python, run_with_lengths

# (T, B, I, H, proj_size). Packed: B % 4 = 1, 2, 3, 0; 4H and P not multiples of 64 or 24.
PACKED = [(40, 9, 5, 37, 0), (30, 10, 33, 20, 0), (64, 7, 16, 50, 11), (32, 8, 24, 64, 0), (260, 1, 3, 17, 5)]
# Mixed (16 <= T*B < 256): the transposed products packed (K = 71, 67, 33, 80 past the
# transpose blocks of 16, 8 and 4), the backward's dg W_hh in place; batch 1, 3 (under
# a row block), 6 (a block and two single rows), and a projection.
MIXED = [(20, 1, 5, 71, 0), (12, 3, 8, 67, 0), (10, 6, 8, 33, 0), (15, 2, 10, 80, 70)]
# In place (T*B < 16): H = 71 and 67: dot products of 71 and 67 (a tail past 16, 8 and
# 4 lanes) into 4H columns that leave a partial column block; H = 33 over 6 rows: dot
# products too short, BLAS; a projection (h_raw W_hr^T with K = 80, dh W_hr with 70
# columns).
IN_PLACE = [(12, 1, 5, 71, 0), (5, 3, 8, 67, 0), (2, 6, 8, 33, 0), (7, 2, 10, 80, 70)]
# Short dot products (K 16 to 63 over at most 3 rows): x W_ih^T of 3 rows with K = 37
# and h W_hh^T with K = 29 (tails past 16, 8 and 4 lanes), K = 20 and 16 (a whole
# vector, no tail), two rows of K = 45; I = 5 beside them goes to BLAS.
SHORT_DOT = [(3, 1, 37, 29, 0), (2, 1, 20, 16, 0), (1, 2, 45, 19, 0), (3, 1, 5, 17, 0)]
CASES = PACKED + MIXED + IN_PLACE + SHORT_DOT


def compare(T, B, I, H, proj_size, with_lengths):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=proj_size)
    fused = FusedLSTM.from_lstm(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if with_lengths else None
    results = []
    for m in (fused, ref):
        xi = x.clone().requires_grad_()
        out, (h, c) = run_with_lengths(m, xi, lengths)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        with torch.no_grad():  # inference: the input chunks' products too
            inf = m(x)[0] if lengths is None else (m(x, lengths=lengths)[0] if m is fused else None)
        results.append([out, h, c, *grads] + ([inf] if inf is not None else []))
    for k, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float32, f"item {k}")


def compare_non_finite(T, B, I, H, proj_size):
    """An Inf in W_hh, inside a transpose block and at its ragged edges: the sweep, which
    leaves out the first step's product from zeros only where packing found W_hh finite,
    has NaN where nn.LSTM has it (0 * inf at the first step)."""
    P = proj_size or H
    for row, col in ((0, 0), (4 * H - 1, P - 1), (2 * H + 1, P // 2)):
        torch.manual_seed(0)
        ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=proj_size)
        with torch.no_grad():
            ref.weight_hh_l0[row, col] = float("inf")
        fused = FusedLSTM.from_lstm(ref)
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = ref(x), fused(x)
        assert want[0].isnan().any()
        for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
            assert torch.equal(a.isnan(), b.isnan()), f"NaN pattern differs with W_hh[{row}, {col}] = inf"


def compare_inf_in_a_ragged_tail(T, B, I, H, proj_size):
    """An Inf in W_ih where the last vector of a ragged dot product overlaps lanes
    already summed (columns 25, 30, 34 of K = 37: inside that overlap for 16, 8 and 4
    lanes). nn.LSTM's pre-activation is +-inf there and its outputs finite; a tail
    that masked the operand, not the product, would add 0 * inf = NaN."""
    for col in (25, 30, 34):
        torch.manual_seed(0)
        ref = nn.LSTM(I, H, bidirectional=True, proj_size=proj_size)
        with torch.no_grad():
            ref.weight_ih_l0[H + 3, col] = float("inf")
            ref.weight_ih_l0_reverse[2, col] = float("-inf")
        fused = FusedLSTM.from_lstm(ref)
        x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = ref(x), fused(x)
        for train in (False, True):
            with torch.set_grad_enabled(train):
                got = fused(x)
            for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
                assert a.isfinite().all(), f"non-finite output with W_ih[:, {col}] = inf (training={train})"
                assert_close(a, b, torch.float32, f"W_ih[:, {col}] = inf, training={train}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-B{}-I{}-H{}-P{}".format(*c))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_float32_step_products_match_nn_lstm(case, with_lengths):
    compare(*case, with_lengths)


@pytest.mark.parametrize("case", PACKED + MIXED, ids=lambda c: "T{}-B{}-I{}-H{}-P{}".format(*c))
def test_packing_sees_non_finite_recurrent_weights(case):
    compare_non_finite(*case)


def test_an_inf_in_a_ragged_dot_tail_counts_once():
    compare_inf_in_a_ragged_tail(*SHORT_DOT[0])


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_the_narrower_builds_match_too(isa):
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_step_gemm import CASES, MIXED, PACKED, SHORT_DOT, compare, compare_non_finite, "
        "compare_inf_in_a_ragged_tail\n"
        "for case in CASES: compare(*case, False); compare(*case, True)\n"
        "for case in PACKED + MIXED: compare_non_finite(*case)\n"
        "compare_inf_in_a_ragged_tail(*SHORT_DOT[0])\n"
        "print('ok')\n"
    )
    run = run_python(code, BIRNN_EXT_SMALL_GEMM=isa)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
