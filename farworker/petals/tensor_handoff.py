"""Small CPU tensors cross process boundaries as bytes, not as shared-memory files.

Every inference step hands its activations from a petals handler process to the runtime (a task in
an ``mp.SimpleQueue``) and back (``MPFuture.set_result`` over a pipe). Both pickle with
``multiprocessing``'s ForkingPickler, for which torch registers a reducer that moves each tensor's storage
into a fresh ``/dev/shm/torch_*`` file: create, truncate, mmap, then an fd hand-off, per tensor, each way.
For a step's activations (kilobytes) copying the bytes is ~0.4 ms cheaper per round trip
(benchmarks/handoff_probe.py), and no file is left in /dev/shm when a process dies mid-request (the
leak in ../shared/facts.md).

Kept on torch's reducer: tensors already in shared memory (hivemind's future state codes and petals'
attention cache depend on being shared), anything on an accelerator (CUDA IPC), tensors that need grad,
and anything above ``BYTES_LIMIT`` (where one copy through the pipe costs more than the file).
"""

from __future__ import annotations

import os

BYTES_LIMIT = 1 << 20  # 1 MiB: a 7B model's step for one sequence is 8 KiB (4096 x fp16)
ENV_SWITCH = "FARWORKER_TENSOR_HANDOFF"  # "shm" keeps torch's reducer for every tensor

_installed = False


def install() -> bool:
    """Register the reducer for this process and the handler processes it forks. Returns whether it did."""
    global _installed
    if _installed or os.environ.get(ENV_SWITCH, "bytes") == "shm":
        return _installed
    from multiprocessing.reduction import ForkingPickler

    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    def reduce_small_tensor(tensor: torch.Tensor):
        if tensor.device.type != "cpu" or tensor.is_shared() or tensor.is_quantized or not _sent_as_bytes(tensor):
            return reduce_tensor(tensor)
        flat = tensor.detach().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return rebuild_tensor, (data, flat.dtype, tuple(tensor.shape))

    ForkingPickler.register(torch.Tensor, reduce_small_tensor)
    _installed = True
    return True


def keep_small_outputs_private() -> bool:
    """petals' runtime calls ``share_memory_()`` on every output before ``set_result`` sends it back to the
    handler, which creates the shared-memory file that ``install()`` avoids. Skip that for the tensors the
    reducer sends as bytes; large ones are still shared. Call after ``import_petals()``."""
    if not _installed:
        return False
    from petals.server import task_pool

    original = task_pool._move_to_device_if_tensor
    if getattr(original, "_farworker_wrapped", False):
        return True

    def move_to_device_if_tensor(arg, device, share_memory: bool = False):
        if share_memory and str(device) == "cpu" and _sent_as_bytes(arg):
            # A blocking copy, as petals makes before sharing: the bytes are read right after (pickling), and a
            # non-blocking copy from a GPU may not have landed by then.
            return arg.detach().to(device, non_blocking=False)
        return original(arg, device, share_memory=share_memory)

    move_to_device_if_tensor._farworker_wrapped = True
    task_pool._move_to_device_if_tensor = move_to_device_if_tensor
    return True


def _sent_as_bytes(arg) -> bool:
    import torch

    # The result's size is the same on any device; its device after the move is cpu.
    return (
        type(arg) is torch.Tensor
        and not arg.requires_grad
        and arg.layout == torch.strided
        and arg.numel() * arg.element_size() <= BYTES_LIMIT
    )


def rebuild_tensor(data: bytes, dtype, shape: tuple[int, ...]):
    import torch

    if not data:
        return torch.empty(shape, dtype=dtype)
    # bytearray: a writable buffer, so the tensor owns memory it may modify in place.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
