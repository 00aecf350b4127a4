"""Losses that reach only some steps of a layer: a classifier on the last step's output,
a loss on one direction or on the final state only. The backward sweep skips the steps
no gradient has reached yet and leaves their rows out of the weight-gradient GEMMs, so
these check that every gradient still equals nn.LSTM's, NaN and Inf included."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from birnn_ext import FusedLSTM
from helpers import DEVICES, WeightGradFlags, assert_close, layer_weight_args

T, B, I, H = 9, 5, 4, 6
LENGTHS = [9, 4, 1, 7, 9]


def pair(num_layers, proj_size=0, bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers, bias=bias, bidirectional=True, proj_size=proj_size, dtype=dtype)
    return ref, FusedLSTM.from_lstm(ref)


def last_step(out, lengths):
    """Each sequence's output at its own last step: [B, 2P]."""
    if lengths is None:
        return out[-1]
    return out[torch.tensor(lengths) - 1, torch.arange(out.shape[1])]


# What the loss reads: (out [T, B, 2P], h_n, c_n, lengths) -> a tensor to weight and sum.
LOSSES = {
    "last step": lambda out, h, c, n: last_step(out, n),
    "last step, reverse half": lambda out, h, c, n: last_step(out, n)[:, out.shape[-1] // 2:],
    "forward half of every step": lambda out, h, c, n: out[..., : out.shape[-1] // 2],
    "first step only": lambda out, h, c, n: out[0],
    "h_n of the top layer": lambda out, h, c, n: h[-2:],
    "c_n only": lambda out, h, c, n: c,
}


def forward(module, x, lengths, fused):
    """out (padded), h_n, c_n: the fused module takes lengths=, nn.LSTM a PackedSequence."""
    if lengths is None:
        out, (h, c) = module(x)
    elif fused:
        out, (h, c) = module(x, lengths=torch.tensor(lengths))
    else:
        packed, (h, c) = module(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
        out, _ = nn.utils.rnn.pad_packed_sequence(packed, total_length=x.shape[0])
    return out, h, c


def run(module, x, lengths, loss_name, fused):
    x = x.detach().requires_grad_()
    out, h, c = forward(module, x, lengths, fused)
    picked = LOSSES[loss_name](out, h, c, lengths)
    g = torch.Generator().manual_seed(3)
    loss = (picked * torch.randn(picked.shape, generator=g, dtype=picked.dtype)).sum()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *(p for _, p in named)])
    return [loss, *grads], ["loss", "grad_input"] + [n for n, _ in named]


@pytest.mark.parametrize(
    "loss_name,num_layers,proj_size,with_lengths",
    list(itertools.product(LOSSES, [1, 2], [0, 3], [False, True])),
)
def test_partial_losses_match_nn_lstm(loss_name, num_layers, proj_size, with_lengths):
    dtype = torch.float64
    ref, fused = pair(num_layers, proj_size, dtype=dtype)
    x = torch.randn(T, B, I, dtype=dtype, generator=torch.Generator().manual_seed(1))
    lengths = LENGTHS if with_lengths else None
    got, names = run(fused, x, lengths, loss_name, fused=True)
    want, _ = run(ref, x, lengths, loss_name, fused=False)
    for name, a, b in zip(names, got, want):
        assert_close(a, b, dtype, name)


def test_the_classifier_of_the_demo_in_float32():
    """The demo's shape of model, batch-first, the last step into a Linear layer."""
    torch.manual_seed(0)
    ref = nn.LSTM(28, 32, 2, batch_first=True, bidirectional=True)
    fused = FusedLSTM.from_lstm(ref)
    head = nn.Linear(64, 10)
    x = torch.rand(16, 28, 28)
    y = torch.randint(0, 10, (16,))
    results = []
    for m in (fused, ref):
        loss = nn.functional.cross_entropy(head(m(x)[0][:, -1]), y)
        results.append([loss, *torch.autograd.grad(loss, list(m.parameters()))])
    for a, b in zip(*results):
        assert_close(a, b, torch.float32)


def assert_same_with_nan(got, want, names):
    for name, a, b in zip(names, got, want):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN pattern differs"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True, msg=name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_non_finite_input_where_no_gradient_reaches(value, proj_size):
    """The loss reads only the reverse direction's output at the last step, which does
    not depend on x[0]; nn.LSTM still multiplies the zero gradients there by x[0] and by
    the NaN activations of the forward direction, and so must the fused path."""
    ref, fused = pair(1, proj_size)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[0, 2, 1] = value
    got, names = run(fused, x, None, "last step, reverse half", fused=True)
    want, _ = run(ref, x, None, "last step, reverse half", fused=False)
    assert not got[0].isnan(), "the loss itself stays finite"
    assert any(g.isnan().any() for g in want[1:]), "nn.LSTM's gradients hold NaN here"
    assert_same_with_nan(got, want, names)


def test_non_finite_weight_in_a_direction_no_gradient_reaches():
    ref, fused = pair(1)
    with torch.no_grad():
        for m in (ref, fused):
            m.weight_hh_l0[3, 2] = float("nan")  # forward direction only
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, names = run(fused, x, None, "last step, reverse half", fused=True)
    want, _ = run(ref, x, None, "last step, reverse half", fused=False)
    assert not got[0].isnan()
    assert_same_with_nan(got, want, names)


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_input_without_grad(proj_size, with_lengths):
    """Data as the first layer's input: its gradient is not computed (the backward op's
    input_grad=False returns an empty grad_x); every weight gradient is still nn.LSTM's."""
    ref, fused = pair(2, proj_size)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lengths = LENGTHS if with_lengths else None
    results = []
    for m, is_fused in ((fused, True), (ref, False)):
        out, h, c = forward(m, x, lengths, is_fused)
        loss = out.square().sum() + h.sum() + c.sum()
        results.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(*results):
        assert_close(a, b, torch.float64, "weight gradient")
    # The op itself: an empty grad_x, and the other gradients bit for bit those of a full call.
    D, G, P = 2, 4 * H, proj_size or H
    w_ih, w_hh = torch.randn(D, G, I, dtype=torch.float64), torch.randn(D, G, P, dtype=torch.float64)
    w_hr = torch.randn(D, P, H, dtype=torch.float64) if proj_size else None
    h0, c0 = torch.zeros(D, B, P, dtype=torch.float64), torch.zeros(D, B, H, dtype=torch.float64)
    _, _, _, gates, cp, hp, hr = torch.ops.birnn_ext.lstm_layer_forward(
        x, None, h0, c0, *layer_weight_args(w_ih, w_hh, w_hr=w_hr), True)
    weights = layer_weight_args(w_ih, w_hh, w_hr=w_hr, backward=True)
    grads = torch.ops.birnn_ext.lstm_layer_backward(
        torch.ones(T, B, D * P, dtype=torch.float64), None, None, x, None, *weights, gates, cp, hp, hr, False
    )
    assert grads[0].shape == (0,)
    full = torch.ops.birnn_ext.lstm_layer_backward(
        torch.ones(T, B, D * P, dtype=torch.float64), None, None, x, None, *weights, gates, cp, hp, hr, True
    )
    for a, b in zip(grads[1:], full[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("loss_name", ["last step", "forward half of every step"])
def test_frozen_weight_matrices(loss_name, proj_size, with_lengths):
    """Frozen weight matrices (biases still trained), or a gradient asked of the input
    alone (adversarial examples, saliency): the backward op gets weight_grad=False and
    leaves dW_ih, dW_hh and dW_hr out; the input's and the biases' gradients are still
    nn.LSTM's."""
    ref, fused = pair(2, proj_size)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lengths = LENGTHS if with_lengths else None
    for m in (ref, fused):
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("bias"))
    results = []
    for m, is_fused in ((fused, True), (ref, False)):
        with WeightGradFlags("lstm_layer_backward") as calls:
            grads, names = run(m, x, lengths, loss_name, is_fused)
        assert calls.flags == ([False, False] if is_fused else [])
        results.append(grads)
    for a, b, name in zip(*results, names, strict=True):
        assert_close(a, b, torch.float64, name)
    # Every weight trainable, the gradient asked of the input alone.
    for p in fused.parameters():
        p.requires_grad_()
    x_ = x.clone().requires_grad_()
    out, h, c = forward(fused, x_, lengths, True)
    loss = LOSSES[loss_name](out, h, c, lengths).sum()
    with WeightGradFlags("lstm_layer_backward") as calls:
        (dx,) = torch.autograd.grad(loss, [x_], retain_graph=True)
    assert calls.flags == [False, False]
    with WeightGradFlags("lstm_layer_backward") as calls:
        want = torch.autograd.grad(loss, [x_, *fused.parameters()])
    assert calls.flags == [True, True]
    assert torch.equal(dx, want[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_the_op_without_weight_gradients(device, dtype, proj_size):
    """weight_grad=False: empty grad_w_ih, grad_w_hh and grad_w_hr, and every other
    gradient the same bits as a full call's, with and without dx, sizes that run in
    row blocks on several threads included."""
    ops = torch.ops.birnn_ext
    g = torch.Generator().manual_seed(0)
    for T_, B_, I_, H_ in [(T, B, I, H), (40, 16, 48, 64)]:
        D, G, P = 2, 4 * H_, proj_size or H_

        def r(*s):
            return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

        x, w_ih, w_hh = r(T_, B_, I_), r(D, G, I_) / 4, r(D, G, P) / 4
        w_hr = r(D, P, H_) / 4 if proj_size else None
        lengths = torch.tensor([T_] + [max(1, T_ - 3 * k) for k in range(1, B_)], device=device)
        for ln in (None, lengths):
            _, _, _, gates, cp, hp, hr = ops.lstm_layer_forward(
                x, ln, None, None, *layer_weight_args(w_ih, w_hh, w_hr=w_hr), True)
            weights = layer_weight_args(w_ih, w_hh, w_hr=w_hr, backward=True)
            dy, dh_n = r(T_, B_, D * P), r(D, B_, P)
            for input_grad in (True, False):
                full = ops.lstm_layer_backward(dy, dh_n, None, x, ln, *weights, gates, cp, hp, hr, input_grad)
                got = ops.lstm_layer_backward(dy, dh_n, None, x, ln, *weights, gates, cp, hp, hr, input_grad, False)
                assert full[3].shape == (D, G, I_) and full[4].shape == (D, G, P)
                for k in (3, 4, 6):
                    assert got[k].shape == (0,)
                for k in (0, 1, 2, 5):
                    assert torch.equal(got[k], full[k]), (k, input_grad, ln is not None)
