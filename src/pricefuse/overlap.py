"""One background thread for a served request's text encoder, and the values it promises.

Why: on a single served row the text encoder (torch, which releases the GIL inside its ops) is
a third of the work, and the members that read only the parsed rows (the linear member, the
neighbour features' TF-IDF spaces) do not need its output. Running the encoder on a kept worker
thread while the calling thread computes those overlaps the two on a two-core machine. Whoever
reads the embeddings first waits for them (`resolve`), so every consumer sees the same array as
without the overlap: the order of the arithmetic does not change, only when it happens.

Only small requests overlap (the served model decides): a large batch runs torch on every core
already, and a second busy thread would oversubscribe them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def resolve(value: T | Future[T]) -> T:
    """The value itself, or the result of a pending one (waiting for it; its error re-raised)."""
    return value.result() if isinstance(value, Future) else value


class Background:
    """A single worker thread, started on first use and kept for the owner's life: starting a
    thread per request would cost about what the overlap saves on a small one."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, call: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pricefuse-bg")
        return self._pool.submit(call, *args)

    def __getstate__(self) -> dict[str, Any]:
        return {"_pool": None}  # threads do not pickle; a copy starts its own on first use
