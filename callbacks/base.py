"""``HSRCallback``: the lifecycle every step of the HSR flow shares.

Pruning, head attribution, realignment and repair each act *once*, at the start of
``trainer.fit`` and/or ``trainer.validate`` (``when=``), in the order of ``trainer.callbacks``.
This base class owns that logic so the callbacks only say what they do:

* ``when`` is validated once, the same way, with the same hint;
* ``run`` is called at the first matching moment, never again (a second ``validate`` or a
  resumed fit finds ``done``); a checkpoint that says ``done`` calls ``on_restored`` instead, so a
  callback can hand its restored results on without redoing the work;
* strategies that restore checkpoints only after ``on_fit_start`` are handled by deferring to
  ``on_train_start``;
* ``state_dict`` carries the callback's *settings*: resuming under changed settings is refused
  with a message that shows what differs, instead of silently keeping the old results;
* ``before_pruning``: a pruner calls :func:`notify_before_pruning` right before its first weight
  change, so a callback that needs the dense model (realignment's importance statistics) can
  measure it even though it comes after the pruner in the list; ``on_stage`` hears when the
  model is ``pruned`` and ``realigned`` (:func:`notify_stage`), so an evaluation can follow it;
* ``preflight``: at the first moment any HSR callback acts, every callback about to act checks
  what needs the built model (head ranges, which originals are kept) — before any of them starts
  its expensive work. ``setup`` is too early for that: Lightning builds the model afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from hsr_pl.distributed import ShardingError, fail_fast, sharded_strategy
from hsr_pl.pruning.errors import PruningConfigError

__all__ = [
    "WHEN",
    "check_one_pruner",
    "HSRCallback",
    "ResumeMismatchError",
    "notify_before_pruning",
    "notify_stage",
    "parse_when",
    "providers",
    "settings_diff",
]

WHEN = ("fit_start", "validation_start")


class ResumeMismatchError(ValueError):
    """A checkpoint was written by a callback with other settings than the one resuming it."""


def parse_when(when: str | list[str] | tuple[str, ...], owner: str, error: type[Exception] = ValueError) -> tuple[str, ...]:
    """``when`` as a tuple of moments out of :data:`WHEN`; ``error`` names the bad value."""
    moments = [when] if isinstance(when, str) else list(when)
    bad = [w for w in moments if w not in WHEN]
    if bad or not moments:
        raise error(f"{owner}(when={when!r}): choose one or both of {list(WHEN)}")
    return tuple(dict.fromkeys(moments))


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so settings compare equal after a checkpoint."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> str:
    """``key: old -> new`` for every setting that differs (the first ``limit``)."""
    old, new = _plain(dict(old)), _plain(dict(new))
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k}: {old.get(k)!r} there -> {new.get(k)!r} now" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"… {len(keys) - limit} more")
    return "; ".join(parts)


def providers(callbacks: Iterable[Callback], what: str) -> list[HSRCallback]:
    """The HSR callbacks among ``callbacks`` that declare they provide ``what`` (see ``provides``)."""
    return [cb for cb in callbacks if isinstance(cb, HSRCallback) and what in cb.provides]


def check_one_pruner(callbacks: Iterable[Callback]) -> None:
    """Refuse two callbacks that fill the pruning masks (Pruning, PrunedCheckpoint): each would
    overwrite the other's masks."""
    pruners = [type(cb).__name__ for cb in providers(callbacks, "masks")]
    if len(pruners) > 1:
        raise PruningConfigError(
            f"trainer.callbacks holds {len(pruners)} pruners ({', '.join(pruners)}); the HSR flow prunes once: keep one "
            "(Pruning's when: [fit_start, validation_start] covers both moments)"
        )


def notify_stage(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, source: Callback) -> None:
    """Tell every other HSR callback that the model just reached ``stage`` (``pruned``, ``realigned``)."""
    for callback in trainer.callbacks:
        if isinstance(callback, HSRCallback) and callback is not source:
            callback.on_stage(trainer, pl_module, stage, source)


def notify_before_pruning(trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: Callback) -> None:
    """Give every other HSR callback its look at the still-dense model (see ``before_pruning``)."""
    for callback in trainer.callbacks:
        if isinstance(callback, HSRCallback) and callback is not pruner:
            callback.before_pruning(trainer, pl_module, pruner)


