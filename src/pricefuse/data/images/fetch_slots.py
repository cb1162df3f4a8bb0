"""Process-wide limits on served image fetches: how many at once, per host, and name lookups.

Why process-wide: serving handles each request in its own pool of workers, so a limit per
request multiplies with the number of requests in flight (three requests once held 48 fetches
open). The limits here are shared by every thread of the process: a fetch takes a slot before it
connects and gives it back when it ends, so however many requests arrive, at most `total` fetches
(and at most `per_host` to any one host) are open at once; the rest wait, but never past their own
deadline.

Why the lookups too: the system resolver (getaddrinfo) can block far longer than a fetch may
take, and a thread stuck in it cannot be interrupted. So a lookup runs on a resolver thread while
its fetch waits at most until the deadline; a lookup that outlives it is abandoned (its thread
finishes in its own time), and at most `total` such threads exist at once, so stuck lookups can
pile up no further: when all are taken, a fetch waits for one only until its deadline.

Why shared by limits and not held by each policy: every `ImagePolicy` built from the same params
(a served model's, `pricefuse predict`'s, a test's) must draw on the same slots, and a policy is a
frozen, comparable, picklable value that a lock would spoil. `shared_slots(total, per_host)` hands
out one `FetchSlots` per pair of limits for the life of the process. The limit is per process:
a server running N worker processes opens up to N times `total` fetches. A forked child starts
with fresh slots (the parent's in-flight fetches are not the child's).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_MAX_FETCHES = 16
DEFAULT_MAX_FETCHES_PER_HOST = 4


class ResolverBusy(Exception):
    """Every resolver thread is still taken (by lookups that outlived their fetches)."""


class ResolverTimeout(Exception):
    """The lookup did not finish before the deadline (its thread is left to finish alone)."""


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


class ResolverPool:
    """Runs blocking lookups on at most `size` threads, each waited on only until a deadline.

    A thread is started per lookup and ends with it; the count of live ones is what is bounded
    (a semaphore taken by the caller and given back by the thread itself when its lookup
    returns, however late), so an abandoned lookup keeps its place until it really ends.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"resolver threads must be at least 1, got {size}")
        self.size = size
        self._free = threading.BoundedSemaphore(size)

    def run(self, lookup: Callable[[], T], deadline: float) -> T:
        """`lookup()`'s result, or its exception, if it ends by `deadline` (a monotonic time);
        `ResolverBusy` when no thread came free by then, `ResolverTimeout` when it ran out."""
        if not self._free.acquire(timeout=_remaining(deadline)):
            raise ResolverBusy(f"all {self.size} resolver threads busy")
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["value"] = lookup()
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome["error"] = exc
            finally:
                self._free.release()
                done.set()

        try:
            threading.Thread(target=work, name="pricefuse-dns", daemon=True).start()
        except BaseException:
            self._free.release()
            raise
        if not done.wait(_remaining(deadline)):
            raise ResolverTimeout("lookup unfinished at the deadline")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


class FetchSlots:
    """At most `total` fetches at once, and at most `per_host` to one host name.

    A fetch takes both at once (`acquire`), so a fetch waiting on a busy host never sits on a
    total slot that a fetch to another host could use. Following a redirect, it keeps its total
    slot and moves its host slot (`Lease.move`): it gives the old host's back before waiting for
    the new one's, so no fetch ever holds two host slots, and no one waits for a total slot while
    holding a host slot; with every wait bounded by a deadline, nothing can deadlock.
    """

    def __init__(self, total: int, per_host: int) -> None:
        if total < 1 or per_host < 1:
            raise ValueError(f"fetch limits must be at least 1, got {total} and {per_host}")
        self.total = total
        self.per_host = per_host
        self.resolvers = ResolverPool(total)
        self._changed = threading.Condition()
        self._open = 0
        self._hosts: Counter[str] = Counter()

    def acquire(self, host: str, deadline: float) -> Lease | None:
        """A total slot and a slot for `host`, waiting until `deadline` at most; None if none
        came free by then."""
        with self._changed:
            free = self._changed.wait_for(
                lambda: self._open < self.total and self._hosts[host] < self.per_host,
                timeout=_remaining(deadline),
            )
            if not free:
                return None
            self._open += 1
            self._hosts[host] += 1
        return Lease(self, host)

    def in_use(self) -> tuple[int, dict[str, int]]:
        """(open fetches, open fetches per host) right now."""
        with self._changed:
            return self._open, dict(self._hosts)

    def _enter_host(self, host: str, deadline: float) -> bool:
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._hosts[host] < self.per_host, timeout=_remaining(deadline)
            ):
                return False
            self._hosts[host] += 1
            return True

    def _leave_host(self, host: str) -> None:
        with self._changed:
            self._hosts[host] -= 1
            if self._hosts[host] <= 0:
                del self._hosts[host]  # a host seen once must not stay in the table forever
            self._changed.notify_all()  # waiters differ in what they wait for

    def _leave(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify_all()


class Lease:
    """One fetch's hold on the slots: a total slot, and a host slot unless a move failed."""

    def __init__(self, slots: FetchSlots, host: str) -> None:
        self._slots = slots
        self.host: str | None = host
        self._held = True

    def move(self, host: str, deadline: float) -> bool:
        """Hold a slot for `host` instead (a redirect hop), waiting until `deadline` at most;
        False if none came free (the total slot is still held until `release`)."""
        if host == self.host:
            return True
        if self.host is not None:
            self._slots._leave_host(self.host)
            self.host = None
        if not self._slots._enter_host(host, deadline):
            return False
        self.host = host
        return True

    def release(self) -> None:
        """Give every slot back; a second call does nothing."""
        if not self._held:
            return
        self._held = False
        if self.host is not None:
            self._slots._leave_host(self.host)
            self.host = None
        self._slots._leave()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


_shared: dict[tuple[int, int], FetchSlots] = {}
_shared_lock = threading.Lock()


def shared_slots(total: int, per_host: int) -> FetchSlots:
    """The process's one `FetchSlots` for these limits (created on first use)."""
    key = (int(total), int(per_host))
    with _shared_lock:
        slots = _shared.get(key)
        if slots is None:
            slots = _shared[key] = FetchSlots(*key)
        return slots


def _forget_after_fork() -> None:
    """A child process inherits the parent's counts but none of its threads: start afresh."""
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
