"""A budget reserves the true worst case: images, audio and files as the provider bills them
(read from the image's own header where it is inline), and the echo model's every output,
tool calls included, within `max_tokens`. Through a real node, 300 concurrent image requests
on a small cap never spend past it."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import zlib
from contextlib import ExitStack

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from adapters.echo import EchoAdapter
from adapters.http import UpstreamClient
from adapters.media import (
    OPENAI_IMAGE_RULES,
    PatchRule,
    Size,
    TileRule,
    anthropic_image_tokens,
    image_size,
    image_tokens,
    patch_tokens,
    tile_tokens,
)
from adapters.openai import AzureOpenAIAdapter, OpenAIAdapter
from adapters.types import ChatCall, ChatRequest, Upstream
from node.gateway.policy import worst_case_prompt_tokens
from tests.calls import body_of, chat_call
from tests.conftest import concurrent_client, run_node
from tests.mocks.openai_mock import OpenAIMock
from tests.mocks.server import serve_app
from tests.test_budgets import make_key, spend_of

GPT_4O = TileRule(85, 170)


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 3000) + b"E" * 3000  # a big segment first
    sof = b"\xff\xc2" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + exif + sof + b"\xff\xda"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"


def webp(width: int, height: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def data_url(image: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


def request(*parts: dict, **fields: object) -> ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **fields}
    return msgspec.convert(body, ChatRequest)


def image(url: str, detail: str | None = None) -> dict:
    fields = {"url": url, **({"detail": detail} if detail else {})}
    return {"type": "image_url", "image_url": fields}


# --- the billing rules, and image headers ------------------------------------------------------


def test_image_headers_are_read_for_every_common_format():
    for make, kind in ((png, "png"), (jpeg, "jpeg"), (gif, "gif"), (webp, "webp")):
        assert image_size(make(1024, 768)) == Size(1024, 768), kind


def test_openai_and_anthropic_rules_match_their_documented_examples():
    # OpenAI's examples: 1024x1024 high is 4 tiles (765); 2048x4096 high is 6 tiles (1105).
    assert tile_tokens(GPT_4O, Size(1024, 1024), "high") == 765
    assert tile_tokens(GPT_4O, Size(2048, 4096), "high") == 1105
    assert tile_tokens(GPT_4O, Size(4096, 8192), "low") == 85
    assert tile_tokens(GPT_4O, None, "auto") == 85 + 8 * 170
    # Anthropic: width x height / 750, about 1,600 at most.
    assert anthropic_image_tokens(Size(1000, 1000)) == 1334
    assert anthropic_image_tokens(Size(8000, 8000)) <= 1600


@given(st.integers(1, 20000), st.integers(1, 20000), st.sampled_from([None, "low", "high"]))
def test_a_known_size_never_costs_more_than_the_unknown_size_maximum(width, height, detail):
    size = Size(width, height)
    for _, rule in OPENAI_IMAGE_RULES:
        if isinstance(rule, TileRule):
            assert 0 < tile_tokens(rule, size, detail) <= tile_tokens(rule, None, detail)
        else:
            assert isinstance(rule, PatchRule)
            assert 0 < patch_tokens(rule, size) <= patch_tokens(rule, None)
    assert 0 < anthropic_image_tokens(size) <= anthropic_image_tokens(None)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_size_or_none(data):
    size = image_size(data)
    assert size is None or (size.width > 0 and size.height > 0)


def test_an_image_reserves_what_the_provider_bills_for_it():
    text_only = worst_case_prompt_tokens(request({"type": "text", "text": "hi"}))
    by_url = request(image("https://example.com/cat.png", "high"))
    inline = request(image(data_url(png(1024, 1024)), "high"))
    # Before: a high-detail image reserved about 4 tokens. Now the provider's rule for it.
    assert worst_case_prompt_tokens(by_url, lambda: [("openai", "gpt-4o")]) >= 85 + 8 * 170
    assert worst_case_prompt_tokens(inline, lambda: [("openai", "gpt-4o")]) >= 765
    assert worst_case_prompt_tokens(inline, lambda: [("openai", "gpt-4o")]) < 85 + 8 * 170
    mini = worst_case_prompt_tokens(by_url, lambda: [("openai", "gpt-4o-mini")])
    assert mini >= 2833 + 8 * 5667
    # Served by whichever of several deployments: the most expensive rule counts.
    either = [("anthropic", "claude"), ("openai", "gpt-4o-mini")]
    both = worst_case_prompt_tokens(by_url, lambda: either)
    assert both == mini
    # Unknown biller (an OpenAI-compatible server's own model, a peer): the largest rule.
    assert worst_case_prompt_tokens(by_url, lambda: [("peer", "x")]) >= mini
    assert image_tokens("anthropic", "claude", None, "high") == 1600
    assert text_only < 20


def test_audio_and_files_reserve_from_their_size_and_page_limits():
    one_second_of_wav = base64.b64encode(b"\x00" * 16000).decode()
    audio = request({"type": "input_audio", "input_audio": {"data": one_second_of_wav}})
    # 16 kB decodes to at most 16000 / 750 = 22 s at the lowest speech bitrate: 10 tokens a second.
    assert worst_case_prompt_tokens(audio, lambda: [("openai", "gpt-4o-audio-preview")]) >= 220
    pdf = request({"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA"}})
    # 100 pages, each billed as its text and as a page image.
    assert worst_case_prompt_tokens(pdf, lambda: [("anthropic", "claude")]) >= 100 * (1600 + 4000)


# --- the echo model's outputs ------------------------------------------------------------------


def test_echo_tool_calls_respect_max_tokens():
    call: ChatCall = chat_call(
        messages=[{"role": "user", "content": "word " * 2000}],
        tools=[{"type": "function", "function": {"name": "lookup"}}],
        tool_choice="required",
        max_tokens=7,
    )
    result = asyncio.run(EchoAdapter(Upstream(provider="echo", model="echo")).chat(call))
    body = msgspec.json.decode(body_of(result))
    assert result.usage.completion_tokens <= 7
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"


def test_echo_tool_calls_never_spend_past_the_budget(node_dir):
    # Output is what costs here: each request reserves 10 output tokens, 10 micros.
    node_dir.set_config(
        'name = "echo"\nprovider = "echo"\nprice_in = 100_000\nprice_out = 200_000',
        'name = "echo"\nprovider = "echo"\nprice_in = 0\nprice_out = 1_000_000',
    )
    cap = 1000
    key, key_id = make_key(node_dir.path, name="tools", budget_micros=cap)
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "word " * 600}],
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
        "tool_choice": "required",
        "max_tokens": 10,
    }
    with run_node(node_dir) as node, node.client() as client:
        client.headers["authorization"] = f"Bearer {key}"
        answers = [client.post("/v1/chat/completions", json=body) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert all(a.json()["usage"]["completion_tokens"] <= 10 for a in answers)
    spent, reserved = spend_of(node_dir.path, f"key:{key_id}")
    assert spent <= cap and reserved == 0


# --- 300 concurrent image requests on a small cap ----------------------------------------------

CAP = 50_000


def test_concurrent_image_requests_never_pass_the_cap(node_dir):
    with ExitStack() as stack:
        # A vision model that bills each (URL) image at gpt-4o's high-detail maximum.
        upstream = OpenAIMock(api_key=None, image_tokens=85 + 8 * 170)
        url = stack.enter_context(serve_app(upstream))
        node_dir.add_config(
            '[[models]]\nname = "vision"\nprovider = "openai"\nmodel = "gpt-4o"\n'
            f'base_url = "{url}/v1"\nprice_in = 1_000_000\nprice_out = 1_000_000'
        )
        key, key_id = make_key(node_dir.path, name="small", budget_micros=CAP)
        body = {
            "model": "vision",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        image("https://example.com/cat.png", "high"),
                    ],
                }
            ],
            "max_tokens": 5,
        }

        async def fire(base: str) -> list:
            async with concurrent_client(base, 300) as client:
                headers = {"authorization": f"Bearer {key}"}
                return await asyncio.gather(
                    *(
                        client.post("/v1/chat/completions", json=body, headers=headers)
                        for _ in range(300)
                    )
                )

        with run_node(node_dir) as node:
            responses = asyncio.run(fire(node.url))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    served = [r for r in responses if r.status_code == 200]
    charged = sum(int(r.headers["aihub-cost-micros"]) for r in served)
    assert served and len(served) < 300
    assert all(r.json()["usage"]["prompt_tokens"] >= 1445 for r in served)
    spent, reserved = spend_of(node_dir.path, f"key:{key_id}")
    assert spent == charged <= CAP
    assert reserved == 0


# --- the output cap the reservation assumed is the one the provider is held to ----------------


async def test_openai_compatible_upstreams_are_held_to_the_reserved_output_cap():
    mock = OpenAIMock(api_key=None)
    with serve_app(mock) as url:
        async with UpstreamClient() as client:
            upstream = Upstream(
                provider="openai", model="m", base_url=url + "/v1", max_output_tokens=64
            )
            adapter = OpenAIAdapter(upstream, client)
            sent = []
            for fields in ({}, {"max_tokens": 100_000}, {"max_tokens": 5}):
                await adapter.chat(chat_call(**fields))
                sent.append(msgspec.json.decode(mock.script.received[-1].body))
            stream = await adapter.open_stream(chat_call(stream=True))
            async for _ in stream:
                pass
            await stream.aclose()
            sent.append(msgspec.json.decode(mock.script.received[-1].body))
            # No cap from the client, or one above the deployment's: the deployment's.
            assert [s.get("max_tokens") for s in sent] == [64, 64, 5, 64]
            azure = AzureOpenAIAdapter(
                Upstream(provider="azure", model="d", base_url=url, max_output_tokens=64), client
            )
            await azure.chat(chat_call(max_completion_tokens=10_000))
            assert msgspec.json.decode(mock.script.received[-1].body)["max_completion_tokens"] == 64
            await azure.chat(chat_call())
            assert msgspec.json.decode(mock.script.received[-1].body)["max_completion_tokens"] == 64


def test_tools_and_response_schemas_reserve_their_bytes():
    description = "検索する" * 500  # 2,000 characters, 6,000 bytes of UTF-8
    schema = {"type": "object", "properties": {"q": {"type": "string", "description": description}}}
    tools = [{"type": "function", "function": {"name": "lookup", "description": description}}]
    with_tools = request({"type": "text", "text": "hi"}, tools=tools)
    structured = request(
        {"type": "text", "text": "hi"},
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert worst_case_prompt_tokens(with_tools) >= 6000
    assert worst_case_prompt_tokens(structured) >= 6000


@given(
    st.binary(max_size=300),
    st.sampled_from(["data:image/png;base64,", "data:;base64,", "data:image/png,", "https://x/"]),
    st.sampled_from([None, "low", "high", "auto", "original"]),
)
def test_any_image_a_client_sends_reserves_a_bounded_positive_amount(data, prefix, detail):
    url = prefix + base64.b64encode(data).decode()
    tokens = worst_case_prompt_tokens(request(image(url, detail)), lambda: [("openai", "gpt-4o")])
    assert 85 <= tokens - worst_case_prompt_tokens(request()) <= 85 + 8 * 170


def test_openai_models_get_their_rule_and_unknown_variants_the_largest():
    largest = image_tokens("openai", "some-new-model", None, "high")
    assert image_tokens("openai", "gpt-4o-2024-08-06", None, "high") == 85 + 8 * 170
    assert image_tokens("openai", "gpt-4o-mini", None, "low") == 2833
    assert image_tokens("azure", "gpt-4.1-mini", None, "high") == math.ceil(1536 * 1.62)
    # A variant no rule names (gpt-5.1-mini might bill patches): the largest documented rule.
    assert image_tokens("openai", "gpt-5.1-mini", None, "high") == largest
    assert largest == 2833 + 8 * 5667
