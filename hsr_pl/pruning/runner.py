"""Prune a model's target linears: configuration, validation and the sequential / one-shot drivers.

This is the one entry point the Lightning callback needs (:func:`prune_model`). It knows no
model family: structure comes from the adapter (``hsr_pl.models``), the maths from the
per-method modules. Everything that can be checked is checked before any weight changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hsr_pl.distributed import count_non_finite, full_weight, write_full
from hsr_pl.models import get_adapter

from .errors import CalibrationError, DamagedModelError, PartialPruningError, PruningConfigError
from .gradients import accumulate_gradients
from .magnitude import magnitude_mask
from .masks import UNSTRUCTURED, check_sparsity, parse_nm
from .sequential import capture_layer_inputs, model_inputs, run_layer
from .snip import snip_mask, snip_scores
from .sparsegpt import sparsegpt_prune
from .stats import TOKEN_MODES, HessianStats, RowStats, StatsCollector, TokenSelection, token_mask
from .wanda import wanda_mask

__all__ = ["METHODS", "PruningConfig", "PruningResult", "prune_linear", "prune_model"]

METHODS = ("wanda", "sparsegpt", "magnitude", "snip")
MODES = ("sequential", "oneshot")
_STAT_KIND = {"wanda": "row", "sparsegpt": "hessian"}

Reduce = Callable[[Tensor], Tensor]
OnLayer = Callable[[int, int], None]


@dataclass(frozen=True)
class PruningConfig:
    """What to prune and how (names follow llm-compressor: ``sparsity``, ``mask_structure``).

    Attributes:
        method: ``wanda`` | ``sparsegpt`` | ``magnitude`` | ``snip``.
        sparsity: fraction pruned per row/matrix, in (0, 1). With an N:M structure it must be
            None or N/M (N:M fixes the sparsity).
        mask_structure: ``"0:0"`` unstructured, else ``"N:M"`` with 0 < N < M.
        mode: ``sequential`` (reference default for wanda/sparsegpt) or ``oneshot`` (all
            statistics from one pass over the dense model). None picks the method's default;
            snip and magnitude are always one-shot.
        tokens: ``response`` (labels != -100) or ``all`` (non-padding) tokens feed statistics.
        granularity: magnitude and wanda: ``row`` (default) or ``matrix``. Magnitude ``matrix`` is
            the reference pruner's rule (prune every score ``<=`` the threshold); Wanda ``matrix``
            ranks |W|·sqrt(a) over the whole matrix as torchao's ``WandaSparsifier`` does (exactly
            ``floor(numel * s)`` pruned, ties to the lower row-major index).
        blocksize, percdamp: SparseGPT's column block and relative damping (reference 128, 0.01).
    """

    method: str = "wanda"
    sparsity: float | None = 0.5
    mask_structure: str | tuple[int, int] = "0:0"
    mode: str | None = None
    tokens: str = "response"
    granularity: str = "row"
    blocksize: int = 128
    percdamp: float = 0.01
    nm: tuple[int, int] = field(init=False, default=UNSTRUCTURED)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruningConfigError(f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        nm = parse_nm(self.mask_structure)
        object.__setattr__(self, "nm", nm)
        if nm == UNSTRUCTURED:
            if self.sparsity is None:
                raise PruningConfigError("unstructured pruning needs sparsity in (0, 1), e.g. sparsity=0.5")
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        elif self.sparsity is not None and abs(float(self.sparsity) - nm[0] / nm[1]) > 1e-9:
            raise PruningConfigError(
                f"sparsity={self.sparsity} conflicts with mask_structure={nm[0]}:{nm[1]}, which prunes exactly "
                f"{nm[0] / nm[1]:g}; set sparsity=None (or {nm[0] / nm[1]:g})"
            )
        mode = self.mode
        if mode is None:
            mode = "sequential" if self.method in _STAT_KIND else "oneshot"
        if mode not in MODES:
            raise PruningConfigError(f"mode={self.mode!r} is unknown; use 'sequential' or 'oneshot'")
        if mode == "sequential" and self.method not in _STAT_KIND:
            raise PruningConfigError(
                f"method={self.method!r} has no sequential mode (it needs {'no data' if self.method == 'magnitude' else 'whole-model gradients'}); "
                "use mode='oneshot' or leave mode unset"
            )
        object.__setattr__(self, "mode", mode)
        if self.tokens not in TOKEN_MODES:
            raise PruningConfigError(f"tokens={self.tokens!r} is unknown; use 'response' or 'all'")
        if self.granularity not in ("row", "matrix"):
            raise PruningConfigError(f"granularity={self.granularity!r} is unknown; use 'row' or 'matrix'")
        if self.granularity == "matrix" and self.method not in ("magnitude", "wanda"):
            raise PruningConfigError(
                f"granularity='matrix' applies to magnitude and wanda only; {self.method} selects as its reference does"
            )
        if self.granularity == "matrix" and nm != UNSTRUCTURED:
            raise PruningConfigError(
                f"granularity='matrix' ranks the whole matrix, mask_structure={nm[0]}:{nm[1]} ranks within groups of "
                f"{nm[1]}; drop one of them (granularity: row with N:M)"
            )
        if int(self.blocksize) <= 0 or (self.method == "sparsegpt" and nm != UNSTRUCTURED and self.blocksize % nm[1]):
            raise PruningConfigError(
                f"blocksize={self.blocksize} must be positive (and for SparseGPT N:M a multiple of M); use 128"
            )
        if not self.percdamp > 0:
            raise PruningConfigError(f"percdamp={self.percdamp} must be > 0; the reference uses 0.01")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"


@dataclass
class PruningResult:
    """Masks (True = pruned, CPU bool ``[out, in]``), dense originals where asked, diagnostics."""

    masks: dict[str, Tensor] = field(default_factory=dict)
    originals: dict[str, Tensor] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    tokens: int = 0
    percdamp: dict[str, float] = field(default_factory=dict)

    def sparsity(self) -> float:
        """Pruned fraction over all pruned linears' weights."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)


