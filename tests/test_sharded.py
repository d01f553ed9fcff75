"""The whole HSR flow under FSDP2 (``ModelParallelStrategy(data_parallel_size=2)``, 2 CPU
processes, gloo) against one ordinary process on the same data.

Each run is ``tests/sharded_worker.py`` in fresh processes (a sharded model needs its own process
group; the test launches the ranks itself with ``LOCAL_RANK`` / ``WORLD_SIZE``, so Lightning
does not re-run pytest). The flow: a tiny LLaVA *checkpoint folder* (built on the meta device and
read shard by shard under FSDP2), SafetyHeadAttribution -> Pruning -> SafetyRealignment ->
ExportPretrained. Calibration: 8 utility samples (4 + 4 per rank), 4 safety samples (2 + 2),
head scan on all 4 safety prompts on every rank.

What is compared, and how exactly:

* pruning masks, kept originals and realignment restore sets: bitwise (``torch.equal``);
* head scores: within ``rtol=1e-6, atol=1e-9`` (the sharded scan runs the naive loop in lockstep,
  the reference the exact engine; the docs promise equal scores up to float rounding — measured
  difference here: 0), top heads equal;
* exported weights: every tensor of the two exports, reloaded with ``from_pretrained``, bitwise
  for wanda and magnitude; SparseGPT's updated kept weights within ``rtol=1e-4, atol=1e-5`` (its
  Hessian is a weighted sum of the two ranks' running means instead of one running mean).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.ddp

WORKER = Path(__file__).with_name("sharded_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], world: int, timeout: float = 240, **env) -> tuple[list[int], list[str], float]:
    """Run the worker as ``world`` ranks; returns (exit codes, outputs, seconds)."""
    port = str(_free_port())
    base = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
    procs = []
    start = time.monotonic()
    for rank in range(world):
        rank_env = dict(base)
        if world > 1:
            rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), NODE_RANK="0",
                            LOCAL_RANK=str(rank))
        else:
            for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_PORT"):
                rank_env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs, codes = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError(f"the ranks did not finish within {timeout} s") from None
        outputs.append(out)
        codes.append(proc.returncode)
    return codes, outputs, time.monotonic() - start


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from hsr_pl.models.tiny import build_tiny_llava, save_tiny

    model, processor = build_tiny_llava(False, layers=2, heads=4)
    return save_tiny(model, processor, tmp_path_factory.mktemp("sharded") / "tiny-llava")


def _run_flow(checkpoint: Path, out: Path, world: int, method: str) -> None:
    codes, outputs, _ = launch(["flow", str(checkpoint), str(out), method], world)
    for rank, (code, text) in enumerate(zip(codes, outputs)):
        assert code == 0, f"{world}-process run, rank {rank} failed:\n{text[-4000:]}"


def _exported(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return {k: v.detach().clone() for k, v in AutoModelForImageTextToText.from_pretrained(folder).state_dict().items()}


@pytest.fixture(scope="module")
def gqa_odd_checkpoint(tmp_path_factory) -> Path:
    """GQA (2 KV heads for 4) and a vocabulary of odd size: the embedding and lm_head rows split
    unevenly (47 + 46), as ``torch.chunk`` does."""
    from hsr_pl.models.tiny import DEFAULT_WORDS, build_tiny_llava, save_tiny

    model, processor = build_tiny_llava(True, layers=2, heads=4, words=(*DEFAULT_WORDS, "odd"))
    assert model.get_input_embeddings().weight.shape[0] % 2 == 1
    return save_tiny(model, processor, tmp_path_factory.mktemp("sharded-gqa") / "tiny-llava-gqa")


@pytest.mark.slow
def test_fsdp2_flow_equals_one_process_gqa_uneven_rows(tmp_path, gqa_odd_checkpoint):
    test_fsdp2_flow_equals_one_process(tmp_path, gqa_odd_checkpoint, "wanda")


@pytest.mark.parametrize(
    "method", ["wanda", pytest.param("magnitude", marks=pytest.mark.slow), pytest.param("sparsegpt", marks=pytest.mark.slow)]
)
def test_fsdp2_flow_equals_one_process(tmp_path, checkpoint, method):
    _run_flow(checkpoint, tmp_path / "one", 1, method)
    _run_flow(checkpoint, tmp_path / "two", 2, method)
    reference = load_file(str(tmp_path / "one" / "result-rank0.safetensors"))
    ref_meta = safe_open(str(tmp_path / "one" / "result-rank0.safetensors"), "pt").metadata()
    assert any(k.startswith("restored/") and bool(v.any()) for k, v in reference.items()), "nothing was restored"
    for rank in range(2):
        path = tmp_path / "two" / f"result-rank{rank}.safetensors"
        got, meta = load_file(str(path)), safe_open(str(path), "pt").metadata()
        assert sorted(got) == sorted(reference), f"rank {rank}: other masks / restore sets"
        for key, value in reference.items():
            if key == "head_scores":
                assert json.loads(meta["head_keys"]) == json.loads(ref_meta["head_keys"])
                torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(got[key], value), f"rank {rank}: {key} differs from the 1-process run"
        assert meta["top_heads"] == ref_meta["top_heads"]

    export = tmp_path / "two" / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the sharded export wrote a single file"
    one, two = _exported(tmp_path / "one" / "export"), _exported(export)
    assert sorted(one) == sorted(two)
    for name, value in one.items():
        if method == "sparsegpt":
            torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(two[name], value), f"exported {name} differs"

    for rank in range(2):
        probe = json.loads((tmp_path / "two" / f"probe-rank{rank}.json").read_text())
        assert probe["sharded"]
        layer_weights = [n for n in probe["full"] if ".layers." in n and n.endswith("proj.weight") and "vision" not in n]
        assert layer_weights
        for name in layer_weights:  # every decoder-layer weight: half of its rows on this rank
            full, local = probe["full"][name], probe["local"][name]
            assert local == [math.ceil(full[0] / 2), *full[1:]], name
        for name, shape in probe["seen"].items():  # inside the forward: the full weight of that layer only
            assert shape == probe["full"][f"{name}.weight"], name
        # at no moment did this rank hold the full model's parameters (sharded + one gathered unit)
        assert probe["peak_param_bytes"] < 0.75 * probe["full_param_bytes"], probe["peak_param_bytes"]
        # loading read this rank's rows only: about half of the checkpoint's bytes
        assert probe["load"]["read_bytes"] <= 0.55 * probe["full_param_bytes"], probe["load"]
    single = json.loads((tmp_path / "one" / "probe-rank0.json").read_text())
    assert not single["sharded"] and single["peak_param_bytes"] == single["full_param_bytes"]


@pytest.mark.parametrize(
    "strategy, scenario, failing, words",
    [
        ("fsdp2", "fail", 1, "deliberate failure on rank 1"),
        pytest.param("fsdp2", "fail", 0, "deliberate failure on rank 0", marks=pytest.mark.slow),  # the store's host
        ("ddp", "fail", 1, "deliberate failure on rank 1"),  # DDP head scan: the peer waits in the final all-gather
        ("fsdp2", "fail-export", 0, "deliberate write failure on rank 0"),
        ("fsdp2", "fail-gather", 1, "deliberate gather failure on rank 1"),  # the writer is stuck in a gather
    ],
)
def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path, checkpoint, strategy, scenario, failing, words):
    env = {"HSR_FAIL_RANK": str(failing), **({"HSR_STRATEGY": "ddp"} if strategy == "ddp" else {})}
    codes, outputs, _ = launch([scenario, str(checkpoint), str(tmp_path)], 2, timeout=150, **env)
    ended = time.time()
    raised = (tmp_path / f"raised-rank{failing}.txt").stat().st_mtime
    assert codes[0] != 0 and codes[1] != 0, codes
    for rank, text in enumerate(outputs):
        assert words in text, f"rank {rank} did not end with rank {failing}'s error:\n{text[-3000:]}"
    other = 1 - failing
    assert f"rank {failing}: " in outputs[other]  # the peer names who failed first
    # bounded: both ranks were gone within 20 s of the raise (the process group's timeout is 120 s)
    assert ended - raised < 20, ended - raised
    if scenario.startswith("fail-"):  # the atomic export left nothing behind
        assert not (tmp_path / "export").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp")]


# ------------------------------------------------------------------------ single-process checks
def _model_parallel_trainer():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    return pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)


def _gradient_order(budget: int):
    from hsr_pl.realign import GradientOrder

    return GradientOrder(budget=budget)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda c: c.Pruning(method="snip"), "method='snip'"),
        (lambda c: c.SafetyRealignment(heads=["0-1"], method=_gradient_order(10)), "method=GradientOrder"),
        (lambda c: c.SafetyRealignment(heads=["0-1"], importance="snip"), "importance='snip'"),
        (lambda c: c.SafetyHeadAttribution(engine="gradient"), "engine='gradient'"),
        (lambda c: c.StageEvaluation(), "StageEvaluation has no sharded"),
    ],
)
def test_what_has_no_sharded_path_is_refused_in_setup(make, words):
    from hsr_pl import callbacks
    from hsr_pl.distributed import ShardingError

    trainer = _model_parallel_trainer()
    callback = make(callbacks)
    if not isinstance(callback, callbacks.Pruning):  # realignment wants a pruner before it; one pruner only
        trainer.callbacks.insert(0, callbacks.Pruning(method="wanda"))
    trainer.callbacks.append(callback)
    with pytest.raises(ShardingError) as info:
        callback.setup(trainer, None, "validate")
    message = str(info.value)
    assert words in message and "\n" not in message


def test_fsdp2_recipes_parse(tmp_path, capsys):
    import yaml

    from hsr_pl.cli import run_cli
    from hsr_pl.models.tiny import build_tiny, save_tiny

    folder = save_tiny(*build_tiny("qwen2_5_vl", gqa=True), tmp_path / "model")
    config = yaml.safe_load((ROOT / "configs" / "fsdp2_70b.yaml").read_text())
    config["model"]["init_args"]["model"] = str(folder)
    config["data"]["init_args"].update(train_path=str(ROOT / "examples" / "tiny_vlguard" / "train.json"), image_root=None)
    for eval_set in config["data"]["init_args"]["eval_sets"]:
        eval_set.update(path=str(ROOT / "examples" / "tiny_vlguard" / "train.json"), image_root=None)
    path = tmp_path / "fsdp2_70b.yaml"
    path.write_text(yaml.safe_dump(config))
    for extra in ([], ["--config", str(ROOT / "configs" / "strategies" / "fsdp2_8gpu.yaml")]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["validate", "--config", str(path), *extra, "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        strategy = printed["trainer"]["strategy"]
        assert strategy["class_path"].endswith("ModelParallelStrategy"), strategy
        assert strategy["init_args"]["data_parallel_size"] == 8 and strategy["init_args"]["tensor_parallel_size"] == 1
        assert str(printed["trainer"]["devices"]) == "8"


def test_export_shard_size_is_checked():
    from hsr_pl.callbacks import ExportPretrained
    from hsr_pl.export import ExportError

    assert ExportPretrained("x", max_shard_size="500MiB").max_shard_bytes == 500 * 1024**2
    assert ExportPretrained("x", max_shard_size="5GB").max_shard_bytes == 5 * 10**9
    with pytest.raises(ExportError, match="max_shard_size"):
        ExportPretrained("x", max_shard_size="big")


def test_wanda_statistic_replayed_in_global_order_is_bitwise_one_process():
    """The order-exact reduction's replay: two ranks' raw terms (samples dealt round robin), put
    back in the global order, give the running mean of one process bit for bit."""
    from hsr_pl.pruning.stats import RowStats

    torch.manual_seed(0)
    batches = [torch.randn(int(n), 96, dtype=torch.bfloat16) for n in torch.randint(1, 9, (9,))]
    one = RowStats(96)
    for rows in batches:
        one.add(rows, 1)
    ranks = [RowStats(96), RowStats(96)]
    for stat in ranks:
        stat.record = []
    for position, rows in enumerate(batches):
        ranks[position % 2].add(rows, 1, position=position // 2)
    entries = sorted(
        (position * 2 + r, samples, raw) for r, stat in enumerate(ranks) for position, samples, raw in stat.record
    )
    replayed = RowStats(96)
    replayed.replay([(samples, raw) for _, samples, raw in entries])
    assert replayed.nsamples == one.nsamples == len(batches)
    assert torch.equal(replayed.scaler_row, one.scaler_row)


class _Placed(Exception):
    """Raised by the fake collective once it has seen where a tensor lives."""


def test_collectives_put_their_tensors_where_the_backend_wants_them(monkeypatch):
    """NCCL takes CUDA tensors only. No GPU here: a fake backend device ("meta") and a fake
    collective that records where each tensor lives show that the counts, lockstep check and
    Wanda replay build their tensors on :func:`hsr_pl.distributed.collective_device`."""
    import torch.distributed as dist

    import hsr_pl.distributed.reduce as reduce
    import hsr_pl.pruning.stats as stats
    from hsr_pl.pruning.stats import RowStats, _replay_in_global_order

    seen = []

    def collective(tensor_or_list, *args, **kwargs):
        tensors = tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]
        seen.extend(t.device.type for t in tensors)
        raise _Placed

    for module in (reduce, stats):  # where the counts, the lockstep check and the replay look it up
        monkeypatch.setattr(module, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", collective)
    monkeypatch.setattr(dist, "all_gather", collective)
    stat = RowStats(4)
    stat.record = [(0, 1, torch.ones(4))]
    for call in (lambda: reduce.check_lockstep(3, "x", "y"), lambda: _replay_in_global_order(stat, 0, 2)):
        with pytest.raises(_Placed):
            call()
    assert seen and set(seen) == {"meta"}, seen


def test_an_error_caught_by_the_script_does_not_leak_into_the_next_step(tmp_path):
    codes, outputs, seconds = launch(["steps", str(tmp_path), str(tmp_path)], 2, timeout=90)
    assert codes == [0, 0], outputs
    for rank, text in enumerate(outputs):
        assert f"rank {rank} step2 ok 2" in text, text
        caught = float(text.split("caught ")[1].split(" after ")[1].split(" s")[0])
        assert caught < 5, text  # nobody waited out the 10 s linger for a peer that had its own error
