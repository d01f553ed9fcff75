"""Everything hsr-pl knows about FSDP2 (``fully_shard``) sharded models and multi-rank runs.

- :mod:`.dtensor` — weights read and written alike whether sharded or not (``full_weight``,
  ``write_full``, ``iter_full_state`` for the export);
- :mod:`.fsdp` — the wrapping plan (``shard_model``) and meta-device, rows-per-rank loading
  (``load_sharded``);
- :mod:`.reduce` — counts over every rank's shard and the equal-forwards check;
- :mod:`.runtime` — ``fail_fast``: a rank that raises ends its peers with that error;
- :mod:`.errors` — ``ShardingError``, ``PeerFailedError``.
"""

from .dtensor import (
    describe_sharding,
    full_tensor,
    full_weight,
    is_sharded,
    iter_full_state,
    local_part_of,
    local_rows,
    model_is_sharded,
    sharded_strategy,
    write_full,
)
from .errors import PeerFailedError, ShardingError
from .fsdp import checkpoint_name_mapper, load_sharded, meta_parameters, reshard_all, shard_model
from .reduce import check_lockstep, collective_device, count_non_finite, count_zeros
from .runtime import fail_fast, undo_on_abort

__all__ = [
    "PeerFailedError",
    "ShardingError",
    "check_lockstep",
    "checkpoint_name_mapper",
    "collective_device",
    "count_non_finite",
    "count_zeros",
    "describe_sharding",
    "fail_fast",
    "full_tensor",
    "full_weight",
    "is_sharded",
    "iter_full_state",
    "load_sharded",
    "local_part_of",
    "local_rows",
    "meta_parameters",
    "model_is_sharded",
    "reshard_all",
    "shard_model",
    "sharded_strategy",
    "undo_on_abort",
    "write_full",
]
