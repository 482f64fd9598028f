"""Every config option composes and builds; bad values fail at compose time naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gpt2exp.composing import compose as compose_config
from gpt2exp.errors import UserError
from gpt2exp.model import scratch_config
from gpt2exp.optim import build_optimizer, lr_at
from tests.conftest import CONF_DIR

# published GPT-2 sizes with the 50257-token vocabulary (tied embeddings)
GPT2_PARAMS = {
    "gpt2_124m": 124_439_808,
    "gpt2_355m": 354_823_168,
    "gpt2_774m": 774_030_080,
    "gpt2_1558m": 1_557_611_200,
}


def refusal(compose, *overrides: str) -> str:
    """The one-line UserError that composing `overrides` gives."""
    with pytest.raises(UserError) as refused:
        compose(list(overrides))
    return str(refused.value)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_groups_have_the_contracted_options():
    assert options("model") == ["gpt2_124m", "gpt2_1558m", "gpt2_355m", "gpt2_774m", "gpt2_mini", "gpt2_tiny"]
    assert options("optimizer") == ["adamw", "sgd"]
    assert options("scheduler") == ["constant", "cosine", "linear"]
    assert options("data") == ["fineweb_edu", "hf_dataset", "openwebtext", "shakespeare", "text_files"]
    assert options("checkpoint") == ["default"]
    assert options("logger") == ["none", "tensorboard", "wandb", "wandb_tensorboard"]
    assert {"shakespeare_tiny", "shakespeare_small", "gpt2_124m", "finetune_gpt2"} <= set(options("experiment"))


@pytest.mark.parametrize("name", options("model"))
def test_each_model_composes_and_builds(compose, name):
    from transformers import GPT2LMHeadModel

    cfg = compose([f"model={name}"])
    exact = compose([f"model={name}", "model.vocab_multiple=1"])
    with torch.device("meta"):  # full size without allocating memory
        model = GPT2LMHeadModel(scratch_config(cfg.model, 50257, 0))
        unpadded = GPT2LMHeadModel(scratch_config(exact.model, 50257, 0))
    n_params = sum(p.numel() for p in model.parameters())
    assert (model.config.vocab_size, unpadded.config.vocab_size) == (50304, 50257)  # nanoGPT's padding
    if name in GPT2_PARAMS:
        assert sum(p.numel() for p in unpadded.parameters()) == GPT2_PARAMS[name]
        assert n_params == GPT2_PARAMS[name] + 47 * cfg.model.n_embd
    assert model.config.n_positions == cfg.model.block_size


@pytest.mark.parametrize("name", options("optimizer"))
def test_each_optimizer_composes_and_builds(compose, name):
    from transformers import GPT2LMHeadModel

    cfg = compose([f"optimizer={name}"])
    model = GPT2LMHeadModel(scratch_config(compose().model, 64, 0))
    optimizer = build_optimizer(cfg.optimizer, model, "cpu")
    assert type(optimizer).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[name]
    assert optimizer.param_groups[0]["weight_decay"] == cfg.optimizer.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", options("scheduler"))
def test_each_scheduler_composes_and_gives_finite_lrs(compose, name):
    cfg = compose([f"scheduler={name}", "scheduler.decay_steps=100"])
    lrs = [lr_at(step, 1.0, cfg.scheduler) for step in range(120)]
    assert all(0.0 <= lr <= 1.0 for lr in lrs)


@pytest.mark.parametrize(
    "overrides",
    [["data=shakespeare"], ["data=text_files", "data.files=[a.txt]"], ["data=hf_dataset", "data.dataset=some/set"]],
)
def test_each_data_source_composes(compose, overrides):
    cfg = compose(overrides)
    assert cfg.data.source == overrides[0].split("=")[1]
    assert cfg.data.tokenizer.name == "bpe"


@pytest.mark.parametrize("name", options("logger"))
def test_each_logger_composes(compose, name):
    assert compose([f"logger={name}"]).logger.backend == name


@pytest.mark.parametrize("name", options("experiment"))
def test_each_experiment_composes(compose, name):
    cfg = compose([f"+experiment={name}"])
    expected_model = {"shakespeare_tiny": 4, "shakespeare_small": 6, "gpt2_124m": 12, "finetune_gpt2": 12}
    expected_model |= {"gpt2_124m_fineweb": 12, "gpt2_124m_openwebtext": 12}
    assert cfg.model.n_layer == expected_model[name]


def test_gpt2_124m_experiment_uses_the_gpu_settings(compose):
    cfg = compose(["+experiment=gpt2_124m"])
    assert (cfg.trainer.precision, cfg.trainer.compile, cfg.model.n_embd) == ("bf16", True, 768)


@pytest.mark.parametrize("preset", ["gpt2_124m_fineweb", "gpt2_124m_openwebtext"])
def test_a_group_chosen_after_a_preset_replaces_the_presets_choice_whole(compose, preset):
    """A preset's own values for its data set, optimizer and scheduler would otherwise stay: the scheduler's
    name (cosine trained under scheduler=constant), or a hub name refused beside data=text_files."""
    cfg = compose([f"+experiment={preset}"])
    hub = {"fineweb_edu": "HuggingFaceFW/fineweb-edu", "openwebtext": "Skylion007/openwebtext"}
    assert (cfg.data.source, cfg.data.dataset, cfg.data.text_column) == ("hf_dataset", hub[preset_data(preset)], "text")
    assert (cfg.scheduler.name, cfg.optimizer.name, list(cfg.optimizer.betas)) == ("cosine", "adamw", [0.9, 0.95])
    cfg = compose([f"+experiment={preset}", "scheduler=constant", "optimizer=sgd", "data=text_files", "data.files=[a]"])
    assert (cfg.scheduler.name, cfg.optimizer.name, cfg.optimizer.betas) == ("constant", "sgd", None)
    assert (cfg.data.source, cfg.data.dataset, list(cfg.data.files)) == ("text_files", None, ["a"])
    assert (cfg.optimizer.lr, cfg.scheduler.min_lr_ratio, cfg.data.tokenizer.name) == (
        6e-4,
        0.1,
        "gpt2",
    )  # the rest holds


def preset_data(preset: str) -> str:
    return {"gpt2_124m_fineweb": "fineweb_edu", "gpt2_124m_openwebtext": "openwebtext"}[preset]


def test_a_wrong_type_on_the_command_line_names_the_key(compose):
    with pytest.raises(UserError, match="optimizer.lr"):
        compose(["optimizer.lr=abc"])


def test_a_misspelled_key_names_the_key(compose):
    with pytest.raises(UserError, match="optimizer.lrr"):
        compose(["optimizer.lrr=0.1"])


def test_a_wrong_type_inside_a_yaml_file_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    path = conf / "optimizer" / "adamw.yaml"
    path.write_text(path.read_text().replace("weight_decay: 0.1", "weight_decay: lots"))
    with pytest.raises(UserError, match="weight_decay"):
        compose_config(str(conf), [])


def test_an_unknown_enum_value_lists_the_choices(compose):
    with pytest.raises(UserError, match="trainer.precision.*fp32"):
        compose(["trainer.precision=fp8"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.batch_size=0", "trainer.batch_size=0 must be at least 1"),
        ("model.n_head=3", "model.n_embd=128 is not divisible by model.n_head=3"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must be greater than 0 and less than 1"),
        ("seed=4294967296", "seed=4294967296 must be at least 0 and less than 4294967296"),  # numpy's legacy limit
        (
            "checkpoint.best_metric=val/losss",  # keep_best would keep nothing by it, silently
            "checkpoint.best_metric=val/losss is not a metric a checkpoint records; use val/loss",
        ),
    ],
)
def test_validation_names_the_key(compose, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        compose([override])


def test_a_hydra_interpolation_in_a_job_key_resolves_as_in_the_job(compose):
    """The launcher composes outside a job, where Hydra has set no HydraConfig: it resolves against its own."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(["model=gpt2_mini", "logger=wandb", "logger.name=${hydra:runtime.choices.model}-${hydra:job.name}"])
    assert cfg.logger.name == "gpt2_mini-train"
    assert not HydraConfig.initialized()  # set only while resolving: train() called from Python runs without Hydra


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("checkpoint.dir=${hydra:runtime.output_dir}/ck", "checkpoint.dir=${hydra:runtime.output_dir}/ck uses a Hydra "
         "setting known only once the job runs; gpt2exp checks and records every value before it starts: use one "
         "known at launch, e.g. ${hydra:runtime.choices.model}"),  # checked as None/ck, then recorded otherwise
        ("hydra.job.chdir=yes", "hydra.job.chdir=true is not supported: gpt2exp reads relative paths from the dir "
         "it is started in and writes into the run dir by its path; drop hydra.job.chdir"),
    ],
)  # fmt: skip
def test_what_only_a_running_job_could_tell_is_refused_at_compose_time(compose, override, error):
    assert refusal(compose, override) == error