def _preflight(trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
    """Run ``preflight`` once per moment on every HSR callback that is about to act at it."""
    if trainer is None:  # a callback driven by hand, outside a Trainer
        return
    key = (id(trainer), moment, str(trainer.state.fn))
    for callback in trainer.callbacks:
        if isinstance(callback, HSRCallback) and not callback.done and moment in callback.when \
                and callback._preflight_key != key:
            callback._preflight_key = key
            callback.preflight(trainer, pl_module)


class HSRCallback(Callback):
    """A step of the HSR flow that acts once, at ``fit_start`` and/or ``validation_start``.

    Subclasses implement :meth:`run` and :meth:`settings`; they may override :meth:`on_restored`,
    :meth:`before_pruning` and :meth:`extra_state` / :meth:`load_extra_state`.

    What one callback may ask another is declared here (and, for pruners, on
    :class:`~hsr_pl.callbacks._masks.MaskHolder`); results travel through
    :class:`hsr_pl.state.HSRState`. A callback never probes another for undeclared members.
    """

    #: False for steps that have no sharded (FSDP2) path yet: they refuse ModelParallelStrategy in setup.
    supports_sharding: ClassVar[bool] = True
    #: What this step puts into HSRState: ``masks`` (pruners), ``head_scores`` (attribution),
    #: ``realignment`` (SafetyRealignment). Later steps check their inputs' providers by it.
    provides: ClassVar[frozenset[str]] = frozenset()

    @property
    def needs_all_layers(self) -> bool:
        """True when this step needs realignment's dense statistics of every layer, not only the heads'
        layers (StageEvaluation's head-free and random-head baselines)."""
        return False

    def input_paths(self) -> list[str]:
        """Folders or files this step reads that no output may overwrite (ExportPretrained checks them)."""
        return []

    def heads_handed_on(self) -> int | None:
        """How many top heads this step puts into ``HSRState.top_heads`` (None: not a head step, or
        not known before it runs); SafetyRealignment refuses 0 in setup, before the scan."""
        return None

    def output_paths(self) -> list[str]:
        """Files this step writes during the run; an export folder must not hold them (ExportPretrained
        checks them in setup, since they would make its folder foreign at the end)."""
        return []

    def __init__(self, when: str | list[str] | tuple[str, ...] = WHEN, *, error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.when = parse_when(when, type(self).__name__, error)
        self._done = False
        self._deferred = False
        self._preflight_key: tuple | None = None

    @property
    def done(self) -> bool:
        """True once this callback has acted (or a checkpoint says it had)."""
        return self._done

    # --------------------------------------------------------------------- to override
    def settings(self) -> dict[str, Any]:
        """JSON-able settings that decide this callback's results (checked on resume)."""
        return {}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Do the work (called once)."""
        raise NotImplementedError

    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checkpoint said this callback had acted: hand its restored results on."""

    def before_pruning(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: Callback) -> None:
        """``pruner`` is about to change weights: last chance to measure the model dense."""

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The model is built and no HSR callback has worked yet: refuse what cannot succeed."""

    def on_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, source: Callback) -> None:
        """The model just reached ``stage``: ``pruned`` (after the pruner) or ``realigned``."""

    def extra_state(self) -> dict[str, Any]:
        """What besides ``done`` and ``settings`` goes into Lightning checkpoints."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Counterpart of :meth:`extra_state`."""

    # ---------------------------------------------------------------------------- hooks
    def check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse ModelParallelStrategy (FSDP2) for a step without a sharded path."""
        if not self.supports_sharding and sharded_strategy(trainer):
            raise ShardingError(
                f"{type(self).__name__} has no sharded (FSDP2) path yet: run it with strategy ddp (or one device), "
                "or drop it from trainer.callbacks under ModelParallelStrategy"
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer)
        check_one_pruner(getattr(trainer, "callbacks", ()))

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
        _preflight(trainer, pl_module, moment)
        if self._done:
            self.on_restored(trainer, pl_module)
            return
        if moment in self.when:
            # Multi-rank: a rank that raises makes the others end with its error, not wait forever.
            with fail_fast(type(self).__name__):
                self.run(trainer, pl_module)
            self._done = True
        elif moment == "fit_start":
            rank_zero_warn(
                f"{type(self).__name__}(when={list(self.when)}) acts at the start of trainer.validate only, so this "
                "fit runs without it; add 'fit_start' to `when` to act before fine-tuning."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None and trainer.strategy.restore_checkpoint_after_setup:
            self._deferred = True  # this strategy restores our state only after on_fit_start
            return
        self._step(trainer, pl_module, "fit_start")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            self._step(trainer, pl_module, "fit_start")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING:
            return  # validation inside fit: fit_start decided
        self._step(trainer, pl_module, "validation_start")

    # ---------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self._done, "settings": _plain(self.settings()), **self.extra_state()}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict.get("settings")
        if saved is not None and _plain(saved) != _plain(self.settings()):
            raise ResumeMismatchError(
                f"resume refused: the checkpoint's {type(self).__name__} ran with other settings "
                f"({settings_diff(saved, self.settings())}); resume with the settings it was written with, or "
                "start from the unpruned model without ckpt_path"
            )
        self._done = bool(state_dict.get("done", False))
        self.load_extra_state(state_dict)
