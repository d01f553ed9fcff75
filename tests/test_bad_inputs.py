"""The bad-input suite: every guarded mistake, through the real ``hsr-pl`` entry point.

Each case builds its inputs (model folder, config, weights, data, callback arguments, output
paths, resume files) under ``<tmp>/in`` and runs :func:`hsr_pl.cli.main` in-process. Every case
must end with exit status 2 and exactly one ``hsr-pl: error:`` line (at most one ``hint:`` line
after it) that names the problem and the fix, no traceback, before any expensive step (weights
loaded, calibration forwards, head scans, training or validation steps), and with every input
folder byte-for-byte unchanged. A few cases also run as real ``hsr-pl`` subprocesses.

docs/errors.md lists the same cases; ``test_docs_list_every_case`` keeps the two in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hsr_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_llava.yaml"
HEADS = "configs/tiny_llava_heads.yaml"
PRUNED = "configs/tiny_llava_pruned.yaml"
EXAMPLES = ROOT / "examples" / "tiny_vlguard"
WATCHED = [ROOT / "examples", ROOT / "configs", ROOT / "hsr_pl" / "assets"]


# ------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    """What a case may build on: its own input folder and the shared pristine assets."""

    root: Path  # <tmp>/in: everything here must be unchanged after the run
    out: Path  # <tmp>/out: the run's default_root_dir
    model: Path  # a pristine tiny LLaVA checkpoint folder (shared, read-only)
    checkpoint: Path  # a Lightning checkpoint of a Pruning(magnitude, 0.5) fit (shared)

    def model_copy(self) -> Path:
        target = self.root / "model"
        shutil.copytree(self.model, target)
        return target

    def data_copy(self, edit: Callable[[list], None] | None = None) -> Path:
        target = self.root / "data"
        shutil.copytree(EXAMPLES, target)
        if edit is not None:
            records = json.loads((target / "train.json").read_text())
            edit(records)
            (target / "train.json").write_text(json.dumps(records))
        return target / "train.json"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


def tiny(i: Inputs, config: str = TINY, *extra: str, cmd: str = "validate") -> list[str]:
    return [cmd, "--config", config, f"--trainer.default_root_dir={i.out}", "--trainer.logger=false", *extra]


def with_model(i: Inputs, model: Path | str, *extra: str) -> list[str]:
    return tiny(i, TINY, f"--model.init_args.model={model}", *extra)


def heads(i: Inputs, *extra: str) -> list[str]:
    return tiny(i, HEADS, f"--trainer.callbacks.init_args.output={i.out / 'heads' / 'scores.json'}", *extra)


def pruned(i: Inputs, *extra: str) -> list[str]:
    return tiny(i, PRUNED, *extra)


def yaml_config(i: Inputs, text: str) -> list[str]:
    return ["validate", "--config", str(i.file("bad.yaml", text)), f"--trainer.default_root_dir={i.out}"]


def flow(i: Inputs, callbacks: str, *extra: str) -> list[str]:
    """tiny_llava.yaml with ``callbacks`` (YAML list items) as trainer.callbacks."""
    second = i.file("flow.yaml", "trainer:\n  callbacks:\n" + callbacks)
    return ["validate", "--config", TINY, "--config", str(second), f"--trainer.default_root_dir={i.out}",
            "--trainer.logger=false", *extra]


PRUNE = "    - {class_path: hsr_pl.callbacks.Pruning, init_args: {num_samples: 4, when: validation_start}}\n"
REALIGN = "    - {class_path: hsr_pl.callbacks.SafetyRealignment, init_args: {heads: ['0-1'], num_samples: 4%s}}\n"


def export_to(i: Inputs, dirpath: Path, model: Path | None = None) -> list[str]:
    extra = [f"--model.init_args.model={model}"] if model is not None else []
    return flow(i, PRUNE + f"    - {{class_path: hsr_pl.callbacks.ExportPretrained, init_args: {{dirpath: '{dirpath}'}}}}\n", *extra)


def export_over_model(i: Inputs) -> list[str]:
    model = i.model_copy()
    return export_to(i, model, model)


def export_into_foreign(i: Inputs) -> list[str]:
    folder = i.root / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    return export_to(i, folder)


def export_under_file(i: Inputs) -> list[str]:
    return export_to(i, i.file("results", "a file") / "model")


# ----------------------------------------------------------------------------- model folders
def config_json(i: Inputs, text: str) -> list[str]:
    model = i.model_copy()
    (model / "config.json").write_text(text)
    return with_model(i, model)


def gpt2_remote_code(i: Inputs) -> list[str]:
    model = i.model_copy()
    (model / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"},
    }))
    # Would leave a trace in the (watched) input folder if anything imported it.
    (model / "evil.py").write_text(f"open({str(model / 'RAN')!r}, 'w').write('remote code ran')\n")
    return with_model(i, model, "--model.init_args.trust_remote_code=true")


def weights(i: Inputs, content: bytes | Callable[[bytes], bytes]) -> list[str]:
    model = i.model_copy()
    file = model / "model.safetensors"
    file.write_bytes(content(file.read_bytes()) if callable(content) else content)
    return with_model(i, model)


def weights_lacking_a_tensor(i: Inputs) -> list[str]:
    model = i.model_copy()
    tensors = load_file(model / "model.safetensors")
    tensors.pop(next(k for k in sorted(tensors) if k.endswith("layers.1.mlp.down_proj.weight")))
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return with_model(i, model)


def pickle_only(i: Inputs) -> list[str]:
    model = i.model_copy()
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return with_model(i, model)


def missing_shard(i: Inputs) -> list[str]:
    model = i.model_copy()
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return with_model(i, model)


def no_processor(i: Inputs) -> list[str]:
    model = i.model_copy()
    for name in ("processor_config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        (model / name).unlink()
    return with_model(i, model)


def nan_weights(i: Inputs) -> list[str]:
    model = i.model_copy()
    tensors = load_file(model / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("layers.0.self_attn.q_proj.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return with_model(i, model)


# ------------------------------------------------------------------------------------ data
def train_path(i: Inputs, path: Path) -> list[str]:
    return tiny(i, TINY, f"--data.init_args.train_path={path}")


def edited_data(edit: Callable[[list], None]) -> Callable[[Inputs], list[str]]:
    return lambda i: train_path(i, i.data_copy(edit))


def drop_key(key: str, index: int = 0) -> Callable[[list], None]:
    return lambda records: records[index].pop(key)


def eval_sets(i: Inputs, entry: dict) -> list[str]:
    base = {"name": "x", "path": str(EXAMPLES / "train.json"), "split": "safety", "kind": "harmful"}
    return tiny(i, TINY, f"--data.init_args.eval_sets={json.dumps([{**base, **entry}])}")


def synthetic(i: Inputs, data_dir: Path) -> list[str]:
    return tiny(i, TINY, "--data=hsr_pl.data.SyntheticDataModule", f"--data.init_args.data_dir={data_dir}",
                "--data.init_args.n_train=6", "--data.init_args.n_calib=2", "--data.init_args.n_eval=2")


def foreign_data_dir(i: Inputs) -> list[str]:
    folder = i.root / "my-data"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a synthetic data set")
    return synthetic(i, folder)


def image_path_data(i: Inputs, image: Callable[[Path], str]) -> list[str]:
    """Record 1 names the image ``image(data folder)`` returns (set up outside the folder)."""
    outside = i.root / "elsewhere"
    outside.mkdir()
    shutil.copy(EXAMPLES / "images" / "001.png", outside / "secret.png")
    folder = i.root / "data"
    return train_path(i, i.data_copy(lambda records: records[1].update(image=image(folder))))


def symlink_out(folder: Path) -> str:
    (folder / "images" / "link.png").symlink_to(folder.parent / "elsewhere" / "secret.png")
    return "images/link.png"


def image_file(content: bytes) -> Callable[[Inputs], list[str]]:
    """Record 0's image file replaced by ``content``."""
    def build(i: Inputs) -> list[str]:
        path = i.data_copy()
        image = json.loads(path.read_text())[0]["image"]
        (path.parent / image).write_bytes(content)
        return train_path(i, path)
    return build


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


