"""hsr-pl: Hierarchical Safety Realignment for pruned vision-language models."""

__version__ = "0.1.0"
