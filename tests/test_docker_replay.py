"""scripts/docker_replay.py: the Dockerfile's steps replayed without Docker (issue 24).

The slow tests replay the real Dockerfile (build, then the demo as the image's user) and the
Dockerfile of issue 24, whose build imported the copied source folder and failed. Both reuse this
environment's torch (``--torch-from``) and pip's cache, so nothing large is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docker_replay.py"
BROKEN = ROOT / "tests" / "docker" / "Dockerfile.issue-24"


def _load():
    spec = importlib.util.spec_from_file_location("docker_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["docker_replay"] = module
    spec.loader.exec_module(module)
    return module


dr = _load()


# ----------------------------------------------------------------------------- parsing, no replay
def test_parse_joins_continuations_and_drops_comments():
    text = "# top\nFROM pytorch/pytorch:2.7.1-cuda\nRUN a \\\n    # inside\n    && b \\\n\n    && c\nUSER 1000\n"
    got = [(i.line, i.keyword, i.text) for i in dr.parse_dockerfile(text)]
    assert got == [(2, "FROM", "pytorch/pytorch:2.7.1-cuda"), (3, "RUN", "a && b && c"), (8, "USER", "1000")]
    assert dr.parse_dockerfile('ENTRYPOINT ["hsr-pl"]\n')[0].exec_form() == ["hsr-pl"]
    assert dr.parse_dockerfile("CMD hsr-pl --help\n")[0].exec_form() is None


def test_env_forms_and_substitution():
    assert dr.parse_env('A=1 B="two words" C=${A}x', {}) == {"A": "1", "B": "two words", "C": "1x"}
    assert dr.parse_env("KEY some value", {}) == {"KEY": "some value"}
    env = {"X": "/w"}
    assert dr.expand("${X}/a $X/b ${Y:-d} ${X:+alt} ${Y:+alt} \\$X", env) == "/w/a /w/b d alt  $X"


def test_torch_version_of_the_base_image():
    assert dr.torch_version_of("pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime") == "2.7.1"
    assert dr.torch_version_of("docker.io/pytorch/pytorch:2.5-cuda") == "2.5"
    assert dr.torch_version_of("ubuntu:22.04") is None


def test_container_paths_map_once_and_only_whole_components(tmp_path):
    image = dr.Image(root=tmp_path, prefixes=["/tmp", "/workspace", "/opt/hsr-pl"])
    text = 'mkdir -p /workspace/runs && chown -R hsr:hsr /workspace; ls /opt/hsr-plx /usr/opt/hsr-pl "/opt/hsr-pl" /tmp'
    assert image.map_text(text) == (
        f"mkdir -p {tmp_path}/workspace/runs && chown -R hsr:hsr {tmp_path}/workspace; "
        f'ls /opt/hsr-plx /usr/opt/hsr-pl "{tmp_path}/opt/hsr-pl" {tmp_path}/tmp'
    )


def _copy(tmp_path, line, workdir="/w"):
    context = tmp_path / "ctx"
    for rel in ("a.txt", "b.txt", "pkg/x.py", "pkg/sub/y.py"):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_text(rel)
    image = dr.Image(root=tmp_path / "img", prefixes=[])
    image.users = {"root": dr.User("root", 0, 0, "/root")}
    files = dr.context_files(context, all_files=True)
    ins = dr.parse_dockerfile(line)[0]
    dr._copy(ins, image, workdir, files, context, {})
    return sorted(str(p.relative_to(image.root)) for p in image.root.rglob("*") if p.is_file())


def test_copy_follows_dockers_rules(tmp_path):
    # several sources into a ./ folder; a folder's contents (not the folder) into its destination
    assert _copy(tmp_path / "1", "COPY a.txt b.txt ./") == ["w/a.txt", "w/b.txt"]
    assert _copy(tmp_path / "2", "COPY pkg ./src/pkg") == ["w/src/pkg/sub/y.py", "w/src/pkg/x.py"]
    assert _copy(tmp_path / "3", "COPY pkg /abs/") == ["abs/sub/y.py", "abs/x.py"]
    assert _copy(tmp_path / "4", "COPY a.txt renamed") == ["w/renamed"]
    assert _copy(tmp_path / "5", 'COPY ["a.txt", "dir/"]') == ["w/dir/a.txt"]
    with pytest.raises(dr.StepFailed, match="must end with /"):
        _copy(tmp_path / "6", "COPY a.txt b.txt dest")
    with pytest.raises(dr.StepFailed, match="not found"):
        _copy(tmp_path / "7", "COPY missing ./")
    with pytest.raises(dr.BadInput, match="--from"):
        _copy(tmp_path / "8", "COPY --from=build /x ./")


def test_bad_inputs_end_as_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where an image folder would be made
    assert dr.main(["--dockerfile", str(tmp_path / "nope")]) == 2
    multi = tmp_path / "Dockerfile"
    multi.write_text("FROM pytorch/pytorch:2.7.1 AS a\nFROM ubuntu:22.04\n")
    assert dr.main(["--dockerfile", str(multi)]) == 2
    multi.write_text("FROM ubuntu:22.04\nRUN true\n")
    assert dr.main(["--dockerfile", str(multi)]) == 2
    multi.write_text("FROM pytorch/pytorch:2.7.1\nONBUILD RUN true\n")
    assert dr.main(["--dockerfile", str(multi)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("docker_replay: error: ") for line in lines)
    assert "multi-stage" in lines[1] and "--torch" in lines[2] and "ONBUILD" in lines[3]
    assert not any(scratch.iterdir())


# ------------------------------------------------------------------------------------ the replays
@pytest.fixture
def image_parent():
    """A folder the image's uid 1000 can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="docker-replay-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _replay(parent, *args):
    cmd = [sys.executable, str(SCRIPT), "--torch-from", sys.executable, "--pip-cache",
           "--env", "OMP_NUM_THREADS=1", "--root", str(parent / "image"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_replay_of_the_issue_24_dockerfile_fails_at_the_import_step(image_parent):
    code, log = _replay(image_parent, "--dockerfile", str(BROKEN))
    assert code == 1, log[-3000:]
    assert "ModuleNotFoundError: No module named 'hsr_pl.callbacks'" in log, log[-3000:]
    lines = BROKEN.read_text().splitlines()
    run_line = next(n for n, text in enumerate(lines, 1) if text.startswith("RUN python -m pip install"))
    assert f"REPLAY FAILED: the build stops at Dockerfile line {run_line} (exit status 1)" in log
    assert "image run:" not in log  # the build stopped: nothing ran after that step
    assert not (image_parent / "image").exists()  # the image folder is removed


@pytest.mark.slow
def test_replay_of_the_dockerfile_builds_and_runs_the_demo_as_its_user(image_parent):
    code, log = _replay(image_parent, "--keep")
    assert code == 0, log[-5000:]
    assert "REPLAY PASSED" in log
    import torch

    assert f"this replay: torch {torch.__version__}" in log
    # the installed package, not a source folder, is what `python` imports in /workspace
    assert "check: `import hsr_pl.callbacks` in /workspace loads the installed package (opt/venv/" in log
    assert "the image's default command (ENTRYPOINT + CMD): hsr-pl --help" in log
    assert "the entry point on the given arguments: hsr-pl validate --config configs/demo.yaml" in log
    assert log.count("check: nothing written outside the WORKDIR /workspace") == 2
    image = image_parent / "image"
    assert not (image / "opt" / "hsr-pl" / "src").exists()  # the build removed its source folder
    summary = image / "workspace" / "runs" / "demo" / "summary.json"
    data = json.loads(summary.read_text())
    # the demo's whole flow ran: Wanda 70 % on organism v2, top-4 heads, budget auto stopped on its dev target
    assert (data["method"], data["sparsity"], data["top_h"]) == ("wanda", 0.7, 4)
    assert data["auto"]["stop"]["cause"] == "target" and data["restored_params"] == data["auto"]["final"]["restored"] > 0
    if os.geteuid() == 0 and "via setpriv" in log:
        # the run was the image's user (uid 1000), who owns /workspace and nothing of the build
        assert summary.stat().st_uid == 1000
        assert (image / "opt" / "venv").stat().st_uid == 0
    else:
        assert "cannot switch to uid 1000 here" in log
