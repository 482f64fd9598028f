"""Training on several processes with torch.distributed: who this process is, the process group,
the model wrapped for DDP or FSDP2, and the few collectives with which every rank decides together.

    torchrun --standalone --nproc_per_node=2 -m gpt2exp.train                       # CPU: gloo, DDP
    torchrun --standalone --nproc_per_node=8 -m gpt2exp.train +experiment=gpt2_124m distributed=fsdp
    python -m gpt2exp.train -m hydra/launcher=slurm hydra.launcher.tasks_per_node=8 distributed=fsdp

torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or in a SLURM step of several
tasks SLURM's (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the job's first node), say who this
process is; without them it is the one process of today, and nothing here imports torch.distributed.

Rank 0 decides what touches the run dir (the plan, the run dir itself, saves, stops) and tells the
others (`rank0_decides`); each decision every rank must take alike (stop on a signal, diverged) is
taken from values the ranks agree on (`any_rank`, `mean_over_ranks`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from gpt2exp.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    launched: bool = False  # started by torchrun or as a task of a SLURM step (even a world of one)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _slurm_step_tasks() -> int:
    """Tasks of the SLURM step this process is one of (srun sets it; a batch script's shell is no step)."""
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "0"))
    except ValueError:
        return 0


def world_from_env() -> World:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also a SLURM job that runs torchrun itself)
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"]), True)
    if _slurm_step_tasks() > 1 and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), _slurm_step_tasks(), True)
    return World()


def strategy_of(cfg: Any, world: World) -> str:
    """What runs: `single` (one process, no process group), `ddp` or `fsdp`."""
    strategy = str(cfg.strategy)
    if strategy == "auto":
        return "ddp" if world.size > 1 else "single"
    return strategy


