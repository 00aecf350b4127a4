"""FusedLSTM, FusedBiLSTM and FusedLSTMCell: drop-in replacements for torch.nn.LSTM
and torch.nn.LSTMCell.

Same constructor, forward signature, outputs, parameter names, shapes and
initialisation as nn.LSTM, so `load_state_dict` works both ways. They are plain
nn.Modules rather than nn.LSTM subclasses: torch.compile refuses to trace anything
that is an nn.LSTM, and these modules must compile without a graph break.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from birnn_ext import _onnx, ops

_lstm_layer_forward = torch.ops.birnn_ext.lstm_layer_forward  # loaded by importing ops


def _apply_permutation(t: Tensor, permutation: Tensor, dim: int = 1) -> Tensor:
    return t.index_select(dim, permutation)


class _TorchNNCounterpart:
    """What the fused modules share about their torch.nn counterpart (nn.LSTM or
    nn.LSTMCell), for the tools that know only that class. `_to_nn` names the method that
    returns the counterpart (to_lstm, to_lstm_cell)."""

    _to_nn = ""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given, submodules included.
        name = type(self).__name__
        raise RuntimeError(
            f"torch.jit.script cannot compile {name}: TorchScript is deprecated, and the fused kernels are "
            "reached through torch.export instead. Deploy with torch.export.export(model, args), then "
            "AOTInductor or torch.onnx.export (README, Deploying); or script the torch.nn module that "
            f"{name}.{self._to_nn}() returns."
        )

    # torch.fx.symbolic_trace keeps torch.nn's modules as leaves, one call_module node
    # each, and traces into every other module's forward, where the fused modules' checks
    # (Python on shapes and values) cannot run on its proxies. Called by forward when its
    # input is a proxy: the node nn.LSTM (nn.LSTMCell) would have made.
    def _fx_leaf(self, input, *args, **kwargs):
        tracer = input.tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(self), (input, *args), kwargs)

    # torch.ao.quantization sets `qconfig` on every module it walks, and quantizes only
    # the torch.nn classes it maps: without this, the fused layers would stay float
    # without a word.
    @property
    def qconfig(self):
        try:
            return self.__dict__["_qconfig"]
        except KeyError:
            raise AttributeError("qconfig") from None

    @qconfig.setter
    def qconfig(self, value) -> None:
        warnings.warn(
            f"torch.ao.quantization does not quantize {type(self).__name__} (it quantizes torch.nn's LSTM "
            f"classes): convert first with birnn_ext.to_torch_nn(model), or {self._to_nn}()",
            stacklevel=2,
        )
        self.__dict__["_qconfig"] = value

    @qconfig.deleter
    def qconfig(self) -> None:  # the quantization flows remove it when they are done
        self.__dict__.pop("_qconfig", None)


def _copy_weights(src: nn.Module, dst: nn.Module, names) -> None:
    """dst's parameters `names` set to src's current values (as src's forward sees them:
    through parametrizations and pruning masks)."""
    with torch.no_grad():
        for name in names:
            getattr(dst, name).copy_(getattr(src, name))


def to_torch_nn(model: nn.Module) -> nn.Module:
    """Replaces every FusedLSTM, FusedBiLSTM and FusedLSTMCell in `model` with the
    torch.nn module holding the same weights (to_lstm / to_lstm_cell), in place, and
    returns the model (the replacement, when `model` itself is fused). For tools that
    know only nn.LSTM: torch.ao.quantization.quantize_dynamic, TorchScript, and others."""
    if isinstance(model, _TorchNNCounterpart):
        return getattr(model, model._to_nn)()
    for name, child in model.named_children():
        setattr(model, name, to_torch_nn(child))
    return model


class FusedLSTM(_TorchNNCounterpart, nn.Module):
    """Multi-layer LSTM on fused C++/CUDA kernels; the arguments are nn.LSTM's.

    forward(input, hx=None, lengths=None) -> output, (h_n, c_n)

    input is [T,B,I] ([B,T,I] with batch_first), [T,I] unbatched, or a PackedSequence.
    `lengths` (beyond nn.LSTM's signature) gives each sequence's length in a padded
    batch: the reverse direction then starts at each sequence's own last step, outputs
    past the end are zero, and h_n/c_n are taken at each sequence's end, as nn.LSTM
    gives for the same batch packed, without packing.
    """

    _default_bidirectional = False
    _to_nn = "to_lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool | None = None,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if bidirectional is None:
            bidirectional = self._default_bidirectional
        # nn.LSTM's checks, in nn.LSTM's order, with its exception types and messages.
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        D = self.num_directions
        G = 4 * hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        P = proj_size if proj_size > 0 else hidden_size  # the size of h
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else P * D
            for direction in range(D):
                sfx = "_reverse" if direction == 1 else ""
                shapes = {f"weight_ih_l{layer}{sfx}": (G, layer_input), f"weight_hh_l{layer}{sfx}": (G, P)}
                if bias:
                    shapes[f"bias_ih_l{layer}{sfx}"] = (G,)
                    shapes[f"bias_hh_l{layer}{sfx}"] = (G,)
                if proj_size > 0:
                    shapes[f"weight_hr_l{layer}{sfx}"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names.extend(shapes)
                self._all_weights.append(list(shapes))
        self._slots = self._weight_slots()
        self._slot_names = [[None if slot is None else slot[0] for slot in slots] for slots in self._slots]
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> FusedLSTM:
        """A module with lstm's configuration, device, dtype and weights."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm expects an nn.LSTM, got {type(lstm).__name__}")
        w = lstm.weight_ih_l0
        new = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
            lstm.dropout, lstm.bidirectional, lstm.proj_size, device=w.device, dtype=w.dtype,
        )
        new.load_state_dict(lstm.state_dict())
        new.train(lstm.training)
        return new

    def to_lstm(self) -> nn.LSTM:
        """An nn.LSTM with this module's configuration, device, dtype, mode and current
        weights (copies): the way back from from_lstm."""
        w = self._param("weight_ih_l0")
        lstm = nn.LSTM(
            self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first, self.dropout,
            self.bidirectional, self.proj_size, device=w.device, dtype=w.dtype,
        )
        _copy_weights(self, lstm, self._flat_weights_names)
        return lstm.train(self.training)

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation: every parameter uniform in +-1/sqrt(hidden_size)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Kept for code written for nn.LSTM; the fused kernels need no flat buffer."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ------------------------------------------------------------ checks

    def _check_input(self, input: Tensor, packed: bool, weight: Tensor) -> None:
        """weight: weight_ih_l0 (the first of _layer_weights), whose dtype input must have."""
        dtype = weight.dtype
        if input.dtype != dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({dtype}). "
                f"Convert input: input.to({dtype}), or convert model: model.to({input.dtype})"
            )
        expected_dim = 2 if packed else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}"
            )

    def _check_hidden(self, hx: tuple[Tensor, Tensor], batch: int, input: Tensor) -> None:
        if len(hx) != 2:
            raise RuntimeError("lstm expects two hidden states")
        LD = self.num_layers * self.num_directions
        for k, size in enumerate((self._h_size, self.hidden_size)):
            expected = (LD, batch, size)
            if hx[k].size() != expected:
                raise RuntimeError(f"Expected hidden[{k}] size {expected}, got {list(hx[k].size())}")
        for t in hx:
            if t.device != input.device:
                raise RuntimeError(
                    "Input and hidden tensors are not at the same device, "
                    f"found input tensor at {input.device} and hidden tensor at {t.device}"
                )

    def _weight_slots(self) -> list[list[tuple[str, tuple[int, ...]] | None]]:
        """Per layer, the layer op's ten weight arguments in its order (w_ih, w_hh, b_ih,
        b_hh, w_hr, then the reverse direction's): the parameter's name and expected
        shape, or None where the op takes None (no bias, no projection, one direction)."""
        D, G, P = self.num_directions, 4 * self.hidden_size, self._h_size
        layers = []
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else P * D
            slots = []
            for direction in range(2):
                if direction >= D:
                    slots += [None] * 5
                    continue
                sfx = "_reverse" if direction == 1 else ""
                slots += [(f"weight_ih_l{layer}{sfx}", (G, layer_input)), (f"weight_hh_l{layer}{sfx}", (G, P))]
                slots += [(f"bias_ih_l{layer}{sfx}", (G,)), (f"bias_hh_l{layer}{sfx}", (G,))] if self.bias \
                    else [None, None]
                slots.append((f"weight_hr_l{layer}{sfx}", (self.proj_size, self.hidden_size))
                             if self.proj_size > 0 else None)
            layers.append(slots)
        return layers

    def _layer_weights(self) -> list[list[Tensor | None]]:
        """Per layer, the op's ten weight arguments (see _weight_slots): the module's own
        Parameters, fetched on every call and read in place by the op (no copy, nothing
        cached), so a parameter changed in any way (through .data, load_state_dict, a
        parametrization) is what this call uses. Not checked here: the op checks every
        shape, dtype and device itself, and where it refuses a call, _weight_error names
        the parameter at fault (checking them all here first cost 3 us a call)."""
        params = self._parameters
        try:
            return [[None if name is None else params[name] for name in names] for names in self._slot_names]
        except KeyError:  # torch.nn.utils.parametrize moved one: its property computes it
            return [[None if name is None else getattr(self, name) for name in names] for names in self._slot_names]

    def _weight_error(self, input: Tensor) -> str | None:
        """The error that names the first parameter that does not fit, or None: a parameter
        replaced after construction must keep its shape and the input's device."""
        for slots in self._slots:
            for slot in slots:
                if slot is None:
                    continue
                name, shape = slot
                w = self._param(name)
                if w.shape != shape:
                    return f"{name} must have shape {shape}, got {tuple(w.shape)}"
                if w.device != input.device:
                    return ("Input and parameter tensors are not at the same device, "
                            f"found input tensor at {input.device} and parameter tensor at {w.device}")
        return None

    @staticmethod
    def _check_batch_sizes(batch_sizes: Tensor, rows: int) -> None:
        if batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1 or batch_sizes.device.type != "cpu":
            raise TypeError(
                "PackedSequence.batch_sizes must be a 1-D int64 CPU tensor, "
                f"got {batch_sizes.dim()}-D {batch_sizes.dtype} on {batch_sizes.device}"
            )
        sizes = batch_sizes.tolist()
        if not sizes or sizes[-1] < 1 or any(a < b for a, b in zip(sizes, sizes[1:])) or sum(sizes) != rows:
            raise RuntimeError(
                "PackedSequence.batch_sizes must be positive, non-increasing and sum to data.size(0) = "
                f"{rows}, got {sizes} (sum {sum(sizes)})"
            )

    def _param(self, name: str) -> Tensor:
        """getattr(self, name), from _parameters when it is there: nn.Module.__getattr__
        costs about a microsecond a name, and forward reads every weight twice. A name
        that is not there (torch.nn.utils.parametrize moves it) goes through getattr."""
        w = self._parameters.get(name)
        return w if w is not None else getattr(self, name)

    @property
    def _h_size(self) -> int:
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _lengths_tensor(self, lengths, batch: int, steps: int, device: torch.device) -> Tensor:
        """lengths as the op takes them: int64, on the CPU, or left on the GPU of the input
        when they are there (the CUDA op checks their range without a host sync)."""
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.dim() != 1 or lengths.numel() != batch:
            raise ValueError(
                f"lengths must be 1-D with one entry per sequence in the batch ({batch}), "
                f"got shape {tuple(lengths.shape)}"
            )
        if device.type == "cuda" and lengths.device == device:
            return lengths.to(torch.int64)
        lengths = lengths.to(device="cpu", dtype=torch.int64)
        # Under torch.compile and torch.export the values are not known (reading them
        # would break the graph), under torch.vmap they are one sample's among many: the
        # op checks them when it runs.
        if (batch and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(lengths)
                and (int(lengths.min()) < 1 or int(lengths.max()) > steps)):
            raise ValueError(
                f"lengths must lie in [1, {steps}] (the number of time steps in input), "
                f"got values from {int(lengths.min())} to {int(lengths.max())}"
            )
        return lengths

    # ------------------------------------------------------------ forward

    # lengths is not keyword-only: torch.onnx.export(dynamo=False) passes every defaulted
    # argument of a top-level module positionally.
    def forward(self, input, hx=None, lengths=None):
        if isinstance(input, torch.fx.Proxy):
            return self._fx_leaf(input, hx) if lengths is None else self._fx_leaf(input, hx, lengths=lengths)
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths must not be given with a PackedSequence input: it carries its own")
            if _onnx.dynamo_export():
                raise RuntimeError(
                    "torch.onnx.export(..., dynamo=True) cannot trace a PackedSequence (its batch sizes are data): "
                    "pass the padded batch with lengths=, or export with dynamo=False"
                )
            data, batch_sizes, sorted_indices, unsorted_indices = input
            weights = self._layer_weights()
            self._check_input(data, True, weights[0][0])
            self._check_batch_sizes(batch_sizes, data.size(0))
            batch = int(batch_sizes[0])
            # Padded in the packed (sorted) order; the kernel handles the lengths.
            x, seq_lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            if hx is not None:
                self._check_hidden(hx, batch, data)
                hx = (_apply_permutation(hx[0], sorted_indices), _apply_permutation(hx[1], sorted_indices)) \
                    if sorted_indices is not None else hx
            y, (h_n, c_n) = self._run(x, hx, seq_lengths, weights)
            # The repacked batch_sizes equal the input's; taking them from this pack keeps each
            # pack paired with a pad, which is what TorchScript's ONNX export needs.
            repacked = pack_padded_sequence(y, seq_lengths)
            out = PackedSequence(repacked.data, repacked.batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n, c_n = _apply_permutation(h_n, unsorted_indices), _apply_permutation(c_n, unsorted_indices)
            return out, (h_n, c_n)

        dim = input.dim()
        if dim not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {dim}D instead")
        batched = dim == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            if batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
                raise RuntimeError(
                    "For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not batched:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        weights = self._layer_weights()
        self._check_input(input, False, weights[0][0])
        batch = input.size(batch_dim)
        if hx is not None:
            self._check_hidden(hx, batch, input)
        x = input.transpose(0, 1) if self.batch_first else input
        if lengths is not None:
            lengths = self._lengths_tensor(lengths, batch, x.size(0), x.device)
        y, (h_n, c_n) = self._run(x, hx, lengths, weights)
        if self.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y, h_n, c_n = y.squeeze(batch_dim), h_n.squeeze(1), c_n.squeeze(1)
        return y, (h_n, c_n)

    def _run(self, x: Tensor, hx, lengths: Tensor | None, weights: list[list[Tensor | None]]):
        """x [T,B,I] -> y [T,B,D*H], (h_n, c_n) [L*D,B,H], layer by layer; `weights` from
        _layer_weights. The op is called directly (not through ops.lstm_layer): at batch 1
        this module's Python is a large part of a call."""
        D, L = self.num_directions, self.num_layers
        onnx = _onnx.dynamo_export()
        # The TorchScript exporter traces: is_tracing() (0.1 us) spares the 1.2 us of
        # is_in_onnx_export() on every other call.
        if onnx or (torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()):
            if (error := self._weight_error(x)) is not None:
                raise RuntimeError(error)
            if self.proj_size > 0:
                _onnx.refuse_projection(type(self).__name__)
        h_n, c_n = [], []
        returns_activations = ops._returns_activations()
        for layer, w in enumerate(weights):
            # No hx: None, and the op starts from zeros of its own.
            if hx is None:
                h0 = c0 = None
            else:
                h0, c0 = hx if L == 1 else (hx[0][layer * D : (layer + 1) * D], hx[1][layer * D : (layer + 1) * D])
            if onnx:
                x, h, c = _onnx.lstm_layer(x, h0, c0, w, lengths)
            else:
                try:
                    x, h, c, *_ = _lstm_layer_forward(x, lengths, h0, c0, *w, returns_activations)
                except RuntimeError:
                    # The op names its own argument; the module names its parameter.
                    if (error := self._weight_error(x)) is not None:
                        raise RuntimeError(error) from None
                    raise
            h_n.append(h)
            c_n.append(c)
            if self.dropout > 0 and self.training and layer + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, training=True)
        if len(h_n) == 1:
            return x, (h_n[0], c_n[0])
        return x, (torch.cat(h_n), torch.cat(c_n))


class FusedBiLSTM(FusedLSTM):
    """FusedLSTM with bidirectional=True by default: both directions of every layer in
    one fused sweep. Stands in for nn.LSTM(..., bidirectional=True)."""

    _default_bidirectional = True


class FusedLSTMCell(_TorchNNCounterpart, nn.Module):
    """One LSTM step on the fused kernels; the arguments are nn.LSTMCell's.

    forward(input, hx=None) -> (h', c'); input [B,I] or [I] unbatched.
    Parameters weight_ih [4H,I], weight_hh [4H,H], bias_ih, bias_hh [4H], initialised
    as nn.LSTMCell does, so state_dicts move both ways.
    """

    _to_nn = "to_lstm_cell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @classmethod
    def from_cell(cls, cell: nn.LSTMCell) -> FusedLSTMCell:
        """A cell with `cell`'s configuration, device, dtype and weights."""
        if not isinstance(cell, nn.LSTMCell):
            raise TypeError(f"from_cell expects an nn.LSTMCell, got {type(cell).__name__}")
        w = cell.weight_ih
        new = cls(cell.input_size, cell.hidden_size, cell.bias, device=w.device, dtype=w.dtype)
        new.load_state_dict(cell.state_dict())
        return new

    def to_lstm_cell(self) -> nn.LSTMCell:
        """An nn.LSTMCell with this cell's configuration, device, dtype, mode and current
        weights (copies): the way back from from_cell."""
        w = self.weight_ih
        cell = nn.LSTMCell(self.input_size, self.hidden_size, self.bias, device=w.device, dtype=w.dtype)
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        _copy_weights(self, cell, names)
        return cell.train(self.training)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if isinstance(input, torch.fx.Proxy):
            return self._fx_leaf(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
            if len(hx) != 2:  # ATen's lstm_cell says the same
                raise RuntimeError("lstm_cell expects two hidden states")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros((input.size(0), self.hidden_size))
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        # nn.LSTMCell's own checks (ATen's check_rnn_cell_forward_*), same messages.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for k, t in enumerate(hx):
            if t.device != input.device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor at {input.device} "
                    f"and hidden tensor at {t.device}"
                )
            if input.size(0) != t.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size {t.size(0)}")
            if t.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{k} has inconsistent hidden_size: got {t.size(1)}, expected {self.hidden_size}"
                )
        if _onnx.dynamo_export():
            h, c = _onnx.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        else:
            bias = self.bias_ih + self.bias_hh if self.bias else None
            h, c = ops.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, bias)
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c
