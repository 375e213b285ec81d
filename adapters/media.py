"""What the images, audio and files of a request can cost, as providers bill them.

A budget reserves the worst case before the upstream call, so every part is bounded from
above by the provider's documented rule:

- OpenAI (and Azure OpenAI) images, `detail` low / high / auto: a fixed base for `low`; for the
  others the image is fitted into 2048x2048, its shortest side scaled down to 768 px, and each
  512 px tile costs a per-model amount on top of the base (gpt-4o: 85 + 170 a tile; gpt-4o-mini
  2,833 + 5,667; o1/o3: 75 + 150). The gpt-4.1-mini/nano and o4-mini family bill 32 px
  patches instead (at most 1,536, times a per-model multiplier), whatever the detail.
- Anthropic images: (width x height) / 750 tokens after scaling into 1568 px on the long edge
  and ~1.15 megapixels, so never more than ~1,600.
- Audio input (OpenAI): 10 tokens a second; the duration is bounded from the encoded size at
  the lowest bitrate a speech codec produces (6 kb/s), since a header can claim anything.
- Files (PDF): each page is billed as its text and an image of the page; providers take at
  most 100 pages per document, so a file costs at most 100 x (page image + page text).

Where an image's size is known (inline base64), it is read from the PNG, GIF, WebP or JPEG
header; where it is not (a URL, an unreadable header), the rule's maximum for the detail level
is reserved. Where the rule that will bill a part is not known (an OpenAI-compatible server
with an unknown model, a peer, Ollama), the largest documented rule is used.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from typing import NamedTuple

from adapters.types import ContentPart, Message

# --- images --------------------------------------------------------------------------------

# Base64 characters decoded to find an image's header: enough for a JPEG's EXIF and ICC
# segments before its frame header in all but pathological files (which get the maximum).
_HEADER_CHARS = 96 * 1024


class TileRule(NamedTuple):
    base: int
    per_tile: int


class PatchRule(NamedTuple):
    multiplier: float


ImageRule = TileRule | PatchRule

_GPT_4O = TileRule(85, 170)
_DATED = r"(-\d{4}-\d{2}-\d{2}|-latest|-preview)?"
# An OpenAI model name (a dated snapshot too) and the rule that bills its images. A name
# matched by none (a new variant, another server's model) gets the largest rule of all.
OPENAI_IMAGE_RULES: tuple[tuple[re.Pattern[str], ImageRule], ...] = tuple(
    (re.compile(f"(?:{pattern}){_DATED}"), rule)
    for pattern, rule in (
        (r"gpt-4o-mini", TileRule(2833, 5667)),
        (r"gpt-4\.1-nano|gpt-5-nano", PatchRule(2.46)),
        (r"gpt-4\.1-mini|gpt-5-mini", PatchRule(1.62)),
        (r"o4-mini", PatchRule(1.72)),
        (r"computer-use-preview", TileRule(65, 129)),
        (r"o1|o1-pro|o3|o3-pro", TileRule(75, 150)),
        (r"gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo|gpt-5|gpt-5-chat", _GPT_4O),
    )
)
MAX_PATCHES = 1536
ANTHROPIC_IMAGE_MAX = 1600
ANTHROPIC_LONG_EDGE = 1568
ANTHROPIC_PIXELS = 1_150_000


class Size(NamedTuple):
    width: int
    height: int


def openai_rule(model: str) -> ImageRule | None:
    for pattern, rule in OPENAI_IMAGE_RULES:
        if pattern.fullmatch(model):
            return rule
    return None


def tile_tokens(rule: TileRule, size: Size | None, detail: str | None) -> int:
    if detail == "low":
        return rule.base
    if size is None:
        return rule.base + 8 * rule.per_tile  # 2048x768 after scaling: 4 x 2 tiles at most
    width, height = size
    fit = min(1.0, 2048 / max(width, height))
    width, height = width * fit, height * fit
    shrink = min(1.0, 768 / min(width, height))
    tiles = math.ceil(width * shrink / 512) * math.ceil(height * shrink / 512)
    return rule.base + min(tiles, 8) * rule.per_tile


def patch_tokens(rule: PatchRule, size: Size | None) -> int:
    patches = MAX_PATCHES
    if size is not None:
        patches = min(MAX_PATCHES, math.ceil(size.width / 32) * math.ceil(size.height / 32))
    return math.ceil(patches * rule.multiplier)


def anthropic_image_tokens(size: Size | None) -> int:
    if size is None:
        return ANTHROPIC_IMAGE_MAX
    width, height = size
    scale = min(
        1.0,
        ANTHROPIC_LONG_EDGE / max(width, height),
        math.sqrt(ANTHROPIC_PIXELS / (width * height)),
    )
    return min(ANTHROPIC_IMAGE_MAX, math.ceil(width * height * scale * scale / 750))


def _rule_tokens(rule: ImageRule, size: Size | None, detail: str | None) -> int:
    if isinstance(rule, TileRule):
        return tile_tokens(rule, size, detail)
    return patch_tokens(rule, size)


def _every_rule_tokens(size: Size | None, detail: str | None) -> int:
    """The largest any documented rule charges for this image."""
    openai = max(_rule_tokens(rule, size, detail) for _, rule in OPENAI_IMAGE_RULES)
    return max(openai, anthropic_image_tokens(size))


def image_tokens(provider: str, model: str, size: Size | None, detail: str | None) -> int:
    """The most this image can cost on this provider and model."""
    if provider == "anthropic":
        return anthropic_image_tokens(size)
    if provider in ("openai", "azure"):
        rule = openai_rule(model)
        if rule is not None:
            return _rule_tokens(rule, size, detail)
    return _every_rule_tokens(size, detail)


def _decoded_prefix(url: str, chars: int) -> bytes | None:
    """The first bytes of an inline `data:…;base64,` image (from its first `chars` base64
    characters, without copying the rest); None for a URL."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 256)
    if comma == -1 or not url.endswith(";base64", 0, comma):
        return None
    prefix = url[comma + 1 : comma + 1 + chars]
    prefix = prefix[: len(prefix) - len(prefix) % 4]
    try:
        return base64.b64decode(prefix, validate=False)
    except (binascii.Error, ValueError):
        return None


