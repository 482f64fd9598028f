"""Hub names and local paths for models and tokenizers: clear errors, never a long retry loop."""

from __future__ import annotations

import pytest

from gpt2exp import hub
from gpt2exp.errors import UserError


def test_hf_hub_offline_counts_as_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False


def test_an_unreachable_hub_gives_one_clear_error_without_asking_it(monkeypatch):
    from transformers import GPT2LMHeadModel

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    calls = []

    def loader(name, **kwargs):
        calls.append(kwargs)
        return GPT2LMHeadModel.from_pretrained(name, **kwargs)

    with pytest.raises(UserError) as error:
        hub.load_pretrained(loader, "someone/no-such-model", what="model")
    assert str(error.value).startswith(
        "model 'someone/no-such-model' is not a local path, not in the local HF cache, and the Hugging Face hub "
        "cannot be reached"
    )
    assert calls == [{"local_files_only": True}]  # the cache was asked, the network never


def test_a_missing_local_path_says_so(tmp_path):
    with pytest.raises(UserError, match=f"model path not found: {tmp_path}/nope; check the path"):
        hub.load_pretrained(lambda name: name, f"{tmp_path}/nope", what="model")


def test_a_local_directory_loads_directly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=8, vocab_size=16)).save_pretrained(tmp_path)
    model = hub.load_pretrained(GPT2LMHeadModel.from_pretrained, str(tmp_path), what="model")
    assert model.config.n_embd == 8


def test_a_cached_hub_models_config_is_read_before_the_run_starts(tmp_path, monkeypatch):
    """model.init=org/name found in the local HF cache: its config.json tells the architecture at once;
    not cached and offline, the same line load_pretrained gives."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub.saved_config("org/tiny", "model") == {"model_type": "llama"}
    with pytest.raises(UserError) as refused:
        hub.saved_config("org/other", "model")
    assert str(refused.value) == (
        "model 'org/other' is not a local path, not in the local HF cache, and the Hugging Face hub cannot be "
        "reached (offline); pass a local path saved with save_pretrained, or go online"
    )


def test_a_path_that_is_no_hub_name_either_is_a_path_not_found():
    """a/b/c (a mistyped relative checkpoint path) is no valid repo id: the hub client raises on it."""
    with pytest.raises(UserError) as refused:
        hub.saved_config("outputs/a/b/c", "model")
    assert str(refused.value) == "model path not found: outputs/a/b/c; check the path"
