"""The one object through which hsr-pl callbacks hand results to each other.

Every callback reads and writes :class:`HSRState`, reached with :func:`get_state` on the
LightningModule (or any ``nn.Module``); it lives at ``pl_module.hsr_state``. Pruning fills
``pruned`` and ``originals``; SafetyHeadAttribution fills ``head_scores`` and ``top_heads``;
SafetyRealignment fills ``restored``. Tensors are kept on the CPU, compactly: a boolean mask per
pruned linear and the original values at the pruned positions only.

``state_dict`` / ``load_state_dict`` make it part of Lightning checkpoints (through the callbacks'
own state), so a resumed fit keeps its masks, originals, scores and restorations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["HSRState", "get_state", "head_key", "parse_head_key"]

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
    def apply_masks(self, model: nn.Module) -> None:
        """Zero every pruned, unrestored weight (after an optimizer step, or after loading)."""
        modules = dict(model.named_modules())
        for name in self.pruned:
            weight = modules[name].weight
            weight.mul_(self.keep_mask(name).to(weight.device, weight.dtype))

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


def get_state(module: nn.Module) -> HSRState:
    """The :class:`HSRState` attached to ``module``, created on first use."""
    state = getattr(module, ATTR, None)
    if state is None:
        state = HSRState()
        # object.__setattr__: a dataclass is not an nn.Module attribute Lightning should track.
        object.__setattr__(module, ATTR, state)
    return state
