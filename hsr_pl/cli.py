"""The ``hsr-pl`` command: a LightningCLI with ``fit`` and ``validate``.

Model and data module default to :class:`~hsr_pl.module.LVLMModule` and
:class:`~hsr_pl.data.VLGuardDataModule`; subclasses are selectable with ``class_path`` in YAML, and
callbacks are added by ``class_path`` under ``trainer.callbacks`` (``hsr_pl.callbacks.Pruning`` …).
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from .data import VLGuardDataModule
from .module import LVLMModule

__all__ = ["HSRCLI", "main"]


class HSRCLI(LightningCLI):
    """LightningCLI restricted to the subcommands hsr-pl supports."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }


def main(args: list[str] | None = None) -> HSRCLI:
    """Entry point of the ``hsr-pl`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return HSRCLI(
        LVLMModule,
        VLGuardDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
