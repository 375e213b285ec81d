"""Sealing secrets to a node: how an issuer hands a joiner its cross-node virtual key.

`seal_for` encrypts to the Curve25519 form of the node's Ed25519 public key (read from its node
id) with a PyNaCl `SealedBox`: an anonymous, authenticated-encryption box that only the holder
of the node's private key can open, so no other key pair is needed. The same form keeps the
keys a peer issued to us at rest: a leaked database alone does not let anyone spend them.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.public
import nacl.signing

from federation.descriptors import public_key_of
from federation.identity import NodeIdentity
from ledger.canonical import b64url, b64url_decode


class SealError(ValueError):
    """A sealed value that cannot be opened (not for this node, altered or malformed), or a
    node id that cannot be sealed to."""


def seal_for(node_id: str, plaintext: bytes) -> str:
    """`plaintext` sealed to `node_id`'s key, as unpadded base64url."""
    verify_key = nacl.signing.VerifyKey(public_key_of(node_id))
    try:
        recipient = verify_key.to_curve25519_public_key()
    except nacl.exceptions.CryptoError as exc:  # not a point on the curve
        raise SealError("node id is not a usable Ed25519 key") from exc
    return b64url(nacl.public.SealedBox(recipient).encrypt(plaintext))


def unseal(identity: NodeIdentity, sealed: str) -> bytes:
    """The plaintext of a value sealed to `identity`; SealError for anything else — the box is
    authenticated, so a value sealed to another node fails rather than decrypting to noise."""
    try:
        box = b64url_decode(sealed)
    except ValueError as exc:
        raise SealError("sealed value is not base64url") from exc
    private = identity.signing_key.to_curve25519_private_key()
    try:
        return nacl.public.SealedBox(private).decrypt(box)
    except nacl.exceptions.CryptoError as exc:
        raise SealError("cannot unseal: not sealed to this node, or altered") from exc
