"""pricefuse.core.timings: the per-section clock the served model fills for the latency
benchmark."""

from __future__ import annotations

import time

import pytest

from pricefuse.core.timings import Stopwatch, torch_threads


def test_sections_sum_their_entries_and_count_a_raising_one() -> None:
    watch = Stopwatch()
    for _ in range(2):
        with watch("a"):
            time.sleep(0.01)
    with pytest.raises(KeyError), watch("b"):
        raise KeyError("x")
    assert list(watch.seconds) == ["a", "b"]
    assert 0.02 <= watch.seconds["a"] < 0.5
    assert 0.0 <= watch.seconds["b"] < watch.seconds["a"]


def test_torch_threads_sets_the_count_inside_and_restores_it() -> None:
    import torch

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
