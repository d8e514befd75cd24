"""`farworker run`: the service's life from start to stop.

    register with the coordinator (state joining) -> resolve model (download) -> plan blocks -> start Petals
    -> register again (model size, addresses) -> wait until announced ONLINE -> READY=1
    -> loop: health check -> WATCHDOG=1 only when healthy, STATUS, status file
    -> SIGTERM: STOPPING=1, drain (usage flushed, deregistered), blocks offline, exit 0

systemd is never told something untrue: READY waits for the DHT to list our blocks online, and a
wedged server (no probe answers) stops the watchdog pings so systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from farworker import __version__, gpu
from farworker.api_client import CoordinatorClient
from farworker.block_plan import plan_blocks
from farworker.config import ConfigError, WorkerConfig
from farworker.identity import host_id, load_or_create
from farworker.instances import adopt_single_unit_state
from farworker.metrics import start_metrics_server
from farworker.model_source import DownloadInterrupted, format_progress, resolve_model
from farworker.notify import Notifier, StartupKeepalive
from farworker.outbox import Outbox
from farworker.petals.model_config import block_config_from_pretrained
from farworker.petals.server_host import PetalsHost
from farworker.petals.serving_meter import ServingCounters, ServingMeter
from farworker.process_tree import end_children
from farworker.reporting import Reporter
from farworker.shm_cleanup import RECORD_NAME as SHM_RECORD
from farworker.shm_cleanup import tracker as shm_tracker
from farworker.shm_guard import check_shm
from farworker.status_file import write_status

log = logging.getLogger("farworker")
ONLINE_TIMEOUT = 3600.0  # loading 70B weights from a slow disk can take long; the keepalive extends systemd's
DRAIN_QUIET_SECONDS = 2.0  # a drain ends once the handlers saw no session activity for this long
# SIGTERM to exit: the drain (FARLABS_DRAIN_TIMEOUT) plus at most this for the final heartbeat, flush and
# deregistration, petals' shutdown and ending leftover processes. The unit's TimeoutStopSec and docker's
# --stop-timeout leave 10 s above the drain for it.
STOP_AFTER_DRAIN_SECONDS = 8.0
REPORTER_STOP_SECONDS = 4.0  # of that: the coordinator's share; unsent usage stays in the outbox anyway
# Of that, after a fault: petals' own shutdown, then the grace its processes get between SIGTERM and SIGKILL. With
# the DHT, its p2pd or torch_shm_manager dead, petals' shutdown (it announces through the DHT first) and the
# handlers' own exits waited out all that was left, twice (7 s, then 6 s), for nothing: none of it can finish.
# A dead handler's shutdown takes milliseconds.
FAULT_SHUTDOWN_SECONDS = 2.0
HEALTH_PERIOD = 5.0  # seconds between health checks when systemd gives no watchdog interval
# Between two health checks (each one a DHT query), the children are looked at this often: a pid's state is a
# file read, and a dead child then ends the worker within a second, not up to a whole health period later.
DEAD_CHILD_POLL = 1.0
# How long a start step may go without progress before the start counts as stuck and is restarted
# (notify.StartupKeepalive). Downloads count bytes; the hub client's own read timeout usually fires first.
DOWNLOAD_STALL_SECONDS = 600.0
CONFIRMING_ONLINE = "confirming online"
# Loaded blocks are announced at once and re-announced every 60 s (petals' update period); two periods and
# a half without the DHT listing them means the announcements do not land: restart rather than hang.
STEP_BUDGET_SECONDS = {"planning blocks": 600.0, "joining the DHT": 600.0, "loading blocks": ONLINE_TIMEOUT,
                       CONFIRMING_ONLINE: 150.0}
CONFIRM_LOG_PERIOD = 15.0
# How often a start looks whether it is online: petals announces ONLINE just as the blocks are ready, so the first
# DHT lookups come soon after (each one is a DHT query: backed off to the slower period while they say no).
ONLINE_POLL_FIRST, ONLINE_POLL_MAX = 0.1, 0.5
EXIT_START_STUCK = 75  # EX_TEMPFAIL: retry later (the unit restarts it; 78 would stop the retries)
EXIT_FAULT = 70  # EX_SOFTWARE: a child process died or the server stayed unhealthy; the supervisor restarts us
# Unhealthy this long without a fatal cause (DHT unanswered, announcements expired, a stuck runtime) ends the
# worker too: under systemd the watchdog usually acts first; in docker and a shell nothing else would.
UNHEALTHY_EXIT_SECONDS = 60.0


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.notifier = Notifier()
        self.stop_requested = threading.Event()
        self.state = "starting"
        self._phase, self._phase_since = "starting", time.monotonic()
        self.host = None
        self.plan = None
        self.model_blocks: int | None = None  # the model's block count, once its config is read
        self.progress = {"done": 0, "total": 0}  # of the weight download
        self.meter = None
        self._status_error: str | None = None
        self.outbox = None
        self.reporter = None
        self.started_at = time.time()
        self.healthy = False
        self.health_reason = ""
        self.online_problem: str | None = None  # why the DHT does not list our blocks online yet (while confirming)
        self.fault: str | None = None  # why the worker ends itself (a child died, unhealthy too long)
        self._last_status: dict = {}
        self.identity = None
        self.host_id = host_id(config)  # the same on every instance of this host: the ledger groups by it
        self.stop_deadline = time.monotonic() + STOP_AFTER_DRAIN_SECONDS  # set again once the drain ends

    # -- start -------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Bring the server online; False if a stop was requested or the server failed first."""
        cfg = self.config
        problem = check_shm()
        if problem:  # petals would fail the first large request instead
            raise ConfigError([problem])
        problem = gpu.cuda_build_without_gpu(cfg.device, cfg.gpu)
        if problem:  # a CUDA image without --gpus all: refuse before registering, not serve on the CPU
            raise ConfigError([problem])
        moved = adopt_single_unit_state(cfg.state_dir, cfg.instance)
        if moved:
            log.info("Instance 0 took over the single-unit worker's %s from %s", ", ".join(moved), cfg.state_dir.parent)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        # Files a SIGKILLed previous run left in /dev/shm go now; this run's pids are recorded for the next.
        shm_tracker().keep_record(cfg.state_dir / SHM_RECORD)
        self.identity = load_or_create(cfg.identity_path)
        self._write_status()  # replaces a previous run's file: nobody may read it as this run's health
        self.outbox = Outbox(cfg.state_dir / "outbox.sqlite3")
        log.info("farworker %s, peer id %s, model %s", __version__, self.identity.peer_id, cfg.model_name)
        recovered = self.outbox.recover_open_segments()
        if recovered:  # the last run died (kill -9, OOM, power) with sessions open: their steps are billed
            log.warning("Recovered %d usage segments of sessions open when the last run stopped (%d tokens)",
                        len(recovered), sum(r["tokens"] for r in recovered))
        # The coordinator hears of us now, not after an hour of downloading and loading a 70B model:
        # heartbeats say "joining" and what we are doing until the blocks are online.
        self._start_reporter()

        with StartupKeepalive(self.notifier, self._startup_status, stuck=self.start_stuck, give_up=_exit_stuck):
            self.phase = "downloading weights"
            try:
                model_path = resolve_model(cfg, self._download_progress, stop=self.stop_requested)
            except DownloadInterrupted as stopped:  # SIGTERM mid-download: the partial file resumes next start
                log.info("%s", stopped)
                return False
            self.phase = "planning blocks"
            block_config = block_config_from_pretrained(model_path, token=cfg.hf_token or None)
            self.plan = plan_blocks(cfg, block_config)
            self.model_blocks = block_config.num_hidden_layers
            log.info("Serving %d of %d blocks on %s (%s, quantization %s)", self.plan.num_blocks,
                     block_config.num_hidden_layers, self.plan.device, cfg.torch_dtype, self.plan.quant_type)
            self.meter = ServingMeter(self.outbox)
            self.host = PetalsHost(cfg, model_path, self.plan)
            self.phase = "joining the DHT"
            self.host.start()
            self.state, self.phase = "joining", "loading blocks"
            self.reporter.update_registration()  # now with the model's size, quantization and addresses
            online = self._wait_online()
        if not online:
            return False
        self.state = "online"
        self.host.watch_children()
        health = self.host.health()  # the first STATUS line and beat carry a verdict, not the initial blank
        self.healthy, self.health_reason = health.ok, health.reason
        self.reporter.beat_now()  # the coordinator sees "online" and the span now, not an interval later
        if cfg.metrics_port:
            # scrapes read the last status written by the health loop: no DHT or NVML work per scrape
            start_metrics_server(cfg.metrics_port, lambda: self._last_status)
        start, end = self.host.blocks
        log.info("Blocks %d:%d of %s are online", start, end, cfg.model_name)
        self.notifier.ready(self.summary())
        return True

    def _wait_online(self) -> bool:
        """Until the blocks are loaded and the DHT lists them ONLINE under our peer id (what clients route by).
        Loading has the loading budget; confirming has its own, and says in STATUS and the journal why it
        waits, so a start that cannot confirm is seen and, past the budget, restarted instead of hanging."""
        deadline = time.monotonic() + ONLINE_TIMEOUT
        told = 0.0
        poll = ONLINE_POLL_FIRST
        while not self.stop_requested.is_set() and time.monotonic() < deadline:
            failure = self.host.failure()
            if failure:
                log.error("Petals stopped before the blocks were online: %s", failure)
                return False
            if self.host.loaded:
                if self.phase != CONFIRMING_ONLINE:
                    self.phase = CONFIRMING_ONLINE
                try:
                    self.online_problem = self.host.announcement_problem()
                except Exception as error:  # a DHT lookup that timed out: try again
                    self.online_problem = f"DHT lookup failed: {error!r}"
                if self.online_problem is None:
                    return True
                if time.monotonic() - told >= CONFIRM_LOG_PERIOD:
                    told = time.monotonic()
                    log.warning("Blocks loaded and serving, not confirmed online yet (%.0f s): %s",
                                time.monotonic() - self._phase_since, self.online_problem)
                poll = min(ONLINE_POLL_MAX, 2 * poll)
            self.stop_requested.wait(poll)
        return False

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase, self._phase_since = value, time.monotonic()

    def _download_progress(self, done: int, total: int) -> None:
        if done != self.progress["done"]:
            self._phase_since = time.monotonic()  # a download is stuck only when its bytes stop coming
        self.progress.update(done=done, total=total)

    def start_stuck(self) -> str | None:
        """Why the start is stuck, once the current step has gone without progress past its budget."""
        budget = DOWNLOAD_STALL_SECONDS if self.phase == "downloading weights" else STEP_BUDGET_SECONDS.get(self.phase)
        idle = time.monotonic() - self._phase_since
        if budget is None or idle <= budget:
            return None
        return f"{self.phase} for {idle:.0f} s without progress (limit {budget:.0f} s)"

    def _startup_status(self) -> str:
        phase = self.phase_line()
        return phase if phase.startswith("downloading weights:") else f"{phase}: {self.config.model_name}"

    def phase_line(self) -> str:
        """'downloading weights: 1.20 of 13.48 GB (9%)', 'loading blocks', ..."""
        if self.phase == "downloading weights" and self.progress["total"]:
            return format_progress(self.progress["done"], self.progress["total"])
        if self.phase == CONFIRMING_ONLINE and self.online_problem:
            return f"{self.phase} ({self.online_problem})"
        return self.phase

    def _start_reporter(self) -> None:
        client = CoordinatorClient(self.config.api_base_urls, self.identity)  # parsed once, by config
        self.reporter = Reporter(
            client, self.outbox, registration=self.registration, heartbeat_payload=self.heartbeat_payload,
            interval=self.config.heartbeat_interval,
        )
        self.reporter.start()

    # -- steady state ------------------------------------------------------------------------------
    def serve_until_stopped(self) -> None:
        """Health check every period: WATCHDOG=1 only while healthy. A dead child (handler, runtime, DHT) or
        an unhealthy spell past UNHEALTHY_EXIT_SECONDS sets `fault` and ends the loop: the worker stops as on
        SIGTERM (usage flushed) and exits EXIT_FAULT, so systemd or docker restarts it at once."""
        period = min(self.notifier.watchdog_interval or HEALTH_PERIOD, HEALTH_PERIOD)
        unhealthy_since = None
        while not self.stop_requested.is_set():
            health = self.host.health()
            if health.ok:
                unhealthy_since = None
                self.notifier.watchdog()
                self.notifier.status(self.summary())
            else:
                if self.healthy or health.reason != self.health_reason:
                    log.warning("Unhealthy, withholding watchdog pings: %s", health.reason)
                unhealthy_since = unhealthy_since or time.monotonic()
                if health.fatal:
                    self.fault = health.reason
                elif time.monotonic() - unhealthy_since > UNHEALTHY_EXIT_SECONDS:
                    self.fault = f"unhealthy for over {UNHEALTHY_EXIT_SECONDS:.0f} s: {health.reason}"
            self.healthy, self.health_reason = health.ok, health.reason
            self._write_status()
            if self.fault:
                log.error("Exiting with status %d so the service is restarted: %s", EXIT_FAULT, self.fault)
                self.notifier.status(f"restarting: {self.fault}")
                return
            self._wait_for_next_check(period)

    def _wait_for_next_check(self, period: float) -> None:
        """Until the next health check is due, or at once on a stop request or a dead child (the check then finds
        it and the worker exits 70)."""
        due = time.monotonic() + period
        while (left := due - time.monotonic()) > 0:
            if self.stop_requested.wait(min(DEAD_CHILD_POLL, left)) or self.host.dead_child():
                return

    def stop(self) -> None:
        self.state = "draining"
        self.notifier.stopping(f"draining: {self.config.model_name}")
        log.info("Stopping: draining usage, announcing blocks offline")
        if self.host is not None and self.meter is not None:
            self._drain_sessions()
        self.stop_deadline = time.monotonic() + STOP_AFTER_DRAIN_SECONDS
        if self.reporter is not None:
            self.reporter.drain_and_stop(timeout=REPORTER_STOP_SECONDS)
        if self.host is not None:
            self.host.stop(timeout=self.shutdown_seconds(reserve=1.0))
        if self.meter is not None:  # a session cut by the shutdown still reports what it served
            self.meter.wait_settled(timeout=min(3.0, max(0.5, self.stop_seconds_left())))
        self.state = "stopped"
        if self.identity is not None:  # the state dir exists: start got past its checks
            self._write_status()
        held = self.outbox.held()["held_in_memory"] if self.outbox is not None else 0
        if held:  # the state dir stayed full to the end: said plainly, these are not billed
            log.error("%d usage records held in memory are lost: the state dir %s had no space up to the stop",
                      held, self.config.state_dir)
        log.info("Stopped cleanly")

    def stop_seconds_left(self) -> float:
        return self.stop_deadline - time.monotonic()

    def shutdown_seconds(self, reserve: float = 0.0) -> float:
        """How long the next step of the stop may take: what is left of its bound (less ``reserve`` for the steps
        after it), at least a second; after a fault, at most FAULT_SHUTDOWN_SECONDS."""
        left = max(1.0, self.stop_seconds_left() - reserve)
        return min(left, FAULT_SHUTDOWN_SECONDS) if self.fault else left

    def _drain_sessions(self) -> None:
        """Blocks offline first, then give the open sessions FARLABS_DRAIN_TIMEOUT to finish: a session cut
        by the shutdown breaks the client's request (petals must replay it elsewhere) and its last segment of
        usage never leaves the handler process."""
        deadline = time.monotonic() + self.config.drain_timeout  # the announcement is part of the drain
        try:
            if not self.host.announce_offline(timeout=min(5.0, max(1.0, self.config.drain_timeout))):
                log.warning("Could not announce the blocks offline within the deadline (is the DHT process alive?)")
        except Exception as err:  # the DHT may already be unreachable; the sessions still deserve their time
            log.warning("Could not announce the blocks offline: %s", err)
        open_sessions = self.meter.snapshot().open_sessions
        if open_sessions:
            log.info("Waiting up to %d s for %d open sessions", self.config.drain_timeout, open_sessions)
        # Until no session is open and none opened or closed for DRAIN_QUIET_SECONDS: clients learn that the
        # blocks are offline at their next route update, and until then back-to-back requests leave only
        # instants with no session open.
        while time.monotonic() < deadline and (open_sessions or self.meter.seconds_since_event() < DRAIN_QUIET_SECONDS):
            self.notifier.status(f"draining: {open_sessions} open sessions")
            time.sleep(0.2)
            open_sessions = self.meter.snapshot().open_sessions
        if open_sessions:
            log.warning("%d sessions still open after %d s; stopping anyway", open_sessions, self.config.drain_timeout)
        self.meter.wait_settled()

    # -- reports -----------------------------------------------------------------------------------
    def summary(self) -> str:
        blocks = self.host.blocks if self.host else None
        span = f"{blocks[0]}:{blocks[1]}" if blocks else "none"
        sessions = self.meter.snapshot().open_sessions if self.meter else 0
        health = "" if self.healthy or self.state != "online" else f", unhealthy: {self.health_reason}"
        return f"{self.state}: {self.config.model_name} blocks {span}, {sessions} open sessions{health}"

    def blocks(self) -> tuple[int, int] | None:
        """The span we serve once loaded; before that the span we will serve when it is fixed (the operator's
        FARLABS_BLOCK_INDICES, or the whole model), else None: petals picks the span as it starts."""
        loaded = self.host.blocks if self.host else None
        if loaded:
            return loaded
        if self.plan is not None:
            return (self.plan.start, self.plan.end) if self.plan.fixed else None
        return self.config.block_indices

    def registration(self) -> dict:
        """Sent at start and again once petals has started. Facts not known yet are honest blanks: blocks
        null until fixed or loaded, total_blocks null until the model's config is read, quant_type as
        configured ('auto') until planned, no addresses until the DHT listens."""
        blocks = self.blocks()
        return {
            "wallet_address": self.config.wallet_address,
            "peer_id": self.identity.peer_id,
            "public_key": self.identity.public_key_b64,
            "model_name": self.config.model_name,
            "blocks": list(blocks) if blocks else None,
            "total_blocks": self.model_blocks,
            "torch_dtype": self.config.torch_dtype,
            "quant_type": self.plan.quant_type if self.plan else self.config.quant_type,
            "location": self.config.location,
            "version": __version__,
            "announce_maddrs": self.host.visible_maddrs if self.host else [],
            "hardware": gpu.hardware_summary(),
            "host_id": self.host_id,
            "instance": self.config.instance,
        }

    def heartbeat_payload(self) -> dict:
        blocks = self.blocks()
        state = self.state if self.state in ("online", "draining") else "joining"
        payload = {
            "state": state,
            "blocks": list(blocks) if blocks else None,
            "uptime_seconds": time.time() - self.started_at,
            "gpus": gpu.telemetry(),
            "counters": (self.meter.snapshot() if self.meter else ServingCounters()).as_dict(),
        }
        if state == "joining":  # only then: an online worker's beats stay what coordinators before it knew
            payload["phase"] = self.phase_line()
        elif state in ("online", "draining") and not self.healthy and self.health_reason:  # a check ran and
            # failed: the same verdict that withholds the watchdog pings
            payload.update(healthy=False, health_reason=self.health_reason[:256])
        return payload

    def _write_status(self) -> None:
        if self.outbox is not None:
            self.outbox.write_held()  # usage held in memory while the state dir was full: on disk once it can be
        self._last_status = self.status_snapshot()
        try:
            write_status(self.config.state_dir, self._last_status)
        except OSError as err:  # a full state dir: serving goes on; the journal says it, once per error
            if str(err) != self._status_error:
                log.error("status file not written in %s: %s", self.config.state_dir, err)
            self._status_error = str(err)
        else:
            self._status_error = None

    def status_snapshot(self) -> dict:
        """What `farworker status`, /metrics and docker's HEALTHCHECK see."""
        counters = self.meter.snapshot() if self.meter else None
        last = self.reporter.last_heartbeat if self.reporter else None
        return {
            "state": self.state,
            "healthy": self.healthy,
            "health_reason": self.health_reason,
            "model_name": self.config.model_name,
            "blocks": list(self.host.blocks) if self.host and self.host.blocks else None,
            "peer_id": self.identity.peer_id if self.identity else None,
            "maddrs": self.host.visible_maddrs if self.host else [],
            "peers": self._peer_count(),
            "open_sessions": counters.open_sessions if counters else 0,
            "counters": counters.as_dict() if counters else {},
            "last_heartbeat": last,
            "outbox_depth": self.outbox.depth() if self.outbox else 0,
            "usage_held": self.outbox.held() if self.outbox else None,  # in memory: the state dir refused them
            "gpus": gpu.telemetry(),
            "instance": self.config.instance,
            "gpu": self.config.gpu or None,  # as configured: an index, a UUID or cpu (gpus has the UUID)
            "host_id": self.host_id,
            "started_at": self.started_at,
            "pid": os.getpid(),
        }

    def _peer_count(self) -> int | None:
        if self.fault or self.host is None or self.host.server is None or not self.host.server.dht.is_alive():
            # A dead DHT would make every status write (the stop path's too) wait out the timeout, and after a
            # fault a live one may hang too: with torch_shm_manager dead, its shared-memory futures never resolve.
            return None
        try:
            return len(self.host.server.dht.run_coroutine(_visible_peers, return_future=True).result(timeout=5))
        except Exception:
            return None


async def _visible_peers(dht, node):
    return node.protocol.routing_table.uid_to_peer_id


def run_worker(config: WorkerConfig) -> int:
    """The body of `farworker run`; returns the exit status."""
    worker = Worker(config)

    def on_signal(signum, _frame):
        log.info("Received %s", signal.Signals(signum).name)
        worker.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gpu.start_xid_counter()  # heartbeats and the status file carry its counts; nothing without NVML
    try:
        if worker.start():
            worker.serve_until_stopped()
            code = EXIT_FAULT if worker.fault else 0
        else:
            code = 0 if worker.stop_requested.is_set() else 1
    finally:
        worker.stop()
        gpu.stop_xid_counter()
        end_children(timeout=worker.shutdown_seconds())
    return code


def _exit_stuck(reason: str) -> None:
    """No service manager ended the stuck start (docker, a shell): exit so the restart policy retries."""
    log.error("Start still stuck (%s): exiting with status %d", reason, EXIT_START_STUCK)
    end_children(timeout=5.0)
    logging.shutdown()
    os._exit(EXIT_START_STUCK)
