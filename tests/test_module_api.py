"""The module surface of nn.LSTM: parameter names, shapes and initialisation,
state_dict both ways, repr, from_lstm, and a training program run unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from birnn_ext import FusedBiLSTM, FusedLSTM

CONFIGS = [
    dict(input_size=7, hidden_size=13),
    dict(input_size=7, hidden_size=13, num_layers=2, bidirectional=True, proj_size=5),
    dict(input_size=7, hidden_size=13, num_layers=3, bidirectional=True, bias=False, batch_first=True),
    dict(input_size=2, hidden_size=3, num_layers=2, dropout=0.25),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_same_parameters_and_initialisation(cfg):
    torch.manual_seed(123)
    ref = nn.LSTM(**cfg)
    torch.manual_seed(123)
    fused = FusedLSTM(**cfg)
    ref_params, fused_params = dict(ref.named_parameters()), dict(fused.named_parameters())
    assert list(fused_params) == list(ref_params)
    for name, p in ref_params.items():
        assert fused_params[name].shape == p.shape, name
        # nn.LSTM's init, drawn in the same order: the very same numbers.
        assert torch.equal(fused_params[name], p), name
    assert fused._flat_weights_names == ref._flat_weights_names
    assert [[n for n in names] for names in fused._all_weights] == ref._all_weights


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_both_ways(cfg):
    ref, fused = nn.LSTM(**cfg), FusedLSTM(**cfg)
    fused.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v)
    fused.reset_parameters()
    ref.load_state_dict(fused.state_dict())
    for k, v in fused.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)


def test_from_lstm_copies_config_and_weights():
    ref = nn.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True, dtype=torch.float64).eval()
    fused = FusedLSTM.from_lstm(ref)
    assert isinstance(fused, FusedLSTM) and fused.bidirectional and fused.batch_first and not fused.training
    assert fused.weight_hh_l1_reverse.dtype == torch.float64
    assert torch.equal(fused.weight_hh_l1_reverse, ref.weight_hh_l1_reverse)
    assert fused.weight_hh_l1_reverse.data_ptr() != ref.weight_hh_l1_reverse.data_ptr()
    with pytest.raises(TypeError, match="expects an nn.LSTM"):
        FusedLSTM.from_lstm(nn.GRU(2, 3))


@pytest.mark.parametrize("cfg", CONFIGS + [dict(input_size=2, hidden_size=3, bidirectional=True)])
def test_repr_like_nn_lstm(cfg):
    assert repr(FusedLSTM(**cfg)) == repr(nn.LSTM(**cfg)).replace("LSTM(", "FusedLSTM(", 1)


def test_bilstm_defaults_to_bidirectional():
    assert FusedBiLSTM(3, 4).bidirectional is True
    assert FusedBiLSTM(3, 4, bidirectional=False).bidirectional is False
    assert FusedLSTM(3, 4).bidirectional is False
    assert repr(FusedBiLSTM(3, 4)) == "FusedBiLSTM(3, 4, bidirectional=True)"


def test_positional_arguments_are_nn_lstms():
    args = (3, 4, 2, False, True, 0.0, True)
    ref, fused = nn.LSTM(*args), FusedLSTM(*args)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(fused, attr) == getattr(ref, attr), attr


def test_flatten_parameters_is_harmless():
    m = FusedBiLSTM(3, 4)
    m.flatten_parameters()
    assert len(m.all_weights) == 2 and len(m.all_weights[0]) == 4


class ManyToOne(nn.Module):
    """The classic classifier, written for nn.LSTM; `lstm_cls` is the one line that changes."""

    def __init__(self, lstm_cls, input_size=28, hidden_size=32, num_layers=2, num_classes=10):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.lstm = lstm_cls(input_size, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(hidden_size * 2, num_classes)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers * 2, x.size(0), self.hidden_size)
        c0 = torch.zeros(self.num_layers * 2, x.size(0), self.hidden_size)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out[:, -1, :])


def test_classifier_trains_unchanged_with_the_class_swapped():
    torch.manual_seed(0)
    ref = ManyToOne(nn.LSTM)
    fused = ManyToOne(FusedBiLSTM)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    losses = {}
    for name, model in (("ref", ref), ("fused", fused)):
        opt = torch.optim.Adam(model.parameters(), lr=0.003)
        losses[name] = []
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    # Losses agree at every step within float32 tolerance, and training did move.
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["ref"]), rtol=1e-5, atol=1e-5)
    assert losses["ref"][-1] != losses["ref"][0]
    for (n, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


def test_inference_follows_every_change_of_the_weights():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
    fused = FusedBiLSTM.from_lstm(ref)
    x = torch.randn(6, 3, 4)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():  # changed in place: the version counter moves
        ref.weight_hh_l1_reverse.mul_(1.5)
        fused.weight_hh_l1_reverse.mul_(1.5)
    check()
    other = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
    ref.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    check()
    ref.bias_ih_l0 = nn.Parameter(torch.randn(20))  # replaced outright
    fused.bias_ih_l0 = nn.Parameter(ref.bias_ih_l0.detach().clone())
    check()
    for m in (ref, fused):  # changed through .data: no version counter moves
        m.weight_ih_l0.data.mul_(0.5)
        m.bias_hh_l1_reverse.data.add_(0.25)
    check()
    import copy
    import pickle

    torch.testing.assert_close(pickle.loads(pickle.dumps(fused))(x)[0], fused(x)[0])
    clone = copy.deepcopy(fused)
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[0], fused(x)[0])


class _Scaled(nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_parametrized_weights_are_used_and_trained():
    """torch.nn.utils.parametrize moves a weight out of _parameters behind a property:
    forward must read the parametrized weight, and gradients reach the original."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, bidirectional=True)
    fused = FusedBiLSTM.from_lstm(ref)
    parametrize.register_parametrization(fused, "weight_hh_l0_reverse", _Scaled())
    with torch.no_grad():
        ref.weight_hh_l0_reverse.mul_(0.5)
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    fused(x)[0].sum().backward()
    ref(x)[0].sum().backward()
    original = fused.parametrizations.weight_hh_l0_reverse.original
    torch.testing.assert_close(original.grad, 0.5 * ref.weight_hh_l0_reverse.grad, rtol=1e-5, atol=1e-6)
