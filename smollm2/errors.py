"""The one kind of error a user sees: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """A mistake the user must fix (or a machine limit they must know of): one line, exit code 2.

    `key`, when given, names the setting the error is about ("data.path: ..."); a caller that knows
    better what the user wrote says the same `reason` of its own key."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.reason, self.key = reason, key


def error_reason(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors;
    past `limit` characters it is cut at a word, never inside one."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if limit is None or len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + " ..."


def one_line(text: str) -> str:
    """`text` as one printable line: a newline, an escape sequence or any other control character
    (say, in a path the user typed) is written escaped, as Python writes it: \\n, \\x1b."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text
    )


def os_error_line(exc: OSError) -> str:
    """An OSError (read-only folder, disk full, a file where a folder should be) as one plain line."""
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    else:
        reason = exc.strerror or error_reason(exc)
    where = exc.filename
    return f"{where}: {reason.lower()}" if where else reason.lower()


def read_utf8(path: str | Path) -> str:
    """A text file a user may have edited (a template, a log): bytes that are not UTF-8 are one line."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start} is not); save it as UTF-8") from None
