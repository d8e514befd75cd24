"""A start that stops making progress is given up: systemd's start timeout (or our own exit) restarts it,
instead of the keepalive extending a hung start forever."""

import threading
import time

from notify_listener import NotifyListener

from farworker import runner
from farworker.config import load_config
from farworker.notify import Notifier, StartupKeepalive


def test_keepalive_stops_extending_once_the_start_is_stuck(monkeypatch):
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    stuck_after = time.monotonic() + 0.6
    gave_up = threading.Event()
    reasons = []
    stuck_sent = []  # when the keepalive sent the stuck STATUS (the listener's thread may read it later)

    class SendTimedNotifier(Notifier):
        def status(self, text: str) -> None:
            if text.startswith("start stuck"):
                stuck_sent.append(time.monotonic())
            super().status(text)

    def give_up(reason):
        reasons.append((time.monotonic(), reason))
        gave_up.set()

    try:
        keepalive = StartupKeepalive(
            SendTimedNotifier(), lambda: "joining the DHT: m", period=0.1, grant=0.5,
            stuck=lambda: "joining the DHT for 601 s" if time.monotonic() > stuck_after else None, give_up=give_up,
        )
        with keepalive:
            assert gave_up.wait(5), "give_up never ran"
        extends = [at for at, _ in listener.fields("EXTEND_TIMEOUT_USEC")]
        stuck_status = listener.times("STATUS", "start stuck: joining the DHT for 601 s")
        assert len(extends) >= 3 and stuck_status
        assert max(extends) < stuck_status[0], "extensions continued after the start was stuck"
        # give_up waits one grant after the last extension: systemd would have ended the start by then
        assert reasons[0][1] == "joining the DHT for 601 s"
        assert reasons[0][0] - stuck_sent[0] >= 0.45
    finally:
        listener.close()


def test_keepalive_leaves_a_start_that_finishes(monkeypatch):
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    called = []
    try:
        with StartupKeepalive(Notifier(), lambda: "loading blocks: m", period=0.05, grant=0.2,
                              stuck=lambda: None, give_up=called.append):
            time.sleep(0.4)
        time.sleep(0.3)
        assert listener.fields("EXTEND_TIMEOUT_USEC") and not called
        assert not [v for _, v in listener.fields("STATUS") if v.startswith("start stuck")]
    finally:
        listener.close()


def test_worker_says_which_step_is_stuck(tmp_path):
    worker = runner.Worker(load_config({
        "FARLABS_WALLET_ADDRESS": "0x" + "ab" * 20, "FARLABS_NEW_SWARM": "true",
        "FARLABS_API_BASE_URL": "http://127.0.0.1:9", "FARLABS_STATE_DIR": str(tmp_path),
    }))
    worker.phase = "joining the DHT"
    assert worker.start_stuck() is None
    worker._phase_since -= runner.STEP_BUDGET_SECONDS["joining the DHT"] + 1
    assert worker.start_stuck().startswith("joining the DHT for 60")
    # a download is stuck only when its bytes stop coming, however long it takes in all
    worker.phase = "downloading weights"
    worker._phase_since -= runner.DOWNLOAD_STALL_SECONDS - 5
    worker._download_progress(10, 100)
    worker._phase_since -= runner.DOWNLOAD_STALL_SECONDS - 5
    assert worker.start_stuck() is None
    worker._download_progress(10, 100)  # no new bytes
    worker._phase_since -= 10
    assert "downloading weights" in worker.start_stuck()
    worker.phase = "starting"  # steps without a budget are never stuck
    worker._phase_since -= 10**6
    assert worker.start_stuck() is None
