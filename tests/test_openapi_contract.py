"""openapi/farworker-api.yaml is what the coordinator serves: paths, methods, required fields, schemas."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests
import yaml

from farworker.coordinator.contract import CONTRACT_PATH, served_openapi

REGENERATE = "regenerate with: python -m farworker.coordinator.contract"


def _operations(document: dict) -> dict[tuple[str, str], dict]:
    return {(path, method): op for path, ops in document["paths"].items() for method, op in ops.items()}


def _schema_ref(op: dict) -> str | None:
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    return body.get("$ref") or str(body.get("anyOf"))


def _shape(schema: dict) -> tuple:
    return (sorted(schema.get("required", [])), sorted(schema.get("properties", {})))


def test_contract_matches_the_served_document():
    written = yaml.safe_load(CONTRACT_PATH.read_text())
    served = served_openapi()
    assert sorted(_operations(written)) == sorted(_operations(served)), REGENERATE
    for key, op in _operations(served).items():
        mine = _operations(written)[key]
        assert _schema_ref(mine) == _schema_ref(op), (key, REGENERATE)
        assert sorted(mine["responses"]) == sorted(op["responses"]), (key, REGENERATE)
        assert mine.get("security") == op.get("security"), (key, REGENERATE)
        assert [p["name"] for p in mine.get("parameters", [])] == [
            p["name"] for p in op.get("parameters", [])
        ]
    written_schemas, served_schemas = written["components"]["schemas"], served["components"]["schemas"]
    assert sorted(written_schemas) == sorted(served_schemas), REGENERATE
    for name, schema in served_schemas.items():
        assert _shape(written_schemas[name]) == _shape(schema), (name, REGENERATE)
    # and in full: the document is generated, so any drift at all is a stale file
    assert written == served, REGENERATE


def test_contract_covers_the_issue():
    ops = _operations(served_openapi())
    for key in [
        ("/v1/workers/register", "post"),
        ("/v1/workers/{worker_id}/heartbeat", "post"),
        ("/v1/workers/{worker_id}/usage", "post"),
        ("/v1/workers/{worker_id}/deregister", "post"),
        ("/v1/workers", "get"),
        ("/v1/workers/{worker_id}", "get"),
        ("/v1/completions", "post"),
    ]:
        assert key in ops, key
    schemas = served_openapi()["components"]["schemas"]
    assert {
        "wallet_address",
        "peer_id",
        "public_key",
        "model_name",
        "blocks",
        "torch_dtype",
        "quant_type",
        "version",
        "hardware",
    } <= set(schemas["RegisterRequest"]["required"])
    assert {"state", "uptime_seconds", "gpus", "counters"} <= set(schemas["HeartbeatRequest"]["required"])
    assert set(schemas["UsageRecord"]["required"]) == {
        "id",
        "session_id",
        "blocks",
        "tokens",
        "steps",
        "started_at",
        "ended_at",
    }
    assert {"earn_rate_far_per_hour", "reliability", "uptime_pct"} <= set(
        schemas["HeartbeatResponse"]["required"]
    )
    assert set(served_openapi()["components"]["securitySchemes"]) == {
        "X-Far-Peer-Id",
        "X-Far-Timestamp",
        "X-Far-Nonce",
        "X-Far-Signature",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_command_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    db = tmp_path / "c.sqlite"
    code = "from farworker.coordinator.command import coordinator_command; coordinator_command()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", str(port), "--db", str(db), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/v1/workers", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
        assert answer.json() == {"workers": [], "next_cursor": None}
        assert requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2).json()["paths"]
        os.kill(proc.pid, signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: systemd counts SIGTERM as a clean stop
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        assert db.is_file()
    finally:
        proc.kill()
        proc.wait(5)


def test_coordinator_command_model_without_peers_is_a_config_error(tmp_path):
    code = "from farworker.coordinator.command import coordinator_command; coordinator_command()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model-path", str(tmp_path), "--db", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78
    assert "--initial-peer" in proc.stderr and "Traceback" not in proc.stderr
