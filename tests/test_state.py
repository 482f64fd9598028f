"""The stateful protocol: every object's state round-trips, and every saved field is restored.

For each stateful object the trainer checkpoints (counters, RNG, LR schedule, sampler, optimizer and
grad scaler wrapped in TensorState): state_dict -> load into a fresh object -> state_dict is equal.
Then over a real checkpoint: every key of trainer_state.json restores an object or is one of the
documented metadata keys, and a trainer_state.json written before the legacy fields were dropped
still loads.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2exp.checkpoint import IDENTITY_KEYS, METADATA_KEYS, CheckpointManager
from gpt2exp.config import CheckpointConfig, SchedulerConfig
from gpt2exp.data import BatchSampler
from gpt2exp.optim import LRSchedule
from gpt2exp.sampler import sampled_digest
from gpt2exp.state import RngState, TensorState, TrainerCounters, group_by_kind

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 16, "vocab_size": 64, "bos_token_id": 63}
TOKENS = (np.arange(2048) * 7 % 64).astype(np.uint16)
CONF = Path(__file__).resolve().parent.parent / "conf"
JSON_KEYS = {"schedule", "sampler", "trainer", "rng"}
TENSOR_KEYS = {"optimizer", "scaler"}


def schedule_cfg():
    return OmegaConf.structured(SchedulerConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1, decay_steps=100))


def checkpoint_cfg():
    defaults = OmegaConf.load(CONF / "checkpoint" / "default.yaml")
    return OmegaConf.merge(OmegaConf.structured(CheckpointConfig), defaults, {"keep_last": 100, "keep_best": 0})


def full_stateful(seed: int) -> dict:
    """The set the trainer checkpoints, fresh: nothing trained, nothing drawn."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {
        "model": model,
        "optimizer": TensorState(optimizer),
        "scaler": TensorState(torch.amp.GradScaler("cpu", init_scale=2.0 ** (4 + seed))),
        "schedule": LRSchedule(optimizer, 1e-2, schedule_cfg()),
        "sampler": BatchSampler(TOKENS, block_size=8, batch_size=2, seed=seed),
        "trainer": TrainerCounters(),
        "rng": RngState(),
    }


def trained_stateful(seed: int = 0, steps: int = 130) -> dict:
    """A set whose every field is away from its fresh value: the sampler in its second epoch, and so on."""
    stateful = full_stateful(seed)
    model, counters = stateful["model"], stateful["trainer"]
    for _ in range(steps):
        stateful["schedule"].apply(counters.step)
        x, y = stateful["sampler"].next_batch()
        counters.step += 1
        counters.tokens_seen += x.size
    model(input_ids=torch.from_numpy(x), labels=torch.from_numpy(y)).loss.backward()
    stateful["optimizer"].obj.step()
    counters.last_eval = {"val/loss": 2.5, "step": counters.step}
    counters.wandb_id = "run-abc"
    counters.best_val_loss, counters.evals_without_improvement = 2.25, 2  # early stopping's count
    return stateful


def as_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def assert_tensor_state_equal(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            assert_tensor_state_equal(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_tensor_state_equal(a, e)
    else:
        assert actual == expected


# -- the declarations ----------------------------------------------------------------------------


def test_every_object_declares_where_its_state_goes():
    stateful = full_stateful(0)
    stateful["extra"] = None  # a None entry is left out
    groups = group_by_kind({k: v for k, v in stateful.items() if k != "model"})
    assert set(groups["json"]) == JSON_KEYS and set(groups["tensors"]) == TENSOR_KEYS
    assert groups["tensors"]["optimizer"] is stateful["optimizer"]


@pytest.mark.parametrize("kind", [None, "yaml"])
def test_an_undeclared_or_unknown_kind_is_a_type_error_naming_the_key(kind):
    optimizer = full_stateful(0)["optimizer"].obj
    if kind is not None:
        optimizer.state_kind = kind
    with pytest.raises(TypeError, match=f"stateful entry 'optimizer' \\(AdamW\\) declares state_kind={kind!r}"):
        group_by_kind({"optimizer": optimizer})


# -- each object: state_dict -> load into a fresh one -> equal state_dict ------------------------


def test_counters_round_trip():
    src = trained_stateful()["trainer"]
    dst = TrainerCounters()
    dst.load_state_dict(as_json(src.state_dict()))
    expected = {
        "step": 130,
        "tokens_seen": 2080,
        "last_eval": {"val/loss": 2.5, "step": 130},
        "wandb_id": "run-abc",
        "best_val_loss": 2.25,
        "evals_without_improvement": 2,
    }
    assert dst.state_dict() == src.state_dict() == expected


def test_counters_drop_the_legacy_fields_and_refuse_unknown_ones():
    """A checkpoint from before early stopping (no best_val_loss, evals_without_improvement) loads with
    their defaults: no best yet, no evaluation without improvement."""
    counters = TrainerCounters()
    counters.load_state_dict({"step": 3, "best_metric": 1.5, "last_logged_step": 3})
    assert counters.state_dict() == {
        "step": 3,
        "tokens_seen": 0,
        "last_eval": {},
        "wandb_id": None,
        "best_val_loss": None,
        "evals_without_improvement": 0,
    }
    with pytest.raises(ValueError, match=r"trainer counters have no field \['epochs'\]"):
        counters.load_state_dict({"step": 9, "epochs": 2})
    assert counters.step == 3  # refused whole


def test_rng_round_trip_restores_the_next_draws():
    saved = RngState().state_dict()
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert RngState().state_dict() != saved
    RngState().load_state_dict(as_json(saved))
    assert RngState().state_dict() == saved
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])


