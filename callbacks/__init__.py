"""Lightning callbacks of hsr-pl (installed as ``hsr_pl.callbacks``)."""

from .audit import SafetyAudit
from .export import ExportPretrained
from .head_attribution import SafetyHeadAttribution
from .pruning import Pruning
from .realignment import SafetyRealignment
from .repair import PrunedCheckpoint
from .stages import StageEvaluation

__all__ = [
    "ExportPretrained",
    "PrunedCheckpoint",
    "Pruning",
    "SafetyAudit",
    "SafetyHeadAttribution",
    "SafetyRealignment",
    "StageEvaluation",
]
