"""birnn_ext: fused LSTM kernels (C++ on the CPU, CUDA on the GPU) behind drop-in
replacements for torch.nn.LSTM and torch.nn.LSTMCell."""

from birnn_ext import ops
from birnn_ext.modules import FusedBiLSTM, FusedLSTM, FusedLSTMCell, to_torch_nn
from birnn_ext.ops import cpu_cache_stats, empty_cpu_cache

__all__ = ["FusedBiLSTM", "FusedLSTM", "FusedLSTMCell", "cpu_cache_stats", "empty_cpu_cache", "ops", "to_torch_nn"]
__version__ = "0.1.0"
