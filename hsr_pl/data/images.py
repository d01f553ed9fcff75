"""Image paths named by data files: confined to their image root and verified when the data is read.

A data file is input from elsewhere: its image paths must not reach outside the folder the user
named (``../../etc/passwd``, an absolute path, a symlink out of the folder), unless the user opts
in with ``allow_outside_root: true``. Every image is checked when the file is loaded, not when its
batch is built: empty, undecodable (PIL ``verify``) and oversized (decompression bomb) files are
refused naming the record, before any calibration or training work starts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from .errors import DataFormatError

__all__ = ["MAX_IMAGE_PIXELS", "check_image", "resolve_image"]

# PIL's own default limit (about 89.5 megapixels; Image.MAX_IMAGE_PIXELS): above it PIL only
# warns, and refuses only at twice the size. hsr-pl refuses everything above it.
MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)

# Files already verified in this process, by (path, size, mtime): many records (and every split
# loaded from one data file) name the same image, which needs decoding once.
_VERIFIED: set[tuple[str, int, int]] = set()


def resolve_image(raw: str | Path, root: Path, where: str, *, allow_outside_root: bool = False) -> Path:
    """The image ``raw`` (relative to ``root`` unless absolute), which must exist and — symlinks
    resolved — lie inside ``root`` unless ``allow_outside_root``."""
    candidate = Path(raw).expanduser()
    candidate = candidate if candidate.is_absolute() else root / candidate
    if not candidate.is_file():
        raise FileNotFoundError(f"{where}: image {candidate} does not exist; check image_root (now {root})")
    if not allow_outside_root:
        real, real_root = candidate.resolve(), root.expanduser().resolve()
        if not real.is_relative_to(real_root):
            via = "" if real == candidate else f" (it resolves to {real})"
            raise DataFormatError(
                f"{where}: image {str(raw)!r} lies outside image_root {real_root}{via}; data files may only name "
                "images inside it: move the image there, or set allow_outside_root: true (data module) if you trust "
                "the file"
            )
    return candidate


def check_image(path: Path, where: str) -> None:
    """Refuse an empty, undecodable or oversized image file (header and checksums only: cheap)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    if stat.st_size == 0:
        raise DataFormatError(f"{where}: image {path} is empty (0 bytes); replace it with the real image or drop the record")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
    except Image.DecompressionBombError:
        raise DataFormatError(
            f"{where}: image {path} is larger than {MAX_IMAGE_PIXELS} pixels (a decompression bomb?); downscale it "
            "or drop the record"
        ) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error … for damaged files
        raise DataFormatError(
            f"{where}: image {path} is not a readable image ({type(exc).__name__}: {exc}); replace it or drop the record"
        ) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise DataFormatError(
            f"{where}: image {path} is {width}x{height} = {width * height} pixels, more than {MAX_IMAGE_PIXELS} "
            "(a decompression bomb?); downscale it or drop the record"
        )
    _VERIFIED.add(key)
