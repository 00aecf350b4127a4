"""The ahead-of-time build: `pip install .` compiles the same sources with the same
flags as the JIT loader, and the installed package loads that library instead of
building one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pip_install_builds_and_the_package_uses_the_installed_library(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "BIRNN_EXT_CUDA": "0"}  # the CPU library: the CUDA build has its own check
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
                    "--target", str(site), str(ROOT)], check=True, env=env, capture_output=True, timeout=900)
    installed = sorted((site / "birnn_ext").glob("_C*.so"))
    assert installed, "pip install put no compiled library into the package"
    probe = (
        "import torch, birnn_ext\n"
        "from birnn_ext import _loader\n"
        "print(_loader.ensure_loaded())\n"
        "ref = torch.nn.LSTM(3, 4, bidirectional=True)\n"
        "m = birnn_ext.FusedBiLSTM.from_lstm(ref)\n"
        "x = torch.randn(5, 2, 3)\n"
        "torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)\n"
    )
    # Run from outside the source tree, so that only the installed package can be found.
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.strip().splitlines()[-1]
    assert Path(loaded) == installed[0], (loaded, installed)
    assert "building birnn_ext" not in out.stderr  # no JIT build happened