def test_schedule_round_trip_saves_only_what_it_restores():
    src = trained_stateful()["schedule"]
    dst = full_stateful(1)["schedule"]
    dst.load_state_dict(as_json(src.state_dict()))
    assert dst.state_dict() == src.state_dict() == {"last_step": 129}


def test_schedule_drops_the_legacy_fields_and_refuses_unknown_ones():
    schedule = full_stateful(0)["schedule"]
    schedule.load_state_dict({"last_step": 41, "peak_lr": 0.5, "decay_steps": 7})
    assert schedule.state_dict() == {"last_step": 41}
    assert schedule.peak_lr == 1e-2 and schedule.cfg.decay_steps == 100  # the config of record's, not the file's
    with pytest.raises(ValueError, match=r"the LR schedule has no state \['warmup'\]"):
        schedule.load_state_dict({"last_step": 50, "warmup": 3})
    assert schedule.last_step == 41


def test_sampler_round_trip():
    src = trained_stateful()["sampler"]
    dst = BatchSampler(TOKENS, block_size=8, batch_size=2, seed=1)
    dst.next_batch()
    dst.load_state_dict(as_json(src.state_dict()))
    identity = {"windows": 255, "tokens": 2048, "digest": sampled_digest(TOKENS)}
    assert dst.state_dict() == src.state_dict() == {"seed": 0, "epoch": 1, "offset": 5, **identity}


@pytest.mark.parametrize("key", sorted(TENSOR_KEYS))
def test_tensor_state_round_trip(key):
    src = trained_stateful()[key]
    if key == "scaler":
        src.obj.scale(torch.ones(1))  # a scaler in use holds its scale as a tensor
    dst = full_stateful(1)[key]
    dst.load_state_dict(src.state_dict())
    assert_tensor_state_equal(dst.state_dict(), src.state_dict())
    if key == "optimizer":
        assert len(dst.state_dict()["state"]) == 16
    else:
        assert dst.state_dict()["scale"] == 16.0


# -- over a real checkpoint ----------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    identity = {"config_sha256": "c0ffee", "code_version": "test"}
    manager = CheckpointManager(checkpoint_cfg(), tmp_path / "run", identity=identity)
    yield manager
    manager.close()


# fields saved to be compared, not restored: a checkpoint whose value differs from the run's own is refused
CHECKED_FIELDS = {("sampler", "windows"), ("sampler", "tokens"), ("sampler", "digest")}  # what the data position is in


def test_every_key_of_trainer_state_json_is_restored_or_metadata(manager):
    src = trained_stateful()
    path = manager.save(130, src, {"val/loss": 2.5}, force=True).wait()
    saved = json.loads((path / "trainer_state.json").read_text())
    saved_tensors = torch.load(path / "optimizer.pt", weights_only=True)
    assert set(saved) == JSON_KEYS | set(METADATA_KEYS) and set(saved_tensors) == TENSOR_KEYS
    assert {k: saved[k] for k in IDENTITY_KEYS} == {"config_sha256": "c0ffee", "code_version": "test"}
    assert saved["step"] == 130 and saved["metrics"] == {"val/loss": 2.5}

    random.random(), np.random.rand()  # the RNG moves on after the save
    dst = full_stateful(1)
    before = {key: as_json(dst[key].state_dict()) for key in JSON_KEYS}
    for key in JSON_KEYS:  # every saved field differs in the fresh objects (but those checked against them) ...
        for field, value in saved[key].items():
            if (key, field) in CHECKED_FIELDS:
                assert before[key][field] == value, (key, field)
            else:
                assert before[key][field] != value, (key, field)

    manager.load(dst)

    for key in saved:  # ... and after the load every one is restored, or is metadata
        if key in METADATA_KEYS:
            continue
        assert as_json(dst[key].state_dict()) == saved[key], key
    for key in TENSOR_KEYS:
        assert_tensor_state_equal(dst[key].state_dict(), saved_tensors[key])
        assert_tensor_state_equal(dst[key].state_dict(), src[key].state_dict())


def test_a_trainer_state_json_from_before_still_loads(manager):
    """Checkpoints written before saved only restored fields carry best_metric, last_logged_step,
    peak_lr and decay_steps; they load, and those values are dropped."""
    src = trained_stateful()
    path = manager.save(130, src, {}, force=True).wait()
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert "best_metric" not in state["trainer"] and "peak_lr" not in state["schedule"]  # no longer written
    state["trainer"].update(best_metric=2.5, last_logged_step=130)
    state["schedule"].update(peak_lr=0.5, decay_steps=100)
    state_file.write_text(json.dumps(state))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {
        "size": state_file.stat().st_size,
        "sha256": hashlib.sha256(state_file.read_bytes()).hexdigest(),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))

    dst = full_stateful(1)
    loaded = manager.load(dst, path)
    assert loaded.step == 130
    assert dst["trainer"].state_dict() == src["trainer"].state_dict()
    assert dst["schedule"].state_dict() == {"last_step": 129} and dst["schedule"].peak_lr == 1e-2
