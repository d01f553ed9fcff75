"""The Dockerfile: hadolint-clean, runs as a non-root user, and carries what the configs read."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "Dockerfile").read_text()


def test_hadolint_is_clean():
    binary = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_non_root_and_everything_the_configs_need():
    users = re.findall(r"^USER\s+(\S+)", TEXT, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    copied = " ".join(re.findall(r"^COPY .*", TEXT, flags=re.M))
    for folder in ("hsr_pl", "callbacks", "configs", "examples"):
        assert f" {folder} " in copied + " ", folder
    # every relative path a config names exists in the image's working tree (configs/, examples/)
    for config in (ROOT / "configs").rglob("*.yaml"):
        for path in re.findall(r"(?<![\w/])(examples/[\w./-]+)", config.read_text()):
            assert (ROOT / path).exists(), (config.name, path)
    assert re.search(r"\"lightning==[\d.]+\"", TEXT) and re.search(r"\"transformers==[\d.]+\"", TEXT)
