"""The ``hsr-pl`` command: a LightningCLI with ``fit`` and ``validate``.

Model and data module default to :class:`~hsr_pl.module.LVLMModule` and
:class:`~hsr_pl.data.VLGuardDataModule`; subclasses are selectable with ``class_path`` in YAML, and
callbacks are added by ``class_path`` under ``trainer.callbacks`` (``hsr_pl.callbacks.Pruning`` …).

Errors: a bad input ends as one line ``hsr-pl: error: <what is wrong and how to fix it>`` on
stderr (sometimes with one ``hint:`` line) and exit status 2; ``--debug`` or ``HSR_PL_DEBUG=1``
shows the traceback instead. See :func:`explain` for how the message is found, and
docs/errors.md for the list of guarded inputs.
"""

from __future__ import annotations

import linecache
import logging
import os
import pickle
import re
import sys
import traceback
import zipfile
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

import hsr_pl
import hsr_pl.callbacks
from hsr_pl.callbacks.base import check_one_pruner

from .data import VLGuardDataModule
from .io import DISK_ERRNOS
from .module import LVLMModule

__all__ = ["HSRCLI", "UserError", "explain", "main", "run_cli"]

EXIT_USAGE = 2  # a bad input (argparse's convention)
EXIT_BUG = 1
DEBUG_ENV = "HSR_PL_DEBUG"
REPORT_URL = "the hsr-pl issue tracker"
EPILOG = (
    f"A bad input ends as one line 'hsr-pl: error: ...' and exit status {EXIT_USAGE}; add --debug (anywhere) or set "
    f"{DEBUG_ENV}=1 to see the traceback. The guarded inputs are listed in docs/errors.md."
)

# What a user's mistake raises: hsr-pl's own errors are ValueError subclasses (ModelLoadError,
# PruningConfigError, CalibrationError, DataFormatError, ResumeMismatchError, OutputPathError, …);
# missing or unwritable paths are OSErrors; RuntimeError carries "needs X" messages.
_USER_TYPES = (ValueError, TypeError, OSError, RuntimeError)
# jsonargparse's wrappers around the real message, and lines that only repeat it.
_WRAPPER = re.compile(r"^(Does not validate against any of the Union subtypes|Problem with given class_path)")
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$', re.S)


class UserError(Exception):
    """A one-line CLI error raised by :class:`HSRCLI` itself (bad ``ckpt_path`` and the like)."""


class HSRCLI(LightningCLI):
    """LightningCLI restricted to the subcommands hsr-pl supports."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "validate":
            # hsr-pl prints one evaluation table; Lightning's per-dataloader tables repeat it.
            parser.set_defaults({"verbose": False})
        return parser

    def instantiate_trainer(self, **kwargs):
        """The Trainer only validates its settings in ``__init__``: what it raises there is a bad input."""
        # Before Lightning's own refusal of two callbacks of one type ("state_key must be unique").
        check_one_pruner((self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or [])
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"trainer: {_one_line(str(exc))}") from exc
        except Exception as exc:
            if type(exc).__name__ != "MisconfigurationException":
                raise
            raise UserError(f"trainer: {_one_line(str(exc))}") from exc

    def _check_ckpt_path(self) -> None:
        """A missing checkpoint fails here, before the model is loaded or any callback runs."""
        ckpt = self.config.get(self.subcommand, {}).get("ckpt_path") if self.subcommand else None
        if ckpt is None or ckpt in ("last", "best", "hpc", "registry") or "://" in str(ckpt):
            return
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise UserError(f"ckpt_path={str(ckpt)!r} {what}; give a Lightning checkpoint file (.ckpt) or drop ckpt_path")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI unpickles ``ckpt_path`` here, in ``__init__``, for its hyperparameters: check
        the file first, so a pickle a safe load refuses or a damaged file is one line."""
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and Path(str(ckpt)).expanduser().is_file():
            _check_checkpoint_file(Path(str(ckpt)).expanduser(), str(ckpt))
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()


