"""Wall time per named section of one call, cheap enough to leave on in serving; the torch
thread scope the served model runs small requests in.

Why: latency work needs the split of a served prediction (parse, encoders, members, blend) from
the code that actually serves, not from a copy of it in a benchmark; a perf_counter pair per
section costs well under a microsecond, so the served model always records it
(`PriceEnsembleModel.last_timings`) and `benchmarks/serve.py` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds per section name, summed over every entry into that section."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch on `n` intra-op threads (None: leave it), then restore.

    The setting is process-wide: concurrent calls may see each other's, which changes their
    speed, never their results.
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
