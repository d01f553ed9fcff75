"""Benchmark: safety-head attribution engines on a LLaMA-shaped random model, in one run.

naive loop (one full forward per ablated head) vs exact engine (cached layer inputs, only layers
l..L-1 re-run, heads batched) vs gradient engine (one forward + backward per batch, loglik and
Fisher estimators). Reports wall-time ratios against naive, the max abs/rel difference between
exact and naive scores, and the gradient engine's Spearman ρ and top-10 overlap against exact.

    python benchmarks/head_attribution.py            # CPU: 12 layers × 12 heads, ~minutes
    python benchmarks/head_attribution.py --quick    # seconds
    # GPU (not run yet): 7B-shaped LLaMA, 2000-token prompts; naive is timed on a subset of heads
    # and extrapolated per head (a naive full scan would take hours)
    python benchmarks/head_attribution.py --device cuda --dtype bfloat16 --shape 7b --seq 2000 \\
        --num-prompts 8 --batch-size 1 --naive-subset 32
    # the same code path, scaled down so it runs on a CPU:
    python benchmarks/head_attribution.py --shape 7b --shrink 8 --max-layers 3 --seq 48 \\
        --dtype bfloat16 --num-prompts 2 --batch-size 1 --naive-subset 8

Results: benchmarks/results/head_attribution[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hsr_pl.attribution import (
    ScoreConfig,
    exact_head_scores,
    gradient_head_scores,
    naive_head_scores,
)
from hsr_pl.state import parse_head_key

SHAPES = {
    # name: (layers, heads, kv heads, hidden, intermediate, vocab)
    "bench": (12, 12, 12, 384, 1024, 32000),
    "quick": (4, 4, 4, 64, 128, 1000),
    "7b": (32, 32, 32, 4096, 11008, 32000),
}


def build_model(shape: str, shrink: int, max_layers: int | None, dtype: torch.dtype, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, heads, kv, hidden, inter, vocab = SHAPES[shape]
    if shrink > 1:
        if heads % shrink or hidden % shrink:
            raise SystemExit(f"--shrink {shrink} must divide heads={heads} and hidden={hidden}")
        heads, kv, hidden, inter = heads // shrink, max(1, kv // shrink), hidden // shrink, inter // shrink
    if max_layers is not None:
        layers = min(layers, max_layers)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval(), config


def make_batches(n: int, batch_size: int, seq: int, resp: int, vocab: int, device: str, seed: int) -> list[dict]:
    """Random prompts of lengths in [seq/2, seq], left padded, each followed by ``resp`` response
    tokens marked in ``labels`` (the teacher-forced 'refusal')."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        lengths = torch.randint(max(2, seq // 2), seq + 1, (rows,), generator=g)
        width = int(lengths.max()) + resp
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        labels = torch.full((rows, width), -100, dtype=torch.long)
        for r, length in enumerate(lengths.tolist()):
            total = length + resp
            ids[r, width - total :] = torch.randint(1, vocab, (total,), generator=g)
            mask[r, width - total :] = 1
            labels[r, width - resp :] = ids[r, width - resp :]
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return batches


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman ρ with average ranks for ties."""

    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(t):  # average ranks of ties
            idx = t == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def top_overlap(a: dict[str, float], b: dict[str, float], k: int) -> int:
    top = lambda s: set(sorted(s, key=lambda key: (-s[key], parse_head_key(key)))[:k])  # noqa: E731
    return len(top(a) & top(b))


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def subset_heads(layers: int, heads: int, k: int) -> list[tuple[int, int]]:
    """``k`` heads spread evenly over all (layer, head) pairs (deterministic)."""
    total = layers * heads
    picks = sorted({round(i * (total - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [0]
    return [(p // heads, p % heads) for p in picks]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, seconds")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--shrink", type=int, default=1, help="divide heads/hidden/intermediate (CPU check of big shapes)")
    ap.add_argument("--max-layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--seq", type=int, default=None, help="max prompt length (tokens)")
    ap.add_argument("--resp", type=int, default=8, help="response tokens per prompt")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--positions", choices=["last", "response"], default="response")
    ap.add_argument("--ablation", default="head")
    ap.add_argument("--max-batch-heads", type=int, default=None)
    ap.add_argument("--max-batch-bytes", type=float, default=None, help="exact engine activation budget (bytes)")
    ap.add_argument("--naive-subset", type=int, default=None,
                    help="time naive on this many heads and extrapolate per head (big models)")
    ap.add_argument("--probes", type=int, default=4, help="Fisher estimator probes per batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None, help="results file suffix")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    shape = args.shape or ("quick" if args.quick else "bench")
    seq = args.seq or (8 if args.quick else 24)
    n = args.num_prompts or (4 if args.quick else 16)
    dtype = getattr(torch, args.dtype)
    model, config = build_model(shape, args.shrink, args.max_layers, dtype, args.device, args.seed)
    batches = make_batches(n, args.batch_size, seq, args.resp, config.vocab_size, args.device, args.seed + 1)
    cfg = ScoreConfig(positions=args.positions, ablation=args.ablation)
    L, H = config.num_hidden_layers, config.num_attention_heads
    exact_kwargs = dict(max_batch_heads=args.max_batch_heads,
                        max_batch_bytes=None if args.max_batch_bytes is None else int(args.max_batch_bytes))
    print(f"model {shape} shrink {args.shrink}: {L} layers × {H} heads, hidden {config.hidden_size}, "
          f"{n} prompts ≤ {seq}+{args.resp} tokens, {args.device} {args.dtype}", flush=True)

    subset = None if args.naive_subset is None else subset_heads(L, H, args.naive_subset)
    naive, t_naive = timed(lambda: naive_head_scores(model, batches, cfg, heads=subset), args.device)
    naive_heads = len(naive)
    t_naive_full = t_naive * (L * H) / naive_heads  # extrapolated when a subset was timed
    print(f"naive   {t_naive:8.2f} s for {naive_heads} heads (full scan {t_naive_full:.2f} s)", flush=True)
    exact, t_exact = timed(lambda: exact_head_scores(model, batches, cfg, **exact_kwargs), args.device)
    print(f"exact   {t_exact:8.2f} s ({t_exact / t_naive_full:.3f} × naive)", flush=True)
    grad, t_grad = timed(lambda: gradient_head_scores(model, batches, cfg), args.device)
    print(f"grad    {t_grad:8.2f} s ({t_grad / t_naive_full:.4f} × naive)", flush=True)
    fisher, t_fisher = timed(
        lambda: gradient_head_scores(model, batches, cfg, estimator="fisher", probes=args.probes, seed=args.seed),
        args.device,
    )
    print(f"fisher  {t_fisher:8.2f} s ({t_fisher / t_naive_full:.4f} × naive)", flush=True)

    keys = list(naive)
    abs_diff = max(abs(exact[k] - naive[k]) for k in keys)
    rel_diff = max(abs(exact[k] - naive[k]) / max(abs(naive[k]), 1e-30) for k in keys)
    order = list(exact)
    k_top = min(10, len(order))
    result = {
        "model": {"shape": shape, "shrink": args.shrink, "layers": L, "heads": H,
                  "kv_heads": config.num_key_value_heads, "hidden": config.hidden_size,
                  "intermediate": config.intermediate_size, "vocab": config.vocab_size},
        "data": {"prompts": n, "batch_size": args.batch_size, "max_prompt_tokens": seq, "response_tokens": args.resp},
        "score": {"score": cfg.score, "positions": cfg.positions, "ablation": cfg.ablation, "epsilon": cfg.epsilon},
        "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "naive_heads_timed": naive_heads, "naive_extrapolated": naive_heads != L * H,
        "seconds": {"naive": t_naive, "naive_full_scan": t_naive_full, "exact": t_exact,
                    "gradient_loglik": t_grad, "gradient_fisher": t_fisher},
        "ratio_vs_naive": {"exact": t_exact / t_naive_full, "gradient_loglik": t_grad / t_naive_full,
                           "gradient_fisher": t_fisher / t_naive_full},
        "exact_vs_naive": {"heads_compared": len(keys), "max_abs_diff": abs_diff, "max_rel_diff": rel_diff},
        "gradient_vs_exact": {
            "loglik": {"spearman": spearman([exact[k] for k in order], [grad[k] for k in order]),
                       f"top{k_top}_overlap": top_overlap(exact, grad, k_top)},
            f"fisher_{args.probes}probes": {
                "spearman": spearman([exact[k] for k in order], [fisher[k] for k in order]),
                f"top{k_top}_overlap": top_overlap(exact, fisher, k_top)},
        },
        "targets": {"exact_le_0.45_naive": t_exact / t_naive_full <= 0.45,
                    "gradient_le_0.02_naive": t_grad / t_naive_full <= 0.02},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    tag = args.tag or ("quick" if args.quick else None)
    stem = "head_attribution" + (f"_{tag}" if tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    _write(out / f"{stem}.md", _markdown(result))
    print(_markdown(result))
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _markdown(r: dict) -> str:
    m, s, q = r["model"], r["seconds"], r["ratio_vs_naive"]
    gv = r["gradient_vs_exact"]
    lines = [
        "# Head attribution engines",
        "",
        f"`{r['command']}`",
        "",
        f"LLaMA-shaped random model: {m['layers']} layers × {m['heads']} heads (kv {m['kv_heads']}), hidden "
        f"{m['hidden']}, MLP {m['intermediate']}, vocab {m['vocab']}; {r['data']['prompts']} prompts of ≤ "
        f"{r['data']['max_prompt_tokens']} + {r['data']['response_tokens']} tokens, batch {r['data']['batch_size']}; "
        f"score {r['score']['score']}/{r['score']['positions']}, ablation {r['score']['ablation']}; "
        f"{r['device']} {r['dtype']}, {r['threads']} thread(s).",
        "",
        "| engine | seconds | × naive |",
        "|---|---|---|",
        f"| naive | {s['naive_full_scan']:.2f}{' (extrapolated from ' + str(r['naive_heads_timed']) + ' heads)' if r['naive_extrapolated'] else ''} | 1 |",
        f"| exact | {s['exact']:.2f} | {q['exact']:.3f} |",
        f"| gradient (loglik) | {s['gradient_loglik']:.2f} | {q['gradient_loglik']:.4f} |",
        f"| gradient (fisher) | {s['gradient_fisher']:.2f} | {q['gradient_fisher']:.4f} |",
        "",
        f"Exact vs naive over {r['exact_vs_naive']['heads_compared']} heads: max abs diff "
        f"{r['exact_vs_naive']['max_abs_diff']:.3g}, max rel diff {r['exact_vs_naive']['max_rel_diff']:.3g}.",
        "",
        "| gradient estimator vs exact | Spearman ρ | top-10 overlap |",
        "|---|---|---|",
    ]
    for name, v in gv.items():
        top = next(val for key, val in v.items() if key.startswith("top"))
        lines.append(f"| {name} | {v['spearman']:.3f} | {top} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
