"""The CPU buffer pool (csrc/cpu/buffer_pool.h): a training loop's large buffers are
reused from step to step, memory in use is never handed out twice, the limit holds and
the cache can be emptied."""

from __future__ import annotations

import torch

import birnn_ext
from birnn_ext import FusedBiLSTM
from helpers import run_python


def model_and_input():
    torch.manual_seed(0)
    return FusedBiLSTM(16, 64, num_layers=2), torch.randn(30, 20, 16)  # buffers of 300 KB and more


def train_step(m, x):
    y, _ = m(x)
    y.square().mean().backward()
    return y


def test_a_repeated_step_is_served_from_kept_blocks():
    m, x = model_and_input()
    train_step(m, x)
    train_step(m, x)
    before = birnn_ext.cpu_cache_stats()
    train_step(m, x)
    after = birnn_ext.cpu_cache_stats()
    assert after["hits"] > before["hits"]
    assert after["misses"] == before["misses"], "the same shapes again must not go to the system"
    assert 0 < after["cached_bytes"] <= after["limit_bytes"]


def test_memory_in_use_is_not_handed_out_again():
    m, x = model_and_input()
    kept = [train_step(m, x).detach() for _ in range(3)]  # outputs held while later steps run
    copies = [k.clone() for k in kept]
    for _ in range(3):
        train_step(m, x)
    for k, c in zip(kept, copies):
        assert torch.equal(k, c)
    assert len({k.data_ptr() for k in kept}) == 3


def test_pooled_outputs_are_ordinary_tensors():
    m, x = model_and_input()
    with torch.no_grad():
        y, _ = m(x)
    n = y.numel()
    y.resize_(2 * n)  # a resizable storage, as with nn.LSTM
    assert y.numel() == 2 * n
    assert y.untyped_storage().nbytes() >= 2 * n * 4


def test_empty_cpu_cache_returns_every_kept_block():
    m, x = model_and_input()
    train_step(m, x)
    kept = birnn_ext.cpu_cache_stats()["cached_bytes"]
    assert kept > 0
    assert birnn_ext.empty_cpu_cache() == kept
    assert birnn_ext.cpu_cache_stats()["cached_bytes"] == 0
    train_step(m, x)  # and the pool still works afterwards


def run_with_limit(limit: str):
    code = (
        "import torch, birnn_ext\n"
        "m = birnn_ext.FusedBiLSTM(16, 64, num_layers=2); x = torch.randn(30, 20, 16)\n"
        "for _ in range(3): m(x)[0].sum().backward()\n"
        "print(birnn_ext.cpu_cache_stats())\n"
    )
    return run_python(code, BIRNN_EXT_CPU_CACHE_MB=limit)


def test_the_limit_from_the_environment_holds():
    off = run_with_limit("0")
    assert off.returncode == 0, off.stderr
    stats = eval(off.stdout.strip().splitlines()[-1])
    assert stats == {"cached_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    small = run_with_limit("1")
    stats = eval(small.stdout.strip().splitlines()[-1])
    assert stats["limit_bytes"] == 1 << 20 and stats["cached_bytes"] <= 1 << 20 and stats["hits"] > 0


def test_a_bad_limit_is_refused_with_its_name():
    bad = run_with_limit("lots")
    assert bad.returncode != 0
    assert "BIRNN_EXT_CPU_CACHE_MB must be a whole number of megabytes >= 0, got 'lots'" in bad.stderr
