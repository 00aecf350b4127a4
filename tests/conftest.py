"""Test-wide settings."""

import torch

# On Ampere and later GPUs cuDNN runs float32 LSTMs in TF32 (10-bit mantissa) unless told
# otherwise, which moves nn.LSTM's float32 results by about 1e-4: far outside the float32
# tolerance, which is set for IEEE float32 products on both sides. The references are
# computed in full float32. The fused path's products follow cudnn.allow_tf32 too, as
# nn.LSTM's do (test_lstm_parity.py::test_cuda_float32_follows_cudnn_allow_tf32).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
