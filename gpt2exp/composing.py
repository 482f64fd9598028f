"""The job config for a command line's overrides, composed by Hydra from conf/, typed and validated
as `python -m gpt2exp.train` would; Hydra's composition errors become one-line UserErrors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gpt2exp.errors import UserError

# A config dir the command line adds to gpt2exp's (`--config-dir DIR`: the user's own groups and
# experiments), set by the launcher for its command line: its path, and the override that searches it.
# A job composes with Hydra's own search path, which holds it.
_added_config_path: list[str] = []
_added_config_dir: list[str] = []


def add_config_dir(path: str | None) -> None:
    """Compose with `path` in the search path, after gpt2exp's conf/, as Hydra does for `--config-dir`
    (None: without one)."""
    from gpt2exp.overrides import quoted

    _added_config_path[:] = [os.path.abspath(os.path.expanduser(path))] if path else []
    _added_config_dir[:] = [f"hydra.searchpath=[{quoted('file://' + p)}]" for p in _added_config_path]


def group_options(conf_dir: str, group: str) -> list[str]:
    """The options of config group `group`: gpt2exp's and those of a dir added with --config-dir (not
    those Hydra's plugins bring)."""
    return sorted({p.stem for d in (conf_dir, *_added_config_path) for p in Path(d, group).glob("*.yaml")})


def with_added_config_dir(overrides: list[str]) -> list[str]:
    return [*overrides, *_added_config_dir]


def compose(conf_dir: str, overrides: list[str], validated: bool = True) -> DictConfig:
    """The job config for `overrides`, typed and validated (`validated=False`: typed only, for a caller
    that completes it first); composition errors become UserError. Inside a job (Hydra running) it is
    composed by the running app, which has `conf_dir` as its config path."""
    return _compose(conf_dir, overrides, validated, hydra_key=None)[0]


def compose_with_hydra(conf_dir: str, overrides: list[str], hydra_key: str) -> tuple[DictConfig, str | None]:
    """`compose` for `overrides`, Hydra's own (`hydra.*`) among them, and Hydra's setting `hydra_key`
    (a dir it makes: `hydra.run.dir`, `${now:}` read now) from the same composition; None where that
    resolves only once Hydra runs (`${hydra:...}`)."""
    return _compose(conf_dir, overrides, validated=True, hydra_key=hydra_key)