def _check_checkpoint_file(path: Path, given: str) -> None:
    """Open ``path`` the way Lightning will (``torch.load``, weights only) before any work: a pickle
    that a safe load refuses, or a damaged file, is a one-line error now, not a traceback after
    the model was loaded. Tensors are memory-mapped, not read, so this costs little."""
    fix = "give a .ckpt file that Lightning saved (trainer.save_checkpoint / ModelCheckpoint) or drop ckpt_path"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"it would import {found.group(1)}" if found else _one_line(str(exc))[:160]
        raise UserError(
            f"ckpt_path={given!r} holds objects that a safe (weights-only) load refuses ({what}), so it was not "
            f"unpickled; it is not a Lightning checkpoint, or it is one from an untrusted source: {fix}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UserError(f"ckpt_path={given!r} is not a readable checkpoint ({_one_line(str(exc))[:160]}); {fix}") from None


def run_cli(args: list[str] | None = None) -> HSRCLI:
    """Run the CLI (``args`` instead of ``sys.argv``) and return it, trainer and model included.

    Errors propagate as exceptions (parse errors as ``argparse.ArgumentError``); :func:`main`
    turns them into one-line messages.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return HSRCLI(
        LVLMModule,
        VLGuardDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Errors raise (main() prints them as one line); the subcommand parsers inherit this.
        parser_kwargs={"exit_on_error": False, "epilog": EPILOG},
        args=args,
    )


# ------------------------------------------------------------------------------- error text
def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, outermost first (explicit causes, then implicit contexts)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _our_roots() -> tuple[str, ...]:
    return tuple(str(Path(m.__file__).resolve().parent) + os.sep for m in (hsr_pl, hsr_pl.callbacks))


def _raised_by_us(exc: BaseException, roots: tuple[str, ...]) -> bool:
    """Whether ``exc`` came from a ``raise`` statement in hsr-pl's own code.

    The innermost frame must be ours *and* its line a ``raise``: an error that torch or Python
    raises inside our code (a shape mismatch, a bad call) is a bug and keeps its traceback.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not str(Path(filename).resolve()).startswith(roots):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def _is_input_error(exc: BaseException, roots: tuple[str, ...]) -> bool:
    """An error that reports a bad input rather than a bug."""
    if isinstance(exc, UserError):
        return True
    if type(exc).__name__ == "MisconfigurationException":  # Lightning's "this trainer setting cannot work"
        return True
    return isinstance(exc, _USER_TYPES) and _raised_by_us(exc, roots)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _project_error(exc: BaseException) -> BaseException | None:
    """The outermost exception in the chain that hsr-pl raised on purpose for a bad input."""
    roots = _our_roots()
    return next((link for link in _chain(exc) if _is_input_error(link, roots)), None)


def _bullets(text: str) -> list[str]:
    """The ``- reason`` lines of a jsonargparse "Does not validate against any of …" message,
    without the uninformative "Expected a <class 'NoneType'>" of optional values."""
    items = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    return [item for item in items if "NoneType" not in item]


def _detail(link: BaseException) -> str:
    """One link's own message as one line, jsonargparse's wrapping removed."""
    text = str(link).strip()
    match = _PARSER_KEY.match(text.splitlines()[0] if text else "")
    if match:
        text = "\n".join([match.group(2), *text.splitlines()[1:]]).strip()
    if _WRAPPER.match(text):
        bullets = _bullets(text)
        text = bullets[0] if bullets else text.splitlines()[0]
    text = text.replace('"<unicode string>"', "the config")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"^Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", r"expected one of \1, got \2", text, flags=re.S)
    text = re.sub(r"^Expected a (.+?)\. Got value: (.*)$", r"expected \1, got \2", text, flags=re.S)
    return _one_line(text)


