"""Token estimates for when a provider reports no usage (and for the echo demo model).

Four bytes of UTF-8 to a token is the usual rule of thumb for English with BPE tokenizers;
an estimate is always marked as such in the usage record.
"""

from __future__ import annotations

import msgspec
from msgspec import Raw

from adapters.types import ChatCall, ContentPart, Message, ToolCall, Usage

# Per-message framing tokens in chat templates (role markers, separators).
MESSAGE_OVERHEAD = 4

# A token count as an upstream sent it, read by `token_count`; this default means "not sent".
NO_COUNT = Raw(b"null")
# No count is believed past this (2^53: exact as a float in a metric, far inside SQLite's
# integers); the gateway clamps each count further to what its request could have used.
MAX_TOKEN_COUNT = 1 << 53
_count = msgspec.json.Decoder(int)  # strict: a float, string, bool or null is no count


def token_count(raw: Raw) -> int | None:
    """An upstream's token count, or None where it is no count at all (missing, a float, a
    string, a bool, a negative number, `1e400`): counts are untrusted input, and a bad one
    must neither fail the answer nor reach the books as it is. Read lazily (`Raw`) so that
    nothing an upstream puts in a count can fail the decoding of the whole answer."""
    try:
        value = _count.decode(raw)
    except msgspec.DecodeError:
        return None
    return min(value, MAX_TOKEN_COUNT) if value >= 0 else None


def estimate_text_tokens(text: str) -> int:
    if not text:
        return 0
    return max(1, (len(text.encode()) + 3) // 4)


def message_text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


def estimate_prompt_tokens(messages: list[Message]) -> int:
    total = 0
    for message in messages:
        total += MESSAGE_OVERHEAD + estimate_text_tokens(message_text(message.content))
        for call in message.tool_calls or ():
            total += estimate_text_tokens(call.function.name or "")
            total += estimate_text_tokens(call.function.arguments or "")
    return total


def completion_text(content: str, calls: list[ToolCall]) -> str:
    """What the model wrote, tool calls included, for estimating its tokens."""
    parts = [content]
    for call in calls:
        parts += [call.function.name or "", call.function.arguments or ""]
    return "".join(parts)


def usage_or_estimate(
    prompt_count: int | None, completion_count: int | None, call: ChatCall, completion: str
) -> tuple[Usage, bool]:
    """The provider's counts, each estimated if missing; and whether any was."""
    prompt = estimate_prompt_tokens(call.request.messages) if prompt_count is None else prompt_count
    output = estimate_text_tokens(completion) if completion_count is None else completion_count
    return Usage(prompt, output, prompt + output), prompt_count is None or completion_count is None
