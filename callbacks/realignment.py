"""``SafetyRealignment``: HSR's neuron-level step — put back the few pruned weights that matter for
safety inside the top heads.

Orchestration only (the maths is :mod:`hsr_pl.realign`). It sits after the pruner, yet measures
the dense model: the pruner announces its first weight change (``before_pruning``) and this
callback then runs its dense pass. At its own moment it reads masks and originals from
:class:`hsr_pl.state.HSRState`, restores, reports, and publishes a
:class:`~hsr_pl.state.RealignmentRun` for StageEvaluation. See docs/realignment.md.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hsr_pl.attribution import top_heads
from hsr_pl.data import dev_sets
from hsr_pl.distributed import ShardingError, check_lockstep, model_is_sharded, sharded_strategy
from hsr_pl.evaluation.dev import dev_headlines
from hsr_pl.io import check_output_file
from hsr_pl.models import get_adapter
from hsr_pl.realign import (
    FLAT_KEYS,
    DenseMeasurement,
    GradientOrder,
    MarginRule,
    RealignConfigError,
    RealignInputError,
    RealignMethod,
    RealignResult,
    RealignSession,
    auto_realign,
    dense_pass,
    method_from_flat,
    realign_model,
    schedule,
)
from hsr_pl.realign.auto import AutoBudget, DevPoint, point_from_headlines, residual_line, target_reason
from hsr_pl.realign.runner import attention_linears, language_model_parameters
from hsr_pl.report.auto import auto_lines, save_auto_png
from hsr_pl.report.heads import read_scores, write_json_atomic
from hsr_pl.report.realignment import print_realignment, realignment_line
from hsr_pl.state import RealignmentRun, get_state, parse_head_key
from hsr_pl.validation import json_output_path, non_negative_int, positive_int, split_name

from ._calibration import WeightedAllReduce, calibration_batches, check_counts, comm_device, layer_progress
from ._common import eval_mode, hf_model
from ._common import world as dist_world
from ._masks import MaskHolder, mask_holders
from .base import WHEN, HSRCallback, notify_stage, providers

__all__ = ["SafetyRealignment"]

Pair = tuple[int, int]


def _parse_heads(heads: Iterable[Any]) -> list[Pair]:
    out = []
    for item in heads:
        if isinstance(item, str):
            out.append(parse_head_key(item))
        else:
            try:
                layer, head = item
                out.append((int(layer), int(head)))
            except (TypeError, ValueError):
                raise RealignConfigError(f"heads entry {item!r} is neither '<layer>-<head>' nor [layer, head]") from None
    return out


def _deprecated_keys(
    order: str | None = None,
    p: float | str | None = None,
    q: float | None = None,
    max_p: float | None = None,
    budget: int | float | str | None = None,
    rounds: int | None = None,
    scope: str | None = None,
    utility_weight: float | None = None,
    preserve_structure: bool | None = None,
    heads_path: str | None = None,
) -> dict[str, Any]:
    """SafetyRealignment's keys before ``method`` (issue 17), still accepted: the ones given."""
    given = dict(order=order, p=p, q=q, max_p=max_p, budget=budget, rounds=rounds, scope=scope,
                 utility_weight=utility_weight, preserve_structure=preserve_structure, heads_path=heads_path)
    return {k: v for k, v in given.items() if v is not None}


@rank_zero_only
def _say_deprecated(line: str) -> None:
    print(line, file=sys.stderr)


