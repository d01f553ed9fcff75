"""HSRState's compact representation: packed bits, device keep-masks re-applied without a host
round trip (rebuilt whenever a mask changes), and the safetensors side file with its hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hsr_pl.state as state_module
from hsr_pl.state import HSRState
from hsr_pl.state_file import (
    FORMAT,
    StateFileError,
    content_hash,
    pack_bits,
    read_state_file,
    state_file_name,
    unpack_bits,
    write_state_file,
)


def pruned_model(seed: int = 0) -> tuple[nn.Module, HSRState, dict[str, torch.Tensor]]:
    """Two linears pruned at random (~half), dense weights kept as originals for the first."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 7), nn.Linear(7, 5))
    state = HSRState()
    dense = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))
            dense[name] = module.weight.detach().clone()
            mask = torch.rand(module.weight.shape, generator=g) < 0.5
            state.record_pruning(name, mask, module.weight if name == "0" else None)
    state.apply_masks(model)
    return model, state, dense


def old_apply(state: HSRState, weight: torch.Tensor, name: str) -> torch.Tensor:
    """What apply_masks computed before: weight * keep-mask as the weight's dtype."""
    return weight * state.keep_mask(name).to(weight.dtype)


# ------------------------------------------------------------------------------ packed bits
@pytest.mark.parametrize("shape", [(1,), (8,), (13,), (3, 5), (7, 16), (0,)])
def test_pack_bits_round_trips_and_matches_numpy_little_bit_order(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    back = unpack_bits(packed, shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)
    for dtype in (torch.bfloat16, torch.float32):
        as_dtype = unpack_bits(packed, shape, dtype)
        assert as_dtype.dtype == dtype and torch.equal(as_dtype, mask.to(dtype))
    with pytest.raises(ValueError, match="do not hold"):
        unpack_bits(packed, (mask.numel() + 9,))


# ------------------------------------------------------------------------- device keep-masks
def test_apply_masks_is_bitwise_the_old_multiply_and_keeps_restored_entries():
    model, state, _ = pruned_model()
    modules = dict(model.named_modules())
    restored = torch.zeros_like(state.pruned["0"])
    restored[state.pruned["0"].nonzero()[:3].unbind(1)] = True
    state.restored["0"] = restored
    with torch.no_grad():
        for module in modules.values():
            if isinstance(module, nn.Linear):
                module.weight.add_(1.0)  # an "optimizer step" that revives pruned entries
    expected = {n: old_apply(state, modules[n].weight.detach(), n) for n in state.pruned}
    state.apply_masks(model)
    for name, want in expected.items():
        got = modules[name].weight.detach()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name  # bits, -0.0 included
    assert bool((modules["0"].weight[restored] != 0).all())


def test_device_keep_masks_are_built_once_and_rebuilt_when_a_mask_changes(monkeypatch):
    model, state, _ = pruned_model()
    modules = dict(model.named_modules())
    built: list[int] = []
    real = state_module.pack_bits
    monkeypatch.setattr(state_module, "pack_bits", lambda mask: built.append(1) or real(mask))

    def step() -> None:
        with torch.no_grad():
            modules["0"].weight.add_(0.5)
            modules["1"].weight.add_(0.5)
        state.apply_masks(model)
        for name in state.pruned:
            assert bool((modules[name].weight[~state.keep_mask(name)] == 0).all()), name

    state.invalidate_masks()
    step()
    step()
    assert len(built) == 2  # one per linear, reused by the second step
    restored = torch.zeros_like(state.pruned["0"])
    restored[tuple(state.pruned["0"].nonzero()[0].tolist())] = True
    state.restored["0"] = restored  # a new tensor
    step()
    assert len(built) == 3 and modules["0"].weight[tuple(state.pruned["0"].nonzero()[0].tolist())] != 0
    state.restored["0"][tuple(state.pruned["0"].nonzero()[1].tolist())] = True  # edited in place
    step()
    assert len(built) == 4 and int((modules["0"].weight[state.pruned["0"]] != 0).sum()) == 2
    extra = ~state.pruned["1"] & (torch.arange(state.pruned["1"].numel()).view_as(state.pruned["1"]) % 3 == 0)
    state.add_pruned("1", extra, modules["1"].weight)
    step()
    assert len(built) == 5 and bool((modules["1"].weight[extra] == 0).all())
    state.invalidate_masks()
    step()
    assert len(built) == 7


def test_only_trainable_skips_frozen_weights_and_a_full_apply_masks_them():
    model, state, _ = pruned_model()
    modules = dict(model.named_modules())
    modules["1"].weight.requires_grad_(False)
    state.invalidate_masks()
    with torch.no_grad():
        modules["0"].weight.add_(1.0)
        modules["1"].weight.add_(1.0)
    state.apply_masks(model, only_trainable=True)
    assert bool((modules["0"].weight[state.pruned["0"]] == 0).all())
    assert bool((modules["1"].weight[state.pruned["1"]] != 0).all())  # untouched
    state.apply_masks(model)
    assert bool((modules["1"].weight[state.pruned["1"]] == 0).all())
    assert "1" not in state._device_keep  # frozen weights get no device copy


def test_inference_tensors_as_masks_are_applied_too():
    model, state, _ = pruned_model()
    with torch.inference_mode():
        state.restored["0"] = state.pruned["0"].clone()  # an inference tensor: no version counter
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules["0"].weight.add_(1.0)
    state.apply_masks(model)
    assert bool((modules["0"].weight != 0).all())  # everything restored


# ------------------------------------------------------------------------------ side file
def test_to_tensors_round_trips_the_state_dict():
    _, state, _ = pruned_model()
    state.restored["1"] = state.pruned["1"] & (torch.rand(state.pruned["1"].shape) < 0.3)
    tensors, metadata = state.to_tensors()
    assert metadata["format"] == FORMAT and all(t.dtype != torch.bool for t in tensors.values())
    back = HSRState.tensors_state(tensors, metadata)
    for kind in ("pruned", "originals", "restored"):
        assert back[kind].keys() == getattr(state, kind).keys()
        for name, tensor in getattr(state, kind).items():
            assert torch.equal(back[kind][name], tensor), (kind, name)
    with pytest.raises(ValueError, match="unexpected tensor"):
        HSRState.tensors_state({"weights/x": torch.zeros(1)}, metadata)


def test_side_file_is_written_once_per_content_and_found_after_a_move(tmp_path):
    _, state, _ = pruned_model()
    tensors, metadata = state.to_tensors()
    ref = write_state_file(tmp_path / "a", tensors, metadata)
    path = tmp_path / "a" / ref["file"]
    assert ref["file"] == state_file_name(ref["sha256"]) and path.is_file() and ref["bytes"] == path.stat().st_size
    assert not list((tmp_path / "a").glob("*.tmp"))
    assert json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])  # safetensors header
    stamp = path.stat().st_mtime_ns
    assert write_state_file(tmp_path / "a", tensors, metadata) == ref and path.stat().st_mtime_ns == stamp
    dry = write_state_file(tmp_path / "b", tensors, metadata, write=False)
    assert dry["sha256"] == ref["sha256"] and not (tmp_path / "b").exists()
    loaded, meta = read_state_file(ref)
    assert content_hash(loaded, meta) == ref["sha256"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    path.rename(moved / ref["file"])
    with pytest.raises(StateFileError, match=ref["file"]):
        read_state_file(ref, [tmp_path])
    loaded, _ = read_state_file(ref, [tmp_path, moved])
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_side_file_with_other_contents_is_refused(tmp_path):
    _, state, _ = pruned_model(0)
    tensors, metadata = state.to_tensors()
    ref = write_state_file(tmp_path, tensors, metadata)
    _, other, _ = pruned_model(1)
    other_ref = write_state_file(tmp_path / "other", *other.to_tensors())
    (tmp_path / "other" / other_ref["file"]).replace(tmp_path / ref["file"])
    with pytest.raises(StateFileError, match="other contents"):
        read_state_file(ref)
    (tmp_path / ref["file"]).write_bytes(b"not a safetensors file")
    with pytest.raises(StateFileError, match="not a readable safetensors"):
        read_state_file(ref)
