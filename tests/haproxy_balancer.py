"""A real haproxy (Debian's) running roles/farworker_coordinator's haproxy.cfg in front of the given loopback ports,
in the foreground as the test's own process: tests/test_haproxy_config.py and benchmarks/coordinator_replicas.py."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import jinja2
import requests
from postgres_server import free_port

ROLE_TEMPLATES = Path(__file__).resolve().parents[1] / "roles" / "farworker_coordinator" / "templates"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
START_DEADLINE_S = 20.0
STOP_DEADLINE_S = 10.0


def render_config(directory: Path, listen_port: int, ports: list[int], health_interval: str = "200ms") -> Path:
    """The role's haproxy.cfg for these replica ports, to run unprivileged in the foreground: the lines for a system
    service (chroot, user, group, daemon, syslog, the admin socket) are left out; everything else is the role's."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE_TEMPLATES), undefined=jinja2.StrictUndefined)
    env.filters["comment"] = lambda text: f"# {text}"
    text = env.get_template("haproxy.cfg.j2").render(
        ansible_managed="rendered by tests/haproxy_balancer.py", farworker_coordinator_listen_address="127.0.0.1",
        farworker_coordinator_listen_port=listen_port, farworker_coordinator_health_interval=health_interval,
        _farworker_coordinator_ports=ports)
    service_only = {"chroot", "user", "group", "daemon", "log", "stats"}
    kept = [line for line in text.splitlines() if (line.split() or [""])[0] not in service_only]
    config = directory / f"haproxy-{listen_port}.cfg"
    config.write_text("\n".join(kept) + "\n")
    return config


def check_config(config: Path) -> subprocess.CompletedProcess:
    """`haproxy -c`: what the role's template task validates with."""
    return subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)


class Balancer:
    """haproxy on a free loopback port in front of ``ports``; ``url`` once it listens."""

    def __init__(self, directory: Path, ports: list[int]):
        self.port = free_port()
        self.config = render_config(directory, self.port, ports)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Balancer:
        checked = check_config(self.config)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {self.config}:\n{checked.stdout}{checked.stderr}")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/healthz", timeout=2)
                return self
            except requests.ConnectionError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"haproxy did not listen on {self.url} within {START_DEADLINE_S:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_DEADLINE_S)
        self.proc = None
