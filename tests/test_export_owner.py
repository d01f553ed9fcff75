"""Issue 21, items 1-4: an export owns a folder only by the marker it wrote, replaces only what it
wrote, cleans up what a killed export left, and exports at the end of whatever ran.

The refusals themselves (a copied ``hsr_summary.json``, an earlier export the user added files to)
are cases of tests/test_bad_inputs.py; here: what is kept and what is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsr_pl.cli import main
from hsr_pl.export import ExportError, save_pretrained_atomic

ROOT = Path(__file__).resolve().parents[1]
PRUNE = "    - {class_path: hsr_pl.callbacks.Pruning, init_args: {num_samples: 4, when: validation_start}}\n"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_re_export_replaces_exactly_what_the_earlier_export_listed(tmp_path, tiny_llava):
    model, processor = tiny_llava
    target = save_pretrained_atomic(model, processor, tmp_path / "realigned", {"n": 1})
    marker = json.loads((target / ".hsr-pl-export.json").read_text())
    written = set(tree(target)) - {".hsr-pl-export.json", ".hsr-pl-owner.json"}
    assert set(marker["files"]) == written and "model.safetensors" in written
    save_pretrained_atomic(model, processor, target, {"n": 2})  # nothing foreign: replaced
    assert json.loads((target / "hsr_summary.json").read_text()) == {"n": 2}
    (target / "notes").mkdir()
    (target / "notes" / "eval.md").write_text("mine")
    before = tree(target)
    with pytest.raises(ExportError, match=r"also holds 1 item\(s\) it did not write \(e.g. 'notes'\)"):
        save_pretrained_atomic(model, processor, target, {"n": 3})
    assert tree(target) == before  # nothing lost, nothing written
    save_pretrained_atomic(model, processor, target, {"n": 3}, overwrite=True)  # the user's explicit choice
    assert not (target / "notes").exists()


def test_a_copied_summary_or_an_unlisted_owner_marker_does_not_make_a_folder_ours(tmp_path, tiny_llava):
    model, processor = tiny_llava
    copied = tmp_path / "results"
    copied.mkdir()
    (copied / "hsr_summary.json").write_text("{}")
    with pytest.raises(ExportError, match="is not empty and was not written by hsr-pl"):
        save_pretrained_atomic(model, processor, copied)
    older = tmp_path / "older"  # an export from before the file list: what else is there is unknown
    older.mkdir()
    (older / ".hsr-pl-owner.json").write_text(json.dumps({"owner": "hsr-pl ExportPretrained"}))
    (older / "thesis.tex").write_text("precious")
    with pytest.raises(ExportError, match="older hsr-pl export that did not list its files"):
        save_pretrained_atomic(model, processor, older)
    assert (older / "thesis.tex").read_text() == "precious"


KILLED_EXPORT = """
import os, sys
from hsr_pl.export import save_pretrained_atomic
from hsr_pl.models.tiny import build_tiny

model, processor = build_tiny("llava")
real = model.save_pretrained
def killed(folder, **kwargs):
    real(folder, **kwargs)
    os._exit(9)  # SIGKILL-like: no cleanup runs
model.save_pretrained = killed
save_pretrained_atomic(model, processor, sys.argv[1])
"""


def age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then), follow_symlinks=False)


def test_a_killed_exports_temp_folder_is_removed_by_the_next_export_once_stale(tmp_path, tiny_llava):
    model, processor = tiny_llava
    target = tmp_path / "realigned"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(target)], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    [left] = tmp_path.glob(".realigned.tmp-*")  # what a killed export leaves (~14 GB at 7B)
    assert (left / "model.safetensors").is_file() and not target.exists()
    mine = tmp_path / ".realigned.tmp-mine"  # the user's own folder of that name: no marker, never touched
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    age(mine, 3600)
    save_pretrained_atomic(model, processor, target, {"n": 1})
    assert left.is_dir()  # fresh: it may belong to an export still running
    age(left, 3600)
    save_pretrained_atomic(model, processor, target, {"n": 2})
    assert not left.exists()
    assert (mine / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".realigned.tmp-mine", "realigned"]


def test_a_stale_looking_temp_folder_of_a_live_export_is_kept(tmp_path):
    from hsr_pl.export import TEMP_MARKER, remove_stale_temps

    live = tmp_path / ".realigned.tmp-live"
    live.mkdir()
    import socket

    (live / TEMP_MARKER).write_text(json.dumps({"owner": "hsr-pl ExportPretrained", "pid": os.getpid(),
                                                "host": socket.gethostname(), "started": 0}))
    age(live, 3600)
    assert remove_stale_temps(tmp_path / "realigned") == [] and live.is_dir()


def test_validate_with_the_default_export_exports_at_its_end(tmp_path, monkeypatch, capsys):
    """ExportPretrained without `when` follows the run: `hsr-pl validate` exports (it used to export
    nothing, exit 0)."""
    monkeypatch.chdir(ROOT)
    target = tmp_path / "realigned"
    second = tmp_path / "flow.yaml"
    second.write_text("trainer:\n  callbacks:\n" + PRUNE
                      + f"    - {{class_path: hsr_pl.callbacks.ExportPretrained, init_args: {{dirpath: '{target}'}}}}\n")
    main(["validate", "--config", "configs/tiny_llava.yaml", "--config", str(second),
          f"--trainer.default_root_dir={tmp_path / 'out'}", "--trainer.logger=false"])
    summary = json.loads((target / "hsr_summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01) and (target / "model.safetensors").is_file()


def test_fit_with_the_default_export_exports_once_at_fit_end(tmp_path, monkeypatch):
    """A validation inside fit is not the end of the run: one export, after training."""
    import hsr_pl.callbacks.export as callback_module
    from hsr_pl import export as export_module

    calls = []
    real = export_module.save_pretrained_atomic

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(callback_module, "save_pretrained_atomic", counted)
    monkeypatch.chdir(ROOT)
    target = tmp_path / "realigned"
    second = tmp_path / "flow.yaml"
    second.write_text(textwrap.dedent(f"""\
        trainer:
          max_steps: 2
          val_check_interval: 1
          callbacks:
            - {{class_path: hsr_pl.callbacks.ExportPretrained, init_args: {{dirpath: '{target}'}}}}
        """))
    main(["fit", "--config", "configs/tiny_llava.yaml", "--config", str(second),
          f"--trainer.default_root_dir={tmp_path / 'out'}", "--trainer.logger=false"])
    assert len(calls) == 1
    assert json.loads((target / "hsr_summary.json").read_text())["global_step"] == 2
