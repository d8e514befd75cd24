"""systemd's notify protocol, spoken by a real `farworker run` to a real unix datagram socket.

READY=1 only once the DHT lists the blocks online; WATCHDOG=1 keeps coming while healthy and stops
when the server is wedged (its child processes frozen); SIGTERM gives STOPPING=1 and a clean exit.
"""

import os
import signal
import time

import psutil
import pytest
from dht_lookup import blocks_online_in_dht
from notify_listener import NotifyListener
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # wedges a worker: .ci/run's fault step


def test_ready_watchdog_wedge_and_stop(start_workers, bootstrap_peer):
    listener = NotifyListener()
    try:
        started = time.monotonic()
        worker = start_workers("notified", "0:4", bootstrap_peer, env={
            "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000",  # ping every 1 s
        })
        ready_at = listener.wait_for("READY", "1", timeout=180, proc=worker.proc.process, log=worker.proc.log_path)
        # The instant READY arrives, the mesh must already list our blocks online.
        status = worker.wait_online(timeout=10)
        assert blocks_online_in_dht(bootstrap_peer, status["peer_id"])
        assert not [t for t in listener.times("WATCHDOG", "1") if t < ready_at], "watchdog before READY"
        assert any("blocks 0:4" in status for _, status in listener.fields("STATUS"))
        assert listener.times("READY", "1")[0] > started

        # about every second while healthy; each waits for a health check (a DHT query), slower on a loaded machine
        wait_for(lambda: len([t for t in listener.times("WATCHDOG", "1") if t > ready_at]) >= 3, 12,
                 "3 watchdog pings while healthy")

        # Wedge the server: freeze every child (DHT, p2pd, connection handlers). The main process lives on.
        children = psutil.Process(worker.proc.process.pid).children(recursive=True)
        assert children
        for child in children:
            child.send_signal(signal.SIGSTOP)
        wedged_at = time.monotonic()
        try:
            time.sleep(25)  # one health probe may still be in flight; its timeout is 10 s
            late = [t for t in listener.times("WATCHDOG", "1") if t > wedged_at + 12]
            assert late == [], f"{len(late)} watchdog pings while wedged"
        finally:
            for child in children:
                if child.is_running():
                    child.send_signal(signal.SIGCONT)

        os.kill(worker.proc.process.pid, signal.SIGTERM)
        stopping_at = listener.wait_for("STOPPING", "1", timeout=10)
        assert worker.proc.process.wait(timeout=30) == 0
        assert stopping_at > wedged_at
    finally:
        listener.close()
