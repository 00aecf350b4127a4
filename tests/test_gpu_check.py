"""`make gpu-check` and `make gpu-variants` run where GPU time is short and lent by the
call: a wrong argument in one of their commands, or a run cut off before its table, costs
a whole call. What can be checked without a GPU is checked here: every step has a
command, every benchmark command parses with its script's own parser, and a run past its
--deadline still ends with its table, its results beside its logs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

PY = sys.executable


def test_every_step_of_every_group_has_a_command():
    steps = gpu_check.plan(PY, "/usr/bin/compute-sanitizer")
    for group, names in gpu_check.GROUPS.items():
        missing = [n for n in names if n not in steps]
        assert not missing, f"group {group}: no command for {missing}"
    assert set(steps) == set(gpu_check.STEPS), "a step with a command that no group runs"


def test_without_compute_sanitizer_the_sanitizer_steps_are_left_out():
    assert {"memcheck", "racecheck", "synccheck"}.isdisjoint(gpu_check.plan(PY, None))


@pytest.mark.parametrize("step", [s for s, st in gpu_check.plan(PY, None).items() if "benchmarks/" in st.cmd[1]])
def test_benchmark_commands_parse(step):
    cmd = gpu_check.plan(PY, None)[step].cmd
    script = importlib.import_module(Path(cmd[1]).stem)
    args = script.parser().parse_args(cmd[2:])  # argparse exits (failing the test) on a wrong argument
    assert vars(args), step


def test_the_demo_command_parses(tmp_path):
    from birnn_ext import demo

    cmd = gpu_check.plan(PY, None, tmp_path / "logs", tmp_path / "data")["demo"].cmd
    assert cmd[1:3] == ["-m", "birnn_ext.demo"]
    args = demo.parser().parse_args(cmd[3:])
    assert (args.device, args.compare, args.data, args.out) == ("cuda", True, tmp_path / "data",
                                                                tmp_path / "logs" / "demo")


def test_the_demo_and_train_step_tables_reach_the_report(tmp_path):
    # Their logs as the scripts print them (the demo's lines from a CPU run of it).
    demo_log, step_log = tmp_path / "demo.log", tmp_path / "train-step.log"
    demo_log.write_text("$ python -m birnn_ext.demo ...\n60000 train / 10000 test images, on NVIDIA H200\n"
                        "epoch 1 ...\n\n"
                        "implementation                 test accuracy  train samples/s  train time  (cuda)\n"
                        "FusedBiLSTM                           0.8741            26000        9.2s\n"
                        "nn.LSTM                               0.8769            25000        9.6s\n"
                        "FusedBiLSTM / nn.LSTM training throughput: 1.04x\n"
                        "weights, curves.png and summary.json in build/gpu-check/demo/\n")
    step_log.write_text("$ python benchmarks/bench_train_step.py ...\ncompiling...\n"
                        "nn.LSTM                      forward   1.00 ms  backward   2.00 ms  optimizer  0.40 ms  "
                        "step   3.40 ms\n"
                        "fused (reduce-overhead)      step   1.20 ms  (compiling and warm-up: 40.0 s)\n")
    results = [{"step": "demo", "rc": 0, "log": str(demo_log)}, {"step": "train-step", "rc": 0, "log": str(step_log)}]
    lines = gpu_check.step_tables(results)
    assert [line.split()[0] for line in lines if line] == ["implementation", "FusedBiLSTM", "nn.LSTM", "FusedBiLSTM",
                                                           "nn.LSTM", "fused"]
    assert gpu_check.step_tables([{**results[0], "rc": 1}]) == []  # a failed step's log is not a table


def test_each_table_reads_the_file_its_step_writes():
    steps = gpu_check.plan(PY, None)
    for step, _, csv_name in gpu_check.TABLES:
        assert f"{csv_name}.csv" in steps[step].results, (step, csv_name)


def test_a_run_past_its_deadline_still_ends_with_its_table(tmp_path, monkeypatch, capsys):
    results, logs = tmp_path / "results", tmp_path / "logs"
    results.mkdir()

    def writes(name):
        return f"open({str(results / name)!r}, 'w').write('x')"

    fake = {
        "build": gpu_check.Step([PY, "-c", writes("a.csv")], 60, results=("a.csv",)),
        # Writes its result file, then outlives what is left of the run.
        "pytest": gpu_check.Step([PY, "-c", f"import time; {writes('b.csv')}; time.sleep(60)"], 300,
                                 results=("b.csv",)),
        "memcheck": gpu_check.Step([PY, "-c", "print('never started')"], 60),
    }
    monkeypatch.setattr(gpu_check, "gpu", lambda: ("Fake GPU", "9.0"))
    monkeypatch.setattr(gpu_check, "plan", lambda py, tool, *where: fake)
    monkeypatch.setattr(gpu_check, "RESULTS", results)
    monkeypatch.setattr(gpu_check, "DEADLINE_RESERVE", 0)
    monkeypatch.setattr(gpu_check, "MIN_STEP", 1)
    rc = gpu_check.main(["--logs", str(logs), "--deadline", "4"])
    assert rc == 1
    rows = {line.split()[0]: line.split()[1] for line in (logs / "summary.txt").read_text().splitlines()[2:]
            if line.split() and line.split()[0] in fake}
    assert rows == {"build": "ok", "pytest": "timeout", "memcheck": "skipped"}
    assert "memcheck" in capsys.readouterr().out  # the table printed last, the skipped step in it
    assert not (logs / "memcheck.log").exists()
    # A step's results come back beside the logs only where it ended well.
    assert sorted(p.name for p in (logs / "results").iterdir()) == ["a.csv"]


def test_a_step_first_removes_the_lock_a_killed_build_left(tmp_path, monkeypatch):
    # torch before 2.14 (the GPU machines' 2.11) locks a JIT build with a file that a build
    # killed at its step's time limit leaves behind; every later step would wait on it.
    monkeypatch.setenv("BIRNN_EXT_BUILD_DIR", str(tmp_path / "build"))
    from birnn_ext._build import build_dir

    lock = build_dir(True) / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    logs = tmp_path / "logs"
    logs.mkdir()
    result = gpu_check.run_step("build", gpu_check.Step([PY, "-c", "pass"], 60), dict(os.environ), logs, 60)
    assert result["rc"] == 0 and not lock.exists()
    assert f"removed {lock}" in (logs / "build.log").read_text()


def test_the_checks_own_lookups_do_not_build_the_library():
    # Finding the toolkit and the build folders must not import birnn_ext: its first import
    # builds the library, which belongs in the build step (its time limit, log, arch list).
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; gpu_check.sanitizer(); "
            "gpu_check.stale_build_locks(); assert 'birnn_ext' not in sys.modules, sorted(sys.modules)")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no compute-sanitizer on it: the toolkit lookup runs
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
