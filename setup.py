"""Ahead-of-time build: `pip install --no-build-isolation .` compiles the same sources
with the same flags as the JIT loader (birnn_ext/_build.py) into birnn_ext/_C*.so."""

import importlib.util
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

_spec = importlib.util.spec_from_file_location("_build", Path(__file__).parent / "birnn_ext" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

cuda = _build.want_cuda()
if cuda:
    _build._use_cuda_home(_build.find_cuda_home())
Extension = CUDAExtension if cuda else CppExtension
sources = [str(Path(s).relative_to(_build.ROOT)) for s in _build.sources(cuda)]

setup(
    ext_modules=[Extension("birnn_ext._C", sources, **_build.extension_kwargs(cuda))],
    cmdclass={"build_ext": BuildExtension},
)
