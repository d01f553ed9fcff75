"""``Pruning``: prune the language model's decoder-layer linears, once, and keep them pruned.

Thin orchestration around :func:`hsr_pl.pruning.prune_model` (the maths lives there):

* when: at the start of ``trainer.fit`` and/or ``trainer.validate`` (``when=``), exactly once —
  a resumed fit or a second validate finds ``done`` in the callback's state and does not prune
  again;
* data: ``trainer.datamodule.calibration_dataloader(calibration, num_samples, with_response=True,
  batch_size=...)``; under DDP each rank takes every ``world_size``-th sample, and the statistics
  are all-reduced before any mask is chosen, so every rank prunes identically;
* results: masks (and the dense values realignment may restore) go to :class:`hsr_pl.state.HSRState`
  (``get_state(pl_module)``, names qualified inside the Hugging Face model);
* during fit: the masks are re-applied after every training batch (after ``optimizer.step``),
  except entries that realignment restored (``state.restored``), from keep-masks kept on the
  weights' devices (no host round trip per step; frozen weights are skipped);
* checkpoints: the masks (packed bits) and the originals go to one safetensors side file per
  distinct state, ``hsr_state-<hash>.safetensors``, written once next to the checkpoints
  (``state_dir``, else the ModelCheckpoint directory, else ``trainer.default_root_dir``); the
  checkpoint carries its path, SHA-256 and the small rest of the state. A resume finds it there
  or next to the checkpoint it resumes from, or says which file is missing.

Everything that can be checked — options, regexes, data module, split, token counts, N:M
divisibility — is checked before a weight changes.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from hsr_pl.models import get_adapter
from hsr_pl.pruning import (
    PartialPruningError,
    PruningConfig,
    PruningConfigError,
    PruningResult,
    prune_model,
)
from hsr_pl.state import HSRState, get_state, tensor_version
from hsr_pl.state_file import FORMAT as STATE_FORMAT
from hsr_pl.state_file import read_state_file, write_state_file

from ._calibration import WeightedAllReduce, calibration_batches, check_counts, layer_progress
from ._common import eval_mode, hf_model
from ._common import world as dist_world
from .base import WHEN, HSRCallback, notify_before_pruning

__all__ = ["Pruning"]

Batch = dict[str, Tensor]


def _as_list(value: str | Iterable[str] | None, label: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise PruningConfigError(f"{label} must be a list of regex strings, got {item!r}")
        try:
            re.compile(item)
        except re.error as exc:
            raise PruningConfigError(f"{label} regex {item!r} does not compile ({exc}); fix or escape it") from None
    return items


class Pruning(HSRCallback):
    """Prune the language model's decoder-layer linears (Wanda, SparseGPT, magnitude, SNIP).

    Args:
        method: ``wanda`` | ``sparsegpt`` | ``magnitude`` | ``snip``.
        sparsity: fraction pruned, in (0, 1). None: 0.5 unstructured, N/M for an N:M structure.
        mask_structure: ``"0:0"`` unstructured, or ``"N:M"`` (e.g. ``"2:4"``).
        mode: ``sequential`` (default for wanda/sparsegpt, as the references) or ``oneshot``.
            Mllama (cross-attention layers in the decoder) supports only ``oneshot``.
        tokens: ``response`` (SPEC default: answer tokens feed the statistics) or ``all``.
        calibration: the data module's calibration split (``utility`` | ``safety`` | ``over_refusal``).
        num_samples: calibration samples (SPEC: 128); None: the data module's default.
        batch_size: calibration batch size. Keep 1 for statistics bit-identical to the references.
        targets: regexes (``re.search``) over the qualified names of the model's ``nn.Linear``
            modules; default: every decoder-layer linear of the language model. A regex that
            matches nothing, or matches a linear outside the decoder layers, is an error.
        ignore: regexes removing linears from ``targets``.
        keep_originals: regexes over the pruned names whose dense values are kept for
            realignment; default: the attention projections (q/k/v/o), the only weights HSR restores.
        when: ``fit_start`` and/or ``validation_start`` (the start of ``trainer.validate``): where
            the callback prunes, whichever comes first; it prunes once.
        granularity, blocksize, percdamp: see :class:`hsr_pl.pruning.PruningConfig`.
        state_dir: where checkpoints' side files (masks and originals) go; default: the
            ModelCheckpoint directory, else ``trainer.default_root_dir``. Not a setting that
            decides results, so a resume may change it.
    """

    def __init__(
        self,
        method: str = "wanda",
        sparsity: float | None = None,
        mask_structure: str = "0:0",
        mode: str | None = None,
        tokens: str = "response",
        calibration: str = "utility",
        num_samples: int | None = 128,
        batch_size: int = 1,
        targets: str | list[str] | None = None,
        ignore: str | list[str] | None = None,
        keep_originals: str | list[str] | None = None,
        when: str | list[str] = WHEN,
        granularity: str = "row",
        blocksize: int = 128,
        percdamp: float = 0.01,
        state_dir: str | None = None,
    ) -> None:
        super().__init__(when, error=PruningConfigError)
        if sparsity is None and str(mask_structure).strip() in ("0:0", ""):
            sparsity = 0.5
        self.config = PruningConfig(
            method=method,
            sparsity=sparsity,
            mask_structure=mask_structure,
            mode=mode,
            tokens=tokens,
            granularity=granularity,
            blocksize=blocksize,
            percdamp=percdamp,
        )
        if not isinstance(calibration, str) or not calibration:
            raise PruningConfigError(f"calibration={calibration!r} must name a data-module split, e.g. 'utility'")
        if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples <= 0):
            raise PruningConfigError(f"num_samples={num_samples!r} must be a positive integer (SPEC: 128) or None")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
            raise PruningConfigError(
                f"batch_size={batch_size!r} must be a positive integer; 1 reproduces the references bit for bit"
            )
        self.calibration = calibration
        self.num_samples = None if num_samples is None else int(num_samples)
        self.batch_size = int(batch_size)
        self.targets = _as_list(targets, "targets")
        self.ignore = _as_list(ignore, "ignore") or []
        self.keep_originals = _as_list(keep_originals, "keep_originals")
        self.result: PruningResult | None = None
        self.state_dir = None if state_dir is None else str(state_dir)
        self._state: HSRState | None = None
        self._loaded: dict | None = None
        self._trainer: pl.Trainer | None = None
        self._written: tuple[dict, dict] | None = None  # (tensor signature, side-file reference)

    @property
    def target_sparsity(self) -> float:
        nm = self.config.nm
        return float(self.config.sparsity) if self.config.sparsity is not None else nm[0] / nm[1]

    # --------------------------------------------------------------------------- targeting
    def resolve_targets(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """``(names to prune, names whose dense values to keep)`` for ``model`` (an HF model)."""
        adapter = get_adapter(model)
        decoder = adapter.target_linears()
        ignored = [n for n in decoder if any(re.search(p, n) for p in self.ignore)]
        if self.targets is None:
            chosen = [n for n in decoder if n not in ignored]
        else:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            example = next(iter(decoder), "?")
            hits: set[str] = set()
            for pattern in self.targets:
                matched = [n for n in linears if re.search(pattern, n)]
                if not matched:
                    raise PruningConfigError(
                        f"targets regex {pattern!r} matches no nn.Linear of the model; names look like "
                        f"{example!r} (regexes are matched with re.search)"
                    )
                outside = [n for n in matched if n not in decoder and not any(re.search(p, n) for p in self.ignore)]
                if outside:
                    raise PruningConfigError(
                        f"targets regex {pattern!r} also matches {len(outside)} linear(s) outside the language "
                        f"model's decoder layers (e.g. {outside[0]!r}); only decoder-layer linears are pruned "
                        "(SPEC §1): anchor the regex or add those names to ignore"
                    )
                hits.update(matched)
            chosen = [n for n in decoder if n in hits and n not in ignored]
        if not chosen:
            raise PruningConfigError(f"targets={self.targets} with ignore={self.ignore} leave no linear to prune")
        if self.keep_originals is None:
            projections = {adapter.name_of(p) for i in adapter.layer_indices() for p in adapter.projections(i).values()}
            keep = [n for n in chosen if n in projections]
        else:
            keep = []
            for pattern in self.keep_originals:
                matched = [n for n in chosen if re.search(pattern, n)]
                if not matched:
                    raise PruningConfigError(
                        f"keep_originals regex {pattern!r} matches none of the {len(chosen)} pruned linears "
                        f"(e.g. {chosen[0]!r}); fix it or drop it"
                    )
                keep.extend(matched)
            keep = [n for n in chosen if n in set(keep)]
        return chosen, keep

    # ------------------------------------------------------------------------- calibration
    def calibration_batches(self, trainer: pl.Trainer, device: torch.device) -> list[Batch]:
        """This rank's calibration batches (tensors only, on ``device``)."""
        return calibration_batches(
            trainer, self.calibration, self.num_samples, owner=f"Pruning(method={self.config.method!r})",
            device=device, batch_size=self.batch_size, hint="or use method='magnitude'",
        )

    def _check_counts(self, batches: Sequence[Batch], device: torch.device) -> tuple[int, int, float]:
        """Global (samples, tokens) and this rank's weight; the same error on every rank if unusable."""
        tokens_mode = "response" if self.config.method == "snip" else self.config.tokens
        return check_counts(batches, tokens_mode, device, self.calibration)

    # ------------------------------------------------------------------------------ pruning
    def prune(
        self,
        pl_module: nn.Module,
        batches: Sequence[Batch] | None,
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
        progress: bool = False,
    ) -> PruningResult:
        """Prune ``pl_module``'s model in place and record masks/originals in its :class:`HSRState`."""
        model = hf_model(pl_module)
        targets, keep = self.resolve_targets(model)
        progress_bar = layer_progress(progress, f"pruning ({self.config.method})")
        with progress_bar as on_layer, eval_mode(model):
            try:
                result = prune_model(
                    model, batches, self.config, targets=targets, keep_originals=keep, on_layer=on_layer, reduce=reduce
                )
            except PartialPruningError as exc:
                cause = exc.__cause__ or exc
                raise PartialPruningError(
                    f"Pruning callback ({self.config.method}, sparsity {self.target_sparsity:g}) failed part-way: "
                    f"{type(cause).__name__}: {cause}; HSRState was not filled",
                    exc.pruned_layers,
                ) from exc
        state = get_state(pl_module)
        for name, mask in result.masks.items():
            state.record_pruning(name, mask, result.originals.get(name))
        state.sparsity = self.target_sparsity
        state.method = self.config.method
        state.structure = None if self.config.nm == (0, 0) else tuple(self.config.nm)
        self.result = result
        self._state = state
        self._done = True
        return result

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Grad-enabled tensors even inside validate's inference mode (SNIP needs backward passes).
        with torch.inference_mode(False):
            reduce = None
            batches = None
            if self.config.needs_data:
                batches = self.calibration_batches(trainer, pl_module.device)
                _, _, weight = self._check_counts(batches, pl_module.device)
                if dist_world()[1] > 1:
                    reduce = WeightedAllReduce(1.0 if self.config.method == "snip" else weight)
            show = trainer.is_global_zero and trainer.progress_bar_callback is not None
            # Everything is checked: callbacks that need the dense model measure it now.
            notify_before_pruning(trainer, pl_module, self)
            self.prune(pl_module, batches, reduce=reduce, progress=show)
        self._report(trainer, pl_module)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from hsr_pl.report.sparsity import print_sparsity_table, sparsity_rows

        model = hf_model(pl_module)
        rows = sparsity_rows(model, self._state)
        sparsity = sum(r.zeros for r in rows) / max(sum(r.total for r in rows), 1)
        if trainer.is_global_zero:
            print_sparsity_table(model, self._state)
        rank_zero_info(
            f"hsr-pl: {self.config.method} pruned {len(rows)} linears to {100 * sparsity:.2f} % sparsity "
            f"(target {100 * self.target_sparsity:g} %)"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/sparsity": sparsity}, step=trainer.global_step)

    def _sync_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put a checkpoint's HSRState on the module and re-apply its masks."""
        if self._loaded is None:
            return
        loaded = self._loaded
        if "side_file" in loaded:  # tensors by reference (else a checkpoint with them inline)
            ckpt = getattr(trainer, "ckpt_path", None)
            search = [Path(ckpt).parent if ckpt else None, *self._state_dirs(trainer)]
            with torch.inference_mode(False):  # normal tensors (with version counters) even under validate
                tensors, metadata = read_state_file(loaded["side_file"], search)
                loaded = {**loaded, **HSRState.tensors_state(tensors, metadata)}
            self._written = None
        state = get_state(pl_module)
        state.load_state_dict(loaded)
        self._loaded = None
        self._state = state
        if state.pruned:
            state.apply_masks(hf_model(pl_module))

    # -------------------------------------------------------------------------------- hooks
    @override
    def settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": cfg.method, "sparsity": cfg.sparsity, "mask_structure": list(cfg.nm), "mode": cfg.mode,
            "tokens": cfg.tokens, "granularity": cfg.granularity, "blocksize": cfg.blocksize,
            "percdamp": cfg.percdamp, "calibration": self.calibration, "num_samples": self.num_samples,
            "batch_size": self.batch_size, "targets": self.targets, "ignore": self.ignore,
            "keep_originals": self.keep_originals,
        }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # where checkpoints' side files go, and who writes them

    @override
    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_state(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs after optimizer.step (and after a skipped step under accumulation: harmless).
        # Frozen weights are skipped: the optimizer cannot have moved them since the last time.
        if self._done and self._state is not None and self._state.pruned:
            self._state.apply_masks(hf_model(pl_module), only_trainable=True)

    # -------------------------------------------------------------------------------- state
    def _state_dirs(self, trainer: pl.Trainer) -> list[Path]:
        """Where side files go (the first) and are looked for: state_dir, checkpoints, run root."""
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        dirs = [self.state_dir, getattr(checkpoint, "dirpath", None), getattr(trainer, "default_root_dir", None)]
        return [Path(d) for d in dirs if d]

    def _side_file(self, state: HSRState) -> dict[str, Any]:
        """The side-file reference of ``state``'s tensors, writing the file when they changed."""
        signature = _signature(state)
        if self._written is None or not _same_signature(self._written[0], signature):
            tensors, metadata = state.to_tensors()
            ref = write_state_file(
                self._state_dirs(self._trainer)[0], tensors, metadata, write=self._trainer.is_global_zero
            )
            self._written = (signature, ref)
        return self._written[1]

    @override
    def extra_state(self) -> dict[str, Any]:
        if self._state is None:
            return {"hsr_state": self._loaded}
        if self._trainer is None:  # outside a Trainer: nowhere to write, keep it all in the dict
            return {"hsr_state": self._state.state_dict()}
        return {"hsr_state": {"format": STATE_FORMAT, **self._state.metadata(), "side_file": self._side_file(self._state)}}

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._loaded = state.get("hsr_state")


def _signature(state: HSRState) -> dict[tuple[str, str], tuple[weakref.ref, int]]:
    """What the state's tensors are now: weak references and version counters (cheap, and a
    replaced or in-place edited tensor differs, without keeping the old one alive)."""
    return {
        (kind, name): (weakref.ref(tensor), tensor_version(tensor))
        for kind in ("pruned", "restored", "originals")
        for name, tensor in getattr(state, kind).items()
    }


def _same_signature(old: Mapping, new: Mapping) -> bool:
    if old.keys() != new.keys():
        return False
    return all(old[k][0]() is new[k][0]() and old[k][1] == new[k][1] for k in new)
