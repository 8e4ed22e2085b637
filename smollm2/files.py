"""How smollm2 writes to disk without ever destroying what the user has.

- A file is written to a temporary name beside it, fsynced, then renamed over the old one:
  a crash leaves the old file or the new one, never half of either (`write_atomic`).
- A folder is built beside its target, then swapped in; the old one survives until the new one
  is complete (`build_folder`).
- We replace or delete only what we provably wrote: a folder carries a `.smollm2` marker that
  names its kind ("model", "data", "space", "run"), and a folder is replaced only when it holds
  nothing but what smollm2 writes into one of its kind (`check_replaceable`).
- Leftovers of killed processes (`.NAME.tmp-PID`, `.NAME.old-PID`) are cleaned by the next run
  (`clean_leftovers`), and one run holds a folder at a time (`RunLock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from smollm2.errors import UserError

MARKER = ".smollm2"
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)")


def staging_name(path: Path, what: str = "tmp") -> Path:
    """`.NAME.tmp-PID` beside `path`: hidden, and tied to this process for `clean_leftovers`."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


# ---------------------------------------------------------------------------------------------
# Folders we own


def mark(folder: Path, kind: str, **fields: str) -> None:
    write_atomic(folder / MARKER, json.dumps({"kind": kind} | fields) + "\n")


def read_marker(folder: Path) -> dict:
    """The marker of a folder smollm2 wrote ({} when there is none, or it is unreadable)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def check_replaceable(folder: Path, kind: str, what: str, known_names: frozenset[str]) -> None:
    """Refuse, in one line, to replace `folder` unless it is absent, empty, or provably ours.

    Ours: it holds nothing but the names smollm2 writes into a folder of this kind (`known_names`),
    and its marker, if any, names this kind (folders of earlier versions have no marker).
    """
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink():
        raise UserError(f"{what} {folder} is a symlink: refusing to replace it (give the real folder)")
    if not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is not a folder: refusing to replace it")
    names = {p.name for p in folder.iterdir()}
    kind_found = read_marker(folder).get("kind") if MARKER in names else kind
    foreign = sorted(names - known_names - {MARKER})
    if kind_found == kind and not foreign:
        return
    example = f" ({foreign[0]})" if foreign else ""
    raise UserError(
        f"{what} {folder} holds files smollm2 did not write{example}: refusing to replace it "
        "(choose a new or empty folder)"
    )


@contextlib.contextmanager
def build_folder(target: Path, kind: str) -> Iterator[Path]:
    """Yield a staging folder beside `target`; on success mark it and swap it in place of `target`.

    The caller checks `check_replaceable` first. On failure (or a signal) the staging folder is
    removed and `target` is untouched. The swap is two renames: a crash between them leaves the old
    folder as `.NAME.old-PID`, which the next run puts back (`clean_leftovers`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent, {target.name})  # a killed build of the same target
    staging = staging_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        mark(staging, kind)
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        old = staging_name(target, "old")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
    fsync_folder(target.parent)


def clean_leftovers(folder: Path, names: set[str] | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` entries in `folder` whose process is gone; in a
    folder that is not all ours, only those of the given NAMEs (what we write there).

    An `.old` folder whose NAME is missing was the only copy when its process died mid-swap: it is
    put back rather than removed.
    """
    cleaned = []
    if not folder.is_dir():
        return cleaned
    for entry in folder.iterdir():
        match = LEFTOVER.fullmatch(entry.name)
        if not match or process_alive(int(match["pid"])) or (names is not None and match["name"] not in names):
            continue
        original = folder / match["name"]
        if match["what"] == "old" and not original.exists():
            entry.rename(original)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        cleaned.append(entry)
    return cleaned


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies under it (both resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


class RunLock:
    """An exclusive lock on a run folder for as long as a run lives.

    flock on the folder itself: no lock file to leave behind, and the kernel frees the lock when
    the process dies, so a killed run never leaves it stuck.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(
                f"another smollm2 run is using {self.folder}: wait for it to end, or use another --out_dir"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_empty_folders(*folders: Path) -> None:
    """rmdir each folder that exists and is empty (rmdir refuses anything else), in order."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
