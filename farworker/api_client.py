"""The one way farworker talks to the Far Labs coordinator: every call signed with the worker's identity."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import requests

from farworker import __version__
from farworker.clock_offset import offset_from_date
from farworker.identity import Identity


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
    def needs_registration(self) -> bool:
        """The coordinator does not know this worker (any more): register again."""
        return self.code in ("unregistered", "unknown_worker") or self.status == 404


class CoordinatorClient:
    def __init__(
        self,
        base_url: str,
        identity: Identity,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.timeout = timeout
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = f"farworker/{__version__}"
        self.clock_offset: float | None = None  # this host minus the coordinator, from the last answer's Date

    def close(self) -> None:
        self._session.close()

    def _post(self, path: str, payload: dict) -> dict:
        url = self.base_url + path
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self.identity.sign("POST", urlsplit(url).path, body)}
        what = f"POST {path}"
        sent_at = time.time()
        try:
            response = self._session.post(url, data=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            raise CoordinatorError(
                f"{what}: no answer from {self.base_url} within {self.timeout:g} s"
            ) from None
        except requests.ConnectionError as err:
            reason = _root_cause(err)
            raise CoordinatorError(f"{what}: cannot reach {self.base_url} ({reason})") from None
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
