"""GPT2LMHeadModel from the `model` config: from scratch, or pretrained weights by name or path."""

from __future__ import annotations

import logging
from typing import Any

from gpt2exp.errors import UserError
from gpt2exp.hub import load_pretrained

log = logging.getLogger(__name__)

ATTENTION = "sdpa"  # PyTorch's scaled_dot_product_attention: flash / memory-efficient kernels where they apply


def quiet_transformers() -> None:
    """Hide transformers notices a user cannot act on (e.g. the per-model `loss_type=None` line)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`: matmul shapes the tensor cores run at full
    speed (nanoGPT pads GPT-2's 50257 to 50304). No token id reaches the extra rows."""
    return -(-vocab_size // multiple) * multiple


def scratch_config(cfg: Any, vocab_size: int, eos_id: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=padded_vocab(vocab_size, cfg.vocab_multiple),
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        activation_function=str(cfg.activation),
        attn_implementation=ATTENTION,
    )


def build_model(cfg: Any, vocab_size: int, eos_id: int):
    """The model for `cfg` (the `model` section) and a tokenizer of `vocab_size` tokens."""
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    if cfg.init == "scratch":
        return GPT2LMHeadModel(scratch_config(cfg, vocab_size, eos_id))
    dropout = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    model = load_pretrained(
        GPT2LMHeadModel.from_pretrained, cfg.init, what="model", attn_implementation=ATTENTION, **dropout
    )
    supported = model.config.n_positions
    if cfg.block_size > supported:
        raise UserError(
            f"model.block_size={cfg.block_size} is larger than {cfg.init} supports ({supported}); "
            f"set model.block_size={supported} or less"
        )
    if vocab_size > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {vocab_size} tokens but {cfg.init} embeds only {model.config.vocab_size}; "
            f"use the model's own tokenizer: data.tokenizer.name={cfg.init}"
        )
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
