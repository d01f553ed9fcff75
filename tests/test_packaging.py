"""A real wheel installs `callbacks/` as `hsr_pl.callbacks` and never as a top-level `callbacks`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs wheels: ~10 s a test

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("hsr_pl-*.whl")
    return path


def test_wheel_maps_callbacks_under_hsr_pl(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "hsr_pl/callbacks/__init__.py" in names
    # Sub-packages are listed by hand in pyproject.toml: the benchmark loaders must not be left out.
    assert {"hsr_pl/data/benchmarks/__init__.py", "hsr_pl/data/benchmarks/mmbench.py", "hsr_pl/evaluation/guard_judges.py"} <= set(names)
    # The trained organism ships as package data (safetensors + JSON, no pickle).
    assert "hsr_pl/assets/organism/model.safetensors" in names
    assert "hsr_pl/assets/organism/config.json" in names
    assert "hsr_pl/assets/organism_v2/model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".ckpt")) for n in names)
    assert not any(n.startswith("callbacks/") for n in names), "a top-level `callbacks` package leaked"
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"hsr_pl"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hsr-pl = hsr_pl.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_from_a_target_dir(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "import hsr_pl.callbacks, hsr_pl; print(hsr_pl.callbacks.__file__)"
    # Run outside the repository so the source tree cannot shadow the installed copy.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target / "hsr_pl" / "callbacks"))


def test_current_install_resolves_callbacks_and_no_top_level_package(tmp_path):
    """The environment's own install (editable in CI) imports hsr_pl.callbacks from outside the repo."""
    code = (
        "import importlib.util, hsr_pl.callbacks; print(hsr_pl.callbacks.__file__); "
        "print(importlib.util.find_spec('callbacks'))"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    location, top_level = result.stdout.split()
    assert Path(location).parent.name == "callbacks"
    assert Path(location).name == "__init__.py"
    assert top_level == "None", "a top-level `callbacks` package is importable"
