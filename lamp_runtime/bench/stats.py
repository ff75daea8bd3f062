"""Medians and spreads of repeated measurements, and the interleaved schedule that produces them.

The machine is shared, so a variant measured in one block could catch a quiet or a busy minute
that the next one misses. Running every variant once per round, in a fresh shuffled order each
round, spreads such noise over all variants alike; ratios are then taken within a round.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Summary:
    """Median and spread of one metric over repeats: quartiles (q1, q3) and the full range."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max,
                "n": self.n}


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("cannot summarize an empty list of measurements")
    if len(values) == 1:
        (v,) = values
        return Summary(v, v, v, v, v, 1)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(statistics.median(values), q1, q3, min(values), max(values), len(values))


def safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or NaN when the denominator is zero (reported, never divided by)."""
    return numerator / denominator if denominator else math.nan


def interleaved(variants: Sequence[Hashable], measure: Callable[[Hashable], dict], repeats: int,
                warmup: int = 1, seed: int = 0, description: str = "bench") -> dict[Hashable, list[dict]]:
    """Run `measure(variant)` for every variant, `warmup` untimed rounds then `repeats` recorded
    rounds, each round in its own shuffled order. Returns variant -> list of per-round samples
    (index i of every list comes from round i, so samples can be paired within a round)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    rng = random.Random(seed)
    samples: dict[Hashable, list[dict]] = {v: [] for v in variants}
    with tqdm(total=(warmup + repeats) * len(variants), desc=description, unit="run") as progress:
        for round_index in range(warmup + repeats):
            order = list(variants)
            rng.shuffle(order)
            for variant in order:
                sample = measure(variant)
                if round_index >= warmup:
                    samples[variant].append(sample)
                progress.update()
    return samples


def summarize_samples(samples: list[dict], keys: Sequence[str]) -> dict[str, Summary]:
    return {key: summarize([s[key] for s in samples]) for key in keys}
