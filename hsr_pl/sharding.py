"""Everything hsr-pl knows about FSDP2 (``fully_shard``) sharded models, in one place.

Under Lightning's ``ModelParallelStrategy`` each decoder layer (and the rest of the model) is a
``fully_shard`` unit over the data-parallel mesh: outside a forward every parameter is a
``DTensor`` whose local part holds a block of rows (``Shard(0)``, ``torch.chunk`` sizes); inside
its unit's forward the full parameter is gathered, so forward hooks see plain full tensors.

The algorithms read and write weights through :func:`full_weight` / :func:`write_full`: on an
unsharded model they hand out ``linear.weight.data`` itself (no copy, exactly as before); on a
sharded one they gather that one linear's full weight (a collective: every rank calls them in
the same order) and copy the changed values back into the local rows. So at any time a rank
holds its shards, one layer's gathered parameters (inside a forward) and one linear's gathered
weight (outside) — never the full model.

Also here: :func:`shard_model` (the wrapping plan), :func:`load_sharded` (meta-device build,
then each rank reads only its own rows of every tensor from the safetensors files),
:func:`iter_full_state` (a full state dict streamed one tensor at a time, for the export),
:func:`check_lockstep` (ranks must run equally many forwards) and :func:`fail_fast` (a rank that
raises makes its peers end with that error, not wait in a collective).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "PeerFailedError",
    "ShardingError",
    "check_lockstep",
    "checkpoint_name_mapper",
    "count_non_finite",
    "count_zeros",
    "describe_sharding",
    "fail_fast",
    "full_tensor",
    "full_weight",
    "is_sharded",
    "iter_full_state",
    "load_sharded",
    "local_part_of",
    "local_rows",
    "meta_parameters",
    "model_is_sharded",
    "reshard_all",
    "shard_model",
    "sharded_strategy",
    "write_full",
]


class ShardingError(ValueError):
    """A setting or input that the sharded (FSDP2) path cannot serve; the message says the fix."""


class PeerFailedError(RuntimeError):
    """Another rank raised first; the message carries its error."""


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    """True for a ``DTensor`` (a parameter of a ``fully_shard`` unit outside its forward)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def sharded_strategy(trainer) -> bool:
    """True when ``trainer`` runs Lightning's ``ModelParallelStrategy`` (FSDP2)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover - every supported Lightning has it
        return False
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def model_is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor``."""
    return any(is_sharded(p) for p in model.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor as a plain one: gathered (a collective) when sharded, else ``tensor.detach()``."""
    if is_sharded(tensor):
        return tensor.detach().full_tensor()
    return tensor.detach()


def full_weight(linear: nn.Module) -> Tensor:
    """``linear``'s full weight as a plain tensor that may be edited and handed to :func:`write_full`.

    Unsharded: ``linear.weight.data`` itself (edits change the model at once). Sharded: a gathered
    copy (every rank must call this for the same linear in the same order)."""
    weight = linear.weight
    if is_sharded(weight):
        return weight.detach().full_tensor()
    return weight.data


def local_rows(param: Tensor, full: Tensor) -> Tensor:
    """The part of ``full`` that this rank holds of the sharded ``param`` (its local shape)."""
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(param.shape):
        raise ShardingError(f"a full tensor of shape {tuple(full.shape)} does not fit parameter {tuple(param.shape)}")
    # src_data_rank=None: every rank slices its own copy (they are identical), no communication.
    part = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None).to_local()
    local = param.to_local()
    if tuple(part.shape) != tuple(local.shape):
        raise ShardingError(
            f"the local shard has shape {tuple(local.shape)} but slicing the full tensor gives {tuple(part.shape)}; "
            "the parameter is not sharded as fully_shard does (Shard(0), torch.chunk sizes)"
        )
    return part


@torch.no_grad()
def write_full(linear_or_param, full: Tensor) -> None:
    """Store ``full`` (the whole weight) into the module's weight: its local rows when sharded.

    A no-op when ``full`` is the unsharded weight's own ``.data`` (what :func:`full_weight` handed out)."""
    param = linear_or_param.weight if isinstance(linear_or_param, nn.Module) else linear_or_param
    if is_sharded(param):
        param.to_local().copy_(local_rows(param, full))
        return
    if full.data_ptr() == param.data.data_ptr() and full.shape == param.shape:
        return
    param.data.copy_(full)


def local_part_of(param: Tensor, full: Tensor) -> Tensor:
    """``full`` itself for a plain parameter, its local rows for a sharded one (masks, deltas)."""
    return local_rows(param, full) if is_sharded(param) else full


def collective_device(group=None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device when ``group`` (default:
    the default group) runs NCCL — which takes CUDA tensors only —, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def count_non_finite(param: Tensor) -> int:
    """NaN/inf entries of ``param`` over all ranks (its local rows summed when sharded; every
    rank must call it for the same parameters). 0 for non-float tensors."""
    if not param.is_floating_point():
        return 0
    if is_sharded(param):
        local = param.to_local()
        group = param.device_mesh.get_group()
        bad = torch.tensor([0 if bool(torch.isfinite(local.sum())) else int((~torch.isfinite(local)).sum())],
                           dtype=torch.int64, device=collective_device(group))
        dist.all_reduce(bad, group=group)
        return int(bad.cpu())
    if bool(torch.isfinite(param.sum())):
        return 0
    return int((~torch.isfinite(param)).sum())


def reshard_all(model: nn.Module) -> None:
    """Put every ``fully_shard`` unit of ``model`` back to its sharded state. A forward that
    stopped with an exception (the sequential capture stops at the last layer's entry) skips the
    post-forward reshard, leaving gathered parameters behind; edits to those would be lost."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def count_zeros(param: Tensor) -> int:
    """Exact zeros of ``param`` over all ranks (a collective when sharded)."""
    if not is_sharded(param):
        return int((param == 0).sum())
    group = param.device_mesh.get_group()
    zeros = torch.tensor([int((param.to_local() == 0).sum())], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(zeros, group=group)
    return int(zeros.cpu())


# ---------------------------------------------------------------------------------- wrapping
def _find(model: nn.Module, attrs: tuple[str, ...]) -> nn.Module | None:
    for attr in attrs:
        for owner in (model, getattr(model, "model", None)):
            candidate = getattr(owner, attr, None) if owner is not None else None
            if isinstance(candidate, nn.Module):
                return candidate
    return None


_VISION = ("vision_tower", "vision_model", "visual")
_PROJECTOR = ("multi_modal_projector", "mm_projector", "connector")


def _units(model: nn.Module, adapter) -> list[nn.Module]:
    """The ``fully_shard`` units below the root, innermost first: every decoder layer, the vision
    tower, the projector, and the input/output embeddings when untied. The tower and the
    projector are units of their own because ``generate`` calls them outside the root's forward
    (image features are computed up front)."""
    units: list[nn.Module] = list(adapter.all_layers())
    vision = _find(model, _VISION)
    if vision is not None:
        # One unit for the whole tower: transformers records the tower's hidden states with
        # hooks keyed on its layer classes, which fully_shard would rename.
        units.append(vision)
    projector = _find(model, _PROJECTOR)
    if projector is not None and any(True for _ in projector.parameters()):
        units.append(projector)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    if not tied:
        units.append(embed)
        if head is not None:
            units.append(head)
    return units


def shard_model(model: nn.Module, mesh, *, adapter=None, reshard_after_forward: bool = True) -> list[str]:
    """``fully_shard`` every unit of :func:`_units` and then the root over ``mesh`` (1-D, data
    parallel); returns the units' names. Works on a meta-device model as well."""
    from torch.distributed.fsdp import fully_shard

    if adapter is None:
        from hsr_pl.models import get_adapter

        adapter = get_adapter(model)
    if mesh.ndim != 1:
        raise ShardingError(f"shard_model needs the 1-D data-parallel mesh, got {mesh.ndim} dimensions")
    names = {id(m): n for n, m in model.named_modules()}
    recorded = _output_capture_entries(model)
    wrapped = []
    for unit in _units(model, adapter):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        wrapped.append(names.get(id(unit), "?"))
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _restore_output_capture(recorded)
    return wrapped


def _output_capture_entries(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """transformers keys what a (sub)model may record (hidden states, attentions) on its class's
    name; ``fully_shard`` swaps the class for an ``FSDP<Name>`` subclass, so the entries are
    noted before and registered for the new classes after (else e.g. LLaVA's vision tower
    returns no hidden states)."""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry: nothing to keep
        return []
    return [(m, _CAN_RECORD_REGISTRY.get(m)) for m in model.modules() if isinstance(m, PreTrainedModel)]


def _restore_output_capture(entries: list[tuple[nn.Module, dict]]) -> None:
    if not entries:
        return
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    for module, entry in entries:
        if entry and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = entry


# ---------------------------------------------------------------------------------- loading
@contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (rotary
    frequencies and other computed buffers keep their constructed values; :func:`load_sharded`
    overwrites those a checkpoint carries). Each parameter is created on the CPU and moved to
    meta at registration, before any initialisation runs on it: one parameter at a time."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """``{checkpoint tensor name: file}`` from ``model.safetensors`` or the index of shards."""
    from safetensors import safe_open

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), "pt") as handle:
            return {key: single for key in handle.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(k): folder / str(v) for k, v in weight_map.items()}
    raise ShardingError(f"{folder} has no model.safetensors (or index); save the weights with save_pretrained")


def checkpoint_name_mapper(model: nn.Module):
    """``checkpoint key -> model parameter name`` as ``from_pretrained`` renames them (legacy
    layouts such as LLaVA's ``language_model.model.*``); weight conversions beyond renaming
    (fused or split tensors) are refused: the sharded loader copies rows, it does not convert.
    Build it before ``fully_shard`` (which renames the module classes transformers looks up)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # older transformers: the names are the model's own
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = dict.fromkeys(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)

    def mapped(key: str) -> str:
        renamed, converter = rename_source_key(key, renamings, converters, base_model_prefix=prefix, meta_state_dict=names)
        if converter is not None:
            raise ShardingError(
                f"{getattr(model.config, 'model_type', '?')}: checkpoint tensor {key!r} needs a weight conversion "
                f"({converter}) that the sharded loader does not do; load it with strategy ddp, or re-save it in the "
                "model's own layout"
            )
        return renamed

    return mapped


def _shard_bounds(param: Tensor) -> tuple[int, int]:
    """``[start, end)`` of the rows this rank holds of the ``Shard(0)`` DTensor ``param``."""
    from torch.distributed.tensor import Shard

    if len(param.placements) != 1 or not isinstance(param.placements[0], Shard) or param.placements[0].dim != 0:
        raise ShardingError(f"parameter placements {param.placements} are not Shard(0); shard with fully_shard")
    rows = param.shape[0]
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    size = math.ceil(rows / world) if rows else 0
    start = min(rows, rank * size)
    return start, min(rows, start + size)


@torch.no_grad()
def load_sharded(
    model: nn.Module, folder: str | Path, device: torch.device | str = "cpu", *, names=None
) -> dict[str, int]:
    """Materialise the meta parameters of the sharded ``model`` on ``device`` and fill them from
    the checkpoint ``folder``: each rank reads only its own rows of each tensor (``get_slice``).

    Returns ``{"read_bytes": …, "tensors": …}`` for this rank. Every parameter must be in the
    checkpoint, else a :class:`ShardingError` names the first missing one. ``names``: the
    :func:`checkpoint_name_mapper` built before sharding.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = _checkpoint_files(folder)
    mapped = names or checkpoint_name_mapper(model)
    by_model_name = {mapped(k): (k, f) for k, f in files.items()}
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in by_model_name]
    if missing:
        raise ShardingError(
            f"{folder}: the checkpoint lacks {len(missing)} parameter(s) of the model (e.g. {missing[0]!r}); re-save the "
            "checkpoint with save_pretrained"
        )
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            buffers = {n: b.detach().clone() for n, b in module.named_buffers(recurse=False) if not b.is_meta}
            module.to_empty(device=device, recurse=False)
            for name, value in buffers.items():
                getattr(module, name).copy_(value)
    handles: dict[Path, object] = {}
    read = 0
    try:
        for name, param in params.items():
            key, file = by_model_name[name]
            if file not in handles:
                handles[file] = safe_open(str(file), "pt")
            piece = handles[file].get_slice(key)
            shape = tuple(piece.get_shape())
            if shape != tuple(param.shape):
                raise ShardingError(f"{file.name}: {key} has shape {shape}, the model's {name} {tuple(param.shape)}")
            if is_sharded(param):
                start, end = _shard_bounds(param)
                local = param.to_local()
                rows = piece[start:end] if end > start else torch.empty(0, *shape[1:])
                local.copy_(rows.to(local.dtype))
                read += rows.numel() * rows.element_size()
            else:
                value = piece[:]
                param.data.copy_(value.to(param.dtype))
                read += value.numel() * value.element_size()
        for name, buffer in model.named_buffers():  # persistent buffers a checkpoint carries (small, whole)
            if name in by_model_name and not is_sharded(buffer):
                key, file = by_model_name[name]
                if file not in handles:
                    handles[file] = safe_open(str(file), "pt")
                value = handles[file].get_tensor(key)
                if tuple(value.shape) != tuple(buffer.shape):
                    raise ShardingError(f"{file.name}: {key} has shape {tuple(value.shape)}, the model's {name} "
                                        f"{tuple(buffer.shape)}")
                buffer.copy_(value.to(buffer.dtype))
    finally:
        handles.clear()
    return {"read_bytes": int(read), "tensors": len(params)}


# ---------------------------------------------------------------------------------- export
def iter_full_state(model: nn.Module, *, keep: bool = True) -> Iterator[tuple[str, Tensor | None]]:
    """``(name, full CPU tensor)`` for every parameter and persistent buffer, one at a time.

    Sharded tensors are gathered one by one (every rank must iterate in step); ``keep=False``
    (the ranks that do not write) yields None instead of the tensor, so they drop it at once."""
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        value = full_tensor(param)
        yield name, value.to("cpu").contiguous() if keep else None
        del value
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf in getattr(module, "_non_persistent_buffers_set", ()):
            continue
        yield name, full_tensor(buffer).to("cpu").contiguous() if keep else None


# ---------------------------------------------------------------------------------- lockstep
def check_lockstep(count: int, what: str, fix: str) -> None:
    """Every rank must run ``count`` forwards (a sharded forward is a collective); the same
    :class:`ShardingError` on every rank when they differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    counts = torch.tensor([count, -count], dtype=torch.int64, device=collective_device())
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    counts = counts.cpu()
    high, low = int(counts[0]), -int(counts[1])
    if high != low:
        raise ShardingError(f"{what}: the ranks got {low} to {high} batches, but a sharded model needs equal counts; {fix}")


# ---------------------------------------------------------------------------------- fail fast
_ERROR_KEY = "hsr_pl/first_error/"
_SEEN_KEY = "hsr_pl/error_seen/"
# Steps are entered in the same order on every rank, so this count names the same step everywhere:
# each step's error lives under its own key, and an error caught by a script cannot leak into the
# next step of the same process group.
_STEPS = [0]
# What the watchdog must undo before it ends a stuck process (os._exit skips every finally).
_ON_ABORT: list = []


@contextmanager
def undo_on_abort(action) -> Iterator[None]:
    """Run ``action()`` if :func:`fail_fast`'s watchdog ends this process inside the block (a
    half-written temporary folder, say); normal exits and exceptions leave it to the caller."""
    _ON_ABORT.append(action)
    try:
        yield
    finally:
        _ON_ABORT.remove(action)


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no process group, or a store we cannot reach
        return None


def _peer_error(store, timeout: float, key: str) -> str | None:
    """The first error a rank published under ``key``, waiting up to ``timeout`` s for one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if store.check([key]):
                return store.get(key).decode("utf-8", "replace")
        except Exception:  # the store's host went away: nothing more to learn
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


@contextmanager
def fail_fast(what: str, *, grace: float = 2.0, linger: float = 10.0, poll: float = 0.2) -> Iterator[None]:
    """Make a multi-rank step end on every rank with the first error, within a bounded time.

    * The rank that raises first writes ``"rank <r>: <error>"`` to the process group's store
      (first writer wins), keeps the store up until every peer has read it (rank 0 hosts it; at
      most ``linger`` s) and re-raises.
    * A peer whose own collective then fails finds that error and raises :class:`PeerFailedError`
      carrying it.
    * A peer still blocked in a collective cannot be interrupted from Python (gloo and NCCL wait
      in C++; aborting a gloo process group does not release the wait): a watchdog thread that
      sees the error, and sees this rank still inside the step ``grace`` s later, prints
      ``hsr-pl: error: <what> stopped because rank <r>: <error>`` to stderr and ends the process
      with status 1.

    So every rank ends within about ``poll + grace`` s of the first error. Without a process
    group (or with one rank) this is a no-op.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    store = _store()
    if store is None:
        yield
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    _STEPS[0] += 1
    key, seen = f"{_ERROR_KEY}{_STEPS[0]}", f"{_SEEN_KEY}{_STEPS[0]}/"
    inside = threading.Event()
    inside.set()
    watchdog = threading.Thread(
        target=_watch, args=(store, rank, what, inside, grace, poll, key, seen), name="hsr-pl-fail-fast", daemon=True
    )
    watchdog.start()
    try:
        yield
    except PeerFailedError:
        inside.clear()
        raise
    except BaseException as exc:
        inside.clear()
        first = _peer_error(store, 0.0, key)
        if first is None and _looks_collective(exc):
            first = _peer_error(store, grace, key)
        if first is not None and not first.startswith(f"rank {rank}:"):
            _mark_seen(store, rank, seen)
            raise PeerFailedError(f"{what} stopped because {first}") from exc
        text = str(exc).strip().splitlines()
        message = f"rank {rank}: {type(exc).__name__}: {text[0] if text else ''}"
        try:
            if store.compare_set(key, "", message).decode("utf-8", "replace") == message:
                _wait_seen(store, rank, world, linger, seen)
            else:  # another rank was first: it waits for our word before letting the store go
                _mark_seen(store, rank, seen)
        except Exception:  # the store is gone: our own error is all we can raise
            pass
        raise
    finally:
        inside.clear()


def _watch(
    store, rank: int, what: str, inside: threading.Event, grace: float, poll: float, key: str, seen: str
) -> None:
    """The watchdog of :func:`fail_fast`: ends this process when a peer failed and this rank
    stays stuck in the step."""
    import os
    import sys

    while inside.is_set():
        time.sleep(poll)
        first = _peer_error(store, 0.0, key) if inside.is_set() else None
        if first is None or first.startswith(f"rank {rank}:"):
            continue
        _mark_seen(store, rank, seen)
        deadline = time.monotonic() + grace
        while inside.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not inside.is_set():
            return  # the step ended on its own (and raises the peer's error itself)
        sys.stdout.flush()
        sys.stderr.write(
            f"hsr-pl: error: {what} stopped because {first} (rank {rank} was waiting for it in a collective "
            "and exits)\n"
        )
        sys.stderr.flush()
        for action in reversed(_ON_ABORT):
            try:
                action()
            except Exception:  # best effort: the process ends either way
                pass
        os._exit(1)


def _looks_collective(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "closed", "distbackend"))


def _mark_seen(store, rank: int, seen: str) -> None:
    try:
        store.set(f"{seen}{rank}", "1")
    except Exception:
        pass


def _wait_seen(store, rank: int, world: int, linger: float, seen: str) -> None:
    """Keep the store up (rank 0 hosts it) until every peer has read the error, or ``linger`` s."""
    deadline = time.monotonic() + linger
    keys = [f"{seen}{r}" for r in range(world) if r != rank]
    while time.monotonic() < deadline:
        try:
            if all(store.check([k]) for k in keys):
                return
        except Exception:
            return
        time.sleep(0.05)


def describe_sharding(model: nn.Module) -> Mapping[str, tuple[int, ...]]:
    """``{name: local shape}`` of every sharded parameter (for tests and reports)."""
    return {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if is_sharded(p)}
