"""A node's identity: one Ed25519 key pair, kept in the data folder with mode 0600."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nacl.signing

from ledger.canonical import b64url

NODE_ID_PREFIX = "ed25519:"


def node_id_for(verify_key: nacl.signing.VerifyKey) -> str:
    return NODE_ID_PREFIX + b64url(bytes(verify_key))


class NodeIdentity:
    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self.signing_key = signing_key
        self.verify_key = signing_key.verify_key
        self.node_id = node_id_for(self.verify_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} is not a 32-byte Ed25519 seed")
        return cls(nacl.signing.SigningKey(seed))

    def save(self, path: Path) -> None:
        """Write the seed with mode 0600; never overwrite an existing identity."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(bytes(self.signing_key))

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def derive_secret(self, purpose: bytes) -> bytes:
        """A 32-byte secret for local use (e.g. keyed hashes), bound to this identity."""
        seed = bytes(self.signing_key)
        return hashlib.blake2b(seed, digest_size=32, person=purpose[:16]).digest()
