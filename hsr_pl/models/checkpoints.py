"""Check checkpoint folders before any weight is read, and read checkpoints that other tools
pruned as plain dense modules of the same architecture.

:func:`check_model_folder` (config, adapter, processor files, intact safetensors headers) and
:func:`weight_files` raise :class:`ModelLoadError`; reading a pruned checkpoint raises
:class:`CheckpointError`.

What pruning tools write today, and what this module does with it:

* dense safetensors with exact zeros (save_pretrained after Wanda / SparseGPT / torchao's
  ``squash_mask`` / llm-compressor's current releases), possibly sharded with an index file, and
  llm-compressor's ``recipe.yaml`` beside them — loaded with ``from_pretrained``;
* older llm-compressor / compressed-tensors releases: ``sparse-bitmask`` tensors
  (``<name>.compressed`` 1-D non-zero values in row-major order, ``<name>.bitmask`` uint8
  ``[rows, ceil(cols / 8)]`` packed little-endian along the row, ``<name>.shape``,
  ``<name>.row_offsets``) or ``sparse-24-bitmask`` (``.compressed`` ``[rows, cols / 2]`` kept values,
  ``.bitmask``, ``.shape`` as a column) with ``quantization_config.sparsity_config`` (older:
  ``compression_config``) in config.json; current transformers refuses those without the
  compressed-tensors package, so they are decoded here (safetensors + torch only) into a
  temporary dense checkpoint that ``from_pretrained`` reads, which also applies transformers'
  key renames.

Refused, with a message that names the fix: weights missing at load (e.g. a torchao model saved
before ``squash_mask``: its ``parametrizations.weight.original`` keys leave ``weight`` unset), a
quantized checkpoint, or a checkpoint of another architecture or other shapes. Modules are
compared after loading, never by raw safetensors keys.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import supported_families

__all__ = [
    "CheckpointError",
    "ModelLoadError",
    "PrunedCheckpointCheck",
    "check_model_folder",
    "check_pruned_folder",
    "check_pruned_checkpoint",
    "check_safetensors",
    "compare_architectures",
    "compression_format",
    "decode_compressed_state",
    "decode_sparse24_bitmask",
    "decode_sparse_bitmask",
    "load_like",
    "pruned_set",
    "unpack_bitmask",
    "weight_files",
]

_QUANTIZED_FORMATS = {"pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "marlin-24",
                      "nvfp4-pack-quantized", "mixed-precision"}
_SPARSE_FORMATS = {"sparse-bitmask", "sparse-24-bitmask"}


class ModelLoadError(ValueError):
    """A model path or argument that cannot be loaded; the message says how to fix it."""


_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def _read_model_config(path: Path) -> dict:
    """``config.json`` as a dict, or a ModelLoadError that names the file."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{config_file} is not valid JSON ({exc}); restore it (save_pretrained writes it) or point model= at "
            "an intact checkpoint folder"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {config_file} ({exc.strerror or exc}); check its permissions") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(
            f"{config_file} has no \"model_type\" string; it is not a transformers model config (save_pretrained "
            "writes one)"
        )
    return config


