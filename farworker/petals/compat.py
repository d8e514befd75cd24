"""The one way farworker imports petals.

petals 2.2.0.post1 does ``from hivemind import PeerID, anext, ...`` and uses
``hivemind.TimedStorage``; hivemind 1.1.12 (the first release
with an installable wheel today) made submodule imports explicit and dropped those top-level names.
We put them back on the ``hivemind`` module, then import petals. Everything in farworker that needs
petals goes through :func:`import_petals`.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

# accelerate's init_empty_weights (petals' block loading) patches torch.nn.Module for the whole process while it
# runs: a model built in another thread meanwhile gets parameters on the meta device, and two overlapping uses can
# leave the patch in place. The coordinator loads reference blocks in background threads (probes, routed checks,
# session audits), so every such load, and every model build that may overlap one, holds this lock.
MODULE_BUILD_LOCK = threading.RLock()

# name restored on `hivemind` -> the submodule that still defines it in hivemind 1.1.12
RESTORED_NAMES: dict[str, str] = {
    "BatchTensorDescriptor": "hivemind.utils.tensor_descr",
    "DHT": "hivemind.dht",
    "MAX_DHT_TIME_DISCREPANCY_SECONDS": "hivemind.utils.timed_storage",
    "MSGPackSerializer": "hivemind.utils.serializer",
    "P2P": "hivemind.p2p",
    "P2PContext": "hivemind.p2p",
    "PeerID": "hivemind.p2p",
    "TensorDescriptor": "hivemind.utils.tensor_descr",
    "TimedStorage": "hivemind.utils.timed_storage",
    "anext": "hivemind.utils.asyncio",
    "deserialize_tensor_stream": "hivemind.compression",
    "deserialize_torch_tensor": "hivemind.compression",
    "get_dht_time": "hivemind.utils.timed_storage",
    "get_logger": "hivemind.utils.logging",
    "nested_compare": "hivemind.utils.nested",
    "nested_flatten": "hivemind.utils.nested",
    "nested_pack": "hivemind.utils.nested",
    "serialize_torch_tensor": "hivemind.compression",
}


def restore_hivemind_names() -> ModuleType:
    """Re-export on `hivemind` the names petals 2.2 imports from it; returns the hivemind module."""
    import hivemind

    for name, module_name in RESTORED_NAMES.items():
        if not hasattr(hivemind, name):
            setattr(hivemind, name, getattr(importlib.import_module(module_name), name))
    return hivemind


def import_petals() -> ModuleType:
    """Import petals with hivemind's names restored and petals' import-time noise silenced."""
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    # petals loads each block into meta tensors and fills them; torch 2.13 warns once per weight.
    warnings.filterwarnings("ignore", category=UserWarning, message=".*copying from a non-meta parameter.*")
    restore_hivemind_names()
    with warnings.catch_warnings():
        # transformers 4.34 calls a torch pytree function that torch 2.13 renamed; harmless, noisy
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*_register_pytree_node.*")
        import petals

    _make_session_finalizer_safe()
    _make_p2p_collection_quiet()
    return petals


def _make_p2p_collection_quiet() -> None:
    """hivemind's P2P and its daemon client cancel their reader tasks in __del__ through cancel_task_if_running,
    which asks for the current thread's event loop and forgives only a closed one. Collected on a thread that has
    none (the demo's main thread, once the coordinator's client loop has ended), uvloop raises "There is no current
    event loop" and Python prints three "Exception ignored in P2P.__del__" tracebacks. Such a thread has nothing to
    cancel: the tasks belong to a loop that is not running there."""
    import asyncio

    from hivemind.p2p import p2p_daemon
    from hivemind.p2p.p2p_daemon_bindings import control
    from hivemind.utils import asyncio as hivemind_asyncio

    original = hivemind_asyncio.cancel_task_if_running
    if getattr(original, "_farworker_quiet", False):
        return

    def cancel_task_if_running(task):
        if task is None or task.done():
            return
        try:
            asyncio.get_event_loop()
        except RuntimeError:  # no event loop in this thread: nothing here can cancel that task
            return
        original(task)

    cancel_task_if_running._farworker_quiet = True
    for module in (hivemind_asyncio, p2p_daemon, control):  # the two import it by name
        module.cancel_task_if_running = cancel_task_if_running


def _make_session_finalizer_safe() -> None:
    """petals' client sessions close themselves in __del__ by waiting on hivemind's client event loop.

    When the garbage collector runs that __del__ on the event-loop thread itself (it can: any allocation
    there may trigger a collection), the loop waits for itself and every client request in the process
    hangs forever. Seen with the coordinator's client during a mesh re-route. On the loop thread we
    schedule the close instead of waiting for it.
    """
    import asyncio
    import threading

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client.inference_session import _ServerInferenceSession

    if getattr(_ServerInferenceSession, "_farworker_safe_del", False):
        return

    def __del__(self):
        if self._outputs_stream is None:
            return
        if threading.current_thread() is RemoteExpertWorker._event_thread:
            def mark_closed(_task, session=self):
                session._outputs_stream = session._inputs_queue = None
                session.closed = True

            asyncio.get_event_loop().create_task(self._aclose_stream()).add_done_callback(mark_closed)
        else:
            self.close()

    _ServerInferenceSession.__del__ = __del__
    _ServerInferenceSession._farworker_safe_del = True


# A p2p daemon that can only dial out directly: no relay (petals' reachability probe used the same options).
DIRECT_DIAL_OPTIONS = dict(dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True)


def dial_directly(peer_id: str, maddrs: list[str], timeout: float) -> dict[str, str | None]:
    """Dial each of ``peer_id``'s multiaddrs on its own: {address: None if a connection to that peer opened,
    else why not}. libp2p's handshake proves the peer id, so another peer at the address fails too.

    Each address gets a fresh daemon: one daemon remembers the addresses it learns from a peer (identify), and
    would reach it again over those, so a wrong address dialled after a right one would look reachable. The
    whole call ends within about ``2 * timeout`` per address (daemon start, then the dial)."""
    import asyncio

    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    async def dial(address: str) -> str | None:
        try:
            target = Multiaddr(address)
            named = target.value_for_protocol("p2p") if "p2p" in [p.name for p in target.protocols()] else None
        except Exception as err:
            return f"not a multiaddr ({err})"
        if named is not None:
            if named != peer_id:
                return f"names another peer ({named})"
            target = target.decapsulate(Multiaddr(f"/p2p/{named}"))
        p2p = None
        try:
            p2p = await P2P.create(startup_timeout=timeout, **DIRECT_DIAL_OPTIONS)
            await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer_id), [target]), timeout)
            return None
        except TimeoutError:
            return f"no connection within {timeout:g} s"
        except Exception as err:
            return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        finally:
            if p2p is not None:
                await p2p.shutdown()

    async def dial_all() -> dict[str, str | None]:
        return {address: await dial(address) for address in maddrs}

    return asyncio.run(dial_all())


def is_dummy_tensor(tensor) -> bool:
    """petals' marker for an absent optional tensor (e.g. no beam reorder): an empty tensor."""
    from petals.utils.misc import is_dummy

    return is_dummy(tensor)


