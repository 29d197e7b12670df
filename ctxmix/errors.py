"""The one exception type users see.

Every user error (bad file, bad spec, mismatched vocabulary, ...) is a ``CtxmixError`` whose message is
one line saying what went wrong, where, and what was expected. The CLI prints it as ``error: <message>``
and exits with status 1; third-party failures are wrapped into it at the boundary where they happen.
"""


class CtxmixError(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        # Messages must stay on one line: stderr shows exactly one line per error.
        super().__init__(" ".join(str(message).split()))
