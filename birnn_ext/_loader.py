"""Loads the compiled core into torch.ops.birnn_ext exactly once: the library that
`pip install .` put beside this file when there is one, else a JIT build from csrc/."""

from __future__ import annotations

from pathlib import Path

import torch

_loaded: str | None = None


def ensure_loaded() -> str:
    global _loaded
    if _loaded is None:
        here = Path(__file__).resolve().parent
        installed = sorted(here.glob("_C*.so"))
        if installed:
            torch.ops.load_library(str(installed[0]))
            _loaded = str(installed[0])
        else:
            from birnn_ext import _build

            _loaded = _build.load()
    return _loaded