# ------------------------------------------------------------------------------------ helpers
def _select_targets(adapter, targets: Iterable[str] | None) -> dict[str, nn.Linear]:
    available = adapter.target_linears()
    if targets is None:
        return available
    names = list(targets)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise PruningConfigError(
            f"targets {unknown[:3]}{'...' if len(unknown) > 3 else ''} are not decoder-layer linears of this "
            f"model; pick names from adapter.target_linears() (e.g. {next(iter(available), '?')!r})"
        )
    return {n: available[n] for n in names}


def _validate(config: PruningConfig, targets: Mapping[str, nn.Linear], keep_originals: Iterable[str]) -> set[str]:
    if not targets:
        raise PruningConfigError("no linears to prune: the target list is empty")
    if config.nm != UNSTRUCTURED:
        bad = [f"{n} (in_features={lin.in_features})" for n, lin in targets.items() if lin.in_features % config.nm[1]]
        if bad:
            raise PruningConfigError(
                f"mask_structure {config.nm[0]}:{config.nm[1]} needs in_features divisible by {config.nm[1]}: "
                f"{', '.join(bad[:3])}; exclude them from targets or choose another M"
            )
    keep = set(keep_originals)
    missing = keep - set(targets)
    if missing:
        raise PruningConfigError(f"keep_originals names {sorted(missing)[:3]} are not among the pruned targets")
    return keep


@torch.no_grad()
def _check_finite_weights(model: nn.Module) -> None:
    """NaN/inf anywhere in the model would poison every statistic (and magnitude would keep NaN
    weights silently): refuse before any weight changes, naming the parameter."""
    for name, param in model.named_parameters():
        bad = count_non_finite(param)
        if bad:
            raise DamagedModelError(
                f"weight {name} holds {bad} NaN/inf value(s) before pruning; the model is damaged: reload or "
                "re-export it (pruning would keep or spread them)"
            )


