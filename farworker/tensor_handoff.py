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
        if (
            tensor.device.type != "cpu"
            or tensor.requires_grad
            or tensor.is_shared()
            or tensor.layout != torch.strided
            or tensor.is_quantized
            or type(tensor) is not torch.Tensor
            or tensor.numel() * tensor.element_size() > BYTES_LIMIT
        ):
            return reduce_tensor(tensor)
        flat = tensor.detach().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return rebuild_tensor, (data, flat.dtype, tuple(tensor.shape))

    ForkingPickler.register(torch.Tensor, reduce_small_tensor)
    _installed = True
    return True


def rebuild_tensor(data: bytes, dtype, shape: tuple[int, ...]):
    import torch

    if not data:
        return torch.empty(shape, dtype=dtype)
    # bytearray: a writable buffer, so the tensor owns memory it may modify in place.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
