"""The one kind of error a user sees: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
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


def refusal_while(exc: OSError, doing: str) -> UserError:
    """An OSError met while writing something (a full disk) as one line that names what was being
    written, not the temporary file it went to: "no space left on device while saving checkpoint X"."""
    reason = os_error_line(OSError(exc.errno, exc.strerror)) if exc.errno else error_reason(exc).lower()
    return UserError(f"{reason} while {doing}")


def read_utf8(path: str | Path) -> str:
    """A text file a user may have edited (a template, a log): bytes that are not UTF-8 are one line."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start} is not); save it as UTF-8") from None


# What the content of a file from elsewhere (a downloaded model's config.json, a checkpoint's fields,
# a hand-edited tokenizer_config.json) can make a reader raise: a value of the wrong type, a key that
# is missing, nesting deeper than Python recurses, a number too large to convert, a size too large to
# allocate. Inside `reading` each of them is the file's fault, said in one line.
CONTENT_ERRORS = (
    RecursionError,
    MemoryError,
    OverflowError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
)


def content_reason(exc: BaseException) -> str:
    """What was wrong with a file's content, in words, from what reading it raised."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, MemoryError):
        return "it declares more than fits in memory"
    if isinstance(exc, KeyError):
        return f"{error_reason(exc, 80)} is missing"
    return error_reason(exc, 120)


@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """The one boundary around reading a file from elsewhere and checking what it holds: any failure
    its content causes inside the block is one line naming the file and what it should have been
    (`what`: "a Llama config"). A UserError raised inside says it better and passes through."""
    try:
        yield
    except UserError:
        raise
    except CONTENT_ERRORS as exc:
        raise UserError(f"{path}: not {what} ({content_reason(exc)})") from None


def read_json_file(path: str | Path, what: str) -> dict:
    """A JSON object from a file from elsewhere (config.json, tokenizer_config.json, an index), or
    one line naming the file: not UTF-8, not JSON, nested too deeply, or not an object."""
    with reading(path, what):  # a file too large to hold
        text = read_utf8(path)
    try:
        data = json.loads(text)
    except CONTENT_ERRORS as exc:
        raise UserError(f"{path}: not valid JSON, so not {what} ({content_reason(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not {what} (expected a JSON object, got {type(data).__name__})")
    return data


def file_in_folder(folder: str | Path, name: str, named_by: str | Path | None = None) -> Path:
    """`folder / name` for a name that comes from elsewhere (a shard an index names, a model folder's
    config.json), refused in one line when it leads out of the folder: absolute, through `..`, or a
    symlink to a file elsewhere. `named_by`: the file that gave the name. The one exception is Hugging
    Face's cache, whose snapshots link into their repository's blobs (snapshots/REV/NAME -> ../../blobs/HASH)."""
    folder = Path(folder)
    prefix = f"{named_by}: " if named_by else ""
    if not name or "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{prefix}{name!r} is not a file name inside {folder} (absolute, or through ..)")
    path = folder / name
    root, target = folder.resolve(), path.resolve()
    in_hub_cache = any(  # snapshots/REV/... -> REPO/blobs/HASH, wherever blobs/ itself lies
        ancestor.name == "snapshots" and target.parent == (ancestor.parent / "blobs").resolve()
        for ancestor in (*folder.absolute().parents, *root.parents)
    )
    if not (target.is_relative_to(root) or in_hub_cache):
        raise UserError(f"{prefix}{path} links out of {folder} (to {target}): refusing to read it")
    if not path.is_file():
        raise UserError(f"{prefix}{path} is not a file (missing, or a folder)")
    return path
