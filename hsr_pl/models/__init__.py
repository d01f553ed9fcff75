"""Model-family knowledge: adapters, geometry, tiny builders."""

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

__all__ = [
    "HeadGeometry",
    "ModelAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "split_heads",
    "supported_families",
]
