"""Mask files: the pruned set of a checkpoint when its zeros cannot tell it.

llm-compressor ≥ 0.13 runs GPTQ after pruning, which overwrites the pruned zeros; a tool's own
masks then say what was pruned. Format (docs/realignment.md, "Mask files"): one safetensors file,
``__metadata__`` ``{"format": "hsr-pl-masks", "meaning": "kept" | "pruned", "packing": "bits" | "bool"}``,
one tensor per weight, keyed by the parameter's name in the model (``<module>.weight``):

* ``packing: bool`` — a bool (or 0/1 uint8) tensor of the weight's shape ``[out, in]``;
* ``packing: bits`` — uint8 ``[out, ceil(in / 8)]``, bit b of byte k = column 8k + b (little-endian
  along the row, the layout of compressed-tensors' bitmask).

``meaning: kept`` marks the weights the tool kept (torchao's mask parametrization and
llm-compressor's bitmask both do); ``pruned`` marks the pruned ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import MASK_FILE, CheckpointError, check_safetensors, unpack_bitmask

__all__ = ["MASK_FILE", "check_mask_file", "mask_file_metadata", "pack_bits", "read_mask_file", "write_mask_file"]

"""The mask file's name when it lies beside the pruned checkpoint (read without being named)."""

_MEANINGS = ("kept", "pruned")
_PACKINGS = ("bits", "bool")


def mask_file_metadata(path: Path) -> dict[str, str]:
    """The file's metadata, checked (header only; no tensor is read)."""
    if not path.is_file():
        raise CheckpointError(f"mask file {path} does not exist; give the safetensors file of the tool's masks")
    check_safetensors(path)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        meta = json.loads(handle.read(length).decode("utf-8")).get("__metadata__") or {}
    if meta.get("format") != "hsr-pl-masks" or meta.get("meaning") not in _MEANINGS or meta.get("packing") not in _PACKINGS:
        raise CheckpointError(
            f"mask file {path} lacks the metadata {{\"format\": \"hsr-pl-masks\", \"meaning\": \"kept\"|\"pruned\", "
            "\"packing\": \"bits\"|\"bool\"}; write it with hsr_pl.models.mask_files.write_mask_file (docs/realignment.md)"
        )
    return meta


def check_mask_file(path: Path) -> None:
    """Refuse a mask file whose metadata is missing (before any model is loaded)."""
    mask_file_metadata(path)


def pack_bits(mask: Tensor) -> Tensor:
    """bool ``[rows, cols]`` -> uint8 ``[rows, ceil(cols/8)]``, bit b of byte k = column 8k + b."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.int16)
    padded[:, :cols] = mask.to(torch.int16)
    weights = (1 << torch.arange(8, dtype=torch.int16))
    return (padded.reshape(rows, -1, 8) * weights).sum(-1).to(torch.uint8)


def write_mask_file(path: str | Path, masks: Mapping[str, Tensor], meaning: str = "kept", packing: str = "bits") -> Path:
    """Write ``{"<module>.weight": bool [out, in]}`` as a mask file (atomically)."""
    from safetensors.torch import save_file

    if meaning not in _MEANINGS or packing not in _PACKINGS:
        raise ValueError(f"meaning must be one of {_MEANINGS} and packing one of {_PACKINGS}")
    tensors = {k: (pack_bits(m.bool()) if packing == "bits" else m.bool()).contiguous() for k, m in masks.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "hsr-pl-masks", "meaning": meaning, "packing": packing})
    tmp.replace(path)
    return path


def read_mask_file(path: Path, shapes: Mapping[str, tuple[int, int]]) -> dict[str, Tensor]:
    """The pruned set ``{"<module>.weight": bool [out, in]}`` of every weight in ``shapes``."""
    from safetensors.torch import load_file

    meta = mask_file_metadata(path)
    tensors = load_file(str(path))
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise CheckpointError(
            f"mask file {path} has no mask for {len(missing)} target weight(s), e.g. {missing[0]!r}; key each mask by "
            "the parameter's name in the model"
        )
    out = {}
    for name, (rows, cols) in shapes.items():
        tensor = tensors[name]
        if meta["packing"] == "bits":
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (rows, (cols + 7) // 8):
                raise CheckpointError(
                    f"mask file {path}: {name!r} is {tensor.dtype} {list(tensor.shape)}, not uint8 "
                    f"[{rows}, {(cols + 7) // 8}] packed bits of the weight [{rows}, {cols}]"
                )
            mask = unpack_bitmask(tensor, cols)
        else:
            if tuple(tensor.shape) != (rows, cols) or tensor.dtype not in (torch.bool, torch.uint8):
                raise CheckpointError(
                    f"mask file {path}: {name!r} is {tensor.dtype} {list(tensor.shape)}, not bool [{rows}, {cols}]"
                )
            mask = tensor.bool()
        out[name] = ~mask if meta["meaning"] == "kept" else mask
    return out
