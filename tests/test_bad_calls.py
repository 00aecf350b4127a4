"""Every bad call raises what nn.LSTM raises (same type, same message) where nn.LSTM
checks it, or a clear error naming the argument where it does not; afterwards the
module still works."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from birnn_ext import FusedLSTM

I, H, L, B, T = 5, 6, 2, 3, 4
D = 2


def good_input():
    return torch.randn(T, B, I)


def states(*shape):
    return torch.zeros(shape), torch.zeros(shape)


# (id, forward args): nn.LSTM rejects each of these; both must raise alike.
FORWARD_CASES = [
    ("input 1-D", (torch.randn(I),)),
    ("input 4-D", (torch.randn(T, B, I, 1),)),
    ("wrong input_size", (torch.randn(T, B, I + 1),)),
    ("integer input", (torch.ones(T, B, I, dtype=torch.int64),)),
    ("float64 input, float32 weights", (torch.randn(T, B, I, dtype=torch.float64),)),
    ("h0 wrong batch", (good_input(), (torch.zeros(L * D, B + 1, H), torch.zeros(L * D, B, H)))),
    ("c0 wrong hidden", (good_input(), (torch.zeros(L * D, B, H), torch.zeros(L * D, B, H + 1)))),
    ("h0 wrong layers", (good_input(), states(L, B, H))),
    ("h0 2-D with batched input", (good_input(), states(L * D, H))),
    ("h0 3-D with unbatched input", (torch.randn(T, I), states(L * D, 1, H))),
    ("three hidden states", (good_input(), states(L * D, B, H) + (torch.zeros(L * D, B, H),))),
]


@pytest.mark.parametrize("case,args", FORWARD_CASES, ids=[c for c, _ in FORWARD_CASES])
def test_forward_errors_match_nn_lstm(case, args):
    ref = nn.LSTM(I, H, L, bidirectional=True)
    fused = FusedLSTM.from_lstm(ref)
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(type(want.value), match=f"^{re.escape(str(want.value))}$"):
        fused(*args)
    y, _ = fused(good_input())
    assert y.shape == (T, B, 2 * H) and torch.isfinite(y).all()


CONSTRUCTOR_CASES = [
    ("dropout above 1", dict(dropout=1.5)),
    ("dropout negative", dict(dropout=-0.1)),
    ("dropout bool", dict(dropout=True)),
    ("hidden_size 0", dict(hidden_size=0)),
    ("hidden_size float", dict(hidden_size=4.0)),
    ("input_size 0", dict(input_size=0)),
    ("num_layers 0", dict(num_layers=0)),
    ("bias not bool", dict(bias=1)),
    ("batch_first not bool", dict(batch_first=None)),
    ("proj_size negative", dict(proj_size=-1)),
    ("proj_size not smaller", dict(proj_size=H)),
]


@pytest.mark.parametrize("case,kw", CONSTRUCTOR_CASES, ids=[c for c, _ in CONSTRUCTOR_CASES])
def test_constructor_errors_match_nn_lstm(case, kw):
    args = dict(input_size=I, hidden_size=H, num_layers=L)
    args.update(kw)
    with pytest.raises(Exception) as want:
        nn.LSTM(**args)
    with pytest.raises(type(want.value), match=f"^{re.escape(str(want.value))}$"):
        FusedLSTM(**args)


LENGTH_CASES = [
    ("longer than T", [T + 1, 1, 2], ValueError, r"lengths must lie in \[1, 4\].*got values from 1 to 5"),
    ("zero", [0, 1, 2], ValueError, r"lengths must lie in \[1, 4\].*got values from 0 to 2"),
    ("float dtype", torch.tensor([1.0, 2.0, 3.0]), TypeError, r"lengths must hold integers, got dtype torch.float32"),
    ("wrong count", [1, 2], ValueError, r"one entry per sequence in the batch \(3\), got shape \(2,\)"),
    ("2-D", [[1, 2, 3]], ValueError, r"one entry per sequence in the batch \(3\), got shape \(1, 3\)"),
]


@pytest.mark.parametrize("case,lengths,exc,msg", LENGTH_CASES, ids=[c[0] for c in LENGTH_CASES])
def test_bad_lengths_name_the_argument(case, lengths, exc, msg):
    fused = FusedLSTM(I, H, L, bidirectional=True)
    with pytest.raises(exc, match=msg):
        fused(good_input(), lengths=lengths)
    y, _ = fused(good_input(), lengths=[4, 1, 2])
    assert (y[2:, 2] == 0).all() and (y[:2, 2] != 0).any()


def test_lengths_with_packed_input_is_refused():
    fused = FusedLSTM(I, H)
    packed = nn.utils.rnn.pack_padded_sequence(good_input(), [4, 3, 1])
    with pytest.raises(ValueError, match="lengths must not be given with a PackedSequence"):
        fused(packed, lengths=[4, 3, 1])


OP_CASES = [
    ("x 2-D", dict(x=torch.randn(T, I)), r"x must be 3-D \[T, B, I\], got 2-D"),
    ("w_ih_reverse wrong I", dict(w_ih_reverse=torch.randn(4 * H, I + 1)),
     r"w_ih_reverse must have shape \[4H, I\] = \[24, 5\], got \[24, 6\]"),
    ("h0 wrong batch", dict(h0=torch.zeros(D, B + 1, H)), r"h0 must have shape \[D, B, H\] = \[2, 3, 6\], got \[2, 4, 6\]"),
    ("c0 float64", dict(c0=torch.zeros(D, B, H, dtype=torch.float64)), r"c0 must have the dtype of x \(Float\), got Double"),
    ("w_hh_reverse float64", dict(w_hh_reverse=torch.randn(4 * H, H, dtype=torch.float64)),
     r"w_hh_reverse must have the dtype of x \(Float\), got Double"),
    ("b_hh wrong size", dict(b_hh=torch.zeros(4 * H + 1)), r"b_hh must have shape \[4H\] = \[24\], got \[25\]"),
    ("w_ih_reverse alone", dict(w_hh_reverse=None), r"w_ih_reverse and w_hh_reverse must be given together .* got w_ih_reverse alone"),
    ("b_ih without b_hh", dict(b_hh=None, b_hh_reverse=None), r"b_ih and b_hh must both be given or both be None, got b_ih alone"),
    ("b_ih_reverse missing", dict(b_ih_reverse=None), r"b_ih and b_ih_reverse must both be given or both be None, got b_ih alone"),
    ("reverse bias, one direction", dict(w_ih_reverse=None, w_hh_reverse=None, h0=torch.zeros(1, B, H),
                                         c0=torch.zeros(1, B, H)), r"b_ih_reverse was given without the reverse direction"),
    ("lengths int32", dict(lengths=torch.tensor([1, 2, 3], dtype=torch.int32)), r"lengths must be int64, got Int"),
    ("lengths past T", dict(lengths=torch.tensor([1, 2, T + 1])), r"lengths must lie in \[1, T = 4\], got values from 1 to 5"),
    ("T = 0", dict(x=torch.randn(0, B, I)), r"at least one time step, got T = 0"),
    ("w_hh not square without w_hr", dict(w_hh=torch.randn(4 * H, H - 1)),
     r"without w_hr, w_hh must be \[4H, H\], got \[24, 5\]"),
]


def layer_args(**override):
    """The forward op's arguments for a bidirectional layer, by name, in schema order."""
    args = dict(x=torch.randn(T, B, I), lengths=None, h0=torch.zeros(D, B, H), c0=torch.zeros(D, B, H))
    for sfx in ("", "_reverse"):
        args.update({f"w_ih{sfx}": torch.randn(4 * H, I), f"w_hh{sfx}": torch.randn(4 * H, H),
                     f"b_ih{sfx}": torch.zeros(4 * H), f"b_hh{sfx}": torch.zeros(4 * H), f"w_hr{sfx}": None})
    order = ["x", "lengths", "h0", "c0"] + [f"{n}{sfx}" for sfx in ("", "_reverse")
                                            for n in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]
    args = {k: args[k] for k in order}
    args.update(override)
    return args


