"""`model@peer` names, as a client writes them: a peer chooses its own name (it may hold `@`),
a model's name never holds one, so the name is cut at its first `@`."""

from __future__ import annotations

from node.config import Deployment, RouterSection
from node.gateway.router import Route, Router


def _router_with_peer(peer_name: str) -> Router:
    router = Router([], RouterSection())
    spec = Deployment(name="llama3", provider="peer")
    route = Route(spec, adapter=None, position=0, peer_id="ed25519:peer", peer_name=peer_name)  # type: ignore[arg-type]
    router.set_peer_routes([route], revoked={"@gone@away": "gone@away"})
    return router


def test_a_peer_whose_name_holds_an_at_sign_is_still_pinned_by_name() -> None:
    router = _router_with_peer("alice@home")
    assert router.serves("llama3@alice@home", "chat")
    assert router.serves("llama3@ed25519:peer", "chat")
    assert not router.serves("llama3@home", "chat")


def test_a_revoking_peer_whose_name_holds_an_at_sign_is_named() -> None:
    router = _router_with_peer("alice")
    assert router.revoked_by("llama3@gone@away") == "gone@away"


def test_a_model_a_peer_names_with_an_at_sign_or_a_space_is_not_routed() -> None:
    from node.peers.peering import _nameable

    assert _nameable("llama3") and _nameable("gpt-4o:mini")
    assert not _nameable("llama3@evil") and not _nameable("llama 3") and not _nameable("a\tb")
