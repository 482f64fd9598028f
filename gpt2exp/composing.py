"""The job config for a command line's overrides, composed by Hydra from conf/, typed and validated
as `python -m gpt2exp.train` would; Hydra's composition errors become one-line UserErrors."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from gpt2exp.errors import UserError


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
    from omegaconf.errors import OmegaConfBaseException

    from gpt2exp.config import check_applicable, register_schemas, typed, validate

    register_schemas()
    with_hydra = hydra_key is not None
    try:
        if GlobalHydra.instance().is_initialized():  # inside a job: Hydra runs gpt2exp's conf/ already
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
        else:
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="train"):
                cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(one_line(exc)) from None
    setting = None
    if with_hydra:
        setting = hydra_value(cfg, hydra_key)
        with open_dict(cfg):
            del cfg["hydra"]
    typed(OmegaConf.to_container(cfg))  # catches keys added with `+group.key=...`, which slip past Hydra's own check
    if validated:
        validate(cfg)
        check_applicable(cfg)
    return cfg, setting


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