def test_a_hydra_interpolation_in_a_list_item_resolves_too(compose):
    cfg = compose(["data=text_files", "data.files=[${hydra:runtime.choices.model}.txt,b.txt]"])
    assert list(cfg.data.files) == ["gpt2_tiny.txt", "b.txt"]


def test_a_config_dir_is_this_command_lines_alone(tmp_path):
    from gpt2exp.composing import add_config_dir, with_added_config_dir
    from gpt2exp.launch import use_config_dir_flags

    add_config_dir(str(tmp_path))
    assert with_added_config_dir(["a=1"]) == ["a=1", f"hydra.searchpath=['file://{tmp_path}']"]
    use_config_dir_flags(["train", "a=1"])  # the next command line, in the same process, names none
    assert with_added_config_dir(["a=1"]) == ["a=1"]


def test_an_interpolation_that_does_not_resolve_names_the_key(compose, monkeypatch):
    monkeypatch.delenv("NO_SUCH_LR", raising=False)
    assert refusal(compose, "optimizer.lr=${oc.env:NO_SUCH_LR}") == (
        "KeyError raised while resolving interpolation: \"Environment variable 'NO_SUCH_LR' not found\" "
        "(key optimizer.lr)"
    )


def test_a_sweep_typed_without_m_says_to_add_m(compose):
    """Hydra's first option alone (a list) was the whole hint."""
    assert refusal(compose, "optimizer.lr=1e-3,3e-4") == (
        "Ambiguous value for argument 'optimizer.lr=1e-3,3e-4': to sweep over it add -m (--multirun); for a list "
        "pass optimizer.lr=[a,b], for one string quote it: \"optimizer.lr='a,b'\""
    )


