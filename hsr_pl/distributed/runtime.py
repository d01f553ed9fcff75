"""Fail fast across ranks: a rank that raises makes its peers end with that error within a
bounded time, instead of waiting forever in a collective."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from .errors import PeerFailedError

__all__ = ["fail_fast", "undo_on_abort"]


# ---------------------------------------------------------------------------------- fail fast
_ERROR_KEY = "hsr_pl/first_error/"
_SEEN_KEY = "hsr_pl/error_seen/"
# Steps are entered in the same order on every rank, so this count names the same step everywhere:
# each step's error lives under its own key, and an error caught by a script cannot leak into the
# next step of the same process group.
_STEPS = [0]
# What the watchdog must undo before it ends a stuck process (os._exit skips every finally).
_ON_ABORT: list = []


@contextmanager
def undo_on_abort(action) -> Iterator[None]:
    """Run ``action()`` if :func:`fail_fast`'s watchdog ends this process inside the block (a
    half-written temporary folder, say); normal exits and exceptions leave it to the caller."""
    _ON_ABORT.append(action)
    try:
        yield
    finally:
        _ON_ABORT.remove(action)


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no process group, or a store we cannot reach
        return None


def _peer_error(store, timeout: float, key: str) -> str | None:
    """The first error a rank published under ``key``, waiting up to ``timeout`` s for one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if store.check([key]):
                return store.get(key).decode("utf-8", "replace")
        except Exception:  # the store's host went away: nothing more to learn
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


@contextmanager
def fail_fast(what: str, *, grace: float = 2.0, linger: float = 10.0, poll: float = 0.2) -> Iterator[None]:
    """Make a multi-rank step end on every rank with the first error, within a bounded time.

    * The rank that raises first writes ``"rank <r>: <error>"`` to the process group's store
      (first writer wins), keeps the store up until every peer has read it (rank 0 hosts it; at
      most ``linger`` s) and re-raises.
    * A peer whose own collective then fails finds that error and raises :class:`PeerFailedError`
      carrying it.
    * A peer still blocked in a collective cannot be interrupted from Python (gloo and NCCL wait
      in C++; aborting a gloo process group does not release the wait): a watchdog thread that
      sees the error, and sees this rank still inside the step ``grace`` s later, prints
      ``hsr-pl: error: <what> stopped because rank <r>: <error>`` to stderr and ends the process
      with status 1.

    So every rank ends within about ``poll + grace`` s of the first error. Without a process
    group (or with one rank) this is a no-op.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    store = _store()
    if store is None:
        yield
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    _STEPS[0] += 1
    key, seen = f"{_ERROR_KEY}{_STEPS[0]}", f"{_SEEN_KEY}{_STEPS[0]}/"
    inside = threading.Event()
    inside.set()
    # The peer's error as the watchdog read it: once we acknowledge it, rank 0 may exit and take the
    # store with it, so our own collective's "connection closed" must not need the store any more.
    known: list[str] = []
    watchdog = threading.Thread(
        target=_watch, args=(store, rank, what, inside, grace, poll, key, seen, known), name="hsr-pl-fail-fast",
        daemon=True,
    )
    watchdog.start()
    try:
        yield
    except PeerFailedError:
        inside.clear()
        raise
    except BaseException as exc:
        inside.clear()
        first = known[0] if known else _peer_error(store, 0.0, key)
        if first is None and _looks_collective(exc):
            first = _peer_error(store, grace, key)
        if first is not None and not first.startswith(f"rank {rank}:"):
            _mark_seen(store, rank, seen)
            raise PeerFailedError(f"{what} stopped because {first}") from exc
        text = str(exc).strip().splitlines()
        message = f"rank {rank}: {type(exc).__name__}: {text[0] if text else ''}"
        try:
            if store.compare_set(key, "", message).decode("utf-8", "replace") == message:
                _wait_seen(store, rank, world, linger, seen)
            else:  # another rank was first: it waits for our word before letting the store go
                _mark_seen(store, rank, seen)
        except Exception:  # the store is gone: our own error is all we can raise
            pass
        raise
    finally:
        inside.clear()


def _watch(
    store, rank: int, what: str, inside: threading.Event, grace: float, poll: float, key: str, seen: str,
    known: list[str],
) -> None:
    """The watchdog of :func:`fail_fast`: ends this process when a peer failed and this rank
    stays stuck in the step."""
    while inside.is_set():
        time.sleep(poll)
        first = _peer_error(store, 0.0, key) if inside.is_set() else None
        if first is None or first.startswith(f"rank {rank}:"):
            continue
        known.append(first)  # before the acknowledgement, which lets the failing rank (and the store) go
        _mark_seen(store, rank, seen)
        deadline = time.monotonic() + grace
        while inside.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not inside.is_set():
            return  # the step ended on its own (and raises the peer's error itself)
        sys.stdout.flush()
        sys.stderr.write(
            f"hsr-pl: error: {what} stopped because {first} (rank {rank} was waiting for it in a collective "
            "and exits)\n"
        )
        sys.stderr.flush()
        for action in reversed(_ON_ABORT):
            try:
                action()
            except Exception:  # best effort: the process ends either way
                pass
        os._exit(1)


def _looks_collective(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "closed", "distbackend"))


def _mark_seen(store, rank: int, seen: str) -> None:
    try:
        store.set(f"{seen}{rank}", "1")
    except Exception:
        pass


def _wait_seen(store, rank: int, world: int, linger: float, seen: str) -> None:
    """Keep the store up (rank 0 hosts it) until every peer has read the error, or ``linger`` s."""
    deadline = time.monotonic() + linger
    keys = [f"{seen}{r}" for r in range(world) if r != rank]
    while time.monotonic() < deadline:
        try:
            if all(store.check([k]) for k in keys):
                return
        except Exception:
            return
        time.sleep(0.05)
