"""What the guardrails stage costs per request, in-process: the input checks on a 1 KB chat
prompt of plain prose and on the governance arm's (prose with figures, `bench/governance.py`)
and on the latter with an email, a card and a key in it (no profile; each kind of check
alone; a default profile of them all), and the hold-back window per streamed delta.

    taskset -c 0 .venv/bin/python -m bench.guardrails
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from adapters.types import ChatRequest, Message
from node.config import (
    BannedCheck,
    Check,
    GuardrailProfile,
    GuardrailsSection,
    InjectionCheck,
    PiiCheck,
    SecretsCheck,
    SizeCheck,
)
from node.gateway.guardrails.checks import build_profile
from node.gateway.guardrails.stage import judge
from node.gateway.guardrails.stream import HoldBack
from node.gateway.guardrails.texts import chat_texts

PROMPT = (
    "Please summarise the quarterly report below for the board, in three short paragraphs, "
    "keeping the figures exact and the tone neutral. "
) * 8
ROUNDS = 300


def _median_us(run: Callable[[], object], rounds: int = ROUNDS) -> float:
    for _ in range(20):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    from bench.governance import PROMPT as FIGURES

    found = " Mail jane.doe@example.com, card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE."
    prompts = [
        ("plain prose", PROMPT[:1024]),
        ("prose with figures", FIGURES),
        ("figures, PII and a key", FIGURES[: 1024 - len(found)] + found),
    ]
    section = GuardrailsSection()
    print(
        f"no profile (a dict lookup): {_median_us(lambda: section.profiles.get(''), 2000):8.2f} µs"
    )
    kinds: list[tuple[str, Check]] = [
        ("size", SizeCheck(max_chars=100_000)),
        ("banned", BannedCheck(words=["project zeus", "confidential"])),
        ("injection", InjectionCheck()),
        ("secrets", SecretsCheck()),
        ("pii (US, GB phone regions)", PiiCheck()),
    ]
    profiles = [(name, build_profile(name, GuardrailProfile(checks=[c]))) for name, c in kinds]
    profiles.append(
        ("all of them", build_profile("all", GuardrailProfile(checks=[*dict(kinds).values()])))
    )
    for name, prompt in prompts:
        request = ChatRequest(model="m", messages=[Message("user", prompt)])
        texts = chat_texts(request)
        print(f"\n{name}: {len(prompt)} characters")
        for check, profile in profiles:
            print(f"{check:28}: {_median_us(lambda p=profile, t=texts: judge(p.input, t)):8.1f} µs")
    _stream()


def _stream() -> None:
    output = build_profile("out", GuardrailProfile(checks=[PiiCheck(action="redact", output=True)]))

    def stream() -> None:
        hold = HoldBack(output.output, 128, lambda _: None)
        for word in PROMPT[:1024].split(" "):
            hold.feed(word + " ")
        hold.flush()

    deltas = len(PROMPT[:1024].split(" "))
    per = _median_us(stream, 20) / deltas
    print(f"streamed pii, per delta (~5 chars, window 128): {per:8.1f} µs")
    hold = HoldBack(output.output, 128, lambda _: None)
    sent = 0
    for word in PROMPT.split(" "):
        sent += len(word) + 1
        if hold.feed(word + " "):
            break
    print(f"first text sent after {sent} characters of the answer (window 128)")


if __name__ == "__main__":
    main()
