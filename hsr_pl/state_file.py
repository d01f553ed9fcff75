"""Compact, pickle-free storage for :class:`hsr_pl.state.HSRState`'s tensors.

At 7B the masks cover 6.5 G weights and the kept originals 1 G values: as bool tensors and dense
values inside every Lightning checkpoint that is several GB per checkpoint, although none of it
changes while fine-tuning. So:

* masks are packed 8 to a byte (:func:`pack_bits` / :func:`unpack_bits`, plain torch, any device);
* the packed masks and the originals go to one *side file* (safetensors, never pickle), named by
  its content hash and written once per distinct state, atomically; a checkpoint carries only a
  reference (file name, absolute path, SHA-256, size) and the small JSON-able rest of the state;
* a resume looks for the file where the checkpoint says, then next to the checkpoint and in the
  run directories, checks the hash and fails with a message saying which file to put where.

The hash is taken over the tensors (names, dtypes, shapes, bytes) and the metadata, not the file
bytes, so every DDP rank can compute the same reference without writing or reading a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "StateFileError",
    "content_hash",
    "pack_bits",
    "read_state_file",
    "state_file_name",
    "unpack_bits",
    "write_state_file",
]

FORMAT = "hsr-pl state v2"
_POWERS = (1, 2, 4, 8, 16, 32, 64, 128)


class StateFileError(RuntimeError):
    """The side file a checkpoint refers to is missing, unreadable or not the one it names."""


def _powers(device: torch.device) -> Tensor:
    return torch.tensor(_POWERS, dtype=torch.uint8, device=device)


def pack_bits(mask: Tensor) -> Tensor:
    """Bool tensor (any shape) -> uint8 ``[ceil(numel / 8)]``; element ``i`` is bit ``i % 8``
    (least significant first) of byte ``i // 8``, as ``numpy.packbits(bitorder="little")``."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # distinct powers of two: the sum of a byte's bits never exceeds 255
    return (flat.view(-1, 8) * _powers(flat.device)).sum(dim=1, dtype=torch.uint8)


def _byte_table(device: torch.device) -> Tensor:
    """``[256]`` int64: entry ``b`` holds the 8 bool bytes of byte ``b``'s bits (little first)."""
    table = _TABLES.get(device)
    if table is None:
        bits = torch.tensor([[(b >> k) & 1 for k in range(8)] for b in range(256)], dtype=torch.uint8)
        table = _TABLES[device] = bits.view(torch.int64).reshape(256).to(device)
    return table


_TABLES: dict[torch.device, Tensor] = {}


def unpack_bits(packed: Tensor, shape: Iterable[int], dtype: torch.dtype = torch.bool) -> Tensor:
    """Inverse of :func:`pack_bits`: a ``shape`` tensor on ``packed``'s device, as ``dtype``
    (0/1; bool by default). One table look-up per byte (8 bools at once), which on a CPU is
    several times faster than shifting and masking the bits out."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed bits of shape {tuple(packed.shape)} ({packed.dtype}) do not hold a {shape} mask")
    table = _byte_table(packed.device)
    flat = table.index_select(0, packed.to(torch.int32)).view(torch.uint8)[:numel]
    if dtype == torch.bool:
        return flat.view(torch.bool).view(shape)
    return flat.to(dtype).view(shape)


def content_hash(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata and every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(metadata), sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))
    return digest.hexdigest()


def state_file_name(sha256: str) -> str:
    return f"hsr_state-{sha256[:16]}.safetensors"


def write_state_file(
    directory: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], *, write: bool = True
) -> dict[str, object]:
    """Store ``tensors`` in ``directory`` (once per content) and return the checkpoint's reference.

    ``write=False`` computes the same reference without touching the disk (DDP ranks but 0). An
    existing file of that name and size is kept: the name is the content's hash.
    """
    from safetensors.torch import save_file

    sha = content_hash(tensors, metadata)
    directory = Path(directory).resolve()
    path = directory / state_file_name(sha)
    size = None
    if write:
        if not path.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name, suffix=".tmp")
            os.close(fd)
            try:
                cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
                save_file(cpu, tmp, metadata={**metadata, "sha256": sha})
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        size = path.stat().st_size
    return {"file": path.name, "path": str(path), "sha256": sha, "bytes": size}


def read_state_file(ref: Mapping[str, object], search: Iterable[str | os.PathLike | None] = ()) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the side file ``ref`` names, checked against its hash.

    Looks at ``ref["path"]``, then for ``ref["file"]`` in each directory of ``search``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    name = str(ref.get("file", ""))
    candidates = [Path(str(ref["path"]))] if ref.get("path") else []
    candidates += [Path(d) / name for d in search if d]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = ", ".join(dict.fromkeys(str(p) for p in candidates)) or "(nowhere)"
        raise StateFileError(
            f"the checkpoint's pruning state lives in the side file {name!r}, which is not in any of: {looked}. "
            "Copy that file next to the checkpoint (it was written beside the checkpoints of the run that "
            "pruned), or start from the unpruned model without ckpt_path"
        )
    try:
        tensors = load_file(str(found))
        with safe_open(str(found), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateFileError(f"{found} is not a readable safetensors file ({exc}); restore it from the run") from exc
    metadata.pop("sha256", None)
    sha = content_hash(tensors, metadata)
    if sha != ref.get("sha256"):
        raise StateFileError(
            f"{found} holds other contents than the checkpoint refers to (SHA-256 {sha[:16]}…, expected "
            f"{str(ref.get('sha256'))[:16]}…): it was changed or belongs to another run"
        )
    if metadata.get("format") != FORMAT:
        raise StateFileError(f"{found} is in format {metadata.get('format')!r}, expected {FORMAT!r}")
    return tensors, metadata
