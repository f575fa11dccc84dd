"""Authenticated encryption of small blobs with a key kept in its own file (stdlib only).

Refs nested in descriptions must be stored (to restore them after a restart)
but the database must grant nothing on its own. They are sealed with a key kept
in a separate root-only file: encrypt-then-MAC, keystream = HMAC-SHA256(k_enc,
nonce || counter), tag = HMAC-SHA256(k_mac, nonce || ciphertext).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

KEY_BYTES = 32
NONCE_BYTES = 16
TAG_BYTES = 32


class SealError(ValueError):
    pass


def load_or_create_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        pass
    else:
        if len(key) != KEY_BYTES:
            # Replacing it would make every sealed nested ref unrestorable.
            raise SealError(f"node key {path} is damaged ({len(key)} bytes, not {KEY_BYTES})")
        return key
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(path + ".tmp", path)
    return key


def _subkeys(key: bytes) -> tuple[bytes, bytes]:
    return (hmac.new(key, b"metac seal enc", hashlib.sha256).digest(),
            hmac.new(key, b"metac seal mac", hashlib.sha256).digest())


def _keystream(k_enc: bytes, nonce: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hmac.new(k_enc, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    return bytes(out[:length])


def seal(key: bytes, plaintext: bytes) -> bytes:
    k_enc, k_mac = _subkeys(key)
    nonce = secrets.token_bytes(NONCE_BYTES)
    stream = _keystream(k_enc, nonce, len(plaintext))
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, stream, strict=True))
    tag = hmac.new(k_mac, nonce + ciphertext, hashlib.sha256).digest()
    return nonce + ciphertext + tag


def unseal(key: bytes, sealed: bytes) -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SealError("sealed blob too short")
    k_enc, k_mac = _subkeys(key)
    nonce, ciphertext, tag = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:-TAG_BYTES], sealed[-TAG_BYTES:]
    expected = hmac.new(k_mac, nonce + ciphertext, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        raise SealError("sealed blob fails authentication (wrong node key?)")
    stream = _keystream(k_enc, nonce, len(ciphertext))
    return bytes(a ^ b for a, b in zip(ciphertext, stream, strict=True))
