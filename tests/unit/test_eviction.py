"""Eviction policies against the access patterns a decode loop makes."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from loaders.eviction import EvictionPolicy, FrequencyPolicy, LRUPolicy


class Cache:
    """A cache of `capacity` keys run by `policy`, as the loader runs it."""

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.policy, self.capacity = policy, capacity
        self.resident: set[str] = set()

    def hit_rate(self, trace: Iterable[str]) -> float:
        hits = total = 0
        for key in trace:
            total += 1
            if key in self.resident:
                hits += 1
                self.policy.used(key)
                continue
            if len(self.resident) >= self.capacity:
                victim = next(iter(self.policy.victims()))
                self.resident.remove(victim)
                self.policy.removed(victim)
            self.resident.add(key)
            self.policy.added(key)
        return hits / total


def hit_rate(policy: EvictionPolicy, trace: Iterable[str], capacity: int) -> float:
    return Cache(policy, capacity).hit_rate(trace)


def cyclic(keys: int, rounds: int) -> list[str]:
    """Every key once per round, in the same order: a decode step visiting
    every layer's experts in turn."""
    return [f"k{i}" for _ in range(rounds) for i in range(keys)]


def test_lru_thrashes_on_a_cycle_larger_than_the_cache_and_frequency_does_not() -> None:
    trace = cyclic(keys=100, rounds=50)
    assert hit_rate(LRUPolicy(), trace, capacity=80) == 0.0
    # A stable 79 keys stay; one slot takes the other 21 in turn.
    assert hit_rate(FrequencyPolicy(), trace, capacity=80) > 0.75


def test_frequency_keeps_the_popular_experts_under_skewed_routing() -> None:
    rng = random.Random(0)
    keys = [f"k{i}" for i in range(128)]
    weights = [1 / (i + 1) for i in range(128)]  # Zipf(1)
    trace = rng.choices(keys, weights, k=40_000)
    lru = hit_rate(LRUPolicy(), trace, capacity=32)
    lfu = hit_rate(FrequencyPolicy(), trace, capacity=32)
    assert lfu > lru + 0.05, (lfu, lru)


def test_ageing_lets_a_new_working_set_take_over() -> None:
    old = cyclic(keys=10, rounds=100)  # 100 uses of each of k0..k9
    new = [f"n{i}" for _ in range(100) for i in range(10)]
    ageing = Cache(FrequencyPolicy(half_life=100), capacity=10)
    ageing.hit_rate(old)
    # The old keys' counts halve every 100 uses and the new set moves in.
    assert ageing.hit_rate(new) > 0.8
    # Without ageing the old keys' counts (100 each) shut newcomers out.
    frozen = Cache(FrequencyPolicy(half_life=10**9), capacity=10)
    frozen.hit_rate(old)
    assert frozen.hit_rate(new) < 0.2


def test_counts_of_evicted_keys_are_remembered_within_a_bound() -> None:
    policy = FrequencyPolicy(memory=100)
    hit_rate(policy, (f"k{i}" for i in range(5000)), capacity=10)
    assert len(policy._counts) <= 100 + 10 + 1024
    policy = FrequencyPolicy()
    for _ in range(3):
        policy.added("a")
        policy.removed("a")
    assert policy.count("a") == 3  # judged by its history when it returns


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="half_life"):
        FrequencyPolicy(half_life=0)


def test_victims_are_every_resident_key_by_ascending_count_through_ageing() -> None:
    rng = random.Random(3)
    policy = FrequencyPolicy(half_life=50)
    resident: set[str] = set()
    for _ in range(5000):
        key = f"k{rng.randrange(40)}"
        if key in resident:
            if rng.random() < 0.2:
                resident.remove(key)
                policy.removed(key)
            else:
                policy.used(key)
        else:
            resident.add(key)
            policy.added(key)
        order = list(policy.victims())
        assert sorted(order) == sorted(resident)
        counts = [policy.count(k) for k in order]
        assert counts == sorted(counts)
