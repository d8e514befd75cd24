"""The load balancer's configuration of roles/farworker_coordinator, on a real haproxy (Debian's): when a replica dies
holding a request, a completion is sent again to another replica and the client gets its answer, while a worker's
signed request is not re-sent (the dead replica may have spent its nonce; the worker signs afresh itself).

The replicas here are two small HTTP servers of the test's own: one answers, one reads each request and closes the
connection without a byte of answer, as a replica SIGKILLed mid-request does. The fleet scenario (molecule/fleet)
does the same to real replicas under traffic."""

from __future__ import annotations

import socket
import threading

import pytest
import requests
from haproxy_balancer import HAPROXY, Balancer
from postgres_server import free_port

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/setup.sh --dev)")


class Replica(threading.Thread):
    """A replica on a loopback port, healthy for haproxy's checks; a dying one drops every request unanswered."""

    def __init__(self, dies: bool):
        super().__init__(daemon=True)
        self.dies, self.port, self.seen = dies, free_port(), []
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                request = conn.recv(65536).split(b"\r\n", 1)[0].decode()
                if request.startswith("GET /healthz"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    continue
                self.seen.append(request)
                if not self.dies:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nserved")
                # a dying replica closes without answering: what the kernel does to a SIGKILLed process's sockets

    def stop(self):
        self.stopping.set()
        self.join(timeout=5)
        self.listener.close()


@pytest.fixture
def balancer(tmp_path):
    replicas = [Replica(dies=True), Replica(dies=False)]
    for replica in replicas:
        replica.start()
    haproxy = Balancer(tmp_path, [r.port for r in replicas])  # start() runs `haproxy -c` first, as the role does
    try:
        haproxy.start()
        yield haproxy.url, replicas
    finally:
        haproxy.stop()
        for replica in replicas:
            replica.stop()


@needs_haproxy
def test_a_completion_a_dying_replica_held_is_answered_by_the_other(balancer):
    url, (dying, alive) = balancer
    answers = [requests.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
               for _ in range(6)]
    chats = [requests.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=30) for _ in range(4)]
    assert [a.status_code for a in answers + chats] == [200] * 10, [a.text[:80] for a in answers + chats]
    assert all(a.text == "served" for a in answers + chats)
    # the dying replica did get some of them: each was sent again to the other, which served all ten
    assert any("/v1/completions" in r for r in dying.seen) and any("/v1/chat/completions" in r for r in dying.seen)
    assert len(alive.seen) == 10


@needs_haproxy
def test_a_signed_worker_request_is_not_sent_twice(balancer):
    url, (dying, alive) = balancer
    answers = [requests.post(f"{url}/v1/usage", json={"records": []}, timeout=30) for _ in range(6)]
    statuses = [a.status_code for a in answers]
    # each request reached exactly one replica: the dying one's are the worker's to retry (502), never re-sent
    assert len(dying.seen) + len(alive.seen) == 6 and dying.seen, (dying.seen, alive.seen)
    assert statuses.count(502) == len(dying.seen) and statuses.count(200) == len(alive.seen), statuses
