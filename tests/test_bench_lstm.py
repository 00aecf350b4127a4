"""The benchmarks compare like with like: in forward+backward both sides backpropagate
the same loss, so the two gradients they make each side compute are the same ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_cell  # noqa: E402
import bench_lstm  # noqa: E402


@pytest.mark.parametrize("case", bench_lstm.PRESETS["quick"], ids=lambda c: c.name)
def test_both_sides_backpropagate_the_same_loss(case):
    ref, fused, x, lengths, _ = bench_lstm.case_inputs(case, "cpu")
    ref, fused = ref.double(), fused.double()
    grads = []
    for model in (ref, fused):
        xi = bench_lstm.one_call(model, x.double(), lengths, train=True)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in model.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    # float64 on both sides: the two implementations agree to rounding.
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("case", bench_lstm.PRESETS["quick"][:1], ids=lambda c: c.name)
def test_both_sides_ask_the_input_gradient_alone(case):
    ref, fused, x, lengths, _ = bench_lstm.case_inputs(case, "cpu")
    ref, fused = ref.double(), fused.double()
    got = [bench_lstm.one_call(model, x.double(), lengths, train=True, grad_of="input").grad for model in (ref, fused)]
    torch.testing.assert_close(got[1], got[0], rtol=1e-9, atol=1e-9)
    assert all(p.grad is None for model in (ref, fused) for p in model.parameters())


def test_cell_loops_compute_the_same_on_both_sides():
    ref = torch.nn.LSTMCell(6, 5, dtype=torch.float64)
    fused = bench_cell.FusedLSTMCell.from_cell(ref)
    xs = torch.randn(4, 3, 6, dtype=torch.float64)
    outs = [bench_cell.loop(cell, xs, train=True)() for cell in (ref, fused)]
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for (name, want), got in zip(ref.named_parameters(), fused.parameters()):
        assert want.grad is not None and got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_cell_loops_ask_the_same_input_gradient():
    ref = torch.nn.LSTMCell(6, 5, dtype=torch.float64)
    fused = bench_cell.FusedLSTMCell.from_cell(ref)
    xs = torch.randn(4, 3, 6, dtype=torch.float64)
    grads = [bench_cell.loop(cell, xs, train=True, grad_of="input")()[2].grad for cell in (ref, fused)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)
    assert all(p.grad is None for cell in (ref, fused) for p in cell.parameters())
