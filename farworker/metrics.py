"""Prometheus `/metrics` on localhost (FARLABS_METRICS_PORT), through prometheus_client.

The same figures as `farworker status`. GPU metrics take the names NVIDIA's DCGM exporter uses where
they match, so existing dashboards and alerts work; worker metrics are prefixed `farworker_`.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry


def _field(name: str, scale: float = 1):
    return lambda gpu: None if gpu.get(name) is None else gpu[name] * scale


def _xid_last(gpu: dict) -> int | None:
    # DCGM's XID_ERRORS is the last Xid seen, 0 before any; None where Xids are not counted (no sample)
    return None if gpu.get("xid_errors") is None else gpu.get("xid_last") or 0


def _fb_free_mib(gpu: dict) -> float | None:
    total, used = gpu.get("memory_total_bytes"), gpu.get("memory_used_bytes")
    return None if total is None or used is None else (total - used) / 2**20


# DCGM exporter name -> (value from one GPU's telemetry in DCGM's unit, help). The status file keeps
# memory in bytes; DCGM's framebuffer fields are MiB.
DCGM_GAUGES = {
    "DCGM_FI_DEV_GPU_UTIL": (_field("utilization_pct"), "GPU utilization (in %)."),
    "DCGM_FI_DEV_FB_USED": (_field("memory_used_bytes", 1 / 2**20), "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_FB_FREE": (_fb_free_mib, "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_GPU_TEMP": (_field("temperature_c"), "GPU temperature (in C)."),
    "DCGM_FI_DEV_POWER_USAGE": (_field("power_w"), "Power draw (in W)."),
    "DCGM_FI_DEV_SM_CLOCK": (_field("sm_clock_mhz"), "SM clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEM_CLOCK": (_field("mem_clock_mhz"), "Memory clock frequency (in MHz)."),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": (_field("ecc_volatile_uncorrected"), "Volatile double-bit ECC errors."),
    "DCGM_FI_DEV_RETIRED_DBE": (_field("retired_pages_dbe"), "Pages retired after double-bit ECC errors."),
    "DCGM_FI_DEV_XID_ERRORS": (_xid_last, "Value of the last XID error encountered."),
}


def worker_labels(status: dict) -> tuple[list[str], list[str]]:
    """The labels of the worker's own series: the model, and on a multi-GPU host (FARLABS_INSTANCE set) the
    instance and its GPU, so one host's instances stay apart wherever their series meet. A single worker's
    series keep the labels they always had. `worker_instance`: Prometheus' own `instance` is the scrape target."""
    names, values = ["model"], [status.get("model_name") or ""]
    if status.get("instance") is not None:
        names += ["worker_instance", "gpu_uuid"]
        values += [_instance_label(status), _gpu_uuid(status)]
    return names, values


def _instance_label(status: dict) -> str:
    return "" if status.get("instance") is None else str(status["instance"])


def _gpu_uuid(status: dict) -> str:
    gpus = [] if status.get("gpu") == "cpu" else status.get("gpus") or []
    return ",".join(str(g.get("uuid")) for g in gpus) or "cpu"


