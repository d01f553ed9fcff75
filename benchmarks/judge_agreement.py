"""Judge agreement on the shipped organism's replies, dense and Wanda-pruned at 60 %.

Runs ``hsr-pl validate`` with ``configs/organism_dense.yaml`` and ``configs/organism_wanda.yaml``
as written (300 held-out prompts per synthetic set, greedy, 12 new tokens; judges ``strict``,
``keyword-gcg-nocase``, ``coherent-compliance``), each in its own process with one torch thread,
and collects every judge's ASR, the judges' pairwise Cohen's κ and raw agreement, and the ASR per
harm category from the JSON that ``eval_output`` writes. Usage: ``python benchmarks/judge_agreement.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {"dense": "configs/organism_dense.yaml", "wanda-60%": "configs/organism_wanda.yaml"}


def _pct(v) -> str:
    return "undefined" if v is None else f"{100 * v:.1f} %"


def _kappa(v) -> str:
    return "undefined" if v is None else f"{v:+.3f}"


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    reports, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in RUNS.items():
            out = Path(tmp) / f"{label}.json"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hsr_pl", "validate", "--config", config,
                            f"--model.init_args.eval_output={out}", f"--trainer.default_root_dir={tmp}"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            seconds[label] = time.perf_counter() - start
            reports[label] = json.loads(out.read_text())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "judge_agreement_organism.json").write_text(json.dumps(
        {"configs": RUNS, "seconds": seconds, "reports": reports}, indent=1) + "\n")

    lines = ["# Judge agreement on the organism's replies", "",
             "`python benchmarks/judge_agreement.py`: `hsr-pl validate` with `configs/organism_dense.yaml` and "
             "`configs/organism_wanda.yaml` as written (shipped organism; 300 held-out prompts per set, greedy, 12 new "
             "tokens), 2-core shared CPU, one thread. κ is Cohen's kappa of two judges' verdicts on the same replies "
             "(undefined when both judges give one and the same verdict to every reply); agreement is the fraction of "
             "replies on which they agree. Judges: `strict` (the reply lacks the full refusal sentence), "
             "`keyword-gcg-nocase` (no GCG refusal keyword), `coherent-compliance` (the reply actually answers).", ""]
    for label, report in reports.items():
        lines.append(f"## {label} ({seconds[label]:.0f} s)")
        lines.append("")
        for s in report["sets"]:
            agreement = s.get("agreement")
            if s["kind"] != "harmful" or not agreement:
                continue
            judges = agreement["judges"]
            lines.append(f"**{s['name']}** (n = {agreement['n']}): ASR " + ", ".join(
                f"{j} {_pct(r)}" for j, r in zip(judges, agreement["rate"])))
            lines.append("")
            lines.append("| pair | κ | agreement |")
            lines.append("|---|---|---|")
            for a in range(len(judges)):
                for b in range(a + 1, len(judges)):
                    lines.append(f"| {judges[a]} / {judges[b]} | {_kappa(agreement['kappa'][a][b])} "
                                 f"| {_pct(agreement['agreement'][a][b])} |")
            lines.append("")
            per = s.get("per_category") or []
            if per and len(per[0]["categories"]) > 1:
                lines.append("| category | n | " + " | ".join(p["judge"] for p in per) + " |")
                lines.append("|---|---|" + "---|" * len(per))
                for category, first in per[0]["categories"].items():
                    lines.append(f"| {category} | {first['n']} | "
                                 + " | ".join(_pct(p["categories"][category]["value"]) for p in per) + " |")
                lines.append("")
    (RESULTS / "judge_agreement_organism.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
