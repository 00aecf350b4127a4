"""A FusedBiLSTM model served from C++ without Python: torch.export, an AOTInductor
package, and deploy/aoti_run.cpp, which loads the package and runs it.

    python deploy/export_aoti.py [--out build/deploy] [--state-dict model.pt]

Exports the demo's classifier (birnn_ext/demo.py: a bidirectional 2-layer LSTM over
the 28 rows of an image, then a linear layer), with a dynamic batch size and
per-sequence lengths, into OUT/model.pt2; builds OUT's C++ program (linking libtorch and
birnn_ext's library); runs it on a batch of another size and compares its outputs with
the module's in Python. Prints the commands to run the program again by hand.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from birnn_ext import _build, _loader  # noqa: E402
from birnn_ext import FusedBiLSTM  # noqa: E402
from birnn_ext.demo import RowClassifier  # noqa: E402


class Served(nn.Module):
    """The demo's classifier taking per-sequence lengths too (rows past a sequence's
    end are padding): the linear layer reads each direction's final state, h_n."""

    def __init__(self, classifier: RowClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x, lengths):
        _, (h_n, _) = self.classifier.lstm(x, lengths=lengths)
        return self.classifier.fc(torch.cat([h_n[-2], h_n[-1]], dim=1))


def export_package(model: nn.Module, example: tuple, path: Path) -> str:
    """torch.export with a dynamic batch, then AOTInductor: the package's path."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims = ({0: batch}, {0: batch})
    program = torch.export.export(model.eval(), example, dynamic_shapes=dims)
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def build_runner() -> str:
    """deploy/aoti_run.cpp built against the birnn_ext library this process uses."""
    return _build.build_aoti_runner(_loader.ensure_loaded())


def run_cpp(runner: str, package: str, inputs: list[torch.Tensor], workdir: Path) -> list[torch.Tensor]:
    """Runs the C++ program on `inputs`: its outputs, as torch.load reads them."""
    src, dst = workdir / "inputs.pt", workdir / "outputs.pt"
    torch.save(inputs, src)
    done = subprocess.run([runner, package, str(src), str(dst)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{runner} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return list(torch.load(dst))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "deploy", help="where the package and program go")
    parser.add_argument("--state-dict", type=Path, help="the classifier's weights, a RowClassifier state_dict "
                        "(default: random)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    classifier = RowClassifier(FusedBiLSTM)
    if args.state_dict:
        classifier.load_state_dict(torch.load(args.state_dict))
    model = Served(classifier).eval()
    example = (torch.randn(8, 28, 28), torch.full((8,), 28, dtype=torch.int64))

    start = time.perf_counter()
    package = export_package(model, example, args.out / "model.pt2")
    print(f"exported and compiled {package} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    runner = build_runner()
    print(f"built {runner} in {time.perf_counter() - start:.1f} s")

    x, lengths = torch.randn(5, 28, 28), torch.tensor([28, 7, 1, 20, 28])  # another batch size
    got = run_cpp(runner, package, [x, lengths], args.out)[0]
    with torch.no_grad():
        want = model(x, lengths)
    diff = (got - want).abs().max().item()
    print(f"C++ output {tuple(got.shape)}, largest difference from Python's: {diff:.3g}")
    print(f"again by hand: {runner} {package} {args.out / 'inputs.pt'} {args.out / 'outputs.pt'}")
    return 0 if torch.allclose(got, want, rtol=1e-5, atol=1e-5) else 1


if __name__ == "__main__":
    sys.exit(main())