class WorkerCollector:
    """Reads a snapshot callable at scrape time: nothing is computed between scrapes."""

    def __init__(self, snapshot):
        self._snapshot = snapshot

    def collect(self):
        status = self._snapshot()
        labels, model = worker_labels(status)
        instance = GaugeMetricFamily(
            "farworker_instance_info", "This worker's instance on its host and the GPU it serves on (cpu for none).",
            labels=["worker_instance", "gpu_uuid", "host_id"])
        instance.add_metric([_instance_label(status), _gpu_uuid(status), str(status.get("host_id") or "")], 1.0)
        yield instance
        up = GaugeMetricFamily("farworker_healthy", "1 while the server passes its health checks.", labels=labels)
        up.add_metric(model, 1.0 if status.get("healthy") else 0.0)
        yield up
        blocks = status.get("blocks") or [0, 0]
        served = GaugeMetricFamily("farworker_blocks_served", "Model blocks this worker serves.", labels=labels)
        served.add_metric(model, blocks[1] - blocks[0])
        yield served
        counters = status.get("counters") or {}
        for name, help_text in (
            ("requests", "Requests served."),
            ("inference_steps", "Inference steps served."),
            ("tokens_processed", "Token positions processed."),
            ("errors", "Failed requests."),
        ):
            family = CounterMetricFamily(f"farworker_{name}", help_text, labels=labels)
            family.add_metric(model, counters.get(name, 0))
            yield family
        own, own_values = labels[1:], model[1:]  # the instance's labels, none for a single worker
        for name, value, help_text in (
            ("farworker_open_sessions", status.get("open_sessions", 0), "Open inference sessions."),
            ("farworker_outbox_depth", status.get("outbox_depth", 0), "Usage records waiting for the coordinator."),
            ("farworker_peers", status.get("peers") or 0, "DHT peers in the routing table."),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=own)
            gauge.add_metric(own_values, value)
            yield gauge
        beat = status.get("last_heartbeat")
        if beat:
            answer = beat.get("answer") or {}
            for name, key, help_text in (
                ("farworker_earn_rate_far_per_hour", "earn_rate_far_per_hour", "Coordinator's earn-rate estimate."),
                ("farworker_reliability", "reliability", "Coordinator's reliability score (0-1)."),
                ("farworker_uptime_pct", "uptime_pct", "Coordinator's uptime percentage from heartbeats."),
            ):
                gauge = GaugeMetricFamily(name, help_text, labels=own)
                gauge.add_metric(own_values, float(answer.get(key) or 0))
                yield gauge
            for name, value, help_text in (
                ("farworker_uptime_new", answer.get("uptime_new"),
                 "1 while the coordinator has observed too little to judge uptime (uptime_pct is provisional)."),
                ("farworker_quarantined", answer.get("quarantined") is not None,
                 "1 once the coordinator quarantined this worker (a failed check): paid and routed nothing since."),
            ):
                gauge = GaugeMetricFamily(name, help_text, labels=own)
                gauge.add_metric(own_values, 1.0 if value else 0.0)
                yield gauge
            earnings = GaugeMetricFamily("farworker_earnings_far", "Coordinator's paid $FAR for this worker by "
                                         "settlement: settled, pending, forfeited.", labels=[*own, "status"])
            for settlement in ("settled", "pending", "forfeited"):
                earnings.add_metric([*own_values, settlement], float(answer.get(f"{settlement}_far") or 0))
            yield earnings
            last = GaugeMetricFamily("farworker_last_heartbeat_timestamp_seconds", "Unix time of the last heartbeat.",
                                     labels=own)
            last.add_metric(own_values, float(beat.get("at") or 0))
            yield last
        gpu_labels = ["gpu", "UUID", "modelName"]
        for metric, (read, help_text) in DCGM_GAUGES.items():
            family = GaugeMetricFamily(metric, help_text, labels=gpu_labels)
            for gpu in status.get("gpus") or []:
                if (value := read(gpu)) is not None:
                    family.add_metric([str(gpu["index"]), gpu["uuid"], gpu["name"]], value)
            yield family
        # A counter (DCGM has only the last value) so `increase()` sees every Xid; 0 from the start, since a
        # series that first appears at 1 would hide the first one.
        xids = CounterMetricFamily("farworker_gpu_xid_errors", "Xid errors since the worker started.",
                                   labels=gpu_labels)
        for gpu in status.get("gpus") or []:
            if gpu.get("xid_errors") is not None:
                xids.add_metric([str(gpu["index"]), gpu["uuid"], gpu["name"]], gpu["xid_errors"])
        yield xids


def build_registry(snapshot) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(snapshot))
    return registry


def start_metrics_server(port: int, snapshot):
    """Serve /metrics on 127.0.0.1:port in a daemon thread (loopback only: scrape via an agent or tunnel).

    Returns the server: its server_port is the port bound when `port` is 0.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr="127.0.0.1", registry=build_registry(snapshot))
    return server
