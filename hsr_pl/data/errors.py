"""The data wing's error class (its own module so the loaders and the image checks share it)."""


class DataFormatError(ValueError):
    """A data file (VLGuard format, a benchmark, an image) that cannot be used as it is."""
