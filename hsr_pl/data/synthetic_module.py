"""``SyntheticDataModule``: the embedded synthetic VLGuard-format set, generated on first use.

The organism's configs name this module instead of file paths, so ``hsr-pl fit --config
configs/organism.yaml`` works as written on a fresh machine: the data set is generated (seeded,
deterministic, a few seconds) into a cache folder the first time, reused afterwards, and then read
through the ordinary :class:`VLGuardDataModule` code path like any VLGuard file.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from hsr_pl.io import OWNER_MARKER, OutputPathError, check_output_folder, folder_owner

from . import synthetic, synthetic_v2
from .datamodule import EvalSet, VLGuardDataModule

__all__ = ["SYNTHETIC_EVAL_SETS", "SyntheticDataModule", "ensure_synthetic"]

# The installed package (shipped organism included): never a place to generate data into.
PACKAGE_DIR = Path(__file__).resolve().parent.parent

# How each held-out synthetic split is read and scored (see docs/organism.md): the test sets
# (eval_*, the default), then their dev twins (dev_*, for choosing settings; docs/protocol.md).
_TEST_SETS: dict[str, tuple[str, str]] = {
    "eval_harmful_text": ("over_refusal", "harmful"),
    "eval_harmful_image": ("safety", "harmful"),
    "eval_utility": ("utility", "utility"),
    "eval_benign": ("utility", "benign"),
    "eval_glyph_qa": ("utility", "utility"),
    "eval_utility_paraphrase": ("utility", "utility"),
}
SYNTHETIC_EVAL_SETS: dict[str, tuple[str, str]] = {
    **_TEST_SETS, **{name.replace("eval_", "dev_", 1): how for name, how in _TEST_SETS.items()}
}
EVAL_PARTS = ("test", "dev")
DEV_KINDS = ("harmful_text", "harmful_image", "utility", "benign")
"""The dev sets a run measures (names without the ``dev_`` prefix)."""
GENERATORS = {1: synthetic, 2: synthetic_v2}
"""The data set versions: 1, the first organism's set; 2, the harder set of :mod:`hsr_pl.data.synthetic_v2`."""


def generator_of(version: int):
    """The generator module of data set ``version``; unknown versions are refused in one line."""
    if isinstance(version, bool) or version not in GENERATORS:
        raise ValueError(f"version={version!r} is unknown; use 1 (the first organism's set) or 2 (hsr_pl.data.synthetic_v2)")
    return GENERATORS[version]


def _default_dir(args: dict, version: int = 1) -> Path:
    root = Path(os.environ.get("HSR_PL_CACHE", Path.home() / ".cache" / "hsr_pl")) / "synthetic"
    name = ("" if version == 1 else f"v{version}-") + "seed{seed}-train{n_train}-calib{n_calib}-eval{n_eval}-harm{harmful_fraction}".format(**args)
    if args.get("n_dev") is not None and args["n_dev"] != args["n_eval"]:
        name += f"-dev{args['n_dev']}"
    return root / name


def _manifest(folder: Path, generator=synthetic) -> dict | None:
    """The folder's manifest when ``generator`` wrote it (None: absent, unreadable or foreign)."""
    try:
        found = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("generator") == generator.GENERATOR else None


def _is_current(manifest: dict | None, args: dict, generator=synthetic) -> bool:
    """Same generator version and every argument that changes the files."""
    if manifest is None:
        return False
    sizes = generator.split_sizes(args["n_train"], args["n_calib"], args["n_eval"], args.get("n_dev"))
    return (
        manifest.get("version") == generator.GENERATOR_VERSION
        and manifest.get("seed") == args["seed"]
        and manifest.get("harmful_fraction") == args["harmful_fraction"]
        and manifest.get("sizes") == sizes
    )


def _check_replaceable(folder: Path, overwrite: bool, generator=synthetic) -> None:
    """Only a folder this generator wrote (owner marker or its manifest) is regenerated in place."""
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"data_dir={str(folder)!r} is a file; give a folder for the synthetic data set")
    if not folder.is_dir() or overwrite or not any(folder.iterdir()):
        return
    if folder_owner(folder) == generator.GENERATOR or _manifest(folder, generator) is not None:
        return
    raise OutputPathError(
        f"data_dir={str(folder)!r} is not empty and holds no synthetic data set written by hsr-pl (no "
        f"{OWNER_MARKER} or manifest.json of {generator.GENERATOR}); choose a new or empty folder, or set "
        "overwrite: true to replace it"
    )


def ensure_synthetic(data_dir: str | os.PathLike | None = None, *, overwrite: bool = False, version: int = 1,
                     **args) -> Path:
    """Generate the synthetic set into ``data_dir`` unless an identical one is already there.

    A folder is regenerated in place only when this generator wrote it; any other non-empty
    folder is refused unless ``overwrite=True``. The package's own folder is never replaced. Safe
    when several processes of one job call it at once (a lock file serialises them). ``version``
    picks the generator (:data:`GENERATORS`); each version has its own default folder.
    """
    generator = generator_of(version)
    generator.check_arguments(args["seed"], args["n_train"], args["n_calib"], args["n_eval"], args["harmful_fraction"],
                              args.get("n_dev"))
    folder = Path(data_dir).expanduser() if data_dir is not None else _default_dir(args, version)
    _check_replaceable(folder, overwrite, generator)
    check_output_folder(folder, generator.GENERATOR, label="data_dir", overwrite=True, protect=[PACKAGE_DIR])
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(_manifest(folder, generator), args, generator):
            return folder
        _check_replaceable(folder, overwrite, generator)  # another process may have written it meanwhile
        generator.generate(folder, overwrite=True, **args)
    return folder


