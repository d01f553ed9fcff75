"""Data: VLGuard-format loading, collation, the data module, the embedded synthetic set."""

from .collate import VLGuardCollator, build_messages
from .datamodule import EvalSet, VLGuardDataModule
from .dev import dev_sets
from .synthetic_module import SyntheticDataModule
from .vlguard import SPLITS, DataFormatError, load_vlguard, pairs_to_dataset, select_samples

__all__ = [
    "SPLITS",
    "SyntheticDataModule",
    "DataFormatError",
    "EvalSet",
    "VLGuardCollator",
    "VLGuardDataModule",
    "build_messages",
    "dev_sets",
    "load_vlguard",
    "pairs_to_dataset",
    "select_samples",
]
