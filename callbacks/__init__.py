"""Lightning callbacks of hsr-pl (installed as ``hsr_pl.callbacks``)."""

__all__: list[str] = []
