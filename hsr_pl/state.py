"""The one object through which hsr-pl callbacks hand results to each other.

Every callback reads and writes :class:`HSRState`, reached with :func:`get_state` on the
LightningModule (or any ``nn.Module``); it lives at ``pl_module.hsr_state``. Pruning fills
``pruned`` and ``originals``; SafetyHeadAttribution fills ``head_scores`` and ``top_heads``;
SafetyRealignment fills ``restored``. Tensors are kept on the CPU, compactly: a boolean mask per
pruned linear and the original values at the pruned positions only.

Re-masking during fine-tuning (:meth:`HSRState.apply_masks`, after every optimizer step) keeps a
copy of each trainable linear's keep-mask on the weight's device, packed 8 to a byte, so a step
costs one unpack and one multiply per linear on the device and no host round trip. The copy is
rebuilt when a mask is replaced or changed in place (tensor version counters); changes that
bypass them (``.data``, numpy views) need :meth:`HSRState.invalidate_masks`.

``state_dict`` / ``load_state_dict`` hold the whole state in memory; the Pruning callback puts the
tensors of a checkpoint into a side file (:mod:`hsr_pl.state_file`, :meth:`HSRState.to_tensors`)
so a resumed fit keeps its masks, originals, scores and restorations.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .distributed import is_sharded, local_rows
from .state_file import FORMAT, pack_bits, unpack_bits

if TYPE_CHECKING:  # types only: hsr_pl.realign imports this module
    from .realign import DenseMeasurement, RealignConfig, RealignResult

__all__ = ["HSRState", "RealignmentRun", "get_state", "head_key", "parse_head_key", "tensor_version"]

ATTR = "hsr_state"


def head_key(layer: int, head: int) -> str:
    """``"<layer>-<head>"``, the key format of the released scripts' score JSON."""
    return f"{layer}-{head}"


def parse_head_key(key: str) -> tuple[int, int]:
    try:
        layer, head = key.split("-")
        return int(layer), int(head)
    except ValueError:
        raise ValueError(f"head key {key!r} is not of the form '<layer>-<head>'") from None


@dataclass
class RealignmentRun:
    """What SafetyRealignment hands on in memory (never checkpointed), so a later step can re-run
    realignment variants from the same pruned weights (StageEvaluation's baselines and curve).

    Attributes:
        config: the resolved settings the run used (``importance: auto`` already decided).
        result: its plans, heads and counts.
        settings: the callback's settings, as its report and checkpoints record them.
        dense: the dense-model statistics; set only while the ``realigned`` notice runs.
        calibration: ``calibration("safety" | "utility")`` gives the run's calibration batches
            (loaded on demand); set only while the ``realigned`` notice runs.
    """

    config: RealignConfig
    result: RealignResult
    settings: dict[str, Any]
    dense: DenseMeasurement | None = None
    calibration: Callable[[str], list[dict[str, Tensor]]] | None = None


