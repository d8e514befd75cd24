"""The names farworker restores on `hivemind` are exactly those petals needs and hivemind lacks."""

import ast
from pathlib import Path

from farworker.petals.compat import RESTORED_NAMES, import_petals, restore_hivemind_names


def names_petals_takes_from_hivemind() -> set[str]:
    import importlib.util

    root = Path(importlib.util.find_spec("petals").origin).parent
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "hivemind" and node.level == 0:
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hivemind":
                names.add(node.attr)
    return names


def test_restored_names_are_pinned():
    assert sorted(RESTORED_NAMES) == [
        "BatchTensorDescriptor", "DHT", "MAX_DHT_TIME_DISCREPANCY_SECONDS", "MSGPackSerializer", "P2P",
        "P2PContext", "PeerID", "TensorDescriptor", "TimedStorage", "anext", "deserialize_tensor_stream",
        "deserialize_torch_tensor", "get_dht_time", "get_logger", "nested_compare", "nested_flatten",
        "nested_pack", "serialize_torch_tensor",
    ]


def test_every_name_petals_uses_exists_after_restoring():
    hivemind = restore_hivemind_names()
    missing = sorted(name for name in names_petals_takes_from_hivemind() if not hasattr(hivemind, name))
    assert missing == []


def test_restored_names_are_the_real_objects():
    hivemind = restore_hivemind_names()
    from hivemind.p2p import PeerID
    from hivemind.utils.asyncio import anext

    assert hivemind.PeerID is PeerID
    assert hivemind.anext is anext


def test_petals_imports_and_serves_llama():
    petals = import_petals()
    assert petals.__version__ == "2.2.0.post1"
    from petals.server.server import Server  # noqa: F401  (the server module imports most of hivemind)


def test_a_session_collected_on_the_client_loop_thread_does_not_hang_the_loop():
    import asyncio

    import_petals()
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client.inference_session import _ServerInferenceSession

    closed = []

    async def outputs():
        closed.append("stream ended")
        yield None

    async def collect_on_the_loop_thread():
        session = _ServerInferenceSession.__new__(_ServerInferenceSession)
        session._inputs_queue, session._outputs_stream = asyncio.Queue(), outputs()
        session.stepped, session.closed = True, False
        session.__del__()  # what the garbage collector does when it runs on this thread
        await asyncio.sleep(0.1)  # let the scheduled close run
        return session.closed

    future = RemoteExpertWorker.run_coroutine(collect_on_the_loop_thread(), return_future=True)
    assert future.result(timeout=10) is True  # unpatched petals waits on its own loop here forever
    assert closed == ["stream ended"]
