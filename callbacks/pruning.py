"""``Pruning``: prune the language model's decoder-layer linears once, and keep them pruned during fit.

Orchestration only: the algorithms are :func:`hsr_pl.pruning.prune_model`, the targets
:mod:`hsr_pl.pruning.targets`; masks and originals go to :class:`hsr_pl.state.HSRState` and into
checkpoints through :class:`~hsr_pl.callbacks._masks.MaskHolder`. Every setting, regex, split and
count is checked before a weight changes. See docs/pruning.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from hsr_pl.distributed import ShardingError, check_lockstep, model_is_sharded, sharded_strategy
from hsr_pl.pruning import (
    PartialPruningError,
    PruningConfig,
    PruningConfigError,
    PruningResult,
    prune_model,
)
from hsr_pl.pruning.masks import UNSTRUCTURED
from hsr_pl.report.sparsity import print_sparsity_table, sparsity_rows
from hsr_pl.state import get_state
from hsr_pl.validation import positive_int, split_name

from ._calibration import WeightedAllReduce, calibration_batches, check_counts, layer_progress
from ._common import eval_mode, hf_model
from ._common import world as dist_world
from ._masks import MaskHolder
from .base import WHEN, notify_before_pruning, notify_stage

__all__ = ["Pruning"]

Batch = dict[str, Tensor]


class Pruning(MaskHolder):
    """Prune the language model's decoder-layer linears (Wanda, SparseGPT, magnitude, SNIP).

    Example (after SafetyHeadAttribution, before SafetyRealignment)::

        - class_path: hsr_pl.callbacks.Pruning
          init_args: {method: wanda, sparsity: 0.5, calibration: utility, num_samples: 128}

    Args:
        method: ``wanda`` | ``sparsegpt`` | ``magnitude`` | ``snip``.
        sparsity: fraction pruned, in (0, 1). None: 0.5 unstructured, N/M for an N:M structure.
        mask_structure: ``"0:0"`` unstructured, or ``"N:M"`` (e.g. ``"2:4"``).
        mode: ``sequential`` (default for wanda/sparsegpt, as the references) or ``oneshot``.
            Mllama (cross-attention layers in the decoder) supports only ``oneshot``.
        tokens: ``response`` (default: answer tokens feed the statistics) or ``all``.
        calibration: the data module's calibration split (``utility`` | ``safety`` | ``over_refusal``).
        num_samples: calibration samples (the paper: 128); None: the data module's default.
        batch_size: calibration batch size. Keep 1 for statistics bit-identical to the references.
        targets: regexes (``re.search``) over the qualified names of the model's ``nn.Linear``
            modules; default: every decoder-layer linear of the language model. A regex that
            matches nothing, or matches a linear outside the decoder layers, is an error.
        ignore: regexes removing linears from ``targets``.
        keep_originals: regexes over the pruned names whose dense values are kept for
            realignment; default: the attention projections (q/k/v/o), the only weights HSR restores.
        when: ``fit_start`` and/or ``validation_start`` (the start of ``trainer.validate``): where
            the callback prunes, whichever comes first; it prunes once.
        granularity: ``row`` (default) or ``matrix`` (magnitude and wanda; wanda ``matrix`` ranks
            |W|·sqrt(a) over the whole matrix, as torchao's ``WandaSparsifier``). Unstructured only.
        blocksize, percdamp: see :class:`hsr_pl.pruning.PruningConfig`.
        state_dir: where checkpoints' side files (masks and originals) go; default: the
            ModelCheckpoint directory, else ``trainer.default_root_dir``. Not a setting that
            decides results, so a resume may change it.
    """

    structure_known_before_pruning = True

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
        super().__init__(
            when, error=PruningConfigError, state_dir=state_dir, targets=targets, ignore=ignore,
            keep_originals=keep_originals,
        )
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
        split_name(calibration, "Pruning.calibration", "the references calibrate on 'utility'", PruningConfigError)
        if num_samples is not None:
            positive_int(num_samples, "num_samples", "the paper uses 128; or None", PruningConfigError)
        positive_int(batch_size, "batch_size", "1 reproduces the references bit for bit", PruningConfigError)
        self.calibration = calibration
        self.num_samples = None if num_samples is None else int(num_samples)
        self.batch_size = int(batch_size)
        self.result: PruningResult | None = None

    @property
    def changes_kept_weights(self) -> bool:
        """SparseGPT also updates the weights it keeps (so their dense values must be copied first)."""
        return self.config.method == "sparsegpt"

    @property
    def planned_structure(self) -> tuple[int, int] | None:
        """The N:M structure the masks will have (None: unstructured); known before pruning."""
        return None if self.config.nm == UNSTRUCTURED else tuple(self.config.nm)

    @property
    def importance(self) -> str:
        """The score realignment's ``importance: auto`` uses: the pruning method's own, except that
        magnitude has no data in it (its utility and safety importance would be the same matrix, and
        the rule would restore nothing), so magnitude pruning is realigned with Wanda's score."""
        return "wanda" if self.config.method == "magnitude" else self.config.method

    @property
    def target_sparsity(self) -> float:
        nm = self.config.nm
        return float(self.config.sparsity) if self.config.sparsity is not None else nm[0] / nm[1]

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
            # pop: HSRState keeps the pruned positions' values; the full dense copy would only double host RAM
            state.record_pruning(name, mask, result.originals.pop(name, None))
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
                if model_is_sharded(hf_model(pl_module)):
                    check_lockstep(
                        len(batches), f"Pruning(method={self.config.method!r})",
                        f"make num_samples a multiple of world_size × batch_size ({dist_world()[1]} × {self.batch_size})",
                    )
                _, _, weight = self._check_counts(batches, pl_module.device)
                if dist_world()[1] > 1:
                    rank, world = dist_world()
                    ordered = (rank, world) if self.batch_size == 1 else None  # Wanda: bit for bit one process
                    reduce = WeightedAllReduce(1.0 if self.config.method == "snip" else weight, ordered=ordered)
            show = trainer.is_global_zero and trainer.progress_bar_callback is not None
            # Everything is checked: callbacks that need the dense model measure it now.
            notify_before_pruning(trainer, pl_module, self)
            self.prune(pl_module, batches, reduce=reduce, progress=show)
        self._report(trainer, pl_module)
        notify_stage(trainer, pl_module, "pruned", self)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = hf_model(pl_module)
        rows = sparsity_rows(model, self._state)
        sparsity = sum(r.zeros for r in rows) / max(sum(r.total for r in rows), 1)
        if trainer.is_global_zero:
            print_sparsity_table(model, self._state, rows=rows)
        rank_zero_info(
            f"hsr-pl: {self.config.method} pruned {len(rows)} linears to {100 * sparsity:.2f} % sparsity "
            f"(target {100 * self.target_sparsity:g} %)"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/sparsity": sparsity}, step=trainer.global_step)

    # -------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if sharded_strategy(trainer) and self.config.method == "snip":
            raise ShardingError(
                "Pruning(method='snip') under ModelParallelStrategy: SNIP needs whole-model weight gradients, which the "
                "sharded path does not gather; use wanda, sparsegpt or magnitude, or strategy ddp for snip"
            )

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
