"""`Router.plan`: the same plan as ever (own routes best first, allowed fallbacks after, each
name once, rested before cooling), with the model's own routes looked up once a request, not
once to ask whether it is served and again to plan; and the plan's highest prices and
output bounds, as reservations take them."""

from __future__ import annotations

import time
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import Deployment, RouterSection
from node.gateway.router import NoRoute, Route, Router

NAMES = ["a", "b", "c"]


def old_plan(
    router: Router, model: str, kind: str, allowed: Callable[[str], bool] | None, now: float
) -> list[Route]:
    """The plan as `Router.plan` made it before, step by step: the oracle."""
    if not router.serves(model, kind):
        raise NoRoute(model)
    fallbacks = router.settings.fallbacks.get(model, ())
    names = [model, *(name for name in fallbacks if allowed is None or allowed(name))]
    ordered: list[Route] = []
    for name in dict.fromkeys(names):
        ordered += router._order(router._candidates(name, kind, False))
    return [r for r in ordered if not r.cooling(now)] + [r for r in ordered if r.cooling(now)]


routes_drawn = st.lists(
    st.tuples(
        st.sampled_from(NAMES),
        st.sampled_from(["chat", "embeddings"]),
        st.integers(0, 2),  # priority
        st.booleans(),  # cooling
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(
    drawn=routes_drawn,
    strategy=st.sampled_from(["priority", "lowest-cost", "least-busy", "lowest-latency"]),
    fallbacks=st.dictionaries(st.sampled_from(NAMES), st.lists(st.sampled_from(NAMES))),
    model=st.sampled_from(NAMES),
    kind=st.sampled_from(["chat", "embeddings"]),
    forbidden=st.sets(st.sampled_from(NAMES)),
)
def test_a_plan_is_what_it_always_was(drawn, strategy, fallbacks, model, kind, forbidden):
    far = time.monotonic() + 3600
    routes = []
    for position, (name, served, priority, cooling) in enumerate(drawn):
        spec = Deployment(name=name, provider="echo", kind=served, priority=priority)
        route = Route(spec, adapter=None, position=position)  # type: ignore[arg-type]
        route.cooldown_until = far if cooling else 0.0
        routes.append(route)
    router = Router(routes, RouterSection(strategy=strategy, fallbacks=fallbacks))
    allowed = (lambda name: name not in forbidden) if forbidden else None
    try:
        expected = old_plan(router, model, kind, allowed, time.monotonic())
    except NoRoute:
        expected = None
    try:
        planned = router.plan(model, kind, allowed=allowed)
    except NoRoute:
        planned = None
    assert planned == expected


def test_a_models_own_routes_are_looked_up_once_a_plan(monkeypatch):
    """A model without fallbacks: its routes found once (they were twice: `serves`, then
    the plan)."""
    spec = Deployment(name="m", provider="echo")
    router = Router([Route(spec, adapter=None, position=0)], RouterSection())  # type: ignore[arg-type]
    looked_up: list[str] = []
    candidates = router._candidates

    def counted(model: str, kind: str, local_only: bool) -> list[Route]:
        looked_up.append(model)
        return candidates(model, kind, local_only)

    monkeypatch.setattr(router, "_candidates", counted)
    assert [r.name for r in router.plan("m", "chat")] == ["m"]
    assert looked_up == ["m"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # price in
            st.integers(0, 5),  # price out
            st.integers(1, 9),  # max output tokens
            st.none() | st.integers(1, 9),  # reserve output tokens
            st.booleans(),  # images
        ),
        min_size=1,
        max_size=5,
    ),
    st.none() | st.integers(1, 12),
)
def test_a_plans_highest_prices_and_output_are_what_max_made_them(drawn, max_tokens):
    """The loops that replaced `max` over generators (`accounting._highest_prices`,
    `pipeline.chat_worst_case`) give what those gave, each bound maybe another route's."""
    from adapters.types import ChatRequest
    from node.gateway.accounting import _highest_prices
    from node.gateway.pipeline import chat_worst_case

    plan = []
    for position, (price_in, price_out, most, reserve, images) in enumerate(drawn):
        spec = Deployment(
            name="m",
            provider="echo",
            kind="images" if images else "chat",
            price_in=price_in,
            price_out=price_out,
            price_per_image=price_out,
            max_output_tokens=most,
            reserve_output_tokens=reserve,
        )
        plan.append(Route(spec, adapter=None, position=position))  # type: ignore[arg-type]
    assert _highest_prices(plan) == (
        max(route.spec.unit_prices()[0] for route in plan),
        max(route.spec.unit_prices()[1] for route in plan),
    )
    chat = ChatRequest(model="m", messages=[], max_tokens=max_tokens)
    ceiling = max(route.spec.max_output_tokens for route in plan)
    asked = max_tokens or max(route.spec.reserve_output_tokens or ceiling for route in plan)
    assert chat_worst_case(chat, plan).completion_tokens == min(asked, ceiling)
