"""The identity file is hivemind's, the peer id is libp2p's, and signatures fail on any change."""

from __future__ import annotations

import stat
import time

import pytest

from farworker import identity as ident
from farworker.identity import (
    HEADER_PEER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Identity,
    IdentityError,
    SignatureError,
    load_or_create,
    peer_id_from_public_key,
    verify_request,
)


@pytest.fixture(scope="module")
def hivemind_p2p():
    from hivemind.p2p import P2P, PeerID

    return P2P, PeerID


def test_created_with_private_modes_and_stable(tmp_path):
    path = tmp_path / "state" / "identity.key"
    first = load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_or_create(path)
    assert again.peer_id == first.peer_id
    assert again.public_key_b64 == first.public_key_b64
    assert first.peer_id.startswith("Qm")  # sha2-256 multihash, base58


def test_loose_mode_is_tightened(tmp_path):
    path = tmp_path / "identity.key"
    load_or_create(path)
    path.chmod(0o644)
    load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


def test_peer_id_matches_hivemind_for_our_file(tmp_path, hivemind_p2p):
    _, PeerID = hivemind_p2p
    path = tmp_path / "identity.key"
    identity = load_or_create(path)
    assert PeerID.from_identity(path.read_bytes()).to_base58() == identity.peer_id
    assert peer_id_from_public_key(identity.public_key_b64) == identity.peer_id


def test_reads_a_file_hivemind_generated(tmp_path, hivemind_p2p):
    P2P, PeerID = hivemind_p2p
    path = tmp_path / "hm.key"
    P2P.generate_identity(str(path))
    identity = load_or_create(path)
    assert identity.peer_id == PeerID.from_identity(path.read_bytes()).to_base58()
    assert identity.to_protobuf() == path.read_bytes()


def test_our_bytes_parse_with_hivemind_proto(tmp_path):
    from hivemind.proto import crypto_pb2

    identity = load_or_create(tmp_path / "identity.key")
    message = crypto_pb2.PrivateKey.FromString(identity.to_protobuf())
    assert message.key_type == crypto_pb2.RSA


@pytest.mark.parametrize("content", [b"", b"not a key at all", b"\x08\x00\x12\x03abc", b"\x08\x01\x12\x00"])
def test_corrupt_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=str(path)):
        load_or_create(path)


@pytest.fixture(scope="module")
def key():
    return Identity.generate()


def test_sign_and_verify_round_trip(key):
    headers = key.sign("post", "/v1/workers/w1/heartbeat", b'{"a":1}')
    peer_id, nonce, _ = verify_request(
        key.public_key_b64, "POST", "/v1/workers/w1/heartbeat", b'{"a":1}', headers
    )
    assert peer_id == key.peer_id
    assert nonce == headers["X-Far-Nonce"]
    assert key.sign("POST", "/p", b"")["X-Far-Nonce"] != headers["X-Far-Nonce"]


@pytest.mark.parametrize(
    "method,path,body,match",
    [
        ("PUT", "/v1/x", b"{}", "signature does not verify"),
        ("POST", "/v1/y", b"{}", "signature does not verify"),
        ("POST", "/v1/x", b"{ }", "signature does not verify"),
    ],
)
def test_any_change_breaks_the_signature(key, method, path, body, match):
    headers = key.sign("POST", "/v1/x", b"{}")
    with pytest.raises(SignatureError, match=match):
        verify_request(key.public_key_b64, method, path, body, headers)


def test_other_key_and_foreign_peer_id_refused(key):
    other = Identity.generate()
    # signed by another key, claiming our peer id
    forged = other.sign("POST", "/v1/x", b"{}")
    forged[HEADER_PEER_ID] = key.peer_id
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_request(key.public_key_b64, "POST", "/v1/x", b"{}", forged)
    # honest signature, but checked against a key the peer id does not derive from
    with pytest.raises(SignatureError, match="does not derive"):
        verify_request(key.public_key_b64, "POST", "/v1/x", b"{}", other.sign("POST", "/v1/x", b"{}"))


def test_window_and_missing_headers(key):
    stale = key.sign("POST", "/v1/x", b"", timestamp=int(time.time()) - 61)
    with pytest.raises(SignatureError, match="window"):
        verify_request(key.public_key_b64, "POST", "/v1/x", b"", stale)
    future = key.sign("POST", "/v1/x", b"", timestamp=int(time.time()) + 61)
    with pytest.raises(SignatureError, match="window"):
        verify_request(key.public_key_b64, "POST", "/v1/x", b"", future)
    ok = key.sign("POST", "/v1/x", b"", timestamp=int(time.time()) - 50)
    verify_request(key.public_key_b64, "POST", "/v1/x", b"", ok)
    for name in ident.SIGNATURE_HEADERS:
        partial = {k: v for k, v in ok.items() if k != name}
        with pytest.raises(SignatureError, match=f"missing header {name}"):
            verify_request(key.public_key_b64, "POST", "/v1/x", b"", partial)
    garbled = dict(ok, **{HEADER_SIGNATURE: "@@@", HEADER_TIMESTAMP: ok[HEADER_TIMESTAMP]})
    with pytest.raises(SignatureError, match="base64"):
        verify_request(key.public_key_b64, "POST", "/v1/x", b"", garbled)


def test_bad_public_key_is_signature_error():
    with pytest.raises(SignatureError, match="public_key"):
        peer_id_from_public_key("not-base64!")
