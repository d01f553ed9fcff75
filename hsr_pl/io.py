"""The one way hsr-pl writes files: atomically, durably, with the user's normal permissions.

* :func:`write_json_atomic` / :func:`write_text_atomic` / :func:`write_bytes_atomic` and
  :func:`atomic_path` (for writers that want a path, e.g. ``savefig``): a temp file in the
  target's own folder, ``fsync``, ``os.replace``, ``fsync`` of the folder. A crash leaves the old
  file or the new one, never half of one. JSON never holds NaN/inf (refused, naming the key).
* :func:`atomic_folder`: build a whole folder in a temp sibling and swap it in. It only replaces
  what hsr-pl wrote itself (an owner marker file proves it), never a protected path such as the
  model's source folder (symlinks resolved), and anything else only with ``overwrite=True``.
* :func:`check_output_file` / :func:`check_output_folder`: the same refusals, and a test write,
  *before* any work, so a bad output path fails in seconds instead of after the run.

A write that the file system refuses (disk full, quota, read-only, file too large) ends as an
:class:`OutputPathError` naming the file and the fix; the temp file is removed and the earlier
file (or folder) stays as it was.

Modes follow the umask (files ``0o666 & ~umask``, folders ``0o777 & ~umask``), not the private
``0600`` / ``0700`` that ``mkstemp`` / ``mkdtemp`` give.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "OWNER_MARKER",
    "NonFiniteJSONError",
    "OutputPathError",
    "atomic_folder",
    "atomic_path",
    "check_output_file",
    "check_output_folder",
    "disk_error",
    "dumps_json",
    "file_mode",
    "folder_mode",
    "folder_owner",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

OWNER_MARKER = ".hsr-pl-owner.json"
PathLike = str | os.PathLike


class OutputPathError(ValueError):
    """An output path hsr-pl must not or cannot write; the message names the fix."""


class NonFiniteJSONError(ValueError):
    """A value to be written as JSON holds NaN or inf (JSON has no such numbers)."""


# What the file system (not hsr-pl) refuses: the user can fix these by freeing or choosing space.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def disk_error(exc: BaseException, target: PathLike) -> OutputPathError | None:
    """A one-line error for a write to ``target`` that the file system refused (None: another error)."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return None
    return OutputPathError(
        f"cannot write {target}: {exc.strerror or os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}); nothing was "
        "replaced: free space on that disk (or raise the quota) and rerun, or write to another location"
    )


# ------------------------------------------------------------------------------------- modes
def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a plain ``mkdir`` would give a new folder."""
    return 0o777 & ~_umask()


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- path checks
def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_parent(path: Path, label: str) -> None:
    """The folder that will hold ``path`` exists as a folder or can be created, and is writable."""
    parent = path.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise OutputPathError(
            f"{label}={str(path)!r} lies under {str(existing)!r}, which is a file, not a folder; choose a path in a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{label}={str(path)!r}: cannot write in {str(existing)!r} (permission denied); choose a writable location"
        )
    # The real test: create and delete a file where the output will go (read-only mounts, quotas, ACLs).
    try:
        fd, probe = tempfile.mkstemp(prefix=".hsr-pl-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(
            f"{label}={str(path)!r}: cannot write in {str(existing)!r} ({exc.strerror or exc}); choose a writable location"
        ) from None


def check_output_file(path: PathLike, label: str = "output", protect: Iterable[PathLike] = ()) -> Path:
    """Refuse an output file path that cannot be written, is a folder, or is a protected path.

    Creates nothing (a probe file is written and removed in the nearest existing folder).
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputPathError(f"{label}={str(path)!r} is a folder; give a file path")
    _check_protected(target, label, protect)
    _check_parent(target, label)
    return target


def folder_owner(folder: PathLike) -> str | None:
    """Who wrote ``folder`` according to its owner marker (None: no readable marker)."""
    marker = Path(folder) / OWNER_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    owner = data.get("owner") if isinstance(data, dict) else None
    return owner if isinstance(owner, str) else None


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _check_protected(target: Path, label: str, protect: Iterable[PathLike]) -> None:
    where = _resolved(target)
    for source in protect:
        guarded = _resolved(source)
        if where == guarded or guarded.is_relative_to(where):
            raise OutputPathError(
                f"{label}={str(target)!r} would replace {str(guarded)!r}, the input it was read from; write to "
                "another folder"
            )


def check_output_folder(
    target: PathLike, owner: str, *, label: str = "dirpath", overwrite: bool = False, protect: Iterable[PathLike] = ()
) -> Path:
    """Refuse a folder that :func:`atomic_folder` must not replace; test-write next to it.

    Allowed: a missing or empty folder, one whose marker names ``owner``, or anything else with
    ``overwrite=True`` — except a protected path (or a folder holding one), which is never replaced.
    """
    folder = Path(target).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{label}={str(target)!r} is a file; give a folder path")
    _check_protected(folder, label, protect)
    if folder.is_dir() and not overwrite and any(folder.iterdir()):
        found = folder_owner(folder)
        if found != owner:
            who = "was not written by hsr-pl" if found is None else f"was written by {found}, not {owner}"
            raise OutputPathError(
                f"{label}={str(target)!r} is not empty and {who} (no {OWNER_MARKER} of {owner}); choose a new or "
                "empty folder, or set overwrite: true to replace it"
            )
    _check_parent(folder, label)
    return folder


# ------------------------------------------------------------------------------------- files
@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it becomes ``path`` (fsynced, umask modes)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        refused = disk_error(exc, target)
        if refused is not None:
            raise refused from exc
        raise
    _fsync_folder(target.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """The key path of the first NaN/inf float inside ``obj`` (None when there is none)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "<top level>")
    if isinstance(obj, dict):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key!r}]" if where else repr(key))
        if found is not None:
            return found
    return None


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text of ``obj``; NaN/inf are refused (naming the key), since JSON cannot hold them."""
    bad = _first_non_finite(obj)
    if bad is not None:
        raise NonFiniteJSONError(f"refusing to write NaN/inf into JSON (at {bad}); the value is not a finite number")
    return json.dumps(obj, indent=indent, allow_nan=False) + "\n"


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (NaN/inf refused before anything is written)."""
    try:
        text = dumps_json(obj, indent)
    except NonFiniteJSONError as exc:
        raise NonFiniteJSONError(f"{path}: {exc}") from None
    return write_text_atomic(path, text)


# ----------------------------------------------------------------------------------- folders
def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                _fsync_file(path)
        _fsync_folder(Path(folder))


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` with renames only; put the old folder back if that fails."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(
    target: PathLike,
    owner: str,
    *,
    label: str = "dirpath",
    overwrite: bool = False,
    protect: Iterable[PathLike] = (),
) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on success it replaces ``target`` in one rename.

    Refuses first (see :func:`check_output_folder`), so nothing is built for a target that may not
    be replaced. The new folder gets the owner marker (so a later run may replace it), umask modes
    and fsynced contents. On an error the temp folder is removed and ``target`` is untouched.
    """
    folder = check_output_folder(target, owner, label=label, overwrite=overwrite, protect=protect)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        write_json_atomic(tmp / OWNER_MARKER, {"owner": owner, "format": "hsr-pl owner marker v1"})
        _fsync_tree(tmp)
        _swap_in(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = disk_error(exc, folder)
        if refused is not None:
            raise refused from exc
        raise
