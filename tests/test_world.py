"""Who a process is under torchrun or SLURM, the refusals before a distributed run starts, and the
pieces of a sharded checkpoint that need no process group (unit tier; tests/test_distributed.py runs
torchrun)."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from gpt2exp.checkpoint import CheckpointError, CheckpointManager
from gpt2exp.checkpoint_sharded import optimizer_state_by_name, read_dcp_metadata
from gpt2exp.distributed import World, check_world, strategy_of, world_from_env
from gpt2exp.errors import UserError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID")


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_slurm_steps_and_plain_processes_are_told_apart(env):
    assert world_from_env() == World(0, 0, 1, False)
    env.setenv("SLURM_NTASKS", "4")  # a batch script's shell is no step: one process, as without SLURM
    env.setenv("SLURM_PROCID", "0")
    assert world_from_env() == World(0, 0, 1, False)
    env.setenv("SLURM_STEP_NUM_TASKS", "4")
    env.setenv("SLURM_PROCID", "3")
    env.setenv("SLURM_LOCALID", "1")
    assert world_from_env() == World(3, 1, 4, True)
    env.setenv("RANK", "1")  # torchrun's variables win (a SLURM job that runs torchrun itself)
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_RANK", "1")
    assert world_from_env() == World(1, 1, 2, True)


def test_auto_is_one_process_alone_and_ddp_on_several():
    auto = OmegaConf.create({"strategy": "auto"})
    assert strategy_of(auto, World()) == "single"
    assert strategy_of(auto, World(0, 0, 1, True)) == "single"
    assert strategy_of(auto, World(0, 0, 2, True)) == "ddp"
    assert strategy_of(OmegaConf.create({"strategy": "fsdp"}), World(0, 0, 1, True)) == "fsdp"


def cfg(strategy="auto", backend="auto"):
    return OmegaConf.create({"strategy": strategy, "backend": backend})


TRAINER = OmegaConf.create({"batch_size": 4, "grad_accum_steps": 3})


@pytest.mark.parametrize(
    ("distributed", "device", "world", "error"),
    [
        (cfg("fsdp"), "cpu", World(), "distributed=fsdp needs several processes: start it with torchrun"),
        (cfg(backend="nccl"), "cpu", World(0, 0, 2, True), "distributed.backend=nccl needs CUDA GPUs"),
        (
            cfg(),
            "cpu",
            World(0, 0, 8, True),
            r"the global batch of 12 sequences \(trainer.batch_size=4 x trainer.grad_accum_steps=3\) cannot be split "
            r"over 8 processes; make it a multiple of 8 or start 1, 2, 3, 4, 6, 12 processes$",
        ),
    ],
)
def test_refusals_name_the_problem_and_the_fix(distributed, device, world, error):
    with pytest.raises(UserError, match=f"^{error}"):
        check_world(distributed, TRAINER, device, False, world)


def test_a_world_that_splits_the_batch_is_accepted():
    check_world(cfg("ddp"), TRAINER, "cpu", False, World(0, 0, 6, True))
    check_world(cfg(backend="nccl"), TRAINER, "cuda", True, World(0, 0, 4, True))


class _Runs:
    """Unpickling this runs code: what a doctored metadata file would carry."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('/tmp/gpt2exp-pwned').write_text('x')",))


def test_dcp_metadata_that_names_other_code_is_refused_and_never_run(tmp_path):
    from pathlib import Path

    marker = Path("/tmp/gpt2exp-pwned")
    marker.unlink(missing_ok=True)
    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(_Runs()))
    with pytest.raises(CheckpointError, match="is not a checkpoint's metadata; refusing to unpickle it"):
        read_dcp_metadata(metadata)
    assert not marker.exists()


def test_dcp_metadata_with_pickled_values_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(Metadata(state_dict_metadata={"lr": BytesStorageMetadata()})))
    with pytest.raises(CheckpointError, match="holds pickled values, not only tensors"):
        read_dcp_metadata(metadata)


def test_a_one_process_optimizer_state_is_keyed_by_parameter_name_in_its_group_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay = [model[0].weight]
    no_decay = [model[0].bias, model[1].weight, model[1].bias]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    by_name = optimizer_state_by_name(model, optimizer, saved)
    assert [g["params"] for g in by_name["param_groups"]] == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert by_name["param_groups"][1]["weight_decay"] == 0.0
    assert torch.equal(by_name["state"]["1.weight"]["exp_avg"], saved["state"][2]["exp_avg"])
    assert set(by_name["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_a_rank_the_saving_run_did_not_have_draws_its_own_random_stream_and_the_same_one_each_resume(tmp_path):
    """A one-process checkpoint read by the ranks of a 2- or 3-process resume: rank 0 goes on with the
    saved generators, each other rank with a stream of its own (not rank 0's dropout masks again)."""
    from gpt2exp.checkpoint_sharded import read_checkpoint
    from tests.test_checkpoint import make_cfg, make_stateful

    manager = CheckpointManager(make_cfg(), tmp_path / "run")
    try:
        path = manager.save(1, make_stateful(), {}, force=True).wait()
        saved = torch.get_rng_state()
    finally:
        manager.close()

    def draws_after_reading_as(rank: int) -> torch.Tensor:
        torch.manual_seed(1234)  # whatever the process drew before the resume
        read_checkpoint(path, make_stateful(seed=5), rank)
        return torch.rand(8)

    torch.set_rng_state(saved)
    rank0_expected = torch.rand(8)
    draws = {rank: draws_after_reading_as(rank) for rank in (0, 1, 2)}
    assert torch.equal(draws[0], rank0_expected)
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    assert not torch.equal(draws[2], draws[0])
    assert torch.equal(draws_after_reading_as(1), draws[1])  # a second resume draws the same