NOT_UTF8 = b"\xff\xfe{}"  # a UTF-16 byte-order mark
LONG_PROMPT = " ".join(["describe"] * 600)  # 600 words: more than tiny LLaVA's 512 positions


def long_prompt(records: list) -> None:
    records[3]["instr-resp"][0]["instruction" if "instruction" in records[3]["instr-resp"][0] else next(
        k for k in ("safe_instruction", "unsafe_instruction") if k in records[3]["instr-resp"][0])] = LONG_PROMPT


def hostile_checkpoint(i: Inputs) -> list[str]:
    """A torch.save file whose unpickling would create a file in the (watched) input folder."""
    class Payload:
        def __reduce__(self):
            return open, (str(i.root / "PAYLOAD-RAN"), "w")

    path = i.root / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    return tiny(i, TINY, f"--ckpt_path={path}")


# ------------------------------------------------------------------------- outputs, resume
def output_under_file(i: Inputs) -> list[str]:
    blocker = i.file("results", "a file, not a folder")
    return tiny(i, HEADS, f"--trainer.callbacks.init_args.output={blocker / 'heads.json'}")


def output_unwritable(i: Inputs) -> list[str]:
    return tiny(i, HEADS, f"--trainer.callbacks.init_args.output={unwritable(i) / 'heads.json'}")


def unwritable(i: Inputs) -> Path:
    """A folder where creating a file fails: a 0500 folder, or /sys when running as root."""
    locked = i.root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys")):
        probe = candidate / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            return candidate
        probe.unlink()
    pytest.fail("no unwritable folder to test with")


def partial(i: Inputs, content: str) -> list[str]:
    out = i.root / "scan" / "scores.json"
    i.file("scan/scores.partial.json", content)
    return tiny(i, HEADS, f"--trainer.callbacks.init_args.output={out}", "--trainer.callbacks.init_args.resume=true")


def partial_of_other_settings(i: Inputs) -> list[str]:
    from hsr_pl.report.heads import write_partial

    argv = partial(i, "")
    write_partial(i.root / "scan" / "scores.partial.json", {"ablation": "zero"}, {"0-0": 0.5})
    return argv


def tampered_partial(i: Inputs) -> list[str]:
    """A partial file hsr-pl wrote, with one score edited afterwards (still a finite number)."""
    from hsr_pl.report.heads import write_partial

    argv = partial(i, "")
    path = i.root / "scan" / "scores.partial.json"
    write_partial(path, {"ablation": "head"}, {"0-0": 0.5, "0-1": 0.25})
    content = json.loads(path.read_text())
    content["scores"]["0-1"] = 9.0
    path.write_text(json.dumps(content))
    return argv


def corrupt_partial(i: Inputs) -> list[str]:
    from hsr_pl.report.heads import PARTIAL_FORMAT

    return partial(i, json.dumps({"format": PARTIAL_FORMAT, "settings": {}, "scores": {"0-0": "0.5x"}}))


def scores_file(i: Inputs, content: str) -> list[str]:
    return heads(i, f"--trainer.callbacks.init_args.scores_path={i.file('released.json', content)}")


def resume_changed(i: Inputs) -> list[str]:
    return tiny(i, PRUNED, "--trainer.callbacks.init_args.when=fit_start", "--trainer.callbacks.init_args.method=magnitude",
                "--trainer.callbacks.init_args.sparsity=0.6", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                f"--ckpt_path={i.checkpoint}", cmd="fit")


# ------------------------------------------------------------- issue 21: repair, export, setup
SCAN = ("    - {class_path: hsr_pl.callbacks.SafetyHeadAttribution, init_args: {num_samples: 4, top_h: %d, "
        "heatmap: false, output: '%s', when: validation_start}}\n")


def scan(i: Inputs, top_h: int = 2, output: Path | None = None) -> str:
    return SCAN % (top_h, output or i.out / "heads" / "scores.json")