class SyntheticDataModule(VLGuardDataModule):
    """The embedded synthetic data set behind the :class:`VLGuardDataModule` interface.

    Args:
        seed / n_train / n_calib / n_eval / harmful_fraction: generator settings
            (:func:`hsr_pl.data.synthetic.generate`).
        data_dir: where to generate (default ``$HSR_PL_CACHE`` or ``~/.cache/hsr_pl``, under
            ``synthetic/<settings>``). A non-empty folder that this generator did not write is
            refused (never replaced) unless ``overwrite`` is set.
        overwrite: allow replacing a non-empty ``data_dir`` that holds something else.
        eval_splits: which held-out splits to evaluate (default the six test sets ``eval_*``); a
            dev twin is named ``dev_*`` (e.g. ``dev_harmful_text``).
        eval_part: ``test`` (default: the splits as named) or ``dev``: every ``eval_*`` split of
            ``eval_splits`` (or of the default list) is replaced by its ``dev_*`` twin, so one
            switch moves a config from test to dev. Choose settings on dev, report test once.
        n_dev: records per dev split (default ``n_eval``).
        eval_num_samples: cap per evaluation split (default: all ``n_eval``).
        train_splits: train on these loader splits only (e.g. ``[utility]`` for a benign fine-tune).
        version: which data set, 1 (default: the first organism's, :mod:`hsr_pl.data.synthetic`)
            or 2 (the harder set of :mod:`hsr_pl.data.synthetic_v2`: several phrasings, harm by
            composition, multi-shape utility); other values are refused.
        The rest as in :class:`VLGuardDataModule`; calibration reads ``calibration.json``.
    """

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 6000,
        n_calib: int = 256,
        n_eval: int = 300,
        harmful_fraction: float = 0.15,
        data_dir: str | None = None,
        overwrite: bool = False,
        eval_splits: list[str] | None = None,
        eval_num_samples: int | None = None,
        eval_part: str = "test",
        n_dev: int | None = None,
        processor: object | str | None = None,
        batch_size: int = 48,
        eval_batch_size: int = 100,
        num_samples: int = 128,
        calibration_seed: int = 0,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        train_splits: list[str] | None = None,
        version: int = 1,
    ) -> None:
        generator_of(version)  # an unknown version fails before anything else
        if eval_part not in EVAL_PARTS:
            raise ValueError(f"eval_part={eval_part!r} is unknown; use 'test' (the reported sets) or 'dev' (for choosing settings)")
        eval_splits = list(_TEST_SETS) if eval_splits is None else list(eval_splits)
        unknown = [s for s in eval_splits if s not in SYNTHETIC_EVAL_SETS]
        if unknown:
            raise ValueError(f"unknown synthetic eval splits {unknown}; choose from {list(SYNTHETIC_EVAL_SETS)}")
        if eval_part == "dev":
            eval_splits = [name.replace("eval_", "dev_", 1) for name in eval_splits]
        args = dict(seed=seed, n_train=n_train, n_calib=n_calib, n_eval=n_eval, harmful_fraction=harmful_fraction)
        if n_dev is not None:
            args["n_dev"] = n_dev
        folder = ensure_synthetic(data_dir, overwrite=overwrite, version=version, **args)
        eval_sets = [
            EvalSet(
                name=name.removeprefix("eval_"),
                path=str(folder / f"{name}.json"),
                split=SYNTHETIC_EVAL_SETS[name][0],
                kind=SYNTHETIC_EVAL_SETS[name][1],
                num_samples=eval_num_samples,
            )
            for name in eval_splits
        ]
        super().__init__(
            train_path=str(folder / "train.json"),
            calibration_path=str(folder / "calibration.json"),
            eval_sets=eval_sets,
            processor=processor,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_samples=num_samples,
            seed=calibration_seed,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
            train_splits=train_splits,
        )
        self.data_dir = folder
        self.eval_part = eval_part
        self.version = version

    def dev_eval_sets(self, num_samples: int | None = None) -> list[EvalSet]:
        """The ``dev_*`` twins of the test sets this data set holds (:data:`DEV_KINDS`), ``num_samples``
        prompts each: what the automatic realignment budget measures after each round."""
        out = []
        for kind in DEV_KINDS:
            name = f"dev_{kind}"
            path = self.data_dir / f"{name}.json"
            if path.is_file():
                split, role = SYNTHETIC_EVAL_SETS[name]
                out.append(EvalSet(name=name, path=str(path), split=split, kind=role, num_samples=num_samples))
        return out
