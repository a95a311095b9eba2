"""A bounded count per key: exact up to a capacity, the Space-Saving algorithm beyond it. Pure."""

from __future__ import annotations

from typing import Any


class TopCounter:
    """Counts per key, exact up to ``capacity`` distinct keys; beyond that the Space-Saving
    algorithm keeps the heaviest keys in fixed memory: a key that takes an evicted one's place
    starts from that one's count, which is then its count's most possible error (its true count
    lies in [count - error, count]). A key never evicted since it came keeps error 0."""

    __slots__ = ("counts", "errors", "capacity", "exact")

    def __init__(self, capacity: int) -> None:
        self.counts: dict[Any, int] = {}
        self.errors: dict[Any, int] = {}  # only the keys with an error
        self.capacity = capacity
        self.exact = True

    def add(self, key: Any, n: int = 1) -> None:
        """Count ``key`` ``n`` times: the same as ``n`` single adds in a row."""
        counts = self.counts
        if key in counts:
            counts[key] += n
        elif len(counts) < self.capacity:
            counts[key] = n
        else:
            victim = min(counts, key=counts.__getitem__)
            floor = counts.pop(victim)
            self.errors.pop(victim, None)
            counts[key] = floor + n
            if floor:
                self.errors[key] = floor
            self.exact = False

    def top(self, n: int | None = None) -> list[tuple[Any, int]]:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], repr(kv[0])))
        return ranked if n is None else ranked[:n]
