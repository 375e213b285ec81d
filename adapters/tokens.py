"""Token estimates for when a provider reports no usage (and for the echo demo model).

Four bytes of UTF-8 to a token is the usual rule of thumb for English with BPE tokenizers;
an estimate is always marked as such in the usage record.
"""

from __future__ import annotations

from adapters.types import ContentPart, Message

# Per-message framing tokens in chat templates (role markers, separators).
MESSAGE_OVERHEAD = 4


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
