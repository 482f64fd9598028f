"""Model FLOPs utilisation: the share of the device's peak bf16 FLOPs that training turns into model FLOPs.

Per token, a GPT-2 forward and backward costs 6·N + 12·L·H·Q·T FLOPs (PaLM's appendix B, as
nanoGPT counts it): N parameters without the position embeddings, L layers, H heads of Q
dimensions, T tokens of context. The peak is the dense bf16 tensor-core figure of the GPU's data
sheet; on a CPU, or a GPU not in the table, there is no MFU.
"""

from __future__ import annotations

from typing import Any

# dense bf16 peak FLOP/s by the device name CUDA reports; the first matching entry wins
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989.5e12),
    ("GH200", 989.5e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.5e12),  # SXM
    ("H800", 989.5e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def flops_per_token(model: Any, context: int) -> float:
    """6·N + 12·L·H·Q·T for an HF GPT-2 trained on windows of `context` tokens."""
    c = model.config
    params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    head_dim = c.n_embd // c.n_head
    return 6 * params + 12 * c.n_layer * c.n_head * head_dim * context


def peak_flops(device: Any) -> float | None:
    """The dense bf16 peak of `device` (a torch.device), or None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s * per_token / peak
