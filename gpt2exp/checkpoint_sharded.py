"""The files of a checkpoint written by several processes (DDP, FSDP2), and how any world reads them.

    checkpoints/step_00000200/
      model.safetensors config.json   the whole weights, once (rank 0): GPT2LMHeadModel.from_pretrained(dir)
      tokenizer.json ...              AutoTokenizer.from_pretrained(dir)
      optimizer/.metadata             torch.distributed.checkpoint: the optimizer's tensors, every rank
      optimizer/__<rank>_0.distcp     writing its own shard in parallel (resharded on load to any world)
      optimizer_state.json            the optimizer's other values (hyperparameters, by parameter name)
      trainer_state.json              counters, sampler, schedule, W&B id, world size; RNG is per rank:
      rng/rank_00000.json ...         each rank's RNG state
      tensors.pt                      other tensor state (the fp16 grad scaler), rank 0
      manifest.json                   every file above: size + sha256, each rank hashing its own

The manager (checkpoint.py) commits it like any checkpoint: all ranks write into one temporary dir,
rank 0 writes the manifest once every rank reported its files, then renames. Loading never
unpickles arbitrary objects: DCP's `.metadata` (a pickle) is read by an unpickler that admits only
DCP's metadata classes, and only tensors are stored in DCP (no pickled byte items).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2exp.checkpoint_files import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    build_trainer_state,
    check_json_state,
    io_pool,
    load_tensor_state,
    model_tensors,
    restore_model,
    split_stateful,
    tensor_state_writer,
    write_file,
    write_pretrained_files,
)
from gpt2exp.distributed import active
from gpt2exp.snapshot import Frozen

OPTIMIZER_DIR = "optimizer"
OPTIMIZER_STATE = "optimizer_state.json"
RNG_DIR = "rng"
OTHER_TENSORS = "tensors.pt"
RNG_KEY = "rng"  # the stateful entry saved per rank
OPTIMIZER_KEY = "optimizer"


def is_sharded(path: Path) -> bool:
    return (path / OPTIMIZER_DIR / ".metadata").is_file()


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.json"


@dataclass
class Captured:
    """One rank's share of a checkpoint at one step, off the live objects: training may change them
    while this is written (a background save), and what is written is the state of that step."""

    weights: dict[str, Any] | None  # the whole weights (rank 0), tied duplicates dropped
    config: Any  # the model's config (config.json)
    optimizer_tensors: dict[str, Any] | None  # this rank's shards, keyed by parameter name (for DCP)
    optimizer_values: dict[str, Any] | None  # the optimizer's other values (hyperparameters)
    rng: dict[str, Any] | None  # this rank's RNG state
    json_state: dict[str, Any]  # the other "json" objects' states (rank 0 writes them)
    other_tensors: dict[str, Any]  # the other "tensors" objects' states (the grad scaler; rank 0)


class ShardedCheckpointFiles:
    """Writes the layout above from every rank; reads it (or the one-process layout) into any world.

    `capture` takes this rank's share of the state (collectives: FSDP gathers the weights for rank 0);
    `write` writes a capture (or the live state) into the checkpoint dir. Its collectives (DCP's
    planning) run on `group`, a gloo group of the checkpoint's own, so a background save can write
    while training runs its collectives on the default group.
    """

    def __init__(self, tokenizer_dir: Path | None, rank: int):
        from gpt2exp.distributed import new_gloo_group

        self.tokenizer_dir = tokenizer_dir
        self.rank = rank
        self.group = new_gloo_group()
        self._io = io_pool()
        self._buffers: dict[str, Any] = {}  # a background save's copies, reused from save to save

    def capture(self, stateful: Mapping[str, Any], copy: bool) -> Captured:
        """This rank's share of `stateful` now; with `copy`, in buffers of its own (reused between saves)."""
        model, groups = split_stateful(stateful)
        optimizer = groups["tensors"].get(OPTIMIZER_KEY)
        sharded_weights = any(hasattr(p, "full_tensor") for p in model.parameters())
        weights = model_tensors(model) if sharded_weights or self.rank == 0 else None  # FSDP: every rank gathers
        weights = weights if self.rank == 0 else None
        tensors = values = None
        if optimizer is not None:
            flat = _flat_optimizer_state(model, optimizer.obj)
            tensors = {k: v for k, v in flat.items() if _is_tensor(v)}
            values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if k not in tensors}
        if copy:
            weights = {k: self._copy(f"model.{k}", v) for k, v in weights.items()} if weights is not None else None
            tensors = {k: self._copy(f"optimizer.{k}", v) for k, v in tensors.items()} if tensors is not None else None
        rng = groups["json"].get(RNG_KEY)
        return Captured(
            weights=weights,
            config=model.config,
            optimizer_tensors=tensors,
            optimizer_values=json.loads(json.dumps(values)) if values is not None else None,
            rng=rng.state_dict() if rng is not None else None,
            json_state={k: json.loads(json.dumps(v.state_dict())) for k, v in groups["json"].items() if k != RNG_KEY},
            # the grad scaler's few values, copied so that a later step cannot change them
            other_tensors=deepcopy({k: v.state_dict() for k, v in groups["tensors"].items() if k != OPTIMIZER_KEY}),
        )

    def _copy(self, name: str, tensor: Any) -> Any:
        """`tensor` copied into this name's buffer on the CPU; a DTensor keeps its mesh and placements."""
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            buffer = self._buffers[name] = local.detach().to("cpu", copy=True)
        else:
            buffer.copy_(local.detach())
        if not hasattr(tensor, "to_local"):
            return buffer
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            buffer, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
        )

    def write(
        self, tmp_dir: Path, step: int, stateful: Mapping[str, Any] | Captured, extra_json: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """This rank's files of `stateful` (live, or captured before), each fsynced and hashed; returns
        their manifest entries."""
        import torch.distributed as dist

        captured = stateful if isinstance(stateful, Captured) else self.capture(stateful, copy=False)
        files: dict[str, dict[str, Any]] = {}

        def write(name: str, data: bytes | Any) -> None:
            (tmp_dir / name).parent.mkdir(parents=True, exist_ok=True)
            files[name] = write_file(tmp_dir / name, data, self._io)

        if captured.optimizer_tensors is not None:
            save_optimizer_tensors(captured.optimizer_tensors, tmp_dir / OPTIMIZER_DIR, self.group)
            written = sorted((tmp_dir / OPTIMIZER_DIR).iterdir())
            mine = [p for p in written if p.name.startswith(f"__{self.rank}_")]
            mine += [p for p in written if p.name == ".metadata" and self.rank == 0]
            for path in mine:
                files[f"{OPTIMIZER_DIR}/{path.name}"] = _hash_written(path)
        if captured.rng is not None:
            write(rng_file(self.rank), json.dumps(captured.rng).encode())
        if self.rank == 0:
            json_objects = {k: Frozen("json", v) for k, v in captured.json_state.items()}
            world = {"world_size": dist.get_world_size()}
            state = build_trainer_state(json_objects, step, {**extra_json, **world})
            write_pretrained_files(write, captured.weights, captured.config, self.tokenizer_dir)
            if captured.optimizer_values is not None:
                write(OPTIMIZER_STATE, json.dumps(captured.optimizer_values).encode())
            if captured.other_tensors:
                write(OTHER_TENSORS, tensor_state_writer(captured.other_tensors))
            write(STATE_FILE, json.dumps(state).encode())
        return files

    def read(self, path: Path, stateful: Mapping[str, Any]) -> dict[str, Any]:
        return read_checkpoint(path, stateful, self.rank)

    def close(self) -> None:
        self._io.shutdown(wait=True)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _hash_written(path: Path) -> dict[str, Any]:
    """The manifest entry of a file DCP wrote (DCP fsyncs its files itself)."""
    import hashlib

    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


# -- the optimizer through torch.distributed.checkpoint -----------------------------------------------


def _flat_optimizer_state(model, optimizer) -> dict[str, Any]:
    """{"state.<param>.<key>": tensor, "param_groups.<param>.<key>": value}: keyed by parameter name, so
    it reshards to any world and any strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def save_optimizer_tensors(tensors: dict[str, Any], directory: Path, group: Any) -> None:
    """The optimizer's tensors as DCP shards, every rank writing its own (DCP plans over `group`)."""
    import torch.distributed.checkpoint as dcp

    try:
        writer = dcp.FileSystemWriter(str(directory), sync_files=True)
        dcp.save(tensors, storage_writer=writer, process_group=group)
    except dcp.api.CheckpointException as exc:  # a BaseException: turn it into what a save failure is
        raise _first_failure(exc) from None


def _first_failure(exc: BaseException) -> Exception:
    failures = getattr(exc, "failures", {}) or {}
    for failure in failures.values():
        if isinstance(failure, OSError):
            return failure
    for failure in failures.values():
        if isinstance(failure, Exception):
            return RuntimeError(str(failure).splitlines()[0] if str(failure) else type(failure).__name__)
    return RuntimeError(str(exc).splitlines()[0])


def load_optimizer(model, optimizer, path: Path) -> None:
    """Restore the optimizer from DCP shards written by any number of ranks."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    flat = _flat_optimizer_state(model, optimizer)  # the shapes and shards this world wants
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    plain = json.loads((path / OPTIMIZER_STATE).read_text())
    missing = set(flat) - set(tensors) - set(plain)
    if missing:
        raise CheckpointError(f"{path} lacks optimizer values for {sorted(missing)[:3]}; resume with the run's config")
    try:
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path / OPTIMIZER_DIR)))
    except dcp.api.CheckpointException as exc:
        raise CheckpointError(f"{path / OPTIMIZER_DIR} does not load: {_first_failure(exc)}") from None
    restored = {**plain, **tensors}
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    set_optimizer_state_dict(model, optimizer, restored, options=options)


def optimizer_state_by_name(model, optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A one-process optimizer.pt (state keyed by parameter index) keyed by parameter name instead,
    what `set_optimizer_state_dict(full_state_dict=True)` takes: the same parameter order as this
    optimizer's groups, which build_optimizer makes alike on any world."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_order = [i for group in saved["param_groups"] for i in group["params"]]
    if len(saved_order) != len(order):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved_order)} parameters, this model {len(order)}; "
            "resume with the run's own config"
        )
    by_index = dict(zip(saved_order, order, strict=True))
    groups = [{**group, "params": [by_index[i] for i in group["params"]]} for group in saved["param_groups"]]
    return {"state": {by_index[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


# -- reading a checkpoint into any world -----------------------------------------------------------------


def read_checkpoint(path: Path, stateful: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """Restore `stateful` from `path`, written by one process or several, into this world (any size,
    any strategy); returns its trainer_state. Every file is read and checked before the first object
    changes, but the optimizer's DCP shards, which are read straight into the optimizer."""
    from safetensors.torch import load_file

    model, groups = split_stateful(stateful)
    weights = load_file(path / MODEL_FILE)
    state = json.loads((path / STATE_FILE).read_text())
    sharded = is_sharded(path)
    tensor_state = {}
    if sharded and (path / OTHER_TENSORS).is_file():
        tensor_state = load_tensor_state(path / OTHER_TENSORS)
    elif not sharded:
        tensor_state = load_tensor_state(path / OPTIMIZER_FILE)
    own_rng = sharded and (path / rng_file(rank)).is_file()
    if sharded:
        rng_state = json.loads((path / rng_file(rank if own_rng else 0)).read_text())
    else:
        rng_state = state.get(RNG_KEY)
    forked = rank > 0 and not own_rng  # a rank the saving run did not have: its own stream, not rank 0's
    check_json_state(groups, state)
    restore_weights(path, model, weights)
    optimizer = groups["tensors"].get(OPTIMIZER_KEY)
    if optimizer is not None:
        if sharded:
            load_optimizer(model, optimizer.obj, path)
        elif OPTIMIZER_KEY in tensor_state:
            load_one_process_optimizer(model, optimizer.obj, tensor_state[OPTIMIZER_KEY])
    for key, obj in groups["tensors"].items():
        if key != OPTIMIZER_KEY and key in tensor_state:
            obj.load_state_dict(tensor_state[key])
    for key, obj in groups["json"].items():
        if key == RNG_KEY and rng_state is not None:
            if forked:
                obj.load_forked(rng_state, rank)
            else:
                obj.load_state_dict(rng_state)
        elif key in state:
            obj.load_state_dict(state[key])
    return state


def restore_weights(path: Path, model, weights: dict[str, Any]) -> None:
    """The whole weights into a plain model, or each rank's shard of them into an FSDP2 model."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        restore_model(path, model, weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing, unexpected = expected - set(weights) - tied, set(weights) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model its config describes "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    try:
        set_model_state_dict(model, weights, options=options)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match the model its config describes ({str(exc).splitlines()[0]}); "
            "resume with the run's own config"
        ) from None


def load_one_process_optimizer(model, optimizer, saved: dict[str, Any]) -> None:
    """optimizer.pt of a one-process run: as it is into a plain model, by parameter name into a
    distributed one (resharded)."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()) and not active():
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = optimizer_state_by_name(model, optimizer, saved)
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# -- DCP's .metadata without arbitrary unpickling ---------------------------------------------------------

# What a DCP .metadata pickle of tensors names: DCP's own dataclasses, torch sizes and dtypes.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # every class of the module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size", *(name for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32"))},
    "torch._utils": {"_rebuild_tensor_v2"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},  # the checkpoint_id
    "builtins": {"set", "frozenset", "slice", "tuple", "list", "dict"},
    "torch.serialization": {"_get_layout"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, set())
        if module in _ALLOWED and (allowed is None or name in allowed) or _is_dtype_or_layout(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _is_dtype_or_layout(module: str, name: str) -> bool:
    if module != "torch":
        return False
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format)


def read_dcp_metadata(path: Path) -> Any:
    """DCP's `.metadata`, refused (CheckpointError) if it names anything but metadata classes or holds
    pickled byte items (gpt2exp stores only tensors in DCP)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a checkpoint's metadata; refusing to unpickle it ({exc})") from None
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(items, dict) or any(isinstance(m, BytesStorageMetadata) for m in items.values()):
        raise CheckpointError(f"{path} holds pickled values, not only tensors; refusing to load them")
    return metadata


def _safe_reader_class():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(Path(self.path) / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader


def SafeFileSystemReader(path: str) -> Any:  # noqa: N802 - a class made on first use (torch imported late)
    return _safe_reader_class()(path)