def _compose(
    conf_dir: str, overrides: list[str], validated: bool, hydra_key: str | None
) -> tuple[DictConfig, str | None]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from gpt2exp.config import check_applicable, register_schemas, typed, validate

    register_schemas()
    in_job = GlobalHydra.instance().is_initialized()  # Hydra runs gpt2exp's conf/ and has set its HydraConfig
    with_hydra = hydra_key is not None or not in_job  # outside a job: for the `${hydra:...}` of job keys
    try:
        if in_job:
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
        else:
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="train"):
                cfg = hydra_compose(
                    config_name="config", overrides=with_added_config_dir(overrides), return_hydra_config=with_hydra
                )
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(one_line(exc)) from None
    setting = None
    if with_hydra:
        setting = hydra_value(cfg, hydra_key) if hydra_key is not None else None
        if not in_job:
            refuse_chdir(cfg)
            resolve_hydra_interpolations(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        typed(OmegaConf.to_container(cfg))  # catches keys added with `+group.key=...`, which slip past Hydra's check
        if validated:
            validate(cfg)
            check_applicable(cfg)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve: `${oc.env:UNSET}`
        raise UserError(one_line(exc)) from None
    return cfg, setting


def refuse_chdir(cfg: DictConfig) -> None:
    """The job would read each relative path (data files, checkpoint.dir, model.init) from the run dir,
    the launcher having checked it from the launch dir."""
    if OmegaConf.select(cfg, "hydra.job.chdir") is True:
        raise UserError(
            "hydra.job.chdir=true is not supported: gpt2exp reads relative paths from the dir it is started in "
            "and writes into the run dir by its path; drop hydra.job.chdir"
        )


# Hydra's settings that hold a value only once a job runs: a job key built from one cannot be checked,
# or recorded the same, at launch.
SET_WHEN_THE_JOB_RUNS = ("hydra.runtime.output_dir", "hydra.job.num", "hydra.job.id")


def resolve_hydra_interpolations(cfg: DictConfig) -> None:
    """Each job key holding `${hydra:...}` (a run named `${hydra:runtime.choices.model}`), resolved in
    place against the Hydra settings `cfg` was composed with. A job resolves them against the
    HydraConfig Hydra sets for it; the launcher composes outside a job, where none is set, so it sets
    its composition's for as long as it resolves them."""
    from hydra.core.hydra_config import HydraConfig

    keys = _hydra_interpolated_keys(cfg, "")
    for key in keys:
        raw = _raw(cfg, key)
        if any("${hydra:" + unset.removeprefix("hydra.") in raw for unset in SET_WHEN_THE_JOB_RUNS):
            raise UserError(
                f"{key}={raw} uses a Hydra setting known only once the job runs; gpt2exp checks and records every "
                "value before it starts: use one known at launch, e.g. ${hydra:runtime.choices.model}"
            )
    if not keys:
        return
    holder = HydraConfig.instance()
    before = holder.cfg
    holder.set_config(cfg)
    try:
        for key in keys:
            OmegaConf.update(cfg, key, OmegaConf.select(cfg, key, throw_on_resolution_failure=True), merge=False)
    except OmegaConfBaseException as exc:
        raise UserError(one_line(exc)) from None
    finally:
        holder.cfg = before


def _raw(cfg: DictConfig, key: str) -> str:
    """The value of `key` as written (its interpolation unresolved)."""
    if key.endswith("]"):  # a list's item: data.files[0]
        parent, index = key[: key.rindex("[")], int(key[key.rindex("[") + 1 : -1])
        return str(OmegaConf.select(cfg, parent)._get_node(index)._value())
    parent, _, leaf = key.rpartition(".")
    return str((OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)._value())


def _hydra_interpolated_keys(node: Any, prefix: str) -> list[str]:
    keys = []
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else ((i, None) for i in range(len(node)))
    for key, _ in items:
        path = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix[:-1]}[{key}]"
        if path == "hydra":
            continue
        child = node._get_node(key)
        if OmegaConf.is_interpolation(node, key) and "${hydra:" in str(child._value()):
            keys.append(path)
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            keys += _hydra_interpolated_keys(child, f"{path}.")
    return keys


def hydra_value(cfg: DictConfig, key: str) -> str | None:
    """`key` of a config composed with Hydra's settings, resolved; None where it resolves only once
    Hydra runs a job (`${hydra:runtime.choices.model}` needs the HydraConfig a job sets)."""
    try:
        value = OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001 - an interpolation that cannot resolve here is for Hydra to resolve
        return None
    return None if value is None else str(value)


def one_line(exc: BaseException) -> str:
    """Hydra's composition errors as one line: what failed, the key, and the choices if any."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    message = lines[0] if lines else type(exc).__name__
    if message.startswith("Ambiguous value for argument") and len(lines) >= 4:  # a sweep typed without -m
        key = message.split("'")[1].split("=", 1)[0] if "'" in message else "key"
        return (
            f"{message}: to sweep over it add -m (--multirun); for a list pass {key}=[a,b], for one string "
            f"quote it: \"{key}='a,b'\""
        )
    if "Available options" in str(exc):
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        choices = [ln for ln in lines[start + 1 :] if not ln.startswith(("Config search path", "provider="))]
        return f"{message}; available: {', '.join(choices)}"
    detail = lines[1:]
    if exc.__cause__ is not None:
        detail = [ln.strip() for ln in str(exc.__cause__).splitlines() if ln.strip()] + detail
    key = next((ln.split(":", 1)[1].strip() for ln in detail if ln.startswith("full_key:")), None)
    noise = ("reference_type", "object_type")
    reason = next((ln for ln in detail if ":" not in ln[:12] and not ln.startswith(noise)), None)
    if reason:
        message = f"{message.rstrip(':').rstrip('.')}: {reason}"  # "Could not override 'x'.:" reads "...'x':"
    return message + (f" (key {key})" if key else "")
