"""Writing a model folder that appears all at once and never replaces what hsr-pl did not write.

* :func:`save_pretrained_atomic` — ``save_pretrained`` of model and processor into a temporary
  sibling that replaces the target in one rename (safetensors and JSON only, fsynced);
* :func:`save_sharded_atomic` — the same for an FSDP2-sharded model, gathered one tensor at a time
  and streamed into safetensors shards with an index;
* :func:`check_export_target` — what is refused before any work (see docs/errors.md);
* :func:`remove_stale_temps` — temp folders that a killed export left beside the target;
* :func:`parse_size` — ``max_shard_size`` strings (``5GB``, ``500MiB``) as bytes.

A folder counts as an earlier export only by its export marker (:data:`EXPORT_MARKER`), written
last into the temp folder before the one rename, which lists every file the export wrote. A
re-export replaces the folder only while it holds nothing else; a file the user added since (or a
folder that merely holds a copied ``hsr_summary.json``) is refused unless ``overwrite: true``.

The Lightning callback :class:`hsr_pl.callbacks.ExportPretrained` only decides when and what.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from hsr_pl import distributed  # module attribute: the fail-fast tests patch iter_full_state there
from hsr_pl.io import (
    OWNER_MARKER,
    OutputPathError,
    atomic_folder,
    check_output_folder,
    file_mode,
    folder_mode,
    folder_owner,
    write_json_atomic,
)

__all__ = [
    "EXPORT_MARKER",
    "MARKER",
    "OWNER",
    "STALE_AFTER_S",
    "TEMP_MARKER",
    "ExportError",
    "check_export_target",
    "exported_files",
    "parse_size",
    "remove_stale_temps",
    "save_pretrained_atomic",
    "save_sharded_atomic",
]

MARKER = "hsr_summary.json"  # every hsr-pl export writes it; by itself it proves nothing (users copy it)
EXPORT_MARKER = ".hsr-pl-export.json"  # what an export wrote: written last, lists every file
TEMP_MARKER = ".hsr-pl-export-tmp.json"  # inside a temp folder while an export builds it: who, when
STALE_AFTER_S = 15 * 60  # a temp folder this old whose writer is gone was left by a killed export
_MARKER_FORMAT = "hsr-pl export marker v2"


class ExportError(OutputPathError):
    """An export target that would lose data; the message names the fix."""


OWNER = "hsr-pl ExportPretrained"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def exported_files(folder: Path) -> set[str] | None:
    """The files (relative POSIX paths) an hsr-pl export says it wrote into ``folder``; None when
    no valid export marker of ours is there (a folder is ours only by the marker we wrote)."""
    if folder_owner(folder) != OWNER:
        return None
    try:
        data = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("owner") == OWNER else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files) | {OWNER_MARKER, EXPORT_MARKER}


def _present(folder: Path) -> list[str]:
    """Every file, link and folder under ``folder`` as relative POSIX paths, sorted (links not followed)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in (*dirs, *files):
            found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def _foreign(folder: Path, written: set[str]) -> list[str]:
    """What is in ``folder`` besides the files an export wrote (and the folders that hold them)."""
    parents = {parent for name in written for parent in Path(name).parents[:-1]}
    keep = written | {p.as_posix() for p in parents}
    extra = [name for name in _present(folder) if name not in keep]
    outer = set(extra)  # a foreign folder counts once, not with everything inside it
    return [name for name in extra if not any(p.as_posix() in outer for p in Path(name).parents[:-1])]


def _ours(target: Path) -> bool:
    """An earlier hsr-pl export holding nothing but what it wrote (its marker lists the files)."""
    written = exported_files(target)
    return written is not None and not _foreign(target, written)


