"""The one way farworker talks to the Far Labs coordinator: every call signed with the worker's identity, to the
first of the coordinator's replicas that answers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import requests

from farworker import __version__
from farworker.clock_offset import offset_from_date
from farworker.identity import Identity

log = logging.getLogger("farworker.api_client")

# Successful calls to a later replica after which the first is tried again: the first is the one the operator
# prefers (nearest); a replica restarted is back within that many calls, a dead one costs one failed attempt each time.
RETURN_TO_FIRST_AFTER = 20
MIN_ATTEMPT_S = 0.5  # a replica tried after another failed gets at least this, within the call's timeout


class CoordinatorError(Exception):
    """A coordinator call failed. ``status`` is the HTTP status (None when there was no answer), ``code``
    the coordinator's error code when it sent one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code

    @property
    def retryable(self) -> bool:
        """Worth trying again later as is (no answer, or the coordinator's own trouble)."""
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def fails_over(self) -> bool:
        """Another replica may answer: this one did not, or had trouble of its own (a 429 is the coordinator's
        load, shared by its replicas: wait instead)."""
        return self.status is None or self.status >= 500

    @property
    def needs_registration(self) -> bool:
        """The coordinator does not know this worker (any more): register again."""
        return self.code in ("unregistered", "unknown_worker") or self.status == 404


class CoordinatorClient:
    """``base_url``: one coordinator, or its replicas (a list, or a comma-separated string as FARLABS_API_BASE_URL
    gives). A call goes to the current replica; on no answer or a 5xx it moves to the next (within the call's
    ``timeout``, and for the calls after it), and after RETURN_TO_FIRST_AFTER successes elsewhere it tries the
    first again. Each attempt is signed afresh: a replica refuses a nonce another has seen. The calls the worker
    repeats are idempotent on the coordinator (usage records by id), so an attempt that reached a replica whose
    answer was lost counts once."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        identity: Identity,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ):
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        self.base_urls = [url.strip().rstrip("/") for url in urls if url.strip()]
        if not self.base_urls:
            raise ValueError("no coordinator URL")
        self._current = 0  # index of the replica calls go to
        self._successes_elsewhere = 0  # calls answered by a later replica since the first was last tried
        self.identity = identity
        self.timeout = timeout
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = f"farworker/{__version__}"
        self.clock_offset: float | None = None  # this host minus the coordinator, from the last answer's Date

    @property
    def base_url(self) -> str:
        """The replica the next call goes to."""
        return self.base_urls[self._current]

    def close(self) -> None:
        self._session.close()

    def _post(self, path: str, payload: dict) -> dict:
        if self._current and self._successes_elsewhere >= RETURN_TO_FIRST_AFTER:
            self._current, self._successes_elsewhere = 0, 0  # back to the first: it may be up again
        deadline = time.monotonic() + self.timeout
        count, first = len(self.base_urls), self._current
        for step in range(count):
            index = (first + step) % count
            try:
                answer = self._post_to(self.base_urls[index], path, payload,
                                       max(MIN_ATTEMPT_S, deadline - time.monotonic()))
            except CoordinatorError as err:
                if not err.fails_over or count == 1:
                    raise
                self._moved(index, (index + 1) % count, err)  # the next call starts there even if this one ends
                if step == count - 1 or time.monotonic() >= deadline:
                    raise
                continue
            if self._current:
                self._successes_elsewhere += 1
            return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _moved(self, failed: int, to: int, err: CoordinatorError) -> None:
        if self._current == failed:
            log.warning("coordinator %s failed (%s): moving to %s", self.base_urls[failed], err, self.base_urls[to])
            self._current, self._successes_elsewhere = to, 0

    def _post_to(self, base_url: str, path: str, payload: dict, timeout: float) -> dict:
        url = base_url + path
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self.identity.sign("POST", urlsplit(url).path, body)}
        what = f"POST {path}"
        sent_at = time.time()
        try:
            response = self._session.post(url, data=body, headers=headers, timeout=timeout)
        except requests.Timeout:
            raise CoordinatorError(f"{what}: no answer from {base_url} within {timeout:g} s") from None
        except requests.ConnectionError as err:
            reason = _root_cause(err)
            raise CoordinatorError(f"{what}: cannot reach {base_url} ({reason})") from None
        except requests.RequestException as err:
            raise CoordinatorError(f"{what}: {err}") from None
        offset = offset_from_date(response.headers.get("Date"), sent_at, time.time())
        if offset is not None:
            self.clock_offset = offset
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not response.ok:
            code = answer.get("code") if isinstance(answer, dict) else None
            message = answer.get("error") if isinstance(answer, dict) else None
            message = message or (response.text[:200].strip() or response.reason)
            raise CoordinatorError(
                f"{what}: HTTP {response.status_code}: {message}", response.status_code, code
            )
        if not isinstance(answer, dict):
            raise CoordinatorError(
                f"{what}: HTTP {response.status_code} but the answer is not a JSON object",
                response.status_code,
            )
        return answer

    @staticmethod
    def _need(answer: dict, what: str, **types) -> dict:
        for name, kind in types.items():
            if not isinstance(answer.get(name), kind) or isinstance(answer.get(name), bool):
                raise CoordinatorError(f"{what}: the answer lacks {name}")
        return answer

    def register(self, payload: dict) -> dict:
        """-> {"worker_id": str, "heartbeat_interval": seconds}"""
        answer = self._post("/v1/workers/register", payload)
        return self._need(answer, "register", worker_id=str, heartbeat_interval=(int, float))

    def heartbeat(self, worker_id: str, payload: dict) -> dict:
        """-> {"earn_rate_far_per_hour", "reliability", "uptime_pct", "heartbeat_interval"}"""
        answer = self._post(f"/v1/workers/{worker_id}/heartbeat", payload)
        return self._need(
            answer,
            "heartbeat",
            earn_rate_far_per_hour=(int, float),
            reliability=(int, float),
            uptime_pct=(int, float),
        )

    def send_usage(self, worker_id: str, records: list[dict]) -> list[str]:
        """-> the ids the coordinator has on its ledger now (safe to delete from the outbox)."""
        answer = self._post(f"/v1/workers/{worker_id}/usage", {"records": records})
        accepted = self._need(answer, "usage", accepted=list)["accepted"]
        return [str(i) for i in accepted]

    def deregister(self, worker_id: str, reason: str = "shutdown") -> None:
        self._post(f"/v1/workers/{worker_id}/deregister", {"reason": reason})


def _root_cause(err: BaseException) -> str:
    while err.__context__ is not None or getattr(err, "reason", None) is not None:
        nxt = getattr(err, "reason", None) or err.__context__
        if nxt is None or nxt is err or not isinstance(nxt, BaseException):
            break
        err = nxt
    text = str(err)
    if "Connection refused" in text:
        return "connection refused"
    return text.split(": ", 1)[-1][:160] or type(err).__name__