def check_world(cfg: Any, trainer_cfg: Any, device: str, cuda_possible: bool, world: World) -> None:
    """Refusals before anything is written: one line each, naming the fix."""
    strategy = str(cfg.strategy)
    if strategy in ("ddp", "fsdp") and not world.launched:
        raise UserError(
            f"distributed={strategy} needs several processes: start it with "
            f"torchrun --nproc_per_node=N -m gpt2exp.train ... (or use distributed=auto for one process)"
        )
    if str(cfg.backend) == "nccl" and (device in ("cpu", "mps") or not cuda_possible):
        raise UserError(
            "distributed.backend=nccl needs CUDA GPUs, and this run has none; "
            "use distributed.backend=gloo (or auto) on a CPU"
        )
    global_batch = trainer_cfg.batch_size * trainer_cfg.grad_accum_steps
    if global_batch % world.size:
        raise UserError(
            f"the global batch of {global_batch} sequences (trainer.batch_size={trainer_cfg.batch_size} x "
            f"trainer.grad_accum_steps={trainer_cfg.grad_accum_steps}) cannot be split over {world.size} processes; "
            f"make it a multiple of {world.size} or start {', '.join(map(str, divisors(global_batch)))} processes"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- the process group -----------------------------------------------------------------------------


def _slurm_rendezvous(world: World) -> None:
    """torch's env:// rendezvous from SLURM's variables: the job's first node hosts the store."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            first = nodes.split(",")[0]
        env["MASTER_ADDR"] = first
    # a port of the job's own: two jobs on one node do not meet each other's store
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.update(RANK=str(world.rank), WORLD_SIZE=str(world.size), LOCAL_RANK=str(world.local_rank))


def init_process_group(world: World) -> None:
    """The default process group of a launched world (idempotent): gloo on a CPU; on CUDA nccl for
    tensors on the GPU and gloo for the small CPU messages ranks decide with."""
    if not world.launched:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "SLURM_PROCID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        _slurm_rendezvous(world)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    timeout = timedelta(minutes=30)  # how long a collective waits for a slow rank (a save, an evaluation)
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across the restarts of a group, and a restarted rank could read
        # a dead rank's address from it (gloo: "Connection refused"): each attempt keys its own
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size, False, timeout=timeout)
        attempt = f"gpt2exp/{env.get('TORCHELASTIC_RUN_ID', '')}/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        prefixed = dist.PrefixStore(attempt, store)
        dist.init_process_group(backend, store=prefixed, rank=world.rank, world_size=world.size, timeout=timeout)
        return
    dist.init_process_group(backend, timeout=timeout)


def active() -> bool:
    """Whether a process group of more than one rank is up (the collectives below are no-ops otherwise)."""
    if not world_from_env().launched:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def destroy_process_group() -> None:
    if world_from_env().launched:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# -- deciding together -----------------------------------------------------------------------------


def exit_together() -> None:
    """Every rank stopped and saved: each now ends with its own exit code (`_keep_own_exit_code`)."""
    if active():
        barrier()
        _keep_own_exit_code()


@contextlib.contextmanager
def own_exit_code():
    """Around a launched rank's whole life: however it ends, the end is its own (`_keep_own_exit_code`).

    A rank that ends well (its run done, exit 0) tears its process groups down first, as torch asks of
    a normal exit (NCCL warns otherwise). A rank that ends otherwise leaves them to the exit: since
    torch 2.6, destroying an NCCL group flushes its collectives, which hangs where a peer is still in
    one; ending the process closes them instead.
    """
    ended_well = False
    try:
        yield
        ended_well = True
    except SystemExit as end:
        ended_well = end.code in (None, 0)
        raise
    finally:
        if world_from_env().launched:
            _keep_own_exit_code()
            if ended_well:
                try:
                    destroy_process_group()
                except Exception as exc:  # noqa: BLE001 - the rank's own exit code goes on
                    log.warning("could not tear down the process group: %r", exc)


def end_refused_launch(refusal: SystemExit) -> None:
    """A launch refused under torchrun (its line printed, nothing written) ends each rank at once with
    the refusal's code: the interpreter's shutdown is skipped, where a rank that had read a checkpoint
    written by several processes (torch.distributed.checkpoint imported) aborted 4 times in 14
    (SIGABRT, 'terminate called without an active exception') instead of exiting 2. Nothing is
    pending: no run, no W&B, no open file of a run. Outside torchrun the refusal goes on as raised."""
    if not world_from_env().launched:
        raise refusal
    import sys

    _keep_own_exit_code()
    destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    code = refusal.code
    os._exit(0 if code is None else code if isinstance(code, int) else 1)


def _keep_own_exit_code() -> None:
    """On the way out: a further SIGTERM (torchrun's to the other ranks once the first one exits) no
    longer cuts this rank's exit short, so torchrun reports each rank's own exit code."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def broadcast(obj: T, src: int = 0, group: Any = None) -> T:
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_to_all(obj: T, group: Any = None) -> list[T]:
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Any = None) -> None:
    if active():
        import torch.distributed as dist

        dist.barrier(group=group)


def new_gloo_group() -> Any:
    """A gloo group of every rank beside the default one (None without a process group): collectives of
    a background thread on the default group would interleave with training's and break gloo."""
    if not active():
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal that reached one rank stops them all)."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks, in float64 (small CPU messages)."""
    if not active():
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def rank0_decides(decide: Callable[[], T]) -> T:
    """Rank 0 runs `decide` and every rank gets its result, or its failure raised again (rank 0 alone
    prints a refusal; the others end with the same exit code, silently)."""
    if not active():
        return decide()
    outcome: tuple[str, Any]
    if world_from_env().main:
        try:
            outcome = ("value", decide())
        except SystemExit as exc:
            broadcast(("exit", exc.code))
            _keep_own_exit_code()
            raise
        except UserError as exc:
            broadcast(("user_error", str(exc)))
            _keep_own_exit_code()
            raise
        except BaseException as exc:
            broadcast(("error", f"{type(exc).__name__}: {exc}"))
            raise
        try:
            pickle.dumps(outcome)
        except Exception as exc:  # a bug: what rank 0 decided must travel to the others
            broadcast(("error", f"cannot share the decision of rank 0: {exc}"))
            raise
        return broadcast(outcome)[1]
    kind, value = broadcast(("", None))
    if kind == "value":
        return value
    _keep_own_exit_code()
    if kind == "exit":
        raise SystemExit(value)
    if kind == "user_error":
        raise SilentUserError(value)
    raise RuntimeError(f"rank 0 failed: {value}")


class SilentUserError(UserError):
    """A refusal rank 0 already printed; the other ranks exit 2 without printing it again."""


# -- the model on several processes ----------------------------------------------------------------


def wrap_model(model, strategy: str, device) -> Any:
    """Spread `model` over the ranks; returns the module to call for training forwards.

    DDP wraps it (the returned wrapper syncs gradients; `model` itself stays the plain module).
    FSDP2 shards it in place: each transformer block its own unit, the root (embeddings, the tied
    output head, the final norm) the last, so the tied weights stay in one group.
    """
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def gradient_sync(forward, model, strategy: str, last_micro_batch: bool):
    """A context for one micro-batch's backward: gradients are averaged over the ranks only on the
    last micro-batch of the step (no extra communication during accumulation)."""
    if strategy == "ddp" and not last_micro_batch:
        return forward.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()
