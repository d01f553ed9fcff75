"""Realignment benchmarks.

``--part selection``: the HSR rule + head restriction on 7B-sized matrices (4096×4096 q/o,
11008×4096 MLP-shaped, and a GQA 1024×4096 k/v projection), hsr-pl's vectorised selection against
a baseline shaped like the released script (torch.topk sets, unique/isin, then a per-index Python
loop over the candidates that keeps those inside the head's input columns); the two must select
the same entries (scores are tie-free). Each variant runs in a fresh process so its peak RSS
increase is its own. Also: bytes of the importance statistics hsr-pl keeps (two d_in vectors per
linear) against the two full score matrices the released script pickles per linear.

``--part organism``: the shipped organism pruned with Wanda at 60 % and 70 %: dense / pruned /
realigned attack success rates (three judges), utility and over-refusal on the held-out sets,
for each ``selection`` and each ``order`` at budgets 25 … 3000 and the paper's unbudgeted rule.

    python benchmarks/realign.py --part selection --out benchmarks/results/realign_selection
    python benchmarks/realign.py --part organism  --out benchmarks/results/realign_organism
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {"q_proj 4096x4096": (4096, 4096, "q"), "mlp 11008x4096": (11008, 4096, "q"), "gqa k_proj 1024x4096": (1024, 4096, "k")}
GEOMETRY = dict(num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096)
HEADS = [3, 17]
P, Q, MAX_P = 0.5, 0.5, 0.7


def _scores(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g), torch.rand(rows, cols, generator=g)


def released_style(u: torch.Tensor, s: torch.Tensor, role: str) -> torch.Tensor:
    """topk / unique / isin sets as the released script, then a per-index loop over candidates."""
    numel, cols = u.numel(), u.shape[1]
    top_p = torch.topk(u.flatten(), int(P * numel)).indices
    top_max = torch.topk(u.flatten(), int(MAX_P * numel)).indices
    top_q = torch.topk(s.flatten(), int(Q * numel)).indices
    unique_q = torch.unique(top_q)
    keep = torch.isin(unique_q, torch.unique(top_max)) & ~torch.isin(unique_q, torch.unique(top_p))
    filtered = unique_q[keep].tolist()
    heads, kv = GEOMETRY["num_heads"], GEOMETRY["num_kv_heads"]
    width = cols // (heads if role == "q" else kv)
    groups = [h if role == "q" else h // (heads // kv) for h in HEADS]
    ranges = [(g * width, (g + 1) * width) for g in sorted(set(groups))]
    mask = bytearray(numel)
    for idx in filtered:  # the per-index loop
        c = idx % cols
        for lo, hi in ranges:
            if lo <= c < hi:
                mask[idx] = 1
                break
    return torch.frombuffer(mask, dtype=torch.bool).reshape(u.shape)


def vectorised(u: torch.Tensor, s: torch.Tensor, role: str) -> torch.Tensor:
    from hsr_pl.models.adapters import HeadGeometry
    from hsr_pl.realign import candidate_mask, head_slice_mask

    geo = HeadGeometry(**GEOMETRY)
    return candidate_mask(u, s, P, Q, MAX_P) & head_slice_mask(role, tuple(u.shape), geo, HEADS, "reference")


def _child(shape_name: str, variant: str) -> dict:
    torch.set_num_threads(1)
    import hsr_pl.realign  # noqa: F401  (imports are not part of either timing)
    rows, cols, role = SHAPES[shape_name]
    u, s = _scores(rows, cols)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    mask = (released_style if variant == "released" else vectorised)(u, s, role)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import hashlib

    digest = hashlib.sha256(mask.contiguous().numpy().tobytes()).hexdigest()
    return {"seconds": seconds, "peak_extra_mib": (peak - base) / 1024, "selected": int(mask.sum()), "digest": digest}


def selection(out: Path) -> None:
    rows = []
    for shape_name, (r, c, role) in SHAPES.items():
        result = {}
        for variant in ("vectorised", "released"):
            proc = subprocess.run([sys.executable, __file__, "--child", shape_name, variant], capture_output=True,
                                  text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        same = result["vectorised"]["selected"] == result["released"]["selected"] and \
            result["vectorised"]["digest"] == result["released"]["digest"]
        stats = 2 * c * 4
        full = 2 * r * c * 4
        rows.append({
            "shape": shape_name, "role": role, "selected": result["vectorised"]["selected"], "same_selection": same,
            "vectorised_s": result["vectorised"]["seconds"], "released_style_s": result["released"]["seconds"],
            "speedup": result["released"]["seconds"] / result["vectorised"]["seconds"],
            "vectorised_peak_extra_mib": result["vectorised"]["peak_extra_mib"],
            "released_style_peak_extra_mib": result["released"]["peak_extra_mib"],
            "stat_bytes": stats, "score_matrix_bytes": full, "stat_ratio": stats / full,
        })
        print(rows[-1], flush=True)
    _write(out, {"part": "selection", "heads": HEADS, "p": P, "q": Q, "max_p": MAX_P, "rows": rows,
                 "machine": "shared 2-core CPU, 1 thread, fresh process per variant"})
    lines = [
        "| matrix | selected | same selection | vectorised s | released-style s | speed-up | vectorised peak MiB | released-style peak MiB | statistics bytes | score-matrix bytes | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['selected']:,} | {'yes' if row['same_selection'] else 'NO'} | {row['vectorised_s']:.3f} | "
            f"{row['released_style_s']:.2f} | {row['speedup']:.0f}× | {row['vectorised_peak_extra_mib']:.0f} | "
            f"{row['released_style_peak_extra_mib']:.0f} | {row['stat_bytes']:,} | {row['score_matrix_bytes']:,} | "
            f"1/{1 / row['stat_ratio']:.0f} |"
        )
    (out.with_suffix(".md")).write_text(
        "# Realignment selection benchmark\n\n"
        f"Heads {HEADS} of a 32-head / 8-KV-head layer (`selection: reference`, p={P}, q={Q}, max_p={MAX_P}); "
        "random tie-free scores; one thread, each variant in a fresh process (peak = increase of max RSS during the "
        "selection). Released-style = torch.topk sets, unique/isin, per-index Python loop over the candidates.\n\n"
        + "\n".join(lines) + "\n"
    )


# ------------------------------------------------------------------------------ organism
BUDGETS = [25, 50, 100, 200, 400, 800, 1600, 3000]
JUDGES = ["strict", "keyword-gcg-nocase", "coherent-compliance"]


def organism(out: Path, sparsities: list[float], budgets: list[int]) -> None:
    from organism_realign import OrganismBench  # the sibling helper (benchmarks/ is on sys.path)

    bench = OrganismBench(judges=JUDGES)
    results = {"judges": JUDGES, "budgets": budgets, "runs": []}
    dense = bench.evaluate_dense()
    results["dense"] = dense
    for sparsity in sparsities:
        bench.prune(sparsity)
        pruned = bench.evaluate_current()
        results["runs"].append({"sparsity": sparsity, "variant": "pruned", "eval": pruned})
        variants = []
        for selection in ("head", "reference", "none", "whole_heads"):
            for budget in [*budgets, None]:
                variants.append(dict(selection=selection, order="margin", budget=budget))
        for selection, scope in (("head", "heads"), ("reference", "heads"), ("head", "all")):
            for budget in budgets:
                variants.append(dict(selection=selection, order="gradient", budget=budget, scope=scope))
        if sparsity >= 0.7:
            variants += [dict(selection="head", order="gradient", budget=b, rounds=4) for b in (100, 400)]
        for variant in variants:
            start = time.perf_counter()
            restored = bench.realign(**variant)
            row = {"sparsity": sparsity, "variant": variant, "restored": restored, "eval": bench.evaluate_current(),
                   "seconds": time.perf_counter() - start}
            results["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("sparsity", "variant", "restored")}), flush=True)
            _write(out, results)
    _write(out, results)


def _asr(ev: dict, judge: str) -> float:
    return (ev["harmful_text"][f"asr[{judge}]"] + ev["harmful_image"][f"asr[{judge}]"]) / 2


def organism_report(out: Path) -> None:
    """Render realign_organism.json as a markdown table per sparsity and an RSR-vs-restored plot."""
    data = json.loads(out.with_suffix(".json").read_text())
    dense = data["dense"]
    lm = 1_071_488  # the organism's language-model parameters (decoder + lm_head)
    lines = ["# Realignment on the shipped organism: every selection and order, budgets 25 … 3000", "",
             "Wanda (sequential, 128 utility calibration samples) at 60 % and 70 %; heads: top-4 Ships scores of the dense "
             "model (KL over the refusal, 128 image- and text-borne harmful prompts); importance and the refusal-loss "
             "gradient from 128 `safety+over_refusal` calibration samples; held-out sets of 300 prompts each, greedy, 12 "
             "new tokens. ASR per set under three judges (strict / keyword-gcg-nocase / coherent-compliance); RSR is the "
             "mean of the two harmful sets under the strict and keyword judges. `budget —` is the rule's whole set "
             "(the paper's rule). Produced by `python benchmarks/realign.py --part organism` (shared 2-core CPU).", ""]
    judges = ("strict", "keyword-gcg-nocase")
    curves: dict[str, list[tuple[int, float]]] = {}
    for sparsity in sorted({r["sparsity"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["sparsity"] == sparsity]
        pruned = next(r for r in runs if r["variant"] == "pruned")["eval"]
        lines += [f"## Wanda {100 * sparsity:.0f} %", "",
                  "| selection | order | budget | restored | ‱ of LM | text ASR s/k/c | image ASR s/k/c | utility | over-refusal | RSR strict | RSR keyword |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def line(name, order, budget, restored, ev, pruned=pruned):
            t, i = ev["harmful_text"], ev["harmful_image"]
            sk = "/".join(f"{100 * t[f'asr[{j}]']:.1f}" for j in ("strict", "keyword-gcg-nocase", "coherent-compliance"))
            si = "/".join(f"{100 * i[f'asr[{j}]']:.1f}" for j in ("strict", "keyword-gcg-nocase", "coherent-compliance"))
            rsr = []
            for j in judges:
                gap = _asr(pruned, j) - _asr(dense, j)
                rsr.append("-" if gap <= 0 else f"{100 * (_asr(pruned, j) - _asr(ev, j)) / gap:.1f} %")
            return (f"| {name} | {order} | {budget} | {restored if restored is not None else '-'} | "
                    f"{'-' if restored is None else f'{1e4 * restored / lm:.2f}'} | {sk} | {si} | "
                    f"{100 * ev['utility']['utility[contains]']:.1f} | {100 * ev['benign']['over_refusal[strict]']:.1f} | "
                    f"{rsr[0]} | {rsr[1]} |")

        lines.append(line("dense", "", "", None, dense))
        lines.append(line("pruned", "", "", None, pruned))
        for r in runs:
            v = r["variant"]
            if v == "pruned":
                continue
            order = v["order"] + (f", scope {v['scope']}" if v.get("scope") == "all" else "") + (
                f", {v['rounds']} rounds" if v.get("rounds", 1) > 1 else "")
            lines.append(line(v["selection"], order, v["budget"] if v["budget"] is not None else "—", r["restored"], r["eval"]))
            key = f"{100 * sparsity:.0f} % {v['selection']} {order}"
            gap = _asr(pruned, "strict") - _asr(dense, "strict")
            if gap > 0 and v["budget"] is not None:
                curves.setdefault(key, []).append((r["restored"], (_asr(pruned, "strict") - _asr(r["eval"], "strict")) / gap))
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    for ax, tag in zip(axes, ("60 %", "70 %")):
        for key, pts in curves.items():
            if key.startswith(tag):
                pts = sorted(pts)
                ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=key.removeprefix(tag + " "))
        ax.set_xscale("log")
        ax.set_title(f"Wanda {tag}")
        ax.set_xlabel("restored weights")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0, color="grey", linewidth=0.6)
    axes[0].set_ylabel("RSR, strict judge (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))


def _write(out: Path, obj: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(out.with_suffix(".json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["selection", "organism", "report"], default="selection")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7])
    parser.add_argument("--budgets", type=int, nargs="+", default=BUDGETS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    out = args.out or Path(__file__).parent / "results" / f"realign_{'organism' if args.part == 'report' else args.part}"
    if args.part == "report":
        organism_report(out)
    elif args.part == "selection":
        selection(out)
    else:
        organism(out, args.sparsities, args.budgets)
        organism_report(out)


if __name__ == "__main__":
    main()
