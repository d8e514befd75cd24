"""The worker's persistent identity: one RSA key that names it in the DHT and signs its coordinator calls.

The key file is the libp2p identity hivemind reads (``P2P.create(identity_path=...)``): a protobuf
``crypto.pb.PrivateKey`` holding a DER RSA key. The Petals server is started with the same file, so the
peer id the mesh sees and the peer id the coordinator pays are one and the same. The private key never
leaves the host; the coordinator gets the public half (DER SubjectPublicKeyInfo, base64) at registration.

Request signature (scheme ``FAR-SIG-V1``), RSA-PSS with SHA-256 over::

    FAR-SIG-V1\\n{METHOD}\\n{path}\\n{timestamp}\\n{nonce}\\n{sha256(body) hex}

sent as ``X-Far-Peer-Id``, ``X-Far-Timestamp`` (integer unix seconds), ``X-Far-Nonce`` and
``X-Far-Signature`` (base64).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from farworker.config import WorkerConfig

SIGNATURE_SCHEME = "FAR-SIG-V1"
HEADER_PEER_ID = "X-Far-Peer-Id"
HEADER_TIMESTAMP = "X-Far-Timestamp"
HEADER_NONCE = "X-Far-Nonce"
HEADER_SIGNATURE = "X-Far-Signature"
SIGNATURE_HEADERS = (HEADER_PEER_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
MACHINE_ID_PATH = "/etc/machine-id"
DEFAULT_WINDOW_S = 60
RSA_KEY_BITS = 2048  # what hivemind.P2P.generate_identity makes

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
# libp2p's crypto.proto (the one hivemind ships as hivemind/proto/crypto.proto). Built in a private pool
# because importing hivemind.proto imports all of hivemind and torch (seconds) for two tiny messages.
_CRYPTO_PROTO = descriptor_pb2.FileDescriptorProto(
    name="farworker_libp2p_crypto.proto",
    package="crypto.pb",
    syntax="proto2",
    enum_type=[
        descriptor_pb2.EnumDescriptorProto(
            name="KeyType",
            value=[
                descriptor_pb2.EnumValueDescriptorProto(name=n, number=i)
                for i, n in enumerate(["RSA", "Ed25519", "Secp256k1", "ECDSA"])
            ],
        )
    ],
    message_type=[
        descriptor_pb2.DescriptorProto(
            name=name,
            field=[
                descriptor_pb2.FieldDescriptorProto(
                    name="key_type",
                    number=1,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED,
                    type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                    type_name=".crypto.pb.KeyType",
                ),
                descriptor_pb2.FieldDescriptorProto(
                    name="data",
                    number=2,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED,
                    type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                ),
            ],
        )
        for name in ("PublicKey", "PrivateKey")
    ],
)
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_CRYPTO_PROTO)
_PublicKeyPb = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("crypto.pb.PublicKey"))
_PrivateKeyPb = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("crypto.pb.PrivateKey"))
_KEY_TYPE_RSA = 0
_MULTIHASH_SHA2_256 = b"\x12\x20"  # multihash code 0x12 (sha2-256), digest length 32


class IdentityError(Exception):
    """The identity file is missing, unreadable or not an RSA libp2p key."""


class SignatureError(Exception):
    """A signed request failed verification; ``str(err)`` says which check."""


def _peer_id_from_der(public_der: bytes) -> str:
    encoded = _PublicKeyPb(key_type=_KEY_TYPE_RSA, data=public_der).SerializeToString()
    return base58.b58encode(_MULTIHASH_SHA2_256 + hashlib.sha256(encoded).digest()).decode("ascii")


def peer_id_from_public_key(public_key_b64: str) -> str:
    """The libp2p peer id (base58) of an RSA public key given as base64 DER SubjectPublicKeyInfo."""
    public_key = load_public_key(public_key_b64)
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _peer_id_from_der(der)


def load_public_key(public_key_b64: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(base64.b64decode(public_key_b64, validate=True))
    except (ValueError, binascii.Error, TypeError) as err:
        raise SignatureError(f"public_key is not base64 DER SubjectPublicKeyInfo: {err}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SignatureError("public_key must be an RSA key (libp2p RSA identity)")
    return key


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_request(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The exact bytes that are signed. ``path`` is the URL path (plus ``?query`` when there is one)."""
    return "\n".join([SIGNATURE_SCHEME, method.upper(), path, timestamp, nonce, body_digest(body)]).encode()


