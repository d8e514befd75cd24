"""`farworker status` and /metrics for a worker with two GPUs and a heartbeat behind it.

The GPU readings come from the worker's own NVML reader (gpu.telemetry) over a fake NVML that answers in
NVML's units (bytes, mW, MHz), so the status file has exactly the shape `farworker run` writes, and the
unit conversions on the way to DCGM's units (MiB, W) are the code's, not the test's. The Xid counts come
from the worker's own Xid counter thread, fed by a fake NVML event set (FakeEvents).
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from types import SimpleNamespace

import pynvml
import pytest
import requests
from click.testing import CliRunner
from polling import wait_for
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from farworker import gpu
from farworker.cli import main
from farworker.coordinator.schemas.workers import HeartbeatResponse
from farworker.metrics import build_registry, start_metrics_server
from farworker.reporting import format_rate
from farworker.status_file import STALE_AFTER, read_status, status_path, write_status
from farworker.status_view import format_status
from farworker.wire_records import GpuTelemetry

MIB = 2**20

# What NVML answers for each GPU. GPU 1 is a consumer card: no ECC, so NVML refuses those reads.
CARDS = [
    {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-11111111-2222-3333-4444-555555555555",
        "total_mib": 81559,
        "used_mib": 61440,
        "util": 87,
        "temp": 63,
        "power_mw": 287123,
        "sm_mhz": 1980,
        "mem_mhz": 2619,
        "ecc_dbe": 3,
        "retired_dbe_pages": [0x1000, 0x2000],
        "xid_events": True,
    },
    {
        "name": "NVIDIA GeForce RTX 4090",
        "uuid": "GPU-66666666-7777-8888-9999-000000000000",
        "total_mib": 24564,
        "used_mib": 10240,
        "util": 42,
        "temp": 55,
        "power_mw": 301500,
        "sm_mhz": 2520,
        "mem_mhz": 10501,
        "ecc_dbe": None,
        "retired_dbe_pages": None,
        "xid_events": False,  # NVML refuses to register it for Xid events
    },
]

ANSWER = {"earn_rate_far_per_hour": 3.6e-05, "reliability": 0.987654, "uptime_pct": 98.765, "heartbeat_interval": 15,
          "uptime_new": False, "quarantined": None, "settled_far": 0.25, "pending_far": 0.5, "forfeited_far": 0.0}


# What GPU 0 reports while the status fixture's worker runs: two double-bit ECC errors, then a row remap.
XIDS = [(0, 48), (0, 48), (0, 63)]


class FakeEvents:
    """NVML's event set: the scripted (GPU handle, Xid) events in order, then what NVML's wait does with
    none pending: block for the timeout and fail with Timeout (or, given `failure`, fail with it at once)."""

    def __init__(self, events=(), failure: int | None = None):
        self.pending = deque(events)
        self.failure = failure
        self.registered: list[int] = []
        self.waits = 0
        self.freed = 0

    def create(self):
        return self

    def register(self, handle, event_types, event_set):
        assert event_set is self and event_types == pynvml.nvmlEventTypeXidCriticalError
        if not CARDS[handle]["xid_events"]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self.registered.append(handle)

    def wait(self, event_set, timeout_ms):
        assert event_set is self and not self.freed, "waiting on a freed event set"
        self.waits += 1
        if self.pending:
            handle, xid = self.pending.popleft()
            return SimpleNamespace(device=handle, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid,
                                   gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
        if self.failure is not None:
            raise pynvml.NVMLError(self.failure)
        time.sleep(timeout_ms / 1000)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def free(self, event_set):
        assert event_set is self
        self.freed += 1


def _fake_nvml(events: FakeEvents | None = None) -> SimpleNamespace:
    events = events or FakeEvents()

    def card(handle):
        return CARDS[handle]

    def supported(value):
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def memory(handle):
        total, used = card(handle)["total_mib"] * MIB, card(handle)["used_mib"] * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    clocks = {pynvml.NVML_CLOCK_SM: "sm_mhz", pynvml.NVML_CLOCK_MEM: "mem_mhz"}
    return SimpleNamespace(
        NVML_TEMPERATURE_GPU=pynvml.NVML_TEMPERATURE_GPU,
        NVML_CLOCK_SM=pynvml.NVML_CLOCK_SM,
        NVML_CLOCK_MEM=pynvml.NVML_CLOCK_MEM,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        NVML_VOLATILE_ECC=pynvml.NVML_VOLATILE_ECC,
        NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR=pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        nvmlDeviceGetCount=lambda: len(CARDS),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda h: card(h)["name"].encode(),  # older bindings answer bytes
        nvmlDeviceGetUUID=lambda h: card(h)["uuid"],
        nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=card(h)["util"], memory=30),
        nvmlDeviceGetTemperature=lambda h, sensor: card(h)["temp"],
        nvmlDeviceGetPowerUsage=lambda h: card(h)["power_mw"],  # NVML: milliwatts
        nvmlDeviceGetClockInfo=lambda h, clock: card(h)[clocks[clock]],
        nvmlDeviceGetTotalEccErrors=lambda h, kind, counter: supported(card(h)["ecc_dbe"]),
        nvmlDeviceGetRetiredPages=lambda h, cause: supported(card(h)["retired_dbe_pages"]),
        nvmlDeviceGetIndex=lambda h: h,
        nvmlEventTypeXidCriticalError=pynvml.nvmlEventTypeXidCriticalError,
        nvmlEventSetCreate=events.create,
        nvmlDeviceRegisterEvents=events.register,
        nvmlEventSetWait=events.wait,
        nvmlEventSetFree=events.free,
    )


def xid_total(index: int):
    return lambda: gpu.telemetry()[index]["xid_errors"]


@pytest.fixture
def telemetry(monkeypatch) -> list[dict]:
    """The readings of a worker whose Xid counter has seen XIDS."""
    events = FakeEvents(XIDS)
    fake = _fake_nvml(events)
    monkeypatch.setattr(gpu, "_nvml", lambda: fake)
    gpu.start_xid_counter()
    try:
        wait_for(lambda: xid_total(0)() == len(XIDS), timeout=10, what="the scripted Xids counted", step=0.05)
        return gpu.telemetry()
    finally:
        gpu.stop_xid_counter()


@pytest.fixture
def status(telemetry) -> dict:
    """A status document shaped like Worker.status_snapshot, one heartbeat 12 s ago."""
    now = time.time()
    return {
        "state": "online",
        "healthy": True,
        "health_reason": None,
        "model_name": "farworker-tiny-llama",
        "blocks": [0, 4],
        "peer_id": "12D3KooWFakePeer",
        "maddrs": [],
        "peers": 3,
        "open_sessions": 2,
        "counters": {"requests": 7, "inference_steps": 40, "tokens_processed": 321, "errors": 1},
        "last_heartbeat": {"at": now - 12, "payload": {"state": "online", "gpus": telemetry}, "answer": ANSWER},
        "outbox_depth": 5,
        "gpus": telemetry,
        "started_at": now - 3600,
        "pid": 4242,
    }


@pytest.fixture
def state_dir(tmp_path, status):
    write_status(tmp_path, status)  # the worker's own writer: atomic, stamps updated_at
    return tmp_path


def test_fixture_matches_what_the_worker_reports(telemetry):
    """The readings are the ones a heartbeat carries (the coordinator's schema) in the worker's units."""
    assert [GpuTelemetry.model_validate(g).index for g in telemetry] == [0, 1]
    HeartbeatResponse.model_validate(ANSWER)
    h100, rtx = telemetry
    assert h100["name"] == CARDS[0]["name"]  # bytes from NVML decoded
    assert h100["memory_used_bytes"] == 61440 * MIB and h100["memory_total_bytes"] == 81559 * MIB
    assert h100["power_w"] == pytest.approx(287.123)  # mW -> W
    assert h100["ecc_volatile_uncorrected"] == 3 and h100["retired_pages_dbe"] == 2
    assert rtx["ecc_volatile_uncorrected"] is None and rtx["retired_pages_dbe"] is None
    assert (h100["xid_errors"], h100["xid_last"], h100["xid_by_code"]) == (3, 63, {"48": 2, "63": 1})
    assert (rtx["xid_errors"], rtx["xid_last"], rtx["xid_by_code"]) == (None, None, None)  # no Xid events


def test_status_lines_show_each_gpu_and_the_earn_rate(status):
    status = {**status, "updated_at": 1000.0, "last_heartbeat": {**status["last_heartbeat"], "at": 988.0}}
    lines = format_status(status, now=1000.0)
    assert "last heartbeat 12 s ago: earn rate 3.6e-05 $FAR/h, reliability 0.99, uptime 98.8%" in lines
    new = {**status, "last_heartbeat": {**status["last_heartbeat"],
                                        "answer": {**ANSWER, "uptime_new": True, "uptime_pct": 40.0}}}
    assert ("last heartbeat 12 s ago: earn rate 3.6e-05 $FAR/h, uptime new (the coordinator has observed too little "
            "to judge it)") in format_status(new, now=1000.0)
    assert "usage outbox   5 records waiting" in lines
    assert "open sessions  2" in lines
    gpu_lines = [line for line in lines if line.startswith("GPU")]
    assert gpu_lines == [
        "GPU 0          NVIDIA H100 80GB HBM3: 87% util, 60.0/79.6 GiB, 63 C, 287.123 W, SM 1980 MHz, "
        "ECC DBE 3, retired pages 2, Xid 3 (last 63)",
        "GPU 1          NVIDIA GeForce RTX 4090: 42% util, 10.0/24.0 GiB, 55 C, 301.5 W, SM 2520 MHz, "
        "ECC DBE n/a, retired pages n/a, Xid n/a",
    ]


@pytest.mark.parametrize("rate", [0.0, 3.6e-05, 0.0042, 0.42, 12.5])
def test_status_earn_rate_reads_as_the_heartbeat_log_does(status, rate):
    """An operator comparing `farworker status` with the 'heartbeat ok' log line sees one figure."""
    status = {
        **status,
        "last_heartbeat": {**status["last_heartbeat"], "answer": {**ANSWER, "earn_rate_far_per_hour": rate}},
    }
    (line,) = [line for line in format_status(status) if line.startswith("last heartbeat")]
    assert f"earn rate {format_rate(rate)} $FAR/h" in line


def test_cli_status_from_the_status_file(state_dir, status):
    result = CliRunner().invoke(main, ["status", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert "state          online" in out
    assert "blocks         0:4" in out
    assert "usage outbox   5 records waiting" in out
    assert any(
        re.fullmatch(
            r"last heartbeat 1[23] s ago: earn rate 3\.6e-05 \$FAR/h, reliability 0\.99, "
            r"uptime 98\.8%",
            line,
        )
        for line in out
    ), out
    assert (
        "GPU 0          NVIDIA H100 80GB HBM3: 87% util, 60.0/79.6 GiB, 63 C, 287.123 W, SM 1980 MHz, "
        "ECC DBE 3, retired pages 2, Xid 3 (last 63)" in out
    )
    assert (
        "GPU 1          NVIDIA GeForce RTX 4090: 42% util, 10.0/24.0 GiB, 55 C, 301.5 W, SM 2520 MHz, "
        "ECC DBE n/a, retired pages n/a, Xid n/a" in out
    )

    raw = CliRunner().invoke(main, ["status", "--json"], env={"FARLABS_STATE_DIR": str(state_dir)})
    assert raw.exit_code == 0 and json.loads(raw.stdout)["gpus"] == status["gpus"]


def test_cli_status_reports_a_stale_file(state_dir):
    document = read_status(state_dir)
    document["updated_at"] = time.time() - STALE_AFTER - 510
    status_path(state_dir).write_text(json.dumps(document))
    result = CliRunner().invoke(main, ["status", "--state-dir", str(state_dir)])
    assert result.exit_code == 1  # online and healthy in the file, but nobody has updated it
    (state,) = [line for line in result.stdout.splitlines() if line.startswith("state")]
    assert re.fullmatch(r"state          online \(status is 60[01] s old: worker not running\?\)", state), state


def test_cli_status_without_a_status_file(tmp_path):
    result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 3 and "no worker status" in result.stderr


def _gpu_samples(exposition: str) -> dict[str, dict[str, float]]:
    """{metric name: {gpu label: value}} for the DCGM families, plus the label sets seen."""
    samples: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.startswith("DCGM_FI_"):
                assert family.type == "gauge"
                samples.setdefault(sample.name, {})[sample.labels["gpu"]] = sample.value
    return samples


def xid_counter_samples(exposition: str) -> dict[str, float]:
    """{gpu label: value} of farworker_gpu_xid_errors_total, checked to be a counter."""
    (family,) = [f for f in text_string_to_metric_families(exposition) if f.name == "farworker_gpu_xid_errors"]
    assert family.type == "counter"
    return {s.labels["gpu"]: s.value for s in family.samples if s.name == "farworker_gpu_xid_errors_total"}


def _plain(exposition: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(exposition) for s in f.samples if not s.labels}


EXPECTED_DCGM = {
    "DCGM_FI_DEV_GPU_UTIL": {"0": 87, "1": 42},
    "DCGM_FI_DEV_FB_USED": {"0": 61440, "1": 10240},  # MiB
    "DCGM_FI_DEV_FB_FREE": {"0": 81559 - 61440, "1": 24564 - 10240},  # MiB
    "DCGM_FI_DEV_GPU_TEMP": {"0": 63, "1": 55},  # C
    "DCGM_FI_DEV_POWER_USAGE": {"0": 287.123, "1": 301.5},  # W
    "DCGM_FI_DEV_SM_CLOCK": {"0": 1980, "1": 2520},  # MHz
    "DCGM_FI_DEV_MEM_CLOCK": {"0": 2619, "1": 10501},  # MHz
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": {"0": 3},  # GPU 1 has no ECC: no sample rather than a made-up 0
    "DCGM_FI_DEV_RETIRED_DBE": {"0": 2},
    "DCGM_FI_DEV_XID_ERRORS": {"0": 63},  # the last Xid; none for GPU 1, whose Xids are not counted
}


def _check_exposition(exposition: str, status: dict) -> None:
    samples = _gpu_samples(exposition)
    assert samples.keys() == EXPECTED_DCGM.keys()
    for name, per_gpu in EXPECTED_DCGM.items():
        assert samples[name] == pytest.approx(per_gpu), name
    labels = {
        (s.labels["gpu"], s.labels["UUID"], s.labels["modelName"])
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
        if s.name == "DCGM_FI_DEV_GPU_UTIL"
    }
    assert labels == {("0", CARDS[0]["uuid"], CARDS[0]["name"]), ("1", CARDS[1]["uuid"], CARDS[1]["name"])}
    assert xid_counter_samples(exposition) == {"0": 3}

    plain = _plain(exposition)
    assert plain["farworker_outbox_depth"] == 5
    assert plain["farworker_open_sessions"] == 2
    assert plain["farworker_earn_rate_far_per_hour"] == pytest.approx(3.6e-05)
    assert plain["farworker_reliability"] == pytest.approx(0.987654)
    assert plain["farworker_uptime_pct"] == pytest.approx(98.765)
    assert plain["farworker_last_heartbeat_timestamp_seconds"] == pytest.approx(status["last_heartbeat"]["at"])
    assert plain["farworker_uptime_new"] == 0 and plain["farworker_quarantined"] == 0
    earnings = {s.labels["status"]: s.value for f in text_string_to_metric_families(exposition)
                for s in f.samples if s.name == "farworker_earnings_far"}
    assert earnings == {"settled": 0.25, "pending": 0.5, "forfeited": 0.0}


def test_metrics_registry_has_dcgm_gauges_per_gpu(state_dir):
    status = read_status(state_dir)  # what the file round trip leaves of it
    _check_exposition(generate_latest(build_registry(lambda: status)).decode(), status)


def test_metrics_endpoint_on_loopback(status):
    server = start_metrics_server(0, lambda: status)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert response.status_code == 200
        _check_exposition(response.text, status)
    finally:
        server.shutdown()
        server.server_close()
