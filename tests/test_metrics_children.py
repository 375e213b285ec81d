"""`Metrics.settled`, a request's end counted: the same series and counts as prometheus_client's
`labels()` asked anew each time, with its children found in one lookup a request, and caches
bounded however many model names clients send."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from node.gateway import metrics as metrics_module
from node.gateway.metrics import MAX_CACHED_CHILDREN, Metrics

FAMILIES = ("aihub_requests", "aihub_tokens", "aihub_cost_micros")

Ending = tuple[str, str, int, int, int, int]  # endpoint, model, status, in, out, cost

endings = st.tuples(
    st.sampled_from(["chat", "embeddings"]),
    st.sampled_from(["echo", "llama3", "llama3@alice"]),
    st.sampled_from([200, 429, 502]),
    st.sampled_from([0, 1, 17]),
    st.sampled_from([0, 5]),
    st.sampled_from([0, 3]),
)


def counted(registry_text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The three request families' samples (without their `_created` times), by name and
    sorted labels."""
    found = {}
    for family in text_string_to_metric_families(registry_text.decode()):
        if family.name not in FAMILIES:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def reference(ended: list[Ending]) -> bytes:
    """What the requests' ends expose counted the plain way: `labels()` every time, and a
    series only for what was counted in it."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    labels = ["endpoint", "model", "status"]
    requests = Counter("aihub_requests", "", labels, registry=registry)
    tokens = Counter("aihub_tokens", "", ["model", "direction"], registry=registry)
    cost = Counter("aihub_cost_micros", "", ["model"], registry=registry)
    for endpoint, model, status, tokens_in, tokens_out, charged in ended:
        requests.labels(endpoint, model, str(status)).inc()
        if tokens_in:
            tokens.labels(model, "in").inc(tokens_in)
        if tokens_out:
            tokens.labels(model, "out").inc(tokens_out)
        if charged:
            cost.labels(model).inc(charged)
    return generate_latest(registry)


@settings(max_examples=60, deadline=None)
@given(st.lists(endings, max_size=30))
def test_the_ends_of_requests_expose_what_labels_asked_each_time_would(ended: list[Ending]):
    """Same series, same counts; none of zero for a model whose requests used no tokens."""
    metrics = Metrics()
    for ending in ended:
        metrics.settled(*ending)
    assert counted(metrics.render()) == counted(reference(ended))


def test_a_requests_end_finds_its_children_in_one_lookup_not_four(monkeypatch):
    """Once an (endpoint, model, status) has ended a request, the next ones end without
    looking up a child per counter (four a request, each hashing a tuple of labels)."""
    metrics = Metrics()
    metrics.settled("chat", "echo", 200, 10, 5, 3)
    lookups: list[tuple[Any, ...]] = []
    looked_up = metrics._child

    def child(metric: Any, *labels: str) -> Any:
        lookups.append(labels)
        return looked_up(metric, *labels)

    monkeypatch.setattr(metrics, "_child", child)
    for _ in range(10):
        metrics.settled("chat", "echo", 200, 10, 5, 3)
    assert lookups == []
    assert counted(metrics.render()) == counted(reference([("chat", "echo", 200, 10, 5, 3)] * 11))


def test_endless_model_names_do_not_grow_the_caches_without_bound():
    """A client's every new model name is a new label: the caches of children stay bounded
    (the registry keeps its series), and counting goes on exactly past a cache emptied."""
    metrics = Metrics()
    ended: list[Ending] = [("chat", f"m{n}", 200, 1, 1, 1) for n in range(3 * MAX_CACHED_CHILDREN)]
    ended += ended[:10]  # names whose children were dropped from the caches, counted again
    for ending in ended:
        metrics.settled(*ending)
        metrics.untrusted(ending[1], True, 1)
    assert len(metrics._children) <= metrics_module.MAX_CACHED_CHILDREN
    assert len(metrics._settled) <= metrics_module.MAX_CACHED_CHILDREN
    assert counted(metrics.render()) == counted(reference(ended))