@dataclass
class HSRState:
    """Masks, originals, head scores and restorations shared by the callbacks.

    Attributes:
        pruned: ``{linear name: bool tensor [out, in]}``, True where the pruner zeroed a weight.
        originals: ``{linear name: 1-D tensor}``, the dense values at ``pruned`` positions, in
            ``pruned.nonzero()`` (row-major) order; kept only for linears realignment may restore.
        restored: ``{linear name: bool tensor [out, in]}``, True where realignment put a pruned
            weight back; re-masking during fit leaves these alone.
        head_scores: ``{"<layer>-<head>": score}``.
        top_heads: the selected ``(layer, head)`` pairs, best first.
        sparsity: the sparsity the pruner targeted (None before pruning).
        method: the pruning method's name.
        structure: ``(N, M)`` when the masks are N:M, None when unstructured.
        realignment: SafetyRealignment's report (restored counts, settings), for the manifest.
        source: what the pruner found (PrunedCheckpoint: the tool's format, recipe, modules pruned
            outside the targets), for the manifest.
        realignment_run: SafetyRealignment's in-memory hand-over (:class:`RealignmentRun`); not
            part of ``state_dict``.
        dev_dense: the dense model's dev numbers (a :class:`hsr_pl.realign.auto.DevPoint`), measured
            once before the pruner's first weight change (in repair mode: the original checkpoint)
            so the automatic budget compares every round with them; in memory only.
    """

    pruned: dict[str, Tensor] = field(default_factory=dict)
    originals: dict[str, Tensor] = field(default_factory=dict)
    restored: dict[str, Tensor] = field(default_factory=dict)
    head_scores: dict[str, float] = field(default_factory=dict)
    top_heads: list[tuple[int, int]] = field(default_factory=list)
    sparsity: float | None = None
    method: str | None = None
    structure: tuple[int, int] | None = None
    realignment: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    realignment_run: RealignmentRun | None = field(default=None, repr=False, compare=False)
    dev_dense: Any = field(default=None, repr=False, compare=False)
    # {name: _DeviceKeep}: packed keep-masks on the weights' devices (see apply_masks).
    _device_keep: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------------------ masks
    def record_pruning(self, name: str, pruned: Tensor, dense_weight: Tensor | None) -> None:
        """Remember that ``name`` was pruned where ``pruned`` is True (and its old values)."""
        mask = pruned.detach().to("cpu", torch.bool)
        self.pruned[name] = mask
        if dense_weight is not None:
            self.originals[name] = dense_weight.detach().to("cpu")[mask].clone()

    def original_weight(self, name: str, pruned_weight: Tensor) -> Tensor:
        """The dense weight of ``name``: ``pruned_weight`` with the originals put back."""
        if name not in self.originals:
            raise KeyError(f"no original values kept for {name!r}; keep_originals must cover it")
        dense = pruned_weight.detach().to("cpu").clone()
        dense[self.pruned[name]] = self.originals[name].to(dense.dtype)
        return dense

    def add_pruned(self, name: str, extra: Tensor, current_weight: Tensor) -> None:
        """Prune ``extra`` entries of ``name`` as well (N:M swaps); their current values become originals.

        Call before zeroing them in the model: ``current_weight`` still holds their values.
        """
        extra = extra.detach().to("cpu", torch.bool)
        if bool((extra & self.pruned[name]).any()):
            raise ValueError(f"{name}: entries to prune are already pruned")
        keep_values = name in self.originals
        dense = self.original_weight(name, current_weight) if keep_values else None
        self.pruned[name] = self.pruned[name] | extra
        if dense is not None:
            self.originals[name] = dense[self.pruned[name]].clone()

    def keep_mask(self, name: str) -> Tensor:
        """Bool mask of entries that may be non-zero: not pruned, or pruned and then restored."""
        keep = ~self.pruned[name]
        if name in self.restored:
            keep = keep | self.restored[name]
        return keep

    @torch.no_grad()
    def apply_masks(self, model: nn.Module, *, only_trainable: bool = False) -> None:
        """Zero every pruned, unrestored weight (after an optimizer step, or after loading).

        Weights that require grad (the ones an optimizer moves, so the ones re-masked every step)
        are masked from a packed keep-mask cached on their device; frozen weights from the CPU
        mask, uncached. ``only_trainable=True`` skips frozen weights: no optimizer step changed
        them since the last full application. Zeros are written as ``weight * keep`` with ``keep``
        in the weight's dtype, bit for bit the multiply of before (a pruned negative weight
        becomes -0.0).
        """
        modules = dict(model.named_modules())
        for name in self.pruned:
            weight = modules[name].weight
            if is_sharded(weight):  # FSDP2: this rank's rows of the keep-mask, on its local shard
                if only_trainable and not weight.requires_grad:
                    continue
                keep = self.keep_mask(name).to(weight.device, weight.dtype)
                weight.to_local().mul_(local_rows(weight, keep))
                continue
            if not weight.requires_grad:
                if not only_trainable:
                    weight.mul_(self.keep_mask(name).to(weight.device, weight.dtype))
                continue
            weight.mul_(self._device_keep_mask(name, weight.device, weight.dtype).view_as(weight))

    def invalidate_masks(self) -> None:
        """Drop the device copies of the keep-masks (after editing a mask behind torch's back)."""
        self._device_keep.clear()

    def _device_keep_mask(self, name: str, device: torch.device, dtype: torch.dtype = torch.bool) -> Tensor:
        """The keep-mask of ``name`` on ``device`` as ``dtype`` (0/1), unpacked from the cache.

        In the weight's dtype, ``weight * keep`` is the same multiply as before, and much faster
        than multiplying by a bool tensor (a mixed-dtype kernel)."""
        pruned, restored = self.pruned[name], self.restored.get(name)
        cached = self._device_keep.get(name)
        if cached is None or not cached.matches(pruned, restored, device):
            keep = self.keep_mask(name)
            cached = _DeviceKeep(pruned, restored, pack_bits(keep).to(device), tuple(keep.shape))
            self._device_keep[name] = cached
        return unpack_bits(cached.packed, cached.shape, dtype)

    # ------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "pruned": dict(self.pruned),
            "originals": dict(self.originals),
            "restored": dict(self.restored),
            "head_scores": dict(self.head_scores),
            "top_heads": [list(h) for h in self.top_heads],
            "sparsity": self.sparsity,
            "method": self.method,
            "structure": None if self.structure is None else list(self.structure),
            "realignment": dict(self.realignment),
            "source": dict(self.source),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pruned = dict(state.get("pruned", {}))
        self.originals = dict(state.get("originals", {}))
        self.restored = dict(state.get("restored", {}))
        self.head_scores = dict(state.get("head_scores", {}))
        self.top_heads = [tuple(h) for h in state.get("top_heads", [])]
        self.sparsity = state.get("sparsity")
        self.method = state.get("method")
        structure = state.get("structure")
        self.structure = None if structure is None else (int(structure[0]), int(structure[1]))
        self.realignment = dict(state.get("realignment", {}))
        self.source = dict(state.get("source", {}))
        self.invalidate_masks()

    def metadata(self) -> dict:
        """The JSON-able part of :meth:`state_dict` (everything but the tensors)."""
        return {k: v for k, v in self.state_dict().items() if k not in _TENSOR_KINDS}

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` for a safetensors side file: masks packed 8 to a byte
        (``pruned/<name>``, ``restored/<name>``), originals as they are (``originals/<name>``)."""
        tensors: dict[str, Tensor] = {}
        shapes: dict[str, dict[str, list[int]]] = {"pruned": {}, "restored": {}}
        for kind in ("pruned", "restored"):
            for name, mask in getattr(self, kind).items():
                tensors[f"{kind}/{name}"] = pack_bits(mask.to("cpu", torch.bool))
                shapes[kind][name] = list(mask.shape)
        for name, values in self.originals.items():
            tensors[f"originals/{name}"] = values.detach().to("cpu").contiguous()
        return tensors, {"format": FORMAT, "shapes": json.dumps(shapes, sort_keys=True)}

    @staticmethod
    def tensors_state(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict:
        """The ``pruned`` / ``restored`` / ``originals`` entries of a state dict, from :meth:`to_tensors`."""
        shapes = json.loads(metadata["shapes"])
        out: dict[str, dict[str, Tensor]] = {kind: {} for kind in _TENSOR_KINDS}
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in out:
                raise ValueError(f"unexpected tensor {key!r} in an HSR state file")
            out[kind][name] = tensor if kind == "originals" else unpack_bits(tensor, shapes[kind][name])
        return out


_TENSOR_KINDS = ("pruned", "originals", "restored")


def tensor_version(tensor: Tensor) -> int | None:
    """The version counter (bumped by every in-place change); None for inference tensors, which
    have none (they can only change inside ``torch.inference_mode``, where nothing trains)."""
    return None if tensor.is_inference() else tensor._version


class _DeviceKeep:
    """A packed keep-mask on a device and what it was built from: weak references and version
    counters of the masks, so replacing one or editing it in place is noticed without holding the
    old one alive."""

    def __init__(self, pruned: Tensor, restored: Tensor | None, packed: Tensor, shape: tuple[int, ...]) -> None:
        self.packed = packed
        self.shape = shape
        self._sources = [(weakref.ref(t), tensor_version(t)) if t is not None else None for t in (pruned, restored)]

    def matches(self, pruned: Tensor, restored: Tensor | None, device: torch.device) -> bool:
        if self.packed.device != device:
            return False
        for tensor, source in zip((pruned, restored), self._sources):
            if (tensor is None) != (source is None):
                return False
            if tensor is not None and (source[0]() is not tensor or source[1] != tensor_version(tensor)):
                return False
        return True


def get_state(module: nn.Module) -> HSRState:
    """The :class:`HSRState` attached to ``module``, created on first use."""
    state = getattr(module, ATTR, None)
    if state is None:
        state = HSRState()
        # object.__setattr__: a dataclass is not an nn.Module attribute Lightning should track.
        object.__setattr__(module, ATTR, state)
    return state