def check_export_target(dirpath: str | os.PathLike, *, overwrite: bool = False, protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise :class:`ExportError` unless writing ``dirpath`` can only replace an earlier export.

    Stricter than :func:`hsr_pl.io.check_output_folder` for inputs: the target may neither be, hold,
    nor lie inside a protected folder (writing into a model's folder changes that model too).
    """
    target = _resolved(dirpath)
    for source in protected:
        if source is None:
            continue
        src = _resolved(source)
        if _overlaps(target, src):
            raise ExportError(
                f"export dirpath {dirpath} overlaps the input {src}; writing there would change the model it was "
                "loaded from: choose a new folder (e.g. runs/realigned)"
            )
    written = exported_files(target) if target.is_dir() and not overwrite else None
    if written is None and not overwrite and folder_owner(target) == OWNER and any(target.iterdir()):
        raise ExportError(
            f"dirpath={str(dirpath)!r} was written by an older hsr-pl export that did not list its files, so what "
            "else is there cannot be told apart; choose another dirpath, or set overwrite: true to replace the folder"
        )
    if written is not None:
        extra = _foreign(target, written)
        if extra:
            raise ExportError(
                f"dirpath={str(dirpath)!r} is an earlier export that now also holds {len(extra)} item(s) it did not "
                f"write (e.g. {extra[0]!r}); move them out, choose another dirpath, or set overwrite: true to replace "
                "the whole folder"
            )
    try:
        check_output_folder(target, OWNER, label="dirpath", overwrite=overwrite or written is not None)
    except OutputPathError as exc:
        raise ExportError(str(exc)) from None
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(dirpath: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove the temp folders (``.<name>.tmp-*`` beside ``dirpath``) that a killed export left.

    Only a folder holding this exporter's temp marker counts, and only when the marker is older
    than :data:`STALE_AFTER_S` and its pid is not alive on this host (a live export is never touched).
    Returns what was removed.
    """
    target = _resolved(dirpath)
    parent = target.parent
    if not parent.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for tmp in parent.glob(f".{target.name}.tmp-*"):
        marker = tmp / TEMP_MARKER
        try:
            if not tmp.is_dir() or tmp.is_symlink():
                continue
            data = json.loads(marker.read_text(encoding="utf-8"))
            age = now - marker.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("owner") != OWNER or age < STALE_AFTER_S:
            continue
        pid = data.get("pid")
        if data.get("host") == socket.gethostname() and isinstance(pid, int) and _alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        rank_zero_info(f"hsr-pl: removed {len(removed)} temp folder(s) a killed export left beside {target}")
    return removed


def _claim(tmp: Path) -> None:
    """Mark a temp folder as this export's, so a later export can tell a stale one from a live one."""
    write_json_atomic(tmp / TEMP_MARKER, {"owner": OWNER, "pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.time()})


def _seal(tmp: Path) -> None:
    """Last step inside the temp folder: the export marker listing every file written."""
    (tmp / TEMP_MARKER).unlink(missing_ok=True)
    files = [name for name in _present(tmp) if (tmp / name).is_file()]
    write_json_atomic(tmp / EXPORT_MARKER, {"owner": OWNER, "format": _MARKER_FORMAT, "files": files})


def _write_companions(tmp: Path, processor, summary: dict | None, manifest: dict | None) -> None:
    """What sits beside the weights in every export: processor, summary, manifest; user modes."""
    if processor is not None:
        processor.save_pretrained(tmp)
    write_json_atomic(tmp / MARKER, summary or {})
    if manifest is not None:
        write_json_atomic(tmp / "realignment.json", manifest)
    for path in tmp.rglob("*"):
        os.chmod(path, folder_mode() if path.is_dir() else file_mode())


def save_pretrained_atomic(
    model,
    processor,
    dirpath: str | os.PathLike,
    summary: dict | None = None,
    *,
    manifest: dict | None = None,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
) -> Path:
    """``model.save_pretrained`` + ``processor.save_pretrained`` into ``dirpath`` in one rename.

    ``summary`` becomes ``hsr_summary.json`` (written always), ``manifest`` ``realignment.json``.
    See :func:`check_export_target` for what is refused; the folder is built by
    :func:`hsr_pl.io.atomic_folder` (fsynced, umask modes, owner marker, one rename).
    """
    target = check_export_target(dirpath, overwrite=overwrite, protected=protected)
    remove_stale_temps(target)
    replace_ours = overwrite or (target.is_dir() and _ours(target))
    with atomic_folder(target, OWNER, overwrite=replace_ours) as tmp:
        _claim(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        _write_companions(tmp, processor, summary, manifest)
        _seal(tmp)
    return target


def _write_streamed(model, folder: Path | None, max_shard_bytes: int) -> dict[str, Any]:
    """Every tensor of the sharded ``model``, gathered one at a time; with ``folder`` (the writing
    rank) they go into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) and ``model.safetensors.index.json``. Every rank
    must call this (each gather is a collective); only the writer keeps the tensors."""
    from safetensors.torch import save_file

    pending: dict[str, Any] = {}
    pending_bytes = 0
    parts: list[list[str]] = []
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        save_file(pending, str(folder / f"part-{len(parts):05d}.safetensors"), metadata={"format": "pt"})
        parts.append(list(pending))
        pending, pending_bytes = {}, 0

    for name, tensor in distributed.iter_full_state(model, keep=folder is not None):
        if folder is None:
            continue
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total += size
    if folder is None:
        return {}
    flush()
    weight_map = {}
    for i, names in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(folder / f"part-{i:05d}.safetensors", folder / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(folder / "model.safetensors.index.json", index)
    return index


def save_sharded_atomic(
    model,
    processor,
    dirpath: str | os.PathLike,
    summary: dict | None = None,
    *,
    manifest: dict | None = None,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
    writer: bool = True,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """:func:`save_pretrained_atomic` for an FSDP2-sharded model: every rank takes part in the
    gathers, one tensor at a time (no rank holds the full model), and the ``writer`` rank streams
    them to CPU into safetensors shards with an index, plus config, processor, summary and
    manifest, in one atomic rename. Returns the target on every rank."""
    target = check_export_target(dirpath, overwrite=overwrite, protected=protected)
    if not writer:
        _write_streamed(model, None, max_shard_bytes)
        return target
    remove_stale_temps(target)
    replace_ours = overwrite or (target.is_dir() and _ours(target))

    with atomic_folder(target, OWNER, overwrite=replace_ours) as tmp, \
            distributed.undo_on_abort(lambda: shutil.rmtree(tmp, ignore_errors=True)):  # a peer failing mid-gather
        _claim(tmp)
        _write_streamed(model, tmp, max_shard_bytes)
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        _write_companions(tmp, processor, summary, manifest)
        _seal(tmp)
    return target


_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def parse_size(value: int | str) -> int:
    """``max_shard_size`` as bytes: an int, or ``"<number><unit>"`` with KB/MB/GB/KiB/MiB/GiB."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                number = float(text[: -len(unit)])
            except ValueError:
                break
            if number > 0:
                return int(number * _UNITS[unit])
            break
    raise ExportError(f"max_shard_size={value!r} is not a size; use e.g. 5GB, 500MiB or a byte count")
