"""`make gpu-check`, `make gpu-train` and `make gpu-variants`: what a GPU machine is needed
for, with the python3 and torch already installed there (a GPU machine may have no package
index), in commands of a few minutes each (a session's GPU time is short: each fits one call).

`make gpu-check` (--group core), the state of the code as it ships:
 1. build the extension for the GPU present (its compute capability);
 2. `pytest -m cuda`: every GPU test, the property tests against nn.LSTM among them;
 3. the benchmark on the targets preset and the gpu-grid preset (float32, TF32 off on
    both sides), CSV and PNG under benchmarks/results/;
 4. the per-kernel profile of FusedBiLSTM and cuDNN (benchmarks/profile_kernels.py);
 5. the host time of a call (benchmarks/bench_call_overhead.py --device cuda): FusedBiLSTM,
    its layer op alone and nn.LSTM at B 1, T 1, H 16, inference and forward+backward;
 6. compute-sanitizer memcheck, racecheck and synccheck over the GPU kernel tests.

`make gpu-train` (--group train), the main job on the GPU:
 1. build;
 2. `python -m birnn_ext.demo --compare --device cuda`: the demo's classifier trained on
    Fashion-MNIST with nn.LSTM, FusedBiLSTM eager and FusedBiLSTM with its whole training
    step under torch.compile(mode="reduce-overhead"), samples/s each (the data from
    --data, else data/fashion-mnist in the checkout, else Debian's folder; its weights,
    curves and summary.json go to LOGS/demo/);
 3. benchmarks/bench_train_step.py --device cuda --compile reduce-overhead: the same
    step timed apart (forward, backward, Adam), one process each.

`make gpu-variants` (--group variants), each switch of csrc/cuda/launch_rules.cpp that
awaits its measurement, against the defaults timed in the same run:
 1. build; `pytest -m cuda` with the sweeps' tensor-core products on (BIRNN_EXT_CUDA_MMA=1);
    with them and a cluster per direction and group of batch rows
    (BIRNN_EXT_CUDA_SWEEP_CLUSTER=1), and with them and a block per direction and group
    (BIRNN_EXT_CUDA_SWEEP_BLOCK=1), so that each sweep has run on the GPU before it is
    timed; and with the backward's weight gradients on streams of their own
    (BIRNN_EXT_CUDA_OVERLAP=1, with the sweeps off so that every test takes the per-step
    path, whose weight gradients then run chunk by chunk beside the recurrence);
 2. the targets preset at the defaults; again with the backward sweep off
    (BIRNN_EXT_CUDA_SWEEP_BWD=0: per-step GEMMs and launches), for use_sweep's rule in
    backward; with a cluster per direction and group of batch rows in both sweeps
    (BIRNN_EXT_CUDA_SWEEP_CLUSTER=1, sm_90), for device_cluster_plan's; with the backward's weight gradients beside the
    recurrence and each other (BIRNN_EXT_CUDA_OVERLAP=1), for overlap_weight_grads';
 3. gpu-grid's cases with H below 100 at the defaults and with a block per direction and
    group (BIRNN_EXT_CUDA_SWEEP_BLOCK=1), for device_sweep_plan's;
 4. the targets preset with TF32 on for both sides (--tf32) and under --autocast bf16,
    each at the defaults, with the tensor-core products on, for sweep_mma_k's, and with
    them in the cluster sweeps, the pair the two switches were made for; the per-kernel
    profile with TF32 on both sides and the tensor-core products on
    (profile-cuda-tf32-mma.csv), where the sweeps' own time shows.

Each step's output goes to LOGS/<step>.log (default build/gpu-check), the CSV and PNG it
writes under benchmarks/results/ are copied to LOGS/results/, and a compact table of the
steps and the benchmark ratios is printed last and kept, step by step, in LOGS/summary.txt
(so a run cut short still says what it did). --deadline SECONDS cuts each step's time
limit to what is left of the run and reports the steps that no longer fit as skipped.
Exits 1 if a step failed or was skipped.

    python3 benchmarks/gpu_check.py [--group core|train|variants|all] [--logs DIR] [--skip STEP ...]
                                    [--deadline SECONDS] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The tests the sanitizers run: the kernels' own (parity, lengths, cell), not the
# compile-heavy or property ones, so that each tool stays within about a minute.
SANITIZED = ["tests/test_lstm_parity.py", "tests/test_cell.py", "tests/test_lengths.py", "tests/test_cuda_graphs.py",
             "-k", "not reduce_overhead"]
GROUPS = {
    # The figures before the sanitizers, the longest steps: a run cut short by --deadline
    # loses the latter.
    "core": ["build", "pytest", "bench-targets", "bench-grid", "profile", "call-overhead", "memcheck", "racecheck",
             "synccheck"],
    "train": ["build", "demo", "train-step"],
    # The pairs most likely to move a default first (each variant beside its defaults):
    # the cluster sweeps and the SIMT weights in registers, alone and together in IEEE
    # float32, the cluster sweeps with the tensor cores under TF32 and bfloat16; a run cut
    # short by --deadline loses the rest.
    "variants": ["build", "pytest-mma", "pytest-cluster", "pytest-regs", "pytest-cluster-regs", "pytest-block",
                 "pytest-overlap", "bench-targets", "bench-cluster", "bench-regs", "bench-cluster-regs", "bench-tf32",
                 "bench-cluster-mma-tf32", "bench-bf16", "bench-cluster-mma-bf16", "bench-mma-tf32", "bench-mma-bf16",
                 "bench-bwd-off", "bench-overlap", "bench-small-h", "bench-block", "profile-mma"],
}
STEPS = list(dict.fromkeys(step for group in GROUPS.values() for step in group))


# --deadline: the seconds kept back for the report, and the least a step is started with.
DEADLINE_RESERVE, MIN_STEP = 10, 30

# Where the demo's data is looked for without --data: a folder of the checkout (ignored by
# git, so that a GPU machine's copy of the checkout can carry it), then Debian's.
DATA_DIRS = (ROOT / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))


def default_data() -> Path:
    return next((d for d in DATA_DIRS if (d / "train-images-idx3-ubyte.gz").exists()), DATA_DIRS[-1])


# gpu-grid's cases with H below 100 (bench_lstm.py's g1, g2 and g5).
SMALL_H = ["--case", "1,400,40,64,1", "--case", "8,100,28,64,2", "--case", "64,200,300,96,1"]


def gpu() -> tuple[str, str] | None:
    """(name, compute capability as TORCH_CUDA_ARCH_LIST spells it) of GPU 0, or None."""
    try:
        import torch
    except ImportError:
        sys.exit(f"make gpu-check runs with a Python that has torch; {sys.executable} has none "
                 "(on a machine with the project's venv: make gpu-check PY=.venv/bin/python)")

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


@functools.cache
def build_rules():
    """birnn_ext/_build.py alone (where the toolkit and the build folders are). Imported
    through the package it would import birnn_ext, whose first import builds the library:
    here, before the build step, without its time limit, log or environment."""
    spec = importlib.util.spec_from_file_location("birnn_ext_build_rules", ROOT / "birnn_ext" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = build_rules().find_cuda_home()
    candidate = Path(home, "bin", "compute-sanitizer") if home else None
    return str(candidate) if candidate and candidate.exists() else None


@dataclass
class Step:
    cmd: list[str]
    timeout: int  # seconds
    env: dict = field(default_factory=dict)  # on top of the common environment
    results: tuple = ()  # the files it writes under benchmarks/results/, copied to LOGS/results/


def plan(py: str, tool: str | None, logs: Path = ROOT / "build" / "gpu-check", data: Path | None = None
         ) -> dict[str, Step]:
    """Every step a group can run, by name (a step not in GROUPS never runs); the demo's
    data from `data` (default_data() where None), its outputs under logs/demo."""
    bench = [py, "benchmarks/bench_lstm.py", "--device", "cuda", "--min-run-time", "0.2"]
    # The variants' timings: half the time each, as many of them as fit one call.
    variant = [py, "benchmarks/bench_lstm.py", "--device", "cuda", "--min-run-time", "0.1", "--preset", "targets"]
    pytest = [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]

    def timing(args, name, timeout=300, **env):
        return Step(args + ["--name", name], timeout, env, (f"{name}.csv", f"{name}.png"))

    steps = {
        "build": Step([py, "-c", "import birnn_ext"], 300),
        "pytest": Step(pytest, 300),
        "pytest-mma": Step(pytest, 300, {"BIRNN_EXT_CUDA_MMA": "1"}),
        "pytest-cluster": Step(pytest, 300, {"BIRNN_EXT_CUDA_MMA": "1", "BIRNN_EXT_CUDA_SWEEP_CLUSTER": "1"}),
        "pytest-block": Step(pytest, 300, {"BIRNN_EXT_CUDA_MMA": "1", "BIRNN_EXT_CUDA_SWEEP_BLOCK": "1"}),
        # The SIMT products with the weights in registers (float32 under the tests' TF32
        # off, float64, and 16-bit storage without mma), in the grid and the cluster sweeps.
        "pytest-regs": Step(pytest, 300, {"BIRNN_EXT_CUDA_SWEEP_REGS": "1"}),
        "pytest-cluster-regs": Step(pytest, 300, {"BIRNN_EXT_CUDA_SWEEP_REGS": "1",
                                                  "BIRNN_EXT_CUDA_SWEEP_CLUSTER": "1"}),
        # The per-step path everywhere: its weight gradients then run chunk by chunk.
        "pytest-overlap": Step(pytest, 300, {"BIRNN_EXT_CUDA_OVERLAP": "1", "BIRNN_EXT_CUDA_SWEEP": "0"}),
        "bench-targets": timing(bench + ["--preset", "targets"], "targets-cuda"),
        "bench-bwd-off": timing(variant, "targets-cuda-sweep-bwd-off", BIRNN_EXT_CUDA_SWEEP_BWD="0"),
        "bench-grid": timing(bench + ["--preset", "gpu-grid"], "gpu-grid-cuda"),
        # gpu-grid's g1, g2 and g5: the sizes where one block holds a direction's W_hh.
        "bench-small-h": timing(bench + SMALL_H, "gpu-grid-cuda-small-h"),
        "bench-block": timing(bench + SMALL_H, "gpu-grid-cuda-sweep-block", BIRNN_EXT_CUDA_SWEEP_BLOCK="1"),
        "bench-cluster": timing(variant, "targets-cuda-sweep-cluster", BIRNN_EXT_CUDA_SWEEP_CLUSTER="1"),
        "bench-regs": timing(variant, "targets-cuda-sweep-regs", BIRNN_EXT_CUDA_SWEEP_REGS="1"),
        "bench-cluster-regs": timing(variant, "targets-cuda-sweep-cluster-regs", BIRNN_EXT_CUDA_SWEEP_REGS="1",
                                     BIRNN_EXT_CUDA_SWEEP_CLUSTER="1"),
        "bench-overlap": timing(variant, "targets-cuda-overlap", BIRNN_EXT_CUDA_OVERLAP="1"),
        "bench-tf32": timing(variant + ["--tf32"], "targets-cuda-tf32"),
        "bench-mma-tf32": timing(variant + ["--tf32"], "targets-cuda-tf32-mma", BIRNN_EXT_CUDA_MMA="1"),
        "bench-cluster-mma-tf32": timing(variant + ["--tf32"], "targets-cuda-tf32-cluster-mma", BIRNN_EXT_CUDA_MMA="1",
                                         BIRNN_EXT_CUDA_SWEEP_CLUSTER="1"),
        "bench-bf16": timing(variant + ["--autocast", "bf16"], "targets-cuda-bf16"),
        "bench-mma-bf16": timing(variant + ["--autocast", "bf16"], "targets-cuda-bf16-mma", BIRNN_EXT_CUDA_MMA="1"),
        "bench-cluster-mma-bf16": timing(variant + ["--autocast", "bf16"], "targets-cuda-bf16-cluster-mma",
                                         BIRNN_EXT_CUDA_MMA="1", BIRNN_EXT_CUDA_SWEEP_CLUSTER="1"),
        "profile": Step([py, "benchmarks/profile_kernels.py"], 180, results=("profile-cuda.csv",)),
        "profile-mma": Step([py, "benchmarks/profile_kernels.py", "--tf32", "--name", "profile-cuda-tf32-mma"], 180,
                            {"BIRNN_EXT_CUDA_MMA": "1"}, ("profile-cuda-tf32-mma.csv",)),
        "call-overhead": Step([py, "benchmarks/bench_call_overhead.py", "--device", "cuda"], 120),
        "demo": Step([py, "-m", "birnn_ext.demo", "--compare", "--device", "cuda",
                      "--data", str(data or default_data()), "--out", str(logs / "demo")], 360),
        "train-step": Step([py, "benchmarks/bench_train_step.py", "--device", "cuda", "--compile", "reduce-overhead",
                            "--runs", "1"], 240),
    }
    if tool:
        for check in ("memcheck", "racecheck", "synccheck"):
            steps[check] = Step([tool, "--tool", check, "--error-exitcode", "1", *pytest, *SANITIZED], 240)
        # The caching allocator hides out-of-bounds accesses inside its blocks from memcheck.
        steps["memcheck"].env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    return steps


def stale_build_locks() -> list[Path]:
    """The JIT build's lock files. torch before 2.14 takes the build folder by creating a
    file there, which a build killed mid-way (a step over its time limit) leaves behind,
    and every later import then waits on it for good. The steps run one at a time, so at a
    step's start any such file is stale."""
    build_dir = build_rules().build_dir
    return [lock for lock in (build_dir(True) / "lock", build_dir(False) / "lock") if lock.exists()]


