"""The host snapshot a background save copies the state into (gpt2exp/snapshot.py).

On the CPU the copy thread must copy memory without calling torch: a torch op on a second thread
starts a second intra-op thread team, which slowed every later training step by ~10%.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from gpt2exp.checkpoint import CheckpointManager, verify_checkpoint
from gpt2exp.snapshot import HostMemory, HostSnapshot
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
        pointers = {name: buffer.data_ptr() for name, buffer in buffers.items()}
        again, copy = snapshot.start(tensors)
        copy.on_host()
        snapshot.wait_copied()
        assert {name: buffer.data_ptr() for name, buffer in again.items()} == pointers  # reused
        for name, tensor in tensors.items():
            assert torch.equal(again[name], tensor.detach()), name
            assert not torch.equal(again[name], expected[name]) or tensor.numel() == 0 or name == "conj", name

        tensors["weight"] = torch.randn(2, 3)  # a tensor of another shape: buffers for the new layout
        changed, copy = snapshot.start(tensors)
        copy.on_host()
        assert changed["weight"].shape == (2, 3)
        for name, tensor in tensors.items():
            assert torch.equal(changed[name], tensor.detach()), name
    finally:
        snapshot.close()


def test_the_buffers_are_views_of_one_allocation_of_the_exact_size_each_on_a_cache_line():
    tensors = {
        "weight": torch.randn(5, 7),  # 140 bytes: padded to 192
        "step": torch.tensor(3.0),  # 4 bytes: 64
        "empty": torch.empty(0, 3),  # 0 bytes: 0
        "half": torch.randn(3).to(torch.bfloat16),  # 6 bytes: 64
        "ids": torch.arange(16, dtype=torch.int64),  # 128 bytes: 128
    }
    snapshot = HostSnapshot()
    try:
        snapshot.reserve(tensors)  # the buffers exist before the first save
        reserved = {name: buffer.data_ptr() for name, buffer in snapshot._buffers.items()}
        buffers, copy = snapshot.start(tensors)
        copy.on_host()
        assert {name: buffer.data_ptr() for name, buffer in buffers.items()} == reserved
        base = snapshot._host.memory.ctypes.data
        assert snapshot._host.memory.nbytes == 192 + 64 + 0 + 64 + 128
        assert {name: buffer.data_ptr() - base for name, buffer in buffers.items() if name != "empty"} == {
            "weight": 0, "step": 192, "half": 256, "ids": 320,
        }  # fmt: skip
        # each its own storage of its own bytes: torch.save writes no neighbour's, and none looks tied
        assert {name: buffer.untyped_storage().nbytes() for name, buffer in buffers.items()} == {
            "weight": 140, "step": 4, "empty": 0, "half": 6, "ids": 128,
        }  # fmt: skip
        for name, tensor in tensors.items():
            assert buffers[name].shape == tensor.shape and torch.equal(buffers[name], tensor), name
    finally:
        snapshot.close()


class FakeCuda:
    """The CUDA calls page-locking makes, as this CPU machine can check them: which call, on which
    thread, for which GPU and which bytes."""

    def __init__(self, monkeypatch, status: int):
        self.status, self.calls, self.device = status, [], None
        monkeypatch.setattr(torch.cuda, "cudart", lambda: self)
        monkeypatch.setattr(torch.cuda, "device", self.current)

    @contextlib.contextmanager
    def current(self, device):
        self.device = device
        yield
        self.device = None

    def cudaHostRegister(self, pointer, size, flags):
        self.calls.append(("register", threading.current_thread().name, self.device, pointer, size, flags))
        return self.status

    def cudaHostUnregister(self, pointer):
        self.calls.append(("unregister", threading.current_thread().name, pointer))
        return 0


class OnGpu:
    """What the snapshot reads of a tensor to lay out its buffers, for a tensor on a GPU."""

    def __init__(self, *shape: int, index: int = 1):
        self.shape, self.dtype, self.device = shape, torch.float32, torch.device("cuda", index)


def test_buffers_for_a_gpu_are_page_locked_on_the_copy_thread_exactly_their_bytes_and_unlocked_on_close(
    monkeypatch,
):
    cuda = FakeCuda(monkeypatch, status=0)
    snapshot = HostSnapshot()
    pinning = snapshot.reserve({"weight": OnGpu(5, 7), "step": OnGpu()})  # 140 + 4 bytes, laid out as 192 + 64
    pinning.result()  # in the background
    pointer = snapshot._host.memory.ctypes.data
    assert pointer % 64 == 0
    # 256 bytes, not 512: no power-of-two rounding; on the copy thread, with the tensors' GPU current
    ((call, thread, device, registered, size, flags),) = cuda.calls
    assert (call, device, registered, size, flags) == ("register", torch.device("cuda", 1), pointer, 256, 1)
    assert thread.startswith("ckpt-copy")
    assert snapshot.reserve({"weight": OnGpu(5, 7), "step": OnGpu()}) is pinning  # the same layout: nothing new
    assert len(cuda.calls) == 1
    snapshot.close()
    assert cuda.calls[1][0] == "unregister" and cuda.calls[1][1].startswith("ckpt-copy") and cuda.calls[1][2] == pointer
    assert len(cuda.calls) == 2


@pytest.mark.parametrize("fails", ["registration", "device"])
def test_memory_that_cannot_be_page_locked_still_holds_the_snapshot_and_says_so(monkeypatch, caplog, fails):
    cuda = FakeCuda(monkeypatch, status=2)  # cudaErrorMemoryAllocation
    if fails == "device":

        def no_such_gpu(device):
            raise RuntimeError("CUDA error: invalid device ordinal")

        monkeypatch.setattr(torch.cuda, "device", no_such_gpu)
    host = HostMemory(64)
    host.pin(torch.device("cuda", 0))
    host.unpin()
    assert [call[0] for call in cuda.calls] == (["register"] if fails == "registration" else [])  # none unregistered
    assert host.views([("x", (4,), torch.float32)])["x"].shape == (4,)
    problem = "CUDA error 2" if fails == "registration" else "RuntimeError('CUDA error: invalid device ordinal')"
    assert caplog.messages == [
        f"could not page-lock 64 bytes for background checkpoint saves ({problem}); "
        "their copy from the GPU will block training"
    ]


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


def test_a_frozen_state_holds_nothing_live_and_keeps_what_the_pickle_shares():
    """A deque or set (copied whole), a defaultdict (its factory kept), a tuple shared by two groups (the
    very object, as in the live state's pickle): a later step's change reaches none of them."""
    import collections

    from gpt2exp.snapshot import _rebuilt

    live = torch.ones(2)
    copied = torch.zeros(2)
    betas = (0.9, 0.95)
    state = {
        "groups": [{"lr": 1e-3, "betas": betas}, {"lr": 1e-3, "betas": betas}],
        "history": collections.deque([live]),
        "seen": {1, 2},
        "by_key": collections.defaultdict(list, {"x": [live]}),
        "exp_avg": live,
    }
    frozen = _rebuilt(state, {id(live): copied}, {})
    live.add_(5)
    state["groups"][0]["lr"] = 5e-4
    state["seen"].add(3)
    assert frozen["exp_avg"] is copied and frozen["by_key"]["x"][0] is copied
    assert frozen["history"][0].tolist() == [1.0, 1.0]  # a deque is copied whole, tensor and all
    assert frozen["groups"][0]["lr"] == 1e-3 and frozen["seen"] == {1, 2}
    assert frozen["by_key"].default_factory is list
    assert frozen["groups"][0]["betas"] is betas and frozen["groups"][1]["betas"] is betas
