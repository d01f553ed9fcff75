"""Benchmark: evaluation generation — batched, length-sorted greedy decoding against an unbatched loop.

Three ways to produce the replies of one evaluation set, all through hsr-pl's own collator
(``VLGuardCollator``, left padding) and ``LVLMModule.generate`` (greedy, bounded
``max_new_tokens``):

- ``unbatched``: one prompt per ``generate`` call — the naive loop;
- ``batched``: batches of ``--batch`` prompts in the data set's order;
- ``sorted``: the same batches after ``VLGuardDataModule``'s longest-first ordering (what
  ``validate`` does), so each batch pads little.

Models (random or shipped, built locally; one torch thread):

- ``organism``: the shipped tiny aligned LLaVA on its held-out synthetic prompts (image + text);
  its prompts are all about as long, so sorting has little to gain there;
- ``llama``: a random LLaMA-shaped text model on prompts whose lengths spread from 8 to 160 words;
- ``llama-7b`` (``--preset 7b``, for a GPU): a Llama-2-7B-shaped random model in bfloat16.

The replies of the three ways are compared one by one (greedy decoding must not depend on the
batch); the script reports how many are identical. Usage:
``python benchmarks/evaluation.py [--quick] [--preset 7b --device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "llama": dict(hidden=512, layers=4, heads=8, intermediate=1376),
    "llama-quick": dict(hidden=128, layers=2, heads=4, intermediate=352),
    "llama-7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008),
}


def organism_case(n: int):
    """The shipped organism and ``n`` of its held-out synthetic prompts (harmful and utility sets)."""
    from hsr_pl.data.synthetic_module import SyntheticDataModule
    from hsr_pl.models.organism import load_organism

    model, processor = load_organism()
    data = SyntheticDataModule(eval_splits=["eval_harmful_text", "eval_harmful_image", "eval_utility"],
                               processor=processor)
    rows = [r for e in data.eval_sets for r in data.eval_rows(e)]
    random.Random(0).shuffle(rows)
    return model, processor, rows[:n]


def llama_case(shape: dict, n: int, min_words: int, max_words: int, seed: int = 0, dtype=None, device: str = "cpu"):
    """A random LLaMA-shaped causal LM (built in ``dtype`` on ``device``), its word tokenizer, and
    ``n`` prompts of spread lengths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hsr_pl.models.tiny import DEFAULT_WORDS, word_tokenizer

    tokenizer = word_tokenizer(DEFAULT_WORDS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default)
    try:
        with torch.device(device):  # a 7B model is built where it will run, not on the host first
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    rng = random.Random(seed)
    words = [w for w in DEFAULT_WORDS if w.isalpha()]
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))),
             "image": None, "record": i} for i in range(n)]
    return model, tokenizer, rows


def run(module, collate, rows, batch: int, max_new_tokens: int) -> tuple[float, dict[int, str]]:
    import torch

    replies: dict[int, str] = {}
    if module.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        inputs = {k: (v.to(module.device) if hasattr(v, "to") else v) for k, v in collate(chunk).items()}
        for row, reply in zip(chunk, module.generate(inputs, max_new_tokens)):
            replies[row["record"]] = reply
    if module.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, replies


def measure(name: str, model, processor, rows, batch: int, max_new_tokens: int, device: str) -> dict:
    import torch

    from hsr_pl.data import VLGuardDataModule
    from hsr_pl.data.collate import VLGuardCollator
    from hsr_pl.module import LVLMModule

    module = LVLMModule(model, processor=processor, max_new_tokens=max_new_tokens).to(device)
    rows = [{**r, "record": i} for i, r in enumerate(rows)]
    collate = VLGuardCollator(processor, with_response=False)
    ordered = VLGuardDataModule(processor=processor)._by_length(rows)
    tokenizer = getattr(processor, "tokenizer", processor)
    lengths = [len(tokenizer(r["instruction"], add_special_tokens=False)["input_ids"]) for r in rows]
    run(module, collate, rows[:batch], batch, 2)  # warm-up (allocator, kernels)
    timings, outputs = {}, {}
    with torch.inference_mode():
        for way, order, size in (("unbatched", rows, 1), ("batched", rows, batch), ("sorted", ordered, batch)):
            timings[way], outputs[way] = run(module, collate, order, size, max_new_tokens)
    same = {way: sum(outputs[way][i] == outputs["unbatched"][i] for i in outputs["unbatched"]) for way in outputs}
    n = len(rows)
    return {
        "case": name, "prompts": n, "batch": batch, "max_new_tokens": max_new_tokens,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / n},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": timings,
        "prompts_per_second": {way: n / t for way, t in timings.items()},
        "speedup_vs_unbatched": {way: timings["unbatched"] / t for way, t in timings.items()},
        "identical_to_unbatched": same,
    }


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"# Evaluation generation throughput{' (quick)' if meta['quick'] else ''}", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s), device {meta['device']}. "
        "Greedy decoding through `VLGuardCollator` + `LVLMModule.generate`; `sorted` is the longest-first order "
        "`validate` uses. Speed-up is against the unbatched loop of the same run. Prompt tokens: the "
        "instruction text's tokens (the chat template's and the image's tokens come on top).", "",
        "| case | parameters | prompts | prompt tokens (min / mean / max) | batch | new tokens | unbatched prompts/s "
        "| batched prompts/s | sorted prompts/s | batched speed-up | sorted speed-up | replies identical to unbatched "
        "(batched / sorted) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pt, pps, up, same = r["prompt_tokens"], r["prompts_per_second"], r["speedup_vs_unbatched"], r["identical_to_unbatched"]
        lines.append(
            f"| {r['case']} | {r['parameters'] / 1e6:.1f} M | {r['prompts']} | {pt['min']} / {pt['mean']:.0f} / {pt['max']} "
            f"| {r['batch']} | {r['max_new_tokens']} | {pps['unbatched']:.2f} | {pps['batched']:.2f} | {pps['sorted']:.2f} "
            f"| {up['batched']:.2f}x | {up['sorted']:.2f}x | {same['batched']}/{r['prompts']} / {same['sorted']}/{r['prompts']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--preset", choices=["cpu", "7b"], default="cpu",
                        help="cpu: organism + a small LLaMA; 7b: a Llama-2-7B-shaped model (needs a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    results = []
    if args.preset == "7b":
        model, tok, rows = llama_case(SHAPES["llama-7b"], 64, 8, 400, dtype=torch.bfloat16, device=args.device)
        results.append(measure("llama-7b (random, bf16)", model, tok, rows, args.batch, 64, args.device))
        name = "evaluation_7b"
    else:
        n_org, n_llama = (24, 16) if args.quick else (96, 64)
        model, processor, rows = organism_case(n_org)
        results.append(measure("organism (shipped LLaVA)", model, processor, rows, args.batch, 12, args.device))
        shape = SHAPES["llama-quick" if args.quick else "llama"]
        model, tok, rows = llama_case(shape, n_llama, 8, 160)
        results.append(measure("llama (random)", model, tok, rows, args.batch, 8 if args.quick else 24, args.device))
        name = "evaluation_quick" if args.quick else "evaluation"
    meta = {"quick": args.quick, "preset": args.preset, "device": args.device, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()}-core CPU (shared)" if args.device == "cpu" else args.device}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(meta, results))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()
