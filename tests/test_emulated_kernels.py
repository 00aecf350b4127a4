"""The CUDA kernels' device code, run on the host through csrc/emu/ under
AddressSanitizer and UndefinedBehaviorSanitizer, against the CPU path.

csrc/emu/run_kernels.cpp drives csrc/cuda/lstm_kernels.cu the way the CUDA glue does
(host GEMMs in place of cuBLAS): every kernel, forward and backward, both directions,
with lengths, with and without bias and projection, in every storage dtype. The
results are compared with the CPU ops on the same inputs (rounded to the dtype first),
within the dtype's tolerance.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from birnn_ext import _build
from helpers import TOL, layer_weight_args

pytestmark = pytest.mark.skipif(_build.find_cuda_home() is None, reason="no CUDA toolkit headers")

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
BUILD = _build.ROOT / "build" / "emu"


def build(name: str, defines: tuple[str, ...] = ()) -> Path:
    return _build.build_emulator(BUILD / name, defines)


@pytest.fixture(scope="module")
def emulator():
    return build("run_kernels")


def make_case(dtype, mode, T, B, I, H, P, D, lengths, bias, proj, seed=0):
    """Inputs as float64, already rounded to `dtype` so both sides see the same numbers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).double()

    G = 4 * H
    case = dict(
        x=r(T, B, I), h0=r(D, B, P), c0=r(D, B, H), w_ih=r(D, G, I, scale=0.4), w_hh=r(D, G, P, scale=0.4),
        bias=r(D, G, scale=0.4) if bias else None, w_hr=r(D, P, H, scale=0.4) if proj else None,
        grad_y=r(T, B, D * P) if mode == 0 else None, grad_h_n=r(D, B, P), grad_c_n=r(D, B, H),
        lengths=torch.tensor(lengths, dtype=torch.int64) if lengths else None,
    )
    header = [mode, DTYPES[dtype], T, B, I, H, P, D, lengths is not None, bias, proj, mode == 0, 1, 1]
    return header, case


def emulator_env(order="forward"):
    """The runs' environment: leak checks, UBSan's stacks, and the order in which the
    emulator resumes the threads of a block and the blocks that run together
    (BIRNN_EMU_ORDER; csrc/emu/cuda_emu.h)."""
    return {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1",
            "BIRNN_EMU_ORDER": order}


def run_emulated(exe, header, case, tmp_path, args=(), order="forward"):
    fields = ["x", "h0", "c0", "w_ih", "w_hh", "bias", "w_hr", "grad_y", "grad_h_n", "grad_c_n"]
    with open(tmp_path / "in.bin", "wb") as f:
        f.write(np.array(header, dtype=np.int64).tobytes())
        if case["lengths"] is not None:
            f.write(case["lengths"].numpy().tobytes())
        for k in fields:
            if case[k] is not None:
                f.write(case[k].numpy().tobytes())
    proc = subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), *map(str, args)],
                          capture_output=True, text=True, env=emulator_env(order))
    return proc, np.fromfile(tmp_path / "out.bin", dtype=np.float64) if proc.returncode == 0 else None


