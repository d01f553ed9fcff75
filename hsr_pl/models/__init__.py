"""Model-family knowledge: adapters, geometry, tiny builders, image-only processors."""

from . import families as _families  # noqa: F401  (registers the adapters)
from .adapters import (
    HeadGeometry,
    ModelAdapter,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
    split_heads,
    supported_families,
)
from .processors import register_image_only_processors

register_image_only_processors()

__all__ = [
    "HeadGeometry",
    "ModelAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "split_heads",
    "supported_families",
]
