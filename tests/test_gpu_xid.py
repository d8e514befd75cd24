"""The Xid counter: farworker's own thread and telemetry over a fake NVML event set (tests have no GPU).

FakeEvents (in test_status_and_metrics_gpu) hands out scripted Xid events, then blocks for the wait's
timeout and fails with Timeout, as NVML's nvmlEventSetWait does when nothing happens.
"""

from __future__ import annotations

import logging
import threading
import time

import pynvml
import pytest
from polling import wait_for
from prometheus_client import generate_latest
from test_status_and_metrics_gpu import CARDS, FakeEvents, _fake_nvml, xid_counter_samples, xid_total

from farworker import gpu, gpu_xid
from farworker.metrics import build_registry
from farworker.status_view import format_status
from farworker.wire_records import HeartbeatRequest


def counter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "xid-counter"]


@pytest.fixture
def nvml(monkeypatch):
    """install(events) -> the fake NVML that gpu._nvml() answers; the counter is stopped afterwards."""

    def install(events: FakeEvents):
        fake = _fake_nvml(events)
        monkeypatch.setattr(gpu, "_nvml", lambda: fake)
        return fake

    yield install
    gpu.stop_xid_counter()
    assert not counter_threads()


def test_counts_each_gpus_xids_by_code_and_logs_each(nvml, monkeypatch, caplog):
    monkeypatch.setitem(CARDS[1], "xid_events", True)  # a second datacenter GPU
    events = FakeEvents([(0, 79), (1, 13), (0, 48), (1, 13), (0, 48), (1, 31), (0, 250)])
    nvml(events)
    with caplog.at_level(logging.WARNING, logger="farworker.gpu_xid"):
        gpu.start_xid_counter()
        wait_for(lambda: xid_total(0)() == 4 and xid_total(1)() == 3, timeout=10, what="7 Xids counted", step=0.05)
    assert events.registered == [0, 1]
    first, second = gpu.telemetry()
    assert (first["xid_errors"], first["xid_last"], first["xid_by_code"]) == (4, 250, {"48": 2, "79": 1, "250": 1})
    assert (second["xid_errors"], second["xid_last"], second["xid_by_code"]) == (3, 31, {"13": 2, "31": 1})
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Xid 79 on GPU 0: GPU has fallen off the bus",
        "Xid 13 on GPU 1: graphics engine exception (application fault)",
        "Xid 48 on GPU 0: double-bit ECC error",
        "Xid 13 on GPU 1: graphics engine exception (application fault)",
        "Xid 48 on GPU 0: double-bit ECC error",
        "Xid 31 on GPU 1: GPU memory page fault (application fault)",
        "Xid 250 on GPU 0: see NVIDIA's Xid catalog",
    ]
    HeartbeatRequest.model_validate(
        {  # what the heartbeat carries passes the coordinator's model
            "state": "online",
            "uptime_seconds": 1.0,
            "gpus": gpu.telemetry(),
            "counters": {"requests": 0, "inference_steps": 0, "tokens_processed": 0, "errors": 0},
        }
    )


def test_a_gpu_without_xid_events_reports_null(nvml):
    """GPU 1 (a consumer card) refuses the registration with NotSupported: null, while GPU 0 is counted."""
    events = FakeEvents([(0, 63)])
    nvml(events)
    gpu.start_xid_counter()
    wait_for(xid_total(0), timeout=10, what="GPU 0's Xid counted", step=0.05)
    assert events.registered == [0]
    h100, rtx = gpu.telemetry()
    assert (h100["xid_errors"], h100["xid_last"], h100["xid_by_code"]) == (1, 63, {"63": 1})
    assert (rtx["xid_errors"], rtx["xid_last"], rtx["xid_by_code"]) == (None, None, None)


def test_no_thread_when_no_gpu_reports_xid_events(nvml, monkeypatch):
    monkeypatch.setitem(CARDS[0], "xid_events", False)
    events = FakeEvents()
    nvml(events)
    gpu.start_xid_counter()
    assert not counter_threads() and events.freed == 1 and events.waits == 0
    assert [g["xid_errors"] for g in gpu.telemetry()] == [None, None]


def test_no_thread_and_no_error_without_nvml(monkeypatch):
    monkeypatch.setattr(gpu, "_nvml", lambda: None)
    gpu.start_xid_counter()
    assert not counter_threads() and gpu.telemetry() == []
    gpu.stop_xid_counter()


def test_stop_ends_the_waiting_thread_promptly(nvml):
    events = FakeEvents([(0, 48)])
    nvml(events)
    gpu.start_xid_counter()
    wait_for(lambda: events.waits >= 3, timeout=10, what="the counter waiting past its events", step=0.05)
    (thread,) = counter_threads()
    started = time.monotonic()
    gpu.stop_xid_counter()
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert elapsed < gpu_xid.WAIT_MS / 1000 + 2.0, elapsed  # at most one NVML wait (and a busy machine's delay)
    assert events.freed == 1  # the thread frees its event set on the way out
    assert [g["xid_errors"] for g in gpu.telemetry()] == [None, None]  # no counter running now


def test_a_failing_wait_is_logged_once_and_stop_stays_prompt(nvml, caplog):
    """A lost GPU can make every wait fail at once: no busy loop, one warning, and stop still prompt."""
    events = FakeEvents([(0, 79)], failure=pynvml.NVML_ERROR_GPU_IS_LOST)
    nvml(events)
    with caplog.at_level(logging.WARNING, logger="farworker.gpu_xid"):
        gpu.start_xid_counter()
        wait_for(lambda: events.waits >= 2, timeout=10, what="a failed wait", step=0.05)
        time.sleep(0.3)
        assert events.waits == 2  # the thread now pauses for ERROR_PAUSE seconds instead of spinning
        started = time.monotonic()
        gpu.stop_xid_counter()
        assert time.monotonic() - started < gpu_xid.ERROR_PAUSE / 2  # not the pause's whole 5 s
    assert xid_total(0)() is None  # stopped
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "Xid 79 on GPU 0: GPU has fallen off the bus"
    assert len(messages) == 2 and messages[1].startswith("Waiting for Xid events failed, retrying: ")


def test_metrics_and_status_before_any_xid(nvml):
    """Counted and none seen: 0 (DCGM's XID_ERRORS is 0 before any Xid); not counted: no sample, 'n/a'."""
    nvml(FakeEvents())
    gpu.start_xid_counter()
    status = {"state": "online", "healthy": True, "updated_at": time.time(), "gpus": gpu.telemetry()}
    exposition = generate_latest(build_registry(lambda: status)).decode()
    xid_gauge = [line for line in exposition.splitlines() if line.startswith("DCGM_FI_DEV_XID_ERRORS{")]
    assert len(xid_gauge) == 1 and 'gpu="0"' in xid_gauge[0] and xid_gauge[0].endswith(" 0.0")
    assert xid_counter_samples(exposition) == {"0": 0}
    gpu_lines = [line for line in format_status(status) if line.startswith("GPU")]
    assert gpu_lines[0].endswith(", Xid 0") and gpu_lines[1].endswith(", Xid n/a")
