"""One process of the FSDP2 tests (tests/test_sharded.py) and of benchmarks/sharded.py.

``python tests/sharded_worker.py <scenario> <checkpoint folder> <out folder> [method]``; with
``WORLD_SIZE=2`` in the environment (and ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``,
set by the test) it runs under ``ModelParallelStrategy(data_parallel_size=2)`` on gloo, else as
one ordinary process: the reference. Scenarios:

* ``flow``: head attribution -> pruning -> realignment -> sharded export, then every rank saves
  what it ended with (``result-rank<r>.safetensors``: masks, restore sets, scores) and what the
  probe saw (``probe-rank<r>.json``: local parameter shapes, the shapes the statistics hooks got,
  the peak of the parameter bytes materialised at once);
* ``fail``: the head scan raises on rank ``HSR_FAIL_RANK`` after its first scored layer
  (``HSR_STRATEGY=ddp``: under DDP instead of FSDP2);
* ``fail-export``: the sharded export's writer (rank ``HSR_FAIL_RANK``) raises after its first
  shard file, while the other rank is still gathering;
* ``fail-gather``: the export's other rank (``HSR_FAIL_RANK``, not the writer) raises in the
  middle of the gathers, while the writer waits in one;
* ``steps`` (no model): two :func:`hsr_pl.distributed.fail_fast` steps in one process group, the
  first failing on every rank and caught by the script, the second healthy: it must succeed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "tiny_vlguard" / "train.json"
SAMPLES = 8  # 4 + 4 under two ranks: a sharded forward is a collective, so the shards are equal
HEAD_SAMPLES = 4
TOP_H = 2


def make_data():
    from hsr_pl.data import VLGuardDataModule

    eval_sets = [{"name": "utility", "path": str(TRAIN), "split": "utility", "kind": "utility", "num_samples": 2}]
    return VLGuardDataModule(train_path=str(TRAIN), eval_batch_size=1, eval_sets=eval_sets)


class ScanFailure(RuntimeError):
    pass


def _head_attribution(fail_rank: int | None, out: Path):
    from hsr_pl.callbacks import SafetyHeadAttribution

    class Scan(SafetyHeadAttribution):
        def on_layer_scored(self, layer, scores) -> None:
            if fail_rank is not None and self._rank == fail_rank:
                (out / f"raised-rank{self._rank}.txt").write_text("x")
                raise ScanFailure(f"deliberate failure on rank {self._rank} after layer {layer}")
            super().on_layer_scored(layer, scores)

    return Scan(positions="response", num_samples=HEAD_SAMPLES, batch_size=1, top_h=TOP_H, when="validation_start")


def _param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters as they are registered right now: local rows of sharded ones,
    the whole tensor of gathered (plain) ones."""
    from hsr_pl.distributed import is_sharded

    total = 0
    for param in model.parameters():
        local = param.to_local() if is_sharded(param) else param
        total += local.numel() * local.element_size()
    return total


class Probe(Callback):
    """Records the sharding: local shapes before the flow, and during every linear's forward
    the shapes it computes with and the parameter bytes materialised at that moment."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.peak = 0
        self.seen: dict[str, list[int]] = {}
        self.handles = []

    def on_validation_start(self, trainer, pl_module) -> None:
        from hsr_pl.distributed import describe_sharding, is_sharded

        model = pl_module.model
        self.local = {n: list(s) for n, s in describe_sharding(model).items()}
        self.full = {n: list(p.shape) for n, p in model.named_parameters()}
        self.full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.sharded = any(is_sharded(p) for p in model.parameters())
        self.load = getattr(pl_module, "load_report", None)  # the sharded loader's bytes read on this rank

        def hook(name):
            def run(module, args):
                self.peak = max(self.peak, _param_bytes(model))
                self.seen.setdefault(name, list(module.weight.shape))

            return run

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self.handles.append(module.register_forward_pre_hook(hook(name)))

    def on_validation_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()
        rank = trainer.global_rank
        (self.out / f"probe-rank{rank}.json").write_text(json.dumps({
            "sharded": self.sharded, "local": self.local, "full": self.full, "seen": self.seen,
            "peak_param_bytes": self.peak, "full_param_bytes": self.full_bytes, "load": self.load,
        }))


class Dump(Callback):
    """After the HSR callbacks acted (at validation start): masks, restore sets and scores."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_start(self, trainer, pl_module) -> None:
        from hsr_pl.state import get_state

        state = get_state(pl_module)
        tensors = {f"pruned/{n}": m.contiguous() for n, m in state.pruned.items()}
        tensors.update({f"restored/{n}": m.contiguous() for n, m in state.restored.items()})
        tensors.update({f"originals/{n}": v.contiguous() for n, v in state.originals.items()})
        keys = sorted(state.head_scores)
        tensors["head_scores"] = torch.tensor([state.head_scores[k] for k in keys], dtype=torch.float64)
        meta = {"head_keys": json.dumps(keys), "top_heads": json.dumps([list(h) for h in state.top_heads])}
        save_file(tensors, str(self.out / f"result-rank{trainer.global_rank}.safetensors"), metadata=meta)


