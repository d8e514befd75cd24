"""Small tensors cross processes as bytes (no /dev/shm file); shared ones stay shared."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from shm_files import torch_files_of

from farworker.petals import tensor_handoff


def _echo_and_mutate(queue_in, queue_out):
    # numpy, not torch ops: torch's thread pool is not safe to use in a forked child of a torch process
    small, shared, big = queue_in.get()
    shared.numpy()[:] += 1  # visible to the sender only if it really is shared memory
    queue_out.put((small, float(big.numpy().sum())))


@pytest.fixture
def installed():
    from multiprocessing.reduction import ForkingPickler

    saved = ForkingPickler._extra_reducers.get(torch.Tensor)
    assert tensor_handoff.install() or tensor_handoff._installed
    yield
    ForkingPickler._extra_reducers[torch.Tensor] = saved
    tensor_handoff._installed = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_round_trip_keeps_values_dtype_and_shape(installed, dtype):
    from multiprocessing.reduction import ForkingPickler

    for shape in [(2, 3, 8), (), (0, 4)]:
        tensor = (torch.arange(max(1, torch.Size(shape).numel())) % 7).to(dtype)[: torch.Size(shape).numel()]
        tensor = tensor.reshape(shape)
        back = ForkingPickler.loads(ForkingPickler.dumps(tensor))
        assert back.dtype == dtype and back.shape == tensor.shape and torch.equal(back, tensor)
    strided = torch.arange(24.0).reshape(4, 6)[:, ::2]  # a non-contiguous view
    assert torch.equal(ForkingPickler.loads(ForkingPickler.dumps(strided)), strided)


def test_small_tensors_leave_no_shm_file_and_shared_ones_stay_shared(installed):
    ctx = mp.get_context("fork")
    queue_in, queue_out = ctx.SimpleQueue(), ctx.SimpleQueue()
    shared = torch.zeros(4).share_memory_()
    big = torch.ones(tensor_handoff.BYTES_LIMIT // 4 + 1)  # above the limit: torch's shared-memory path
    small = torch.full((1, 1, 512), 3.0)
    before = torch_files_of([os.getpid()])
    child = ctx.Process(target=_echo_and_mutate, args=(queue_in, queue_out))
    child.start()
    ours = [os.getpid(), child.pid]  # only these two processes' files: other programs make torch files too
    queue_in.put((small, shared, big))
    echoed, big_sum = queue_out.get()
    child.join(30)
    assert child.exitcode == 0
    assert torch.equal(echoed, small) and big_sum == big.numel()
    assert torch.equal(shared, torch.ones(4))  # the child's += reached us: still shared memory
    assert not small.is_shared() and not echoed.is_shared()  # bytes, not moved into /dev/shm
    assert big.is_shared()  # torch's reducer moved it
    new_files = torch_files_of(ours) - before
    assert len(new_files) <= 1, new_files  # at most the big tensor's file (torch may unlink it at once)


def test_switch_keeps_torchs_reducer(monkeypatch):
    monkeypatch.setenv(tensor_handoff.ENV_SWITCH, "shm")
    assert tensor_handoff.install() is False
    assert os.environ[tensor_handoff.ENV_SWITCH] == "shm"


def test_petals_runtime_outputs_skip_share_memory_when_small(installed):
    from farworker.petals.compat import import_petals

    import_petals()
    from petals.server import task_pool

    original = task_pool._move_to_device_if_tensor
    try:
        assert tensor_handoff.keep_small_outputs_private()
        move = task_pool._move_to_device_if_tensor
        small = move(torch.ones(2, 1, 64), device="cpu", share_memory=True)
        big = move(torch.ones(tensor_handoff.BYTES_LIMIT // 4 + 1), device="cpu", share_memory=True)
        assert not small.is_shared() and torch.equal(small, torch.ones(2, 1, 64))
        assert big.is_shared()  # petals' own path
    finally:
        task_pool._move_to_device_if_tensor = original
