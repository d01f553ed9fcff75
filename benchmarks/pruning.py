"""Benchmark: sequential Wanda / SparseGPT (hsr_pl.pruning) against a naive sequential pruner.

Model: a random-init LLaMA-shaped ``LlamaForCausalLM`` (full: hidden 1024, 8 layers, MLP 2816,
16 heads, vocab 4096, ~111 M parameters) on CPU, one torch thread. Calibration: random token ids,
all tokens count (``tokens='all'``).

The naive baseline has the same pruning maths but the obvious orchestration: for every decoder
layer it re-runs the *whole model from the embeddings* (layers < l already pruned), keeps the
raw inputs of every linear of layer l in memory ([tokens, d_in] each) and builds the statistics
from those stored matrices afterwards. The two must produce identical masks; the script checks it.

Each variant runs in its own subprocess so its peak memory is its own: we report the peak
resident set size (Linux ``VmHWM`` from /proc/self/status) and the RSS after building the model,
their difference being the pruning's own memory. Usage: ``python benchmarks/pruning.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(hidden=1024, layers=8, intermediate=2816, heads=16, vocab=4096, samples=4, seq=64)
QUICK = dict(hidden=128, layers=2, intermediate=352, heads=4, vocab=512, samples=2, seq=16)
VARIANTS = [(impl, method, nm) for method in ("wanda", "sparsegpt") for nm in ("0:0", "2:4") for impl in ("hsr_pl", "naive")]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(shape: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=max(256, shape["seq"]), tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, shape["vocab"], (1, shape["seq"]), generator=g),
         "attention_mask": torch.ones(1, shape["seq"], dtype=torch.long)}
        for _ in range(shape["samples"])
    ]
    return model, batches


def naive_sequential(model, batches, config) -> dict:
    """Whole-model re-forward per layer, raw activations stored, statistics built afterwards."""
    import torch

    from hsr_pl.models import get_adapter
    from hsr_pl.pruning import HessianStats, RowStats, prune_linear

    adapter = get_adapter(model)
    masks = {}
    for layer in adapter.layer_indices():
        linears = {adapter.name_of(m): m for m in adapter.linears(layer).values()}
        stored: dict[str, list] = {n: [] for n in linears}
        handles = [lin.register_forward_hook(lambda m, a, o, n=n, stored=stored: stored[n].append(a[0].detach().clone()))
                   for n, lin in linears.items()]
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False)
        for h in handles:
            h.remove()
        for name, lin in linears.items():
            stat = (RowStats if config.method == "wanda" else HessianStats)(lin.in_features)
            for x in stored[name]:
                stat.add(x.reshape(-1, x.shape[-1]), x.shape[0])
            mask, _ = prune_linear(lin, config, stat)
            masks[name] = mask
        del stored
    return masks


def run_variant(impl: str, method: str, nm: str, shape: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from hsr_pl.pruning import PruningConfig, prune_model

    model, batches = build(shape)
    params = sum(p.numel() for p in model.parameters())
    rss_model = _rss_mib("VmRSS")
    config = PruningConfig(method, sparsity=0.5 if nm == "0:0" else None, mask_structure=nm, tokens="all")
    start = time.perf_counter()
    if impl == "hsr_pl":
        masks = prune_model(model, batches, config).masks
    else:
        masks = naive_sequential(model, batches, config)
    wall = time.perf_counter() - start
    digest = {n: m.to(torch.uint8).flatten().tolist()[::97] for n, m in masks.items()}
    full = torch.cat([m.flatten().cpu() for _, m in sorted(masks.items())])
    Path(out).write_text(json.dumps({
        "impl": impl, "method": method, "mask_structure": nm, "params": params, "wall_s": wall,
        "rss_after_model_mib": rss_model, "peak_rss_mib": _rss_mib("VmHWM"),
        "sparsity": float(full.float().mean()), "mask_sample": digest,
        "mask_hash": int((full.to(torch.int64) * torch.arange(1, full.numel() + 1) % 1000003).sum()),
    }))


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds (CI smoke)")
    parser.add_argument("--samples", type=int, help="calibration samples (default: the shape's)")
    parser.add_argument("--seq", type=int, help="tokens per calibration sample (default: the shape's)")
    parser.add_argument("--_variant", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else FULL)
    for key in ("samples", "seq"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args._variant:
        impl, method, nm, out = args._variant
        run_variant(impl, method, nm, shape, out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl, method, nm in VARIANTS:
            out = os.path.join(tmp, f"{impl}-{method}-{nm.replace(':', '_')}.json")
            if args.quick:  # in-process: seconds, but peak memory is then the process-wide peak so far
                run_variant(impl, method, nm, shape, out)
            else:
                cmd = [sys.executable, __file__, "--samples", str(shape["samples"]), "--seq", str(shape["seq"]),
                       "--_variant", impl, method, nm, out]
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(Path(out).read_text()))
            r = rows[-1]
            print(f"{impl:7s} {method:9s} {nm}: {r['wall_s']:7.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"(+{r['peak_rss_mib'] - r['rss_after_model_mib']:.0f} over the model)", flush=True)
    summary = []
    for method in ("wanda", "sparsegpt"):
        for nm in ("0:0", "2:4"):
            ours = next(r for r in rows if r["impl"] == "hsr_pl" and r["method"] == method and r["mask_structure"] == nm)
            naive = next(r for r in rows if r["impl"] == "naive" and r["method"] == method and r["mask_structure"] == nm)
            summary.append({
                "method": method, "mask_structure": nm,
                "hsr_pl_s": ours["wall_s"], "naive_s": naive["wall_s"], "speedup": naive["wall_s"] / ours["wall_s"],
                "hsr_pl_extra_mib": ours["peak_rss_mib"] - ours["rss_after_model_mib"],
                "naive_extra_mib": naive["peak_rss_mib"] - naive["rss_after_model_mib"],
                "hsr_pl_peak_mib": ours["peak_rss_mib"], "naive_peak_mib": naive["peak_rss_mib"],
                "masks_identical": ours["mask_hash"] == naive["mask_hash"] and ours["mask_sample"] == naive["mask_sample"],
                "sparsity": ours["sparsity"],
            })
    for row in rows:
        row.pop("mask_sample")
    import torch

    meta = {
        "shape": shape, "params": rows[0]["params"], "device": "cpu", "torch_threads": 1, "torch": torch.__version__,
        "memory": ("peak resident set size (VmHWM, /proc/self/status) of a fresh process per variant; "
                   "'extra' = peak minus RSS after building the model") if not args.quick else
                  "quick mode runs in one process: VmHWM is the process-wide peak so far (smoke test only)",
        "calibration": f"{shape['samples']} samples x {shape['seq']} random tokens, tokens='all'",
        "naive": "whole-model re-forward per decoder layer, raw linear inputs stored, statistics afterwards",
    }
    name = "pruning_quick" if args.quick else "pruning"
    atomic_write(RESULTS / f"{name}.json", json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2))
    lines = [
        f"# Sequential pruning benchmark ({'quick' if args.quick else 'full'})",
        "",
        f"LLaMA-shaped random model, {meta['params'] / 1e6:.1f} M parameters ({shape}), CPU, 1 thread. "
        f"Calibration: {meta['calibration']}. Memory: {meta['memory']}.",
        f"Naive: {meta['naive']}.",
        "",
        "| method | N:M | hsr_pl s | naive s | speed-up | hsr_pl extra MiB | naive extra MiB | masks identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['mask_structure']} | {s['hsr_pl_s']:.2f} | {s['naive_s']:.2f} | {s['speedup']:.2f}x | "
            f"{s['hsr_pl_extra_mib']:.0f} | {s['naive_extra_mib']:.0f} | {s['masks_identical']} |"
        )
    atomic_write(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
