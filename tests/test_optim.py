"""The LR schedule as a pure function of the step, and the weight-decay parameter groups."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gpt2exp.config import SchedulerConfig
from gpt2exp.optim import LRSchedule, build_optimizer, lr_at, param_groups

CONF = Path(__file__).resolve().parent.parent / "conf"


def schedule(name: str, warmup: int = 10, decay: int = 110, min_ratio: float = 0.1):
    return OmegaConf.structured(
        SchedulerConfig(name=name, warmup_steps=warmup, decay_steps=decay, min_lr_ratio=min_ratio)
    )


def test_cosine_warmup_peak_middle_and_end():
    cfg = schedule("cosine")
    assert lr_at(0, 1.0, cfg) == pytest.approx(0.1)  # first warmup step: 1/10 of the peak
    assert lr_at(4, 1.0, cfg) == pytest.approx(0.5)
    assert lr_at(9, 1.0, cfg) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, 1.0, cfg) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(60, 1.0, cfg) == pytest.approx(0.55)  # half way: (peak + min) / 2
    assert lr_at(110, 1.0, cfg) == pytest.approx(0.1)  # the horizon: min_lr_ratio * peak
    assert lr_at(5000, 1.0, cfg) == pytest.approx(0.1)  # beyond it: flat at the final LR


def test_linear_decays_in_a_straight_line():
    cfg = schedule("linear", warmup=0, decay=100, min_ratio=0.0)
    assert [lr_at(s, 2.0, cfg) for s in (0, 25, 50, 100, 150)] == pytest.approx([2.0, 1.5, 1.0, 0.0, 0.0])


def test_constant_holds_the_peak_after_warmup():
    cfg = schedule("constant", warmup=4)
    assert [lr_at(s, 1.0, cfg) for s in (0, 3, 4, 1000)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_a_horizon_within_the_warmup_holds_the_lr_its_last_step_had(name):
    """A 20-step run with 30 warm-up steps, raised on resume: no more warm-up, no drop to the final LR."""
    cfg = schedule(name, warmup=30, decay=20)
    assert [lr_at(s, 1.0, cfg) for s in (0, 19, 20, 29, 30, 5000)] == pytest.approx([1 / 30] + [20 / 30] * 5)
    constant = schedule("constant", warmup=30, decay=20)  # no horizon: the warm-up goes on to the peak
    assert [lr_at(s, 1.0, constant) for s in (19, 20, 29, 30)] == pytest.approx([20 / 30, 21 / 30, 1.0, 1.0])


def test_cosine_is_monotone_after_warmup():
    cfg = schedule("cosine")
    lrs = [lr_at(s, 1.0, cfg) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(math.isfinite(x) for x in lrs)


def test_lr_schedule_applies_to_every_group_and_round_trips(tiny_model):
    import torch

    optimizer = torch.optim.AdamW(param_groups(tiny_model, 0.1), lr=1.0)
    sched = LRSchedule(optimizer, 1.0, schedule("cosine"))
    assert sched.apply(4) == pytest.approx(0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.5])
    assert sched.state_dict() == {"last_step": 4}  # peak LR and horizon come from the config of record
    other = LRSchedule(optimizer, 1.0, schedule("cosine"))
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 4


@pytest.fixture
def tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8, vocab_size=32))


def test_weight_decay_groups_hold_exactly_the_2d_weights(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.1)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == sorted(
        ["transformer.wte.weight", "transformer.wpe.weight"]
        + [
            f"transformer.h.{i}.{m}.weight"
            for i in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ]
    )
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith(".bias") or ".ln_" in n for n in not_decayed)
    assert "transformer.ln_f.weight" in not_decayed and "transformer.h.0.ln_1.bias" in not_decayed
    # every parameter exactly once (lm_head.weight is tied to wte and not listed twice)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tiny_model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_fused_adamw_by_default_on_cpu_and_off_when_asked(tiny_model):
    from gpt2exp.config import OptimizerConfig

    adamw = OmegaConf.merge(OmegaConf.structured(OptimizerConfig), OmegaConf.load(CONF / "optimizer" / "adamw.yaml"))
    optimizer = build_optimizer(adamw, tiny_model, "cpu")
    assert optimizer.defaults["fused"] is True
    unfused = build_optimizer(OmegaConf.merge(adamw, {"fused": False}), tiny_model, "cpu")
    assert not unfused.defaults["fused"]