def pruned_copy(i: Inputs, edit: Callable[[Path, dict], None] | None = None, prune: bool = True) -> Path:
    """A copy of the pristine model with every other column of each decoder-layer projection zeroed
    (a 50 % pruned checkpoint), then ``edit(folder, tensors)``."""
    folder = i.root / "pruned"
    shutil.copytree(i.model, folder)
    tensors = load_file(folder / "model.safetensors")
    if prune:
        for key in tensors:
            if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", key):
                tensors[key][:, ::2] = 0
    if edit is not None:
        edit(folder, tensors)
    if (folder / "model.safetensors").exists():
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def repair_flow(i: Inputs, folder: Path) -> list[str]:
    """Scan the original, take the masks from ``folder``, realign: the repair flow (configs/repair.yaml)."""
    callbacks = (scan(i) + f"    - {{class_path: hsr_pl.callbacks.PrunedCheckpoint, init_args: {{path: '{folder}'}}}}\n"
                 "    - {class_path: hsr_pl.callbacks.SafetyRealignment, init_args: {num_samples: 4}}\n")
    return flow(i, callbacks, f"--model.init_args.model={i.model}")


def repaired(edit: Callable[[Path, dict], None] | None = None, prune: bool = True) -> Callable[[Inputs], list[str]]:
    return lambda i: repair_flow(i, pruned_copy(i, edit, prune))


def nan_entry(folder: Path, tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if k.endswith("layers.1.self_attn.q_proj.weight"))
    tensors[key][0, 1] = float("inf")  # an odd column: not one the "tool" pruned


def drop_tensor(folder: Path, tensors: dict) -> None:
    tensors.pop(next(k for k in sorted(tensors) if k.endswith("layers.1.mlp.down_proj.weight")))


