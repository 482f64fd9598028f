"""The model is built with PyTorch's SDPA attention, from scratch and from pretrained weights alike."""

from __future__ import annotations

from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2exp.model import build_model, padded_vocab


def model_cfg(init: str):
    return OmegaConf.create(
        {
            "init": init,
            "block_size": 16,
            "n_embd": 16,
            "n_layer": 1,
            "n_head": 2,
            "dropout": 0.0,
            "vocab_multiple": 1,
            "activation": "gelu_new",
        }
    )


def test_the_vocabulary_is_padded_to_the_multiple_for_scratch_models():
    assert [padded_vocab(v, 64) for v in (50257, 45659, 4096, 1)] == [50304, 45696, 4096, 64]
    assert padded_vocab(50257, 1) == 50257
    padded = OmegaConf.merge(model_cfg("scratch"), {"vocab_multiple": 64})
    assert build_model(padded, 300, 299).config.vocab_size == 320
    assert build_model(model_cfg("scratch"), 300, 299).config.vocab_size == 300


def test_a_scratch_model_runs_the_configured_activation():
    import torch

    fused = build_model(OmegaConf.merge(model_cfg("scratch"), {"activation": "gelu_pytorch_tanh"}), 64, 63)
    python_ops = build_model(model_cfg("scratch"), 64, 63)
    assert (fused.config.activation_function, python_ops.config.activation_function) == (
        "gelu_pytorch_tanh",
        "gelu_new",
    )
    python_ops.load_state_dict(fused.state_dict())
    x = torch.arange(16).reshape(1, 16) % 64
    with torch.no_grad():  # the same formula: equal up to float rounding
        torch.testing.assert_close(fused(x).logits, python_ops(x).logits, rtol=1e-5, atol=1e-5)


def test_a_scratch_model_uses_sdpa_attention():
    assert build_model(model_cfg("scratch"), 64, 63).config._attn_implementation == "sdpa"


def test_a_pretrained_model_saved_with_eager_attention_loads_with_sdpa(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64, attn_implementation="eager")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "pretrained")
    model = build_model(model_cfg(str(tmp_path / "pretrained")), 64, 63)
    assert model.config._attn_implementation == "sdpa"