@torch.no_grad()
def prune_linear(
    linear: nn.Linear,
    config: PruningConfig,
    stat: RowStats | HessianStats | Tensor | None = None,
    *,
    consume: bool = False,
    weight: Tensor | None = None,
) -> tuple[Tensor, float | None]:
    """Prune one linear in place from its statistic; return its mask (device of the weight).

    ``stat`` is a :class:`RowStats` (wanda), :class:`HessianStats` (sparsegpt), a summed SNIP score
    tensor (snip) or None (magnitude). The second value is SparseGPT's damping (else None).
    ``consume=True``: the statistic is not needed afterwards, so SparseGPT may use its Hessian as
    workspace (no copies of it, as in the reference). ``weight``: the linear's full weight when
    the caller already holds it (:func:`hsr_pl.distributed.full_weight`); a sharded weight's mask is
    decided on the full weight, identically on every rank, and written back into the local rows.
    """
    if weight is None:
        weight = full_weight(linear)
    if config.method == "wanda":
        mask = wanda_mask(weight, stat.scaler_row, config.sparsity, config.nm, config.granularity)
    elif config.method == "magnitude":
        mask = magnitude_mask(weight, config.sparsity, config.nm, config.granularity)
    elif config.method == "snip":
        mask = snip_mask(stat, config.sparsity, config.nm)
    else:
        result = sparsegpt_prune(
            weight, stat.H, config.sparsity, config.nm, blocksize=config.blocksize, percdamp=config.percdamp,
            overwrite_hessian=consume,
        )
        weight.copy_(result.weight)
        write_full(linear, weight)
        return result.mask, result.percdamp
    weight[mask] = 0
    write_full(linear, weight)
    return mask, None


def _record(result: PruningResult, name: str, weight: Tensor, keep: set[str]) -> None:
    if name in keep:
        result.originals[name] = weight.detach().to("cpu").clone()


def _wrap(exc: BaseException, done: list[int]) -> BaseException:
    if not done:
        return exc
    return PartialPruningError(f"{type(exc).__name__}: {exc}", done)


# ------------------------------------------------------------------------------------ drivers
def prune_model(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]] | None,
    config: PruningConfig,
    *,
    adapter=None,
    targets: Iterable[str] | None = None,
    keep_originals: Iterable[str] = (),
    on_layer: OnLayer | None = None,
    reduce: Reduce | None = None,
) -> PruningResult:
    """Prune ``model``'s target linears in place and return the masks.

    Args:
        model: an HF model that :func:`hsr_pl.models.get_adapter` understands.
        batches: calibration batches (dicts ready for ``model(**batch)``, with ``labels`` for
            ``tokens='response'`` and for snip); iterated exactly once. Unused by magnitude.
        targets: qualified names to prune (default: ``adapter.target_linears()``, all of them).
        keep_originals: names whose dense weights are returned in ``result.originals``.
        on_layer: called as ``on_layer(done, total)`` after each decoder layer (progress bars).
        reduce: applied to every statistic tensor before masks are chosen (DDP all_reduce, sum or
            mean). Identity by default.
    """
    if adapter is None:
        adapter = get_adapter(model)
    chosen = _select_targets(adapter, targets)
    keep = _validate(config, chosen, keep_originals)
    _check_finite_weights(model)
    if config.needs_data and batches is None:
        raise CalibrationError(f"method={config.method!r} needs calibration batches; pass a dataloader")
    if config.method == "magnitude":
        return _prune_without_data(adapter, chosen, config, keep, on_layer)
    if config.method == "snip":
        return _prune_snip(model, adapter, batches, chosen, config, keep, on_layer, reduce)
    if config.mode == "sequential":
        return _prune_sequential(model, adapter, batches, chosen, config, keep, on_layer, reduce)
    return _prune_oneshot(model, adapter, batches, chosen, config, keep, on_layer, reduce)


def _ordered(reduce: Reduce | None) -> bool:
    """True when ``reduce`` replays Wanda's terms in the global order (so the hooks keep them)."""
    return getattr(reduce, "ordered", None) is not None


def _by_layer(adapter, chosen: Mapping[str, nn.Linear]) -> dict[int, dict[str, nn.Linear]]:
    out: dict[int, dict[str, nn.Linear]] = {}
    for name, lin in chosen.items():
        out.setdefault(adapter.locate(name)[0], {})[name] = lin
    return dict(sorted(out.items()))


def _prune_layer(
    linears: Mapping[str, nn.Linear], stats: dict, config: PruningConfig, keep: set[str], result: PruningResult
) -> None:
    """Prune ``linears`` one by one; each statistic leaves ``stats`` (and memory) once it is used,
    as the reference frees each linear's Hessian right after pruning it."""
    for name, lin in linears.items():
        weight = full_weight(lin)  # gathered once (sharded): for the originals and the mask
        _record(result, name, weight, keep)
        mask, damp = prune_linear(lin, config, stats.pop(name, None) if stats else None, consume=True, weight=weight)
        del weight
        result.masks[name] = mask.detach().to("cpu")
        if damp is not None:
            result.percdamp[name] = damp


