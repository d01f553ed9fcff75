"""``StageEvaluation``: measure the model dense, pruned and realigned in one run, against the
baselines and along a restored-weights curve.

It follows the HSR callbacks' notices (``before_pruning``, ``on_stage("pruned" | "realigned")``),
evaluates with :func:`hsr_pl.evaluation.runner.evaluate`, and re-runs realignment variants
(:func:`hsr_pl.realign.baselines.realign_variant`) from a copy of the pruned weights with what
SafetyRealignment publishes in ``HSRState.realignment_run``; then it puts the realigned model back.
The copies make it a tool for models that fit in memory twice. See docs/realignment.md.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hsr_pl.evaluation.judges import make_judge
from hsr_pl.evaluation.metrics import rise_interval, safety_restoration_rate
from hsr_pl.evaluation.runner import evaluate, headline
from hsr_pl.io import check_output_file
from hsr_pl.models import get_adapter
from hsr_pl.realign import RealignConfigError, RealignInputError, language_model_parameters
from hsr_pl.realign.baselines import (
    BASELINES,
    CURVE_METHODS,
    RENAMED,
    UNBUDGETED,
    left_out_baselines,
    realign_variant,
)
from hsr_pl.report.auto import print_auto_table, save_auto_png
from hsr_pl.report.heads import write_json_atomic
from hsr_pl.report.manifest import after_restoring
from hsr_pl.report.stages import closing_line, print_stage_table, save_curve_png, save_stage_png
from hsr_pl.state import RealignmentRun, get_state
from hsr_pl.validation import choice, positive_int

from ._calibration import layer_progress
from ._common import hf_model
from .base import HSRCallback, providers

__all__ = ["StageEvaluation"]

def pooled_asr(results: Mapping[str, Mapping[str, Any]], judge: str) -> tuple[int, int] | None:
    """Harmful replies judged successful and their number, pooled over the harmful sets."""
    key = f"asr[{judge}]"
    rows = [r for r in results.values() if r["kind"] == "harmful" and r.get(key) is not None and r.get("n")]
    if not rows:
        return None
    return sum(round(r[key] * r["n"]) for r in rows), sum(int(r["n"]) for r in rows)


def measurable_rise(dense: Mapping[str, Any], pruned: Mapping[str, Any], judge: str) -> str | None:
    """None when pruning raised the ASR measurably; else why no restoration rate is given: the rise's 95 %
    interval (Newcombe's hybrid score interval of a difference of proportions) includes 0."""
    before, after = pooled_asr(dense, judge), pooled_asr(pruned, judge)
    if before is None or after is None:
        return None
    rise, low, high = rise_interval(before[0], before[1], after[0], after[1])
    if low > 0:
        return None
    return (f"no measurable rise: pruning moved the ASR [{judge}] by {100 * rise:+.1f} points ({before[0]}/{before[1]} → "
            f"{after[0]}/{after[1]}); its 95 % interval [{100 * low:.1f}, {100 * high:.1f}] (Newcombe) includes 0")


def _rsr(dense: float | None, pruned: float | None, now: float | None) -> float | None:
    if None in (dense, pruned, now):
        return None
    value = safety_restoration_rate(dense, pruned, now)
    return None if value != value else value  # NaN (pruning did not raise ASR) -> None in JSON


def _utility_sets(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted(n for n, r in results.items() if r["kind"] == "utility")


class StageEvaluation(HSRCallback):
    """Evaluate dense / pruned / realigned on the same held-out sets; baselines; the RSR curve.

    Example (with Pruning and SafetyRealignment, all at ``validation_start``)::

        - class_path: hsr_pl.callbacks.StageEvaluation
          init_args: {judge: keyword-gcg-nocase, baselines: true, curve_budgets: [25, 100, 400]}

    Args:
        judge: the headline judge (its rates fill ``asr`` and ``rsr`` in summary.json).
        strict_judge: a second judge whose RSR is reported beside the headline's (None: skip).
        baselines: also run the baselines (``random``, ``random_in_heads``, ``none``, ``whole_heads``,
            ``released_slices``, ``random_heads``, ``margin_rule``; docs/realignment.md) with HSR's
            restored-weight count where that applies; one that makes no sense under HSR's settings
            (``whole_heads`` under ``preserve_structure``) is left out, with its reason in summary.json.
        curve_budgets: budgets (counts) of the restored-weights curve; empty: no curve.
        curve_methods: which methods the curve sweeps (default: HSR and the baselines that take a budget).
        curve_sets: evaluation sets used on the curve (default: the harmful ones).
        baseline_sets: evaluation sets the baselines are measured on (default: all).
        seed: seed of the random baselines.
        output_dir: where summary.json and the plots go (default ``trainer.default_root_dir``).
    """

    supports_sharding = False  # copies / compares whole weights: no FSDP2 path yet

    def __init__(
        self,
        judge: str = "keyword-gcg-nocase",
        strict_judge: str | None = "strict",
        baselines: bool = False,
        curve_budgets: list[int] | None = None,
        curve_methods: list[str] | None = None,
        curve_sets: list[str] | None = None,
        baseline_sets: list[str] | None = None,
        seed: int = 0,
        output_dir: str | None = None,
    ) -> None:
        super().__init__("validation_start", error=RealignConfigError)
        self.judge = judge
        self.strict_judge = strict_judge
        self.baselines = bool(baselines)
        budgets = [positive_int(b, "curve_budgets entry", "a number of weights", RealignConfigError)
                   for b in curve_budgets or []]
        self.curve_budgets = sorted(set(budgets))
        self.curve_methods = [choice(RENAMED.get(m, m), "curve_methods entry", CURVE_METHODS, error=RealignConfigError)
                              for m in curve_methods or CURVE_METHODS]
        self.curve_sets = curve_sets
        self.baseline_sets = baseline_sets
        self.seed = int(seed)
        self.output_dir = output_dir
        self.results: dict[str, Any] = {}
        self._pruned: dict[str, Any] | None = None
        self._run: RealignmentRun | None = None  # SafetyRealignment's hand-over (HSRState.realignment_run)
        self._batches: dict[str, list] = {}  # calibration batches of the gradient-order variants, loaded once
        self._start = time.perf_counter()
        self.summary: dict[str, Any] = {}

    @override
    def settings(self) -> dict[str, Any]:
        return {
            "judge": self.judge, "strict_judge": self.strict_judge, "baselines": self.baselines,
            "curve_budgets": self.curve_budgets, "curve_methods": self.curve_methods, "curve_sets": self.curve_sets,
            "baseline_sets": self.baseline_sets, "seed": self.seed,
        }

    @property
    def needs_all_layers(self) -> bool:
        """SafetyRealignment measures every layer dense when a baseline may restore outside the heads' layers."""
        return self.baselines or (bool(self.curve_budgets) and bool({"none", "random_heads"} & set(self.curve_methods)))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before any work: the flow it follows must be there, and where it writes must be writable.
        super().setup(trainer, pl_module, stage)  # no sharded path: ModelParallelStrategy is refused
        if trainer.world_size > 1:
            raise RealignConfigError(
                f"StageEvaluation evaluates on one process, this run has {trainer.world_size}; run it with "
                "trainer.devices: 1 (the HSR callbacks themselves run under DDP), or drop it"
            )
        callbacks = list(trainer.callbacks)
        if not providers(callbacks, "masks") or not providers(callbacks, "realignment"):
            raise RealignConfigError(
                "StageEvaluation follows a dense -> pruned -> realigned run: put Pruning (or PrunedCheckpoint) and "
                "SafetyRealignment in trainer.callbacks with it"
            )
        folder = Path(self.output_dir or trainer.default_root_dir)
        source = getattr(pl_module, "model_source", None)
        check_output_file(folder / "summary.json", "StageEvaluation output_dir", protect=[source] if source else [])

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # everything happens in the stage notices and at validation end

    # --------------------------------------------------------------------------- helpers
    def _loaders(self, trainer: pl.Trainer, only: Sequence[str] | None = None):
        datamodule = trainer.datamodule
        loaders = datamodule.val_dataloader()
        sets = getattr(datamodule, "eval_sets", [])
        if only is None or len(sets) != len(loaders):
            return loaders
        return [loader for loader, eval_set in zip(loaders, sets) if eval_set.name in only]

    def _evaluate(self, trainer, pl_module, label: str, only=None) -> dict:
        """Evaluate the sets (``only``: these names), with a progress bar over samples on rank 0."""
        loaders = self._loaders(trainer, only)
        sizes = [len(loader.dataset) for loader in loaders if hasattr(getattr(loader, "dataset", None), "__len__")]
        total = sum(sizes) if len(sizes) == len(loaders) else None
        enabled = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with torch.inference_mode(False), layer_progress(enabled, f"evaluation: {label}") as step:
            seen = [0]

            def on_batch(_name: str, replies: int) -> None:
                seen[0] += replies
                step(seen[0], total)

            return evaluate(pl_module, loaders, on_batch=on_batch if step is not None else None)

    def _judges(self, pl_module) -> list[str]:
        names = [make_judge(j, refusal=pl_module.hparams.refusal).name for j in (pl_module.hparams.judges or ["keyword-gcg"])]
        if self.judge not in names:
            raise RealignConfigError(
                f"StageEvaluation(judge={self.judge!r}) is not among the model's judges {names}; add it to "
                "model.init_args.judges"
            )
        return names

    # ------------------------------------------------------------------------ the stages
    @override
    def before_pruning(self, trainer, pl_module, pruner) -> None:
        self._start = time.perf_counter()
        self._judges(pl_module)
        rank_zero_info("hsr-pl: evaluating the dense model")
        self.results["dense"] = self._evaluate(trainer, pl_module, "dense")

    @override
    def on_stage(self, trainer, pl_module, stage: str, source: Callback) -> None:
        if stage == "pruned":
            rank_zero_info("hsr-pl: evaluating the pruned model")
            self.results["pruned"] = self._evaluate(trainer, pl_module, "pruned")
            if self.baselines or self.curve_budgets:
                self._pruned = self._snapshot(pl_module)
        elif stage == "realigned":
            rank_zero_info("hsr-pl: evaluating the realigned model")
            self.results["realigned"] = self._evaluate(trainer, pl_module, "realigned")
            run = get_state(pl_module).realignment_run
            if run is None:
                raise RealignInputError("StageEvaluation heard 'realigned' but HSRState has no realignment_run to compare")
            self._run = replace(run, dense=None, calibration=None)  # what the summary needs later
            if self._pruned is not None:
                realigned = self._snapshot(pl_module)
                try:
                    self._compare(trainer, pl_module, run)
                finally:
                    self._put_back(pl_module, realigned)
                    self._batches = {}

    def _snapshot(self, pl_module) -> dict[str, Any]:
        state = get_state(pl_module)
        modules = dict(hf_model(pl_module).named_modules())
        return {
            "weights": {n: modules[n].weight.detach().clone() for n in state.pruned},
            "state": copy.deepcopy(state.state_dict()),
        }

    def _put_back(self, pl_module, snap: Mapping[str, Any]) -> None:
        modules = dict(hf_model(pl_module).named_modules())
        with torch.no_grad():
            for name, weight in snap["weights"].items():
                modules[name].weight.copy_(weight)
        get_state(pl_module).load_state_dict(copy.deepcopy(snap["state"]))

    # --------------------------------------------------------------------- baselines, curve
    def _variant(self, trainer, pl_module, run: RealignmentRun, name: str, budget: int | None, only=None) -> dict[str, Any]:
        """Realign the pruned model one way, evaluate, and return the counts and results."""
        self._put_back(pl_module, self._pruned)
        model = hf_model(pl_module)
        with torch.inference_mode(False):
            restored = realign_variant(
                model, get_adapter(model), get_state(pl_module), run.config, run.result.heads, name, budget,
                count=run.result.restored, seed=self.seed, dense=run.dense,
                calibration=lambda kind: self._calibration(run, kind),
            )
        label = f"{name}" + ("" if budget is None else f" @ {budget} weights")
        return {"restored_params": restored, "eval": self._evaluate(trainer, pl_module, label, only)}

    def _calibration(self, run: RealignmentRun, kind: str) -> list:
        if kind not in self._batches:  # loaded once for every gradient-order variant
            if run.calibration is None:
                raise RealignInputError("SafetyRealignment published no calibration loader for the gradient-order variants")
            self._batches[kind] = run.calibration(kind)
        return self._batches[kind]

    def _compare(self, trainer, pl_module, run: RealignmentRun) -> None:
        if self.baselines:
            self.results["baselines"] = {}
            self.results["baselines_left_out"] = left_out_baselines(run.config)
            for name in BASELINES:
                if name in self.results["baselines_left_out"]:
                    rank_zero_info(f"hsr-pl: baseline {name} {self.results['baselines_left_out'][name]}")
                    continue
                # whole_heads and the paper's rule restore their own rule's whole set; the others HSR's count
                budget = None if name in UNBUDGETED else run.result.restored
                rank_zero_info(f"hsr-pl: baseline {name}")
                self.results["baselines"][name] = self._variant(trainer, pl_module, run, name, budget,
                                                                only=self.baseline_sets)
        if self.curve_budgets:
            harmful = self.curve_sets or [e.name for e in trainer.datamodule.eval_sets if e.kind == "harmful"]
            self.results["curve"] = {}
            for method in self.curve_methods:
                points = []
                for budget in self.curve_budgets:
                    row = self._variant(trainer, pl_module, run, method, budget, only=harmful)
                    points.append({"budget": budget, **row})
                if method == "margin_rule":  # and its own, unbudgeted point
                    points.append({"budget": None, **self._variant(trainer, pl_module, run, method, None, only=harmful)})
                self.results["curve"][method] = points
                rank_zero_info(f"hsr-pl: curve {method}: {[p['restored_params'] for p in points]}")

    # --------------------------------------------------------------------------- summary
    def _stage(self, results: Mapping[str, Any], judges: Sequence[str]) -> dict[str, Any]:
        top = headline(results, self.judge)
        row = {k: top[k] for k in ("asr", "utility", "over_refusal", "n_harmful", "n_utility")}
        row.update({k: v for k, v in top.items() if k.startswith("asr_")})
        row["judges"] = {j: headline(results, j) for j in judges}
        row["sets"] = results
        return row

    def build_summary(self, trainer, pl_module) -> dict[str, Any]:
        judges = self._judges(pl_module)
        state = get_state(pl_module)
        run = self._run
        if run is None or not {"dense", "pruned", "realigned"} <= set(self.results):
            raise RealignConfigError(
                "StageEvaluation saw no full dense -> pruned -> realigned run: put it with Pruning (or "
                "PrunedCheckpoint) and SafetyRealignment in trainer.callbacks, all acting at validation_start"
            )
        stages = {s: self._stage(self.results[s], judges) for s in ("dense", "pruned", "realigned")}
        dense, pruned = stages["dense"], stages["pruned"]
        model = hf_model(pl_module)
        lm = language_model_parameters(model, get_adapter(model))
        restored = run.result.restored

        no_rise = {j: measurable_rise(self.results["dense"], self.results["pruned"], j) for j in judges}

        def rsr(asr: float | None, judge: str | None = None) -> float | None:
            if no_rise[judge or self.judge]:
                return None  # no ratio for a rise within noise
            if judge is None:
                return _rsr(dense["asr"], pruned["asr"], asr)
            return _rsr(dense["judges"][judge]["asr"], pruned["judges"][judge]["asr"], asr)

        summary: dict[str, Any] = {
            "judge": self.judge, "judges": judges, "model": getattr(pl_module, "model_source", None) or type(model).__name__,
            "method": state.method, "sparsity": state.sparsity, "top_h": len(run.result.heads),
            "heads": [list(h) for h in run.result.heads], "lm_params": lm, "restored_params": restored,
            "restored_ratio_lm": restored / lm, "rsr": rsr(stages["realigned"]["asr"]), "rsr_reason": no_rise[self.judge],
            "sparsity_after_restoring": after_restoring(state)["sparsity"],
            "harmful_sets": [n for n, r in self.results["dense"].items() if r["kind"] == "harmful"],
            "realignment": dict(run.settings),
            **stages,
        }
        for key in ("auto", "dev_check"):  # SafetyRealignment's dev trajectory / dev check (report in HSRState)
            if key in state.realignment:
                summary[key] = state.realignment[key]
        if self.strict_judge and self.strict_judge in judges:
            summary["rsr_strict"] = rsr(stages["realigned"]["judges"][self.strict_judge]["asr"], self.strict_judge)
            summary["rsr_strict_reason"] = no_rise[self.strict_judge]
        if "baselines" in self.results:
            summary["baselines"] = {}
            summary["baselines_left_out"] = dict(self.results.get("baselines_left_out", {}))
            stage_utility = _utility_sets(self.results["dense"])
            for name, row in self.results["baselines"].items():
                top = headline(row["eval"], self.judge)
                sets = _utility_sets(row["eval"])
                summary["baselines"][name] = {
                    "asr": top["asr"], "rsr": rsr(top["asr"]), "restored_params": row["restored_params"],
                    # a mean over other utility sets than the stages' would not compare: left empty
                    "utility": top["utility"] if sets == stage_utility else None, "utility_sets": sets,
                    "over_refusal": top["over_refusal"],
                    "judges": {j: headline(row["eval"], j) for j in judges},
                }
        if "curve" in self.results:
            summary["curve"] = {
                method: [{"budget": p["budget"], "restored_params": p["restored_params"],
                          "asr": headline(p["eval"], self.judge)["asr"],
                          "rsr": rsr(headline(p["eval"], self.judge)["asr"])} for p in points]
                for method, points in self.results["curve"].items()
            }
        summary["wall_s"] = round(time.perf_counter() - self._start, 1)
        return summary

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or "realigned" not in self.results:
            return
        self.summary = self.build_summary(trainer, pl_module)
        folder = Path(self.output_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        print_stage_table(self.summary)
        if "auto" in self.summary:
            print_auto_table(self.summary["auto"])
        try:
            save_stage_png(folder / "stages.png", self.summary)
            if "auto" in self.summary:
                save_auto_png(folder / "auto_budget.png", self.summary["auto"])
            if "curve" in self.summary:
                marks = {"HSR (this run)": (self.summary["restored_params"], self.summary["rsr"] or 0.0)}
                save_curve_png(folder / "restored_weights_curve.png", self.summary["curve"], self.judge, marks)
            self.summary["plots"] = [p.name for p in folder.glob("*.png")]
        except ImportError:
            rank_zero_info("hsr-pl: matplotlib not installed; no PNG plots (pip install 'hsr-pl[plot]')")
        write_json_atomic(folder / "summary.json", json.loads(json.dumps(self.summary, default=float)))
        rank_zero_info(f"hsr-pl: {closing_line(self.summary)}")
        rank_zero_info(f"hsr-pl: summary written to {folder / 'summary.json'}")