def reference_layer(case, dtype):
    """The CPU path, in float64 for float64 and float32 for the rest."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    c = {k: (v.to(work) if v is not None and v.is_floating_point() else v) for k, v in case.items()}
    ops = torch.ops.birnn_ext
    y, h_n, c_n, gates, cp, hp, hr = ops.lstm_layer_forward(
        c["x"], c["lengths"], c["h0"], c["c0"], *layer_weight_args(c["w_ih"], c["w_hh"], c["bias"], c["w_hr"]), True)
    dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr = ops.lstm_layer_backward(
        c["grad_y"], c["grad_h_n"], c["grad_c_n"], c["x"], c["lengths"],
        *layer_weight_args(c["w_ih"], c["w_hh"], w_hr=c["w_hr"], backward=True), gates, cp, hp, hr)
    out = dict(y=y, h_n=h_n, c_n=c_n, dx=dx, dh0=dh0, dc0=dc0, dw_ih=dw_ih, dw_hh=dw_hh, dbias=dbias)
    if case["w_hr"] is not None:
        out["dw_hr"] = dw_hr
    return out


def reference_cell(case, dtype):
    work = torch.float64 if dtype == torch.float64 else torch.float32
    x, h, c = case["x"][0].to(work), case["h0"][0].to(work), case["c0"][0].to(work)
    w_ih, w_hh = case["w_ih"][0].to(work), case["w_hh"][0].to(work)
    bias = case["bias"][0].to(work) if case["bias"] is not None else None
    ops = torch.ops.birnn_ext
    h_new, c_new, gates = ops.lstm_cell_forward(x, h, c, w_ih, w_hh, bias, True)
    grads = ops.lstm_cell_backward(case["grad_h_n"][0].to(work), case["grad_c_n"][0].to(work), x, h, c, w_ih, w_hh,
                                   gates)
    return dict(zip(["h_new", "c_new", "dx", "dh", "dc", "dw_ih", "dw_hh", "dbias"], [h_new, c_new, *grads]))


def unpack(flat, ref):
    out, at = {}, 0
    for k, v in ref.items():
        out[k] = torch.from_numpy(flat[at : at + v.numel()].copy()).reshape(v.shape)
        at += v.numel()
    assert at == flat.size, f"emulator wrote {flat.size} values, expected {at}"
    return out


def compare(got, want, dtype):
    for k, w in want.items():
        torch.testing.assert_close(got[k], w.double(), **TOL[dtype], msg=lambda m, k=k: f"{k}: {m}")


LAYER_CASES = {
    "uni": dict(D=1, lengths=None, bias=True, proj=False),
    "bi-lengths": dict(D=2, lengths=[5, 2, 1, 4], bias=True, proj=False),
    "bi-lengths-nobias": dict(D=2, lengths=[3, 5, 5, 1], bias=False, proj=False),
    "bi-lengths-proj": dict(D=2, lengths=[4, 1, 5, 2], bias=True, proj=True),
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_kernels_match_cpu(emulator, tmp_path, dtype, name):
    cfg = LAYER_CASES[name]
    H = 8
    P = 3 if cfg["proj"] else H
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=H, P=P, **cfg)
    proc, flat = run_emulated(emulator, header, case, tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


# The sweep kernel's cuts of H = 8 units and B = 4 rows: one unit per block and the whole
# batch in one tile (many lanes per dot product); 3 units per block, so that each
# direction's last block holds 2, and one-row tiles; one block per direction with a
# partial last tile of 3 rows.
SWEEP_CUTS = {"units1-tile4": (1, 4), "units3-tile1": (3, 1), "units8-tile3": (8, 3)}


# Every cut and layer case in float32, every dtype with one cut (the storage type changes
# the loads and stores, not the indexing): each run takes seconds under the sanitizers.
SWEEP_RUNS = [(torch.float32, cut, name) for cut in SWEEP_CUTS for name, c in LAYER_CASES.items() if not c["proj"]]
SWEEP_RUNS += [(dtype, "units3-tile1", "bi-lengths") for dtype in DTYPES if dtype != torch.float32]


@pytest.mark.parametrize("dtype,cut,name", SWEEP_RUNS, ids=lambda v: str(v).removeprefix("torch."))
def test_sweep_kernel_matches_cpu(emulator, tmp_path, dtype, cut, name):
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=8, P=8, **LAYER_CASES[name])
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep", *SWEEP_CUTS[cut]))
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


@pytest.mark.parametrize("dtype,H", [(torch.float32, 6), (torch.bfloat16, 5)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_sweep_stages_rows_of_odd_lengths(emulator, tmp_path, dtype, H):
    # The staging of a tile from global memory takes 16 bytes a load where the rows are
    # whole 16-byte words and the tile starts on one (H = 8 above), else an entry a load:
    # h rows of 6 float32 (24 bytes) and tiles of 3 rows starting at row 3; in bfloat16, H = 5
    # (h rows of 10 bytes, dg rows of 40) for the backward too.
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=H, P=H, **LAYER_CASES["bi-lengths"])
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep", 2, 3))
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


@pytest.mark.parametrize("dtype,name", [(torch.float32, n) for n, c in LAYER_CASES.items() if not c["proj"]]
                         + [(torch.bfloat16, "bi-lengths")], ids=lambda v: str(v).removeprefix("torch."))
def test_sweep_kernel_in_one_launch_with_a_block_per_direction(emulator, tmp_path, dtype, name):
    # Units = H: each direction is one block, whose step barrier is its own __syncthreads,
    # so every step (and every backward phase) runs in a plain launch, without the grid
    # barrier. Batch tiles of 3 rows: a tile and a partial one per step.
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=8, P=8, **LAYER_CASES[name])
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep", 8, 3))
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


# The cluster sweep (sm_90): clusters of 4 blocks of 2 units, and of 3 blocks of 3 units
# (the last holding 2); batch tiles of 3 rows, a whole one and a partial one per step.
CLUSTER_RUNS = [(torch.float32, cluster, name) for cluster in (4, 3) for name, c in LAYER_CASES.items()
                if not c["proj"]] + [(torch.bfloat16, 3, "bi-lengths"), (torch.float64, 4, "bi-lengths-nobias")]


@pytest.mark.parametrize("dtype,cluster,name", CLUSTER_RUNS, ids=lambda v: str(v).removeprefix("torch."))
def test_cluster_sweep_matches_cpu(emulator, tmp_path, dtype, cluster, name):
    """The sweeps with a thread-block cluster per direction, forward and backward, each
    whole in one launch: their blocks read each other's h (dg) from their shared memories
    and meet at the cluster barrier, which the emulator runs with the blocks of a cluster
    side by side."""
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=8, P=8, **LAYER_CASES[name])
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep-cluster", cluster, 3))
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


# H = 16 in clusters of 4 blocks of 4 units (2 of 8 in bfloat16): each block's own h and
# dg rows are whole 16-byte words, which the others read 16 bytes at a time; also with the
# SIMT weights in registers.
CLUSTER_VEC_RUNS = {"float32": (torch.float32, 4, ()), "bfloat16": (torch.bfloat16, 2, ()),
                    "float32-regs": (torch.float32, 4, ("regs",))}


@pytest.mark.parametrize("run", list(CLUSTER_VEC_RUNS))
def test_cluster_sweep_reads_16_bytes_at_a_time(emulator, tmp_path, run):
    dtype, cluster, extra = CLUSTER_VEC_RUNS[run]
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=16, P=16, **LAYER_CASES["bi-lengths"])
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep-cluster", cluster, 3, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


def test_a_wrong_rank_in_16_byte_reads_is_caught(tmp_path):
    # BIRNN_BREAK_DSMEM_RANK (test_a_broken_kernel_is_caught reads an entry at a time, H = 8
    # in blocks of 2 units) where the reads take 16 bytes.
    exe = build("run_kernels_birnn_break_dsmem_rank", ("BIRNN_BREAK_DSMEM_RANK",))
    header, case = make_case(torch.float32, 0, T=5, B=4, I=6, H=16, P=16, **LAYER_CASES["bi-lengths"])
    proc, flat = run_emulated(exe, header, case, tmp_path, ("sweep-cluster", 4, 3))
    if proc.returncode != 0:
        assert "Sanitizer" in proc.stderr or "runtime error" in proc.stderr, proc.stderr[-2000:]
        return
    want = reference_layer(case, torch.float32)
    with pytest.raises(AssertionError):
        compare(unpack(flat, want), want, torch.float32)


# Batch groups (SweepPlan::groups): B = 7 rows in groups of 3, 3 and 1, each with blocks
# (a cluster) of its own that exchange h and dg among themselves only; batch tiles of 2
# rows, so that a group of 3 has a whole tile and a partial one. The cluster sweeps, the
# one-block sweeps and the grid sweep (its blocks of every group at the grid barrier).
GROUP_RUNS = {
    "cluster3": (torch.float32, ("sweep-cluster", 3, 2), 2),
    "cluster4-uni": (torch.float32, ("sweep-cluster", 4, 2), 1),
    "cluster3-bf16-mma": (torch.bfloat16, ("sweep-cluster", 3, 2, "mma"), 2),
    "cluster3-regs": (torch.float32, ("sweep-cluster", 3, 2, "regs"), 2),
    "whole": (torch.float32, ("sweep", 8, 2), 2), "grid-units3": (torch.float64, ("sweep", 3, 2), 2),
}


@pytest.mark.parametrize("run", list(GROUP_RUNS))
def test_sweeps_in_batch_groups_match_cpu(emulator, tmp_path, run):
    dtype, args, D = GROUP_RUNS[run]
    lengths = [5, 2, 1, 4, 3, 5, 2] if D == 2 else None
    header, case = make_case(dtype, 0, T=5, B=7, I=6, H=8, P=8, D=D, lengths=lengths, bias=True, proj=False)
    proc, flat = run_emulated(emulator, header, case, tmp_path, (*args, "groups=3"))
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


def _cluster_plan(direction, H, B, cluster, groups, max_shared=227 * 1024):
    out = subprocess.run([str(build("run_kernels")), "plan-cluster", direction,
                          *map(str, (H, B, 2, 4, 4, cluster, max_shared, groups))],
                         capture_output=True, text=True, check=True).stdout.split()
    if out == ["none"]:
        return None
    units, blocks, batch_tile, groups, group_rows, own_offset, shared = map(int, out)
    return SimpleNamespace(units=units, blocks=blocks, batch_tile=batch_tile, groups=groups, group_rows=group_rows,
                           own=shared - own_offset, shared=shared)


@pytest.mark.parametrize("direction,per_unit", [("fwd", 1), ("bwd", 4)])
def test_cluster_plans_in_batch_groups(direction, per_unit):
    # The classic size in 4 groups of 25 rows: 2 directions x 4 groups x clusters of 16,
    # and each block's own rows (two steps of its 8 units' h, or their 4 gates' dg) for its
    # group's 25 rows only, in float32.
    pl = _cluster_plan(direction, H=128, B=100, cluster=16, groups=4)
    assert (pl.units, pl.blocks, pl.groups, pl.group_rows) == (8, 2 * 4 * 16, 4, 25)
    assert pl.batch_tile <= 25 and pl.own == 2 * 25 * 8 * per_unit * 4
    assert pl.shared < _cluster_plan(direction, H=128, B=100, cluster=16, groups=1).shared
    # No group is empty: 6 rows asked for in 4 groups come as 3 groups of 2; 8 rows in 3
    # groups as 3, 3 and 2; more groups than rows, a row each.
    for B, asked, want in [(6, 4, (3, 2)), (8, 3, (3, 3)), (2, 5, (2, 1))]:
        pl = _cluster_plan(direction, H=64, B=B, cluster=8, groups=asked)
        assert (pl.groups, pl.group_rows, pl.blocks) == (*want, 2 * want[0] * 8), (B, asked)


@pytest.mark.parametrize("dtype,name", [(torch.float32, "bi-lengths"), (torch.bfloat16, "uni")],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_sweep_kernel_one_step_per_launch(emulator, tmp_path, dtype, name):
    # The kernels also run a range of steps (phases) per launch, here one at a time, each
    # launch loading its weights afresh: no state may outlive a step but what lies in
    # global memory.
    header, case = make_case(dtype, 0, T=5, B=4, I=6, H=8, P=8, **LAYER_CASES[name])
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep", 3, 2, "per-step"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


@pytest.mark.parametrize("D", [1, 2])
def test_sweep_kernel_of_one_step(emulator, tmp_path, D):
    # T = 1: the forward sweep's only step reads h0 and writes h_n, with no step between;
    # the backward's phases are that step and the one that makes dh0.
    header, case = make_case(torch.float32, 0, T=1, B=3, I=6, H=8, P=8, D=D, lengths=None, bias=True, proj=False)
    proc, flat = run_emulated(emulator, header, case, tmp_path, ("sweep", 3, 2))
    assert proc.returncode == 0, proc.stderr
    want = reference_layer(case, torch.float32)
    compare(unpack(flat, want), want, torch.float32)


def _plan(H, B, D, max_blocks, max_shared, elem=4, math=4, direction="fwd", mma=False, regs=False):
    command = "plan-mma" if mma else "plan-regs" if regs else "plan"
    out = subprocess.run([str(build("run_kernels")), command, direction,
                          *map(str, (H, B, D, elem, math, max_blocks, max_shared))],
                         capture_output=True, text=True, check=True).stdout.split()
    if out == ["none"]:
        return None
    units, blocks, batch_tile, lanes, shared, rows, kdim, stride, registers, slice_, batch_lanes = map(int, out)
    # Lanes (partial sums a dot product): threads of one, slices of the row, at most 32;
    # SIMT register slices as many as the registers need (each at most 32 floats).
    assert shared <= max_shared and blocks <= max_blocks and 1 <= lanes <= (256 if slice_ else 32)
    return SimpleNamespace(units=units, blocks=blocks, batch_tile=batch_tile, lanes=lanes, rows=rows, kdim=kdim,
                           stride=stride, registers=bool(registers), slice=slice_, batch_lanes=batch_lanes)


def test_sweep_plans():
    # Fewest units per block that fit the blocks, then the largest batch tile that fits.
    pl = _plan(H=128, B=100, D=2, max_blocks=132, max_shared=227 * 1024)
    assert (pl.units, pl.blocks, pl.batch_tile) == (2, 128, 100)
    pl = _plan(H=512, B=16, D=2, max_blocks=132, max_shared=227 * 1024)
    assert (pl.units, pl.blocks, pl.batch_tile) == (8, 128, 16)
    assert _plan(H=4096, B=1, D=2, max_blocks=132, max_shared=227 * 1024) is None  # W_hh rows do not fit
    # The backward sweep cuts the units the same way. Its staged dg rows are 4H long, four
    # times h's: the batch tile shrinks where the forward's fits whole.
    for B, H in [(100, 128), (16, 512)]:
        pl = _plan(H=H, B=B, D=2, max_blocks=132, max_shared=227 * 1024, direction="bwd")
        assert (pl.units, pl.blocks, pl.batch_tile) == (H // 64, 128, B)
    assert _plan(H=256, B=64, D=2, max_blocks=132, max_shared=227 * 1024).batch_tile == 64
    pl = _plan(H=256, B=64, D=2, max_blocks=132, max_shared=227 * 1024, direction="bwd")
    assert (pl.units, pl.blocks) == (4, 128) and pl.batch_tile < 64


@pytest.mark.parametrize("elem,k", [(4, 8), (2, 16)], ids=["tf32", "16bit"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("H,B", [(128, 100), (6, 3), (200, 17), (512, 16)])
def test_tensor_core_sweep_plans(elem, k, direction, H, B):
    """The plans with tensor-core products: units in fours (16 forward weight rows, one
    mma's M), the block's rows padded to 16, the row length to whole mma steps of every
    slice, and rows 4 words past that apart (the fragment loads' 32 lanes on 32 banks)."""
    pl = _plan(H=H, B=B, D=2, max_blocks=132, max_shared=227 * 1024, elem=elem, direction=direction, mma=True)
    width = H if direction == "fwd" else 4 * H
    assert pl.units % 4 == 0 or pl.units == H
    assert pl.rows % 16 == 0 and pl.rows >= (4 * pl.units if direction == "fwd" else pl.units)
    assert pl.kdim >= width and pl.kdim % (k * pl.lanes) == 0 and pl.kdim - width < k * pl.lanes
    assert (pl.stride * elem // 4) % 8 == 4
    simt = _plan(H=H, B=B, D=2, max_blocks=132, max_shared=227 * 1024, elem=elem, direction=direction)
    assert pl.units >= simt.units
    # Weight fragments in registers: each warp's items share one (tile, slice) pair, whose
    # mma steps fit kRegSteps (16).
    assert pl.registers == (8 % (pl.rows // 16 * pl.lanes) == 0 and pl.kdim // pl.lanes // k <= 16)


def test_tensor_core_plans_keep_the_weights_in_registers_where_they_fit():
    # The classic size (B 100, H 128, both directions on 132 SMs): forward 16 rows a block,
    # 16 TF32 steps a row; backward its rows 4H = 512 long, cut into 4 slices of 16 steps.
    fwd = _plan(H=128, B=100, D=2, max_blocks=132, max_shared=227 * 1024, mma=True)
    assert (fwd.rows, fwd.lanes, fwd.registers) == (16, 1, True)
    bwd = _plan(H=128, B=100, D=2, max_blocks=132, max_shared=227 * 1024, direction="bwd", mma=True)
    assert (bwd.rows, bwd.lanes, bwd.registers) == (16, 4, True)
    # H 1024 in bfloat16: 64 forward rows a block (4 tiles) x 2 slices fill the 8 warps, and
    # each slice still has 32 steps of 16: the fragments come from shared memory.
    big = _plan(H=1024, B=4, D=2, max_blocks=132, max_shared=227 * 1024, elem=2, mma=True)
    assert (big.rows, big.lanes, big.registers) == (64, 2, False)


@pytest.mark.parametrize("elem,math", [(4, 4), (8, 8), (2, 4)], ids=["float32", "float64", "16bit"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("H,B", [(128, 100), (128, 1), (8, 4), (200, 17), (256, 64), (512, 16), (768, 4)])
def test_simt_register_plans(elem, math, direction, H, B):
    """The SIMT plans with the weights in registers, where they fit: 2 rows a thread over
    a slice of whole 16-byte loads, no more than 256 bytes of weights a thread, no more
    threads than the block's 256 (row pairs x batch lanes x slices), no more batch lanes
    than quads of rows in a tile, the row padded to whole slices, and rows an odd number
    of 16-byte words apart."""
    pl = _plan(H=H, B=B, D=2, max_blocks=132, max_shared=227 * 1024, elem=elem, math=math, direction=direction,
               regs=True)
    if pl is None or not pl.registers:  # then exactly the plan with the weights in shared memory, or none
        assert pl == _plan(H=H, B=B, D=2, max_blocks=132, max_shared=227 * 1024, elem=elem, math=math,
                           direction=direction)
        return
    width = H if direction == "fwd" else 4 * H
    vec = 16 // elem
    assert pl.slice % vec == 0 and 2 * pl.slice * math <= 256
    assert pl.kdim == pl.lanes * pl.slice and 0 <= pl.kdim - width < pl.slice
    assert pl.stride >= pl.kdim and pl.stride % vec == 0 and pl.stride // vec % 2 == 1
    assert pl.rows // 2 * pl.batch_lanes * pl.lanes <= 256 and 1 <= pl.batch_lanes <= -(-pl.batch_tile // 4)


def test_simt_plans_keep_the_weights_in_registers_where_they_fit():
    big = 227 * 1024
    # The classic size (B 100, H 128, both directions on 132 SMs): forward 8 rows a block,
    # 4 pairs, in the fewest slices of at most 32 floats (4), and 16 batch lanes (of 25
    # quads): 256 threads, 4 partial sums a dot product. Backward 2 rows (the block's 2
    # columns of W_hh) of 4H = 512 in 16 slices of 32, 16 batch lanes.
    fwd = _plan(H=128, B=100, D=2, max_blocks=132, max_shared=big, regs=True)
    assert (fwd.rows, fwd.registers, fwd.slice, fwd.lanes, fwd.batch_lanes) == (8, True, 32, 4, 16)
    assert (fwd.kdim, fwd.stride) == (128, 132)
    bwd = _plan(H=128, B=100, D=2, max_blocks=132, max_shared=big, direction="bwd", regs=True)
    assert (bwd.rows, bwd.registers, bwd.slice, bwd.lanes, bwd.batch_lanes) == (2, True, 32, 16, 16)
    # One batch row: no batch lanes to fill the threads, so more slices, up to 32 of 4.
    one = _plan(H=128, B=1, D=2, max_blocks=132, max_shared=big, regs=True)
    assert (one.slice, one.lanes, one.batch_lanes) == (4, 32, 1)
    # H 512, B 16: forward 32 rows a block, 16 pairs x 16 slices of 32 floats (64 registers
    # a thread) fill the block: one batch lane.
    h512 = _plan(H=512, B=16, D=2, max_blocks=132, max_shared=big, regs=True)
    assert (h512.rows, h512.registers, h512.slice, h512.lanes, h512.batch_lanes) == (32, True, 32, 16, 1)
    # The same 256 bytes hold half as many float64 weights: 32 slices of 16 x 16 pairs
    # outnumber the threads. H 768's 24 pairs would need 24 slices of 32 floats. Both keep
    # their weights in shared memory.
    assert not _plan(H=512, B=16, D=2, max_blocks=132, max_shared=big, elem=8, math=8, regs=True).registers
    assert not _plan(H=768, B=4, D=2, max_blocks=132, max_shared=big, regs=True).registers
    # bfloat16: a 16-byte load is 8 entries, rows 17 of them apart.
    bf = _plan(H=128, B=100, D=2, max_blocks=132, max_shared=big, elem=2, math=4, regs=True)
    assert (bf.slice, bf.lanes, bf.batch_lanes, bf.kdim, bf.stride) == (32, 4, 16, 128, 136)


# The sweeps with SIMT products and the weights in registers (register_products), against
# the CPU path: (sweep, units or cluster, batch tile, H, B, layer case). H = 8 in blocks of
# 1 unit, batch tiles of 4 rows: one batch lane, the slices of one 16-byte load, most of
# the block's threads idle; 3 units and tiles of 1 row: the staged quad's rows past the
# tile zeros; 2 units and tiles of 10 rows: 3 batch lanes, each taking rows f, f + 3, f + 6,
# f + 9 of the 12 staged; a block a direction (whole). H = 40 in clusters of 3 blocks of 14
# units (the last 12), tiles of 5 rows: 2 batch lanes, slices of 12 padded past the row's
# end; and blocks of 20 units, 40 forward pairs, more than a warp.
REG_CUTS = {
    "grid-units1-tile4": ("sweep", 1, 4, 8, 4, "bi-lengths"),
    "grid-units3-tile1": ("sweep", 3, 1, 8, 4, "bi-lengths-nobias"),
    "grid-units2-tile10": ("sweep", 2, 10, 8, 10, "bi-lengths"),
    "whole-tile3": ("sweep", 8, 3, 8, 4, "bi-lengths"),
    "cluster3-H40": ("sweep-cluster", 3, 5, 40, 6, "bi-lengths"),
    "grid-units20-H40": ("sweep", 20, 4, 40, 5, "uni"),
}
REG_RUNS = [(torch.float32, cut) for cut in REG_CUTS] + [
    (dtype, cut) for dtype in (torch.float64, torch.bfloat16, torch.float16)
    for cut in ("grid-units2-tile10", "cluster3-H40")]


def reg_case(dtype, cut):
    sweep, units, tile, H, B, name = REG_CUTS[cut]
    cfg = dict(LAYER_CASES[name])
    if cfg["lengths"]:
        cfg["lengths"] = (cfg["lengths"] * 3)[:B]
    header, case = make_case(dtype, 0, T=5, B=B, I=6, H=H, P=H, **cfg)
    return header, case, (sweep, units, tile, "regs")


@pytest.mark.parametrize("dtype,cut", REG_RUNS, ids=lambda v: str(v).removeprefix("torch."))
def test_register_sweep_matches_cpu(emulator, tmp_path, dtype, cut):
    """Both sweeps with the SIMT products' weights in registers: each thread's slice of its
    two rows loaded once, the tile read 16 bytes at a time (UBSan checks the alignment),
    the batch rows dealt to the batch lanes, the slices' partial sums added by the cell
    update. run_kernels refuses a plan that would not keep them in registers."""
    header, case, args = reg_case(dtype, cut)
    proc, flat = run_emulated(emulator, header, case, tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = reference_layer(case, dtype)
    compare(unpack(flat, want), want, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_kernels_match_cpu(emulator, tmp_path, dtype, bias):
    header, case = make_case(dtype, 1, T=1, B=5, I=6, H=9, P=9, D=1, lengths=None, bias=bias, proj=False)
    proc, flat = run_emulated(emulator, header, case, tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = reference_cell(case, dtype)
    compare(unpack(flat, want), want, dtype)


@pytest.mark.parametrize("defect", ["BIRNN_BREAK_OFF_BY_ONE", "BIRNN_BREAK_MISSING_BARRIER", "BIRNN_BREAK_LEAK",
                                    "BIRNN_BREAK_SWEEP_BARRIER", "BIRNN_BREAK_SWEEP_BWD_BARRIER",
                                    "BIRNN_BREAK_GRID_BARRIER",
                                    "BIRNN_BREAK_CLUSTER_BARRIER", "BIRNN_BREAK_CLUSTER_BWD_BARRIER",
                                    "BIRNN_BREAK_DSMEM_RANK", "BIRNN_BREAK_GROUP_ROWS", "BIRNN_BREAK_REGISTER_SLICE"])
def test_a_broken_kernel_is_caught(tmp_path, defect):
    """The harness can fail: a build with a deliberate defect (the reverse direction's
    time index off by one; the barrier before the shared-memory reduction removed; a
    leaked allocation; the forward or the backward sweep's barrier between its dot
    products and its cell update removed; the grid sweeps' barrier between their steps
    removed; the forward or the backward cluster sweep's
    barrier between steps removed; the cluster sweeps reading each entry of the row from
    the wrong block's shared memory; every group of batch rows working on the first
    group's; the SIMT products with weights in registers reading the next slice's columns
    of the tile) must be caught, by a sanitizer or by a wrong answer."""
    exe = build(f"run_kernels_{defect.lower()}", (defect,))
    # The shared-memory reduction (column_sums_kernel) sums the cell's bias gradient; a
    # layer's goes to an ATen reduction on the GPU, a host sum in the emulated run.
    cell = defect == "BIRNN_BREAK_MISSING_BARRIER"
    if cell:
        header, case = make_case(torch.float32, 1, T=1, B=5, I=6, H=9, P=9, D=1, lengths=None, bias=True, proj=False)
    else:
        header, case = make_case(torch.float32, 0, T=5, B=4, I=6, H=8, P=8, D=2, lengths=[5, 2, 1, 4], bias=True,
                                 proj=False)
    args = (("sweep", 2, 4, "regs") if "REGISTER" in defect
            else ("sweep", 3, 4) if "SWEEP" in defect or "GRID" in defect
            else ("sweep-cluster", 4, 4) if "CLUSTER" in defect or "DSMEM" in defect
            else ("sweep-cluster", 4, 2, "groups=2") if "GROUP" in defect else ())
    proc, flat = run_emulated(exe, header, case, tmp_path, args)
    if proc.returncode != 0:
        assert "Sanitizer" in proc.stderr or "runtime error" in proc.stderr, proc.stderr[-2000:]
        return
    want = (reference_cell if cell else reference_layer)(case, torch.float32)
    with pytest.raises(AssertionError):
        compare(unpack(flat, want), want, torch.float32)


# ---------------------------------------------------------------- warp collectives

def run_driver(exe, *args, order="forward"):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=emulator_env(order))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_the_emulator_runs_threads_in_either_order(emulator, order):
    """Each thread writes its entry of shared memory and reads its left neighbour's with no
    barrier between: resumed from the first thread, each finds its neighbour's written;
    from the last (BIRNN_EMU_ORDER=reverse), stale. So the kernels' runs in reverse order
    (test_kernels_in_reverse_order_match_cpu) expose the reads of an earlier thread's
    (block's) writes that the default order lets pass."""
    proc = run_driver(emulator, "neighbour-read", order=order)
    assert (proc.returncode, proc.stdout.strip()) == ((0, "ok") if order == "forward" else (1, "stale")), proc.stderr


def test_an_unknown_thread_order_is_refused(emulator):
    proc = run_driver(emulator, "neighbour-read", order="backwards")
    assert proc.returncode != 0 and "BIRNN_EMU_ORDER is forward or reverse, not 'backwards'" in proc.stderr, \
        proc.stderr[-2000:]


def test_warp_shuffles(emulator):
    """__shfl_sync, __shfl_xor_sync, __shfl_down_sync (segments of 8) and __shfl_up_sync
    across three warps per block, against sums the driver makes on the host."""
    proc = run_driver(emulator, "shuffles")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("launch", ["cooperative", "plain"])
def test_grid_barrier(emulator, launch):
    """Five blocks pass values around a ring through global memory, four rounds, the grid
    barrier between the rounds (cooperative_groups' grid sync): right in a cooperative
    launch; a plain launch, whose blocks a GPU need not run at once, is reported."""
    proc = run_driver(emulator, "grid-barrier", launch)
    if launch == "cooperative":
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and "grid barrier outside a cooperative launch" in proc.stderr, proc.stderr[-2000:]


def test_pointer_tables(emulator):
    """The per-step path's operand tables (cuda::PointerTable): one launch writes every
    pointer it carries into the device table, and no more; a table past its room is refused."""
    proc = run_driver(emulator, "pointers")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]


def test_a_lane_that_skips_a_shuffle_is_caught(tmp_path):
    # One lane leaves out a step of the butterfly: its warp's lanes meet at different
    # collectives, which deadlocks or corrupts on a GPU; the emulator must say so.
    exe = build("run_kernels_break_shuffle_divergence", ("BIRNN_BREAK_SHUFFLE_DIVERGENCE",))
    proc = run_driver(exe, "shuffles")
    assert proc.returncode != 0 and "warp divergence" in proc.stderr, proc.stdout + proc.stderr[-2000:]


# The largest error of the mma tile products against a float64 product of the same
# rounded operands, as a share of sum_k |a_ik b_kj|. Both sides multiply the same
# operands exactly; the emulated accumulators round once to float, so 2^-24 plus slack
# for sums that cancel is all a correct fragment layout leaves. A wrong one is off by O(1).
MMA_TOL = 1e-6


@pytest.mark.parametrize("kind", ["tf32", "bf16", "f16"])
@pytest.mark.parametrize("tiles", [(1, 1, 8), (2, 3, 32), (3, 2, 48)], ids=lambda t: "x".join(map(str, t)))
def test_mma_tile_products(emulator, kind, tiles):
    """One warp per 16 x 8 tile through csrc/cuda/mma.cuh (its fragment loaders, mma_sync
    and store), checked against the emulator's reference of the PTX fragment layout."""
    tm, tn, kdim = tiles
    if kind != "tf32" and kdim % 16:
        kdim *= 2  # m16n8k16: K a multiple of 16
    proc = run_driver(emulator, "mma", kind, tm, tn, kdim)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = float(proc.stdout.split()[1])
    assert err <= MMA_TOL, proc.stdout


@pytest.mark.parametrize("kind", ["tf32", "bf16"])
def test_a_wrong_fragment_layout_is_caught(kind):
    # The A loader with two registers swapped (BIRNN_BREAK_MMA_LAYOUT).
    exe = build("run_kernels_break_mma_layout", ("BIRNN_BREAK_MMA_LAYOUT",))
    proc = run_driver(exe, "mma", kind, 2, 3, 32)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[1]) > 100 * MMA_TOL, proc.stdout


# ---------------------------------------------------------------- tensor-core sweeps

# The sweeps with their step products on the tensor cores (mma_products), against the CPU
# path. float32 then multiplies in TF32, whose operands keep float16's 10-bit mantissa: its
# tolerance is float16's (as test_lstm_parity.py's TF32 test on a GPU sets it). bfloat16
# and float16 keep their own: their products were already rounded operands summed in float.
MMA_SWEEP_TOL = {torch.float32: TOL[torch.float16], torch.bfloat16: TOL[torch.bfloat16],
                 torch.float16: TOL[torch.float16]}
# (sweep, units or cluster, batch tile, H, B, layer case): H = 8 in blocks of 4 units at
# the grid barrier, tiles of 3 rows (a partial octet); a block per direction, with
# 10 rows in one tile (two octets, the second partial); H = 6 (rows shorter than one mma
# step: zeros to its end; a last block of 2 units, the weight rows padded to 16) in
# clusters of 2 blocks; H = 12 in clusters of 3 blocks of 4 units and tiles of 8 rows.
MMA_CUTS = {
    "grid-units4-tile3": ("sweep", 4, 3, 8, 4, "bi-lengths"),
    "whole-tile10": ("sweep", 8, 10, 8, 10, "bi-lengths-nobias"),
    "cluster2-H6": ("sweep-cluster", 2, 3, 6, 4, "bi-lengths"),
    "cluster3-H12": ("sweep-cluster", 3, 8, 12, 9, "uni"),
}
# Each with the weight fragments in registers (every cut here fits) and, for one cut per
# dtype, loaded from shared memory at every step ("smem").
MMA_RUNS = [(torch.float32, cut, "mma") for cut in MMA_CUTS] + [
    (dtype, cut, "mma") for dtype in (torch.bfloat16, torch.float16) for cut in ("grid-units4-tile3", "cluster2-H6")]
MMA_RUNS += [(dtype, "cluster3-H12", "mma-smem") for dtype in (torch.float32, torch.bfloat16)]


def mma_case(dtype, cut, fragments="mma"):
    sweep, units, tile, H, B, name = MMA_CUTS[cut]
    cfg = dict(LAYER_CASES[name])
    if cfg["lengths"]:
        cfg["lengths"] = (cfg["lengths"] * 3)[:B]
    header, case = make_case(dtype, 0, T=5, B=B, I=6, H=H, P=H, **cfg)
    return header, case, (sweep, units, tile, fragments)


@pytest.mark.parametrize("dtype,cut,fragments", MMA_RUNS, ids=lambda v: str(v).removeprefix("torch."))
def test_tensor_core_sweep_matches_cpu(emulator, tmp_path, dtype, cut, fragments):
    """Both sweeps with mma step products: the fragments of every warp through the
    emulator's reference of the PTX layout, the padding of rows, batch rows and row
    length, the slices' partial sums added by the cell update, the weight fragments kept
    in registers across the steps or loaded each step."""
    header, case, args = mma_case(dtype, cut, fragments)
    proc, flat = run_emulated(emulator, header, case, tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = reference_layer(case, dtype)
    got = unpack(flat, want)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w.double(), **MMA_SWEEP_TOL[dtype], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_wrong_fragment_layout_in_a_sweep_is_caught(tmp_path, dtype):
    # The sweeps built with the A loader's two registers swapped (BIRNN_BREAK_MMA_LAYOUT):
    # their products mix weight rows, and the answers must fail the same comparison.
    exe = build("run_kernels_break_mma_layout", ("BIRNN_BREAK_MMA_LAYOUT",))
    header, case, args = mma_case(dtype, "grid-units4-tile3")
    proc, flat = run_emulated(exe, header, case, tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = reference_layer(case, dtype)
    got = unpack(flat, want)
    with pytest.raises(AssertionError):
        for k, w in want.items():
            torch.testing.assert_close(got[k], w.double(), **MMA_SWEEP_TOL[dtype])


def test_tensor_core_sweeps_refuse_float64(emulator, tmp_path):
    # float64 has no mma of its own: a plan with tensor-core products is refused, not run
    # on the CUDA cores under a plan laid out for the tensor cores.
    header, case = make_case(torch.float64, 0, T=5, B=4, I=6, H=8, P=8, **LAYER_CASES["uni"])
    proc, _ = run_emulated(emulator, header, case, tmp_path, ("sweep", 4, 3, "mma"))
    assert proc.returncode != 0 and "no tensor-core products in float64" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------- the other schedule

def _reverse_run(run):
    """(header, case, args, dtype, tolerances) of a run of REVERSE_RUNS."""
    bi = dict(LAYER_CASES["bi-lengths"])
    if run == "per-step-proj":
        header, case = make_case(torch.float32, 0, T=5, B=4, I=6, H=8, P=3, **LAYER_CASES["bi-lengths-proj"])
        return header, case, (), torch.float32, TOL[torch.float32]
    if run == "cell":
        header, case = make_case(torch.float32, 1, T=1, B=5, I=6, H=9, P=9, D=1, lengths=None, bias=True, proj=False)
        return header, case, (), torch.float32, TOL[torch.float32]
    if run in ("grid", "cluster", "one-block"):
        header, case = make_case(torch.float32, 0, T=5, B=4, I=6, H=8, P=8, **bi)
        args = {"grid": ("sweep", 3, 2), "cluster": ("sweep-cluster", 3, 3), "one-block": ("sweep", 8, 3)}[run]
        return header, case, args, torch.float32, TOL[torch.float32]
    if run.startswith("groups-"):
        dtype, args, D = GROUP_RUNS[run.removeprefix("groups-")]
        header, case = make_case(dtype, 0, T=5, B=7, I=6, H=8, P=8, D=D, lengths=[5, 2, 1, 4, 3, 5, 2], bias=True,
                                 proj=False)
        return header, case, (*args, "groups=3"), dtype, TOL[dtype]
    if run.startswith("regs-"):
        header, case, args = reg_case(torch.float32, run.removeprefix("regs-"))
        return header, case, args, torch.float32, TOL[torch.float32]
    dtype, cut, fragments = {"mma-grid": (torch.float32, "grid-units4-tile3", "mma"),
                             "mma-cluster-smem-bf16": (torch.bfloat16, "cluster3-H12", "mma-smem")}[run]
    header, case, args = mma_case(dtype, cut, fragments)
    return header, case, args, dtype, MMA_SWEEP_TOL[dtype]


# The per-step kernels (with a projection) and the cell's; every kind of sweep: grid (its
# blocks at the grid barrier), one block a direction, cluster, in batch groups, SIMT
# products with the weights in registers, tensor-core products with the fragments in
# registers and from shared memory.
REVERSE_RUNS = ["per-step-proj", "cell", "grid", "one-block", "cluster", "groups-cluster3", "groups-grid-units3",
                "regs-grid-units2-tile10", "regs-cluster3-H40", "mma-grid", "mma-cluster-smem-bf16"]


@pytest.mark.parametrize("run", REVERSE_RUNS)
def test_kernels_in_reverse_order_match_cpu(emulator, tmp_path, run):
    """The kernels with the threads of each block, and the blocks of each cluster or
    cooperative grid, resumed from the last (BIRNN_EMU_ORDER=reverse): a read that a
    missing barrier leaves racing with an earlier thread's write reads stale data here."""
    header, case, args, dtype, tol = _reverse_run(run)
    proc, flat = run_emulated(emulator, header, case, tmp_path, args, order="reverse")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = (reference_cell if run == "cell" else reference_layer)(case, dtype)
    got = unpack(flat, want)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w.double(), **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("driver", [("shuffles",), ("mma", "bf16", 2, 3, 32)], ids=lambda d: d[0])
def test_warp_collectives_in_reverse_order(emulator, driver):
    # A warp's lanes meet at each collective whichever lane arrives first.
    proc = run_driver(emulator, *driver, order="reverse")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    if driver[0] == "shuffles":
        assert proc.stdout.strip() == "ok", proc.stdout
    else:
        assert float(proc.stdout.split()[1]) <= MMA_TOL, proc.stdout
