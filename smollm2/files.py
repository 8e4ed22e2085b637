"""How smollm2 writes to disk without ever destroying what the user has.

- A file is written into a private staging folder beside it, fsynced, then renamed over the old
  one: a crash leaves the old file or the new one, never half of either (`write_atomic`).
- A folder is built beside its target, then swapped in; the old one survives until the new one
  is complete, and goes only when it holds nothing but what it held when the build began
  (`build_folder`).
- We replace or delete only what we provably wrote: a folder we build carries a `.smollm2` marker
  that names its kind ("model", "data", "space") and records every file we wrote into it (size,
  mtime, sha256). A folder is replaced only when its marker names the kind and everything in it is
  something the marker records, unchanged (`check_replaceable`); names alone prove nothing, and an
  unmarked folder that is not empty is never replaced.
- Staging entries are folders named `.NAME.tmp-PID-HOST-TOKEN`, created exclusively (a name that
  is taken is passed over, never followed or deleted) and holding a marker with their random
  token. Leftovers of killed processes are cleaned by the next run only with that proof, only for
  a dead process of this host, only under the names we write there (`clean_leftovers`); one run
  holds a folder at a time (`RunLock`).
- We follow no link: what we copy or publish is a regular file reached through no symlink
  (`open_regular`, `copy_regular_file`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from smollm2.errors import CONTENT_ERRORS, UserError
from smollm2.run_folder import PARTS  # what a run folder (marked "run") holds

MARKER = ".smollm2"
STAGING_PROOF = ".smollm2-staging"  # in every staging folder: {"kind": STAGING, "token": the token of its name}
STAGING = "smollm2 staging"
# This host, as staging names carry it: a dead pid proves nothing of another machine's process.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-(?P<token>[0-9a-f]{16})")


def cache_root() -> Path:
    """smollm2's cache folder: $SMOLLM2_CACHE, else ~/.cache/smollm2 (the published model, remembered measurements)."""
    return Path(os.environ.get("SMOLLM2_CACHE", Path.home() / ".cache" / "smollm2"))


def staging_token() -> str:
    return secrets.token_hex(8)


def staging_name(path: Path, token: str, what: str = "tmp") -> Path:
    """`.NAME.tmp-PID-HOST-TOKEN` beside `path`: hidden, tied to this process and host, and to a
    random token that no name of the user's holds by accident (`clean_leftovers`)."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{HOST}-{token}")


def fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# Writing: new files only, in staging folders of our own


def create_file(path: str | Path, dir_fd: int | None = None) -> BinaryIO:
    """A new file at `path`, open for writing: created now (never an existing file, nor a link's
    target), with the umask's mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o666, dir_fd=dir_fd), "wb")


