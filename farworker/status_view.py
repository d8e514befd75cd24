"""`farworker status`: what the running worker last wrote to its status file, for a human."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from farworker.status_file import is_fresh, read_status, status_path


def default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "farworker"


def show_status(state_dir: str | None, as_json: bool) -> int:
    directory = Path(state_dir) if state_dir else default_state_dir()
    status = read_status(directory)
    if status is None:
        click.echo(
            f"no worker status at {status_path(directory)}: is `farworker run` running with "
            "FARLABS_STATE_DIR set to this directory?",
            err=True,
        )
        return 3  # LSB: program is not running
    if as_json:
        click.echo(json.dumps(status, indent=1))
    else:
        for line in format_status(status):
            click.echo(line)
    return 0 if is_fresh(status) and status.get("state") == "online" and status.get("healthy") else 1


def format_status(status: dict, now: float | None = None) -> list[str]:
    now = now or time.time()
    age = now - float(status.get("updated_at", 0))
    blocks = status.get("blocks")
    counters = status.get("counters") or {}
    state = str(status.get("state"))
    if not status.get("healthy"):
        state += f" (unhealthy: {status.get('health_reason')})"
    if not is_fresh(status, now):
        state += f" (status is {age:.0f} s old: worker not running?)"
    lines = [
        f"state          {state}",
        f"model          {status.get('model_name')}",
        f"blocks         {f'{blocks[0]}:{blocks[1]}' if blocks else 'none'}",
        f"peer id        {status.get('peer_id')}",
        f"peers          {status.get('peers') if status.get('peers') is not None else 'unknown'}",
        f"open sessions  {status.get('open_sessions', 0)}",
        f"served         {counters.get('tokens_processed', 0)} tokens, {counters.get('inference_steps', 0)} steps, "
        f"{counters.get('requests', 0)} requests, {counters.get('errors', 0)} errors",
        f"usage outbox   {status.get('outbox_depth', 0)} records waiting",
    ]
    beat = status.get("last_heartbeat")
    if beat:
        answer = beat.get("answer") or {}
        lines.append(
            f"last heartbeat {now - beat.get('at', now):.0f} s ago: earn rate "
            f"{_rate(float(answer.get('earn_rate_far_per_hour') or 0))} $FAR/h, "
            f"reliability {answer.get('reliability', 0):.2f}, uptime {answer.get('uptime_pct', 0):.1f}%"
        )
        if answer.get("quarantined"):
            lines.append(f"QUARANTINED    by the coordinator, paid nothing: {answer['quarantined']}")
    else:
        lines.append("last heartbeat none yet (coordinator unreachable or not registered)")
    gpus = status.get("gpus") or []
    if not gpus:
        lines.append("GPUs           none (CPU worker)")
    for gpu in gpus:
        used, total = gpu.get("memory_used_bytes") or 0, gpu.get("memory_total_bytes") or 1
        lines.append(
            f"GPU {gpu['index']}          {gpu['name']}: {_reading(gpu, 'utilization_pct', '%')} util, "
            f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB, {_reading(gpu, 'temperature_c', ' C')}, "
            f"{_reading(gpu, 'power_w', ' W')}, SM {_reading(gpu, 'sm_clock_mhz', ' MHz')}, "
            f"ECC DBE {_reading(gpu, 'ecc_volatile_uncorrected', '')}, "
            f"retired pages {_reading(gpu, 'retired_pages_dbe', '')}, {_xids(gpu)}"
        )
    return lines


def _xids(gpu: dict) -> str:
    total, last = gpu.get("xid_errors"), gpu.get("xid_last")
    if total is None:  # no counter running, or a GPU without Xid events
        return "Xid n/a"
    return f"Xid {total}" if last is None else f"Xid {total} (last {last})"


def _rate(rate: float) -> str:
    # reporting.format_rate, so status and the worker's heartbeat log show the same figure; not imported
    # because reporting pulls in the HTTP client, and small rates must not print as 0.0000
    return f"{rate:.2f}" if rate == 0 or abs(rate) >= 0.01 else f"{rate:.2g}"


def _reading(gpu: dict, field: str, unit: str) -> str:
    value = gpu.get(field)
    return "n/a" if value is None else f"{value:g}{unit}"  # None: NVML can't read it on this GPU
