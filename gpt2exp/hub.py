"""Loading HF models and tokenizers by local path or hub name, failing within seconds when offline.

A local directory loads directly. A hub name is tried from the local HF cache first; only if it is
not there is the hub asked, and only after a short reachability probe, because the hub client
otherwise retries for about 50 s before it gives up.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gpt2exp.errors import UserError

PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def offline_unless_reachable() -> bool:
    """Switch the HF clients to offline mode when the hub cannot be reached; returns True if offline.

    Cached models and data sets then load at once, and missing ones fail at once instead of after
    the hub client's retries.
    """
    if hub_reachable():
        return False
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass
    return True


def load_pretrained(loader: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """`loader(name)` for a local path or a hub name, with one clear UserError when it cannot load."""
    if Path(os.path.expanduser(name)).exists():
        try:
            return loader(os.path.expanduser(name), **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load {what} from {name}: {_first_line(exc)}") from exc
    if name.startswith((".", "/", "~")):
        raise UserError(f"{what} path not found: {name}; check the path")
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise unreachable(what, name)
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"unknown {what} '{name}' on the Hugging Face hub: {_first_line(exc)}") from exc


def unreachable(what: str, name: str) -> UserError:
    return UserError(
        f"{what} '{name}' is not a local path, not in the local HF cache, and the Hugging Face hub "
        "cannot be reached (offline); pass a local path saved with save_pretrained, or go online"
    )


def saved_config(name: str, what: str) -> dict[str, Any] | None:
    """The config.json of `name` (a local dir, or a hub name in the local HF cache) without loading the
    model: for checks before a run starts. None for a hub name that is not cached but may be downloaded."""
    path = Path(os.path.expanduser(name))
    if not path.exists():
        if name.startswith((".", "/", "~")):
            raise UserError(f"{what} path not found: {name}; check the path")
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a hub name either (a/b/c, spaces): most likely a mistyped relative path
            raise UserError(f"{what} path not found: {name}; check the path") from None
        if not isinstance(cached, str):
            if not hub_reachable():
                raise unreachable(what, name)
            return None
        path = Path(cached).parent
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {what} from {name}: no readable config.json ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise UserError(f"cannot load {what} from {name}: its config.json holds no settings")
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
