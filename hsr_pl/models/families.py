"""Registered model families. Each adapter states only what differs from the LLaMA layout."""

from __future__ import annotations

from .adapters import ModelAdapter, register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    family = "llava-next"
    model_types = ("llava_next",)


@register_adapter
class CausalLMAdapter(ModelAdapter):
    """Text-only decoders (Llama, Mistral, Qwen2): the model is its own language model."""

    family = "causal-lm"
    model_types = ("llama", "mistral", "qwen2")
