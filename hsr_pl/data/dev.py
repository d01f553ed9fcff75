"""Where a run's dev sets come from: what the automatic realignment budget measures after each round.

Dev sets are held out of calibration and of the reported test sets, so a setting chosen on them is
not fitted to the numbers that are reported. Two sources:

* the embedded synthetic data: its ``dev_*`` twins of the test sets (``dev_harmful_text``,
  ``dev_harmful_image``, ``dev_utility``, ``dev_benign``);
* a VLGuard-format data module with ``dev_fraction`` / ``dev_num_records``: the records held out of
  its calibration file (:meth:`VLGuardDataModule.dev_eval_sets`).

Any other data module has none (the caller refuses what needs them, naming the fix).
"""

from __future__ import annotations

from .datamodule import EvalSet, VLGuardDataModule
from .synthetic_module import DEV_KINDS

__all__ = ["DEV_KINDS", "dev_sets"]


def dev_sets(datamodule: object, num_samples: int | None = None) -> list[EvalSet]:
    """The dev evaluation sets of ``datamodule``, ``num_samples`` prompts each (empty: none); each data
    module says which it holds (``dev_eval_sets``)."""
    if isinstance(datamodule, VLGuardDataModule):  # SyntheticDataModule included
        return datamodule.dev_eval_sets(num_samples)
    return []
