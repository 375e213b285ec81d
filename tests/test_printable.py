"""`printable`: what others choose, made safe to print (federation/printable.py). Its fast
path (text `str.isprintable` takes is returned as it is) must never let through a character
that the escapes table would have escaped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from federation.printable import _ESCAPES, _UNSAFE, printable

_unsafe = st.sampled_from([chr(c) for c in _UNSAFE])
# Mostly the characters that matter: the escaped ones, the space and its look-alikes, plain
# ASCII, letters of other scripts and emoji; and any character at all.
_texts = st.lists(
    st.one_of(_unsafe, st.sampled_from(" \u00a0\u3000aé字😀"), st.characters()), max_size=40
).map("".join)


@given(_texts)
def test_printable_is_the_escapes_table_applied(text: str) -> None:
    shown = printable(text)
    assert shown == text.translate(_ESCAPES)
    assert not any(chr(c) in shown for c in _UNSAFE)


def test_every_unsafe_character_is_escaped_alone_and_among_plain_text() -> None:
    for code in _UNSAFE:
        char = chr(code)
        assert printable(char) == _ESCAPES[code]
        assert (
            printable(f"INFO aihub.access: {char} ok") == f"INFO aihub.access: {_ESCAPES[code]} ok"
        )
    assert printable("plain é 字 😀 text") == "plain é 字 😀 text"
