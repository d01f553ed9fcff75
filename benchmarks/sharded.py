"""Benchmark: the sharded (FSDP2) path against one process — per-rank peak memory and wall time.

Model: a random-init LLaMA-shaped ``LlamaForCausalLM`` checkpoint folder (bf16, written as
safetensors shards with an index): hidden 2048, MLP 5632, 16 heads, 6 layers, vocab 32000
(~439 M parameters, 0.88 GB). The run is the flow's memory-heavy part on real calibration
batches (``examples/tiny_vlguard``, 8 utility samples, batch 1): load, Wanda pruning
(sequential, layer at a time) and the export, under

* 1 process: ``from_pretrained`` and the unsharded callbacks (the reference), and
* 2 processes: ``ModelParallelStrategy(data_parallel_size=2)`` on gloo: meta-device build,
  each rank reads only its rows, statistics all-reduced, masks decided from the gathered weight
  of one linear at a time, the export streamed tensor by tensor to rank 0.

Per rank it records the peak resident set (``VmHWM``), the RSS after loading, the peak of the
parameter bytes registered at any linear's forward (local shards plus the one gathered unit: the
"tracked" model memory, what a GPU would hold), wall times, and a hash of the masks (the two
runs must agree). Then it writes the projection to a 70B-class model on 8 GPUs from the measured
per-layer figures. Each configuration runs in fresh processes.

Usage: ``python benchmarks/sharded.py [--quick]`` (``--quick``: 2 layers, hidden 512, for a smoke
run; ``--rewrite``: recompute the projection and the md from the saved json). Results:
``benchmarks/results/sharded{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN = ROOT / "examples" / "tiny_vlguard" / "train.json"
FULL = dict(hidden=2048, intermediate=5632, heads=16, layers=6, vocab=32000)
QUICK = dict(hidden=512, intermediate=1408, heads=8, layers=2, vocab=32000)
SAMPLES = 8
# Llama-3-70B's shape, for the projection.
LLAMA70B = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=128256)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


# ------------------------------------------------------------------------------------ worker
def worker(checkpoint: Path, out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from hsr_pl.callbacks import ExportPretrained, Pruning
    from hsr_pl.data import VLGuardDataModule
    from hsr_pl.distributed import is_sharded
    from hsr_pl.module import LVLMModule
    from hsr_pl.state import get_state
    from hsr_pl.state_file import pack_bits

    start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    marks: dict[str, float] = {}
    memory: dict[str, int] = {}

    def param_bytes(model) -> int:
        total = 0
        for p in model.parameters():
            t = p.to_local() if is_sharded(p) else p
            total += t.numel() * t.element_size()
        return total

    class Probe(Callback):
        peak = 0

        def on_validation_start(self, trainer, pl_module):
            marks["loaded"] = time.perf_counter() - start
            memory["rss_after_load"] = _status("VmRSS")
            memory["hwm_after_load"] = _status("VmHWM")
            memory["param_bytes_at_rest"] = param_bytes(pl_module.model)
            # Reset the peak RSS (Linux: 5 > clear_refs), so the next VmHWM is the pruning's own peak.
            Path("/proc/self/clear_refs").write_text("5")
            memory["hwm_reset_to"] = _status("VmHWM")
            self.handles = []
            model = pl_module.model

            def hook(module, args):
                self.peak = max(self.peak, param_bytes(model))

            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    self.handles.append(m.register_forward_pre_hook(hook))

    class AfterPruning(Callback):
        def on_validation_start(self, trainer, pl_module):
            marks["pruned"] = time.perf_counter() - start
            memory["hwm_after_pruning"] = _status("VmHWM")
            digest = hashlib.sha256()
            state = get_state(pl_module)
            for name in sorted(state.pruned):
                digest.update(name.encode())
                digest.update(pack_bits(state.pruned[name]).numpy().tobytes())
            memory["masks_bytes_cpu"] = sum(m.numel() for m in state.pruned.values())  # bool, 1 byte each
            memory["originals_bytes_cpu"] = sum(v.numel() * v.element_size() for v in state.originals.values())
            self.digest = digest.hexdigest()
            for h in probe.handles:
                h.remove()

    probe, after = Probe(), AfterPruning()
    if world > 1:
        from datetime import timedelta

        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, timeout=timedelta(minutes=10))
    else:
        strategy = "auto"
    eval_sets = [{"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility", "num_samples": world}]
    data = VLGuardDataModule(train_path=str(TRAIN), eval_batch_size=1, eval_sets=eval_sets)
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=out,
        callbacks=[probe, Pruning(method="wanda", num_samples=SAMPLES, when="validation_start"), after,
                   ExportPretrained(str(out / "export"), when="validation_end", max_shard_size="200MB")],
    )
    module = LVLMModule(str(checkpoint), dtype="bfloat16", max_new_tokens=1)
    trainer.validate(module, datamodule=data, verbose=False)
    marks["exported"] = time.perf_counter() - start
    memory["peak_param_bytes_in_forward"] = probe.peak
    memory["hwm_final"] = _status("VmHWM")
    report = {"rank": trainer.global_rank, "world": world, "seconds": marks, "memory": memory, "masks_sha256": after.digest}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2))


# ------------------------------------------------------------------------------------ driver
def build_checkpoint(folder: Path, shape: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hsr_pl.models.tiny import word_tokenizer

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    model.save_pretrained(folder, max_shard_size="300MB")
    tokenizer.save_pretrained(folder)
    del model
    return {"parameters": params, "layer_parameters": layer, "bytes_bf16": 2 * params}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(checkpoint: Path, out: Path, world: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    port = str(_free_port())
    procs = []
    wall = time.perf_counter()
    for rank in range(world):
        rank_env = dict(env)
        if world > 1:
            rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), NODE_RANK="0",
                            LOCAL_RANK=str(rank))
        log = open(out / f"log-rank{rank}.txt", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(checkpoint), str(out)],
                                       env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            raise SystemExit(f"world {world}: a rank failed; see {log.name}:\n" + Path(log.name).read_text()[-3000:])
    wall = time.perf_counter() - wall
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for report in reports:
        report["process_wall_s"] = wall
    return reports


def project_70b(measured: dict, shape: dict) -> dict:
    """Per-rank memory of the sharded flow for a 70B-class model on 8 GPUs, written out.

    Device memory per rank: the shards, plus what the measurement says is gathered at once
    (``gathered_layers`` full decoder layers, of which the rank holds 1/8 already), plus that
    layer's statistics and calibration inputs, plus the one linear gathered outside the forward
    to decide its mask with the mask decision's temporaries (counted from the code). Host memory:
    HSRState's CPU masks and kept originals, on every rank.
    """
    h, m, kv, layers, vocab = (LLAMA70B[k] for k in ("hidden", "intermediate", "kv_heads", "layers", "vocab"))
    head_dim = h // LLAMA70B["heads"]
    attn = 2 * h * h + 2 * h * kv * head_dim
    mlp = 3 * h * m
    layer = attn + mlp + 2 * h
    total = layers * layer + 2 * vocab * h + h
    gpus, bf16 = 8, 2
    largest_linear = h * m  # gate/up/down
    gathered_layers = measured["gathered_layers"]
    sharded = total * bf16 / gpus
    gathered = gathered_layers * layer * bf16 * (1 - 1 / gpus)
    wanda_stats = 4 * (6 * h + m)  # scaler_row per linear, fp32 (q,k,v,o,gate,up: h columns; down: m)
    sparsegpt_layer = 4 * (6 * h * h + m * m)  # one fp32 Hessian per linear of the layer, alive together
    samples_per_rank, seq = 128 // gpus, 2048
    activations = samples_per_rank * seq * h * bf16  # one layer's inputs for this rank's samples
    # wanda_mask on the gathered weight: the bf16 weight 2 B, fp32 scores 4 B, sort values 4 B + int64
    # indices 8 B, bool mask 1 B per element (hsr_pl/pruning/wanda.py, masks.row_mask)
    mask_decision = 19 * largest_linear
    per_rank_wanda = sharded + gathered + wanda_stats + activations + mask_decision
    per_rank_sparsegpt = sharded + gathered + sparsegpt_layer + activations + mask_decision
    decoder_linears = layers * (attn + mlp)
    host_masks = decoder_linears * 1  # a CPU bool per pruned weight
    host_originals = layers * attn * 0.5 * bf16  # the attention projections' pruned values (50 %)
    gib = 1024**3
    return {
        "model": "Llama-3-70B shape (hidden 8192, MLP 28672, 64 heads / 8 KV heads, 80 layers, vocab 128256)",
        "parameters": total,
        "layer_parameters": layer,
        "gpus": gpus,
        "gib": {
            "sharded_model_per_rank": sharded / gib,
            "gathered_beyond_the_shard": gathered / gib,
            "wanda_statistics_one_layer": wanda_stats / gib,
            "sparsegpt_hessians_one_layer": sparsegpt_layer / gib,
            "calibration_activations_per_rank": activations / gib,
            "mask_decision_largest_linear": mask_decision / gib,
            "per_rank_device_wanda": per_rank_wanda / gib,
            "per_rank_device_sparsegpt": per_rank_sparsegpt / gib,
            "unsharded_model_bf16": total * bf16 / gib,
            "host_masks_per_rank": host_masks / gib,
            "host_originals_per_rank": host_originals / gib,
        },
        "assumptions": {
            "samples": 128, "samples_per_rank": samples_per_rank, "sequence_length": seq, "dtype": "bfloat16",
            "measured_gathered_layers": gathered_layers,
            "mask_decision_bytes_per_weight": 19,
        },
    }


def _mib(value: float) -> str:
    return f"{value / 1024**2:,.0f}"


def write_results(results: dict, quick: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "sharded_quick" if quick else "sharded"
    from hsr_pl.io import write_json_atomic, write_text_atomic

    write_json_atomic(RESULTS / f"{stem}.json", results)
    shape, model = results["shape"], results["model"]
    lines = [
        "# Sharded (FSDP2) flow: per-rank memory and time, 1 vs 2 CPU processes",
        "",
        f"`python benchmarks/sharded.py{' --quick' if quick else ''}` on this project's 2-core CPU machine "
        "(gloo, one torch thread per process).",
        "",
        f"Model: random-init LLaMA, hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['heads']} heads, "
        f"{shape['layers']} layers, vocab {shape['vocab']}: **{model['parameters'] / 1e6:.0f} M parameters**, "
        f"{_mib(model['bytes_bf16'])} MiB in bf16, one decoder layer {model['layer_parameters'] / 1e6:.1f} M "
        f"({_mib(2 * model['layer_parameters'])} MiB). Flow: load, Wanda 50 % sequential on {SAMPLES} utility "
        "samples (batch 1), one greedy token of evaluation, export. Masks of the two runs: "
        + ("**identical** (sha256 of the packed masks)." if results["masks_equal"] else "**DIFFERENT**."),
        "",
        "| processes | rank | load s | prune s | export s | parameter bytes at rest (MiB) | peak tracked parameter bytes (MiB) "
        "| RSS after load (MiB) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for report in results["runs"]:
        s, mem = report["seconds"], report["memory"]
        lines.append(
            f"| {report['world']} | {report['rank']} | {s['loaded']:.1f} | {s['pruned'] - s['loaded']:.1f} | "
            f"{s['exported'] - s['pruned']:.1f} | {_mib(mem['param_bytes_at_rest'])} | "
            f"{_mib(mem['peak_param_bytes_in_forward'])} | {_mib(mem['rss_after_load'])} | {_mib(mem['hwm_final'])} |"
        )
    d = results["derived"]
    lines += [
        "",
        "\"load s\" counts from process start (imports, process group, model build and read); \"prune s\" is the "
        "whole Pruning callback (calibration batches, layer-input capture, statistics, masks); \"export s\" "
        "includes the one evaluation token. Tracked parameter bytes: the parameters as registered at each "
        "linear's forward (local shards, plus the full tensors of the unit being computed) — what a GPU would "
        "hold for the weights. Peak RSS is the whole process (Python, torch, transformers, Lightning: "
        f"{_mib(d['baseline_rss'])} MiB before any model in the 1-process run), so it is the upper bound.",
        "",
        f"- Parameters at rest per rank, 2 processes: {_mib(d['rest_2'])} MiB = {d['rest_2'] / d['rest_1']:.3f} × "
        "the 1-process model (embeddings and norms are sharded too).",
        f"- Peak tracked parameter bytes, 2 processes: {_mib(d['peak_2'])} MiB = at rest + "
        f"{_mib(d['peak_2'] - d['rest_2'])} MiB = the other half of {d['gathered_layers']:.2f} full decoder layer(s): "
        "one layer gathered at a time.",
        f"- Peak RSS during pruning above the RSS at its start (the peak is reset there): 1 process "
        f"{_mib(d['prune_extra_1'])} MiB, 2 processes {_mib(d['prune_extra_2'])} MiB per rank. Of it, "
        f"{_mib(d['host_state_bytes'])} MiB is HSRState on the CPU (a bool per pruned weight, and the attention "
        "projections' pruned values), the same on every rank; the rest is the captured calibration inputs, the "
        "statistics, the mask decision's temporaries, and under 2 processes the gathered linear, the all-gather "
        "buffers and gloo's (plus allocator caching).",
        "- So on this CPU machine the per-process **peak RSS is not lower** with 2 ranks "
        f"({_mib(max(r['memory']['hwm_final'] for r in results['runs'][1:]))} vs "
        f"{_mib(results['runs'][0]['memory']['hwm_final'])} MiB): the parameters halve, but each rank also pays the "
        "Python/torch baseline, a full copy of HSRState, and transient gathers that the allocator keeps. What "
        "sharding bounds is the model memory (the tracked parameter bytes, what a GPU holds), not the host "
        "process.",
        f"- Wall time, whole job: 1 process {results['wall'][0]:.1f} s, 2 processes {results['wall'][1]:.1f} s "
        "(two processes share 2 cores, the calibration is split 4 + 4, and every layer forward is an all-gather; "
        "on CPU the gain is memory, not speed).",
    ]
    p = results["projection_70b"]
    g = p["gib"]
    lines += [
        "",
        "## Projection: a 70B-class model on 8 GPUs (bf16)",
        "",
        f"{p['model']}: {p['parameters'] / 1e9:.2f} B parameters, {p['layer_parameters'] / 1e6:.1f} M per decoder "
        "layer; 128 calibration samples of 2048 tokens (16 per rank). Device memory per rank, from the measured "
        f"figure above ({p['assumptions']['measured_gathered_layers']:.2f} decoder layer gathered at a time) and "
        "what the code allocates:",
        "",
        "| part | GiB per rank |",
        "|---|---|",
        f"| sharded model: {p['parameters'] / 1e9:.2f} B × 2 B / 8 | {g['sharded_model_per_rank']:.2f} |",
        f"| the gathered layer beyond the local eighth: {p['assumptions']['measured_gathered_layers']:.2f} × "
        f"{p['layer_parameters'] / 1e6:.0f} M × 2 B × 7/8 | {g['gathered_beyond_the_shard']:.2f} |",
        f"| that layer's Wanda statistics (fp32, one per input column: 6 × 8192 + 28672) | "
        f"{g['wanda_statistics_one_layer']:.5f} |",
        f"| — or its SparseGPT Hessians (fp32, 6 × 8192² + 28672²) | {g['sparsegpt_hessians_one_layer']:.2f} |",
        f"| one layer's calibration inputs (16 × 2048 × 8192 × 2 B) | {g['calibration_activations_per_rank']:.2f} |",
        "| the largest linear gathered to decide its mask, with the decision's temporaries (8192 × 28672 × 19 B: "
        f"bf16 weight, fp32 scores, sort values + int64 indices, bool mask) | {g['mask_decision_largest_linear']:.2f} |",
        f"| **total, Wanda** | **{g['per_rank_device_wanda']:.1f}** |",
        f"| **total, SparseGPT** | **{g['per_rank_device_sparsegpt']:.1f}** |",
        "",
        f"against {g['unsharded_model_bf16']:.0f} GiB for the unsharded bf16 model: it fits an 80 GB GPU per rank. "
        f"Host RAM per rank, not on the GPU: HSRState's CPU masks, {g['host_masks_per_rank']:.0f} GiB (one byte per "
        f"pruned weight, all decoder linears), and the attention projections' kept values, "
        f"{g['host_originals_per_rank']:.0f} GiB — on every rank, so about "
        f"{8 * (g['host_masks_per_rank'] + g['host_originals_per_rank']):.0f} GiB per 8-GPU node: prune only what is "
        "needed (`targets`) or pack the masks (1/8) before running this at 70B; see docs/sharded.md.",
    ]
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "OUT"))
    parser.add_argument("--rewrite", action="store_true", help="redo the projection and the md from the saved json")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    if args.rewrite:
        saved = json.loads((RESULTS / f"sharded{'_quick' if args.quick else ''}.json").read_text())
        saved["projection_70b"] = project_70b(saved["derived"], saved["shape"])
        write_results(saved, args.quick)
        return
    shape = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="hsr-sharded-bench-") as tmp:
        tmp = Path(tmp)
        model = build_checkpoint(tmp / "checkpoint", shape)
        baseline = subprocess.run(
            [sys.executable, "-c", "import hsr_pl.callbacks, hsr_pl.module, lightning, transformers;"
             "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
        )
        runs, walls = [], []
        for world in (1, 2):
            out = tmp / f"world{world}"
            out.mkdir()
            reports = run(tmp / "checkpoint", out, world)
            runs += reports
            walls.append(reports[0]["process_wall_s"])
    one, two = runs[0], runs[1:]
    layer_bytes = 2 * model["layer_parameters"]
    largest_linear = 2 * shape["hidden"] * shape["intermediate"]
    rest_2 = max(r["memory"]["param_bytes_at_rest"] for r in two)
    peak_2 = max(r["memory"]["peak_param_bytes_in_forward"] for r in two)
    prune_extra_1 = one["memory"]["hwm_after_pruning"] - one["memory"]["hwm_reset_to"]
    prune_extra_2 = max(r["memory"]["hwm_after_pruning"] - r["memory"]["hwm_reset_to"] for r in two)
    derived = {
        "baseline_rss": int(baseline.stdout.strip().splitlines()[-1]) * 1024,
        "rest_1": one["memory"]["param_bytes_at_rest"],
        "rest_2": rest_2,
        "peak_2": peak_2,
        "gathered_over_layer": (peak_2 - rest_2) / layer_bytes,
        # full decoder layers materialised at once: the rank adds (1 - 1/2) of each gathered layer
        "gathered_layers": (peak_2 - rest_2) / (layer_bytes * (1 - 1 / 2)),
        "host_state_bytes": one["memory"]["masks_bytes_cpu"] + one["memory"].get("originals_bytes_cpu", 0),
        "prune_extra_1": prune_extra_1,
        "prune_extra_2": prune_extra_2,
        "largest_linear_bytes": largest_linear,
    }
    results = {
        "shape": shape, "model": model, "samples": SAMPLES, "runs": runs, "wall": walls, "derived": derived,
        "masks_equal": len({r["masks_sha256"] for r in runs}) == 1,
    }
    results["projection_70b"] = project_70b(derived, shape)
    write_results(results, args.quick)
    print(json.dumps({"masks_equal": results["masks_equal"], "wall": walls, "derived": derived}, indent=2))
    if not math.isfinite(derived["gathered_over_layer"]):
        raise SystemExit("the probe measured nothing")


if __name__ == "__main__":
    main()
