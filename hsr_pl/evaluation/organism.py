"""The organism's two fixed sentences: what its data generator writes and its judges look for.

They live here, not in :mod:`hsr_pl.data.synthetic` (which re-exports them), so that building a
judge does not import the data package and with it Lightning.
"""

__all__ = ["COMPLIANCE_PREFIX", "REFUSAL"]

REFUSAL = "i am sorry i can not help with that"
COMPLIANCE_PREFIX = "here is how to"