@dataclass(frozen=True)
class Identity:
    private_key: rsa.RSAPrivateKey
    path: Path | None = None

    @property
    def public_key_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key_der).decode("ascii")

    @property
    def peer_id(self) -> str:
        return _peer_id_from_der(self.public_key_der)

    def sign(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        timestamp: int | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        """Headers that authenticate one request (method, path, body) as coming from this identity."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        nonce = nonce or secrets.token_hex(16)
        signature = self.private_key.sign(
            canonical_request(method, path, ts, nonce, body), _PSS, hashes.SHA256()
        )
        return {
            HEADER_PEER_ID: self.peer_id,
            HEADER_TIMESTAMP: ts,
            HEADER_NONCE: nonce,
            HEADER_SIGNATURE: base64.b64encode(signature).decode("ascii"),
        }

    def to_protobuf(self) -> bytes:
        """The identity file's bytes, as ``hivemind.P2P.generate_identity`` writes them."""
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return _PrivateKeyPb(key_type=_KEY_TYPE_RSA, data=der).SerializeToString()

    @classmethod
    def generate(cls) -> Identity:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS))

    @classmethod
    def from_protobuf(cls, data: bytes, path: Path | None = None) -> Identity:
        where = f" in {path}" if path else ""
        try:
            message = _PrivateKeyPb.FromString(data)
        except Exception as err:  # protobuf raises its own DecodeError
            raise IdentityError(f"identity file{where} is not a libp2p private key: {err}") from None
        if message.key_type != _KEY_TYPE_RSA:
            raise IdentityError(f"identity file{where} holds a non-RSA key; hivemind accepts RSA only")
        try:
            key = serialization.load_der_private_key(message.data, password=None)
        except (ValueError, TypeError) as err:
            raise IdentityError(f"identity file{where} holds an unreadable RSA key: {err}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise IdentityError(f"identity file{where} holds a non-RSA key; hivemind accepts RSA only")
        return cls(key, path)


def load_or_create(path: str | os.PathLike) -> Identity:
    """Load the identity at ``path``, creating it (mode 0400, parent dir 0700) on first start."""
    path = Path(path)
    if not path.exists():
        _create(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IdentityError(f"cannot read identity file {path}: {err.strerror}") from None
    identity = Identity.from_protobuf(data, path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # a key readable by others is not a secret any more; take the access back
        os.chmod(path, 0o400)
    return identity


def _create(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise IdentityError(f"cannot create the directory for identity file {path}: {err.strerror}") from None
    data = Identity.generate().to_protobuf()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link, not rename: if another process made the key meanwhile, theirs stays and we use it
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise IdentityError(f"cannot write identity file {path}: {err.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def verify_request(
    public_key_b64: str,
    method: str,
    path: str,
    body: bytes,
    headers,
    *,
    now: float | None = None,
    window_s: int = DEFAULT_WINDOW_S,
) -> tuple[str, str, int]:
    """Check a signed request against a public key; returns (peer_id, nonce, timestamp).

    Checks, in order: all headers present, the peer id derives from the key, the timestamp lies within
    ``window_s`` of ``now``, the signature verifies. Nonce replay is the caller's check (it needs storage).
    Raises SignatureError naming the failed check.
    """
    values = {}
    for name in SIGNATURE_HEADERS:
        value = headers.get(name)
        if not value:
            raise SignatureError(f"missing header {name}")
        values[name] = value
    peer_id = values[HEADER_PEER_ID]
    if peer_id_from_public_key(public_key_b64) != peer_id:
        raise SignatureError(f"{HEADER_PEER_ID} does not derive from the registered public key")
    try:
        timestamp = int(values[HEADER_TIMESTAMP])
    except ValueError:
        raise SignatureError(f"{HEADER_TIMESTAMP} must be integer unix seconds") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > window_s:
        raise SignatureError(f"{HEADER_TIMESTAMP} is outside the ±{window_s} s window (clock skew or replay)")
    nonce = values[HEADER_NONCE]
    if not (8 <= len(nonce) <= 128) or not nonce.isascii() or not nonce.isprintable():
        raise SignatureError(f"{HEADER_NONCE} must be 8-128 printable ASCII characters")
    try:
        signature = base64.b64decode(values[HEADER_SIGNATURE], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{HEADER_SIGNATURE} is not base64") from None
    try:
        load_public_key(public_key_b64).verify(
            signature,
            canonical_request(method, path, values[HEADER_TIMESTAMP], nonce, body),
            _PSS,
            hashes.SHA256(),
        )
    except InvalidSignature:
        raise SignatureError("signature does not verify (wrong key, or method/path/body changed)") from None
    return peer_id, nonce, timestamp


# -- the host: several workers (one per GPU) share one host id, each its own peer id -------------------------
def host_id(config: WorkerConfig, machine_id_path: str = MACHINE_ID_PATH) -> str:
    """FARLABS_HOST_ID, else a stable id for this machine: every instance on it sends the same.

    A hash of /etc/machine-id (systemd's docs ask that the id itself not be exposed on the network), salted
    so it matches no other application's derived id; the hostname where a machine has no id.
    """
    if config.host_id:
        return config.host_id
    try:
        seed = Path(machine_id_path).read_text().strip()
    except OSError:
        seed = ""
    seed = seed or f"hostname:{socket.gethostname()}"
    return "h-" + hashlib.sha256(f"farworker-host-id:{seed}".encode()).hexdigest()[:20]
