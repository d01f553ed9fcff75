"""Model-family adapters: the one place that knows where things live inside an LVLM.

Every algorithm in hsr-pl talks to a model through a :class:`ModelAdapter`: which decoder layers
exist, which linears are the attention projections and the MLP, how many query / key-value heads
there are, and which module's output carries a head's query states (before RoPE). Adding a model
family means subclassing :class:`ModelAdapter`, overriding what differs, and decorating the class
with :func:`register_adapter`; nothing outside this package branches on the family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

__all__ = [
    "HeadGeometry",
    "ModelAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "supported_families",
]


class UnsupportedModelError(ValueError):
    """Raised for an architecture that no registered adapter understands."""


@dataclass(frozen=True)
class HeadGeometry:
    """Head layout of one self-attention layer (notation: H, H_kv, d_h, g = H / H_kv)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"invalid head geometry {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """g = H / H_kv query heads share one key/value head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def kv_group(self, head: int) -> int:
        """The key/value head that query head ``head`` reads."""
        return head // self.group_size

    def query_slice(self, head: int) -> slice:
        """Rows of q_proj (and columns of o_proj) that belong to query head ``head``."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def kv_slice(self, head: int) -> slice:
        """Rows of k_proj / v_proj that query head ``head`` reads (its KV group)."""
        g = self.kv_group(head)
        return slice(g * self.head_dim, (g + 1) * self.head_dim)


def split_heads(states: Tensor, num_heads: int, head_dim: int, *, head_major: bool | None = None) -> Tensor:
    """View per-head states as ``[..., seq, num_heads, head_dim]``; in-place edits reach ``states``.

    Three layouts occur at the adapters' hook points: the flat output of a q/k/v projection
    (``[..., seq, H * d_h]``, LLaMA and most families), token-major split states
    (``[..., seq, H, d_h]``) and head-major split states (``[batch, H, seq, d_h]``: Gemma3's
    ``q_norm``/``k_norm`` run after the transpose). ``head_major`` says which split layout
    ``states`` has; left ``None`` it is read from the shape, and a shape that fits both split
    layouts (seq == H) raises instead of guessing -- pass ``head_major`` or use the adapter's
    :meth:`ModelAdapter.query_heads`, which knows its family's layout.
    """
    shape = tuple(states.shape)
    token_major_fits = len(shape) >= 2 and shape[-2:] == (num_heads, head_dim)
    head_major_fits = len(shape) >= 3 and shape[-3] == num_heads and shape[-1] == head_dim
    if shape and shape[-1] == num_heads * head_dim and not token_major_fits and not head_major:
        return states.view(*shape[:-1], num_heads, head_dim)
    if head_major is None:
        if token_major_fits and head_major_fits:
            raise ValueError(
                f"states of shape {shape} fit both [..., seq, {num_heads}, {head_dim}] and "
                f"[batch, {num_heads}, seq, {head_dim}]; pass head_major=True/False or use "
                "adapter.query_heads(layer, states)"
            )
        head_major = head_major_fits and not token_major_fits
    if head_major and head_major_fits:
        return states.transpose(-3, -2)
    if not head_major and token_major_fits:
        return states
    raise ValueError(
        f"cannot split states of shape {shape} into {num_heads} heads of {head_dim} (head_major={head_major})"
    )


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` answer for the ``model_type`` values it lists."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__} lists no model_types")
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_families() -> dict[str, list[str]]:
    """``{family: [model_type, ...]}`` for every registered adapter."""
    out: dict[str, list[str]] = {}
    for model_type, cls in sorted(_REGISTRY.items()):
        out.setdefault(cls.family, []).append(model_type)
    return out


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (an HF ``PreTrainedModel``), chosen by ``config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        families = ", ".join(f"{fam} ({', '.join(types)})" for fam, types in supported_families().items())
        raise UnsupportedModelError(
            f"no hsr-pl adapter for model_type={model_type!r} ({type(model).__name__}). "
            f"Supported: {families}. To add one, subclass hsr_pl.models.ModelAdapter, override what "
            "differs (decoder path, projection names, query hook) and decorate it with "
            "@hsr_pl.models.register_adapter; see docs/adapters.md."
        )
    return _REGISTRY[model_type](model)


class ModelAdapter:
    """Answers every structural question about one loaded model.

    The default implementation fits LLaMA-style decoders (``self_attn.{q,k,v,o}_proj`` and
    ``mlp.{gate,up,down}_proj``) reached through ``model.get_decoder()``; families override the
    class attributes or methods that differ.

    Layer indices are positions in ``decoder.layers``; for models that interleave other layer
    types (Mllama's cross-attention layers) those positions are skipped by
    :meth:`layer_indices` but keep their numbering, so ``"<layer>-<head>"`` keys stay stable.
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    attention_attr: ClassVar[str] = "self_attn"
    mlp_attr: ClassVar[str] = "mlp"
    projection_names: ClassVar[dict[str, str]] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    mlp_names: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj", "down_proj")
    # Module (relative to the attention module) whose *output* holds the query / key states of
    # every head after any per-head norm and before RoPE. Gemma3 overrides with q_norm / k_norm.
    query_states_name: ClassVar[str] = "q_proj"
    key_states_name: ClassVar[str] = "k_proj"
    # Layout of those modules' outputs when already split per head: False -> [..., seq, H, d_h]
    # (or flat [..., seq, H*d_h]); True -> [batch, H, seq, d_h] (Gemma3's norms).
    states_head_major: ClassVar[bool] = False
    # True when the decoder builds every layer's keyword arguments (masks, rotary embeddings) from
    # the batch before its layer loop, so sequential pruning may record them without computing any
    # layer. A decoder that derives them from an earlier layer's output must say False.
    layer_arguments_from_batch: ClassVar[bool] = True
    # Attribute names of the vision tower and the projector, looked up on the model and on its
    # inner ``model``; FSDP2 wraps each as a unit of its own (generate calls them outside the
    # root's forward). A family that names them otherwise overrides these.
    vision_tower_attrs: ClassVar[tuple[str, ...]] = ("vision_tower", "vision_model", "visual")
    projector_attrs: ClassVar[tuple[str, ...]] = ("multi_modal_projector", "mm_projector", "connector")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._names = {id(m): n for n, m in model.named_modules()}

    # ----------------------------------------------------------------------------- structure
    def decoder(self) -> nn.Module:
        """The language model's decoder stack (holds ``.layers``)."""
        return self.model.get_decoder()

    def all_layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def _find(self, attrs: tuple[str, ...]) -> nn.Module | None:
        for attr in attrs:
            for owner in (self.model, getattr(self.model, "model", None)):
                candidate = getattr(owner, attr, None) if owner is not None else None
                if isinstance(candidate, nn.Module):
                    return candidate
        return None

    def vision_tower(self) -> nn.Module | None:
        """The vision encoder (None for a text-only model)."""
        return self._find(self.vision_tower_attrs)

    def projector(self) -> nn.Module | None:
        """The module that maps vision features into the decoder's space (None when there is none)."""
        return self._find(self.projector_attrs)

    def is_self_attention_layer(self, layer: nn.Module) -> bool:
        return hasattr(layer, self.attention_attr)

    def layer_indices(self) -> list[int]:
        """Indices (into ``decoder.layers``) of the self-attention decoder layers."""
        return [i for i, layer in enumerate(self.all_layers()) if self.is_self_attention_layer(layer)]

    def other_layer_indices(self) -> list[int]:
        """Decoder layers that are not self-attention layers (e.g. Mllama cross-attention)."""
        return [i for i, layer in enumerate(self.all_layers()) if not self.is_self_attention_layer(layer)]

    def layer(self, index: int) -> nn.Module:
        return self.all_layers()[index]

    def attention(self, index: int) -> nn.Module:
        return getattr(self.layer(index), self.attention_attr)

    def projections(self, index: int) -> dict[str, nn.Linear]:
        """``{"q", "k", "v", "o"} -> nn.Linear`` of layer ``index``."""
        attn = self.attention(index)
        return {key: getattr(attn, name) for key, name in self.projection_names.items()}

    def mlp(self, index: int) -> dict[str, nn.Linear]:
        block = getattr(self.layer(index), self.mlp_attr)
        return {name: getattr(block, name) for name in self.mlp_names}

    def linears(self, index: int) -> dict[str, nn.Linear]:
        """Every prunable linear of layer ``index``, attention first, keyed by short name."""
        out = {self.projection_names[k]: v for k, v in self.projections(index).items()}
        out.update(self.mlp(index))
        return out

    def query_states_module(self, index: int) -> nn.Module:
        """Its forward output holds the query states of all heads (pre-RoPE).

        Read it through :meth:`query_heads` (or :func:`split_heads`) to get ``[..., seq, H, d_h]``.
        """
        return getattr(self.attention(index), self.query_states_name)

    def key_states_module(self, index: int) -> nn.Module:
        return getattr(self.attention(index), self.key_states_name)

    def value_states_module(self, index: int) -> nn.Module:
        return self.projections(index)["v"]

    def query_heads(self, index: int, states: Tensor) -> Tensor:
        """``[..., seq, H, d_h]`` view of :meth:`query_states_module` ``(index)``'s output."""
        geo = self.geometry(index)
        return split_heads(
            states,
            geo.num_heads,
            geo.head_dim,
            head_major=self._head_major(states, geo.num_heads, geo.head_dim),
        )

    def key_heads(self, index: int, states: Tensor) -> Tensor:
        """``[..., seq, H_kv, d_h]`` view of :meth:`key_states_module` ``(index)``'s output."""
        geo = self.geometry(index)
        return split_heads(
            states,
            geo.num_kv_heads,
            geo.head_dim,
            head_major=self._head_major(states, geo.num_kv_heads, geo.head_dim),
        )

    def _head_major(self, states: Tensor, heads: int, head_dim: int) -> bool | None:
        # flat outputs need no layout; split ones follow the family's declared layout
        return None if states.shape[-1] == heads * head_dim else self.states_head_major

    def o_proj(self, index: int) -> nn.Linear:
        """A forward pre-hook on it sees the concatenated per-head outputs (o_proj input)."""
        return self.projections(index)["o"]

    # ------------------------------------------------------------------------------ geometry
    def geometry(self, index: int) -> HeadGeometry:
        """Head geometry read from the modules themselves (configs may leave head_dim None)."""
        attn = self.attention(index)
        proj = self.projections(index)
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:
            head_dim = getattr(self.text_config(), "head_dim", None) or (
                self.text_config().hidden_size // self.text_config().num_attention_heads
            )
        return HeadGeometry(
            num_heads=proj["q"].out_features // head_dim,
            num_kv_heads=proj["k"].out_features // head_dim,
            head_dim=head_dim,
            hidden_size=proj["q"].in_features,
        )

    def text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def num_layers(self) -> int:
        return len(self.all_layers())

    # ----------------------------------------------------------------------------- targeting
    def name_of(self, module: nn.Module) -> str:
        """Fully qualified name of ``module`` inside the wrapped model."""
        try:
            return self._names[id(module)]
        except KeyError:
            self._names = {id(m): n for n, m in self.model.named_modules()}
            return self._names[id(module)]

    def target_linears(self) -> dict[str, nn.Linear]:
        """Default prune targets: every decoder-layer linear of every self-attention layer.

        Never the vision tower, the projector, the embeddings or the lm_head.
        """
        out: dict[str, nn.Linear] = {}
        for i in self.layer_indices():
            for module in self.linears(i).values():
                out[self.name_of(module)] = module
        return out

    def default_targets(self) -> list[str]:
        """The default targets as anchored regexes (llm-compressor style ``targets``)."""
        return [f"^{re.escape(name)}$" for name in self.target_linears()]

    def locate(self, name: str) -> tuple[int, str]:
        """``(layer index, short linear name)`` of a target linear's fully qualified name."""
        for i in self.layer_indices():
            for short, module in self.linears(i).items():
                if self.name_of(module) == name:
                    return i, short
        raise KeyError(f"{name!r} is not a decoder-layer linear of this model")
