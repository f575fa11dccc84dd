"""Tests for metac.persistence.sealing: round trips, tamper detection, wrong key, key file."""

from __future__ import annotations

import os
import stat

import pytest

from metac.core import sealing
from metac.core.sealing import KEY_BYTES, NONCE_BYTES, TAG_BYTES, SealError, seal, unseal

KEY = bytes(range(KEY_BYTES))
OTHER_KEY = bytes(reversed(range(KEY_BYTES)))


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"x", b'["ref://[::1]/demo/secret"]', bytes(range(256)) * 40],
    ids=["empty", "one-byte", "json", "10k"],
)
def test_round_trip(plaintext: bytes) -> None:
    sealed = seal(KEY, plaintext)
    assert len(sealed) == NONCE_BYTES + len(plaintext) + TAG_BYTES
    assert unseal(KEY, sealed) == plaintext


def test_plaintext_is_not_visible() -> None:
    plaintext = b"ref://[::1]/demo/AAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    sealed = seal(KEY, plaintext)
    assert plaintext not in sealed
    assert b"AAAAAAAA" not in sealed


def test_fresh_nonce_every_time() -> None:
    a, b = seal(KEY, b"same"), seal(KEY, b"same")
    assert a != b
    assert a[:NONCE_BYTES] != b[:NONCE_BYTES]
    assert unseal(KEY, a) == unseal(KEY, b) == b"same"


@pytest.mark.parametrize(
    "where",
    [0, NONCE_BYTES - 1, NONCE_BYTES, NONCE_BYTES + 5, -TAG_BYTES, -1],
    ids=["nonce-first", "nonce-last", "ct-first", "ct-middle", "tag-first", "tag-last"],
)
def test_any_flipped_bit_is_detected(where: int) -> None:
    sealed = bytearray(seal(KEY, b"0123456789abcdef"))
    sealed[where] ^= 0x01
    with pytest.raises(SealError):
        unseal(KEY, bytes(sealed))


def test_truncated_or_extended_is_detected() -> None:
    sealed = seal(KEY, b"0123456789abcdef")
    with pytest.raises(SealError):
        unseal(KEY, sealed[:-1])
    with pytest.raises(SealError):
        unseal(KEY, sealed + b"\0")
    with pytest.raises(SealError):
        unseal(KEY, sealed[1:])


@pytest.mark.parametrize("length", [0, 1, NONCE_BYTES + TAG_BYTES - 1])
def test_too_short(length: int) -> None:
    with pytest.raises(SealError, match="too short"):
        unseal(KEY, b"\0" * length)


def test_wrong_key() -> None:
    sealed = seal(KEY, b"payload")
    with pytest.raises(SealError, match="wrong node key"):
        unseal(OTHER_KEY, sealed)


def test_seal_error_is_value_error() -> None:
    assert issubclass(SealError, ValueError)


def test_load_or_create_key(tmp_path) -> None:
    path = str(tmp_path / "node.key")
    key = sealing.load_or_create_key(path)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sealing.load_or_create_key(path) == key  # stable across loads
    assert not os.path.exists(path + ".tmp")
    # a blob sealed with the loaded key opens with the reloaded one
    assert unseal(sealing.load_or_create_key(path), seal(key, b"x")) == b"x"


def test_two_key_files_differ(tmp_path) -> None:
    a = sealing.load_or_create_key(str(tmp_path / "a.key"))
    b = sealing.load_or_create_key(str(tmp_path / "b.key"))
    assert a != b
