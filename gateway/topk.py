"""The most frequent keys of an unbounded stream in fixed memory: the space-saving algorithm.

Metwally, Agrawal and El Abbadi (2005), "Efficient Computation of Frequent and Top-k Elements in Data
Streams", with their stream-summary: counters sit in buckets of equal count, linked in ascending order, so
an event costs O(1) whatever the stream (no scan for the smallest counter, no sort). At most `capacity`
keys are held. A key held is over-counted by at most its `error` (the count of the key it evicted), and
any key seen more than (events / capacity) times is held: hostile traffic of many distinct keys can push
out rare keys, never a frequent one.
"""

from __future__ import annotations

from dataclasses import dataclass


class _Bucket:
    """The counters holding one count, between the next lower and the next higher count."""

    __slots__ = ("count", "higher", "keys", "lower")

    def __init__(self, count: int) -> None:
        self.count = count
        self.keys: dict[str, _Counter] = {}  # insertion-ordered: the oldest is evicted first
        self.lower: _Bucket | None = None
        self.higher: _Bucket | None = None


class _Counter:
    __slots__ = ("bucket", "error", "key")

    def __init__(self, key: str, error: int, bucket: _Bucket) -> None:
        self.key = key
        self.error = error
        self.bucket = bucket


@dataclass(frozen=True, slots=True)
class Frequent:
    """One key's estimate: the true count is between `count - error` and `count`."""

    key: str
    count: int
    error: int


class TopK:
    """Space-saving counters for at most `capacity` keys; `add` is O(1), `top` is O(capacity)."""

    __slots__ = ("_counters", "_highest", "_lowest", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._counters: dict[str, _Counter] = {}
        self._lowest: _Bucket | None = None
        self._highest: _Bucket | None = None

    def __len__(self) -> int:
        return len(self._counters)

    def add(self, key: str) -> None:
        """Count one event of `key`; when full, a new key takes over the least counted key's counter."""
        counter = self._counters.get(key)
        if counter is not None:
            self._raise(counter)
            return
        lowest = self._lowest
        if len(self._counters) < self.capacity:
            if lowest is None or lowest.count != 0:
                lowest = self._link(_Bucket(0), None, lowest)
            counter = _Counter(key, 0, lowest)
        else:
            assert lowest is not None  # full, so not empty
            evicted = lowest.keys.pop(next(iter(lowest.keys)))
            del self._counters[evicted.key]
            counter = _Counter(key, lowest.count, lowest)  # its count so far may all be the evicted key's
        lowest.keys[key] = counter
        self._counters[key] = counter
        self._raise(counter)

    def top(self, n: int) -> list[Frequent]:
        """The `n` highest counts, highest first (ties: the key that reached the count first)."""
        found: list[Frequent] = []
        bucket = self._highest
        while bucket is not None and len(found) < n:
            for counter in bucket.keys.values():
                found.append(Frequent(counter.key, bucket.count, counter.error))
                if len(found) == n:
                    break
            bucket = bucket.lower
        return found

    def _raise(self, counter: _Counter) -> None:
        """Move a counter to the bucket one higher, creating it if missing and dropping an emptied one."""
        bucket = counter.bucket
        higher = bucket.higher
        if higher is None or higher.count != bucket.count + 1:
            if len(bucket.keys) == 1:  # alone in its bucket (a key pulling ahead): the bucket moves with it
                bucket.count += 1
                return
            higher = self._link(_Bucket(bucket.count + 1), bucket, higher)
        del bucket.keys[counter.key]
        higher.keys[counter.key] = counter
        counter.bucket = higher
        if not bucket.keys:
            self._unlink(bucket)

    def _link(self, bucket: _Bucket, lower: _Bucket | None, higher: _Bucket | None) -> _Bucket:
        """Put `bucket` between two neighbours (None: an end of the list)."""
        self._join(lower, bucket)
        self._join(bucket, higher)
        return bucket

    def _unlink(self, bucket: _Bucket) -> None:
        self._join(bucket.lower, bucket.higher)

    def _join(self, lower: _Bucket | None, higher: _Bucket | None) -> None:
        """Make two buckets neighbours; None on either side makes the other an end of the list."""
        if lower is None:
            self._lowest = higher
        else:
            lower.higher = higher
        if higher is None:
            self._highest = lower
        else:
            higher.lower = lower
