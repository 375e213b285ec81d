"""Domain errors and their OpenAI shape: every kind is answered, and the usage record keeps
the status the client was told."""

from __future__ import annotations

import pytest

from adapters.types import UpstreamError
from node.errors import HubError, Kind, UpstreamFailed, client_closed, gateway_failure
from node.gateway.accounting import recorded_status
from node.ingress.errors import openai_error, openai_status


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_has_an_openai_status_and_the_records_keep_it(kind: Kind) -> None:
    if kind is Kind.UPSTREAM_FAILURE:
        error: HubError = UpstreamFailed(UpstreamError(503, "provider down"))
    else:
        error = HubError(kind, "what went wrong")
    shaped = openai_error(error)
    assert shaped.status == openai_status(error) == recorded_status(error)
    assert shaped.detail.message == error.message


def test_a_rate_limit_tells_when_to_retry_and_the_figures() -> None:
    limits = {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0"}
    error = HubError(
        Kind.RATE_LIMITED, "slow down", code="rate_limit_exceeded", retry_after=3, limits=limits
    )
    shaped = openai_error(error)
    assert (shaped.status, shaped.detail.type, shaped.detail.code) == (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
    )
    assert shaped.headers == {**limits, "retry-after": "3"}


def test_only_a_bad_api_key_is_challenged() -> None:
    bad_key = openai_error(HubError(Kind.UNAUTHENTICATED, "no", code="invalid_api_key"))
    assert bad_key.headers["www-authenticate"].startswith("Bearer")
    bad_signature = openai_error(HubError(Kind.UNAUTHENTICATED, "no", code="bad_signature"))
    assert "www-authenticate" not in bad_signature.headers
    assert bad_signature.detail.type == "authentication_error"


def test_an_upstream_failure_is_told_as_the_provider_said_it() -> None:
    upstream = UpstreamError(429, "busy", type="rate_limit_error", retry_after=2.4)
    shaped = openai_error(UpstreamFailed(upstream))
    assert shaped.status == 429 and shaped.detail.type == "rate_limit_error"
    assert shaped.detail.code == "rate_limit_exceeded" and shaped.headers["retry-after"] == "2"


def test_the_pipeline_s_own_failures() -> None:
    closed = openai_error(client_closed())
    assert (closed.status, closed.detail.code) == (499, "client_closed")
    broken = openai_error(gateway_failure(ZeroDivisionError()))
    assert (broken.status, broken.detail.type, broken.detail.code) == (
        502,
        "upstream_error",
        "gateway_error",
    )
    assert "ZeroDivisionError" in broken.detail.message