def inline_image_size(url: str) -> Size | None:
    """An inline image's size from its header: 64 base64 characters for PNG, GIF and WebP;
    a JPEG's frame header may come after large EXIF or ICC segments, so more for it."""
    head = _decoded_prefix(url, 64)
    if head is None:
        return None
    size = image_size(head)
    if size is None and head.startswith(b"\xff\xd8"):
        size = image_size(_decoded_prefix(url, _HEADER_CHARS) or b"")
    return size


def image_size(data: bytes) -> Size | None:
    """Width and height from a PNG, GIF, WebP or JPEG header; None if it is none of them,
    is cut short, or claims a zero size."""
    size = _png(data) or _gif(data) or _webp(data) or _jpeg(data)
    if size is None or size.width <= 0 or size.height <= 0:
        return None
    return size


def _png(data: bytes) -> Size | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return Size(*struct.unpack(">II", data[16:24]))
    return None


def _gif(data: bytes) -> Size | None:
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return Size(*struct.unpack("<HH", data[6:10]))
    return None


def _webp(data: bytes) -> Size | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    kind = data[12:16]
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return Size(width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return Size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return Size(width, height)
    return None


# JPEG start-of-frame markers (baseline, progressive, lossless…), not DHT/JPG/DAC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes) -> Size | None:
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF and at + 9 <= len(data):
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return Size(width, height)
        if length < 2:
            return None
        at += 2 + length
    return None


# --- audio and files -------------------------------------------------------------------------

AUDIO_TOKENS_PER_SECOND = 10
AUDIO_MIN_BYTES_PER_SECOND = 750  # 6 kb/s
FILE_MAX_PAGES = 100
PAGE_TEXT_TOKENS = 4000  # a dense page of text, generously


def base64_bytes(data: object) -> int | None:
    """How many bytes a base64 string (or data URL) decodes to at most; None if unknown."""
    if not isinstance(data, str):
        return None
    payload = data.partition(",")[2] if data.startswith("data:") else data
    return len(payload) * 3 // 4


def audio_tokens(part: ContentPart) -> int:
    size = base64_bytes((part.input_audio or {}).get("data"))
    if size is None:
        size = 0
    seconds = math.ceil(size / AUDIO_MIN_BYTES_PER_SECOND)
    return max(1, seconds) * AUDIO_TOKENS_PER_SECOND


def file_tokens(provider: str, model: str) -> int:
    """A document: every page as text and as a (high detail) page image."""
    page_image = image_tokens(provider, model, None, "high")
    return FILE_MAX_PAGES * (page_image + PAGE_TEXT_TOKENS)


# --- a request's parts -------------------------------------------------------------------------


class Image(NamedTuple):
    size: Size | None
    detail: str | None


class Media(NamedTuple):
    """The non-text parts of a request, read once, priced per route."""

    images: list[Image]
    audio_tokens: int
    files: int

    def tokens(self, provider: str, model: str) -> int:
        if provider == "echo":
            return 0  # the demo model counts text alone (adapters/echo.py)
        total = self.audio_tokens
        total += sum(image_tokens(provider, model, i.size, i.detail) for i in self.images)
        if self.files:
            total += self.files * file_tokens(provider, model)
        return total


def request_media(messages: list[Message]) -> Media | None:
    """The images, audio and files of a request; None when it has none (the usual case,
    which then costs nothing more than a type check per message)."""
    images: list[Image] = []
    audio = files = 0
    for message in messages:
        if isinstance(message.content, str) or not message.content:
            continue
        for part in message.content:
            if part.image_url is not None or part.type == "image_url":
                images.append(_image(part))
            elif part.input_audio is not None or part.type == "input_audio":
                audio += audio_tokens(part)
            elif part.file is not None or part.type == "file":
                files += 1
            elif part.type not in ("text", "refusal"):
                # A part type this gateway does not know yet: bill it like a whole file.
                files += 1
    if not (images or audio or files):
        return None
    return Media(images, audio, files)


def _image(part: ContentPart) -> Image:
    if part.image_url is None:
        return Image(None, None)
    return Image(inline_image_size(part.image_url.url), part.image_url.detail)