class SafetyRealignment(HSRCallback):
    """Restore the pruned weights inside the top safety heads that the realignment method selects.

    Example (after SafetyHeadAttribution and Pruning in ``trainer.callbacks``)::

        - class_path: hsr_pl.callbacks.SafetyRealignment
          init_args:
            method: {class_path: hsr_pl.realign.GradientOrder, init_args: {budget: "1‱"}}
            safety_calibration: safety+over_refusal
            output: runs/demo/realignment.json

    Args:
        method: how the pruned weights are ranked and how many are restored:
            :class:`hsr_pl.realign.MarginRule` (default: the paper's rule, ``p: auto``) or
            :class:`hsr_pl.realign.GradientOrder` (default ``budget: auto``: rounds grown until
            the dev sets say stop; needs a data module with dev sets). With a fixed budget and dev
            sets available, the result is checked once on them (dense, pruned, after restoring)
            and residual damage is warned about.
        top_h: how many of the best-scored heads to use; None takes SafetyHeadAttribution's own
            top-h (or all of ``heads``).
        importance: the score of both importances (``wanda``, ``sparsegpt``, ``magnitude``,
            ``snip``); ``auto`` = the pruning method's own (Wanda's for a checkpoint pruned elsewhere).
        selection: which rows / columns belong to a head (see :class:`hsr_pl.realign.RealignConfig`).
        utility_calibration / safety_calibration: data-module splits for D^u (benign answers)
            and D^s (aligned refusals; ``safety+over_refusal`` joins image- and text-borne ones).
        num_samples: samples per split (the paper: 128); batch_size: calibration batch size.
        heads: explicit heads (``["0-3", "2-1"]`` or ``[[0, 3], [2, 1]]``), instead of attribution.
        scores_path: a ``{"<layer>-<head>": score}`` file (SafetyHeadAttribution's output or the
            released scripts'); the top ``top_h`` are used.
        output: JSON path for the realignment report (restored counts per module and head).
        when: ``fit_start`` and/or ``validation_start``; realigns once, after the pruner.
        table: print the rich summary table on rank 0.
        **deprecated: the flat method keys of earlier versions (``order``, ``p``, ``q``, ``max_p``,
            ``budget``, ``rounds``, ``scope``, ``utility_weight``, ``preserve_structure``) and
            ``heads_path``; they still work, with one line that shows the new form.
    """

    provides = frozenset({"realignment"})

    def __init__(
        self,
        method: RealignMethod | None = None,
        top_h: int | None = None,
        importance: str = "auto",
        selection: str = "head",
        utility_calibration: str = "utility",
        safety_calibration: str = "safety",
        num_samples: int = 128,
        batch_size: int = 1,
        heads: list[str] | list[list[int]] | None = None,
        scores_path: str | None = None,
        output: str | None = None,
        when: str | list[str] = WHEN,
        table: bool = True,
        **deprecated: Any,
    ) -> None:
        super().__init__(when, error=RealignConfigError)
        method, scores_path = self._upgrade(method, scores_path, _deprecated_keys(**deprecated))
        if method is not None and not isinstance(method, RealignMethod):
            raise RealignConfigError(
                f"method={method!r} is not a realignment method; use hsr_pl.realign.MarginRule or GradientOrder"
            )
        self.method = MarginRule() if method is None else method
        self.importance = importance  # "auto" is resolved in setup, when the pruner is known
        self.config = self.method.realign_config(
            importance="wanda" if importance == "auto" else importance, selection=selection
        )
        self.top_h = None if top_h is None else non_negative_int(
            top_h, "top_h", "or None: use SafetyHeadAttribution's top_h", RealignConfigError
        )
        self.utility_calibration = split_name(utility_calibration, "utility_calibration", error=RealignConfigError)
        self.safety_calibration = split_name(safety_calibration, "safety_calibration", error=RealignConfigError)
        self.num_samples = positive_int(num_samples, "num_samples", "calibration samples per split; the paper: 128",
                                        RealignConfigError)
        self.batch_size = positive_int(batch_size, "batch_size", "calibration batch size", RealignConfigError)
        if heads is not None and scores_path is not None:
            raise RealignConfigError("give heads or scores_path, not both")
        self.heads = None if heads is None else _parse_heads(heads)
        self.scores_path = None if scores_path is None else Path(scores_path)
        self._file_scores: dict[str, float] | None = None
        if self.scores_path is not None:
            if not self.scores_path.is_file():
                raise RealignConfigError(
                    f"scores_path={scores_path!r} does not exist; give a {{\"<layer>-<head>\": score}} JSON file "
                    "(SafetyHeadAttribution's output) or drop it to use the attribution callback's heads"
                )
            self._file_scores = read_scores(self.scores_path)
            if self.top_h is None:
                raise RealignConfigError("scores_path needs top_h: how many of the file's best heads to use")
        self.output = json_output_path(output, "output", "runs/realignment.json", RealignConfigError, look=False)
        self.show_table = bool(table)
        self._dev: list = []  # the dev EvalSets (setup)
        self._judge: str | None = None  # the dev ASR's judge, known after the first dev measurement
        self.dense: DenseMeasurement | None = None
        self.result: RealignResult | None = None
        self.report: dict[str, Any] = {}

    @staticmethod
    def _upgrade(
        method: RealignMethod | None, scores_path: str | None, old: dict[str, Any]
    ) -> tuple[RealignMethod | None, str | None]:
        """The deprecated keys as ``method`` / ``scores_path``, and one line that shows the new form."""
        if not old:
            return method, scores_path
        flat = {k: old[k] for k in FLAT_KEYS if k in old}
        if flat and method is not None:
            raise RealignConfigError(
                f"give method or the deprecated flat keys {sorted(flat)}, not both; move them into method's init_args"
            )
        if "heads_path" in old and scores_path is not None:
            raise RealignConfigError("give scores_path or its deprecated name heads_path, not both")
        news = []
        if flat:
            method = method_from_flat(**flat)
            news.append(method.yaml())
        if "heads_path" in old:
            scores_path = old["heads_path"]
            news.append(f"scores_path: {json.dumps(str(scores_path))}")
        _say_deprecated(
            f"hsr-pl: SafetyRealignment's keys {', '.join(old)} are deprecated and will be removed; write instead: "
            + "; ".join(news)
        )
        return method, scores_path

    # ------------------------------------------------------------------------- settings
    @override
    def settings(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            # As configured: run() may switch it on for N:M masks, which a resumed run must not see as a change.
            "preserve_structure": self.method.preserve_structure,
            "importance_setting": self.importance, "top_h": self.top_h,
            "utility_calibration": self.utility_calibration, "safety_calibration": self.safety_calibration,
            "num_samples": self.num_samples, "batch_size": self.batch_size,
            "heads": None if self.heads is None else [list(h) for h in self.heads],
            "scores_path": None if self.scores_path is None else str(self.scores_path),
            **({"auto": self.method.auto.to_dict()} if self.method.is_auto else {}),
        }

    @override
    def output_paths(self) -> list[str]:
        if self.output is None:
            return []
        return [str(self.output)] + ([str(self._plot_path())] if self.method.is_auto else [])

    def _plot_path(self) -> Path:
        """The automatic budget's plot, beside the report: ``<output stem>_auto.png``."""
        return Path(self.output).with_name(Path(self.output).stem + "_auto.png")

    # ---------------------------------------------------------------------------- heads
    def selected_heads(self, pl_module: pl.LightningModule) -> list[Pair] | None:
        """The heads to realign, best first; None while no source knows them yet."""
        if self.heads is not None:
            return list(self.heads if self.top_h is None else self.heads[: self.top_h])
        if self._file_scores is not None:
            return top_heads(self._file_scores, self.top_h)
        state = get_state(pl_module)
        if self.top_h is not None and state.head_scores:
            return top_heads(state.head_scores, self.top_h)
        if state.top_heads:
            return list(state.top_heads)
        return None

    def _heads_or_error(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Pair]:
        heads = self.selected_heads(pl_module)
        if heads is not None:
            return heads
        if not self.config.needs_heads:
            return []
        raise RealignInputError(
            "SafetyRealignment has no heads: put SafetyHeadAttribution before Pruning in trainer.callbacks, or give "
            "scores_path= (a head-score file) or heads= ['<layer>-<head>', ...]"
        )

    def _check_heads(self, heads: Sequence[Pair], adapter) -> None:
        layers = set(adapter.layer_indices())
        for layer, head in heads:
            if layer not in layers or not 0 <= head < adapter.geometry(layer).num_heads:
                raise RealignInputError(
                    f"head {layer}-{head} does not exist in this model ({len(layers)} self-attention layers); use "
                    "head scores computed for this model"
                )

    # ------------------------------------------------------------------------ the dense pass
    def _batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> list[dict[str, Tensor]]:
        return calibration_batches(
            trainer, split, self.num_samples, owner=f"SafetyRealignment({split})", device=pl_module.device,
            batch_size=self.batch_size,
        )

    def _reduce(self, batches, pl_module, split):
        _, world = dist_world()
        if model_is_sharded(hf_model(pl_module)):
            check_lockstep(
                len(batches), f"SafetyRealignment({split})",
                f"make num_samples a multiple of world_size × batch_size ({world} × {self.batch_size})",
            )
        _, _, weight = check_counts(batches, "response", pl_module.device, split)
        if world == 1:
            return None
        if self.config.importance == "snip":
            return WeightedAllReduce(1.0)  # SNIP's scores are sums over samples, not means
        # Means (Wanda's norms, SparseGPT's Hessians) combine weighted by samples; with one sample per
        # batch Wanda's is replayed in the global sample order: bit for bit one process.
        ordered = (dist_world()[0], world) if self.batch_size == 1 else None
        return WeightedAllReduce(weight, ordered=ordered)

    @override
    def before_pruning(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: Callback) -> None:
        if self._done:
            return
        model = hf_model(pl_module)
        adapter = get_adapter(model)
        heads = self.selected_heads(pl_module)
        if heads is not None:
            self._check_heads(heads, adapter)
        head_free = not self.config.needs_heads
        # A StageEvaluation comparing head-free or random-head baselines needs every layer measured.
        wide = any(cb.needs_all_layers for cb in trainer.callbacks if isinstance(cb, HSRCallback))
        layers = None if head_free or heads is None or wide else sorted({layer for layer, _ in heads})
        start = time.perf_counter()
        with torch.inference_mode(False), eval_mode(model):
            utility = self._batches(trainer, pl_module, self.utility_calibration)
            safety = self._batches(trainer, pl_module, self.safety_calibration)
            self.dense = dense_pass(
                model, adapter, self.config.importance,
                self._progress(trainer, utility, "realignment: utility importance (dense)"),
                self._progress(trainer, safety, "realignment: safety importance (dense)"),
                layers=layers, keep_dense=not isinstance(pruner, MaskHolder) or pruner.changes_kept_weights,
                utility_reduce=self._reduce(utility, pl_module, self.utility_calibration),
                safety_reduce=self._reduce(safety, pl_module, self.safety_calibration),
            )
        if self._dev:
            get_state(pl_module).dev_dense = self._measure(trainer, pl_module, "dense", 0)
            rank_zero_info(f"hsr-pl: dense model on the dev sets: dev ASR {100 * get_state(pl_module).dev_dense.asr:.1f} % "
                           f"[{self._judge}]")
        rank_zero_info(
            f"hsr-pl: realignment measured {self.config.importance} importance of the dense model on "
            f"{len(utility)} utility + {len(safety)} safety batches in {time.perf_counter() - start:.1f} s "
            f"({self.dense.statistic_bytes() / 1024:.1f} KiB of statistics)"
        )

    def _progress(self, trainer: pl.Trainer, batches: list, description: str) -> Iterable:
        if not (trainer.is_global_zero and trainer.progress_bar_callback is not None):
            return batches
        return _with_progress(batches, description)

    # ------------------------------------------------------------------------------ run
    def _pruner(self, trainer: pl.Trainer) -> MaskHolder | None:
        callbacks = list(trainer.callbacks)
        before = mask_holders(callbacks[: callbacks.index(self)])
        return before[-1] if before else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The flow's shape is known before any weight is loaded: refuse a wrong one now.
        super().setup(trainer, pl_module, stage)
        self._check_order(trainer)
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self)
        pruner = self._pruner(trainer)
        if pruner is None and trainer.ckpt_path is None:
            raise RealignInputError(
                "SafetyRealignment has no pruner before it in trainer.callbacks: add Pruning (or PrunedCheckpoint for "
                "a model pruned by another tool) before it"
            )
        if self.importance == "auto" and pruner is not None:
            self.config = replace(self.config, importance=pruner.importance)
        if sharded_strategy(trainer) and (self.config.order == "gradient" or self.config.importance == "snip"):
            raise ShardingError(
                f"SafetyRealignment(method={type(self.method).__name__}, importance={self.config.importance!r}) under "
                "ModelParallelStrategy: weight gradients are not gathered on the sharded path; use method MarginRule "
                "with importance wanda, sparsegpt or magnitude, or strategy ddp"
            )
        if self.config.preserve_structure and pruner is not None and pruner.structure_known_before_pruning \
                and pruner.planned_structure is None:
            raise RealignConfigError(
                "preserve_structure needs N:M masks, but Pruning is unstructured (mask_structure '0:0'); set "
                "Pruning's mask_structure (e.g. '2:4') or drop preserve_structure"
            )
        if self.output is not None:
            protect = [p for p in (self.scores_path, getattr(pl_module, "model_source", None)) if p]
            check_output_file(self.output, "SafetyRealignment output", protect=protect)
        scorers = providers(callbacks[:mine], "head_scores")
        if self.config.needs_heads and self.heads is None and self._file_scores is None and not scorers \
                and trainer.ckpt_path is None:
            raise RealignInputError(
                "SafetyRealignment has no heads: put SafetyHeadAttribution before Pruning in trainer.callbacks, or give "
                "scores_path= (a head-score file) or heads= ['<layer>-<head>', ...]"
            )
        if self.config.needs_heads and self.top_h == 0:
            raise RealignConfigError(
                "SafetyRealignment(top_h=0) selects no heads, so nothing would be restored; give top_h >= 1 (e.g. 10) "
                "or drop it to use SafetyHeadAttribution's top_h"
            )
        self._dev = self._dev_sets(trainer)
        self._check_judge(pl_module)
        handed_on = scorers[-1].heads_handed_on() if scorers else None
        if self.config.needs_heads and self.heads is None and self._file_scores is None and self.top_h is None \
                and handed_on == 0 and trainer.ckpt_path is None:
            raise RealignConfigError(
                f"{type(scorers[-1]).__name__}(top_h=0) only scores the heads and hands none on, so SafetyRealignment "
                "would have no heads; set its top_h (e.g. 10) or give SafetyRealignment a top_h"
            )

    @override
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Head ranges and kept originals, checked on the built model before any HSR work starts."""
        model = hf_model(pl_module)
        adapter = get_adapter(model)
        heads = self.heads if self.heads is not None else (
            top_heads(self._file_scores, self.top_h) if self._file_scores is not None else None
        )
        if heads is not None:
            self._check_heads(heads, adapter)
        total = sum(adapter.geometry(layer).num_heads for layer in adapter.layer_indices())
        if self.top_h is not None and self.top_h > total:
            raise RealignConfigError(f"SafetyRealignment top_h={self.top_h} exceeds the model's {total} attention heads; "
                                     "lower top_h")
        if self.method.is_auto:  # start vs max_budget in weights of this model
            self.method.auto.counts(language_model_parameters(model, adapter))
        pruner = self._pruner(trainer)
        if pruner is None:
            return
        if self.config.order == "gradient" and self.config.scope == "all":
            return  # its scope is whatever has kept originals
        targets, keep = pruner.resolve_targets(model)
        layers = None if heads is None or not self.config.needs_heads else sorted({layer for layer, _ in heads})
        lacking = [n for n in attention_linears(adapter, layers) if n in set(targets) - set(keep)]
        if lacking:
            raise RealignInputError(
                f"{type(pruner).__name__} keeps no original values of {len(lacking)} attention projection(s) that "
                f"realignment may restore (e.g. {lacking[0]!r}); drop its keep_originals (default: q/k/v/o) or make "
                "the regexes cover them"
            )

    # ------------------------------------------------------------------------------ dev
    @property
    def _dev_samples(self) -> int:
        return self.method.auto.dev_samples if isinstance(self.method, GradientOrder) else 64

    def _dev_sets(self, trainer: pl.Trainer) -> list:
        """The data module's dev sets; ``budget: auto`` without them is refused (one line, the fix)."""
        if sharded_strategy(trainer) and not self.method.is_auto:
            return []  # FSDP2: ranks must forward in lockstep; the dev check's generation has no sharded path
        found = dev_sets(getattr(trainer, "datamodule", None), self._dev_samples)
        harmful = [s for s in found if s.kind == "harmful"]
        if self.method.is_auto and not harmful:
            raise RealignConfigError(
                "GradientOrder(budget: auto) stops on dev data, but the data module has no dev part: set "
                "data.init_args.dev_fraction (e.g. 0.2) or dev_num_records, use SyntheticDataModule (its dev_* sets), "
                "or give a fixed budget (e.g. budget: '1‱')"
            )
        return found if harmful else []

    def _check_judge(self, pl_module: pl.LightningModule) -> None:
        """``judge`` must be one of the model's judges (checked by name when they are named plainly)."""
        judge = self.method.auto.judge if self.method.is_auto else None
        specs = list(pl_module.hparams.get("judges") or ["keyword-gcg"])
        if judge is None or not specs or not all(isinstance(j, str) for j in specs):
            return
        if judge not in specs:
            raise RealignConfigError(f"GradientOrder(judge={judge!r}) is not among the model's judges {specs}; add it to "
                                     "model.init_args.judges or drop judge (default: the first)")

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, label: str, restored: int) -> DevPoint:
        """The dev numbers of the model as it is now (every rank gets the same)."""
        start = time.perf_counter()
        datamodule = trainer.datamodule
        loaders = [datamodule.eval_dataloader(s, length_sorted=True) for s in self._dev]
        with torch.inference_mode(False), eval_mode(hf_model(pl_module)):
            rows = dev_headlines(pl_module, loaders)
        judge = self.method.auto.judge if self.method.is_auto else None
        point = point_from_headlines(label, restored, rows, judge)
        point.seconds = round(time.perf_counter() - start, 3)
        self._judge = judge or next(iter(rows))
        return point

    def _check_order(self, trainer: pl.Trainer) -> None:
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self)
        pruners = [i for i, cb in enumerate(callbacks) if isinstance(cb, MaskHolder)]
        if any(i > mine for i in pruners):
            raise RealignInputError(
                "SafetyRealignment comes before the pruner in trainer.callbacks; order them SafetyHeadAttribution, "
                "Pruning (or PrunedCheckpoint), SafetyRealignment"
            )

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_order(trainer)
        model = hf_model(pl_module)
        adapter = get_adapter(model)
        state = get_state(pl_module)
        if not state.pruned:
            raise RealignInputError(
                "SafetyRealignment found no pruning masks: add Pruning (or PrunedCheckpoint for a model pruned by "
                "another tool) before it in trainer.callbacks"
            )
        heads = self._heads_or_error(trainer, pl_module)
        self._check_heads(heads, adapter)
        if self.method.preserve_structure is None and state.structure is not None and not self.config.preserve_structure:
            # N:M masks stay N:M unless the method says preserve_structure: false (sparse kernels need them).
            self.config = replace(self.config, preserve_structure=True)
            rank_zero_info(
                f"hsr-pl: the pruned masks are {state.structure[0]}:{state.structure[1]}; realignment keeps them so "
                "(preserve_structure: false in the method restores freely)"
            )
        if self.dense is None and (self.method.needs_dense or self.config.preserve_structure):
            raise RealignInputError(
                "SafetyRealignment has no dense-model statistics: the pruner ran without it (it measures them when "
                "the pruner announces its first weight change); keep Pruning/PrunedCheckpoint and SafetyRealignment "
                "in the same trainer, the pruner first"
            )
        start = time.perf_counter()
        safety = utility = None
        reduce = count = None
        with torch.inference_mode(False), eval_mode(model):
            if self.config.order == "gradient":
                safety = self._batches(trainer, pl_module, self.safety_calibration)
                if self.config.utility_weight:
                    utility = self._batches(trainer, pl_module, self.utility_calibration)
                if dist_world()[1] > 1:
                    reduce, count = WeightedAllReduce(1.0), _global_count(pl_module.device)
            dev_dense = state.dev_dense if self._dev else None
            if self.method.is_auto and dev_dense is None:
                raise RealignInputError(
                    "GradientOrder(budget: auto) has no dense-model dev numbers: they are measured when the pruner "
                    "announces its first weight change; keep Pruning/PrunedCheckpoint and SafetyRealignment in the same "
                    "trainer, the pruner first"
                )
            pruned_point = self._measure(trainer, pl_module, "pruned", 0) if dev_dense is not None else None
            if self.method.is_auto:
                auto = self.method.auto
                session = RealignSession(
                    model, adapter, state, self.config, heads, dense=self.dense, safety_batches=safety,
                    utility_batches=utility, reduce=reduce, count_batches=count,
                )
                first, most = auto.counts(session.lm_params)
                sizes = schedule(first, auto.growth, most)
                rank_zero_info(f"hsr-pl: automatic budget: rounds to {sizes} restored weights at most; dev ASR "
                               f"[{self._judge}] dense {100 * dev_dense.asr:.1f} %, pruned {100 * pruned_point.asr:.1f} %")
                outcome = auto_realign(
                    session, auto, sizes, lambda label, restored: self._measure(trainer, pl_module, label, restored),
                    dev_dense, pruned_point, log=lambda line: rank_zero_info(f"hsr-pl: automatic budget: {line}"),
                )
                self.result = session.result()
                dev_report = {**outcome.summary(auto, session.lm_params, self.config.scope), "judge": self._judge}
            else:
                self.result = realign_model(
                    model, adapter, state, self.config, heads, dense=self.dense, safety_batches=safety,
                    utility_batches=utility, reduce=reduce, count_batches=count,
                )
                dev_report = None
                if pruned_point is not None:
                    after = self._measure(trainer, pl_module, "realigned", self.result.restored)
                    dev_report = self._dev_check(dev_dense, pruned_point, after)
        as_run = {**self.settings(), "preserve_structure": self.config.preserve_structure}
        self.report = {
            **self.result.summary(),
            "settings": as_run,
            "importance": self.config.importance,
            "calibration": {
                "utility": self.utility_calibration, "safety": self.safety_calibration,
                "num_samples": self.num_samples,
                "utility_samples": self.dense.utility_samples if self.dense else None,
                "safety_samples": self.dense.safety_samples if self.dense else None,
                "seed": getattr(getattr(trainer, "datamodule", None), "seed", None),
            },
            "head_scores": {f"{l_}-{h}": state.head_scores.get(f"{l_}-{h}") for l_, h in heads},
            "wall_s": round(time.perf_counter() - start, 3),
        }
        if dev_report is not None:
            self.report["auto" if self.method.is_auto else "dev_check"] = dev_report
        state.realignment = dict(self.report)
        self._report(trainer)
        # In memory, for whoever re-runs variants from the same pruned weights while it is notified.
        state.realignment_run = RealignmentRun(
            config=self.config, result=self.result, settings=dict(as_run), dense=self.dense,
            calibration=lambda kind: self._batches(
                trainer, pl_module, self.safety_calibration if kind == "safety" else self.utility_calibration
            ),
        )
        notify_stage(trainer, pl_module, "realigned", self)
        # The statistics and the data served their purpose; free them (and the dense copies).
        state.realignment_run = replace(state.realignment_run, dense=None, calibration=None)
        self.dense = None

    def _dev_check(self, dense: DevPoint, pruned: DevPoint, after: DevPoint) -> dict[str, Any]:
        """A fixed budget's one dev check: the numbers, whether the target was met, a warning if not."""
        auto = self.method.auto if isinstance(self.method, GradientOrder) else AutoBudget()
        met = target_reason(after, dense, pruned, auto)
        report = {"judge": self._judge, "dense": dense.to_dict(), "pruned": pruned.to_dict(), "realigned": after.to_dict(),
                  "target_rsr": auto.target_rsr, "target_met": met is not None,
                  "residual": None if met else residual_line(after, dense, pruned, auto, self.config.scope, fixed=True)}
        if met is None and pruned.asr > dense.asr + auto.tolerance_points / 100:
            rank_zero_warn(f"SafetyRealignment dev check [{self._judge}]: {report['residual']}")
        return report

    def _report(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            if self.show_table:
                print_realignment(self.report)
            if self.output is not None:
                write_json_atomic(self.output, self.report)
        if not self.report["restored_params"]:
            rank_zero_warn(
                "SafetyRealignment restored no weight: the rule's candidates inside the heads were all kept by the "
                "pruner. Try MarginRule's p: auto or a larger max_p, more heads, or the GradientOrder method with a budget."
            )
        if not (self.show_table and trainer.is_global_zero):  # the table's caption already says it
            rank_zero_info(f"hsr-pl: realignment {realignment_line(self.report)}")
        if "auto" in self.report:
            lines = auto_lines(self.report["auto"])
            for line in lines[:-1]:
                rank_zero_info(f"hsr-pl: {line}")
            if not self.report["auto"]["stop"]["target_met"]:
                rank_zero_warn(f"SafetyRealignment: {self.report['auto']['residual']}")
            rank_zero_info(f"hsr-pl: automatic budget {lines[-1]}")
            if trainer.is_global_zero and self.output is not None:
                try:
                    save_auto_png(self._plot_path(), self.report["auto"])
                except ImportError:
                    rank_zero_info("hsr-pl: matplotlib not installed; no automatic-budget plot (pip install 'hsr-pl[plot]')")
        for logger in trainer.loggers:
            logger.log_metrics(
                {"realign/restored": self.report["restored_params"], "realign/ratio_lm": self.report["restored_ratio_lm"]},
                step=trainer.global_step,
            )

    # ---------------------------------------------------------------------------- state
    @override
    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report:
            get_state(pl_module).realignment = dict(self.report)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"report": json.loads(json.dumps(self.report))}

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.report = dict(state.get("report", {}))


def _with_progress(batches: list, description: str) -> Iterator:
    with layer_progress(True, description) as step:
        for done, batch in enumerate(batches, 1):
            yield batch
            step(done, len(batches))


def _global_count(device: torch.device):
    def count(local: int) -> int:
        tensor = torch.tensor([float(local)], dtype=torch.float64, device=comm_device(device))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return int(tensor.item())

    return count
