"""C++ without Python: torch.export, an AOTInductor package, and deploy/aoti_run.cpp
(a program linking libtorch and birnn_ext's library, no Python) reproduces the module."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import TOL

ROOT = Path(__file__).resolve().parent.parent


def _deploy_script():
    spec = importlib.util.spec_from_file_location("export_aoti", ROOT / "deploy" / "export_aoti.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_cpp_program_runs_the_package_as_python_runs_the_module(tmp_path):
    deploy = _deploy_script()
    torch.manual_seed(0)
    model = deploy.Served(deploy.RowClassifier(deploy.FusedBiLSTM, hidden_size=24)).eval()
    example = (torch.randn(4, 28, 28), torch.full((4,), 28, dtype=torch.int64))
    package = deploy.export_package(model, example, tmp_path / "model.pt2")
    runner = deploy.build_runner()

    dynamic = subprocess.run(["readelf", "-d", runner], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("birnn_ext" in lib for lib in needed) and "libtorch.so" in needed, needed
    assert not any("python" in lib for lib in needed), needed  # the program carries no interpreter

    for batch, lengths in ((4, [28, 28, 28, 28]), (7, [28, 1, 13, 28, 2, 27, 9]), (1, [5])):
        x = torch.randn(batch, 28, 28)
        lengths = torch.tensor(lengths)
        got = deploy.run_cpp(runner, package, [x, lengths], tmp_path)
        assert len(got) == 1
        with torch.no_grad():
            torch.testing.assert_close(got[0], model(x, lengths), **TOL[torch.float32])


@pytest.mark.slow
def test_the_cpp_program_reports_a_missing_input(tmp_path):
    runner = _deploy_script().build_runner()
    done = subprocess.run([runner, str(tmp_path / "none.pt2"), str(tmp_path / "none.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot open" in done.stderr and "none.pt" in done.stderr
