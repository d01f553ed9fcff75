"""End-to-end HSR on a 7B-shaped random-init LLaVA-NeXT in bf16: the stage times and peak memory.

Stages, on ``--calib`` utility + ``--calib`` safety synthetic prompts of ``--seq`` tokens (random
token ids; the last ``--response`` tokens of each are the "response" the statistics and losses
read; text tokens stand in for the image tokens a real prompt would carry):

1. head attribution (gradient engine: one forward + backward per batch; the exact engine's
   L²-scaling re-runs are a poor fit for a 15-minute GPU budget),
2. the realignment dense pass (utility + safety importance of the selected heads' attention
   projections), which runs before the pruner changes a weight,
3. sequential Wanda pruning at 50 %,
4. realignment with the gradient order at 1 ‱ (one backward pass over the safety prompts),

then a restore check (restored entries hold their dense values). Peak device memory is read per
stage (``torch.cuda.max_memory_allocated``; on the CPU the process's max RSS).

    python benchmarks/gpu_e2e.py --device cuda --shape 7b            # on a lent GPU (H100/H200)
    python benchmarks/gpu_e2e.py --device cpu --shape small          # the same code on a CPU

Results: benchmarks/results/gpu_e2e_<shape>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

SHAPES = {
    # text: layers, heads, kv heads, hidden, intermediate; vision: layers, hidden
    "7b": dict(layers=32, heads=32, kv=32, hidden=4096, inter=11008, vision_layers=24, vision_hidden=1024),
    "small": dict(layers=4, heads=8, kv=8, hidden=256, inter=688, vision_layers=2, vision_hidden=64),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    s = SHAPES[shape]
    text = LlamaConfig(vocab_size=32064, hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
                              num_hidden_layers=s["vision_layers"], num_attention_heads=max(1, s["vision_hidden"] // 64),
                              image_size=336, patch_size=14)
    config = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=32000)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration(config).to(dtype)
    return model.eval()


def batches(n: int, seq: int, response: int, vocab: int, device: str, seed: int, batch_size: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(3, 32000, (b, seq), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -response:] = ids[:, -response:]
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


class Stage:
    def __init__(self, device: str, rows: list) -> None:
        self.device, self.rows = device, rows

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.rows.append({"stage": self.name, "seconds": round(time.perf_counter() - self.start, 2), "peak_gib": round(peak, 2)})
        print(self.rows[-1], flush=True)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2000)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--top-h", type=int, default=10)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from hsr_pl.attribution import ScoreConfig, head_scores, top_heads
    from hsr_pl.models import get_adapter
    from hsr_pl.pruning import PruningConfig, prune_model
    from hsr_pl.realign import RealignConfig, dense_pass, realign_model
    from hsr_pl.state import HSRState

    dtype = getattr(torch, args.dtype)
    rows: list = []
    stage = Stage(args.device, rows)
    with stage(f"build model (random init, {args.dtype})"):
        model = build(args.shape, args.device, dtype)
    adapter = get_adapter(model)
    params = sum(p.numel() for p in model.parameters())
    utility = batches(args.calib, args.seq, args.response, 32000, args.device, 1, args.batch_size)
    safety = batches(args.calib, args.seq, args.response, 32000, args.device, 2, args.batch_size)
    with stage("1. head attribution (gradient engine)"):
        with torch.inference_mode(False):
            scores = head_scores(model, safety, ScoreConfig(score="kl", positions="response"), engine="gradient")
        heads = top_heads(scores, args.top_h)
    with stage("2. realignment dense pass (utility + safety importance)"):
        dense = dense_pass(model, adapter, "wanda", utility, safety, layers={layer for layer, _ in heads})
    with stage("3. sequential Wanda 50 %"):
        keep = [n for n in adapter.target_linears() if "self_attn" in n]
        result = prune_model(model, utility, PruningConfig(method="wanda", sparsity=0.5), keep_originals=keep)
    state = HSRState()
    for name, mask in result.masks.items():
        state.record_pruning(name, mask, result.originals.get(name))
    del result
    with stage("4. realignment, gradient order, 1 ‱"):
        with torch.inference_mode(False):
            out = realign_model(model, adapter, state, RealignConfig(order="gradient", budget="1‱"), heads,
                                dense=dense, safety_batches=safety)
    modules = dict(model.named_modules())
    ok = all(
        torch.equal(modules[n].weight.detach().cpu()[m], state.original_weight(n, modules[n].weight.detach())[m].to(dtype))
        for n, m in state.restored.items()
    )
    summary = {
        "shape": args.shape, "device": args.device, "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "params": params, "calib": args.calib, "seq": args.seq, "batch_size": args.batch_size, "top_h": args.top_h,
        "heads": [list(h) for h in heads], "restored": out.restored, "restored_ratio_lm": out.summary()["restored_ratio_lm"],
        "restored_values_ok": ok, "stages": rows,
        "peak_note": "GiB of torch.cuda.max_memory_allocated per stage" if args.device == "cuda" else "GiB of process max RSS (cumulative)",
    }
    out_path = args.out or Path(__file__).parent / "results" / f"gpu_e2e_{args.shape}_{args.device}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# HSR end to end: {args.shape}-shaped LLaVA-NeXT, {args.dtype}, {summary['device_name']} ({args.device})", "",
             f"{params / 1e9:.2f} B parameters; {args.calib} + {args.calib} calibration prompts of {args.seq} tokens "
             f"(batch {args.batch_size}); top-{args.top_h} heads; restored {out.restored:,} weights "
             f"({1e4 * summary['restored_ratio_lm']:.2f} ‱); restored values equal the dense ones: {ok}.", "",
             "| stage | seconds | peak GiB |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_gib']} |" for r in rows]
    lines += ["", f"Peak: {summary['peak_note']}."]
    out_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
