"""Time the ROI Monte Carlo (10,000 iterations x 10 years) against a plain numpy baseline.

Usage: python scripts/bench_monte_carlo.py [--repeats N]
Prints progress, then as its last line one JSON object:
  monte_carlo_10k_ms   median wall time of projections.roi.monte_carlo on the example config
  baseline_ms          median time of a same-size numpy op in the same run: 10,000 x 10
                       lognormal draws and a matrix-vector product (the Monte Carlo's core)
  ratio                monte_carlo_10k_ms / baseline_ms (comparable across machines)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from projections.roi import monte_carlo
from projections.roi_config import load_roi_config

EXAMPLE = Path(__file__).resolve().parents[1] / "projections" / "roi_example.toml"
TARGET_MS = 100.0


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: imports, allocator, BLAS threads
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    config = load_roi_config(EXAMPLE)
    n, horizon = config.monte_carlo.iterations, config.finance.horizon_years
    print(f"config: {EXAMPLE.name}, {n:,} iterations x {horizon} years, {args.repeats} repeats")

    rng = np.random.default_rng(0)
    discount = 1.07 ** -np.arange(1, horizon + 1)

    def baseline() -> object:
        return np.exp(0.3 * rng.standard_normal((n, horizon))) @ discount

    print("timing baseline (numpy lognormal draws + mat-vec) ...")
    baseline_ms = _median_ms(baseline, args.repeats)
    print(f"  baseline median {baseline_ms:.2f} ms")
    print("timing projections.roi.monte_carlo ...")
    mc_ms = _median_ms(lambda: monte_carlo(config), args.repeats)
    result = monte_carlo(config)
    print(
        f"  monte_carlo median {mc_ms:.2f} ms (target <= {TARGET_MS:.0f} ms); "
        f"P10/P50/P90 NPV {result.p10_eur:,.0f} / {result.p50_eur:,.0f} / "
        f"{result.p90_eur:,.0f} EUR, P(NPV > 0) = {result.probability_positive:.1%}"
    )
    print(
        json.dumps(
            {
                "monte_carlo_10k_ms": round(mc_ms, 3),
                "baseline_ms": round(baseline_ms, 3),
                "ratio": round(mc_ms / baseline_ms, 3),
                "iterations": n,
                "horizon_years": horizon,
                "repeats": args.repeats,
                "target_ms": TARGET_MS,
            }
        )
    )


if __name__ == "__main__":
    main()
