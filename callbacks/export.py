"""``ExportPretrained``: write the model and its processor with ``save_pretrained``, atomically,
and never over anything it did not write itself.

The folder is what a user downloads or shares, so it holds safetensors and JSON only (no pickle),
pruned weights stay exact zeros, and it appears all at once: everything is written (and fsynced)
into a temporary sibling folder that replaces the target in one rename, so an interrupted run
never leaves a half-written checkpoint where a good one used to be.

What it refuses (before any work starts, in ``setup``), unless ``overwrite: true``:

* a target that is, contains or lies inside the model's own source folder, a checkpoint another
  callback reads (repair mode's pruned checkpoint) or the package's shipped assets (symlinks
  resolved) — ``overwrite`` does not lift this;
* a non-empty folder that an earlier hsr-pl export did not write (its ``hsr_summary.json`` is
  the proof);
* a path under a file, or a parent folder it cannot write to.

Beside the weights: ``hsr_summary.json`` (what the callbacks did, always) and
``realignment.json`` (the realignment manifest, when SafetyRealignment ran).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hsr_pl.io import (
    OutputPathError,
    atomic_folder,
    check_output_folder,
    file_mode,
    folder_mode,
    folder_owner,
    write_json_atomic,
)
from hsr_pl.state import HSRState, get_state

__all__ = [
    "MARKER",
    "ExportError",
    "ExportPretrained",
    "check_export_target",
    "realignment_manifest",
    "save_pretrained_atomic",
    "save_sharded_atomic",
]

_WHEN = ("fit_end", "validation_end")
MARKER = "hsr_summary.json"  # every hsr-pl export writes it; its presence proves a folder is ours


class ExportError(OutputPathError):
    """An export target that would lose data; the message names the fix."""


OWNER = "hsr-pl ExportPretrained"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _ours(target: Path) -> bool:
    """Written by an hsr-pl export: its owner marker, or (older exports) its hsr_summary.json."""
    return folder_owner(target) == OWNER or (target / MARKER).is_file()


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
    try:
        check_output_folder(target, OWNER, label="dirpath", overwrite=overwrite or (target.is_dir() and _ours(target)))
    except OutputPathError as exc:
        raise ExportError(str(exc)) from None
    return target


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
    replace_ours = overwrite or (target.is_dir() and _ours(target))
    with atomic_folder(target, OWNER, overwrite=replace_ours) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_companions(tmp, processor, summary, manifest)
    return target


def _write_streamed(model, folder: Path | None, max_shard_bytes: int) -> dict[str, Any]:
    """Every tensor of the sharded ``model``, gathered one at a time; with ``folder`` (the writing
    rank) they go into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) and ``model.safetensors.index.json``. Every rank
    must call this (each gather is a collective); only the writer keeps the tensors."""
    from safetensors.torch import save_file

    from hsr_pl.distributed import iter_full_state

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

    for name, tensor in iter_full_state(model, keep=folder is not None):
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
    replace_ours = overwrite or (target.is_dir() and _ours(target))
    from hsr_pl.distributed import undo_on_abort

    with atomic_folder(target, OWNER, overwrite=replace_ours) as tmp, \
            undo_on_abort(lambda: shutil.rmtree(tmp, ignore_errors=True)):  # a peer failing mid-gather
        _write_streamed(model, tmp, max_shard_bytes)
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        _write_companions(tmp, processor, summary, manifest)
    return target


def realignment_manifest(pl_module: pl.LightningModule, state: HSRState) -> dict[str, Any] | None:
    """``realignment.json``: model, pruning, heads with scores, settings, restored counts, ratios."""
    if not state.realignment:
        return None
    from hsr_pl import __version__

    report = state.realignment
    model = getattr(pl_module, "model", pl_module)
    config = getattr(model, "config", None)
    settings = report.get("settings", {})
    heads = report.get("heads", [])
    scores = report.get("head_scores", {})
    return {
        "hsr_pl_version": __version__,
        "model": {
            "source": getattr(pl_module, "model_source", None),
            "model_type": getattr(config, "model_type", None),
            "class": type(model).__name__,
        },
        "pruning": {
            "method": state.method, "sparsity": state.sparsity,
            "structure": None if state.structure is None else f"{state.structure[0]}:{state.structure[1]}",
        },
        "heads": [{"layer": l_, "head": h, "score": scores.get(f"{l_}-{h}")} for l_, h in heads],
        "rule": {**{k: settings.get(k) for k in ("p", "q", "max_p", "selection", "importance")}, "top_h": len(heads)},
        "budget": {"setting": settings.get("budget"), "count": report.get("budget"), "order": settings.get("order"),
                   "rounds": report.get("rounds"), "scope": settings.get("scope"),
                   "preserve_structure": settings.get("preserve_structure")},
        "restored": {
            "params": report["restored_params"],
            "swapped_out_params": report.get("swapped_out_params", 0),
            "lm_params": report["lm_params"],
            "pruned_params": report["pruned_params"],
            "ratio_of_language_model_params": report["restored_ratio_lm"],
            "ratio_of_pruned_params": report["restored_ratio_pruned"],
            "per_module": {n: m["restored"] for n, m in report["modules"].items() if m["restored"]},
            "per_head_q_o": report.get("per_head_q_o", {}),
            "per_kv_group_k_v": report.get("per_kv_group_k_v", {}),
        },
        "calibration": report.get("calibration", {}),
    }


_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def _parse_size(value: int | str) -> int:
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


class ExportPretrained(Callback):
    """Save the wrapped HF model and processor to ``dirpath`` at the end of fit or validate.

    Args:
        dirpath: the output folder: new, empty, or written by an earlier hsr-pl export.
        when: ``fit_end`` (default) or ``validation_end``.
        overwrite: also replace a non-empty folder hsr-pl did not write (never the model's source).
        max_shard_size: a sharded (FSDP2) model is gathered tensor by tensor and written as
            safetensors shards of at most this size with an index file (``5GB``, ``500MiB``, bytes).
    """

    def __init__(
        self, dirpath: str, when: str = "fit_end", overwrite: bool = False, max_shard_size: int | str = "5GB"
    ) -> None:
        super().__init__()
        if not dirpath:
            raise ExportError("dirpath is empty; give the folder to write the checkpoint to")
        if when not in _WHEN:
            raise ExportError(f"ExportPretrained(when={when!r}): choose one of {list(_WHEN)}")
        self.dirpath = str(dirpath)
        self.export_when = when
        self.overwrite = bool(overwrite)
        if Path(self.dirpath).exists() and not Path(self.dirpath).is_dir():
            raise ExportError(f"dirpath={self.dirpath} is a file; give a folder")
        self.max_shard_bytes = _parse_size(max_shard_size)
        self.path: Path | None = None

    def _protected(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        from hsr_pl.models.organism import ORGANISM_PACKAGE_PATH

        paths = [getattr(pl_module, "model_source", None), str(ORGANISM_PACKAGE_PATH)]
        paths += [getattr(cb, "path", None) for cb in trainer.callbacks if cb is not self and isinstance(getattr(cb, "path", None), str)]
        return [p for p in paths if p]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before any work: a target that would lose data fails now, not after the run.
        check_export_target(self.dirpath, overwrite=self.overwrite, protected=self._protected(trainer, pl_module))

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from hsr_pl.distributed import fail_fast, model_is_sharded

        model = getattr(pl_module, "model", pl_module)
        sharded = model_is_sharded(model)
        if not (trainer.is_global_zero or sharded):
            return
        state = get_state(pl_module)
        summary = {
            "pruning_method": state.method,
            "sparsity": state.sparsity,
            "top_heads": [list(h) for h in state.top_heads],
            "restored_weights": int(sum(int(m.sum()) for m in state.restored.values())),
            "global_step": int(trainer.global_step),
        }
        if sharded:  # every rank gathers; rank 0 writes; nobody returns before the folder exists
            with fail_fast("ExportPretrained"):
                self.path = save_sharded_atomic(
                    model, getattr(pl_module, "processor", None), self.dirpath, summary,
                    manifest=realignment_manifest(pl_module, state), overwrite=self.overwrite,
                    protected=self._protected(trainer, pl_module), writer=trainer.is_global_zero,
                    max_shard_bytes=self.max_shard_bytes,
                )
                trainer.strategy.barrier()
            rank_zero_info(f"hsr-pl: saved the sharded model (gathered tensor by tensor) and processor to {self.path}")
            return
        self.path = save_pretrained_atomic(
            model, getattr(pl_module, "processor", None), self.dirpath, summary,
            manifest=realignment_manifest(pl_module, state), overwrite=self.overwrite,
            protected=self._protected(trainer, pl_module),
        )
        rank_zero_info(f"hsr-pl: saved the model and processor to {self.path}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_when == "fit_end":
            self._export(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_when == "validation_end" and not trainer.sanity_checking:
            self._export(trainer, pl_module)
