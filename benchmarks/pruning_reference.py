"""Benchmark: hsr-pl's sequential Wanda / SparseGPT against the reference loops, side by side.

The reference loops (``reference_loops.py``) re-state locuslab/wanda's ``prune_wanda`` and the
SparseGPT sequential driver: Catcher at layer 0, per layer hooks + forward, prune, re-forward.
Same model, same calibration tensors, same float32 CPU arithmetic; the masks must be bitwise
equal (checked: a SHA-256 over every mask, by name).

Model: a random-init ``LlamaForCausalLM`` (default: 8 layers, hidden 512, MLP 1376, 8 heads,
vocab 4096), calibration: ``--samples`` sequences of ``--seq`` random tokens, batch 1,
``tokens='all'``. Each run is a fresh subprocess with one torch thread; runs alternate
reference / hsr-pl and repeat ``--repeats`` times, and the ratios are taken within a repeat
(the machine is shared, so absolute times drift). Time: the process CPU time of the pruning
call (one thread, so waiting for a busy core does not count; wall time is reported too).
Memory: the peak resident set size after the model and the batches exist (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before pruning) minus the RSS at that point: each
implementation's own extra memory, with glibc's mmap threshold fixed so that RSS follows the
live tensors.

``--hsr-path DIR`` imports hsr_pl from ``DIR`` instead (e.g. an export of an older commit) to
measure before/after. Usage: ``python benchmarks/pruning_reference.py [--quick] [--tag NAME]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FULL = dict(hidden=512, layers=8, intermediate=1376, heads=8, vocab=4096, seq=128)
QUICK = dict(hidden=64, layers=2, intermediate=172, heads=4, vocab=512, seq=16)


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Make VmHWM equal the current RSS (Linux >= 4.0), so the peak measured is the pruning's."""
    Path("/proc/self/clear_refs").write_text("5")


def build(shape: dict, samples: int):
    """The random LLaMA and calibration batches of ``pruning.py`` (same seeds), ``samples`` of them."""
    from pruning import build as build_model  # the sibling benchmark: one model builder for both

    return build_model({**shape, "samples": samples})


