"""Head-attribution outputs: the released score JSON, resumable partial files, heatmaps.

* :func:`write_scores` / :func:`read_scores` — ``{"<layer>-<head>": score}``, the released
  scripts' format, written atomically (:mod:`hsr_pl.io`: temp file, fsync, ``os.replace``) so a
  crash never leaves half a file where a finished one is expected; NaN/inf is refused, never written.
* :func:`write_partial` / :func:`read_partial` — the same scores plus a header of the settings
  that produced them, so a resumed scan can refuse results computed differently, and a SHA-256 of
  both, so a partial file edited (or damaged) after it was written is refused, not resumed from.
* :func:`heatmap` / :func:`print_heatmap` — a rich terminal heatmap (layers × heads, colour by
  score, top-h heads numbered by rank); :func:`save_heatmap_png` — the same as a PNG when
  matplotlib (the ``plot`` extra) is installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.text import Text

from hsr_pl import io
from hsr_pl.state import head_key, parse_head_key

__all__ = [
    "PARTIAL_FORMAT",
    "partial_checksum",
    "color_scale",
    "scale_range",
    "heatmap",
    "print_heatmap",
    "read_partial",
    "read_scores",
    "save_heatmap_png",
    "score_grid",
    "write_json_atomic",
    "write_partial",
    "write_scores",
]

PARTIAL_FORMAT = "hsr-pl head-attribution partial v2"
_PARTIAL_V1 = "hsr-pl head-attribution partial v1"  # before the checksum

# Viridis anchor colours (perceptually uniform, readable for colour-blind viewers and in greyscale).
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


# ------------------------------------------------------------------------------------ files
def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`hsr_pl.io.write_json_atomic`)."""
    return io.write_json_atomic(path, obj)


def _ordered(scores: Mapping[str, float]) -> dict[str, float]:
    return {key: float(scores[key]) for key in sorted(scores, key=parse_head_key)}


def write_scores(path: str | os.PathLike, scores: Mapping[str, float]) -> Path:
    """The released format: one JSON object ``{"<layer>-<head>": score}``, layer-major order."""
    return write_json_atomic(path, _ordered(scores))


def _read_text(path: Path, fix: str) -> str:
    """``path`` as UTF-8 text, or a one-line error naming the file, what is wrong and ``fix``."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); {fix}"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None


def read_scores(path: str | os.PathLike) -> dict[str, float]:
    """Load and validate a ``{"<layer>-<head>": score}`` file (keys and values checked)."""
    path = Path(path)
    text = _read_text(path, 'give a UTF-8 JSON file {"<layer>-<head>": score} (e.g. the output of an earlier scan)')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected {{\"<layer>-<head>\": score}}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON object {{\"<layer>-<head>\": score}}")
    out: dict[str, float] = {}
    for key, value in data.items():
        try:
            layer, head = parse_head_key(key)
        except ValueError:
            raise ValueError(f"{path}: key {key!r} is not '<layer>-<head>' (the released scripts' format)") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: score of {key!r} is {value!r}; scores must be finite numbers")
        out[head_key(layer, head)] = float(value)
    return out


def partial_checksum(settings: Mapping[str, Any], scores: Mapping[str, Any]) -> str:
    """SHA-256 of a partial file's settings and scores in a canonical JSON form (sorted keys)."""
    canonical = json.dumps(
        {"format": PARTIAL_FORMAT, "settings": settings, "scores": scores},
        sort_keys=True, separators=(",", ":"), allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_partial(path: str | os.PathLike, settings: Mapping[str, Any], scores: Mapping[str, float]) -> Path:
    """Scores finished so far, with the settings that produced them and their checksum (for a safe resume)."""
    ordered = _ordered(scores)
    return write_json_atomic(path, {
        "format": PARTIAL_FORMAT, "settings": dict(settings), "scores": ordered,
        "sha256": partial_checksum(dict(settings), ordered),
    })


def read_partial(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, float]]:
    """``(settings, scores)`` of a partial file written by :func:`write_partial`; one whose checksum
    does not match (edited or damaged since) is refused."""
    path = Path(path)
    text = _read_text(path, "delete it to start the scan afresh")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"partial file {path} is not valid JSON ({exc}); delete it to start the scan afresh"
        ) from None
    if isinstance(data, dict) and data.get("format") == _PARTIAL_V1:
        raise ValueError(
            f"partial file {path} was written by an older hsr-pl (no checksum of its scores, so it cannot be trusted); "
            "delete it to start the scan afresh"
        )
    if not isinstance(data, dict) or data.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{path} is not an hsr-pl partial head-attribution file; delete it or set resume: false")
    settings, raw = data.get("settings", {}), data.get("scores", {})
    if not isinstance(settings, dict) or not isinstance(raw, dict):
        raise ValueError(f"partial file {path} is damaged (settings/scores are not objects); delete it to start afresh")
    scores: dict[str, float] = {}
    for key, value in raw.items():
        try:
            layer, head = parse_head_key(key)
        except ValueError:
            raise ValueError(f"partial file {path} is damaged (key {key!r}); delete it to start the scan afresh") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"partial file {path} is damaged (score of {key!r} is {value!r}); delete it to start the scan afresh"
            )
        scores[head_key(layer, head)] = float(value)
    try:
        expected = partial_checksum(settings, raw)
    except ValueError:  # NaN/inf in the settings: not something write_partial wrote
        expected = None
    if data.get("sha256") != expected:
        raise ValueError(
            f"partial file {path} was changed after hsr-pl wrote it (the SHA-256 of its settings and scores does not "
            "match its 'sha256'); its scores cannot be trusted: delete it to start the scan afresh"
        )
    return dict(settings), scores


