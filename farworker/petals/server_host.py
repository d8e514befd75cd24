"""Hosts a Petals server in this process and answers the questions systemd asks about it.

`PetalsHost.start()` builds petals' `Server` (which starts the DHT process) and runs it in a thread;
`loaded` and `announcement_problem()` say when our blocks are served and listed ONLINE in the DHT;
`health()` says whether the server still serves; `stop()` shuts everything down within a deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time

import psutil

from farworker.block_plan import BlockPlan
from farworker.catalog import dht_prefix_for
from farworker.config import WorkerConfig
from farworker.petals import lazy_peft, tensor_handoff
from farworker.petals.compat import import_petals
from farworker.petals.throughput import announced_throughput, measured_rps

# petals' own modules are imported inside the functions that use them, after import_petals() (compat): petals
# 2.2 cannot be imported before hivemind's names are restored. So is step_batching, which imports torch and
# transformers at its top: after import_petals(), which silences their import-time warnings.

log = logging.getLogger(__name__)
HEALTH_TIMEOUT = 10.0  # seconds a DHT probe may take before the server counts as wedged
# A task the runtime has not finished after this long means it is stuck (a step takes milliseconds to
# seconds, a 2048-token forward of a 70B block well under a minute on any GPU petals supports).
RUNTIME_STALL_SECONDS = 120.0
ANNOUNCE_OFFLINE_TIMEOUT = 5.0  # declaring OFFLINE takes well under a second with the DHT alive
# petals' server loop wakes at random times (uniform up to twice its mean_balance_check_period, 120 s) to rebalance
# blocks and to restart its module container when a child died. Fixed blocks never rebalance, and a dead child is
# the worker's health check's to act on (exit 70, a whole fresh process tree from systemd). When petals' wake-up won
# the race, it replaced the container in place and the worker never made its restart (a fault-matrix cell failed
# on it, once in 20). So with fixed blocks petals' loop only waits for the stop.
FIXED_BLOCKS_BALANCE_PERIOD = 365 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = ""
    fatal: bool = False  # a child process died: the worker exits so its supervisor restarts it at once


class PetalsHost:
    def __init__(self, config: WorkerConfig, model_path: str, plan: BlockPlan):
        self.config = config
        self.model_path = model_path
        self.plan = plan
        self.server = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._children: list = []  # (psutil.Process, name) of every child once online (watch_children)
        self._watched_container = None
        self.visible_maddrs: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        import_petals()
        from petals.server.server import Server
        from petals.utils.convert_block import QuantType

        from farworker.petals import step_batching

        lazy_peft.install()  # petals' backends would import bitsandbytes (seconds of CPU) for adapters we never load
        tensor_handoff.install()  # before the handler processes fork: they inherit the reducer
        tensor_handoff.keep_small_outputs_private()
        cfg, plan = self.config, self.plan
        if cfg.step_batching:
            step_batching.install()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.server = Server(
            initial_peers=cfg.initial_peers,
            dht_prefix=dht_prefix_for(cfg.model_name),
            converted_model_name_or_path=self.model_path,
            public_name=cfg.public_name or None,
            throughput=1.0,  # replaced below with our locally measured figure; avoids petals' speedtest
            block_indices=f"{plan.start}:{plan.end}" if plan.fixed else None,
            num_blocks=None if plan.fixed else plan.num_blocks,
            torch_dtype=cfg.torch_dtype,
            cache_dir=str(cfg.cache_dir),
            max_disk_space=cfg.max_disk_space,
            device=plan.device,
            quant_type=QuantType[plan.quant_type.upper()],
            token=cfg.hf_token or None,
            skip_reachability_check=True,  # petals would ask health.petals.dev
            reachable_via_relay=False,  # petals would start a throwaway DHT to probe reachability
            identity_path=str(cfg.identity_path),
            host_maddrs=cfg.listen_maddrs,
            announce_maddrs=list(cfg.announce_maddrs) or None,
            # a fresh identity file is checked against the swarm; ours is ours, and the check costs a DHT round
            check_if_identity_free=False,
            # With step batching the runtime takes its next step only when it is free, so the steps that arrived
            # meanwhile run together; petals' default (1) would load the next step alone while one computes.
            prefetch_batches=0 if cfg.step_batching else 1,
            **({"mean_balance_check_period": FIXED_BLOCKS_BALANCE_PERIOD} if plan.fixed else {}),
        )
        block_config = self.server.block_config
        rps = measured_rps(block_config, self.server.device, self.server.torch_dtype, self.server.quant_type,
                           cfg.cache_dir, cfg.model_name)
        figures = announced_throughput(rps, block_config.hidden_size, self.server.num_blocks, cfg.network_mbps)
        for name, value in figures.items():
            setattr(self.server.server_info, name, value)
        self.visible_maddrs = [str(addr) for addr in self.server.dht.get_visible_maddrs()]
        self._withdraw_stale_records()
        log.info("Connected to DHT as %s, listening on %s", self.peer_id, self.visible_maddrs)
        self._thread = threading.Thread(target=self._run, name="petals-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as error:  # reported through health(); the runner decides what to do
            self._failure = error
            log.exception("Petals server stopped with an error")

    def _withdraw_stale_records(self) -> None:
        """Declare OFFLINE whatever the DHT still lists ONLINE under our peer id from a previous run.

        Our identity is persistent. After a crash (kill -9, OOM, a watchdog restart, a host kill) the last
        run's ONLINE records live until they expire (petals: 2 update periods, 120 s), and p2pd answers under
        our peer id long before petals registers its handlers: a client routed by those records gets
        "protocols not supported: rpc_inference". Petals' JOINING announcement would replace them only for
        the span this run picks, and only once loading starts."""
        from petals.data_structures import ServerState

        dht, me = self.server.dht, self.server.dht.peer_id
        try:
            infos = get_module_infos_latest(dht, self.server.module_uids)
            stale = [info.uid for info in infos if me in info.servers and info.servers[me].state != ServerState.OFFLINE]
            if stale:
                declare_offline(dht, stale, self.server.server_info, self.server.expiration)
                log.info("Withdrew %d block records a previous run left in the DHT (declared offline)", len(stale))
        except Exception as error:  # a slow DHT must not fail the start; the records expire on their own
            log.warning("Could not check the DHT for records of a previous run: %r", error)

    def announce_offline(self, timeout: float = ANNOUNCE_OFFLINE_TIMEOUT) -> bool:
        """Declare our blocks OFFLINE in the DHT, so clients route new sessions elsewhere, while the handlers
        keep serving the sessions already open (a drain). The announcer thread ends after this.

        petals' own ``announce(OFFLINE)`` joins the announcer thread without a limit; with the DHT process
        dead that join never returns (a stop that never ends). False if it did not finish in ``timeout``."""
        container = self.server.module_container if self.server else None
        if container is None:
            return False
        from petals.data_structures import ServerState

        announcer = container.dht_announcer
        announcer.server_info.state = ServerState.OFFLINE
        announcer.trigger.set()
        announcer.join(timeout)
        return not announcer.is_alive()

    def stop(self, timeout: float = 20.0) -> None:
        """Shut petals down within ``timeout``. Its own shutdown bounds the module container but then joins
        the DHT process without a limit, so it runs in a thread; what is still alive after the timeout is
        ended by the caller (process_tree.end_children)."""
        if self.server is None:
            return
        deadline = time.monotonic() + timeout
        stopper = threading.Thread(
            target=self.server.shutdown, kwargs={"timeout": timeout}, name="petals-shutdown", daemon=True
        )
        stopper.start()
        stopper.join(timeout)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if stopper.is_alive():
            log.warning("petals did not shut down within %.0f s; its processes are ended instead", timeout)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.server.dht.peer_id.to_base58()

    @property
    def block_uids(self) -> list[str]:
        container = self.server.module_container if self.server else None
        return list(container.module_backends) if container else []

    @property
    def blocks(self) -> tuple[int, int] | None:
        uids = self.block_uids
        if not uids:
            return None
        indices = [int(uid.rsplit(".", 1)[1]) for uid in uids]
        return min(indices), max(indices) + 1

    @property
    def num_model_blocks(self) -> int:
        return self.server.block_config.num_hidden_layers

    @property
    def dht_prefix(self) -> str:
        return self.server.dht_prefix

    # -- readiness and health ----------------------------------------------------------------------
    def watch_children(self) -> None:
        """Remember the processes serving now (DHT, both p2pd, handlers, torch_shm_manager): from here on the
        death of any of them is fatal. petals would restart its container only after up to 4 min (its balance
        check wake-up, turned off for fixed blocks), and never a dead DHT or p2pd; a fresh process is back online
        in seconds. (While petals replaces its container on purpose, health() reports the blocks not loaded, then
        watches the new one.)"""
        self._watched_container = self.server.module_container
        self._children = []
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                self._children.append((child, child.name()))

    def dead_child(self) -> str | None:
        """'child process p2pd (pid 123) died' for the first watched child that is gone or a zombie."""
        for child, name in self._children:
            with contextlib.suppress(psutil.Error):
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    continue
            return f"child process {name} (pid {child.pid}) died"
        return None

    def failure(self) -> str | None:
        """Why the petals server thread ended, or None while it runs."""
        if self._failure is not None:
            return f"server failed: {self._failure!r}"
        if self._thread is not None and not self._thread.is_alive():
            return "server thread is not running"
        return None

    @property
    def loaded(self) -> bool:
        """The blocks are loaded and the runtime takes requests (the handlers are registered with p2pd)."""
        container = self.server.module_container if self.server else None
        return container is not None and container.ready.is_set()

    def health(self) -> Health:
        if self._thread is None:
            return Health(False, "server thread is not running")
        failure = self.failure()
        if failure:
            return Health(False, failure, fatal=True)
        if not self.loaded:
            return Health(False, "blocks are not loaded")
        container = self.server.module_container
        if container is not self._watched_container:  # petals rebalanced: a new container, new handlers
            self.watch_children()
        dead = self.dead_child()
        if dead:
            return Health(False, dead, fatal=True)
        # The container thread runs the runtime loop itself (Runtime.run() is called, not start()).
        if not container.is_healthy() or not container.is_alive():
            return Health(False, "a handler process or the runtime has died", fatal=True)
        if not self.server.dht.is_alive():
            return Health(False, "the DHT process has died", fatal=True)
        waiting = self._oldest_task_age(container)
        if waiting > RUNTIME_STALL_SECONDS:
            return Health(False, f"the runtime has left a task unfinished for {waiting:.0f} s")
        try:
            # A DHT query answered proves the DHT process and p2pd respond; our newest records being ONLINE
            # and unexpired proves the announcer still runs. (Calling our own handlers over P2P is not
            # possible: libp2p refuses a dial to self, and a second daemon costs ~30 MB.)
            problem = self.announcement_problem()
        except Exception as error:  # timeouts included: a wedged process answers nothing
            return Health(False, f"probe failed: {error!r}")
        return Health(False, problem) if problem else Health(True)

    @staticmethod
    def _oldest_task_age(container) -> float:
        """Seconds the oldest task queued or running in the runtime has waited (0 when idle)."""
        submitted = []
        for pool in container.runtime.pools:
            queued = list(pool._ordered_tasks.queue[:1])  # a heap: the first is the next to run
            submitted += [task.time_submitted for task in queued + list(pool._dispatched_tasks.values())]
        # handlers stamp tasks with time.monotonic(), which is one clock for every process on the host
        return time.monotonic() - min(submitted) if submitted else 0.0

    def announcement_problem(self) -> str | None:
        """None when the DHT lists every block we serve ONLINE under our peer id; else what it lists."""
        from petals.data_structures import ServerState

        uids = self.block_uids
        if not uids:
            return "no blocks loaded"
        me = self.server.dht.peer_id
        wrong = [
            f"{info.uid} {info.servers[me].state.name if me in info.servers else 'absent'}"
            for info in get_module_infos_latest(self.server.dht, uids)
            if me not in info.servers or info.servers[me].state != ServerState.ONLINE
        ]
        if not wrong:
            return None
        return "the DHT lists our blocks as " + ", ".join(wrong[:3]) + (", ..." if len(wrong) > 3 else "")


def get_module_infos_latest(dht, uids: list[str]) -> list:
    """Each block's servers as their newest unexpired records say, from every replica (what clients route by).

    Without ``latest`` hivemind returns the first unexpired copy of a block's record it finds, and after a
    restart that is often a replica still holding our previous run's OFFLINE or JOINING entry: measured on a
    3-worker loopback mesh, 2 of 15 restarts waited 65 s and over 120 s for READY (one announcement period
    or more) while clients, who look up with ``latest``, were already being served."""
    from petals.utils.dht import get_remote_module_infos

    return get_remote_module_infos(dht, uids, latest=True, return_future=True).result(timeout=HEALTH_TIMEOUT)


def declare_offline(dht, uids: list[str], server_info, expiration: float) -> None:
    from hivemind.utils.timed_storage import get_dht_time
    from petals.data_structures import ServerState
    from petals.utils.dht import declare_active_modules

    offline = dataclasses.replace(server_info, state=ServerState.OFFLINE)
    declare_active_modules(dht, uids, offline, expiration_time=get_dht_time() + expiration, wait=False).result(
        timeout=HEALTH_TIMEOUT
    )