def run_one(impl: str, method: str, nm: str, samples: int, shape: dict, out: str) -> None:
    """One pruning run in this process; writes its time, memory and mask digest to ``out``."""
    import torch

    torch.set_num_threads(1)
    from reference_loops import reference_sequential

    import hsr_pl.models  # noqa: F401  (prune_model imports it lazily: keep imports out of the timing)
    from hsr_pl.pruning import PruningConfig, parse_nm, prune_model

    model, batches = build(shape, samples)
    structure = parse_nm(nm)
    sparsity = 0.5
    config = PruningConfig(method, sparsity=None if structure != (0, 0) else sparsity, mask_structure=nm, tokens="all")
    _reset_peak()
    rss = _status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    if impl == "hsr_pl":
        masks = prune_model(model, batches, config).masks
    else:
        masks = reference_sequential(model, batches, method, sparsity, structure)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status("VmHWM")
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].to(torch.uint8).contiguous().numpy().tobytes())
    weights = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    Path(out).write_text(json.dumps({
        "impl": impl, "method": method, "mask_structure": nm, "samples": samples, "wall_s": wall, "cpu_s": cpu,
        "rss_before_mib": rss, "peak_mib": peak, "extra_mib": peak - rss,
        "masks_sha256": digest.hexdigest(), "weights_sha256": weights.hexdigest(),
        "sparsity": float(sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke test)")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64], help="calibration sizes")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--structures", nargs="+", default=["0:0", "2:4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hsr-path", help="import hsr_pl from this directory (before/after comparisons)")
    parser.add_argument("--tag", default=None, help="results file suffix (default: full or quick)")
    parser.add_argument("--_run", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else FULL)
    if args._run:
        impl, method, nm, samples, out = args._run
        run_one(impl, method, nm, int(samples), shape, out)
        return
    repeats = 1 if args.quick else args.repeats
    samples_list = [4] if args.quick else args.samples
    # A fixed mmap threshold (glibc otherwise moves it at run time) and one arena make the RSS
    # follow the live tensors: without them the same run's peak varies by +-20 MiB.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1",
           "PYTHONPATH": os.pathsep.join(
        p for p in (args.hsr_path, str(HERE), os.environ.get("PYTHONPATH")) if p)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for samples in samples_list:
                for method in args.methods:
                    for nm in args.structures:
                        # alternate which implementation goes first, so drift hits both alike
                        order = ("reference", "hsr_pl") if repeat % 2 == 0 else ("hsr_pl", "reference")
                        for impl in order:
                            out = os.path.join(tmp, f"{repeat}-{samples}-{method}-{nm.replace(':', '_')}-{impl}.json")
                            cmd = [sys.executable, __file__, *(["--quick"] if args.quick else []),
                                   "--_run", impl, method, nm, str(samples), out]
                            subprocess.run(cmd, check=True, env=env)
                            row = {**json.loads(Path(out).read_text()), "repeat": repeat}
                            rows.append(row)
                            print(f"[{repeat}] {impl:9s} {method:9s} {nm} n={samples}: {row['cpu_s']:7.2f} s CPU ({row['wall_s']:.2f} s wall), "
                                  f"+{row['extra_mib']:.1f} MiB", flush=True)
    summary = []
    for samples in samples_list:
        for method in args.methods:
            for nm in args.structures:
                pairs = []
                for repeat in range(repeats):
                    pick = {r["impl"]: r for r in rows if (r["repeat"], r["samples"], r["method"], r["mask_structure"])
                            == (repeat, samples, method, nm)}
                    pairs.append((pick["hsr_pl"], pick["reference"]))
                time_ratios = [h["cpu_s"] / r["cpu_s"] for h, r in pairs]
                wall_ratios = [h["wall_s"] / r["wall_s"] for h, r in pairs]
                mem_ratios = [h["extra_mib"] / r["extra_mib"] for h, r in pairs]
                summary.append({
                    "samples": samples, "method": method, "mask_structure": nm,
                    "hsr_pl_cpu_s": statistics.median(h["cpu_s"] for h, _ in pairs),
                    "reference_cpu_s": statistics.median(r["cpu_s"] for _, r in pairs),
                    "time_ratio_median": statistics.median(time_ratios), "time_ratios": time_ratios,
                    "wall_ratio_median": statistics.median(wall_ratios), "wall_ratios": wall_ratios,
                    "hsr_pl_extra_mib": statistics.median(h["extra_mib"] for h, _ in pairs),
                    "reference_extra_mib": statistics.median(r["extra_mib"] for _, r in pairs),
                    "memory_ratio_median": statistics.median(mem_ratios), "memory_ratios": mem_ratios,
                    "masks_identical": all(h["masks_sha256"] == r["masks_sha256"] for h, r in pairs),
                    "weights_identical": all(h["weights_sha256"] == r["weights_sha256"] for h, r in pairs),
                    "sparsity": pairs[0][0]["sparsity"],
                })
    import torch

    tag = args.tag or ("quick" if args.quick else "full")
    meta = {
        "shape": shape, "samples": samples_list, "repeats": repeats, "device": "cpu", "torch_threads": 1,
        "torch": torch.__version__, "hsr_path": args.hsr_path,
        "machine": "shared 2-core CPU (other jobs running); ratios are within one repeat, then the median",
        "memory": ("VmHWM after a clear_refs reset just before pruning, minus VmRSS then (fresh process per run, "
                   "MALLOC_MMAP_THRESHOLD_=131072, MALLOC_ARENA_MAX=1)"),
        "time": "process CPU time of the pruning call (one thread: insensitive to waiting for a shared core)",
        "calibration": f"n sequences x {shape['seq']} random tokens, batch 1, tokens='all'",
    }
    name = f"pruning_reference_{tag}"
    from pruning import atomic_write

    atomic_write(RESULTS / f"{name}.json", json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2))
    lines = [
        f"# Sequential pruning: hsr-pl vs the reference loops ({tag})",
        "",
        f"`python benchmarks/pruning_reference.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Random LLaMA ({shape}), float32, CPU, 1 torch thread, {meta['machine']}. Calibration: "
        f"{meta['calibration']}. Time: {meta['time']}. Memory: {meta['memory']}. "
        f"Ratio = hsr-pl / reference (< 1: hsr-pl is cheaper); "
        f"median over {repeats} repeat(s), per-repeat ratios in brackets.",
        "",
        "| n | method | N:M | hsr-pl CPU s | reference CPU s | CPU-time ratio | wall ratio | hsr-pl extra MiB "
        "| reference extra MiB | memory ratio | masks & weights identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        tr = ", ".join(f"{r:.2f}" for r in s["time_ratios"])
        mr = ", ".join(f"{r:.2f}" for r in s["memory_ratios"])
        lines.append(
            f"| {s['samples']} | {s['method']} | {s['mask_structure']} | {s['hsr_pl_cpu_s']:.2f} | "
            f"{s['reference_cpu_s']:.2f} | {s['time_ratio_median']:.2f} [{tr}] | {s['wall_ratio_median']:.2f} | "
            f"{s['hsr_pl_extra_mib']:.1f} | {s['reference_extra_mib']:.1f} | "
            f"{s['memory_ratio_median']:.2f} [{mr}] | {s['masks_identical'] and s['weights_identical']} |"
        )
    atomic_write(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
