"""Lightning callbacks of hsr-pl (installed as ``hsr_pl.callbacks``)."""

from .pruning import Pruning

__all__ = ["Pruning"]
