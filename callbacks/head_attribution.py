"""``SafetyHeadAttribution``: score every attention head's safety role (Ships), once.

Orchestration only: the engines are :mod:`hsr_pl.attribution` (scores, DDP split, resume files),
the reports :mod:`hsr_pl.report.heads`. Every rank sees the whole calibration set; under DDP the
heads are split across ranks and the scores all-gathered, so every rank ends with the same top-h
in :class:`hsr_pl.state.HSRState`. See docs/attribution.md.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from hsr_pl.attribution import (
    ABLATION_MODES,
    ENGINES,
    POSITIONS,
    SCORES,
    HeadAttributionError,
    ScoreConfig,
    exact_head_scores,
    gradient_head_scores,
    head_scores,
    naive_head_scores,
    top_heads,
)
from hsr_pl.attribution import resume as partials
from hsr_pl.attribution.naive import lockstep_head_scores
from hsr_pl.attribution.sharding import Pair, assign_heads
from hsr_pl.distributed import ShardingError, full_weight, model_is_sharded, sharded_strategy
from hsr_pl.io import check_output_file
from hsr_pl.models import get_adapter
from hsr_pl.models.adapters import ModelAdapter
from hsr_pl.module import check_finite_parameters
from hsr_pl.report import heads as heads_report
from hsr_pl.report.heads import read_partial, read_scores, write_partial
from hsr_pl.state import get_state, head_key, parse_head_key
from hsr_pl.validation import json_output_path, non_negative_int, positive_int, split_name

from ._calibration import calibration_batches
from ._common import eval_mode, hf_model
from .base import WHEN, HSRCallback

__all__ = ["HeadAttributionError", "SafetyHeadAttribution", "assign_heads"]

# Fraction of exact zeros in the attention projections above which the model "looks pruned".
PRUNED_ZERO_FRACTION = 0.2
_ENGINE_FNS = {"exact": exact_head_scores, "naive": naive_head_scores, "gradient": gradient_head_scores}
# Engine arguments the callback sets itself.
_RESERVED = {"model", "batches", "cfg", "layers", "heads", "progress", "adapter"}


def _check_finite_scores(scores: Mapping[str, float], where: str) -> None:
    """NaN/inf scores are never written (JSON cannot hold them) nor ranked."""
    bad = sorted(k for k, v in scores.items() if not math.isfinite(v))
    if bad:
        raise HeadAttributionError(
            f"head attribution ({where}) gave NaN/inf scores for heads {bad[:6]}{' …' if len(bad) > 6 else ''}: the "
            "model's outputs on the calibration prompts are not finite although its weights are; check the "
            "calibration data (NaN pixel values?) or run the model in float32"
        )


class SafetyHeadAttribution(HSRCallback):
    """Score every attention head by how much ablating it moves the model on harmful prompts.

    Example (first in ``trainer.callbacks``: it scores the dense model)::

        - class_path: hsr_pl.callbacks.SafetyHeadAttribution
          init_args: {score: kl, positions: response, top_h: 10, output: runs/heads/head_scores.json}

    Args:
        score: ``kl`` (Ships, per prompt), ``subspace`` (principal angles of final hidden states)
            or ``reference`` (the released script's column-0 angle, reproduction only).
        positions: ``last`` (the last prompt token) or ``response`` (averaged over the
            teacher-forced aligned refusal as well; ``kl`` only).
        ablation: ``head`` (default: one query head), ``qkv`` (the released scripts; whole KV
            group under GQA), ``zero`` or ``mean``.
        epsilon: the ``head`` / ``qkv`` scale (1e-5).
        r_max: principal angles summed by ``subspace``.
        engine: ``exact`` (naive's scores, faster), ``naive`` (the reference loop) or ``gradient``
            (one forward + backward per batch; ``kl`` only; an estimate).
        engine_kwargs: extra arguments of the engine, e.g. ``{"max_batch_heads": 8}`` (exact) or
            ``{"estimator": "fisher"}`` (gradient).
        calibration: the data module's calibration split (``safety``: harmful image + instruction;
            several may be joined with ``+``).
        num_samples: calibration prompts (the scripts: 128).
        batch_size: calibration batch size (the scripts: 1).
        top_h: how many top heads to select (scripts: 10 for LLaVA-NeXT-Vicuna-7B); 0 means
            "score only": every head is scored and written, none is selected.
        output: JSON path for ``{"<layer>-<head>": score}``; next to it ``<stem>.top.json``,
            ``<stem>.png`` and, while scanning, ``<stem>.partial.json``. None: no files.
        scores_path: load precomputed scores in the released format instead of scanning.
        resume: continue a killed scan from ``<stem>.partial.json`` (refused if the settings,
            calibration data or weights differ).
        when: ``fit_start`` and/or ``validation_start`` (the start of ``trainer.validate``); the
            callback scores once, whichever comes first.
        progress_bar: rich progress bar with ETA on rank 0 (when the trainer shows progress bars).
        heatmap: print the terminal heatmap on rank 0 at the end.
    """

    provides = frozenset({"head_scores"})

    def __init__(
        self,
        score: str = "kl",
        positions: str = "last",
        ablation: str = "head",
        epsilon: float = 1e-5,
        r_max: int = 1,
        engine: str = "exact",
        engine_kwargs: dict[str, Any] | None = None,
        calibration: str = "safety",
        num_samples: int = 128,
        batch_size: int = 1,
        top_h: int = 10,
        output: str | None = None,
        scores_path: str | None = None,
        resume: bool = False,
        when: str | list[str] = WHEN,
        progress_bar: bool = True,
        heatmap: bool = True,
    ) -> None:
        super().__init__(when, error=HeadAttributionError)
        if score not in SCORES:
            raise HeadAttributionError(f"score={score!r} is not one of {SCORES}; 'kl' is Ships' per-prompt score")
        if positions not in POSITIONS:
            raise HeadAttributionError(f"positions={positions!r} is not one of {POSITIONS}")
        if ablation not in ABLATION_MODES:
            raise HeadAttributionError(f"ablation={ablation!r} is not one of {ABLATION_MODES}; 'head' is the default")
        if positions == "response" and score != "kl":
            raise HeadAttributionError(
                f"positions='response' averages the KL over the aligned response; score={score!r} always uses the "
                "last prompt token: drop positions (or use score='kl')"
            )
        if engine not in ENGINES:
            raise HeadAttributionError(f"engine={engine!r} is not one of {ENGINES}; 'exact' gives the naive loop's scores faster")
        if engine == "gradient" and score != "kl":
            raise HeadAttributionError(
                f"engine='gradient' estimates KL scores only; score={score!r} needs engine='exact' (or 'naive')"
            )
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
            raise HeadAttributionError(f"epsilon={epsilon!r} must be a number in [0, 1) (default 1e-5)")
        self.config = ScoreConfig(
            score=score, positions=positions, ablation=ablation, epsilon=float(epsilon),
            r_max=positive_int(r_max, "r_max", "principal angles summed by subspace; default 1", HeadAttributionError),
        )  # validates epsilon as well
        self.engine = engine
        self.engine_kwargs = self._check_engine_kwargs(engine, engine_kwargs)
        self.calibration = split_name(calibration, "calibration", "Ships uses 'safety'", HeadAttributionError)
        self.num_samples = positive_int(num_samples, "num_samples", "calibration prompts; the scripts use 128",
                                        HeadAttributionError)
        self.batch_size = positive_int(batch_size, "batch_size", "1 reproduces the released scripts", HeadAttributionError)
        self.top_h = non_negative_int(top_h, "top_h", "scripts: 10 for LLaVA-NeXT-7B, 4 for LLaMA3-8B", HeadAttributionError)
        self.output = json_output_path(output, "output", "runs/heads/head_scores.json", HeadAttributionError)
        self.scores_path = None if scores_path is None else Path(scores_path)
        self._precomputed: dict[str, float] | None = None
        if self.scores_path is not None:
            if not self.scores_path.is_file():
                raise HeadAttributionError(
                    f"scores_path={str(scores_path)!r} does not exist; give a {{\"<layer>-<head>\": score}} JSON file "
                    "(e.g. the output of an earlier scan) or drop scores_path to scan"
                )
            self._precomputed = read_scores(self.scores_path)
        if resume and self.output is None:
            raise HeadAttributionError("resume=True needs output=<path.json>: the partial results live next to it")
        if resume and self.scores_path is not None:
            raise HeadAttributionError("resume=True and scores_path both given: scores_path skips the scan, so there is nothing to resume")
        self.resume = bool(resume)
        self.progress_bar = bool(progress_bar)
        self.heatmap = bool(heatmap)
        self.scores: dict[str, float] = {}
        self.top: list[Pair] = []
        self._settings: dict[str, Any] = {}
        self._partial: dict[str, float] = {}
        self._rank, self._world = 0, 1  # the trainer's, set when a scan starts

    # ------------------------------------------------------------------------ validation
    @staticmethod
    def _check_engine_kwargs(engine: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        kwargs = dict(kwargs or {})
        params = inspect.signature(_ENGINE_FNS[engine]).parameters
        allowed = sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in _RESERVED)
        for name in kwargs:
            if name not in allowed:
                raise HeadAttributionError(f"engine_kwargs has {name!r}, which engine={engine!r} does not take; it takes {allowed}")
        try:
            json.dumps(kwargs)
        except TypeError:
            raise HeadAttributionError(f"engine_kwargs={kwargs!r} must hold plain JSON values (numbers, strings, booleans)") from None
        return kwargs

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before any work: every output path is test-written, and a resume file must parse."""
        super().setup(trainer, pl_module, stage)
        if sharded_strategy(trainer) and self._precomputed is None and self.engine == "gradient":
            raise ShardingError(
                "SafetyHeadAttribution(engine='gradient') under ModelParallelStrategy: the sharded scan runs the naive "
                "loop in lockstep; use engine='exact' or 'naive' (same scores), or strategy ddp for the gradient engine"
            )
        if self.output is None:
            return
        rank, world = trainer.global_rank, trainer.world_size
        for label, path in (("output", self.output), ("output (top heads)", self.top_path),
                            ("output (heatmap)", self.png_path), ("output (partial)", self.partial_path(rank, world))):
            check_output_file(path, label)
        if self.resume and self._precomputed is None:
            self._check_partials_readable(trainer)

    def _check_partials_readable(self, trainer: pl.Trainer) -> None:
        """Rank 0 parses the partial files now (same error on every rank), not after the data is read."""
        error = None
        if trainer.global_rank == 0:
            try:
                for path in self._partial_files():
                    read_partial(path)
            except ValueError as exc:
                error = str(exc)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise HeadAttributionError(error)

    # ----------------------------------------------------------------------------- paths
    def _sibling(self, suffix: str) -> Path:
        assert self.output is not None
        return self.output.with_name(self.output.stem + suffix)

    @property
    def top_path(self) -> Path | None:
        """``<stem>.top.json``: the top-h heads, best first, with their scores and the settings."""
        return None if self.output is None else self._sibling(".top.json")

    @property
    def png_path(self) -> Path | None:
        return None if self.output is None else self._sibling(".png")

    @override
    def heads_handed_on(self) -> int | None:
        return self.top_h

    @override
    def output_paths(self) -> list[str]:
        if self.output is None:
            return []
        return [str(p) for p in (self.output, self.top_path, self.png_path, self.partial_path()) if p is not None]

    def partial_path(self, rank: int = 0, world: int = 1) -> Path | None:
        """Where this rank keeps its finished layers: ``<stem>.partial.json`` (one process) or
        ``<stem>.partial.rank<r>.json`` under DDP."""
        return None if self.output is None else partials.partial_path(self.output, rank, world)

    def _partial_files(self) -> list[Path]:
        return [] if self.output is None else partials.partial_files(self.output)

    # ----------------------------------------------------------------------- calibration
    def calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Tensor]]:
        """The full calibration set (on every rank: a score is a mean over all of it), tensors only,
        floats in the model's dtype."""
        return calibration_batches(
            trainer, self.calibration, self.num_samples, owner="SafetyHeadAttribution", device=None,
            batch_size=self.batch_size, with_response=self.config.positions == "response", sharded=False,
            dtype=next(hf_model(pl_module).parameters()).dtype, hint="or pass scores_path= to load precomputed scores",
        )

    # ------------------------------------------------------------------ extension points
    def on_layer_scored(self, layer: int, scores: Mapping[str, float]) -> None:
        """Called on every rank after each finished layer: saves the partial file. Override to
        observe progress (call ``super()`` to keep the resume file)."""
        if not all(math.isfinite(v) for v in scores.values()):
            if self._world == 1:
                _check_finite_scores(scores, f"layer {layer}")  # fail now, before more layers are scanned
            return  # never written; under DDP every rank raises together after the all-gather (in run)
        self._partial.update(scores)
        path = self.partial_path(self._rank, self._world)
        if path is not None:
            write_partial(path, self._settings, self._partial)

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank 0: write the output files and print the heatmap. Override to report differently."""
        title = self._title()
        if self.output is not None:
            heads_report.write_scores(self.output, self.scores)
            heads_report.write_json_atomic(self.top_path, {
                "top_h": self.top_h,
                "heads": [list(pair) for pair in self.top],
                "keys": [head_key(*pair) for pair in self.top],
                "scores": [self.scores[head_key(*pair)] for pair in self.top],
                "settings": self._settings or self._describe(),
            })
            try:
                heads_report.save_heatmap_png(self.png_path, self.scores, self.top, title)
            except ImportError:
                rank_zero_info("hsr-pl: matplotlib not installed; no PNG heatmap (pip install 'hsr-pl[plot]')")
        if self.heatmap:
            heads_report.print_heatmap(self.scores, self.top, title)

    # -------------------------------------------------------------------------- checks
    def _expected_keys(self, adapter: ModelAdapter) -> dict[int, list[int]]:
        return {layer: list(range(adapter.geometry(layer).num_heads)) for layer in adapter.layer_indices()}

    def _check_against_model(self, adapter: ModelAdapter) -> dict[int, list[int]]:
        expected = self._expected_keys(adapter)
        total = sum(len(h) for h in expected.values())
        if self.top_h > total:
            raise HeadAttributionError(f"top_h={self.top_h} exceeds the model's {total} attention heads; lower top_h")
        if self._precomputed is not None:
            want = {head_key(layer, h) for layer, heads in expected.items() for h in heads}
            if set(self._precomputed) != want:
                got_layers = sorted({parse_head_key(k)[0] for k in self._precomputed})
                got_heads = max(parse_head_key(k)[1] for k in self._precomputed) + 1
                n_heads = max(len(h) for h in expected.values())
                raise HeadAttributionError(
                    f"scores_path={str(self.scores_path)!r} holds {len(self._precomputed)} scores "
                    f"({len(got_layers)} layers × {got_heads} heads) but the model has {len(expected)} self-attention "
                    f"layers × {n_heads} heads ({len(want)} heads): use scores computed for this model, or drop "
                    "scores_path to scan"
                )
        return expected

    @torch.no_grad()
    def _warn_if_pruned(self, pl_module: pl.LightningModule, adapter: ModelAdapter) -> None:
        zeros = total = 0
        for layer in adapter.layer_indices():
            for proj in adapter.projections(layer).values():
                weight = full_weight(proj)  # gathered one at a time when sharded
                zeros += int((weight == 0).sum())
                total += weight.numel()
        fraction = zeros / max(total, 1)
        pruned_by_us = bool(get_state(pl_module).pruned)
        if fraction >= PRUNED_ZERO_FRACTION or pruned_by_us:
            why = "Pruning already ran" if pruned_by_us else f"{100 * fraction:.0f} % of the attention weights are 0"
            rank_zero_warn(
                f"SafetyHeadAttribution is scoring a model that looks pruned ({why}). HSR scores the dense model: put "
                "SafetyHeadAttribution before Pruning in trainer.callbacks (or pass scores_path=)."
            )

    # ------------------------------------------------------------------------ settings
    def _describe(self) -> dict[str, Any]:
        return {
            "score": self.config.score, "positions": self.config.positions, "ablation": self.config.ablation,
            "epsilon": self.config.epsilon, "r_max": self.config.r_max, "engine": self.engine,
            "engine_kwargs": self.engine_kwargs, "calibration": self.calibration, "batch_size": self.batch_size,
            # The fingerprint records the samples actually used; these record what was asked for.
            "num_samples_requested": self.num_samples, "top_h": self.top_h,
        }

    # ---------------------------------------------------------------------------- resume
    def _resume_state(self, trainer: pl.Trainer) -> dict[str, float]:
        if not self.resume:
            return {}
        payload: tuple[str | None, dict[str, float]] = (None, {})
        if trainer.global_rank == 0:  # one reader; the strategy broadcasts to the others
            try:
                payload = (None, partials.merge_partials(self._partial_files(), self._settings))
            except ValueError as exc:
                payload = (str(exc), {})
        error, scores = trainer.strategy.broadcast(payload, src=0)
        if error is not None:
            raise HeadAttributionError(error)
        if scores:
            rank_zero_info(f"hsr-pl: resuming head attribution: {len(scores)} heads already scored")
        else:
            rank_zero_info("hsr-pl: resume=True but no partial head-attribution file was found; scanning from the start")
        return scores

    # ------------------------------------------------------------------------------ scan
    @contextmanager
    def _progress(self, layers: Sequence[int], depth: int, enabled: bool) -> Iterator[Callable[[int], None]]:
        """Progress over layers; a layer's weight is the number of layers it re-runs, so the ETA
        holds for the exact engine (early layers cost more)."""
        weight = {layer: max(1, depth - layer) for layer in layers}
        if not enabled or not layers:
            yield lambda layer: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[layers]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        done = 0
        with Progress(*columns) as progress:
            task = progress.add_task(
                f"head attribution ({self.config.score}, {self.engine})", total=sum(weight.values()),
                layers=f"0/{len(layers)} layers",
            )

            def advance(layer: int) -> None:
                nonlocal done
                done += 1
                progress.update(task, advance=weight.get(layer, 1), layers=f"{done}/{len(layers)} layers")

            yield advance

    def scan(
        self, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], heads: Sequence[Pair],
        adapter: ModelAdapter, show_progress: bool = False,
    ) -> dict[str, float]:
        """Score ``heads`` of ``model`` (this rank's share) with the configured engine."""
        if not heads:
            return {}
        layers = sorted({layer for layer, _ in heads})
        with self._progress(layers, len(adapter.all_layers()), show_progress) as advance, eval_mode(model):

            def progress(layer: int, scores: dict[str, float]) -> None:
                self.on_layer_scored(layer, scores)
                advance(layer)

            return head_scores(
                model, batches, self.config, engine=self.engine, heads=list(heads), progress=progress,
                adapter=adapter, **self.engine_kwargs,
            )

    def scan_sharded(
        self, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], shares: Sequence[Sequence[Pair]],
        adapter: ModelAdapter, show_progress: bool = False,
    ) -> dict[str, float]:
        """This rank's share on an FSDP2-sharded model: every rank runs every forward (a sharded
        forward is a collective) and ablates its own next head (:func:`lockstep_head_scores`)."""
        mine = shares[self._rank]
        layers = sorted({layer for layer, _ in mine})
        ignored = f"; engine_kwargs {sorted(self.engine_kwargs)} do not apply" if self.engine_kwargs else ""
        rank_zero_info(
            f"hsr-pl: sharded model: engine={self.engine!r} scores with the naive loop in lockstep over "
            f"{len(shares)} ranks (the same scores up to float rounding){ignored}"
        )
        with self._progress(layers, len(adapter.all_layers()), show_progress) as advance, eval_mode(model):

            def progress(layer: int, scores: dict[str, float]) -> None:
                self.on_layer_scored(layer, scores)
                advance(layer)

            return lockstep_head_scores(model, batches, self.config, mine, shares, progress=progress, adapter=adapter)

    def _gather(self, trainer: pl.Trainer, shares: Sequence[Sequence[Pair]], mine: Mapping[str, float]) -> dict[str, float]:
        """Every rank's scores, through the trainer's strategy: each rank knows every share (the
        split is deterministic), so one float64 tensor per rank (exact for Python floats) says it."""
        width = max(len(share) for share in shares)
        if trainer.world_size == 1 or width == 0:  # the same on every rank: all skip or all gather
            return dict(mine)
        local = torch.full((width,), float("nan"), dtype=torch.float64, device=trainer.strategy.root_device)
        for i, pair in enumerate(shares[trainer.global_rank]):
            local[i] = mine[head_key(*pair)]
        gathered = trainer.strategy.all_gather(local).reshape(len(shares), width).cpu()
        return {head_key(*pair): float(gathered[r, i]) for r, share in enumerate(shares) for i, pair in enumerate(share)}

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = hf_model(pl_module)
        adapter = get_adapter(model)
        expected = self._check_against_model(adapter)
        start = time.perf_counter()
        if self._precomputed is not None:
            scores = dict(self._precomputed)
            rank_zero_info(f"hsr-pl: loaded {len(scores)} head scores from {self.scores_path}")
        else:
            check_finite_parameters(model, "SafetyHeadAttribution", "NaN weights make every head score NaN: reload the model")
            self._warn_if_pruned(pl_module, adapter)
            # Grad-enabled tensors even inside validate's inference mode (the gradient engine).
            with torch.inference_mode(False):
                batches = self.calibration_batches(trainer, pl_module)
                self._settings = {**self._describe(), **partials.fingerprint(model, adapter, batches)}
                previous = self._resume_state(trainer)
                self._partial = dict(previous)
                remaining = {
                    layer: [h for h in heads if head_key(layer, h) not in previous] for layer, heads in expected.items()
                }
                self._rank, self._world = trainer.global_rank, trainer.world_size
                shares = assign_heads(remaining, self._world, len(adapter.all_layers()))
                show = self.progress_bar and trainer.is_global_zero and trainer.progress_bar_callback is not None
                if model_is_sharded(model):
                    mine = self.scan_sharded(model, batches, shares, adapter, show_progress=show)
                else:
                    mine = self.scan(model, batches, shares[self._rank], adapter, show_progress=show)
            scores = {**previous, **self._gather(trainer, shares, mine)}
            missing = [head_key(layer, h) for layer, hs in expected.items() for h in hs if head_key(layer, h) not in scores]
            if missing:
                raise HeadAttributionError(f"head attribution finished without scores for {missing[:8]}; please report this")
            _check_finite_scores(scores, "the scan")
        self.scores = {head_key(layer, h): scores[head_key(layer, h)] for layer, hs in expected.items() for h in hs}
        self.top = top_heads(self.scores, self.top_h)
        if self.top_h == 0:
            rank_zero_info("hsr-pl: top_h=0: scoring only, no heads are selected (realignment would restore nothing)")
        self._done = True
        self._publish(pl_module)
        if trainer.is_global_zero:
            self.report(trainer, pl_module)
            if self._precomputed is None:
                for path in self._partial_files():
                    path.unlink(missing_ok=True)
        rank_zero_info(
            f"hsr-pl: head attribution ({self.config.score}, {self.config.positions}, {self.config.ablation}, "
            f"{self.engine}) of {len(self.scores)} heads in {time.perf_counter() - start:.1f} s; top-{self.top_h}: "
            + ", ".join(head_key(*pair) for pair in self.top)
        )

    def _publish(self, pl_module: pl.LightningModule) -> None:
        state = get_state(pl_module)
        state.head_scores = dict(self.scores)
        state.top_heads = list(self.top)

    def _title(self) -> str:
        cfg = self.config
        where = f", {cfg.positions}" if cfg.score == "kl" else ""
        return f"safety-head scores: {cfg.score}{where}, {cfg.ablation} ablation"

    # ----------------------------------------------------------------------------- state
    @override
    def settings(self) -> dict[str, Any]:
        described = {k: v for k, v in self._describe().items() if k != "num_samples_requested"}
        return {
            **described, "num_samples": self.num_samples, "top_h": self.top_h,
            "scores_path": None if self.scores_path is None else str(self.scores_path),
        }

    @override
    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(pl_module)  # restored from a checkpoint: hand the scores on, no rescan

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "head_scores": dict(self.scores),
            "top_heads": [list(pair) for pair in self.top],
            "scan_settings": dict(self._settings),
        }

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.scores = {str(k): float(v) for k, v in state.get("head_scores", {}).items()}
        self.top = [(int(p[0]), int(p[1])) for p in state.get("top_heads", [])]
        self._settings = dict(state.get("scan_settings", {}))
