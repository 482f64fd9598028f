"""The host snapshot a background save copies the state into (gpt2exp/snapshot.py).

On the CPU the copy thread must copy memory without calling torch: a torch op on a second thread
starts a second intra-op thread team, which slowed every later training step by ~10%.
"""

from __future__ import annotations

import threading

import torch

from gpt2exp.checkpoint import CheckpointManager, verify_checkpoint
from gpt2exp.snapshot import HostSnapshot
from tests.test_checkpoint import make_cfg, make_stateful


def test_the_snapshot_holds_each_tensor_exactly_whatever_its_dtype_shape_and_layout():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "weight": torch.randn(5, 7),
        "half": torch.randn(3, 4).to(torch.bfloat16),
        "step": torch.tensor(12.0),  # AdamW's step count is a 0-dim tensor
        "ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "strided": base.t(),  # not contiguous: copied by the calling thread
        "offset": base.reshape(-1)[5:17],  # contiguous, from the middle of a storage
        "conj": torch.randn(3, dtype=torch.complex64).conj(),  # a lazy conjugate: copied by the calling thread
        "grad": torch.randn(6, requires_grad=True),
    }
    expected = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    snapshot = HostSnapshot()
    try:
        buffers, copy = snapshot.start(tensors)
        copy.on_host()
        snapshot.wait_copied()
        for name, tensor in expected.items():
            assert buffers[name].dtype == tensor.dtype and buffers[name].shape == tensor.shape, name
            assert torch.equal(buffers[name], tensor), name
            assert buffers[name].data_ptr() != tensors[name].data_ptr() or tensor.numel() == 0, name

        with torch.no_grad():  # the next save copies the changed values into the same buffers
            for name, tensor in tensors.items():
                if tensor.dtype == torch.bool:
                    tensor.logical_not_()
                elif name != "conj":
                    tensor.add_(1)
        tensors["weight"] = torch.randn(2, 3)  # a tensor of another shape gets a buffer of its own
        pointers = {name: buffer.data_ptr() for name, buffer in buffers.items() if name != "weight"}
        again, copy = snapshot.start(tensors)
        copy.on_host()
        assert {name: buffer.data_ptr() for name, buffer in again.items() if name != "weight"} == pointers
        assert again["weight"].shape == (2, 3)
        for name, tensor in tensors.items():
            assert torch.equal(again[name], tensor.detach()), name
            assert not torch.equal(again[name], expected[name]) or tensor.numel() == 0 or name == "conj", name
    finally:
        snapshot.close()


def test_the_cpu_copy_thread_of_a_background_save_calls_no_torch_function(tmp_path):
    calls: list[str] = []

    def profile(frame, event, arg):
        if not threading.current_thread().name.startswith("ckpt-copy"):
            return
        if event == "call":
            calls.append(frame.f_code.co_name)
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            torch_owned = isinstance(owner, torch.Tensor) or "torch" in (getattr(arg, "__module__", None) or "")
            calls.append(("torch " if torch_owned else "") + repr(arg))

    manager = CheckpointManager(make_cfg(async_save=True), tmp_path)
    stateful = make_stateful()
    threading.setprofile(profile)  # reaches the threads started from here on: the copier starts at the first save
    try:
        pending = manager.save(1, stateful, {}, force=True)
        manager.wait_snapshot()
        written = pending.wait()
    finally:
        threading.setprofile(None)
        manager.close()
    assert "_copy_memory" in calls  # the copy ran on this thread, seen by the profile
    assert [call for call in calls if call.startswith("torch ")] == []
    assert verify_checkpoint(written) is None