def run_step(name: str, step: Step, env: dict, logs: Path, timeout: float) -> dict:
    start = time.perf_counter()
    log = logs / f"{name}.log"
    with open(log, "w") as f:
        for lock in stale_build_locks():
            lock.unlink()
            f.write(f"removed {lock}, left by a build that did not finish\n")
        f.write("$ " + " ".join(step.cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(step.cmd, cwd=ROOT, env={**env, **step.env}, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    if rc == 0 and step.results:  # beside the logs, so that they come back with them
        (logs / "results").mkdir(exist_ok=True)
        for file in step.results:
            if (RESULTS / file).exists():
                shutil.copy2(RESULTS / file, logs / "results" / file)
    return {"step": name, "rc": rc, "seconds": time.perf_counter() - start, "summary": summarize(name, text, rc),
            "log": str(log)}


def summarize(name: str, text: str, rc) -> str:
    if name.startswith("pytest") or name in ("memcheck", "racecheck", "synccheck"):
        tail = re.findall(r"=+ (.*(?:passed|failed|error).*?) =+", text)
        summary = tail[-1] if tail else ""
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
        if errors:
            summary += f"; sanitizer errors {sum(int(e) for e in errors)}"
        if hazards:
            summary += f"; hazards {sum(int(h) for h in hazards)}"
        return summary or f"exit {rc}"
    if name == "build":
        return "built" if rc == 0 else "build failed"
    last = [line for line in text.splitlines() if line.strip()]
    return last[-1][:100] if last else f"exit {rc}"


def ratio_table(csv_name: str) -> list[str]:
    path = RESULTS / f"{csv_name}.csv"
    if not path.exists():
        return []
    rows = list(csv.DictReader(open(path)))
    lines = [f"{'case':<8} {'B':>4} {'T':>4} {'I':>4} {'H':>4} {'L':>2}  {'inference':>9} {'fwd+bwd':>8}"]
    # Keyed by the sizes too: cases given with --case all share the name "custom".
    def key(x):
        return tuple(x[k] for k in ("case", "B", "T", "I", "H", "layers"))

    for case in dict.fromkeys(key(x) for x in rows):
        r = {x["mode"]: x for x in rows if key(x) == case}
        first = next(iter(r.values()))
        lines.append(f"{first['case']:<8} {first['B']:>4} {first['T']:>4} {first['I']:>4} {first['H']:>4} "
                     f"{first['layers']:>2}  {float(r['inference']['ratio']):>9.2f} "
                     f"{float(r['forward+backward']['ratio']):>8.2f}")
    return lines


def report(group: str, name: str, arch: str, logs: Path, tool: str | None, wanted: list[str],
           results: list[dict]) -> str:
    """The steps so far and their tables, as printed last (and kept in LOGS/summary.txt)."""
    out = [f"gpu_check.py --group {group} on {name} (sm_{arch.replace('.', '')}); logs in {logs}"]
    if not tool and "memcheck" in wanted:
        out.append("compute-sanitizer: not found (not on PATH, nor in the CUDA toolkit): sanitizer steps not run")
    out.append(f"{'step':<14} {'result':<7} {'s':>6}  summary")
    for r in results:
        out.append(f"{r['step']:<14} {'ok' if r['rc'] == 0 else str(r['rc']):<7} {r['seconds']:>6.0f}  {r['summary']}")
    done = {r["step"] for r in results if r["rc"] == 0}
    for step, title, csv_name in TABLES:
        lines = ratio_table(csv_name) if step in done else []  # never an earlier run's file
        if lines:
            precision = {"bench-tf32": "float32, TF32 on both sides", "bench-mma-tf32": "float32, TF32 on both sides",
                         "bench-bf16": "autocast bf16 on both sides",
                         "bench-mma-bf16": "autocast bf16 on both sides"}.get(step, "float32, TF32 off on both sides")
            out += ["", f"nn.LSTM time / fused time, {title} ({precision}):", *lines]
    out += step_tables(results)
    return "\n".join(out)


def step_tables(results: list[dict]) -> list[str]:
    """The tables the call-overhead, demo and train-step steps print, from their logs."""
    out = []
    for r in results:
        if r["rc"] != 0 or r["step"] not in ("call-overhead", "demo", "train-step"):
            continue
        lines = [line for line in Path(r["log"]).read_text(errors="replace").splitlines()[1:]  # past "$ command"
                 if line.strip() and "Warning" not in line]
        if r["step"] == "demo":  # its results table, from its header on, without the last line (where the files went)
            at = next((i for i, line in enumerate(lines) if line.startswith("implementation")), len(lines))
            lines = [line for line in lines[at:] if not line.startswith("weights,")]
        elif r["step"] == "train-step":
            lines = [line for line in lines if line.startswith(("nn.LSTM", "fused"))]
        out += [""] + lines
    return out


# The benchmark tables of the report: (step, title, results file name).
TABLES = (("bench-targets", "targets preset", "targets-cuda"),
          ("bench-bwd-off", "targets preset, backward sweep off", "targets-cuda-sweep-bwd-off"),
          ("bench-grid", "gpu-grid preset", "gpu-grid-cuda"),
          ("bench-small-h", "gpu-grid's g1, g2, g5", "gpu-grid-cuda-small-h"),
          ("bench-block", "gpu-grid's g1, g2, g5 with a block per direction and group", "gpu-grid-cuda-sweep-block"),
          ("bench-cluster", "targets preset, a cluster per direction and group", "targets-cuda-sweep-cluster"),
          ("bench-regs", "targets preset, SIMT weights in registers", "targets-cuda-sweep-regs"),
          ("bench-cluster-regs", "targets preset, cluster sweeps with SIMT weights in registers",
           "targets-cuda-sweep-cluster-regs"),
          ("bench-overlap", "targets preset, backward's weight gradients side by side", "targets-cuda-overlap"),
          ("bench-tf32", "targets preset", "targets-cuda-tf32"),
          ("bench-mma-tf32", "targets preset, tensor-core sweeps", "targets-cuda-tf32-mma"),
          ("bench-cluster-mma-tf32", "targets preset, tensor-core cluster sweeps", "targets-cuda-tf32-cluster-mma"),
          ("bench-bf16", "targets preset", "targets-cuda-bf16"),
          ("bench-mma-bf16", "targets preset, tensor-core sweeps", "targets-cuda-bf16-mma"),
          ("bench-cluster-mma-bf16", "targets preset, tensor-core cluster sweeps", "targets-cuda-bf16-cluster-mma"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", type=Path, default=ROOT / "build" / "gpu-check")
    p.add_argument("--group", choices=[*GROUPS, "all"], default="core")
    p.add_argument("--data", type=Path, help="the demo's Fashion-MNIST files (default: " +
                   ", else ".join(map(str, DATA_DIRS)) + ")")
    p.add_argument("--skip", action="append", default=[], choices=STEPS)
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds for the whole run (0: none): each step's time limit is cut to what is left, and "
                        "the steps that no longer fit are reported as skipped, so a run on a machine lent for a "
                        "fixed time still ends with its table")
    args = p.parse_args(argv)
    began = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    found = gpu()
    if found is None:
        print("make gpu-check needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    name, arch = found
    args.logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "BIRNN_EXT_CUDA": "1",
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    tool = sanitizer()
    steps = plan(sys.executable, tool, args.logs, args.data)
    wanted = STEPS if args.group == "all" else GROUPS[args.group]
    results = []
    for step in wanted:
        if step in args.skip or step not in steps:
            continue
        timeout = steps[step].timeout
        if args.deadline:
            left = args.deadline - (time.perf_counter() - began) - DEADLINE_RESERVE
            timeout = min(timeout, left)
        if timeout < MIN_STEP:
            results.append({"step": step, "rc": "skipped", "seconds": 0, "summary": "out of time (--deadline)",
                            "log": ""})
        else:
            print(f"[gpu-check] {step} ...", file=sys.stderr, flush=True)
            results.append(run_step(step, steps[step], env, args.logs, timeout))
        # Kept as it grows: a run cut short still leaves the table of what it did.
        (args.logs / "summary.txt").write_text(report(args.group, name, arch, args.logs, tool, wanted, results) + "\n")
        if step == "build" and results[-1]["rc"] != 0:
            break  # nothing else can run
    print("\n" + report(args.group, name, arch, args.logs, tool, wanted, results))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
