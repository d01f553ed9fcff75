"""Pure tensor pruning code: Wanda, SparseGPT, magnitude, SNIP; masks; statistics; layer capture.

Entry point: :func:`prune_model` with a :class:`PruningConfig`. The per-method functions
(:func:`wanda_mask`, :func:`sparsegpt_prune`, :func:`magnitude_mask`, :func:`snip_mask`) work on
plain tensors and are what the tests compare against slow references. See docs/pruning.md.
"""

from .errors import CalibrationError, DamagedModelError, PartialPruningError, PruningConfigError, PruningError
from .magnitude import magnitude_mask
from .masks import check_sparsity, matrix_mask, matrix_rank_mask, nm_mask, parse_nm, row_mask, select_mask
from .runner import METHODS, PruningConfig, PruningResult, prune_linear, prune_model
from .sequential import LayerInput, capture_layer_inputs, run_layer
from .snip import snip_mask, snip_scores
from .sparsegpt import SparseGPTResult, inverse_hessian_factor, sparsegpt_prune
from .stats import HessianStats, RowStats, StatsCollector, TokenSelection, token_mask
from .wanda import wanda_mask, wanda_scores

__all__ = [
    "METHODS",
    "CalibrationError",
    "DamagedModelError",
    "HessianStats",
    "LayerInput",
    "PartialPruningError",
    "PruningConfig",
    "PruningConfigError",
    "PruningError",
    "PruningResult",
    "RowStats",
    "SparseGPTResult",
    "StatsCollector",
    "TokenSelection",
    "capture_layer_inputs",
    "check_sparsity",
    "inverse_hessian_factor",
    "magnitude_mask",
    "matrix_mask",
    "matrix_rank_mask",
    "nm_mask",
    "parse_nm",
    "prune_linear",
    "prune_model",
    "row_mask",
    "run_layer",
    "select_mask",
    "snip_mask",
    "snip_scores",
    "sparsegpt_prune",
    "token_mask",
    "wanda_mask",
    "wanda_scores",
]
