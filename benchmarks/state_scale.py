"""Benchmark: HSRState's checkpoint bytes and per-step re-masking cost at scale, before vs after.

Shape: the decoder linears of a LLaMA-3.2-1B-shaped model (16 layers, hidden 2048, MLP 8192,
32 query / 8 key-value heads: 973 M prunable weights) in bfloat16 on the CPU, ~50 % of every
linear pruned at random, originals kept for q/k/v/o (the Pruning default), and realignment's
restorations on q/k/v/o of 4 layers. Only the linears exist (no embeddings): masking never
touches anything else.

* checkpoint bytes: what one Lightning checkpoint carries for the state (``torch.save`` of the
  callback's ``hsr_state`` entry into a byte counter): before, the bool masks and originals
  inline; after, a side-file reference (+ the side file, written once per distinct state);
* per-step cost: ``apply_masks`` after an "optimizer step", before (keep-mask rebuilt on the
  host and converted to the weight dtype, then copied to the device: no copy on a CPU run) and
  after (packed keep-masks cached on the device, unpacked per linear), plus the alternative of
  caching unpacked bool masks (1 byte per weight of device memory instead of 1/8);
* 7B: LLaVA-1.5-7B's decoder (LLaMA-2-7B: 32 layers, hidden 4096, MLP 11008, 32 heads, 6.48 G
  prunable weights): bytes from the same per-weight rates, times scaled by the weight count.

One torch thread, median of ``--repeats``. Usage: ``python benchmarks/state_scale.py [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hsr_pl.state import HSRState  # noqa: E402
from hsr_pl.state_file import write_state_file  # noqa: E402

RESULTS = HERE / "results"
SHAPES = {
    "1b": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8),
    "7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32),
    "quick": dict(layers=2, hidden=256, intermediate=1024, heads=4, kv_heads=2),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """``{qualified name: (out, in)}`` of every prunable decoder linear."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h // shape["heads"] * shape["kv_heads"]
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"layers.{layer}.{n}": s for layer in range(shape["layers"]) for n, s in per_layer.items()}


class _Counter(io.RawIOBase):
    """A write-only file that counts bytes (torch.save's output size without keeping it)."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)


def saved_bytes(obj) -> int:
    counter = _Counter()
    torch.save(obj, counter)
    return counter.count


def build(shape: dict) -> tuple[nn.Module, HSRState]:
    torch.manual_seed(0)
    model = nn.Module()
    state = HSRState()
    restored_layers = set(range(min(4, shape["layers"])))
    for name, (out, inp) in linear_shapes(shape).items():
        linear = nn.Linear(inp, out, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.normal_()
        model.add_module(name.replace(".", "_"), linear)
        mask = torch.rand(out, inp) < 0.5
        keep_values = name.endswith(ATTENTION)
        state.record_pruning(name.replace(".", "_"), mask, linear.weight if keep_values else None)
        if keep_values and int(name.split(".")[1]) in restored_layers:
            state.restored[name.replace(".", "_")] = mask & (torch.rand(out, inp) < 0.02)
    state.method, state.sparsity = "wanda", 0.5
    return model, state


def old_apply_masks(state: HSRState, model: nn.Module) -> None:
    """apply_masks as it was: the keep-mask rebuilt on the host every step, as the weight dtype."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in state.pruned:
            weight = modules[name].weight
            weight.mul_(state.keep_mask(name).to(weight.device, weight.dtype))