def _parser_message(exc: BaseException) -> tuple[str, str] | None:
    """jsonargparse's own complaint (unknown option, wrong type, missing file …) as one line."""
    links = list(_chain(exc))
    if not any(isinstance(link, ArgumentError) or type(link).__module__.startswith("jsonargparse") for link in links):
        return None
    keys = [m.group(1) for link in links if (m := _PARSER_KEY.match(str(link).strip()))]
    # The innermost link is the precise complaint; the outer ones only wrap it.
    inner = links[-1]
    detail = _detail(inner)
    hint = "run `hsr-pl fit --help` / `hsr-pl validate --help` for the accepted options"
    if type(inner).__module__.startswith("yaml"):
        detail = f"the config is not valid YAML: {detail}"
        hint = "fix the YAML at that line (values holding ': ' or ' #' need quotes)"
    message = f"{keys[0]}: {detail}" if keys and not detail.startswith(keys[0]) else detail
    return message, hint


def explain(exc: BaseException) -> tuple[str, str | None] | None:
    """``(message, hint)`` for an error caused by the input; None for a bug (keep the traceback).

    * an exception hsr-pl raised itself for a bad input — the outermost in the ``__cause__`` /
      ``__context__`` chain whose raising frame is hsr-pl's code: its own message (it names the
      problem and the fix). This reaches through jsonargparse, which wraps errors raised in a
      class's ``__init__`` in "Does not validate against any of the Union subtypes";
    * jsonargparse's own argument errors: the innermost message, prefixed with the key;
    * anything else is a bug.
    """
    ours = _project_error(exc)
    if ours is not None:
        return _one_line(str(ours)), None
    disk = _disk_full(exc)
    if disk is not None:
        return disk, None
    return _parser_message(exc)


# The reasons as the OS words them, and as Rust's io::ErrorKind (safetensors) names them.
_DISK_FULL = {"No space left on device": ("No space left on device", "StorageFull"),
              "Disk quota exceeded": ("Disk quota exceeded", "QuotaExceeded")}


def _disk_full(exc: BaseException) -> str | None:
    """A write that the file system refused in code not our own (Lightning, torch, safetensors)."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:
            target = f" {link.filename}" if link.filename else ""
            reason = link.strerror or os.strerror(link.errno)
        else:
            reason = next((r for r, words in _DISK_FULL.items() if any(w in str(link) for w in words)), "")
            if not reason:
                continue
            target = ""
        return (
            f"a write{target} failed: {reason}; free space on that disk (or raise the quota) and rerun, or point the "
            "output (default_root_dir, dirpath, output) at another location"
        )
    return None


def _debug_requested(args: Sequence[str]) -> bool:
    return "--debug" in args or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _NoTips(logging.Filter):
    """Drops Lightning's product tips (litlogger / litmodels adverts), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Silence messages a user cannot act on: Lightning's product tips and the deprecation of
    ``LeafSpec`` that Lightning itself triggers inside torch. Real warnings stay."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``hsr-pl`` console script (``argv`` defaults to ``sys.argv[1:]``)."""
    quiet_known_noise()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    args = [a for a in args if a != "--debug"]
    saved = sys.argv
    # LightningCLI parses sys.argv (and warns when given args besides it): show it the cleaned list.
    sys.argv = [saved[0] if saved else "hsr-pl", *args]
    try:
        run_cli()
    except KeyboardInterrupt:
        sys.stderr.write("hsr-pl: interrupted\n")
        raise SystemExit(130) from None
    except Exception as exc:
        if debug:
            raise
        explained = explain(exc)
        if explained is None:
            traceback.print_exc()
            sys.stderr.write(
                f"hsr-pl: internal error: {_one_line(f'{type(exc).__name__}: {exc}')[:500]}\n"
                f"hint: this is a bug, not a bad input; please report it to {REPORT_URL} with the command, the config "
                "(--print_config) and the traceback above\n"
            )
            raise SystemExit(EXIT_BUG) from None
        message, hint = explained
        sys.stderr.write(f"hsr-pl: error: {message}\n")
        if hint:
            sys.stderr.write(f"hint: {hint}\n")
        raise SystemExit(EXIT_USAGE) from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
