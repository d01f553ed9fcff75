"""What ``budget: auto`` costs and gives against a fixed budget, on the shipped organism.

Each setting runs ``hsr-pl validate`` with configs/demo.yaml as written (head scan, Wanda, gradient
order in the top-4 heads, StageEvaluation on the test sets) except: no baselines, no curve, no
export, and the method's budget — the demo's fixed ``1‱`` or ``auto`` (its defaults: 0.25 ‱
doubling to 1 ‰, target dev RSR 95 %, 64 dev prompts per set). Wanda 60 % (the demo) and 70 %
(where one shot of 1 ‱ is not enough). Every run is a fresh process, one after the other.

Reported per run: the whole run's wall time, the realignment step's (SafetyRealignment's
``wall_s`` plus the dense model's dev evaluation, which it runs before pruning), the fixed run's
step without its one dev check, the restored count, the stop reason, and the test-set numbers
(headline judge keyword-gcg-nocase; strict RSR beside) — test numbers are reported once per
setting, the budget itself was chosen on the dev sets.

    python benchmarks/auto_budget.py                   # both sparsities -> benchmarks/results/auto_budget.{json,md}
    python benchmarks/auto_budget.py --sparsity 0.6    # one
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def config(out: Path, sparsity: float, method: dict) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(out)
    callbacks = []
    for cb in cfg["trainer"]["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[-1]
        args = cb.setdefault("init_args", {})
        if name == "ExportPretrained":
            continue
        if name == "SafetyHeadAttribution":
            args["output"] = str(out / "head_scores.json")
        if name == "Pruning":
            args["sparsity"] = sparsity
        if name == "SafetyRealignment":
            args["method"] = {"class_path": "hsr_pl.realign.GradientOrder", "init_args": method}
            args["output"] = str(out / "realignment.json")
        if name == "StageEvaluation":
            args.update(baselines=False, curve_budgets=[])
            args.pop("baseline_sets", None)
        callbacks.append(cb)
    cfg["trainer"]["callbacks"] = callbacks
    return cfg


def run(work: Path, tag: str, sparsity: float, method: dict) -> dict:
    out = work / tag
    out.mkdir(parents=True)
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config(out, sparsity, method), allow_unicode=True))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    hsr = Path(sys.executable).with_name("hsr-pl")
    start = time.perf_counter()
    done = subprocess.run([str(hsr), "validate", "--config", str(path), "--trainer.enable_progress_bar=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{tag} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "realignment.json").read_text())
    dev = report.get("auto") or report.get("dev_check")
    dense_dev = dev["dense"]["seconds"]
    step = report["wall_s"] + dense_dev
    row = {
        "tag": tag, "sparsity": sparsity, "method": method, "run_wall_s": round(wall, 1),
        "realign_step_s": round(step, 1), "restored": report["restored_params"],
        "test": {"asr_dense": summary["dense"]["asr"], "asr_pruned": summary["pruned"]["asr"],
                 "asr_realigned": summary["realigned"]["asr"],
                 "asr_sets": {k: v for k, v in summary["realigned"].items() if k.startswith("asr_")},
                 "rsr": summary["rsr"], "rsr_strict": summary.get("rsr_strict"),
                 "utility": summary["realigned"]["utility"], "over_refusal": summary["realigned"]["over_refusal"]},
    }
    if "auto" in report:
        auto = report["auto"]
        row.update(stop=auto["stop"]["reason"], target_met=auto["stop"]["target_met"],
                   rounds=[{k: r[k] for k in ("restored", "asr", "utility", "over_refusal", "refusal_loss", "seconds")}
                           for r in auto["rounds"]],
                   dev={"dense": auto["dense"]["asr"], "pruned": auto["pruned"]["asr"], "final": auto["final"]["asr"],
                        "final_rsr": auto["final_rsr"]})
    else:
        check = report["dev_check"]
        row["realign_step_without_dev_check_s"] = round(
            report["wall_s"] - check["pruned"]["seconds"] - check["realigned"]["seconds"], 1)
        row["dev"] = {"dense": check["dense"]["asr"], "pruned": check["pruned"]["asr"],
                      "final": check["realigned"]["asr"], "target_met": check["target_met"]}
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# `budget: auto` vs the fixed 1 ‱ on the organism (v1)",
        "",
        f"`python benchmarks/auto_budget.py` on {meta['machine']}; {meta['when']}. Every run: configs/demo.yaml without "
        "baselines, curve and export; one fresh `hsr-pl validate` process each, one after the other. Budget chosen on "
        "the dev sets (64 prompts each: dev_harmful_text, dev_harmful_image, dev_utility, dev_benign); the test numbers "
        "(300 prompts per set) are reported once. Headline judge keyword-gcg-nocase (dev and test); RSR [strict] beside.",
        "",
        "| sparsity | budget | restored | run (s) | realign step (s) | step / fixed step | test ASR txt / img | test RSR | "
        "test RSR [strict] | utility | over-ref. | dev ASR dense → pruned → final | stop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fixed = {r["sparsity"]: r for r in rows if "rounds" not in r}
    for r in rows:
        base = fixed.get(r["sparsity"])
        ratio = f"{r['realign_step_s'] / base['realign_step_s']:.2f}×" if base else "-"
        t = r["test"]
        sets = t["asr_sets"]
        stop = r["stop"] if "stop" in r else "fixed; dev check: target " + ("met" if r["dev"]["target_met"] else "not met")
        lines.append(
            f"| {100 * r['sparsity']:.0f} % | {r['method'].get('budget', 'auto')} | {r['restored']:,} | {r['run_wall_s']} | "
            f"{r['realign_step_s']} | {ratio} | {pct(sets.get('asr_text'))} / {pct(sets.get('asr_image'))} | {pct(t['rsr'])} | "
            f"{pct(t['rsr_strict'])} | {pct(t['utility'])} | {pct(t['over_refusal'])} | {pct(r['dev']['dense'])} → "
            f"{pct(r['dev']['pruned'])} → {pct(r['dev']['final'])} | {stop} |")
    lines += ["", "Realignment step = SafetyRealignment's wall time + the dense model's dev evaluation (run before pruning). "
              "The fixed run's step includes its one dev check (dense, pruned, after); without it: "
              + ", ".join(f"{100 * r['sparsity']:.0f} %: {r['realign_step_without_dev_check_s']} s" for r in fixed.values()) + ".",
              "", "Rounds of the auto runs (cumulative restored, dev ASR %, dev utility %, dev over-refusal %, refusal NLL, s):", ""]
    for r in rows:
        if "rounds" in r:
            lines.append(f"* {100 * r['sparsity']:.0f} %: " + "; ".join(
                f"{p['restored']}: {pct(p['asr'])} / {pct(p['utility'])} / {pct(p['over_refusal'])} / "
                f"{p['refusal_loss']:.4f} / {p['seconds']:.1f}" for p in r["rounds"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.6, 0.7])
    parser.add_argument("--out", default=str(RESULTS / "auto_budget"))
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(markdown(saved["rows"], saved["meta"]))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="hsr-auto-bench-") as tmp:
        for sparsity in args.sparsity:
            tag = f"{int(100 * sparsity)}"
            rows.append(run(Path(tmp), f"fixed{tag}", sparsity, {"budget": "1‱"}))
            print(json.dumps(rows[-1])[:400], flush=True)
            rows.append(run(Path(tmp), f"auto{tag}", sparsity, {}))
            print(json.dumps(rows[-1])[:400], flush=True)
    meta = {"machine": f"{platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, shared with other jobs)",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    Path(args.out + ".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
