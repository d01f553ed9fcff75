"""Registered model families. Each adapter states only what differs from the LLaMA layout.

Verified against transformers 5.24 with the tiny builders (tests/test_adapters.py): for every
family below ``model.get_decoder()`` returns the language decoder (the module that holds
``.layers``), every self-attention module carries ``head_dim``, and the projections are
``self_attn.{q,k,v,o}_proj`` with ``mlp.{gate,up,down}_proj``. So most adapters only name their
``model_type``; the ones that differ say why.
"""

from __future__ import annotations

from .adapters import ModelAdapter, register_adapter

__all__ = [
    "CausalLMAdapter",
    "Gemma3Adapter",
    "Idefics3Adapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "MllamaAdapter",
    "Qwen2VLAdapter",
]


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 style: CLIP tower + projector + LLaMA/Vicuna decoder at ``model.language_model``."""

    family = "llava"
    model_types = ("llava",)


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT (any-res tiling); the decoder is a LLaMA/Mistral/Vicuna ``model.language_model``."""

    family = "llava-next"
    model_types = ("llava_next",)


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL: Qwen2-style decoder (q/k/v biases, M-RoPE) at ``model.language_model``.

    M-RoPE rotates q/k after ``q_proj``/``k_proj``, so the projections' outputs are the pre-RoPE
    query/key states, as for LLaMA.
    """

    family = "qwen2-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")


@register_adapter
class Gemma3Adapter(ModelAdapter):
    """Gemma3: per-head RMSNorm on queries and keys (``q_norm``/``k_norm``) after the projections.

    Scaling a head's ``q_proj`` output would be undone by ``q_norm`` (an RMSNorm over each head's
    d_h values is invariant to scaling them), so the query/key hook points are the norms'
    outputs: after normalisation, before RoPE, head-major ``[batch, H, seq, d_h]`` (read them
    with :meth:`query_heads` / ``split_heads(..., head_major=True)``).
    """

    family = "gemma3"
    model_types = ("gemma3",)
    query_states_name = "q_norm"
    key_states_name = "k_norm"
    states_head_major = True  # the norms run after the [batch, H, seq, d_h] transpose


@register_adapter
class Idefics3Adapter(ModelAdapter):
    """Idefics3 and SmolVLM: SigLIP tower + pixel-shuffle connector, LLaMA decoder at ``model.text_model``."""

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")


@register_adapter
class MllamaAdapter(ModelAdapter):
    """Llama-3.2-Vision: self-attention decoder layers interleaved with cross-attention layers.

    Cross-attention layers (``cross_attn``: queries from text, keys/values from the vision
    tower's states, gated) have no ``self_attn``, so :meth:`layer_indices` skips them and
    :meth:`other_layer_indices` lists them; they keep their positions, so ``"<layer>-<head>"``
    keys match ``decoder.layers`` indices. They are not prune targets by default: HSR's head
    attribution and head-to-slice mapping are defined on self-attention heads over the text
    sequence, the published pruners prune the language model's self-attention stack, and the
    cross-attention keys/values act on vision features that hsr-pl never prunes elsewhere.
    Add them explicitly through ``targets`` if wanted (:meth:`cross_attention_linears`).
    """

    family = "mllama"
    model_types = ("mllama",)
    cross_attention_attr = "cross_attn"

    def cross_attention_linears(self) -> dict[str, object]:
        """``{qualified name: Linear}`` of the cross-attention layers (not default targets)."""
        out = {}
        for i in self.other_layer_indices():
            layer = self.layer(i)
            attn = getattr(layer, self.cross_attention_attr)
            modules = [getattr(attn, name) for name in self.projection_names.values()]
            modules += list(self.mlp(i).values())
            for module in modules:
                out[self.name_of(module)] = module
        return out


@register_adapter
class InternVLAdapter(ModelAdapter):
    """InternVL (HF-native ``internvl``): InternViT + MLP projector, Qwen2/LLaMA decoder at ``model.language_model``."""

    family = "internvl"
    model_types = ("internvl",)


@register_adapter
class CausalLMAdapter(ModelAdapter):
    """Text-only decoders (Llama, Mistral, Qwen2): the decoder is ``model``."""

    family = "causal-lm"
    model_types = ("llama", "mistral", "qwen2")
