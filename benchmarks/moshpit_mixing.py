"""How well each Moshpit grouping scheme mixes (meshfl.algorithms.moshpit_math), without failures and with failures.

Why: the published MAR-FL scheme for N that is not a perfect power barely mixes for some N; this measures every
candidate scheme on the same inputs (values 0..N-1, one per peer) so the default is chosen from numbers. Pure numpy,
no network: a few seconds.

    python benchmarks/moshpit_mixing.py [--seeds 5]

prints JSON: ``mixing``: per (N, M, scheme) the max abs error after d, d+2 and 2d rounds (d = ceil(log_M N); the mean
over seeds for seeded schemes), the mean and min group size over the first 2d rounds and the singleton fraction;
``failures``: 10 % of 64 peers (M=4) failing, as dropouts before round 0 (MAR-FL's Bernoulli dropout) or in a random
round 0..d-1, the max error over the survivors after d and d+2 rounds (mean and max over seeds).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from meshfl.algorithms import moshpit_math as mm

SIZES = (16, 64, 100, 125, 200, 256, 1000)
GROUP_SIZES = (4, 5, 8)


def _schemes(n: int, m: int, seed: int) -> list[mm.GroupScheme]:
    d = mm.rounds_needed(n, m)
    out: list[mm.GroupScheme] = []
    if m**d == n:
        out.append(mm.PerfectGrid(m, d))
    else:
        out.append(mm.MarflImperfect(n, m, d))
    out += [mm.RandomCells(n, m, seed), mm.BalancedGrid(n, m, seed), mm.RandomGroups(n, m, seed)]
    return out


def mixing(n: int, m: int, seeds: int) -> list[dict]:
    d = mm.rounds_needed(n, m)
    values = np.arange(n, dtype=np.float64)
    rows: dict[str, dict] = {}
    for seed in range(seeds):
        for scheme in _schemes(n, m, seed):
            row = rows.setdefault(scheme.name, {"n": n, "m": m, "d": d, "scheme": scheme.name, "errors": {}, "sizes": []})
            if seed > 0 and scheme.name in ("moshpit", "marfl_imperfect"):
                continue  # deterministic
            for rounds in (d, d + 2, 2 * d):
                row["errors"].setdefault(rounds, []).append(mm.max_error(mm.simulate_averaging(values, scheme, rounds), values))
            row["sizes"] += [len(g) for round_groups in mm.schedule_groups(scheme, 2 * d) for g in round_groups]
            if isinstance(scheme, mm.BalancedGrid):
                row["sides"] = list(scheme.sides)  # type: ignore[attr-defined]
    out = []
    for row in rows.values():
        sizes = np.array(row.pop("sizes"))
        errors = row.pop("errors")
        row.update({f"max_error_after_{k}": float(f"{np.mean(v):.4g}") for k, v in errors.items()})
        row.update(mean_group_size=round(float(sizes.mean()), 2), min_group_size=int(sizes.min()),
                   singleton_fraction=round(float((sizes == 1).mean()), 3))
        out.append(row)
    return out


def failures(n: int, m: int, fraction: float, seeds: int) -> list[dict]:
    d = mm.rounds_needed(n, m)
    values = np.arange(n, dtype=np.float64)
    out = []
    for mode in ("dropout", "mid_round"):
        for name in ("moshpit", "balanced_grid", "random_groups"):
            errs: dict[int, list[float]] = {d: [], d + 2: []}
            for seed in range(seeds):
                rng = np.random.default_rng([seed, 99])
                failed = [int(p) for p in rng.choice(n, size=int(fraction * n), replace=False)]
                survivors = [p for p in range(n) if p not in failed]
                scheme = mm.make_scheme(name, n, m, seed)
                for rounds in errs:
                    if mode == "dropout":
                        result = mm.simulate_averaging(values, scheme, rounds, dropped=failed)
                        target = survivors  # the participants' mean
                    else:
                        when = {p: int(rng.integers(0, d)) for p in failed}
                        result = mm.simulate_averaging(values, scheme, rounds, failures=when)
                        target = list(range(n))  # the intended aggregate: everyone's initial values
                    errs[rounds].append(float(np.max(np.abs(result[survivors] - values[target].mean()))))
            out.append({"n": n, "m": m, "failed": int(fraction * n), "mode": mode, "scheme": name,
                        **{f"max_error_after_{k}_mean": round(float(np.mean(v)), 3) for k, v in errs.items()},
                        **{f"max_error_after_{k}_worst": round(float(np.max(v)), 3) for k, v in errs.items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        for m in GROUP_SIZES:
            if m < n:
                rows += mixing(n, m, args.seeds)
    print(json.dumps({"mixing": rows, "failures": failures(64, 4, 0.1, args.seeds)}, indent=1))


if __name__ == "__main__":
    main()
