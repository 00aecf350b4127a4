"""The CUDA build check: where nvcc and a CUDA build of torch are present (this
project's machines: yes), the extension is built with its CUDA kernels, it links and
loads, and every op has a CUDA kernel registered with the dispatcher."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import birnn_ext  # noqa: F401  (builds and loads the library)
from birnn_ext import _build, _loader

OPS = ["lstm_layer_forward", "lstm_layer_backward", "lstm_cell_forward", "lstm_cell_backward"]
CAN_BUILD_CUDA = torch.version.cuda is not None and _build.find_cuda_home() is not None


def test_toolkit_is_found_behind_the_nvcc_wrapper():
    home = _build.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    out = subprocess.run([f"{home}/bin/nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    assert "Cuda compilation tools" in out


@pytest.mark.skipif(not CAN_BUILD_CUDA, reason="needs nvcc and a CUDA build of torch")
def test_every_op_has_a_cuda_kernel():
    assert _build.want_cuda(), "nvcc and a CUDA torch are present, so the CUDA kernels must be built"
    for op in OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"birnn_ext::{op}", key), (op, key)


@pytest.mark.skipif(not CAN_BUILD_CUDA, reason="needs nvcc and a CUDA build of torch")
def test_library_links_the_cuda_runtime_and_cublas():
    # Resolved as in a process that imported torch: torch's own libraries from its lib folder.
    env = {"LD_LIBRARY_PATH": str(Path(torch.__file__).parent / "lib")}
    libs = subprocess.run(["ldd", _loader.ensure_loaded()], capture_output=True, text=True, check=True, env=env).stdout
    for name in ("libcudart", "libcublas", "libtorch_cuda", "libc10_cuda"):
        assert name in libs, f"{name} missing from the library's dependencies:\n{libs}"
    assert "not found" not in libs, libs


def test_cuda_can_be_forced_off(monkeypatch):
    monkeypatch.setenv("BIRNN_EXT_CUDA", "0")
    assert _build.want_cuda() is False
    monkeypatch.setenv("BIRNN_EXT_CUDA", "2")
    with pytest.raises(ValueError, match="BIRNN_EXT_CUDA must be 0 or 1"):
        _build.want_cuda()


@pytest.mark.skipif(_build.find_cuda_home() is None, reason="no CUDA toolkit on this machine")
def test_sweeps_compile_for_every_architecture(tmp_path):
    # The sweep kernels, their tensor-core variants (csrc/cuda/mma.cuh) among them, under
    # nvcc for sm_75, sm_80 and sm_90: the mma PTX from sm_80, the trap before it, the
    # cluster sweeps' barrier from sm_90 (the JIT build compiles for one architecture, and
    # the emulated tests never see nvcc's side of the device code).
    arches = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (75, 80, 90)]
    for family in ("sweep_fwd", "sweep_bwd"):
        proc = subprocess.run([f"{_build.find_cuda_home()}/bin/nvcc", "-std=c++17", *_build.NVCC_FLAGS, *arches, "-c",
                               str(_build.CSRC / "cuda" / f"{family}.cu"), "-o", str(tmp_path / f"{family}.o")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "warning" not in proc.stderr, proc.stderr[-3000:]
