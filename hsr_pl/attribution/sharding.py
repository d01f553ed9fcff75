"""Splitting a head-attribution scan over DDP ranks (pure: every rank computes the same split)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["Pair", "assign_heads"]

Pair = tuple[int, int]


def assign_heads(targets: Mapping[int, Sequence[int]], world: int, num_layers: int | None = None) -> list[list[Pair]]:
    """Split the ``{layer: [head, ...]}`` to score into ``world`` shares, one per rank.

    Whole layers stay on one rank (the exact engine caches a layer's inputs and batches its heads
    in one forward, so a split layer costs more and may differ in the last float bit); a layer is
    halved only while there are fewer pieces than ranks. Pieces go largest-first to the least
    loaded rank, a piece of layer l costing ``heads × (num_layers − l)`` (the layers re-run).
    Deterministic, so every rank computes the same split.
    """
    if world < 1:
        raise ValueError(f"world={world} must be ≥ 1")
    depth = (max(targets) + 1 if targets else 0) if num_layers is None else num_layers
    pieces: list[tuple[int, list[int]]] = [(layer, sorted(heads)) for layer, heads in sorted(targets.items()) if heads]

    def cost(piece: tuple[int, list[int]]) -> int:
        return len(piece[1]) * max(1, depth - piece[0])

    while len(pieces) < world:
        splittable = [p for p in pieces if len(p[1]) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda p: (cost(p), -p[0]))
        i = pieces.index(big)
        half = len(big[1]) // 2
        pieces[i : i + 1] = [(big[0], big[1][:half]), (big[0], big[1][half:])]
    shares: list[list[Pair]] = [[] for _ in range(world)]
    load = [0] * world
    for piece in sorted(pieces, key=lambda p: (-cost(p), p[0], p[1][0])):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost(piece)
        shares[rank].extend((piece[0], h) for h in piece[1])
    return [sorted(share) for share in shares]