class BoolCache:
    """The alternative design: unpacked bool keep-masks cached on the device (8x the memory)."""

    def __init__(self, state: HSRState, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self.pairs = [(modules[n].weight, state.keep_mask(n).to(modules[n].weight.device)) for n in state.pruned]

    def __call__(self) -> None:
        with torch.no_grad():
            for weight, keep in self.pairs:
                weight.mul_(keep)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = "quick" if args.quick else "1b"
    shape = SHAPES[name]
    model, state = build(shape)
    weights = sum(m.numel() for m in state.pruned.values())
    pruned = sum(int(m.sum()) for m in state.pruned.values())
    originals = sum(v.numel() for v in state.originals.values())

    # ---- checkpoint bytes
    before_ckpt = saved_bytes({"hsr_state": state.state_dict()})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tensors, metadata = state.to_tensors()
        ref = write_state_file(tmp, tensors, metadata)
        first_save_s = time.perf_counter() - start
        del tensors
    after_ckpt = saved_bytes({"hsr_state": {**state.metadata(), "side_file": ref}})
    side_bytes = int(ref["bytes"])

    # ---- per-step cost (every weight requires grad: the fine-tuning case)
    old = timed(lambda: old_apply_masks(state, model), args.repeats)
    start = time.perf_counter()
    state.apply_masks(model)
    build_s = time.perf_counter() - start
    new = timed(lambda: state.apply_masks(model, only_trainable=True), args.repeats)
    device_bytes = sum(c.packed.numel() for c in state._device_keep.values())
    cache = BoolCache(state, model)
    boolean = timed(cache, args.repeats)
    bool_bytes = sum(k.numel() for _, k in cache.pairs)
    del cache

    big = linear_shapes(SHAPES["7b"])
    weights_7b = sum(o * i for o, i in big.values())
    attention_7b = sum(o * i for n, (o, i) in big.items() if n.endswith(ATTENTION))
    scale = weights_7b / weights
    per_weight = {
        "before_ckpt": before_ckpt / weights, "after_ckpt": after_ckpt / weights, "side_file": side_bytes / weights,
    }
    result = {
        "shape": name, "dims": shape, "prunable_weights": weights, "pruned": pruned, "originals": originals,
        "restored": sum(int(m.sum()) for m in state.restored.values()), "dtype": "bfloat16", "torch_threads": 1,
        "machine": "shared 2-core CPU (other jobs running)", "repeats": args.repeats, "torch": torch.__version__,
        "checkpoint_bytes_before": before_ckpt, "checkpoint_bytes_after": after_ckpt, "side_file_bytes": side_bytes,
        "first_side_file_s": first_save_s,
        "step_s_before": statistics.median(old), "step_s_after": statistics.median(new),
        "step_s_bool_cache": statistics.median(boolean), "cache_build_s": build_s,
        "step_runs": {"before": old, "after": new, "bool_cache": boolean},
        "device_mask_bytes_after": device_bytes, "device_mask_bytes_bool_cache": bool_bytes,
        "7b": {
            "prunable_weights": weights_7b, "attention_weights": attention_7b, "scale": scale,
            "checkpoint_bytes_before": per_weight["before_ckpt"] * weights_7b,
            # the side file scales with masks (all weights) and originals (half the attention weights)
            "side_file_bytes": weights_7b / 8 + (side_bytes - weights / 8) * attention_7b / max(
                sum(o * i for n, (o, i) in linear_shapes(shape).items() if n.endswith(ATTENTION)), 1),
            "checkpoint_bytes_after": after_ckpt * len(big) / len(state.pruned),
            "step_s_before": statistics.median(old) * scale, "step_s_after": statistics.median(new) * scale,
            "step_s_bool_cache": statistics.median(boolean) * scale,
            "device_mask_bytes_after": weights_7b / 8, "device_mask_bytes_bool_cache": weights_7b,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"state_scale_{name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    gib, mib = 2**30, 2**20
    b7 = result["7b"]
    lines = [
        f"# HSRState at scale ({name})",
        "",
        f"`python benchmarks/state_scale.py{' --quick' if args.quick else ''}`: {weights / 1e6:.0f} M prunable "
        f"weights ({shape}), bfloat16, {pruned / weights:.1%} pruned, {originals / 1e6:.1f} M originals kept "
        f"(q/k/v/o), {result['restored']:,} restored; CPU, 1 torch thread, {result['machine']}; "
        f"median of {args.repeats}. 7B: LLaMA-2-7B's decoder ({weights_7b / 1e9:.2f} G weights), "
        f"computed from these figures (bytes per weight; seconds x {scale:.2f}).",
        "",
        "| | before | after | 7B before | 7B after |",
        "|---|---|---|---|---|",
        f"| state bytes in each checkpoint | {before_ckpt / mib:,.1f} MiB | {after_ckpt / 1024:,.1f} KiB | "
        f"{b7['checkpoint_bytes_before'] / gib:,.2f} GiB | {b7['checkpoint_bytes_after'] / 1024:,.1f} KiB |",
        f"| side file (once per distinct state) | - | {side_bytes / mib:,.1f} MiB | - | "
        f"{b7['side_file_bytes'] / gib:,.2f} GiB |",
        f"| re-masking per training step | {result['step_s_before']:.2f} s | {result['step_s_after']:.2f} s | "
        f"{b7['step_s_before']:.1f} s | {b7['step_s_after']:.1f} s |",
        f"| host-to-device copy per step (on a GPU) | {weights * 2 / mib:,.0f} MiB (bf16 mask) | 0 | "
        f"{weights_7b * 2 / gib:,.1f} GiB | 0 |",
        f"| device memory for masks | 0 (a transient per linear) | {device_bytes / mib:,.0f} MiB | 0 | "
        f"{b7['device_mask_bytes_after'] / gib:,.2f} GiB |",
        "",
        f"Alternative: unpacked bool masks cached on the device: {result['step_s_bool_cache']:.2f} s per step "
        f"({b7['step_s_bool_cache']:.1f} s at 7B) for {bool_bytes / mib:,.0f} MiB of device memory "
        f"({b7['device_mask_bytes_bool_cache'] / gib:,.2f} GiB at 7B). Building the packed cache once: "
        f"{build_s:.2f} s; writing the side file once: {first_save_s:.2f} s.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