def _prune_groups(adapter, chosen, stats: Mapping, config, keep, result: PruningResult, on_layer) -> PruningResult:
    """Prune layer by layer from finished statistics (one-shot, SNIP, magnitude)."""
    groups = _by_layer(adapter, chosen)
    for pos, (layer, linears) in enumerate(groups.items()):
        try:
            _prune_layer(linears, stats, config, keep, result)
        except Exception as exc:
            raise _wrap(exc, result.layers) from exc
        result.layers.append(layer)
        if on_layer is not None:
            on_layer(pos + 1, len(groups))
    return result


def _prune_without_data(adapter, chosen, config, keep, on_layer) -> PruningResult:
    return _prune_groups(adapter, chosen, {}, config, keep, PruningResult(), on_layer)


def _prune_sequential(model, adapter, batches, chosen, config, keep, on_layer, reduce) -> PruningResult:
    if adapter.other_layer_indices():
        raise NotImplementedError(
            f"sequential pruning runs decoder layers one by one, and layers {adapter.other_layer_indices()} are "
            "not self-attention layers (e.g. Mllama cross-attention, which the decoder skips on text-only "
            "batches); use mode='oneshot' for this model"
        )
    layers = adapter.all_layers()
    groups = _by_layer(adapter, chosen)
    last = max(groups)
    # Every layer's own arguments (Gemma3 & co. give sliding and full layers different masks),
    # recorded without computing the layers where the decoder builds them from the batch.
    inputs = capture_layer_inputs(
        model, list(layers)[: last + 1], batches, config.tokens,
        run_layers=not adapter.layer_arguments_from_batch,
    )
    tokens = sum(int(i.mask.sum()) for i in inputs if i.mask is not None)
    if not inputs or tokens == 0:
        raise CalibrationError(
            f"zero calibration tokens ({len(inputs)} batches) with tokens={config.tokens!r}; pass batches whose "
            "labels mark a response (with_response=True) or use tokens='all'"
        )
    result = PruningResult(tokens=tokens)
    selection = TokenSelection()
    for index in range(last + 1):
        layer = layers[index]
        try:
            linears = groups.get(index)
            if linears:
                collector = StatsCollector(linears, _STAT_KIND[config.method], selection, record=_ordered(reduce))
                with collector:
                    run_layer(layer, index, inputs, selection, outputs="none")
                stats = collector.finalize(reduce)
                _prune_layer(linears, stats, config, keep, result)
                del collector, stats
                result.layers.append(index)
            if index < last:
                run_layer(layer, index, inputs, outputs="replace")
        except Exception as exc:
            raise _wrap(exc, result.layers) from exc
        if on_layer is not None:
            on_layer(index + 1, last + 1)
    return result


@torch.no_grad()
def _prune_oneshot(model, adapter, batches, chosen, config, keep, on_layer, reduce) -> PruningResult:
    device = model.get_input_embeddings().weight.device
    selection = TokenSelection()
    collector = StatsCollector(chosen, _STAT_KIND[config.method], selection, record=_ordered(reduce))
    with collector:
        for batch in batches:
            selection.set(token_mask(batch, config.tokens))
            model(**model_inputs(batch, device))
    selection.set(None)
    stats = collector.finalize(reduce)
    result = PruningResult(tokens=max(s.ntokens for s in stats.values()))
    return _prune_groups(adapter, chosen, stats, config, keep, result, on_layer)


def _prune_snip(model, adapter, batches, chosen, config, keep, on_layer, reduce) -> PruningResult:
    def snip(linear: nn.Linear, grad: Tensor) -> Tensor:
        return snip_scores(linear.weight, grad)

    scores, _, tokens = accumulate_gradients(model, batches, chosen, snip, reduce, what="SNIP scores")
    if tokens == 0:
        raise CalibrationError("snip: zero response tokens in the calibration batches; pass batches with labels")
    return _prune_groups(adapter, chosen, scores, config, keep, PruningResult(tokens=tokens), on_layer)
