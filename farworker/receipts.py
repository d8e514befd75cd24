"""Signed receipts: how a direct client vouches for the server sessions workers ran for it.

A client holds an Ed25519 key (a PEM PKCS#8 file, created on first use). The coordinator's operator
registers the public half in the coordinator's ``--client-keys`` file (``NAME PUBLIC_KEY`` lines, the key
as base64 of its 32 raw bytes: what ``farworker client-key FILE`` prints). A receipt
(``farworker.wire_records.Receipt``) is signed over::

    FAR-RECEIPT-V1\\n{the receipt's fields but "signature", as JSON with sorted keys and no spaces}

so any change to a field (the peer it names, its tokens, its session) breaks the signature, and a worker
cannot make one: it holds no registered client key. The signature is over the receipt, not the HTTP
request, so whoever delivers a receipt (the client, or anyone replaying it) changes nothing about what it
vouches for; the coordinator counts each receipt and each server session once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from farworker import entry_lines

RECEIPT_SCHEME = "FAR-RECEIPT-V1"


class ClientKeyError(Exception):
    """The client key file, or a line of the coordinator's client-keys file, is unusable; says which."""


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:32]


def public_key_from_b64(public_key_b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as err:
        raise ClientKeyError(f"not a base64 Ed25519 public key (32 bytes): {err}") from None


@dataclass(frozen=True)
class ClientKey:
    private_key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode("ascii")

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_raw)

    def sign(self, receipt: dict) -> dict:
        """``receipt`` with its ``client_key_id`` set and its ``signature``."""
        unsigned = {k: v for k, v in receipt.items() if k != "signature"} | {"client_key_id": self.key_id}
        signature = self.private_key.sign(signed_bytes(unsigned))
        return unsigned | {"signature": base64.b64encode(signature).decode("ascii")}

    @classmethod
    def generate(cls) -> ClientKey:
        return cls(Ed25519PrivateKey.generate())


def load_or_create(path: str | os.PathLike) -> ClientKey:
    """The client key at ``path``, created (mode 0600) on first use."""
    path = Path(path)
    if not path.exists():
        pem = ClientKey.generate().private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
        except FileExistsError:
            pass  # made meanwhile by another process: use theirs
        except OSError as err:
            raise ClientKeyError(f"cannot create client key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise ClientKeyError(f"cannot read client key {path}: {err.strerror}") from None
    except (ValueError, TypeError) as err:
        raise ClientKeyError(f"client key {path} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ClientKeyError(f"client key {path} must be an Ed25519 key")
    return ClientKey(key)


def signed_bytes(receipt: dict) -> bytes:
    """The exact bytes a receipt's signature covers: every field but ``signature``, canonical JSON."""
    fields = {k: v for k, v in receipt.items() if k != "signature"}
    return f"{RECEIPT_SCHEME}\n{json.dumps(fields, sort_keys=True, separators=(',', ':'))}".encode()


def verifies(receipt: dict, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(base64.b64decode(receipt["signature"], validate=True), signed_bytes(receipt))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def receipts_for(route: list[dict], model: str, key: ClientKey, now: float | None = None) -> list[dict]:
    """One signed receipt per server session of a generation's route (``farworker.mesh_client.Generation``)."""
    created = int(time.time() if now is None else now)
    return [
        key.sign({
            "id": str(uuid.uuid4()),
            "peer_id": span["peer_id"],
            "blocks": list(span["blocks"]),
            "tokens": int(span["tokens"]),
            "session_id": span["session_id"],
            "model": model,
            "created_at": created,
        })
        for span in route
        if span["tokens"] > 0
    ]


def read_client_keys(path: Path) -> dict[str, tuple[str, str]]:
    """The coordinator's allowlist: 'NAME PUBLIC_KEY' lines (blank lines and # comments skipped) ->
    {key id: (name, public key base64)}; a bad line names its number."""
    keys: dict[str, tuple[str, str]] = {}
    try:
        text = path.read_text()
    except OSError as err:
        raise ClientKeyError(f"cannot read: {err.strerror}") from None
    for number, fields in entry_lines.entries(text):
        if len(fields) != 2:
            raise ClientKeyError(f"line {number}: expected 'NAME PUBLIC_KEY' (base64 Ed25519 public key)")
        name, public_key_b64 = fields
        try:
            public_key = public_key_from_b64(public_key_b64)
        except ClientKeyError as err:
            raise ClientKeyError(f"line {number}: {err}") from None
        key_id = key_id_of(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        if key_id in keys:
            raise ClientKeyError(f"line {number}: the key of {name!r} is already given to {keys[key_id][0]!r}")
        keys[key_id] = (name, public_key_b64)
    if not keys:
        raise ClientKeyError("no keys in the file")
    return keys
