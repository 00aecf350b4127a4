"""The one source list and flag set of the compiled core, and the JIT build.

setup.py (ahead-of-time, ``pip install .``) and the JIT loader (``load()``, ninja via
torch.utils.cpp_extension, on first import from a source tree) both build from here.
This file imports nothing of birnn_ext, so setup.py can load it on its own.

Environment:
  BIRNN_EXT_CUDA=0/1       force the CUDA kernels off or on (default: on where nvcc
                           and a CUDA build of torch are both present)
  TORCH_CUDA_ARCH_LIST     the GPU architectures to compile for (torch's own variable)
  BIRNN_EXT_BUILD_DIR      where the JIT build keeps its objects (default: build/ in
                           the source tree)
  BIRNN_EXT_VERBOSE=1      show the compiler's command lines
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NAME = "birnn_ext_C"

CPU_SOURCES = [
    "ops.cpp", "autograd.cpp", "reference.cpp", "autocast.cpp", "cpu/layer_forward.cpp", "cpu/layer_backward.cpp",
    "cpu/cell_ops.cpp", "cpu/cell_rows.cpp", "cpu/buffer_pool.cpp", "cpu/small_gemm.cpp",
    "cpu/small_gemm_bf16.cpp", "cpu/cell_avx512.cpp",
]
CUDA_SOURCES = ["cuda/lstm_kernels.cu", "cuda/sweep_fwd.cu", "cuda/sweep_bwd.cu", "cuda/launch_rules.cpp",
                "cuda/lstm_cuda.cpp"]
# The host-emulated build of the CUDA kernels (tests only): the device code of the .cu
# files compiled by g++ against emu/cuda_emu.h, with a driver.
EMU_SOURCES = ["cuda/lstm_kernels.cu", "cuda/sweep_fwd.cu", "cuda/sweep_bwd.cu", "emu/run_kernels.cpp"]
EMU_FLAGS = ["-std=c++17", "-O1", "-g", "-Wall", "-DBIRNN_EMU",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

# -fopenmp: at::parallel_for is OpenMP pragmas in ATen's headers, serial without it.
# The runtime is the libgomp that libtorch_cpu has already loaded.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-variable", "-Wno-unused-function"]
LINK_FLAGS = ["-fopenmp"]
# No --use_fast_math: the GPU must round and divide as the emulated device code that
# the tests check against the CPU path does.
NVCC_FLAGS = ["-O3", "-std=c++17"]
# The architecture a JIT build compiles for when TORCH_CUDA_ARCH_LIST is unset and no
# GPU is visible to ask: such a build only proves that the CUDA code compiles and links.
DEFAULT_ARCH_WITHOUT_GPU = "8.0"


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME or $CUDA_PATH, else the folder of the nvcc
    that PATH finds, asked of nvcc itself: PATH may hold a wrapper script whose own
    location says nothing about the toolkit's, which is where torch's guess goes wrong."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if m is None:
        return None
    home = Path(m.group(1).strip()).resolve().parent
    return str(home) if (home / "bin" / "nvcc").exists() else None


def want_cuda() -> bool:
    """Whether to build the CUDA kernels (see the module docstring)."""
    import torch

    forced = os.environ.get("BIRNN_EXT_CUDA")
    if forced is not None and forced not in ("0", "1"):
        raise ValueError(f"BIRNN_EXT_CUDA must be 0 or 1, got {forced!r}")
    available = bool(CUDA_SOURCES) and torch.version.cuda is not None and find_cuda_home() is not None
    if forced == "1" and not available:
        raise RuntimeError(
            "BIRNN_EXT_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={find_cuda_home()}"
        )
    return available if forced is None else forced == "1"


def _use_cuda_home(home: str) -> None:
    # torch.utils.cpp_extension settles CUDA_HOME when first imported, and on a machine
    # with a toolkit but no GPU logs a warning about it; the toolkit is all a build needs.
    os.environ["CUDA_HOME"] = home
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as ce
    finally:
        log.setLevel(level)
    ce.CUDA_HOME = home


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', re.MULTILINE)


def _include_closure(source: Path) -> list[Path]:
    """`source` and every file it reaches through #include "..." (resolved against the
    including file's folder), each once."""
    seen: list[Path] = []
    todo = [source.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        todo += [dep for name in _LOCAL_INCLUDE.findall(f.read_text()) if (dep := (f.parent / name).resolve()).exists()]
    return seen


def build_emulator(output: str | Path, defines: tuple[str, ...] = ()) -> Path:
    """Builds the emulated kernels and their driver into `output` with g++ and the
    sanitizers (EMU_FLAGS); `defines` are extra -D flags (the tests' deliberately broken
    variants). One object per source, compiled side by side, kept in obj/ beside
    `output` and rebuilt only when a file it includes (or this file, which holds the
    flags) is newer. A define goes only to the sources whose include closure names it,
    so a broken variant recompiles the source its defect lives in and links the others'
    objects: compiling every source for each of the tests' eleven variants took about
    13 of the 20 minutes of `make test`."""
    from concurrent.futures import ThreadPoolExecutor

    home = find_cuda_home()
    if home is None:
        raise RuntimeError(
            "the emulated kernel build needs the CUDA toolkit's headers (cuda_fp16.h) and none was found")
    output = Path(output)
    objects_dir = output.parent / "obj"
    objects_dir.mkdir(parents=True, exist_ok=True)
    compile_cmd = ["g++", *EMU_FLAGS, f"-I{Path(home) / 'include'}", "-c", "-x", "c++"]
    objects, jobs = [], []
    for src in EMU_SOURCES:
        closure = _include_closure(CSRC / src)
        text = "".join(f.read_text() for f in closure)
        own = sorted(d for d in defines if re.search(rf"\b{re.escape(d.split('=')[0])}\b", text))
        obj = objects_dir / ("_".join([src.replace("/", "_").replace(".", "_"), *own]).lower() + ".o")
        newest = max(f.stat().st_mtime for f in [*closure, Path(__file__)])
        if not obj.exists() or obj.stat().st_mtime < newest:
            jobs.append((obj, [*compile_cmd, *[f"-D{d}" for d in own], str(CSRC / src)]))
        objects.append(obj)

    def compile_one(job):
        obj, cmd = job
        partial = obj.with_suffix(f".{os.getpid()}.tmp")  # renamed once whole: no half-written object is reused
        done = subprocess.run([*cmd, "-o", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"emulated kernel build failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
        partial.replace(obj)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(compile_one, jobs))
    if not output.exists() or output.stat().st_mtime < max(o.stat().st_mtime for o in objects):
        subprocess.run(["g++", *EMU_FLAGS, *map(str, objects), "-o", str(output)], check=True)
    return output


def sources(cuda: bool) -> list[str]:
    files = CPU_SOURCES + (CUDA_SOURCES if cuda else [])
    return [str(CSRC / f) for f in files]


def cublas_paths() -> tuple[list[str], list[str]]:
    """Include folders and linker flags for cuBLAS. The toolkit may not carry it; torch's
    NVIDIA wheels do, as a versioned libcublas.so.N with no unversioned link."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    candidates = [Path(find_cuda_home() or "/nonexistent"), *sorted(site.glob("nvidia/cu*")),
                  site / "nvidia" / "cublas"]
    include = next((str(c / "include") for c in candidates if (c / "include" / "cublas_v2.h").exists()), None)
    for c in candidates:
        for libdir in (c / "lib64", c / "lib"):
            libs = sorted(libdir.glob("libcublas.so*"))
            if libs:
                name = min(libs, key=lambda p: len(p.name)).name
                flags = [f"-L{libdir}", f"-l:{name}", f"-Wl,-rpath,{libdir}"]
                return ([include] if include else []), flags
    raise RuntimeError("cuBLAS not found: neither the CUDA toolkit nor torch's nvidia packages have libcublas")


def extension_kwargs(cuda: bool) -> dict:
    """Keyword arguments shared by CppExtension/CUDAExtension and cpp_extension.load."""
    import torch

    defines = ["-DBIRNN_EXT_WITH_CUDA"] if cuda else []
    # torch's libraries by path, so that a process without Python (deploy/aoti_run.cpp)
    # finds those this library needs: the CUDA ones are not the program's own.
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    kw = {
        "extra_compile_args": {"cxx": CXX_FLAGS + defines},
        "include_dirs": [str(CSRC)],
        "extra_link_args": [*LINK_FLAGS, f"-Wl,-rpath,{torch_lib}"],
    }
    if cuda:
        include, link = cublas_paths()
        kw["extra_compile_args"]["nvcc"] = NVCC_FLAGS + defines
        kw["include_dirs"] += include
        kw["extra_link_args"] += link
    return kw


# A C++ program that runs an AOTInductor package with no Python (README, Deploying).
AOTI_RUNNER = ROOT / "deploy" / "aoti_run.cpp"


def build_aoti_runner(library: str | Path) -> str:
    """Builds deploy/aoti_run.cpp into an executable beside `library` (the loaded
    birnn_ext library, which it links), with torch's compiler and flags for C++
    extensions, and returns the executable's path. The fused ops register themselves
    when the library loads; --no-as-needed keeps the link although no symbol of it is
    called by name."""
    import torch.utils.cpp_extension as ce

    lib = Path(library).resolve()
    out = lib.parent / "aoti_run"
    out.mkdir(exist_ok=True)
    return ce.load(
        name="aoti_run",
        sources=[str(AOTI_RUNNER)],
        extra_cflags=["-O2", "-Wall"],
        extra_ldflags=[f"-L{lib.parent}", "-Wl,--no-as-needed", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"],
        build_directory=str(out),
        is_python_module=False,
        is_standalone=True,
        verbose=os.environ.get("BIRNN_EXT_VERBOSE") == "1",
    )


def build_dir(cuda: bool) -> Path:
    import torch

    tag = f"torch{torch.__version__.split('+')[0]}-{'cuda' if cuda else 'cpu'}"
    base = os.environ.get("BIRNN_EXT_BUILD_DIR")
    return Path(base) / tag if base else ROOT / "build" / f"jit-{tag}"


def load() -> str:
    """Builds the library from csrc/ if needed (ninja keeps it incremental) and loads
    its ops into torch.ops.birnn_ext. Returns the path of the loaded library."""
    home = find_cuda_home()
    if home is not None:
        _use_cuda_home(home)  # before torch settles on its own guess
    import torch.utils.cpp_extension as ce

    cuda = want_cuda()
    if cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_WITHOUT_GPU
    out = build_dir(cuda)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"{NAME}.so"
    if not lib.exists():
        print("building birnn_ext (first use, about a minute)", file=sys.stderr, flush=True)
    kw = extension_kwargs(cuda)
    ce.load(
        name=NAME,
        sources=sources(cuda),
        extra_cflags=kw["extra_compile_args"]["cxx"],
        extra_cuda_cflags=kw["extra_compile_args"].get("nvcc"),
        extra_include_paths=kw["include_dirs"],
        extra_ldflags=kw["extra_link_args"],
        build_directory=str(out),
        with_cuda=cuda,
        is_python_module=False,
        verbose=os.environ.get("BIRNN_EXT_VERBOSE") == "1",
    )
    return str(lib)