# petals' client InferenceSession keeps its per-server sessions and their positions in private fields; the
# coordinator's route accounting (what pays workers) reads them here, so a petals upgrade breaks in one place.
def server_sessions_of(session) -> list:
    """The server sessions a client InferenceSession has open now (one per span of its route)."""
    return list(session._server_sessions)


def tokens_processed(server_session) -> int:
    """How many token positions a client-side server session has sent through its span."""
    return int(server_session._position)


def on_server_sessions_dropped(session, callback) -> None:
    """Call ``callback(server_sessions)`` with the server sessions petals drops while re-routing after a failure,
    before it closes them, so their served tokens are still counted."""
    original = session._exit_server_sessions

    def exit_and_report(server_sessions):
        callback(server_sessions)
        return original(server_sessions)

    session._exit_server_sessions = exit_and_report


def on_first_steps(session, callback) -> None:
    """Call ``callback(server_session, sent, returned)`` once per server session of ``session``, after its first
    step: the hidden states it sent (the whole prefix, with no past on the server: recomputable from scratch) and
    the hidden states the server returned. Server sessions that a re-route creates later are watched too.

    Sessions with deep prompts (p-tuning) are skipped: the server adds them inside the span."""
    _on_entered_server_sessions(session, lambda server_session: _watch_first_step(server_session, callback))


def _on_entered_server_sessions(session, each) -> None:
    """Call ``each(server_session)`` for every server session petals opens for ``session``, the ones a re-route
    opens later included (petals' InferenceSession._enter_server_sessions)."""
    original_enter = session._enter_server_sessions

    def enter_and_watch(chosen_spans):
        server_sessions = original_enter(chosen_spans)
        for server_session in server_sessions:
            each(server_session)
        return server_sessions

    session._enter_server_sessions = enter_and_watch


def _watch_first_step(server_session, callback) -> None:
    original_step = server_session.step  # the bound method; the instance attribute below shadows it

    def step(inputs, prompts, hypo_ids, *, step_id):
        first = not server_session.stepped
        outputs = original_step(inputs, prompts, hypo_ids, step_id=step_id)
        if first:
            if server_session.__dict__.get("step") is step:
                del server_session.step  # later steps go straight to petals (unless another watch wraps this one)
            if is_dummy_tensor(prompts):
                # on its first step a server session sends its whole history (petals' _ServerInferenceSession.step)
                callback(server_session, server_session.history.detach().clone(), outputs.detach().clone())
        return outputs

    server_session.step = step


def on_every_step(session, watch) -> None:
    """For each server session petals opens for ``session`` (re-routes included), ``watch(peer_id, span,
    session_id)`` returns None (the session is not watched: petals' own step runs, nothing is kept) or a
    ``record(position, sent, returned, plain)`` called after each of that server session's steps with the first
    position the step covered, the hidden states actually sent (on a server session's first step, its whole
    history: a session opened by a re-route replays every earlier position), those returned, and ``plain``: no
    deep prompts and no beam reorder, so the step is recomputable from the hidden states alone."""
    def watch_one(server_session) -> None:
        span = server_session.span
        record = watch(span.peer_id.to_base58(), (int(span.start), int(span.end)), str(server_session.session_id))
        if record is not None:
            _record_steps(server_session, record)

    _on_entered_server_sessions(session, watch_one)


def _record_steps(server_session, record) -> None:
    original_step = server_session.step  # the bound method; the instance attribute below shadows it

    def step(inputs, prompts, hypo_ids, *, step_id):
        first = not server_session.stepped
        position = tokens_processed(server_session)
        outputs = original_step(inputs, prompts, hypo_ids, step_id=step_id)
        # petals' _ServerInferenceSession.step sends its whole history on the first step, then the new positions
        sent = server_session.history if first else inputs
        record(position, sent, outputs, is_dummy_tensor(prompts) and is_dummy_tensor(hypo_ids))
        return outputs

    server_session.step = step
