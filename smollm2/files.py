"""How smollm2 writes to disk without ever destroying what the user has.

- A file is written to a temporary name beside it, fsynced, then renamed over the old one:
  a crash leaves the old file or the new one, never half of either (`write_atomic`).
- A folder is built beside its target, then swapped in; the old one survives until the new one
  is complete (`build_folder`).
- We replace or delete only what we provably wrote: a folder we build carries a `.smollm2` marker
  that names its kind ("model", "data", "space") and records every file we wrote into it (size,
  mtime, sha256). A folder is replaced only when its marker names the kind and everything in it is
  something the marker records, unchanged (`check_replaceable`); names alone prove nothing, and an
  unmarked folder that is not empty is never replaced.
- Leftovers of killed processes (`.NAME.tmp-PID`, `.NAME.old-PID`) are cleaned by the next run
  (`clean_leftovers`), and one run holds a folder at a time (`RunLock`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from smollm2.errors import UserError
from smollm2.run_folder import PARTS  # what a run folder (marked "run") holds

MARKER = ".smollm2"
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)")


def cache_root() -> Path:
    """smollm2's cache folder: $SMOLLM2_CACHE, else ~/.cache/smollm2 (the published model, remembered measurements)."""
    return Path(os.environ.get("SMOLLM2_CACHE", Path.home() / ".cache" / "smollm2"))


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
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write a file to (for writers that open a file by its
    name); when the block ends without error it is fsynced and renamed over `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


# ---------------------------------------------------------------------------------------------
# Folders we own


def mark(folder: Path, kind: str, **fields: object) -> None:
    write_atomic(folder / MARKER, json.dumps({"kind": kind} | fields) + "\n")


def read_marker(folder: Path) -> dict:
    """The marker of a folder smollm2 wrote ({} when there is none, or it is unreadable)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def record(folder: Path) -> dict:
    """What we wrote into `folder`: every file (size, mtime_ns, sha256) and subfolder, by relative path."""
    files, folders = {}, []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name == MARKER:
            continue
        if path.is_dir():
            folders.append(name)
        else:
            stat = path.stat()
            files[name] = [stat.st_size, stat.st_mtime_ns, file_sha256(path)]
    return {"files": files, "folders": folders}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unrecorded(folder: Path, marker: dict) -> str | None:
    """The first entry of `folder` that its marker does not record as written by us, as it is now."""
    files, folders = marker.get("files"), marker.get("folders", [])
    if not isinstance(files, dict) or not isinstance(folders, list):
        return MARKER
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            if relative != MARKER and not is_recorded(path, files.get(relative), relative in folders):
                return relative
    return None


def is_recorded(path: Path, recorded_file, recorded_folder: bool) -> bool:
    if path.is_symlink():
        return False
    return recorded_folder if path.is_dir() else same_file(path, recorded_file)


def same_file(path: Path, recorded) -> bool:
    """The file is the one we recorded: same size and mtime, or (a copy, say) the same bytes."""
    if not (isinstance(recorded, list) and len(recorded) == 3):
        return False
    stat = path.stat()
    if stat.st_size != recorded[0]:
        return False
    return stat.st_mtime_ns == recorded[1] or file_sha256(path) == recorded[2]


def check_replaceable(folder: Path, kind: str, what: str, known_names: frozenset[str]) -> None:
    """Refuse, in one line, to replace `folder` unless it is absent, empty, or provably ours.

    Ours: its marker names this kind and records everything in it, unchanged. A marker of an older
    smollm2 records no files: its folder is ours when it holds nothing but plain files with the names
    smollm2 writes into one of its kind (`known_names`), none inside a subfolder.
    """
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink():
        raise UserError(f"{what} {folder} is a symlink: refusing to replace it (give the real folder)")
    if not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is not a folder: refusing to replace it")
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    marker = read_marker(folder) if MARKER in names else {}
    if marker and marker.get("kind") != kind:
        raise UserError(
            f"{what} {folder} is a {marker.get('kind')} folder smollm2 wrote, not a {kind} folder: "
            "refusing to replace it (choose a new or empty folder)"
        )
    foreign = unrecorded(folder, marker) if "files" in marker else legacy_foreign(folder, names, known_names, marker)
    if foreign is None:
        return
    changed = ", changed since smollm2 wrote it" if foreign in marker.get("files", {}) else ""
    raise UserError(
        f"{what} {folder} holds files smollm2 did not write ({foreign}{changed}): refusing to replace it "
        "(choose a new or empty folder, or move it away)"
    )


def inside_another(path: Path, prepared: bool = False) -> str | None:
    """Why nothing may be written at `path`, or None: it lies inside a folder smollm2 marked as
    data, model or space (which would then hold an entry it does not record), or it is, or lies
    inside, a part of a run (RUN/checkpoints, logs, final, data), at any depth. `prepared`: a
    prepared data folder may be RUN/data/NAME itself, nothing deeper."""
    path = Path(path).resolve()
    for folder in path.parents:
        kind = read_marker(folder).get("kind")
        if kind in ("data", "model", "space"):
            return f"lies inside {folder}, a {kind} folder smollm2 wrote"
    for folder in (path, *path.parents):
        if folder.name not in PARTS or read_marker(folder.parent).get("kind") != "run":
            continue
        if prepared and folder.name == "data" and folder == path.parent:
            continue
        if folder == path:
            return f"is part of the run in {folder.parent}"
        return f"lies inside {folder}, a part of the run in {folder.parent}"
    return None


def legacy_foreign(folder: Path, names: list[str], known_names: frozenset[str], marker: dict) -> str | None:
    """The first entry that an older marker (or no marker) cannot vouch for; None if there is none."""
    others = [name for name in names if name != MARKER]
    if not marker:
        return others[0] if others else None
    for name in others:
        path = folder / name
        if name not in known_names or path.is_symlink() or not path.is_file():
            return name
    return None


@contextlib.contextmanager
def build_folder(target: Path, kind: str, **fields: object) -> Iterator[Path]:
    """Yield a staging folder beside `target`; on success mark it (recording what it holds) and swap
    it in place of `target`.

    The caller checks `check_replaceable` first. On failure (or a signal) the staging folder is
    removed and `target` is untouched. The swap is one atomic exchange where the kernel has it;
    elsewhere two renames, undone on a signal between them, and after a crash between them the old
    folder, left as `.NAME.old-PID`, is put back by the next run (`clean_leftovers`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent, {target.name})  # a killed build of the same target
    staging = staging_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        mark(staging, kind, **fields, **record(staging))
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # an old kernel, a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(staging: Path, target: Path) -> None:
    """Put `staging` in place of `target`; the old `target` is removed once the new one is in."""
    if not target.exists():
        staging.rename(target)
        fsync_folder(target.parent)
        return
    if exchange(staging, target):
        old = staging  # the exchange left the old folder under the staging name
    else:
        old = staging_name(target, "old")
        target.rename(old)
        try:
            staging.rename(target)
        except BaseException:  # a signal between the two renames: the old folder goes back
            old.rename(target)
            raise
    fsync_folder(target.parent)
    shutil.rmtree(old, ignore_errors=True)


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


def missing_folders(*targets: Path) -> list[Path]:
    """The targets and their parents that do not exist yet, deepest first: the folders a command is
    about to create, and may remove again (with remove_empty_folders) when it fails."""
    missing = {folder for target in targets for folder in (target, *target.parents) if not folder.exists()}
    return sorted(missing, key=lambda folder: len(folder.parts), reverse=True)


def remove_empty_folders(*folders: Path) -> None:
    """rmdir each folder that exists and is empty (rmdir refuses anything else), in order."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def unmark_if_alone(folder: Path) -> bool:
    """Remove the marker of a folder that holds nothing else (a run that failed before writing)."""
    if [p.name for p in folder.iterdir()] != [MARKER]:
        return False
    (folder / MARKER).unlink()
    return True
