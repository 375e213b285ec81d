"""Anthropic's Messages content blocks that a request and an answer share, as msgspec Structs:
text, and images with their two sources. The Anthropic adapter encodes them for its upstream;
the Messages ingress (`node/ingress/anthropic_request.py`) decodes them from its clients."""

from __future__ import annotations

from msgspec import Struct


class TextBlock(Struct, tag_field="type", tag="text"):
    text: str


class Base64Source(Struct, tag_field="type", tag="base64"):
    media_type: str
    data: str


class UrlSource(Struct, tag_field="type", tag="url"):
    url: str


class ImageBlock(Struct, tag_field="type", tag="image"):
    source: Base64Source | UrlSource
