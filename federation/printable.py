"""Text that others choose (peer and key names, descriptor URLs, discovered services, what a
peer sends in an error), made safe to print on a terminal or in a log.

Control characters (ANSI escapes among them), line breaks and bidi overrides are shown as
escapes (`\\x1b`, `\\u202e`): printed raw, they could colour or clear the admin's terminal, move
the cursor, forge a line of a table or a log, or reorder what is shown. Everything else,
non-ASCII letters and emoji included, is printed as it is.
"""

from __future__ import annotations

import logging

_UNSAFE = [
    *range(0x00, 0x20),  # C0 controls: ESC, CR, LF, TAB, BEL, backspace, ...
    0x7F,
    *range(0x80, 0xA0),  # C1 controls (0x9b is a one-byte CSI)
    0x061C,  # Arabic letter mark
    0x200E,  # left-to-right and right-to-left marks
    0x200F,
    0x2028,  # line and paragraph separators
    0x2029,
    *range(0x202A, 0x202F),  # bidi embeddings and overrides
    *range(0x2066, 0x206A),  # bidi isolates
]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE}


def printable(text: str) -> str:
    """`text` with every character that could act on a terminal or a log shown escaped."""
    # Every character escaped is one `str.isprintable` refuses (a control, a format or a
    # separator character but the space): text it takes, as almost every log line is, has
    # nothing to escape, and the check is a scan in C where `translate` is a dict lookup a
    # character (~5 µs an access line).
    if text.isprintable():
        return text
    return text.translate(_ESCAPES)


class PrintableFormatter(logging.Formatter):
    """Log lines whose message (and the values put into it) cannot span or forge lines;
    a traceback, added after the message, keeps its own line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))
