"""GPT2LMHeadModel from the `model` config: from scratch, or pretrained weights by name or path."""

from __future__ import annotations

import functools
import logging
from typing import Any

from gpt2exp.errors import UserError
from gpt2exp.hub import load_pretrained, saved_config

log = logging.getLogger(__name__)

# PyTorch's scaled_dot_product_attention (transformers' own SDPA forward) with the causal mask left to the
# kernel: see register_attention
ATTENTION = "gpt2exp_sdpa"


def causal_mask_or_none(sdpa_mask, **kwargs):
    """While torch.compile traces: no mask for a window that attends only to itself without padding, so
    SDPA runs with `is_causal` and may pick the flash kernel. Everything else (run eagerly, padding, a
    cache, an offset) gets transformers' own SDPA mask.

    transformers skips the same mask when run eagerly, but not while compiling: it cannot read the
    position ids to rule out packed sequences, so a compiled GPT-2 attended through a materialised
    (batch, 1, T, T) mask, which rules the flash kernel out. gpt2exp never packs sequences: its windows
    are whole, at positions 0..T-1. Run eagerly, transformers still sees packed position ids.
    """
    import torch

    # transformers 5.0 passes the queries' positions, later versions their count and first position
    q_length = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
    q_offset = kwargs.get("q_offset", 0)
    plain_causal = (
        torch.compiler.is_compiling()
        and getattr(kwargs.get("config"), "is_causal", True)  # not a decoder run bidirectionally
        and kwargs.get("attention_mask") is None
        and kwargs.get("local_size") is None
        and kwargs.get("kv_offset", 0) == 0
        and isinstance(q_offset, int)  # a static cache's offset is a tensor
        and q_offset == 0
        and q_length == kwargs["kv_length"]
    )
    return None if plain_causal else sdpa_mask(**kwargs)


@functools.cache
def register_attention() -> None:
    """Make ATTENTION known to transformers: its SDPA forward, and `causal_mask_or_none` for the mask.
    The name is not written to a checkpoint's config.json: plain transformers loads the checkpoints."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(ATTENTION, functools.partial(causal_mask_or_none, sdpa_mask))


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

    register_attention()
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
    register_attention()
    if cfg.init == "scratch":
        return GPT2LMHeadModel(scratch_config(cfg, vocab_size, eos_id))
    import torch

    dropout = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    # fp32 whatever dtype it was saved in (transformers keeps it by default): trainer.precision sets the
    # compute precision, and bf16 weights and AdamW moments would round most fine-tuning updates away
    model, loading = load_pretrained(
        GPT2LMHeadModel.from_pretrained,
        cfg.init,
        what="model",
        attn_implementation=ATTENTION,
        dtype=torch.float32,
        output_loading_info=True,
        **dropout,
    )
    refuse_partly_loaded(cfg.init, model.config, loading)
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


def check_init(init: str) -> None:
    """Before any data is prepared (hours, at scale): model.init names a GPT-2 this process can load."""
    config = saved_config(init, "model")
    if config is not None:
        refuse_other_architecture(init, config.get("model_type"))


def refuse_other_architecture(init: str, model_type: str | None) -> None:
    if model_type != "gpt2":
        raise UserError(
            f"model.init={init} is a {model_type} model, not GPT-2; pass a GPT-2 checkpoint "
            "(a hub name such as gpt2, or a dir saved with save_pretrained)"
        )


def refuse_partly_loaded(init: str, config: Any, loading: dict) -> None:
    """transformers initialises at random what a checkpoint lacks (another architecture's, a layer
    removed) and only says so in a notice: a run would silently train from partly random weights."""
    refuse_other_architecture(init, config.model_type)
    missing = sorted(loading["missing_keys"])
    if missing:
        raise UserError(
            f"model.init={init} lacks {len(missing)} of GPT-2's weights ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), which would start at random; pass a whole GPT-2 checkpoint"
        )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