def steps(out: Path) -> None:
    """An error caught by the script must not leak into the next step of the same process group."""
    import time

    import torch.distributed as dist

    from hsr_pl.distributed import PeerFailedError, fail_fast

    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    start = time.monotonic()
    try:
        with fail_fast("Step1"):
            raise ValueError("a bad setting, handled by the script")
    except (ValueError, PeerFailedError) as exc:
        print(f"rank {rank} step1 caught {type(exc).__name__} after {time.monotonic() - start:.1f} s", flush=True)
    dist.barrier()
    with fail_fast("Step2"):
        time.sleep(4)  # longer than the watchdog's poll + grace
        total = torch.ones(1)
        dist.all_reduce(total)
    print(f"rank {rank} step2 ok {int(total)}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    scenario, checkpoint, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if scenario == "steps":
        return steps(out)
    method = sys.argv[4] if len(sys.argv) > 4 else "wanda"
    out.mkdir(parents=True, exist_ok=True)
    from hsr_pl.callbacks import ExportPretrained, Pruning, SafetyRealignment
    from hsr_pl.module import LVLMModule

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    if world > 1 and os.environ.get("HSR_STRATEGY") == "ddp":  # the DDP head scan's failure case
        strategy, devices = "ddp", world
    elif world > 1:
        from datetime import timedelta

        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, timeout=timedelta(seconds=120))
        devices = world
    else:
        strategy, devices = "auto", 1
    fail_rank = int(os.environ["HSR_FAIL_RANK"]) if scenario == "fail" else None
    callbacks = [Probe(out), _head_attribution(fail_rank, out)]
    if scenario == "fail-export":  # the writer raises after its first shard file
        import safetensors.torch

        original, rank = safetensors.torch.save_file, int(os.environ.get("LOCAL_RANK", "0"))

        def save_file(tensors, filename, metadata=None):
            original(tensors, filename, metadata=metadata)
            if rank == int(os.environ["HSR_FAIL_RANK"]):
                (out / f"raised-rank{rank}.txt").write_text("x")
                raise OSError(f"deliberate write failure on rank {rank} after {Path(filename).name}")

        safetensors.torch.save_file = save_file
        callbacks.append(ExportPretrained(str(out / "export"), when="validation_end", max_shard_size=50_000))
    if scenario == "fail-gather":  # the non-writer raises after a few gathered tensors
        import hsr_pl.distributed as distributed

        original_iter, rank = distributed.iter_full_state, int(os.environ.get("LOCAL_RANK", "0"))

        def iter_full_state(model, *, keep=True):
            for i, item in enumerate(original_iter(model, keep=keep)):
                if rank == int(os.environ["HSR_FAIL_RANK"]) and i == 6:
                    (out / f"raised-rank{rank}.txt").write_text("x")
                    raise RuntimeError(f"deliberate gather failure on rank {rank}")
                yield item

        distributed.iter_full_state = iter_full_state
        callbacks.append(ExportPretrained(str(out / "export"), when="validation_end", max_shard_size=50_000))
    if scenario == "flow":
        callbacks += [
            Pruning(method=method, num_samples=SAMPLES, when="validation_start"),
            SafetyRealignment(num_samples=SAMPLES, when="validation_start", table=False),
            Dump(out),
            ExportPretrained(str(out / "export"), when="validation_end", max_shard_size=200_000),
        ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=out,
        callbacks=callbacks,
    )
    module = LVLMModule(str(checkpoint), max_new_tokens=2)
    trainer.validate(module, datamodule=make_data(), verbose=False)
    (out / f"done-rank{trainer.global_rank}.txt").write_text("ok")


if __name__ == "__main__":
    main()