def other_vocabulary(folder: Path, tensors: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    config["text_config"]["vocab_size"] = vocab + 8
    (folder / "config.json").write_text(json.dumps(config))
    for key, value in list(tensors.items()):
        if value.dim() == 2 and value.shape[0] == vocab:
            tensors[key] = torch.cat([value, torch.zeros(8, value.shape[1], dtype=value.dtype)])


def pickle_weights(folder: Path, tensors: dict) -> None:
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def shard_outside(folder: Path, tensors: dict) -> None:
    """The index names a shard in the folder's parent: it would be read from outside the checkpoint."""
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder.parent / "shared.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "../shared.safetensors" for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def export_flow(i: Inputs, dirpath: Path, *before: str) -> list[str]:
    """Prune and export at the end of validate (``when`` explicit: the old default exported nothing)."""
    export = (f"    - {{class_path: hsr_pl.callbacks.ExportPretrained, init_args: {{dirpath: '{dirpath}', "
              "when: validation_end}}\n")
    return flow(i, "".join(before) + PRUNE + export)


def export_over_copied_summary(i: Inputs) -> list[str]:
    """A results folder that holds a copy of an export's hsr_summary.json and the user's own work."""
    folder = i.root / "results"
    folder.mkdir()
    (folder / "hsr_summary.json").write_text('{"sparsity": 0.5}')
    (folder / "thesis.tex").write_text("precious")
    return export_flow(i, folder)


def export_over_grown_export(i: Inputs) -> list[str]:
    """An earlier export (written by hsr-pl) into which the user has put a file since."""
    from hsr_pl.export import save_pretrained_atomic
    from hsr_pl.models.tiny import build_tiny

    model, processor = build_tiny("llava")
    folder = save_pretrained_atomic(model, processor, i.root / "realigned", {"n": 1})
    (folder / "notes.txt").write_text("my evaluation notes")
    return export_flow(i, folder)


def export_holding_the_scan(i: Inputs) -> list[str]:
    folder = i.out / "realigned"
    return export_flow(i, folder, scan(i, 2, folder / "scores.json"))


# ---------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Inputs], list[str]]
    message: str  # regex over the error line: the problem and the fix
    allowed: frozenset[str] = frozenset()  # expensive steps this case may reach (the check itself needs them)


def case(id: str, build: Callable[[Inputs], list[str]], message: str, allowed: tuple[str, ...] = ()) -> Case:
    return Case(id, build, message, frozenset(allowed))


CASES = [
    # command line and config
    case("unknown-subcommand", lambda i: ["predict"], r"invalid choice: 'predict' \(choose from 'fit', 'validate'\)"),
    case("no-subcommand", lambda i: [], r"expected \"subcommand\".*fit.*validate|subcommand"),
    case("config-missing", lambda i: ["validate", "--config", str(i.root / "nope.yaml")],
         r"config: File does not exist: .*nope.yaml"),
    case("config-not-yaml", lambda i: yaml_config(i, "model: [unclosed\n"),
         r"the config is not valid YAML: while parsing a flow sequence in the config, line 1, column 8"),
    case("config-unknown-key", lambda i: yaml_config(i, "trainer:\n  max_stepz: 3\n"),
         r"Subcommand 'validate' does not accept option 'trainer.max_stepz'"),
    case("unknown-argument", lambda i: tiny(i, TINY, "--trainer.maxsteps=3"), r"unrecognized arguments: --trainer.maxsteps=3"),
    case("unknown-option", lambda i: tiny(i, TINY, "--model.init_args.nosuch=3"), r"model: Option 'nosuch' is not accepted"),
    case("wrong-type", lambda i: tiny(i, TINY, "--trainer.max_steps=abc"), r"trainer.max_steps: expected int, got abc"),
    case("unknown-callback-class", lambda i: tiny(i, TINY, "--trainer.callbacks+=hsr_pl.callbacks.Prunning"),
         r"trainer.callbacks: .*'Prunning'"),
    case("trainer-strategy-unknown", lambda i: tiny(i, TINY, "--trainer.strategy=nosuch"),
         r"trainer: You selected an invalid strategy name: `strategy='nosuch'`.*Example choices: auto, ddp"),
    case("trainer-devices-zero", lambda i: tiny(i, TINY, "--trainer.devices=0"),
         r"trainer: `Trainer\(devices='0'\)` value is not a valid input using cpu accelerator"),
    case("ckpt-path-missing", lambda i: tiny(i, TINY, f"--ckpt_path={i.root / 'none.ckpt'}"),
         r"ckpt_path='.*none.ckpt' does not exist; give a Lightning checkpoint file"),
    case("ckpt-path-hostile-pickle", hostile_checkpoint,
         r"ckpt_path='.*evil.ckpt' holds objects that a safe \(weights-only\) load refuses \(it would import "
         r"(io|builtins).open\), so it was not unpickled; .*give a .ckpt file that Lightning saved"),
    # model
    case("model-missing", lambda i: with_model(i, i.root / "nope"), r"model path .*nope does not exist; pass a local checkpoint folder"),
    case("model-is-text-file", lambda i: with_model(i, i.file("notes.txt", "hello world")),
         r"model path .*notes.txt is a file; pass the checkpoint \*folder\*"),
    case("model-no-config", lambda i: with_model(i, (i.root / "empty").mkdir() or i.root / "empty"),
         r"is not a model folder \(no config.json\); point model= at the folder written by save_pretrained"),
    case("config-json-invalid", lambda i: config_json(i, "{broken"), r"config.json is not valid JSON .*; restore it"),
    case("config-json-no-model-type", lambda i: config_json(i, "[1, 2]"), r"config.json has no \"model_type\" string"),
    case("model-type-unsupported", lambda i: config_json(i, json.dumps({"model_type": "gpt2"})),
         r"model_type='gpt2' has no hsr-pl adapter\. Supported: .*Add an adapter \(docs/adapters.md\)"),
    case("remote-code-unsupported", gpt2_remote_code, r"model_type='gpt2' has no hsr-pl adapter \(trust_remote_code cannot add one\)"),
    case("no-processor", no_processor, r"has no processor or tokenizer files; save the processor next to the weights"),
    case("weights-truncated", lambda i: weights(i, lambda b: b[: len(b) // 2]),
         r"model.safetensors is not a complete safetensors file \(tensor .* ends at byte .*\); .*re-save the checkpoint"),
    case("weights-random", lambda i: weights(i, os.urandom(4096)), r"model.safetensors is not a complete safetensors file"),
    case("weights-empty", lambda i: weights(i, b""), r"shorter than the 8-byte header length"),
    case("weights-pickle-only", pickle_only, r"holds only pickle weights .*; hsr-pl loads safetensors only: convert them"),
    case("weights-shard-missing", missing_shard, r"names shard\(s\) \['model-00001-of-00002.safetensors'\] that are not in"),
    case("weights-missing-tensor", weights_lacking_a_tensor,
         r"the weights lack 1 tensor\(s\) of its config.json \(e.g. '.*layers.1.mlp.down_proj.weight'\); .*re-save", ("load",)),
    case("weights-nan", nan_weights, r"weight .*layers.0.self_attn.q_proj.weight holds 1 NaN/inf value\(s\); .*re-export", ("load",)),
    case("dtype-unknown", lambda i: tiny(i, TINY, "--model.init_args.dtype=int8"), r"dtype='int8' is not one of"),
    case("tiny-family-unknown", lambda i: with_model(i, "tiny:gpt2"), r"'tiny:gpt2': no tiny builder; known:"),
    # data
    case("train-path-missing", lambda i: train_path(i, i.root / "nope.json"), r"train_path=.*nope.json does not exist; give a VLGuard JSON file"),
    case("train-json-invalid", lambda i: train_path(i, i.file("t.json", "[{")), r"t.json is not valid JSON .*expected a JSON list of records"),
    case("train-json-object", lambda i: train_path(i, i.file("t.json", "{}")), r"holds a dict; expected a JSON list of records"),
    case("record-without-image", edited_data(drop_key("image", 2)),
         r"record 2 has no image; .*set allow_text_only: true .* for a text-only model"),
    case("record-image-missing", edited_data(lambda r: r[1].update(image="images/gone.png")),
         r"record 1: image .*gone.png does not exist; check image_root"),
    case("record-without-pairs", edited_data(drop_key("instr-resp")), r"record 0 has no 'instr-resp' field"),
    case("record-safe-string", edited_data(lambda r: r[0].update(safe="false")),
         r"train.json: record 0: 'safe' is 'false' \(str\); it must be a JSON boolean, true or false without quotes"),
    case("record-safe-number", edited_data(lambda r: r[2].update(safe=0)), r"record 2: 'safe' is 0 \(int\); it must be a JSON boolean"),
    case("record-longer-than-model", lambda i: heads(i, f"--data.init_args.train_path={i.data_copy(long_prompt)}"),
         r"train.json: record 3 is \d{3} tokens long \(prompt \+ response, image tokens included\), more than the model's "
         r"max_position_embeddings=512; shorten or drop the longest records"),
    case("record-longer-than-model-folder", lambda i: with_model(i, i.model, f"--data.init_args.train_path={i.data_copy(long_prompt)}"),
         r"record 3 is \d{3} tokens long .*max_position_embeddings=512"),
    case("record-image-parent-path", lambda i: image_path_data(i, lambda folder: "../" * len(folder.parts) + "etc/passwd"),
         r"record 1: image '(\.\./)+etc/passwd' lies outside image_root .*/data .*set allow_outside_root: true"),
    case("record-image-absolute-path", lambda i: image_path_data(i, lambda folder: str(folder.parent / "elsewhere" / "secret.png")),
         r"record 1: image '/.*elsewhere/secret.png' lies outside image_root .*move the image there, or set allow_outside_root"),
    case("record-image-symlink-out", lambda i: image_path_data(i, symlink_out),
         r"record 1: image 'images/link.png' lies outside image_root .* \(it resolves to .*elsewhere/secret.png\)"),
    case("record-image-empty", image_file(b""), r"record 0: image .*\.png is empty \(0 bytes\); replace it"),
    case("record-image-corrupt", image_file(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
         r"record 0: image .*\.png is not a readable image \(.*\); replace it or drop the record"),
    case("record-image-bomb", image_file(png_header(10_000, 10_000)),
         r"record 0: image .*\.png is 10000x10000 = 100000000 pixels, more than 89478485 \(a decompression bomb\?\); downscale it"),
    case("record-image-bomb-2x", image_file(png_header(20_000, 20_000)),
         r"record 0: image .*\.png is larger than 89478485 pixels \(a decompression bomb\?\); downscale it"),
    case("data-num-samples-zero", lambda i: tiny(i, TINY, "--data.init_args.num_samples=0"), r"VLGuardDataModule: num_samples=0 must be a positive integer \(calibration samples per split"),
    case("data-batch-size-zero", lambda i: tiny(i, TINY, "--data.init_args.batch_size=0"), r"VLGuardDataModule: batch_size=0 must be a positive integer"),
    case("eval-kind-unknown", lambda i: eval_sets(i, {"kind": "toxic"}),
         r"data: expected one of 'harmful', 'utility', 'benign', got toxic"),
    case("eval-path-missing", lambda i: eval_sets(i, {"path": str(i.root / "e.json")}), r"eval set 'x': .*e.json does not exist"),
    case("eval-num-samples-zero", lambda i: eval_sets(i, {"num_samples": 0}), r"eval set 'x': num_samples=0 must be a positive integer or null \(null: the whole set\)"),
    case("synthetic-foreign-dir", foreign_data_dir,
         r"data_dir=.*my-data' is not empty and holds no synthetic data set .*or set overwrite: true"),
    case("synthetic-dir-is-file", lambda i: synthetic(i, i.file("data.txt", "x")), r"data_dir=.*data.txt' is a file"),
    case("synthetic-unknown-version", lambda i: [*synthetic(i, i.root / "data"), "--data.init_args.version=3"],
         r"version=3 is unknown; use 1 \(the first organism's set\) or 2"),
    # callbacks
    case("pruning-method", lambda i: pruned(i, "--trainer.callbacks.init_args.method=obs"), r"method='obs' is unknown; choose one of wanda"),
    case("pruning-sparsity", lambda i: pruned(i, "--trainer.callbacks.init_args.sparsity=1.5"), r"sparsity"),
    case("pruning-structure", lambda i: pruned(i, "--trainer.callbacks.init_args.mask_structure=4:2"), r"4:2"),
    case("pruning-calibration-split", lambda i: pruned(i, "--trainer.callbacks.init_args.calibration=harmful"),
         r"Pruning.calibration='harmful' is not a calibration split"),
    case("pruning-targets-match-nothing", lambda i: pruned(i, "--trainer.callbacks.init_args.targets=[language_model.*qkv_proj]"),
         r"targets regex 'language_model.\*qkv_proj' matches no nn.Linear"),
    case("pruning-when", lambda i: pruned(i, "--trainer.callbacks.init_args.when=test_start"), r"when='test_start'.*choose one or both"),
    case("heads-score", lambda i: heads(i, "--trainer.callbacks.init_args.score=cosine"), r"score='cosine' is not one of"),
    case("heads-top-h-too-large", lambda i: heads(i, "--trainer.callbacks.init_args.top_h=1000"),
         r"top_h=1000 exceeds the model's \d+ attention heads; lower top_h"),
    case("heads-engine-kwargs", lambda i: heads(i, '--trainer.callbacks.init_args.engine_kwargs={"max_batch_head": 2}'),
         r"engine_kwargs has 'max_batch_head'"),
    case("heads-output-not-json", lambda i: tiny(i, HEADS, f"--trainer.callbacks.init_args.output={i.root / 'h.txt'}"),
         r"must be a .json file path"),
    case("heads-output-under-file", output_under_file, r"output=.*results/heads.json' lies under .*results', which is a file"),
    case("heads-output-unwritable", output_unwritable, r"cannot write in .*; choose a writable location"),
    case("heads-scores-path-missing", lambda i: heads(i, f"--trainer.callbacks.init_args.scores_path={i.root / 'no.json'}"),
         r"scores_path=.*no.json' does not exist"),
    case("heads-scores-path-invalid", lambda i: scores_file(i, '{"0_1": 0.5}'), r"key '0_1' is not '<layer>-<head>'"),
    case("heads-scores-path-nan", lambda i: scores_file(i, '{"0-0": NaN}'), r"score of '0-0' is nan; scores must be finite numbers"),
    case("heads-scores-path-not-utf8", lambda i: scores_file(i, '{"0-0": 0.5, "note": "caf\xe9"}'.encode("latin-1")),
         r"released.json is not UTF-8 text \(byte 0xe9 at offset \d+\); give a UTF-8 JSON file"),
    # resume
    case("heads-resume-without-output", lambda i: tiny(i, HEADS, "--trainer.callbacks.init_args.output=null",
                                                       "--trainer.callbacks.init_args.resume=true"),
         r"resume=True needs output=<path.json>"),
    case("heads-partial-corrupt", corrupt_partial, r"partial file .*scores.partial.json is damaged .*delete it to start the scan afresh"),
    case("heads-partial-not-json", lambda i: partial(i, "{half"), r"partial file .* is not valid JSON .*delete it"),
    case("heads-partial-tampered", tampered_partial,
         r"partial file .*scores.partial.json was changed after hsr-pl wrote it .*delete it to start the scan afresh"),
    case("heads-partial-other-settings", partial_of_other_settings,
         r"resume refused: .*scores.partial.json was written with different settings \(ablation: 'zero' there vs 'head' now"),
    # realignment, repair and export
    case("realign-before-pruner", lambda i: flow(i, REALIGN % "" + PRUNE),
         r"SafetyRealignment comes before the pruner in trainer.callbacks; order them SafetyHeadAttribution, Pruning"),
    case("realign-no-pruner", lambda i: flow(i, REALIGN % ""), r"SafetyRealignment has no pruner before it .*add Pruning"),
    case("realign-no-heads", lambda i: flow(i, PRUNE + "    - {class_path: hsr_pl.callbacks.SafetyRealignment}\n"),
         r"SafetyRealignment has no heads: put SafetyHeadAttribution before Pruning .*or give scores_path="),
    case("realign-p-above-max-p", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.MarginRule, init_args: {p: 0.9}}"), r"p=0.9 must lie in \(0, max_p=0.7\)"),
    case("realign-auto-no-dev", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder}"),
         r"GradientOrder\(budget: auto\) stops on dev data, but the data module has no dev part: set "
         r"data.init_args.dev_fraction .* or give a fixed budget \(e.g. budget: '1‱'\)"),
    case("realign-auto-bad-growth", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder, "
                                                   "init_args: {growth: 1}}"),
         r"growth=1.0 must be a number > 1 \(e.g. 2: each round doubles the total\)"),
    case("realign-auto-with-rounds", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder, "
                                                    "init_args: {rounds: 3}}"),
         r"budget='auto' chooses its own rounds \(start, growth\); drop rounds, or give a fixed budget with rounds"),
    case("realign-auto-setting-with-fixed-budget",
         lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder, "
                                              "init_args: {budget: 100, target_rsr: 0.9}}"),
         r"target_rsr set the automatic budget, but budget=100 is fixed; use budget: auto or drop them"),
    case("realign-auto-unknown-judge",
         lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder, init_args: {judge: strict}}",
                        "--data.init_args.dev_fraction=0.5"),
         r"GradientOrder\(judge='strict'\) is not among the model's judges \['keyword-gcg-nocase', "
         r"'keyword-gcg-nocase\+short'\]; add it to model.init_args.judges or drop judge"),
    case("realign-auto-start-above-max",
         lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder, "
                                              "init_args: {start: 500, max_budget: 100}}", "--data.init_args.dev_fraction=0.5"),
         r"start=500 \(500 weights\) exceeds max_budget=100 \(100\); lower start or raise max_budget", allowed=("load",)),
    case("realign-auto-bad-target", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.GradientOrder, "
                                                   "init_args: {target_rsr: 1.5}}"),
         r"target_rsr=1.5 must lie in \(0, 1\] \(e.g. 0.95\)"),
    case("realign-bad-budget", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.MarginRule, init_args: {budget: lots}}"),
         r"budget='lots' is not a number; use e.g. 100, 1e-4, '1‱', '0.1‰' or '0.01%'"),
    case("realign-scores-path-missing", lambda i: flow(i, PRUNE + "    - {class_path: hsr_pl.callbacks.SafetyRealignment, "
                                                      f"init_args: {{scores_path: '{i.root / 'no.json'}', top_h: 2}}}}\n"),
         r"scores_path=.*no.json' does not exist"),
    case("realign-head-out-of-range", lambda i: flow(i, PRUNE + "    - {class_path: hsr_pl.callbacks.SafetyRealignment, "
                                                     "init_args: {heads: ['7-0'], num_samples: 4}}\n"),
         r"head 7-0 does not exist in this model \(2 self-attention layers\); use head scores computed for this model",
         allowed=("load",)),
    case("realign-originals-not-kept", lambda i: flow(i, "    - {class_path: hsr_pl.callbacks.Pruning, init_args: "
                                                      "{num_samples: 4, keep_originals: ['mlp']}}\n" + REALIGN % ""),
         r"Pruning keeps no original values of 4 attention projection\(s\) .*drop its keep_originals", allowed=("load",)),
    case("realign-structure-unstructured", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.MarginRule, init_args: {preserve_structure: true}}"),
         r"preserve_structure needs N:M masks, but Pruning is unstructured .*set Pruning's mask_structure"),
    case("realign-scores-path-not-utf8", lambda i: flow(i, PRUNE + "    - {class_path: hsr_pl.callbacks.SafetyRealignment, "
                                                       f"init_args: {{scores_path: '{i.file('h.json', NOT_UTF8)}', top_h: 2}}}}\n"),
         r"h.json is not UTF-8 text \(byte 0xff at offset 0\)"),
    case("two-pruners", lambda i: flow(i, PRUNE + PRUNE),
         r"trainer.callbacks holds 2 pruners \(Pruning, Pruning\); the HSR flow prunes once: keep one"),
    case("realign-output-under-file", lambda i: flow(i, PRUNE + REALIGN % f", output: '{i.file('results', 'x') / 'r.json'}'"),
         r"SafetyRealignment output=.*r.json' lies under .*results', which is a file"),
    case("stages-without-realignment", lambda i: flow(i, PRUNE + "    - {class_path: hsr_pl.callbacks.StageEvaluation}\n"),
         r"StageEvaluation follows a dense -> pruned -> realigned run: put Pruning .* and SafetyRealignment"),
    case("repair-path-missing", lambda i: flow(i, f"    - {{class_path: hsr_pl.callbacks.PrunedCheckpoint, init_args: "
                                                  f"{{path: '{i.root / 'pruned'}'}}}}\n"),
         r"PrunedCheckpoint\(path=.*pruned'\): no such folder; give the pruned model's folder"),
    case("export-over-model", export_over_model, r"export dirpath .*model overlaps the input .*choose a new folder"),
    case("export-into-foreign-folder", export_into_foreign,
         r"dirpath=.*mine' is not empty and was not written by hsr-pl .*or set overwrite: true"),
    case("export-under-file", export_under_file, r"dirpath=.*results/model' lies under .*results', which is a file, not a folder; choose a path in a folder"),
    case("export-over-copied-summary", export_over_copied_summary,
         r"dirpath=.*results' is not empty and was not written by hsr-pl .*or set overwrite: true"),
    case("export-over-grown-export", export_over_grown_export,
         r"dirpath=.*realigned' is an earlier export that now also holds 1 item\(s\) it did not write \(e.g. 'notes.txt'\); "
         r"move them out, choose another dirpath, or set overwrite: true"),
    case("export-holds-own-output", export_holding_the_scan,
         r"ExportPretrained dirpath=.*realigned' would hold SafetyHeadAttribution's output .*scores.json, which the export "
         r"replaces; write that output elsewhere or choose another dirpath"),
    case("repair-nan", repaired(nan_entry),
         r"the pruned checkpoint .*pruned: weight .*layers.1.self_attn.q_proj.weight holds 1 NaN/inf value\(s\); .*re-export it",
         allowed=("load",)),
    case("repair-identical", repaired(prune=False),
         r"the checkpoint .*pruned has no pruned weight in the \d+ target linears .*not a pruned copy of this model",
         allowed=("load",)),
    case("repair-missing-tensor", repaired(drop_tensor),
         r"the pruned checkpoint .*pruned lacks 1 weights, e.g. '.*layers.1.mlp.down_proj.weight'; save the complete",
         allowed=("load",)),
    case("repair-other-vocabulary", repaired(other_vocabulary),
         r"the pruned checkpoint has vocab_size=\d+ but the original has \d+; give the pruned copy of the same model",
         allowed=("load",)),
    case("repair-pickle-only", repaired(pickle_weights),
         r"pruned holds only pickle weights .*; hsr-pl loads safetensors only: convert them", allowed=("load",)),
    case("repair-shard-outside", repaired(shard_outside),
         r"model.safetensors.index.json names shard '../shared.safetensors' outside .*pruned; .*copy the shard there",
         allowed=("load",)),
    case("realign-after-score-only-scan", lambda i: flow(i, scan(i, 0) + PRUNE +
                                                          "    - {class_path: hsr_pl.callbacks.SafetyRealignment, init_args: {num_samples: 4}}\n"),
         r"SafetyHeadAttribution\(top_h=0\) only scores the heads and hands none on, so SafetyRealignment would have no "
         r"heads; set its top_h"),
    case("realign-top-h-too-large", lambda i: flow(i, scan(i) + PRUNE + "    - {class_path: hsr_pl.callbacks.SafetyRealignment, "
                                                   "init_args: {num_samples: 4, top_h: 99}}\n"),
         r"SafetyRealignment top_h=99 exceeds the model's \d+ attention heads; lower top_h"),
    case("realign-budget-zero", lambda i: flow(i, PRUNE + REALIGN % ", method: {class_path: hsr_pl.realign.MarginRule, "
                                                              "init_args: {budget: '0'}}"),
         r"budget=0 restores nothing; give a positive count \(e.g. 100\) or a fraction"),
    case("judge-misspelt", lambda i: heads(i, '--model.init_args.judges=["keyword-gcx"]'),
         r"unknown judge 'keyword-gcx'; choose keyword-gcg\[-nocase\]\[\+short\]"),
    case("resume-changed-settings", resume_changed,
         r"resume refused: the checkpoint's Pruning ran with other settings \(.*sparsity: 0.5 there -> 0.6 now\)"),
]


