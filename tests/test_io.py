"""hsr_pl.io: atomic, fsynced writes with umask modes; folders replaced only when they are ours;
output paths refused (and test-written) before any work. Also the synthetic generator's use of it."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path

import pytest

from hsr_pl import io
from hsr_pl.data import synthetic
from hsr_pl.data.synthetic_module import ensure_synthetic

SMALL = dict(seed=0, n_train=6, n_calib=2, n_eval=2, harmful_fraction=0.15)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what "nothing changed" compares)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder where creating a file fails: a 0500 folder, or /sys when running as root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.fail("found no unwritable folder to test with (neither a 0500 folder nor /sys refuses writes)")


# --------------------------------------------------------------------------------------- files
def test_json_is_written_with_umask_modes_and_no_temp_left(tmp_path, umask_027):
    path = io.write_json_atomic(tmp_path / "sub" / "a.json", {"x": [1, 2.5]})
    assert json.loads(path.read_text()) == {"x": [1, 2.5]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600
    assert io.file_mode() == 0o640 and io.folder_mode() == 0o750
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_nan_is_refused_naming_the_key_and_the_old_file_stays(tmp_path):
    path = io.write_json_atomic(tmp_path / "s.json", {"0-0": 1.0})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(io.NonFiniteJSONError, match=r"s.json: refusing to write NaN/inf into JSON \(at '0-1'\)"):
            io.write_json_atomic(path, {"0-0": 1.0, "0-1": bad})
    with pytest.raises(io.NonFiniteJSONError, match=r"at 'heads'\[1\]\['v'\]"):
        io.dumps_json({"heads": [{"v": 1.0}, {"v": math.nan}]})
    assert json.loads(path.read_text()) == {"0-0": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = io.write_text_atomic(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError, match="boom"), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_output_file_checks_name_the_problem_and_create_nothing(tmp_path, unwritable_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(io.OutputPathError, match=r"lies under .*file.txt', which is a file"):
        io.check_output_file(blocker / "deeper" / "out.json")
    with pytest.raises(io.OutputPathError, match="is a folder; give a file path"):
        io.check_output_file(tmp_path)
    with pytest.raises(io.OutputPathError, match="cannot write in"):
        io.check_output_file(unwritable_dir / "new" / "out.json")
    assert io.check_output_file(tmp_path / "a" / "b" / "out.json") == tmp_path / "a" / "b" / "out.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "locked"]  # nothing created


# ------------------------------------------------------------------------------------- folders
def test_atomic_folder_marks_its_folder_and_replaces_only_its_own(tmp_path, umask_027):
    target = tmp_path / "out"
    with io.atomic_folder(target, "tests") as tmp:
        (tmp / "a.txt").write_text("1")
    assert io.folder_owner(target) == "tests"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    with io.atomic_folder(target, "tests") as tmp:  # ours: replaced without overwrite
        (tmp / "b.txt").write_text("2")
    assert sorted(tree(target)) == [io.OWNER_MARKER, "b.txt"]
    with pytest.raises(io.OutputPathError, match="was written by tests, not other.*set overwrite: true"):
        io.check_output_folder(target, "other")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_foreign_folder_is_refused_unless_overwrite(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    before = tree(foreign)
    with pytest.raises(io.OutputPathError, match=r"dirpath='.*photos' is not empty and was not written by hsr-pl"):
        with io.atomic_folder(foreign, "tests") as tmp:
            pytest.fail(f"the body ran for a refused folder ({tmp})")
    assert tree(foreign) == before
    with io.atomic_folder(foreign, "tests", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("n")
    assert sorted(tree(foreign)) == [io.OWNER_MARKER, "new.txt"]


def test_a_protected_source_is_never_replaced_even_through_a_symlink(tmp_path):
    source = tmp_path / "models" / "dense"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(source)
    for target in (source, link, tmp_path / "models"):
        with pytest.raises(io.OutputPathError, match="the input it was read from"):
            io.check_output_folder(target, "tests", overwrite=True, protect=[source])
    assert tree(source) == {"config.json": b"{}"}


def test_a_failure_inside_the_folder_body_changes_nothing(tmp_path):
    target = tmp_path / "out"
    with io.atomic_folder(target, "tests") as tmp:
        (tmp / "a.txt").write_text("1")
    before = tree(target)
    with pytest.raises(OSError, match="disk full"), io.atomic_folder(target, "tests") as tmp:
        (tmp / "half.txt").write_text("h")
        raise OSError("disk full")
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------- synthetic data
def test_synthetic_data_dir_never_replaces_a_foreign_folder(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "train.json").write_text("[] mine")
    before = tree(foreign)
    with pytest.raises(io.OutputPathError, match=r"data_dir='.*data' is not empty and holds no synthetic data set"):
        ensure_synthetic(foreign, **SMALL)
    assert tree(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # not even a lock file
    ensure_synthetic(foreign, overwrite=True, **SMALL)
    assert io.folder_owner(foreign) == synthetic.GENERATOR
    assert "mine" not in (foreign / "train.json").read_text()


def test_synthetic_regenerates_its_own_folder_when_any_size_changes(tmp_path):
    folder = ensure_synthetic(tmp_path / "syn", **SMALL)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic(folder, **SMALL) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp  # reused
    ensure_synthetic(folder, **{**SMALL, "n_eval": 3})  # only n_eval differs: regenerated
    assert json.loads((folder / "manifest.json").read_text())["sizes"]["eval_benign"] == 3
    (folder / io.OWNER_MARKER).unlink()  # a cache written before the marker existed: its manifest proves it
    ensure_synthetic(folder, **{**SMALL, "seed": 1})
    assert json.loads((folder / "manifest.json").read_text())["seed"] == 1


def test_synthetic_refuses_a_file_and_bad_arguments_before_writing(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(io.OutputPathError, match="is a file"):
        ensure_synthetic(path, **SMALL)
    with pytest.raises(ValueError, match="n_train must be a non-negative integer"):
        ensure_synthetic(tmp_path / "new", **{**SMALL, "n_train": -1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
