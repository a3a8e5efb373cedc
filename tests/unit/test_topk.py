"""The space-saving top-k counter: exact while it has room, bounded and honest about its error once full."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.topk import Frequent, TopK


def test_exact_counts_highest_first_and_ties_in_the_order_reached() -> None:
    top = TopK(4)
    for key in ("a", "b", "b", "c", "b", "a"):
        top.add(key)
    assert top.top(10) == [Frequent("b", 3, 0), Frequent("a", 2, 0), Frequent("c", 1, 0)]
    assert top.top(2) == [Frequent("b", 3, 0), Frequent("a", 2, 0)]
    assert top.top(0) == []
    assert len(top) == 3


def test_a_new_key_takes_over_the_least_counted_one_and_carries_its_count_as_error() -> None:
    top = TopK(2)
    for key in ("a", "a", "a", "b", "c"):
        top.add(key)
    assert top.top(5) == [Frequent("a", 3, 0), Frequent("c", 2, 1)]  # c evicted b (count 1)
    top.add("d")  # the least counted now is c (2): d inherits it
    assert top.top(5) == [Frequent("a", 3, 0), Frequent("d", 3, 2)]
    assert len(top) == 2


def test_a_flood_of_distinct_keys_never_pushes_out_a_frequent_one() -> None:
    top = TopK(10)
    for n in range(2000):  # 2000 one-off hosts, and one host in every 5th event
        top.add(f"host-{n}.example")
        if n % 5 == 0:
            top.add("hot.example")
    [first] = top.top(1)
    assert first.key == "hot.example"
    assert first.count - first.error <= 400 <= first.count
    assert len(top) == 10


def test_capacity_must_hold_a_key() -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        TopK(0)


@given(st.lists(st.sampled_from("abcdefghijklmnop"), max_size=300), st.integers(1, 8))
def test_every_estimate_brackets_the_true_count_and_every_frequent_key_is_held(
    stream: list[str], capacity: int
) -> None:
    top = TopK(capacity)
    for key in stream:
        top.add(key)
    truth = Counter(stream)
    held = top.top(capacity)
    assert len(held) == len(top) == min(capacity, len(truth))
    assert [f.count for f in held] == sorted((f.count for f in held), reverse=True)
    assert sum(f.count for f in held) == len(stream)  # space-saving: the counts add up to the events
    for found in held:
        assert found.count - found.error <= truth[found.key] <= found.count
    for key, count in truth.items():
        if count > len(stream) / capacity:
            assert key in {f.key for f in held}