# ------------------------------------------------------------------------------------ harness
def digest(folders: list[Path]) -> dict[str, str]:
    """Every file (and folder) under ``folders`` with its content hash and mode."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            key = str(path)
            if path.is_file():
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(path.stat().st_mode)
            else:
                out[key] = "dir" + oct(path.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaVA checkpoint folder and a Lightning checkpoint of a magnitude-pruned fit."""
    from hsr_pl.cli import run_cli
    from hsr_pl.models.tiny import build_tiny

    base = tmp_path_factory.mktemp("pristine")
    model, processor = build_tiny("llava")
    model.save_pretrained(base / "model")
    processor.save_pretrained(base / "model")
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        cli = run_cli(["fit", "--config", PRUNED, f"--trainer.default_root_dir={base / 'fit'}", "--trainer.logger=false",
                       "--trainer.callbacks.init_args.when=fit_start", "--trainer.callbacks.init_args.method=magnitude",
                       "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    finally:
        os.chdir(cwd)
    cli.trainer.save_checkpoint(base / "step1.ckpt")
    return {"model": base / "model", "checkpoint": base / "step1.ckpt"}


class Expensive:
    """Records every expensive step a run reaches (and lets it happen)."""

    def __init__(self, monkeypatch) -> None:
        import transformers

        import hsr_pl.callbacks.head_attribution as attribution
        import hsr_pl.callbacks.pruning as pruning
        from hsr_pl.module import LVLMModule

        self.reached: list[str] = []
        for owner in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
            self._watch(monkeypatch, owner, "from_pretrained", "load")
        self._watch(monkeypatch, pruning, "prune_model", "prune")
        self._watch(monkeypatch, attribution, "head_scores", "scan")
        self._watch(monkeypatch, LVLMModule, "training_step", "train")
        self._watch(monkeypatch, LVLMModule, "validation_step", "validate")

    def _watch(self, monkeypatch, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            self.reached.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)


def error_lines(err: str) -> list[str]:
    """stderr from the error line on; asserts there is exactly one."""
    lines = err.splitlines()
    starts = [n for n, line in enumerate(lines) if line.startswith("hsr-pl: error: ")]
    assert len(starts) == 1, f"expected one 'hsr-pl: error:' line, got:\n{err}"
    return lines[starts[0]:]


def check_one_line(err: str) -> str:
    assert "Traceback" not in err, err
    tail = error_lines(err)
    assert len(tail) <= 2 and all(line.startswith("hint: ") for line in tail[1:]), f"more than error + hint:\n{err}"
    return tail[0].removeprefix("hsr-pl: error: ")


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work_and_changes_nothing(bad, tmp_path, pristine, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("HSR_PL_DEBUG", raising=False)
    inputs = Inputs(tmp_path / "in", tmp_path / "out", pristine["model"], pristine["checkpoint"])
    inputs.root.mkdir()
    argv = bad.build(inputs)
    before = digest([inputs.root, pristine["model"], *WATCHED])
    capsys.readouterr()
    expensive = Expensive(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    message = check_one_line(err)
    assert re.search(bad.message, message), f"{bad.id}: {message!r} does not match {bad.message!r}"
    assert set(expensive.reached) <= bad.allowed, f"{bad.id} reached {expensive.reached} before failing"
    assert digest([inputs.root, pristine["model"], *WATCHED]) == before, f"{bad.id} changed an input"


def test_the_suite_covers_at_least_forty_guarded_inputs():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_docs_list_every_case():
    table = (ROOT / "docs" / "errors.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M))
    assert listed == {c.id for c in CASES}


# ------------------------------------------------------------------------ debug and bugs
def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = with_model(Inputs(tmp_path, tmp_path / "out", tmp_path, tmp_path), tmp_path / "nope")
    from hsr_pl.module import ModelLoadError

    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes") as info:
        main([*argv, "--debug"])
    assert isinstance(info.value.__cause__, ModelLoadError)
    monkeypatch.setenv("HSR_PL_DEBUG", "1")
    with pytest.raises(ValueError, match="Union subtypes"):
        main(argv)
    monkeypatch.setenv("HSR_PL_DEBUG", "0")
    with pytest.raises(SystemExit):
        main(argv)
    assert "does not exist" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_says_what_to_report(tmp_path, monkeypatch, capsys):
    import hsr_pl.callbacks.pruning as pruning

    def broken(*args, **kwargs):
        return torch.zeros(2) + torch.zeros(3)  # torch raises inside our code: a bug, not a bad input

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(pruning, "prune_model", broken)
    with pytest.raises(SystemExit) as info:
        main(pruned(Inputs(tmp_path, tmp_path / "out", tmp_path, tmp_path)))
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "Traceback" in err and "hsr-pl: internal error: RuntimeError: The size of tensor a" in err
    assert "hint: this is a bug, not a bad input; please report it" in err


# ------------------------------------------------------------------------ real entry point
# A model error that jsonargparse wraps while instantiating, and one of jsonargparse's own.
SUBPROCESS_CASES = ["model-missing", "unknown-option"]


@pytest.mark.slow
def test_the_installed_script_behaves_the_same(tmp_path, pristine):
    """The real ``hsr-pl`` console script, the cases in parallel (each process pays the import)."""
    script = Path(sys.executable).with_name("hsr-pl")
    assert script.is_file(), f"{script} is not installed (pip install -e .)"
    env = {**os.environ, "HSR_PL_DEBUG": "", "OMP_NUM_THREADS": "1"}
    runs = []
    for name in SUBPROCESS_CASES:
        bad = next(c for c in CASES if c.id == name)
        inputs = Inputs(tmp_path / name / "in", tmp_path / name / "out", pristine["model"], pristine["checkpoint"])
        inputs.root.mkdir(parents=True)
        process = subprocess.Popen([str(script), *bad.build(inputs)], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((bad, process))
    for bad, process in runs:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2, err
        assert re.search(bad.message, check_one_line(err)), err


# ------------------------------------------------------------- faults beyond the table (issue 21)
def run_main(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


class ScanKilled(Exception):
    pass


def test_a_partial_scan_file_edited_after_it_was_written_is_refused_before_the_scan(tmp_path, monkeypatch, capsys):
    """A real scan killed after layer 0, one finite score of its partial file edited: the resume refuses it."""
    from hsr_pl.callbacks.head_attribution import SafetyHeadAttribution

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("HSR_PL_DEBUG", raising=False)
    out = tmp_path / "scan" / "scores.json"
    argv = tiny(Inputs(tmp_path, tmp_path / "out", tmp_path, tmp_path), HEADS, f"--trainer.callbacks.init_args.output={out}")
    original = SafetyHeadAttribution.on_layer_scored

    def killed(self, layer, scores):
        original(self, layer, scores)
        raise ScanKilled("killed after layer 0")  # the scan dies once layer 0's partial file is written

    monkeypatch.setattr(SafetyHeadAttribution, "on_layer_scored", killed)
    code, err = run_main(argv, capsys)
    assert code == 1 and "ScanKilled: killed after layer 0" in err
    monkeypatch.setattr(SafetyHeadAttribution, "on_layer_scored", original)
    partial = out.with_name("scores.partial.json")
    content = json.loads(partial.read_text())
    assert sorted(content["scores"]) == ["0-0", "0-1", "0-2", "0-3"] and not out.exists()
    content["scores"]["0-2"] = 1000.0  # finite, plausible to the old check
    partial.write_text(json.dumps(content, indent=2))
    before = partial.read_bytes()

    expensive = Expensive(monkeypatch)
    code, err = run_main([*argv, "--trainer.callbacks.init_args.resume=true"], capsys)
    assert code == 2, err
    message = check_one_line(err)
    assert re.search(r"partial file .*scores.partial.json was changed after hsr-pl wrote it .*delete it to start the "
                     r"scan afresh", message), message
    assert "scan" not in expensive.reached and "validate" not in expensive.reached, expensive.reached
    assert partial.read_bytes() == before and not out.exists()


FULL_DISK = """
import errno, io, os, sys
from pathlib import Path

full = Path(sys.argv[1]).resolve()  # writes to files in this folder fail as on a full disk
real_open = io.open


class FullDisk:
    def __init__(self, file):
        self._file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def open_on_a_full_disk(file, mode="r", *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and Path(file).resolve().parent == full:
        return FullDisk(opened)
    return opened


io.open = open_on_a_full_disk
import builtins
builtins.open = open_on_a_full_disk

from hsr_pl.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_full_disk_during_a_write_is_one_line_and_keeps_the_earlier_file(tmp_path):
    """A real hsr-pl process whose writes into the output folder fail with ENOSPC (injected into
    ``open().write``): exit 2, one line naming the file, the earlier output intact, no temp file left."""
    results = tmp_path / "results"
    results.mkdir()
    earlier = results / "scores.json"
    earlier.write_text('{"0-0": 0.5}\n')  # an earlier run's output
    argv = tiny(Inputs(tmp_path, tmp_path / "out", tmp_path, tmp_path), HEADS, f"--trainer.callbacks.init_args.output={earlier}")
    env = {**os.environ, "HSR_PL_DEBUG": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(results), *argv], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 2, run.stderr
    message = check_one_line(run.stderr)
    assert re.search(r"cannot write .*results/scores(\.partial)?\.json: No space left on device \(ENOSPC\); nothing was "
                     r"replaced: free space on that disk .*or write to another location", message), message
    assert sorted(p.name for p in results.iterdir()) == ["scores.json"]
    assert earlier.read_text() == '{"0-0": 0.5}\n'


def test_a_full_disk_in_code_not_ours_is_one_line():
    """Lightning, torch or safetensors hitting a full disk: no traceback, the reason and the fix."""
    import errno

    from hsr_pl.cli import explain

    oserror = OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.ckpt")
    message, _ = explain(RuntimeError("saving failed").with_traceback(None)) or ("", None)
    assert message == ""  # an unrelated RuntimeError from elsewhere stays a bug
    try:
        raise RuntimeError("saving the checkpoint failed") from oserror
    except RuntimeError as exc:
        message, hint = explain(exc)
    assert message.startswith("a write /runs/x/last.ckpt failed: No space left on device; free space") and hint is None
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    assert explain(wrapped)[0].startswith("a write failed: No space left on device; free space")


def test_pruning_with_a_pruned_checkpoint_is_refused_as_two_pruners():
    """Two mask fillers of different types pass Lightning's duplicate check; ``setup`` refuses them."""
    from hsr_pl.callbacks import Pruning
    from hsr_pl.callbacks.base import HSRCallback, check_one_pruner

    class PrunedCheckpoint(HSRCallback):  # stands in for the real one (which needs a pruned model folder)
        provides = frozenset({"masks"})

    check_one_pruner([Pruning(num_samples=4), object()])
    with pytest.raises(ValueError, match=r"holds 2 pruners \(Pruning, PrunedCheckpoint\); the HSR flow prunes once"):
        check_one_pruner([Pruning(num_samples=4), PrunedCheckpoint()])
    trainer = type("Trainer", (), {"callbacks": [Pruning(num_samples=4), PrunedCheckpoint()]})()
    with pytest.raises(ValueError, match=r"holds 2 pruners"):
        Pruning(num_samples=4).setup(trainer, None, "validate")