def open_append(path: Path) -> TextIO:
    """`path`, a log of ours, open to append text to: a regular file, never a link's target."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symlink: refusing to follow it (smollm2 follows no link)") from None
        if exc.errno == errno.ENXIO:  # a FIFO no one reads
            raise UserError(f"{path} is not a regular file: refusing to write to it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file: refusing to write to it")
    return os.fdopen(fd, "a", encoding="utf-8")


def make_staging_folder(target: Path, mode: int) -> tuple[Path, int]:
    """A staging folder beside `target`, created exclusively and marked with its token, and an open
    descriptor of it. A staging name that is taken is someone else's: passed over, left as it is."""
    for _ in range(16):
        token = staging_token()
        path = staging_name(target, token)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue
        except OSError as exc:  # a read-only or full folder: named as the folder it is
            raise OSError(exc.errno, exc.strerror, str(target.parent)) from None
        made = os.lstat(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # The folder mkdir made, not one swapped in right after: by identity, not by owner (a
            # vfat or NFS mount reports an owner of its own for every file).
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (made.st_dev, made.st_ino):
                raise UserError(f"{path}: replaced by another folder while smollm2 made it: refusing to write")
            with create_file(STAGING_PROOF, fd) as f:
                f.write(json.dumps({"kind": STAGING, "token": token}).encode() + b"\n")
        except BaseException:
            os.close(fd)
            raise
        return path, fd
    raise UserError(f"{target.parent}: every staging name tried beside {target.name} is taken: refusing to write")


def remove_staging(staging: Path, fd: int) -> None:
    """Remove our staging folder (open as `fd`) and what it holds, while its name still leads to it;
    a name swapped for something else leads to someone else's: left alone."""
    try:
        now, ours = os.lstat(staging), os.fstat(fd)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
        shutil.rmtree(staging, ignore_errors=True)


def writable_name(fd: int, staging: Path, name: str) -> Path:
    """`name` inside the staging folder open as `fd`, by a path that leads to that folder even if its
    own name is swapped for a link meanwhile (/proc/self/fd on Linux; elsewhere its path)."""
    through_fd = Path(f"/proc/self/fd/{fd}")
    return through_fd / name if through_fd.is_dir() else staging / name


def write_atomic(path: str | Path, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to `path` atomically."""
    with staged_file(path) as tmp, create_file(tmp) as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a name to write the new `path` to (for writers that open a file by its name); when the
    block ends without error it is fsynced and renamed over `path`, else removed. The name lies in a
    private staging folder (mode 0700) we created beside `path`, so no one else can plant a link there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, fd = make_staging_folder(path, 0o700)
    try:
        yield writable_name(fd, staging, path.name)
        rename_out(fd, path)
    finally:
        remove_staging(staging, fd)
        os.close(fd)
    fsync_folder(path.parent)


def rename_out(fd: int, path: Path) -> None:
    """fsync the file `path.name` of the staging folder open as `fd`, and rename it over `path`."""
    try:
        file = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            os.fsync(file)
        finally:
            os.close(file)
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.replace(path.name, path.name, src_dir_fd=fd, dst_dir_fd=parent)
        finally:
            os.close(parent)
    except OSError as exc:  # named by the file the user asked for, not by its name in the staging folder
        raise OSError(exc.errno, exc.strerror, str(path)) from None


# ---------------------------------------------------------------------------------------------
# Reading and copying: regular files only, through no link


def open_regular(path: str | Path, root: str | Path | None = None) -> BinaryIO:
    """`path` open for reading, when it is a regular file reached through no symlink from `root` (by
    default its own folder): neither it nor a folder between is a link. One line otherwise."""
    path = Path(path)
    folder = open_folder(path.parent, path.parent if root is None else Path(root))
    try:
        file = open_in(folder, path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(file).st_mode):
        os.close(file)
        raise UserError(f"{path} is not a regular file: refusing to read it")
    return os.fdopen(file, "rb")


def open_folder(folder: Path, root: Path) -> int:
    """A descriptor of `folder`, reached from `root` (which may be a link: the user named it)
    through no symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    where = root
    try:
        for part in folder.relative_to(root).parts:
            where = where / part
            inner = open_in(fd, where, os.O_RDONLY | os.O_DIRECTORY)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_in(fd: int, path: Path, flags: int) -> int:
    """Open `path.name` in the folder open as `fd`, following no link; one line for a link."""
    try:
        return os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and os.path.islink(path)):
            raise UserError(f"{path} is a symlink: refusing to follow it (smollm2 follows no link)") from None
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def copy_regular_file(source: Path, destination: Path, root: Path | None = None) -> None:
    """Copy `source`, a regular file reached through no link from `root`, to `destination` (written
    atomically, a new file). The one way smollm2 copies a file."""
    with open_regular(source, root) as f:
        write_atomic(destination, lambda out: shutil.copyfileobj(f, out))


def check_regular(path: Path, root: Path) -> None:
    """Refuse, in one line, a file or folder about to be read that is, holds, or is reached through
    a symlink from `root`, or holds anything but regular files and folders."""
    if path.is_symlink() or not path.is_dir():
        open_regular(path, root).close()
        return
    os.close(open_folder(path, root))
    for here, folders, files in os.walk(path):
        for name in folders:
            if Path(here, name).is_symlink():
                raise UserError(f"{Path(here, name)} is a symlink: refusing to follow it (smollm2 follows no link)")
        for name in files:
            open_regular(Path(here, name), root).close()


# ---------------------------------------------------------------------------------------------
# Folders we own


def mark(folder: Path, kind: str, **fields: object) -> None:
    write_atomic(folder / MARKER, json.dumps({"kind": kind} | fields) + "\n")


def read_marker(folder: Path) -> dict:
    """The marker of a folder smollm2 wrote ({} when there is none, or it is unreadable)."""
    try:
        with open_regular(folder / MARKER) as f:  # a marker that is a link proves nothing
            marker = json.loads(f.read())
    except (OSError, UserError, *CONTENT_ERRORS):  # nested too deeply, say: not a marker of ours
        return {}
    return marker if isinstance(marker, dict) else {}


def record(folder: Path) -> dict:
    """What we wrote into `folder`: every file (size, mtime_ns, sha256) and subfolder, by relative path."""
    files, folders = {}, []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name in (MARKER, STAGING_PROOF):
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
    folder, left as `.NAME.old-PID-HOST-TOKEN`, is put back by the next run (`clean_leftovers`).
    The old folder is deleted only when it holds what it held when the build began, and nothing its
    marker does not record (`swap_in`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent, {target.name})  # a killed build of the same target
    before = inventory(target)
    staging, fd = make_staging_folder(target, 0o777)
    try:
        yield staging
        mark(staging, kind, **fields, **record(staging))
        os.unlink(STAGING_PROOF, dir_fd=fd)  # the marker proves it ours from here on
        swap_in(staging, target, before)
    finally:
        remove_staging(staging, fd)  # after a swap its name holds the old folder: not ours to remove
        os.close(fd)


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


def swap_in(staging: Path, target: Path, before: dict[str, tuple] | None) -> None:
    """Put `staging` in place of `target`. The old `target` is then deleted, entry by entry, when it
    holds just what it held when the build began (`before`) and its marker vouches for; a file the
    user added or changed meanwhile makes it theirs: it goes back in place, whole, and one line says so."""
    if not target.exists() and not target.is_symlink():
        staging.rename(target)
        fsync_folder(target.parent)
        return
    if exchange(staging, target):
        old = staging  # the exchange left the old folder under the staging name
    else:
        old = sibling(staging, "old")
        target.rename(old)
        try:
            staging.rename(target)
        except BaseException:  # a signal between the two renames: the old folder goes back
            old.rename(target)
            raise
    fsync_folder(target.parent)
    foreign = users_entry(old, before)
    if foreign is not None:
        if not (old == staging and exchange(staging, target)):
            target.rename(staging)
            old.rename(target)
        fsync_folder(target.parent)
        raise UserError(
            f"{target} holds files smollm2 did not write ({foreign}, added or changed while it was rebuilt): "
            "left as it was, nothing replaced (move them away, then run again)"
        )
    remove_entries(old, before or {})


def sibling(staging: Path, what: str) -> Path:
    """The `.NAME.old-...` that goes with a staging folder `.NAME.tmp-...`: the same process, host and token."""
    match = LEFTOVER.fullmatch(staging.name)
    return staging.with_name(f".{match['name']}.{what}-{match['pid']}-{match['host']}-{match['token']}")


def inventory(folder: Path) -> dict[str, tuple] | None:
    """Each entry under `folder` (not following links), by relative path: its type and inode, and a
    file's size and mtime; None when `folder` is not a folder (absent, a link, a file)."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    entries = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            info = path.lstat()
            kind = stat.S_IFMT(info.st_mode)
            entries[path.relative_to(folder).as_posix()] = (
                (kind, info.st_ino) if kind == stat.S_IFDIR else (kind, info.st_ino, info.st_size, info.st_mtime_ns)
            )
    return entries


def users_entry(old: Path, before: dict[str, tuple] | None) -> str | None:
    """The first entry of the swapped-out folder that is not provably ours: new or changed since the
    build began, or not recorded by its marker (a folder without one was empty when it was checked)."""
    now = inventory(old)
    if now is None:  # replaced by a link or a file
        return "the folder itself"
    changed = next((name for name, entry in sorted(now.items()) if (before or {}).get(name) != entry), None)
    if changed is not None:
        return changed
    marker = read_marker(old)
    if "files" in marker:
        return unrecorded(old, marker)
    return None if marker or not now else sorted(now)[0]


def remove_entries(folder: Path, entries: dict[str, tuple]) -> bool:
    """Delete from `folder` each entry `entries` lists, as it lists it (files, then folders deepest
    first, once empty), then `folder` once empty; anything else stays. True when nothing is left."""
    for name in sorted(entries, key=lambda name: name.count("/"), reverse=True):
        path = folder / name
        with contextlib.suppress(OSError):
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode):
                path.rmdir()
            elif entries[name] == (stat.S_IFMT(info.st_mode), info.st_ino, info.st_size, info.st_mtime_ns):
                path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return not folder.exists()


def clean_leftovers(folder: Path, names: Collection[str] | Callable[[str], bool]) -> list[Path]:
    """Clean what killed smollm2 processes left in `folder` under the NAMEs we write there (`names`:
    those names, or a test of one), and only what proves it is theirs.

    A leftover is a folder `.NAME.tmp-PID-HOST-TOKEN` (or `.old-`) of a process of this host that is
    gone. A staging folder whose marker holds the token of its name is removed whole; a folder of
    ours left by a swap (its marker records its files) loses only what its marker records, unchanged;
    an `.old` folder whose NAME is missing was the only copy when its process died mid-swap: it is
    put back. Anything else, whatever its name, is left as it is.
    """
    ours = names if callable(names) else names.__contains__
    cleaned = []
    if not folder.is_dir():
        return cleaned
    for entry in folder.iterdir():
        match = LEFTOVER.fullmatch(entry.name)
        if not match or not ours(match["name"]) or match["host"] != HOST or process_alive(int(match["pid"])):
            continue
        if entry.is_symlink() or not entry.is_dir():  # every staging entry we make is a folder
            continue
        original = folder / match["name"]
        if match["what"] == "old" and not original.exists() and not original.is_symlink():
            entry.rename(original)
            cleaned.append(entry)
        elif discard(entry, match["token"] if match["what"] == "tmp" else None):
            cleaned.append(entry)
    return cleaned


def staging_token_of(folder: Path) -> str | None:
    """The token a staging folder's proof holds; None when it holds none."""
    try:
        with open_regular(folder / STAGING_PROOF) as f:
            proof = json.loads(f.read())
    except (OSError, UserError, *CONTENT_ERRORS):
        return None
    return proof.get("token") if isinstance(proof, dict) and proof.get("kind") == STAGING else None


def discard(folder: Path, token: str | None) -> bool:
    """Remove a leftover folder, when it proves it is ours: whole when it is a staging folder (its
    marker holds `token`), else when its marker records everything in it; True when it is gone."""
    marker = read_marker(folder)
    if token is not None and staging_token_of(folder) == token:
        shutil.rmtree(folder, ignore_errors=True)
    elif "files" in marker and unrecorded(folder, marker) is None:
        remove_entries(folder, inventory(folder) or {})
    elif not any(folder.iterdir()):  # a staging folder emptied, killed before its rmdir
        folder.rmdir()
    return not folder.exists()


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
