"""birnn_ext: fused LSTM kernels (C++ on the CPU, CUDA on the GPU) behind drop-in
replacements for torch.nn.LSTM and torch.nn.LSTMCell."""

from birnn_ext import ops
from birnn_ext.modules import FusedBiLSTM, FusedLSTM, FusedLSTMCell

__all__ = ["FusedBiLSTM", "FusedLSTM", "FusedLSTMCell", "ops"]
__version__ = "0.1.0"
