"""Model FLOPs utilisation: the FLOPs per token of GPT-2 and the peak of known GPUs."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2exp import mfu


def test_gpt2_124m_costs_6n_plus_12lhqt_flops_per_token():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # 124,439,808 parameters, 1024 x 768 of them position embeddings
    n = 124_439_808 - 1024 * 768
    assert mfu.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024 == 855_166_464


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_the_peak_comes_from_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert mfu.peak_flops(torch.device("cuda", 0)) == peak


def test_no_mfu_on_a_cpu():
    assert mfu.peak_flops(torch.device("cpu")) is None
    assert mfu.mfu(10_000.0, 1e9, None) is None
    assert mfu.mfu(400_000.0, 855_166_464, 989.5e12) == pytest.approx(0.3457, abs=1e-4)
