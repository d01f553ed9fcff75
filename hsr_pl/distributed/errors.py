"""The errors of the sharded (FSDP2) path."""

__all__ = ["PeerFailedError", "ShardingError"]


class ShardingError(ValueError):
    """A setting or input that the sharded (FSDP2) path cannot serve; the message says the fix."""


class PeerFailedError(RuntimeError):
    """Another rank raised first; the message carries its error."""