def check_safetensors(file: Path) -> None:
    """Refuse a truncated or corrupt safetensors file from its header alone (no tensor is read).

    Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor to its
    ``data_offsets``, then the data; every offset must lie inside the file.
    """
    def damaged(why: str) -> ModelLoadError:
        return ModelLoadError(
            f"{file} is not a complete safetensors file ({why}); the download or copy was cut short or the file "
            "is damaged: copy or re-save the checkpoint"
        )

    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise damaged(f"{size} bytes, shorter than the 8-byte header length")
            length = int.from_bytes(head, "little")
            if length > size - 8:
                raise damaged(f"header of {length} bytes in a {size}-byte file")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file} ({exc.strerror or exc}); check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged("the header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise damaged(f"tensor {name!r} has no data_offsets")
        if not 0 <= offsets[0] <= offsets[1] <= data:
            raise damaged(f"tensor {name!r} ends at byte {offsets[1]} of {data} data bytes")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file or the shards of an index)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(name) for name in weight_map.values()})
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(
                f"{index} is not a valid safetensors index (no weight_map); re-save the checkpoint"
            ) from None
        root = path.resolve()
        outside = [name for name in shards if not (path / name).resolve().is_relative_to(root)]
        if outside:
            raise ModelLoadError(
                f"{index} names shard {outside[0]!r} outside {path}; a checkpoint's shards lie in its own folder: "
                "copy the shard there and name it without a path"
            )
        missing = [name for name in shards if not (path / name).is_file()]
        if missing or not shards:
            raise ModelLoadError(
                f"{index} names shard(s) {missing[:3] or '[]'} that are not in {path}; copy every shard next to it"
            )
        return [path / name for name in shards]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(
            f"{path} holds only pickle weights (*.bin / *.pt); hsr-pl loads safetensors only: convert them "
            "(model.save_pretrained(path, safe_serialization=True))"
        )
    raise ModelLoadError(f"{path} has no model.safetensors (or index); save the weights with save_pretrained")


def check_model_folder(path: Path, trust_remote_code: bool) -> str:
    """Validate a local checkpoint folder cheaply (no weights are loaded); returns its ``model_type``.

    An architecture without an adapter is refused even with ``trust_remote_code``: hsr-pl could
    not prune or score it anyway, and refusing here means none of the folder's code ever runs.
    """
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass a local checkpoint folder")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is a file; pass the checkpoint *folder* (with config.json)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model folder (no config.json); point model= at the folder written by "
            "save_pretrained"
        )
    model_type = _read_model_config(path)["model_type"]
    known = {t for types in supported_families().values() for t in types}
    if model_type not in known:
        remote = " (trust_remote_code cannot add one)" if trust_remote_code else ""
        raise ModelLoadError(
            f"{path}: model_type={model_type!r} has no hsr-pl adapter{remote}. Supported: {sorted(known)}. "
            "Add an adapter (docs/adapters.md)."
        )
    if not any((path / name).is_file() for name in _PROCESSOR_FILES):
        raise ModelLoadError(
            f"{path} has no processor or tokenizer files; save the processor next to the weights "
            "(processor.save_pretrained(path)) or pass processor=<folder>"
        )
    for file in weight_files(path):
        check_safetensors(file)
    return model_type


class CheckpointError(ValueError):
    """A checkpoint hsr-pl cannot compare with the original; the message says why and what to do."""


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a model folder (no config.json); point at the folder save_pretrained wrote")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); restore the file") from None


def compression_format(config: Mapping) -> str | None:
    """``sparse-bitmask`` / ``sparse-24-bitmask`` for compressed-tensors sparse checkpoints, None for
    dense ones; raises for quantized checkpoints (nothing here can compare quantized weights)."""
    quant = config.get("quantization_config") or config.get("compression_config")
    if not quant:
        return None
    method = quant.get("quant_method", "compressed-tensors" if "sparsity_config" in quant else None)
    if method != "compressed-tensors":
        raise CheckpointError(
            f"the pruned checkpoint is quantized (quant_method={method!r}); realignment compares float weights: "
            "give the checkpoint saved before quantization"
        )
    groups = quant.get("config_groups") or {}
    fmt = quant.get("format")
    if groups or fmt in _QUANTIZED_FORMATS:
        raise CheckpointError(
            f"the pruned checkpoint is compressed-tensors quantized (format={fmt!r}); give the checkpoint saved "
            "before quantization"
        )
    sparsity = quant.get("sparsity_config") or {}
    sparse = sparsity.get("format")
    if sparse in (None, "dense"):
        return None
    if sparse not in _SPARSE_FORMATS:
        raise CheckpointError(
            f"compressed-tensors sparsity format {sparse!r} is not supported; supported: {sorted(_SPARSE_FORMATS)} "
            "(or save the model dense)"
        )
    return sparse


