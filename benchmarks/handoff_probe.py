"""Where the handler -> runtime hand-off time goes (benchmark 1, follow-up): a probe, no server.

In a petals server each inference step goes: connection handler process -> PrioritizedTaskPool
(mp.SimpleQueue, pickled with multiprocessing's ForkingPickler) -> runtime process -> result back through
the hivemind MPFuture's pipe. The task carries an MPFuture whose `_sender_pipe` (a multiprocessing
Connection) is pickled again for every task: multiprocessing reduces a Connection by asking the
resource-sharer thread of the sending process for a duplicate descriptor over a fresh unix socket with an
auth handshake. The step's input tensor goes through shared memory: a new /dev/shm file per tensor.

This probe times, between two processes, with the same objects petals uses (N round trips each, medians):
  pipe_bytes          - bytes over a plain mp.Pipe both ways (the floor)
  queue_tensor        - tensor through mp.SimpleQueue (shared-memory file), answer over a pipe
  mpfuture_task       - petals' way: (MPFuture, tensor) through mp.SimpleQueue, runtime side set_result(tensor)
  mpfuture_cached_pipe- the same, but the MPFuture's pipe is sent once and looked up (what a fix could save)
  mpfuture_bytes      - cached pipe, and the tensor sent as bytes instead of a shared-memory file
Nothing in hivemind or petals is changed; the variants exist only inside this probe.

    python benchmarks/handoff_probe.py --n 400 --out benchmarks/results/handoff_probe.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import time

import benchlib as bl

_CACHED_PIPE = None  # in the runtime-side process: the origin's result pipe, received once


def _import_hivemind():
    from farworker.petals.compat import restore_hivemind_names

    restore_hivemind_names()
    import torch
    from hivemind.utils import mpfuture

    return torch, mpfuture


def _runtime(kind: str, requests, reply):
    """The 'runtime' side: answers each request according to `kind` until None arrives."""
    global _CACHED_PIPE
    torch, mpfuture = _import_hivemind()
    while True:
        item = requests.recv_bytes() if kind == "pipe_bytes" else requests.get()
        if item is None or item == b"stop":
            return
        if kind == "pipe_bytes":
            reply.send_bytes(item)
        elif kind == "queue_tensor":
            reply.send_bytes(pickle.dumps(item.shape))
        elif kind == "mpfuture_task":
            future, tensor = item
            future.set_result(tensor + 1)
        elif kind in ("mpfuture_cached_pipe", "mpfuture_bytes"):
            state, payload = item
            if state.get("_sender_pipe") is not None:
                _CACHED_PIPE = state["_sender_pipe"]
            state["_sender_pipe"] = _CACHED_PIPE
            future = mpfuture.MPFuture.__new__(mpfuture.MPFuture)
            future.__setstate__(state)
            if kind == "mpfuture_bytes":
                tensor = torch.frombuffer(bytearray(payload[0]), dtype=torch.float32).reshape(payload[1])
                out = tensor + 1
                future.set_result((out.numpy().tobytes(), tuple(out.shape)))
            else:
                future.set_result(payload + 1)


def _lean_state(future, first: bool) -> dict:
    state = future.__getstate__()
    if not first:
        state["_sender_pipe"] = None  # the runtime side already holds this process's pipe
    return state


def measure(kind: str, n: int, hidden: int) -> dict:
    torch, mpfuture = _import_hivemind()
    ctx = mp.get_context("fork")
    if kind == "pipe_bytes":
        requests_recv, requests = ctx.Pipe(duplex=False)
    else:
        requests = ctx.SimpleQueue()
        requests_recv = requests
    reply_recv, reply = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_runtime, args=(kind, requests_recv, reply), daemon=True)
    child.start()
    tensor = torch.randn(1, 1, hidden)
    seconds = []
    try:
        for i in range(n + 20):  # the first 20 warm up
            begin = time.perf_counter()
            if kind == "pipe_bytes":
                requests.send_bytes(tensor.numpy().tobytes())
                reply_recv.recv_bytes()
            elif kind == "queue_tensor":
                requests.put(tensor.clone())
                reply_recv.recv_bytes()
            else:
                future = mpfuture.MPFuture()
                # petals' PrioritizedTaskPool.submit_task does the same: no shared state code
                future._shared_state_code = torch.tensor([mpfuture.ALL_STATES.index("PENDING")], dtype=torch.uint8)
                if kind == "mpfuture_task":
                    requests.put((future, tensor.clone()))
                    future.result(timeout=10)
                elif kind == "mpfuture_cached_pipe":
                    requests.put((_lean_state(future, i == 0), tensor.clone()))
                    future.result(timeout=10)
                else:
                    requests.put((_lean_state(future, i == 0), (tensor.numpy().tobytes(), tuple(tensor.shape))))
                    future.result(timeout=10)
            if i >= 20:
                seconds.append(time.perf_counter() - begin)
    finally:
        if kind == "pipe_bytes":
            requests.send_bytes(b"stop")
        else:
            requests.put(None)
        child.join(10)
        if child.is_alive():
            child.terminate()
    seconds.sort()
    return {
        "median_ms": round(bl.median(seconds) * 1000, 4),
        "p90_ms": round(seconds[int(len(seconds) * 0.9)] * 1000, 4),
        "n": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the step's tensor (tiny Llama: 128)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    info = bl.machine_info()
    kinds = ["pipe_bytes", "queue_tensor", "mpfuture_task", "mpfuture_cached_pipe", "mpfuture_bytes"]
    shm_before = bl.shm_torch_files()
    rounds = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else list(reversed(kinds)):
            rounds[kind].append(measure(kind, args.n, args.hidden))
            bl.log(f"round {r} {kind}: {rounds[kind][-1]}")
    med = {k: round(bl.median([x["median_ms"] for x in v]), 4) for k, v in rounds.items()}
    # our own leftovers only: files named after this process
    mine = {name for name in bl.shm_torch_files() - shm_before if name.startswith(f"torch_{os.getpid()}_")}
    bl.remove_shm_files({os.getpid()})
    bl.write_json(
        args.out,
        {
            "benchmark": "handoff_probe",
            "machine": info,
            "rounds": rounds,
            "median_ms": med,
            "saved_by_caching_the_pipe_ms": round(med["mpfuture_task"] - med["mpfuture_cached_pipe"], 4),
            "saved_by_caching_pipe_and_bytes_ms": round(med["mpfuture_task"] - med["mpfuture_bytes"], 4),
            "shm_files_left_by_this_process": len(mine),
        },
    )


if __name__ == "__main__":
    main()
