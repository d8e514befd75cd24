"""`farworker status`: what the running worker last wrote to its status file, for a human."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from farworker.instances import instance_state_dirs
from farworker.status_file import FILE_NAME, is_fresh, read_status, status_path

# Where the Ansible role's units keep their state (StateDirectory=farworker); instances in its numbered subdirs.
SYSTEM_STATE_DIR = Path("/var/lib/farworker")


def default_state_dir() -> Path:
    """The user's own state dir when a worker ran there, else the system service's."""
    home = Path.home() / ".local" / "state" / "farworker"
    return home if instance_state_dirs(home) or not instance_state_dirs(SYSTEM_STATE_DIR) else SYSTEM_STATE_DIR


def show_status(state_dir: str | None, as_json: bool, instance: int | None = None) -> int:
    """One worker's full view; on a multi-GPU host (STATE_DIR/N per instance) one line per instance and totals,
    or instance N's full view. Exit 0 when every worker shown is online and healthy, 1 if not, 3 if none runs."""
    base = Path(state_dir) if state_dir else default_state_dir()
    found = instance_state_dirs(base)
    if instance is not None:
        found = [(index, path) for index, path in found if index == instance]
    statuses = [(index, status) for index, path in found if (status := read_status(path)) is not None]
    if not statuses:
        where = status_path(base / str(instance)) if instance is not None else status_path(base)
        click.echo(
            f"no worker status at {where}{'' if instance is not None else ' or ' + str(base / 'N' / FILE_NAME)}: "
            "is `farworker run` running with FARLABS_STATE_DIR set to this directory?",
            err=True,
        )
        return 3  # LSB: program is not running
    if as_json:
        document = statuses[0][1] if len(statuses) == 1 else {"instances": [s for _, s in statuses]}
        click.echo(json.dumps(document, indent=1))
    elif len(statuses) == 1:
        for line in format_status(statuses[0][1]):
            click.echo(line)
    else:
        for line in format_instances(statuses):
            click.echo(line)
    return 0 if all(_serving(status) for _, status in statuses) else 1


def _serving(status: dict) -> bool:
    return is_fresh(status) and status.get("state") == "online" and bool(status.get("healthy"))


def format_instances(statuses: list[tuple[int | None, dict]], now: float | None = None) -> list[str]:
    """One line per instance of a host, then the totals; `farworker status --instance N` shows one in full."""
    now = now or time.time()
    lines = [f"{'inst':<5}{'state':<12}{'gpu':<16}{'blocks':<8}{'sessions':>9}{'tokens':>11}{'outbox':>8}"
             f"{'$FAR/h':>10}  peer id"]
    totals = {"sessions": 0, "tokens": 0, "outbox": 0, "rate": 0.0, "serving": 0}
    for index, status in statuses:
        blocks = status.get("blocks")
        counters = status.get("counters") or {}
        answer = (status.get("last_heartbeat") or {}).get("answer") or {}
        rate = float(answer.get("earn_rate_far_per_hour") or 0)
        state = str(status.get("state"))
        if not is_fresh(status, now):
            state = "stale"
        elif state == "online" and not status.get("healthy"):
            state = "unhealthy"
        elif answer.get("quarantined"):
            state = "QUARANTINED"
        lines.append(
            f"{'-' if index is None else index!s:<5}{state:<12}{_gpu_name(status):<16}"
            f"{f'{blocks[0]}:{blocks[1]}' if blocks else 'none':<8}{status.get('open_sessions', 0):>9}"
            f"{counters.get('tokens_processed', 0):>11}{status.get('outbox_depth', 0):>8}{_rate(rate):>10}  "
            f"{status.get('peer_id')}"
        )
        totals["sessions"] += status.get("open_sessions", 0)
        totals["tokens"] += counters.get("tokens_processed", 0)
        totals["outbox"] += status.get("outbox_depth", 0)
        totals["rate"] += rate
        totals["serving"] += _serving(status)
    lines.append(
        f"total: {len(statuses)} instances, {totals['serving']} online and healthy, {totals['sessions']} open "
        f"sessions, {totals['tokens']} tokens, {totals['outbox']} usage records waiting, earn rate "
        f"{_rate(totals['rate'])} $FAR/h"
    )
    return lines


def _gpu_name(status: dict) -> str:
    """The instance's GPU, its UUID shortened (GPU-1a2b3c4d), or cpu."""
    gpus = [] if status.get("gpu") == "cpu" else status.get("gpus") or []
    if len(gpus) == 1:
        return str(gpus[0].get("uuid") or gpus[0].get("index"))[:12]
    return f"{len(gpus)} GPUs" if gpus else "cpu"


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
    held = status.get("usage_held") or {}
    if held.get("held_in_memory") or held.get("held_dropped"):
        lines.append(f"STATE DIR FULL {held.get('held_in_memory', 0)} usage records held in memory, "
                     f"{held.get('held_dropped', 0)} lost beyond the bound: free space in the state dir")
    beat = status.get("last_heartbeat")
    if beat:
        answer = beat.get("answer") or {}
        lines.append(
            f"last heartbeat {now - beat.get('at', now):.0f} s ago: earn rate "
            f"{_rate(float(answer.get('earn_rate_far_per_hour') or 0))} $FAR/h, "
            + ("uptime new (the coordinator has observed too little to judge it)" if answer.get("uptime_new") else
               f"reliability {answer.get('reliability', 0):.2f}, uptime {answer.get('uptime_pct', 0):.1f}%")
        )
        if "settled_far" in answer:  # coordinators before settlement do not say
            lines.append(earnings_line(answer))
        if answer.get("quarantined"):
            lines.append(f"QUARANTINED    by the coordinator, paid nothing more, pending earnings forfeited: "
                         f"{answer['quarantined']}")
        if answer.get("unreachable"):  # clients dial the addresses the coordinator dialled
            lines.append(f"UNREACHABLE    {answer['unreachable']}")
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


def earnings_line(answer: dict) -> str:
    """The coordinator's settlement of the worker's pay (docs/trust.md, "Settlement"), from a heartbeat answer."""
    amounts = [f"{float(answer.get(key) or 0):.6g} {what}" for key, what in
               (("settled_far", "settled"), ("pending_far", "pending"), ("forfeited_far", "forfeited"))]
    return f"earnings       {', '.join(amounts)} $FAR"


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
