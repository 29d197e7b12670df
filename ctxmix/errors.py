"""The one exception type users see, and the text rule for anything shown from untrusted input.

Every user error (bad file, bad spec, mismatched vocabulary, ...) is a ``CtxmixError`` whose message is
one line saying what went wrong, where, and what was expected. The CLI prints it as ``error: <message>``
and exits with status 1; third-party failures are wrapped into it at the boundary where they happen.

File names, trace names and specs come from outside. ``printable`` is how they are shown: a name holding
an escape sequence must not drive the terminal, and one holding bytes that are not UTF-8 (Python keeps
them as lone surrogates) must not make a JSON report that strict readers refuse.
"""

from __future__ import annotations

import unicodedata

# Characters that reorder the text around them on a terminal (bidirectional overrides and isolates).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSHOWN = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, lone surrogates, line and paragraph separators
_ESCAPED_BYTE = range(0xDC80, 0xDD00)  # how Python's surrogateescape keeps an undecodable byte 0x80..0xff


def _escape(ch: str) -> str:
    code = ord(ch)
    if code in _ESCAPED_BYTE:
        return f"\\x{code - 0xDC00:02x}"  # the byte the file name really holds
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, controls: bool = True) -> str:
    """``text`` with what must not reach a terminal or a JSON reader written as escapes.

    Lone surrogates (undecodable bytes of a file name) always become ``\\xNN``. With ``controls`` (the
    default, for terminals) control characters, line separators and bidirectional controls become
    ``\\xNN`` / ``\\uNNNN`` too; JSON escapes those itself, so ``report`` passes ``controls=False``.
    """
    text = str(text)
    if text.isprintable():  # the common case: nothing to look at character by character
        return text
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cs" or (controls and (category in _UNSHOWN or ch in _BIDI_CONTROLS)):
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)


class CtxmixError(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        # Messages must stay on one line: stderr shows exactly one line per error, and nothing in it may
        # drive the terminal (a file name can hold any byte).
        super().__init__(printable(" ".join(str(message).split())))