@pytest.mark.parametrize("case,override,msg", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_checks_name_argument_expected_and_got(case, override, msg):
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.birnn_ext.lstm_layer_forward(*layer_args(**override).values(), False)


def test_backward_without_saved_activations_is_refused():
    """A forward with training=False saves nothing (None where the activations would be);
    the backward op given those says what to do, and so it does given empty tensors."""
    a = layer_args(b_ih=None, b_hh=None, b_ih_reverse=None, b_hh_reverse=None)
    _, _, _, *saved = torch.ops.birnn_ext.lstm_layer_forward(*a.values(), False)
    assert saved == [None] * 4
    empty = [torch.zeros(0, B, D * 4 * H), torch.zeros(0, B, D * H), torch.zeros(D, 0, B, H), torch.zeros(D, 0, B, H)]
    for activations, says in [(saved, r"\(gates, c_prev, h_prev or h_raw is None\)"),
                              (empty, r"\(gates has 0 steps, x has 4\)")]:
        with pytest.raises(RuntimeError, match="nothing was saved for backward; the forward must run with "
                                               f"training=True {says}"):
            torch.ops.birnn_ext.lstm_layer_backward(None, a["h0"], None, a["x"], None, a["w_ih"], a["w_hh"], None,
                                                    a["w_ih_reverse"], a["w_hh_reverse"], None, *activations)
    cell = [torch.randn(B, I), torch.zeros(B, H), torch.zeros(B, H), torch.randn(4 * H, I), torch.randn(4 * H, H)]
    _, _, gates = torch.ops.birnn_ext.lstm_cell_forward(*cell, None, False)
    assert gates is None
    for gates, says in [(gates, r"\(gates is None\)"), (torch.zeros(0, 4 * H), r"\(gates has 0 rows, x has 3\)")]:
        with pytest.raises(RuntimeError, match=f"nothing was saved for backward; the forward must run with "
                                               f"training=True {says}"):
            torch.ops.birnn_ext.lstm_cell_backward(torch.ones(B, H), None, *cell, gates)


def test_backward_op_refuses_no_time_steps():
    """Called directly with T = 0 (autograd never does: the forward refuses it), the
    backward says so instead of reading before its buffers."""
    a = layer_args(x=torch.randn(0, B, I), b_ih=None, b_hh=None, b_ih_reverse=None, b_hh_reverse=None)
    gates, cp, hp = torch.zeros(0, B, D * 4 * H), torch.zeros(0, B, D * H), torch.zeros(D, 0, B, H)
    with pytest.raises(RuntimeError, match=r"lstm_layer_backward: x must have at least one time step, got T = 0"):
        torch.ops.birnn_ext.lstm_layer_backward(torch.zeros(0, B, D * H), None, None, a["x"], None, a["w_ih"],
                                                a["w_hh"], None, a["w_ih_reverse"], a["w_hh_reverse"], None, gates,
                                                cp, hp, torch.zeros(0))


@pytest.mark.parametrize("requires_grad", ["x", "w_hh_reverse", "b_ih"])
def test_forward_op_without_training_still_gives_the_gradient(requires_grad):
    """training=False only says whether the activations come back: with a gradient
    required, the op's autograd saves them anyway (a module traced by torch.jit.trace for
    inference records False, and may still be trained), and the gradient is the one
    training=True gives."""
    a = layer_args()
    a[requires_grad] = a[requires_grad].requires_grad_()
    grads = []
    for training in (False, True):
        y, h_n, c_n, *saved = torch.ops.birnn_ext.lstm_layer_forward(*a.values(), training)
        assert all((t is None) != training for t in saved)
        grads.append(torch.autograd.grad((y * y).sum() + h_n.sum() + c_n.sum(), a[requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    cell_args = [torch.randn(B, I), torch.zeros(B, H), torch.zeros(B, H), torch.randn(4 * H, I), torch.randn(4 * H, H)]
    wanted = cell_args[{"x": 0, "w_hh_reverse": 4, "b_ih": 3}[requires_grad]].requires_grad_()
    grads = []
    for training in (False, True):
        h, c, gates = torch.ops.birnn_ext.lstm_cell_forward(*cell_args, None, training)
        assert (gates is None) != training
        grads.append(torch.autograd.grad((h * h).sum() + c.sum(), wanted))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _replace_weight(m):
    m.weight_hh_l1 = nn.Parameter(torch.randn(4 * H, H + 1))
    return m(good_input())


def _load_wrong_shape(m):
    state = m.state_dict()
    state["weight_ih_l0"] = torch.randn(4 * H, I + 2)
    return m.load_state_dict(state, strict=False)


_PACKED = nn.utils.rnn.pack_padded_sequence(torch.randn(T, B, I), [4, 3, 1])

# (id, call, exception type, message): where nn.LSTM's own message is an internal one
# (or there is none), birnn_ext raises a clear one of the same type.
CLEAR_CASES = [
    ("hidden on another device", lambda m: m(good_input(), (torch.zeros(L * D, B, H, device="meta"),
                                                            torch.zeros(L * D, B, H))),
     RuntimeError, r"Input and hidden tensors are not at the same device, found input tensor at cpu and hidden "
                   r"tensor at meta"),
    ("h0 float64", lambda m: m(good_input(), (torch.zeros(L * D, B, H, dtype=torch.float64), torch.zeros(L * D, B, H))),
     RuntimeError, r"h0 must have the dtype of x \(Float\), got Double"),
    ("T = 0", lambda m: m(torch.randn(0, B, I)), RuntimeError, r"at least one time step, got T = 0"),
    ("parameter replaced with a wrong shape", _replace_weight, RuntimeError,
     r"weight_hh_l1 must have shape \(24, 6\), got \(24, 7\)"),
    ("load_state_dict strict=False, wrong shape", _load_wrong_shape, RuntimeError,
     r"size mismatch for weight_ih_l0: copying a param with shape torch.Size\(\[24, 7\]\)"),
    ("packed, batch_sizes increasing", lambda m: m(nn.utils.rnn.PackedSequence(_PACKED.data, torch.tensor([1, 2, 3, 2]))),
     RuntimeError, r"batch_sizes must be positive, non-increasing and sum to data.size\(0\) = 8, got \[1, 2, 3, 2\]"),
    ("packed, batch_sizes wrong sum", lambda m: m(nn.utils.rnn.PackedSequence(_PACKED.data, torch.tensor([3, 2, 2, 2]))),
     RuntimeError, r"sum to data.size\(0\) = 8, got \[3, 2, 2, 2\] \(sum 9\)"),
    ("packed, batch_sizes float", lambda m: m(nn.utils.rnn.PackedSequence(_PACKED.data, torch.tensor([3., 2, 2, 1]))),
     TypeError, r"batch_sizes must be a 1-D int64 CPU tensor, got 1-D torch.float32 on cpu"),
]


@pytest.mark.parametrize("case,call,exc,msg", CLEAR_CASES, ids=[c[0] for c in CLEAR_CASES])
def test_clear_errors_and_the_module_still_works(case, call, exc, msg):
    ref = nn.LSTM(I, H, L, bidirectional=True)
    fused = FusedLSTM.from_lstm(ref)
    try:
        call(ref)
        ref_error = None  # nn.LSTM runs a parameter of the wrong shape without a word
    except Exception as e:
        ref_error = e
    if ref_error is not None:  # the same exception type as nn.LSTM's, with a clear message
        assert isinstance(ref_error, exc), (type(ref_error), ref_error)
    with pytest.raises(exc, match=msg):
        call(fused)
    if case.startswith("parameter"):  # the user's own broken weight: putting a right one back restores it
        fused.weight_hh_l1 = nn.Parameter(torch.randn(4 * H, H))
    y, _ = fused(good_input())
    assert y.shape == (T, B, 2 * H) and torch.isfinite(y).all()
