"""The organism zoo: v2 organisms of two families and several seeds, trained on demand into the
user cache (never into the package).

Each member is one training run of a family's config (``FAMILIES``) with one seed: the seed is
the model's initialisation (``init_seed``), the training order (``seed_everything``) and the
synthetic data (``data.seed``: the member's own verb–object pairs, images and dev/test splits).
A member is trained once and reused while its settings (config text, seed, overrides, hsr-pl
version) are the same; other settings give another folder, so nothing is ever overwritten.

    python benchmarks/zoo.py train                       # 3 seeds x 2 families, 2 at a time
    python benchmarks/zoo.py train --families llava --seeds 0 --jobs 1
    python benchmarks/zoo.py list

Members live under ``$HSR_PL_CACHE/zoo`` (default ``~/.cache/hsr_pl/zoo``), one folder per
member, ``<family>-seed<seed>-<key>``, holding the exported checkpoint, its training log and ``zoo.json`` (the settings and the
training wall time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FAMILIES: dict[str, str] = {
    "llava": "configs/organism_v2.yaml",
    "qwen2vl": "configs/organism_v2_qwen2vl.yaml",
}
"""Zoo family name -> the training config (relative to the repository) it trains from."""
DEFAULT_SEEDS = (0, 1, 2)
MARKER = "zoo.json"
EXPORT_CLASS = "hsr_pl.callbacks.ExportPretrained"


def zoo_root() -> Path:
    """Where members are cached: ``$HSR_PL_CACHE/zoo`` (default ``~/.cache/hsr_pl/zoo``)."""
    return Path(os.environ.get("HSR_PL_CACHE", Path.home() / ".cache" / "hsr_pl")) / "zoo"


@dataclass(frozen=True)
class Member:
    """One zoo organism: a family's config trained with one seed (and optional CLI-style overrides)."""

    family: str
    seed: int
    max_steps: int | None = None  # None: the config's; a smaller number makes a smoke-test member

    @property
    def config_path(self) -> Path:
        return REPO / FAMILIES[self.family]

    def settings(self) -> dict:
        """Everything that decides the trained weights (what the cache key hashes)."""
        from hsr_pl import __version__

        text = self.config_path.read_text(encoding="utf-8")
        return {
            "family": self.family,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "config": FAMILIES[self.family],
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "hsr_pl": __version__,
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def path(self) -> Path:
        return zoo_root() / f"{self.family}-seed{self.seed}-{self.key}"

    @property
    def name(self) -> str:
        return f"{self.family}-seed{self.seed}"

    def is_built(self) -> bool:
        marker = self.path / MARKER
        if not marker.is_file() or not (self.path / "model.safetensors").is_file():
            return False
        try:
            return json.loads(marker.read_text())["settings"] == self.settings()
        except (OSError, ValueError, KeyError):
            return False


def derived_config(member: Member, run_dir: Path, export_dir: Path) -> dict:
    """The family's config with this member's seeds and a private run/export folder."""
    config = yaml.safe_load(member.config_path.read_text(encoding="utf-8"))
    config["seed_everything"] = member.seed
    config["model"].setdefault("init_args", {})["init_seed"] = member.seed
    config["data"].setdefault("init_args", {})["seed"] = member.seed
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    if member.max_steps is not None:
        trainer["max_steps"] = member.max_steps
        trainer["val_check_interval"] = member.max_steps
    exports = [cb for cb in trainer.get("callbacks", []) if cb.get("class_path") == EXPORT_CLASS]
    if len(exports) != 1:
        raise SystemExit(f"zoo: {FAMILIES[member.family]} must hold exactly one {EXPORT_CLASS} callback")
    exports[0].setdefault("init_args", {})["dirpath"] = str(export_dir)
    return config


def build(member: Member, python: str = sys.executable, quiet: bool = False) -> Path:
    """Train ``member`` unless the cache holds it; returns its folder.

    Trains in a private temporary folder inside the zoo root and moves the export into place with
    one rename, so an interrupted run leaves no half-written member behind.
    """
    if member.is_built():
        return member.path
    if member.path.exists():
        raise SystemExit(
            f"zoo: {member.path} exists but is not a complete member with these settings; "
            "remove it (it is a cache folder) and run again"
        )
    root = zoo_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{member.name}.tmp-", dir=root))
    try:
        config = derived_config(member, work / "run", work / "export")
        config_file = work / "config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        with open(work / "train.log", "w", encoding="utf-8") as log:
            proc = subprocess.run([python, "-m", "hsr_pl", "fit", "--config", str(config_file)],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (work / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise SystemExit(f"zoo: training {member.name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        export = work / "export"
        marker = {"settings": member.settings(), "seconds": round(seconds, 1), "omp_threads": 1}
        (export / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        shutil.copy2(work / "train.log", export / "train.log")
        os.replace(export, member.path)
        if not quiet:
            print(f"zoo: trained {member.name} in {seconds:.0f} s -> {member.path}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return member.path


def build_all(members: list[Member], jobs: int = 2) -> dict[str, Path]:
    """Build every member (``jobs`` trainings at a time, one thread each)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        paths = list(pool.map(build, members))
    return {m.name: p for m, p in zip(members, paths, strict=True)}


def merge_runs(files: list[str], lists: tuple[str, ...] = ("records",)) -> dict:
    """One payload from benchmark runs made separately (e.g. one per member, some side by side): the
    record lists joined (a later run of the same cell replaces the earlier one: a rerun after a fix),
    every run's command kept, ``seconds`` the sum of the runs' own times."""
    parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in files]
    payload = {**parts[0], "command": " ; ".join(part["command"] for part in parts),
               "seconds": round(sum(part["seconds"] for part in parts), 1), "runs": len(parts),
               "seconds_note": "sum of the runs' own wall times (some ran side by side on the 2 cores)"}
    for key in lists:
        joined: dict = {}
        for part in parts:  # a later run of the same cell (member, pruner, sparsity, method, split) replaces it
            for r in part.get(key, []):
                cell = tuple(r.get(k) for k in ("member", "pruner", "sparsity", "method", "split")) if isinstance(r, dict) else (len(joined),)
                joined.pop(cell, None)
                joined[cell] = r
        payload[key] = list(joined.values())
    return payload


def members_from(families: list[str], seeds: list[int], max_steps: int | None = None) -> list[Member]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"zoo: unknown families {unknown}; choose from {list(FAMILIES)}")
    return [Member(f, s, max_steps) for f in families for s in seeds]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "list"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one CPU thread each)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the configs' steps (smoke tests)")
    args = parser.parse_args(argv)
    members = members_from(args.families, args.seeds, args.max_steps)
    if args.command == "list":
        for m in members:
            state = "built" if m.is_built() else "missing"
            print(f"{m.name:20s} {state:8s} {m.path}")
        return
    start = time.perf_counter()
    build_all(members, args.jobs)
    print(f"zoo: {len(members)} members ready in {time.perf_counter() - start:.0f} s under {zoo_root()}")


if __name__ == "__main__":
    main()