# ---------------------------------------------------------------------------------- heatmap
def score_grid(scores: Mapping[str, float]) -> tuple[list[int], int, list[list[float]]]:
    """``(layers, num_heads, grid)``: ``grid[i][h]`` is the score of head ``h`` of ``layers[i]``
    (NaN where a head has no score, e.g. a layer with fewer heads)."""
    if not scores:
        raise ValueError("no head scores to show")
    pairs = {parse_head_key(k): float(v) for k, v in scores.items()}
    if not any(math.isfinite(v) for v in pairs.values()):
        raise ValueError(f"none of the {len(pairs)} head scores is a finite number; nothing to show")
    layers = sorted({layer for layer, _ in pairs})
    num_heads = max(head for _, head in pairs) + 1
    grid = [[pairs.get((layer, h), math.nan) for h in range(num_heads)] for layer in layers]
    return layers, num_heads, grid


def color_scale(values: Sequence[float]) -> str:
    """``log`` when the positive scores span ≥ 100×, else ``linear``: a heavy-tailed score (one
    dominant head) would otherwise paint every other head the same dark colour. Zeros and
    rounding-negative values (a KL of -1e-9) do not force a linear scale: they sit at its bottom."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) >= 100:
        return "log"
    return "linear"


def scale_range(values: Sequence[float], scale: str) -> tuple[float, float]:
    """``(lo, hi)`` of the colour scale: the smallest positive value is the bottom of a log scale."""
    finite = [v for v in values if math.isfinite(v)]
    if scale == "log":
        positive = [v for v in finite if v > 0]
        return min(positive), max(positive)
    return min(finite), max(finite)


def _unit(value: float, lo: float, hi: float, scale: str) -> float:
    if not math.isfinite(value):
        return math.nan
    if scale == "log":
        if value <= lo:
            return 0.0
        value, lo, hi = math.log(value), math.log(lo), math.log(hi)
    return 0.5 if hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))


def _viridis(t: float) -> tuple[int, int, int]:
    pos = t * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    f = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(a[c] + f * (b[c] - a[c])) for c in range(3))  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def heatmap(
    scores: Mapping[str, float],
    top: Sequence[tuple[int, int]] = (),
    title: str = "safety-head scores",
    max_width: int = 100,
) -> Group:
    """A rich renderable: one row per layer, one coloured cell per head; top heads show their
    rank (1 = highest score; ``•`` where a cell is too narrow for the number). A colour bar and
    the top-h list with values follow. Cells are 3, 2 or 1 characters wide to fit ``max_width``."""
    layers, num_heads, grid = score_grid(scores)
    flat = [v for row in grid for v in row]
    scale = color_scale(flat)
    lo, hi = scale_range(flat, scale)
    rank = {tuple(pair): i + 1 for i, pair in enumerate(top)}
    label = max(len(f"L{layers[-1]}"), 3)
    width = next((w for w in (3, 2) if label + 1 + w * num_heads <= max_width), 1)

    lines = [Text(title, style="bold")]
    digits = len(str(num_heads - 1))
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, num_heads) if s * width >= digits + 1 or s == num_heads)
    axis = [" "] * (num_heads * width)
    for h in range(0, num_heads, step):
        tag = str(h)
        end = h * width + width  # right-align the number in its own cell
        begin = max(0, end - len(tag))
        axis[begin:end] = list(tag)
    lines.append(Text(" " * (label + 1) + "".join(axis).rstrip(), style="dim"))
    for layer, row in zip(layers, grid):
        line = Text(f"L{layer}".rjust(label) + " ", style="dim")
        for h, value in enumerate(row):
            t = _unit(value, lo, hi, scale)
            if math.isnan(t):
                line.append(" " * width)
                continue
            fg = "black" if t > 0.6 else "white"
            marker = rank.get((layer, h))
            text = "" if marker is None else (str(marker) if len(str(marker)) <= width else "•")
            line.append(text.center(width), style=f"bold {fg} on {_hex(_viridis(t))}")
        lines.append(line)

    bar = Text(" " * (label + 1))
    bar.append(f"{lo:.3g} ", style="dim")
    for i in range(16):
        bar.append(" ", style=f"on {_hex(_viridis(i / 15))}")
    bar.append(f" {hi:.3g}  ({scale} scale; numbers = rank)", style="dim")
    lines.append(bar)
    if top:
        listing = Text("top: ", style="bold")
        listing.append(
            "  ".join(f"{i + 1}. {head_key(*pair)} ({float(scores[head_key(*pair)]):.4g})" for i, pair in enumerate(top))
        )
        lines.append(listing)
    return Group(*lines)


def print_heatmap(
    scores: Mapping[str, float],
    top: Sequence[tuple[int, int]] = (),
    title: str = "safety-head scores",
    console: Console | None = None,
) -> None:
    console = console or Console()
    console.print(heatmap(scores, top, title, max_width=console.width))


def save_heatmap_png(
    path: str | os.PathLike,
    scores: Mapping[str, float],
    top: Sequence[tuple[int, int]] = (),
    title: str = "safety-head scores",
) -> Path:
    """Write a PNG heatmap (layers on the y axis, heads on the x axis, top-h heads numbered and
    outlined) atomically. Raises ImportError when matplotlib is missing (``pip install hsr-pl[plot]``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    layers, num_heads, grid = score_grid(scores)
    flat = [v for row in grid for v in row]
    scale = color_scale(flat)
    lo, hi = scale_range(flat, scale)
    if scale == "log":  # zeros and rounding-negative scores sit at the bottom of the log scale
        grid = [[max(v, lo) if math.isfinite(v) else v for v in row] for row in grid]
    norm = LogNorm(lo, hi) if scale == "log" else Normalize(lo, hi if hi > lo else lo + 1e-12)

    fig = Figure(figsize=(max(4.5, 0.32 * num_heads + 2.2), max(3.0, 0.3 * len(layers) + 1.6)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label(f"score ({scale} scale)")
    row_of = {layer: i for i, layer in enumerate(layers)}
    for i, (layer, head) in enumerate(top):
        if layer not in row_of:
            continue
        y = row_of[layer]
        t = _unit(grid[y][head], lo, hi, scale)
        ax.add_patch(Rectangle((head - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.text(head, y, str(i + 1), ha="center", va="center", fontsize=7, fontweight="bold",
                color="black" if t > 0.6 else "white")
    step_x = 1 if num_heads <= 32 else 4
    step_y = 1 if len(layers) <= 40 else 4
    ax.set_xticks(range(0, num_heads, step_x))
    ax.set_yticks(range(0, len(layers), step_y))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step_y)])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    caption = title + (f" (top-{len(top)} numbered, outlined)" if top else "")
    ax.set_title(textwrap.fill(caption, width=int(8 * fig.get_figwidth())), fontsize=9)
    fig.tight_layout()

    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