def unpack_bitmask(packed: Tensor, cols: int) -> Tensor:
    """``[rows, ceil(cols/8)]`` uint8, bit b of byte k = column 8k + b  ->  bool ``[rows, cols]``."""
    bits = (packed.to(torch.int16).unsqueeze(-1) >> torch.arange(8, dtype=torch.int16)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def _shape(shape: Tensor) -> tuple[int, int]:
    dims = [int(v) for v in shape.flatten().tolist()]
    if len(dims) != 2:
        raise CheckpointError(f"compressed tensor shape {dims} is not 2-D; only linear weights are supported")
    return dims[0], dims[1]


def decode_sparse_bitmask(compressed: Tensor, bitmask: Tensor, shape: Tensor) -> Tensor:
    """Dense weight from compressed-tensors ``sparse-bitmask`` parts."""
    rows, cols = _shape(shape)
    mask = unpack_bitmask(bitmask, cols)
    if int(mask.sum()) != compressed.numel():
        raise CheckpointError(f"sparse-bitmask: {int(mask.sum())} set bits but {compressed.numel()} stored values")
    dense = torch.zeros(rows, cols, dtype=compressed.dtype)
    dense[mask] = compressed.flatten()
    return dense


def decode_sparse24_bitmask(compressed: Tensor, bitmask: Tensor, shape: Tensor) -> Tensor:
    """Dense weight from compressed-tensors ``sparse-24-bitmask`` parts (``[rows, cols/2]`` values)."""
    return decode_sparse_bitmask(compressed.flatten(), bitmask, shape)


def decode_compressed_state(tensors: Mapping[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Replace every ``<name>.{compressed,bitmask,shape[,row_offsets]}`` group by ``<name>.weight``."""
    out: dict[str, Tensor] = {}
    groups = {key[: -len(".compressed")] for key in tensors if key.endswith(".compressed")}
    parts = {f"{g}.{suffix}" for g in groups for suffix in ("compressed", "bitmask", "shape", "row_offsets")}
    for group in sorted(groups):
        try:
            compressed, bitmask, shape = (tensors[f"{group}.{s}"] for s in ("compressed", "bitmask", "shape"))
        except KeyError as exc:
            raise CheckpointError(f"compressed tensor {group!r} lacks its {exc.args[0].rsplit('.', 1)[1]} part") from None
        decode = decode_sparse24_bitmask if fmt == "sparse-24-bitmask" else decode_sparse_bitmask
        out[f"{group}.weight"] = decode(compressed, bitmask, shape)
    for key, value in tensors.items():
        if key not in parts:
            out[key] = value
    return out


# An explicit mask file beside a pruned checkpoint (hsr_pl.models.mask_files): never a weight file.
MASK_FILE = "pruning_masks.safetensors"


def _decoded_copy(folder: Path, fmt: str, config: dict, into: Path) -> None:
    """Write ``folder``'s shards decoded into ``into``; a tensor's parts may sit in different shards."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(f for f in folder.glob("*.safetensors") if f.name != MASK_FILE)
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update({key: file for key in handle.keys()})

    def read(key: str) -> Tensor:
        with safe_open(str(where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    weight_map = {}
    for file in files:
        # Each group is written where its .compressed part lives; plain tensors where they are.
        mine = [k for k, f in where.items() if f == file]
        groups = {k[: -len(".compressed")] for k in mine if k.endswith(".compressed")}
        needed = {f"{g}.{s}" for g in groups for s in ("compressed", "bitmask", "shape", "row_offsets")}
        present = {k: read(k) for k in needed if k in where}
        present.update({k: read(k) for k in mine if not _is_part(k)})
        decoded = decode_compressed_state(present, fmt)
        save_file({k: v.contiguous() for k, v in decoded.items()}, str(into / file.name), metadata={"format": "pt"})
        weight_map.update({key: file.name for key in decoded})
    if len(files) > 1:
        (into / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    clean = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    (into / "config.json").write_text(json.dumps(clean))
    for extra in folder.glob("*.json"):
        if extra.name not in ("config.json", "model.safetensors.index.json") and not (into / extra.name).exists():
            shutil.copy2(extra, into / extra.name)


def _is_part(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("compressed", "bitmask", "shape", "row_offsets")


def compare_architectures(original: nn.Module, pruned_config: Mapping) -> None:
    """Cheap check before loading: the same ``model_type`` and text geometry."""
    mine = original.config
    theirs_type = pruned_config.get("model_type")
    if theirs_type != mine.model_type:
        raise CheckpointError(
            f"the pruned checkpoint is a {theirs_type!r} model but the original is {mine.model_type!r}; give the "
            "pruned copy of the same model"
        )
    text = mine.get_text_config() if hasattr(mine, "get_text_config") else mine
    theirs = pruned_config.get("text_config") or pruned_config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size"):
        a, b = getattr(text, key, None), theirs.get(key)
        if a is not None and b is not None and a != b:
            raise CheckpointError(
                f"the pruned checkpoint has {key}={b} but the original has {a}; give the pruned copy of the same model"
            )


def load_like(original: nn.Module, folder: str | Path) -> tuple[nn.Module, dict]:
    """Load ``folder`` as the class of ``original`` (same dtype), decoding compressed-tensors sparsity.

    Returns the model (CPU) and ``{"format": ..., "recipe": bool}``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"pruned checkpoint {folder} is not a folder; give the folder save_pretrained wrote")
    config = read_config(folder)
    compare_architectures(original, config)
    for file in weight_files(folder):  # safetensors only (never unpickle a shared file), intact headers
        check_safetensors(file)
    fmt = compression_format(config)
    dtype = next(original.parameters()).dtype
    attn = getattr(original.config, "_attn_implementation", None)
    kwargs = {"dtype": dtype, "output_loading_info": True, "use_safetensors": True}
    if attn:
        kwargs["attn_implementation"] = attn
    tmp = None
    try:
        source = folder
        if fmt is not None:
            tmp = Path(tempfile.mkdtemp(prefix="hsr-pl-decoded-"))
            _decoded_copy(folder, fmt, config, tmp)
            source = tmp
        try:
            model, info = type(original).from_pretrained(source, **kwargs)
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load the pruned checkpoint {folder}: {first}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        hint = (
            " (they look like torchao parametrizations: call squash_mask() before saving)"
            if any("parametrizations" in k for k in info.get("unexpected_keys") or []) else ""
        )
        raise CheckpointError(
            f"the pruned checkpoint {folder} lacks {len(missing)} weights, e.g. {missing[0]!r}{hint}; save the "
            "complete pruned model with save_pretrained"
        )
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise CheckpointError(f"the pruned checkpoint's shapes differ from the original's (e.g. {mismatched[0]}); give the same model")
    mine = dict(original.named_parameters())
    theirs = dict(model.named_parameters())
    if set(mine) != set(theirs):
        diff = sorted(set(mine) ^ set(theirs))
        raise CheckpointError(f"the pruned checkpoint's modules differ from the original's (e.g. {diff[0]!r})")
    for name, param in mine.items():
        if tuple(param.shape) != tuple(theirs[name].shape):
            raise CheckpointError(
                f"{name}: the pruned checkpoint has shape {tuple(theirs[name].shape)}, the original {tuple(param.shape)}"
            )
    return model.eval(), {"format": fmt or "dense", "recipe": (folder / "recipe.yaml").is_file()}


def pruned_set(original: Tensor, pruned: Tensor) -> Tensor:
    """Where the pruner zeroed a weight: ``(pruned == 0) & (original != 0)`` (the repair rule)."""
    if original.shape != pruned.shape:
        raise CheckpointError(f"shapes differ: original {tuple(original.shape)}, pruned {tuple(pruned.shape)}")
    return (pruned == 0) & (original != 0)


# ------------------------------------------------------------------ checks before any weight is read
_GEOMETRY = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size")
_ST_FLOATS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16}


def safetensors_header(file: Path) -> dict[str, dict]:
    """The tensors' ``{"dtype", "shape"}`` from a safetensors header (intact: see check_safetensors)."""
    check_safetensors(file)
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length).decode("utf-8"))
    return {k: v for k, v in header.items() if k != "__metadata__"}


def folder_headers(folder: Path) -> dict[str, dict]:
    """Every tensor's header entry across the checkpoint's shards."""
    out: dict[str, dict] = {}
    for file in weight_files(folder):
        out.update({k: {**v, "file": file} for k, v in safetensors_header(file).items()})
    return out


def refuse_unsquashed_parametrizations(pruned: Mapping[str, dict], folder: Path) -> None:
    """torchao's sparsifier saved before ``squash_mask``: ``…parametrizations.weight.original`` keys."""
    keys = [k for k in pruned if ".parametrizations." in k]
    if keys:
        raise CheckpointError(
            f"the pruned checkpoint {folder} holds torchao parametrizations ({len(keys)} keys, e.g. {keys[0]!r}), not "
            "plain weights: call sparsifier.squash_mask() before save_pretrained"
        )


def refuse_other_architecture(original: Mapping, pruned: Mapping, folder: Path) -> None:
    """Another ``model_type`` or text geometry, from the two config.json files."""
    if original.get("model_type") != pruned.get("model_type"):
        raise CheckpointError(
            f"the pruned checkpoint {folder} is a {pruned.get('model_type')!r} model but the original is "
            f"{original.get('model_type')!r}; give the pruned copy of the same model"
        )
    mine, theirs = original.get("text_config") or original, pruned.get("text_config") or pruned
    for key in _GEOMETRY:
        a, b = mine.get(key), theirs.get(key)
        if a is not None and b is not None and a != b:
            raise CheckpointError(
                f"the pruned checkpoint has {key}={b} but the original has {a}; give the pruned copy of the same model"
            )


def refuse_other_shapes_or_dtype(original: Mapping[str, dict], pruned: Mapping[str, dict], folder: Path) -> None:
    """Tensor shapes (as a multiset: tools may rename keys) and a narrower or integer weight dtype."""
    def shapes(headers: Mapping[str, dict]) -> dict[tuple, int]:
        out: dict[tuple, int] = {}
        for info in headers.values():
            if len(info.get("shape", ())) == 2:
                out[tuple(info["shape"])] = out.get(tuple(info["shape"]), 0) + 1
        return out

    missing = sorted(k for k in original if k not in pruned)
    if missing and all(k in original for k in pruned):  # same naming, some tensors left out
        raise CheckpointError(
            f"the pruned checkpoint {folder} lacks {len(missing)} weights, e.g. {missing[0]!r}; save the complete "
            "model (every safetensors shard and the index)"
        )
    mine, theirs = shapes(original), shapes(pruned)
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[0][0]
        raise CheckpointError(
            f"the pruned checkpoint's matrix shapes differ from the original's (e.g. {list(diff)} appears "
            f"{theirs.get(diff, 0)} times there, {mine.get(diff, 0)} in the original); give the pruned copy of the same model"
        )
    widths = {_ST_FLOATS.get(info["dtype"], 0) for info in original.values() if len(info.get("shape", ())) == 2}
    for name, info in pruned.items():
        if len(info.get("shape", ())) != 2:
            continue
        width = _ST_FLOATS.get(info["dtype"])
        if width is None:
            raise CheckpointError(
                f"the pruned checkpoint stores {name!r} as {info['dtype']} (quantized?); realignment compares float "
                "weights: give the checkpoint saved before quantization"
            )
        # The same tensor's width where the names match (one float32 matrix elsewhere proves nothing).
        own = _ST_FLOATS.get(original[name]["dtype"]) if name in original else None
        if width < (own if own is not None else max(widths, default=0)):
            raise CheckpointError(
                f"the pruned checkpoint stores {name!r} as {info['dtype']}, narrower than the original's weights; "
                "re-save it in the original's dtype (or float32)"
            )


def refuse_swapped(original: Mapping[str, dict], pruned: Mapping[str, dict], folder: Path, probes: int = 4) -> None:
    """Original and pruned given the other way round: a few shared decoder matrices (read alone, no
    model built) hold clearly more exact zeros in the "original" than in the "pruned" copy."""
    from safetensors import safe_open

    shared = [k for k in pruned if k in original and ".layers." in k and k.endswith("proj.weight")
              and len(pruned[k].get("shape", ())) == 2 and pruned[k]["shape"] == original[k]["shape"]][:probes]
    if not shared:
        return

    def zeros(headers: Mapping[str, dict]) -> float:
        count = total = 0
        for key in shared:
            with safe_open(str(headers[key]["file"]), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            count, total = count + int((tensor == 0).sum()), total + tensor.numel()
        return count / max(total, 1)

    mine, theirs = zeros(original), zeros(pruned)
    if mine >= theirs + 0.05:
        raise CheckpointError(
            f"the original checkpoint has more exact zeros ({100 * mine:.1f} %) than the pruned one {folder} "
            f"({100 * theirs:.1f} %) in {len(shared)} decoder matrices: original and pruned look swapped; give the "
            "dense model as the model and the pruned folder as the path"
        )


def check_pruned_folder(original: Path | None, pruned: Path) -> None:
    """Refuse, before any model is loaded or anything written, what config.json and the safetensors
    headers can tell: torchao parametrizations, another architecture, other shapes or a narrower /
    integer dtype, original and pruned swapped. ``original``: the dense model's folder, None when
    it is not a local folder (then only the pruned folder's own checks run)."""
    config = read_config(pruned)
    fmt = compression_format(config)
    theirs = folder_headers(pruned)
    refuse_unsquashed_parametrizations(theirs, pruned)
    if original is None or not (original / "config.json").is_file():
        return
    refuse_other_architecture(read_config(original), config, pruned)
    if fmt is not None:
        return  # compressed-tensors parts: the shapes are checked once decoded
    mine = folder_headers(original)
    refuse_other_shapes_or_dtype(mine, theirs, pruned)
    refuse_swapped(mine, theirs, pruned)


@dataclass
class PrunedCheckpointCheck:
    """What :func:`check_pruned_checkpoint` read: the loaded copy, its format, the pruned sets."""

    model: nn.Module
    info: dict
    masks: dict[str, Tensor]


def _check_finite(model: nn.Module, folder: Path) -> None:
    """Refuse NaN/inf in the pruned copy (the main model is checked the same way when it loads):
    they would be copied into the model and exported as the "repaired" weights."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            bad = int((~torch.isfinite(param)).sum()) if param.is_floating_point() else 0
            if bad:
                raise CheckpointError(
                    f"the pruned checkpoint {folder}: weight {name} holds {bad} NaN/inf value(s); the checkpoint is "
                    "damaged: re-export it from the pruning tool"
                )


def check_pruned_checkpoint(
    original: nn.Module, folder: str | Path, targets: Sequence[str], given: Mapping[str, Tensor] | None = None
) -> PrunedCheckpointCheck:
    """Every refusal of a pruned checkpoint, collected in one place and run before any work
    (PrunedCheckpoint's preflight, before the head scan): folder, shards (safetensors only, inside
    the folder, intact headers), architecture and vocabulary, missing tensors or other shapes
    (:func:`load_like`), NaN/inf values, and at least one pruned weight in ``targets``.

    Returns the loaded copy and the pruned set of every target, so the work does not read it again.
    ``given``: pruned sets read from a mask file (``{"<linear>.weight": bool}``), used instead of the zeros.
    """
    folder = Path(folder).expanduser()
    model, info = load_like(original, folder)
    _check_finite(model, folder)
    theirs = dict(model.named_parameters())
    modules = dict(original.named_modules())
    masks = {
        name: given[f"{name}.weight"] if given is not None
        else pruned_set(modules[name].weight.detach().cpu(), theirs[f"{name}.weight"].detach().cpu())
        for name in targets
    }
    if not any(bool(m.any()) for m in masks.values()):
        raise CheckpointError(
            f"the checkpoint {folder} has no pruned weight in the {len(targets)} target linears (no entry is "
            "zero where the original is not): it is not a pruned copy of this model, or targets miss what was pruned"
        )
    return PrunedCheckpointCheck(model, info, masks)