@pytest.mark.parametrize(
    ("removed", "error"),
    [
        ("~logger", "no logger option is chosen; choose one with logger=..., one of none, tensorboard, wandb, "
         "wandb_tensorboard"),
        ("~optimizer", "no optimizer option is chosen; choose one with optimizer=..., one of adamw, sgd"),
        ("optimizer.betas=null", "optimizer.betas=null must hold 2 numbers, each at least 0 and less than 1"),
    ],
)  # fmt: skip
def test_a_group_or_value_removed_says_what_to_choose(compose, removed, error):
    assert refusal(compose, removed) == error


def test_text_files_without_files_says_what_to_set(compose):
    with pytest.raises(UserError, match="data.files is required"):
        compose(["data=text_files"])


def test_an_unknown_experiment_lists_the_available_ones(compose):
    with pytest.raises(UserError, match="Could not find 'experiment/nope'; available: finetune_gpt2, gpt2_124m"):
        compose(["+experiment=nope"])


def test_an_added_key_outside_the_schema_is_rejected(compose):
    with pytest.raises(UserError, match="foo"):
        compose(["+optimizer.foo=1"])


def test_the_schema_holds_types_only_so_conf_is_the_one_source_of_values():
    from omegaconf import OmegaConf

    from gpt2exp.config import ONLY_FOR, Config, is_missing
    from gpt2exp.resume import leaves

    schema = OmegaConf.structured(Config)
    keys = list(leaves(OmegaConf.to_container(schema, resolve=False)))
    set_in_schema = {k: OmegaConf.select(schema, k) for k in keys if not is_missing(schema, k)}
    # every value comes from conf/: the schema leaves a key required, or unset (None, []) when optional
    assert {k: v for k, v in set_in_schema.items() if v not in (None, [])} == {}
    assert set(ONLY_FOR) <= set(set_in_schema)  # option-specific keys are unset unless their option sets them
    assert len(set_in_schema) < len(keys) / 2  # most keys are required: conf/ must set them


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.files=[my/story.txt]"],
            "data.files applies only to data=text_files, not to data=shakespeare; did you mean data=text_files?",
        ),
        (
            ["data.dataset=wikitext"],
            "data.dataset applies only to data=hf_dataset, not to data=shakespeare; did you mean data=hf_dataset?",
        ),
        (
            ["data=text_files", "data.files=[a.txt]", "data.text_column=body"],
            "data.text_column applies only to data=hf_dataset, not to data=text_files",
        ),
        (["optimizer=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas applies only to optimizer=adamw"),
        (["optimizer.momentum=0.8"], "optimizer.momentum applies only to optimizer=sgd, not to optimizer=adamw"),
        (
            ["logger=none", "logger.project=mine"],
            "logger.project applies only to logger=wandb or logger=wandb_tensorboard, not to logger=none",
        ),
    ],
)
def test_a_key_of_another_option_is_refused_naming_the_option(compose, overrides, message):
    with pytest.raises(UserError) as caught:
        compose(overrides)
    assert str(caught.value).startswith(message)


def test_keys_every_option_of_a_group_needs_are_set_by_each_option(compose):
    for group, option_overrides in {
        "data": [
            ["data=shakespeare"],
            ["data=text_files", "data.files=[a.txt]"],
            ["data=hf_dataset", "data.dataset=x"],
        ],
        "optimizer": [["optimizer=adamw"], ["optimizer=sgd"]],
        "logger": [[f"logger={name}"] for name in options("logger")],
    }.items():
        for overrides in option_overrides:
            cfg = compose(overrides)
            assert missing_keys(cfg) == [], (group, overrides)


def test_the_default_config_saves_every_30_minutes_and_on_a_step_interval(compose):
    cfg = compose()
    assert (cfg.checkpoint.every_minutes, cfg.checkpoint.every_steps) == (30.0, 200)
    for preset, steps in {"shakespeare_small": 500, "gpt2_124m": 500, "finetune_gpt2": 50}.items():
        cfg = compose([f"+experiment={preset}"])
        assert (cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes) == (steps, 30.0), preset


def missing_keys(cfg) -> list[str]:
    from omegaconf import OmegaConf

    return sorted(OmegaConf.missing_keys(cfg))
