"""A real Postgres server for the tests: Debian's postgresql binaries (scripts/setup.sh --dev installs them), in a
data directory, on a port and a socket directory of its own.

initdb and postgres refuse to run as root; as root the server therefore runs as the unprivileged ``nobody`` (the
child switches user before exec: Popen's user/group), in a temporary directory made for it and owned by it;
otherwise as the test's own user. The server is this process's child and owns nothing else: stop() ends it
(SIGINT, Postgres' fast shutdown) within a deadline and removes the directory. Each test takes a database of its
own (new_database), so tests on one server never see each other's rows.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

USER = "farworker"
START_DEADLINE_S = 60.0
_names = itertools.count()


def bindir() -> Path | None:
    """The newest Debian postgresql's binaries (/usr/lib/postgresql/N/bin), else an initdb on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path):
        # as root under /tmp, which nobody can reach (a TMPDIR under /root would not be)
        self.dir = Path(tempfile.mkdtemp(prefix="farworker-pg-", dir="/tmp" if os.geteuid() == 0 else None))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._as = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        self.bin = bin_dir

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = bindir()
        if bin_dir is None:
            raise RuntimeError("no Postgres server binaries (initdb): install Debian's postgresql "
                               "(bash scripts/setup.sh --dev does)")
        server = cls(bin_dir)
        try:
            server._start()
        except BaseException:
            server.stop()
            raise
        return server

    def _start(self) -> None:
        data = self.dir / "data"
        # trust on loopback and the private socket: the server lives as long as the test session, in its dir
        subprocess.run([self.bin / "initdb", "-D", data, "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C",
                        "--no-sync"], cwd=self.dir, check=True, capture_output=True, timeout=120, **self._as)
        log = open(self.dir / "postgres.log", "wb")  # noqa: SIM115 (the server's stderr for its whole life)
        self.proc = subprocess.Popen(
            [self.bin / "postgres", "-D", data, "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off", "-c", "max_connections=200"],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, **self._as,
        )
        log.close()
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Postgres did not start: "
                                       + (self.dir / "postgres.log").read_text()[-2000:]) from None
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database on this server; its URL."""
        name = f"ledger_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
