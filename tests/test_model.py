"""The model is built with PyTorch's SDPA attention (the causal mask left to the kernel), from scratch and
from pretrained weights alike."""

from __future__ import annotations

from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2exp.generate import _cache_of
from gpt2exp.model import ATTENTION, build_model, causal_mask_or_none, padded_vocab


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


def test_a_scratch_model_uses_gpt2exp_sdpa_attention():
    assert build_model(model_cfg("scratch"), 64, 63).config._attn_implementation == ATTENTION == "gpt2exp_sdpa"


def test_a_pretrained_model_saved_with_eager_attention_loads_with_gpt2exp_sdpa(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64, attn_implementation="eager")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "pretrained")
    model = build_model(model_cfg(str(tmp_path / "pretrained")), 64, 63)
    assert model.config._attn_implementation == ATTENTION


def test_plain_transformers_loads_a_saved_model_with_its_own_sdpa(tmp_path):
    build_model(model_cfg("scratch"), 64, 63).save_pretrained(tmp_path / "saved")
    assert "gpt2exp" not in (tmp_path / "saved" / "config.json").read_text()
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def sdpa_calls_when_compiled(model, inputs) -> list[tuple[bool, bool]]:
    """(a mask was passed, is_causal) of each SDPA call in the graph torch.compile traces for `model`."""
    import torch

    calls = []

    def inspect(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if "scaled_dot_product_attention" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append((mask is not None, bool(node.kwargs.get("is_causal", False))))
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=inspect, fullgraph=True)(input_ids=inputs, use_cache=False)
    return calls


def test_a_compiled_model_leaves_the_causal_mask_to_the_sdpa_kernel():
    """transformers' own SDPA mask materialises a (batch, 1, T, T) mask while torch.compile traces, which
    rules out the flash kernel; gpt2exp's passes none and asks SDPA for `is_causal` in every layer."""
    import torch

    cfg = OmegaConf.merge(model_cfg("scratch"), {"n_layer": 2})
    x = torch.arange(32).reshape(2, 16) % 64
    assert sdpa_calls_when_compiled(build_model(cfg, 64, 63), x) == [(False, True), (False, True)]


def test_gpt2exp_sdpa_computes_what_transformers_sdpa_does():
    """Equal logits without a mask, with a padding mask, and one token at a time over a cache."""
    import torch

    ours = build_model(model_cfg("scratch"), 64, 63).eval()
    theirs = GPT2LMHeadModel(ours.config.__class__.from_dict(ours.config.to_dict(), attn_implementation="sdpa"))
    theirs.load_state_dict(ours.state_dict())
    assert theirs.config._attn_implementation == "sdpa"
    x = torch.arange(24).reshape(2, 12) % 64
    padding = torch.ones_like(x)
    padding[1, :4] = 0
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)
        assert torch.equal(ours(x, attention_mask=padding).logits, theirs(x, attention_mask=padding).logits)
        prefix, last = x[:, :11], x[:, 11:]  # the prefix cached, then its last token over the cache
        step = {m: m(last, _cache_of(m(prefix, use_cache=True)), use_cache=True).logits for m in (ours, theirs)}
        assert torch.equal(step[ours], step[theirs])
        torch.testing.assert_close(step[ours][:, -1], ours(x).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_while_compiling_the_causal_mask_is_left_out_only_for_an_unpadded_window_over_itself(monkeypatch):
    import torch

    def transformers_mask(**kwargs):
        return "mask"

    def mask(**kwargs):
        return causal_mask_or_none(transformers_mask, **{"attention_mask": None, "kv_offset": 0, **kwargs})

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mask(q_length=16, kv_length=16) is None
    assert mask(q_length=16, kv_length=16, q_offset=0, local_size=None) is None
    assert mask(q_length=16, kv_length=16, attention_mask="padding") == "mask"
    assert mask(q_length=1, kv_length=17) == "mask"  # a token over a cache: transformers decides
    assert mask(q_length=4, kv_length=16) == "mask"
    assert mask(q_length=16, kv_length=16, kv_offset=3) == "mask"
    assert mask(q_length=16, kv_length=16, q_offset=torch.tensor(0)) == "mask"  # a static cache
    assert mask(q_length=16, kv_length=16, local_size=8) == "mask"
    assert mask(q_length=16, kv_length=16, config=GPT2Config(is_causal=False)) == "mask"
    # transformers 5.0 passes the queries' positions instead of their count
    assert mask(cache_position=torch.arange(16), kv_length=16) is None
    assert mask(cache_position=torch.arange(12, 16), kv_length=16) == "mask"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert mask(q_length=16, kv_length=16) == "mask"  # run eagerly, transformers decides


def test_packed_sequences_run_eagerly_attend_within_their_own_sequence():
    """Position ids that restart mark packed sequences: transformers masks across them, and so does
    gpt2exp's attention when not compiling (gpt2exp itself never packs)."""
    import torch

    ours = build_model(model_cfg("scratch"), 64, 63).eval()
    theirs = GPT2LMHeadModel(ours.config.__class__.from_dict(ours.config.to_dict(), attn_implementation="sdpa"))
    theirs.load_state_dict(ours.state_dict())
    x, packed = torch.arange(8).reshape(1, 8), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        logits = ours(x, position_ids=packed, use_cache=False).logits
        assert torch.equal(logits, theirs(x, position_ids=packed, use_cache=False).logits)
        second_alone = ours(x[:, 4:], use_cache=False).logits
    torch.testing.assert_close(logits[:, 4:], second_alone, rtol=1e-5, atol=1e-5)  # it never saw the first
