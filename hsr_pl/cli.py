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

__all__ = ["HSRCLI", "main", "run_cli"]


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


def run_cli(args: list[str] | None = None) -> HSRCLI:
    """Run the CLI (``args`` instead of ``sys.argv``) and return it, trainer and model included."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return HSRCLI(
        LVLMModule,
        VLGuardDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """Entry point of the ``hsr-pl`` console script."""
    run_cli()


if __name__ == "__main__":
    main()
