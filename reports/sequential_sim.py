"""Simulated sequential studies where the truth is known: the error rate and the seeds of the stopping rule.

python reports/sequential_sim.py [--studies 4000]

Each simulated study adds seeds in rounds until every comparison is decided or `max_seeds` is reached, as
`study/run.py --until-decided` does, on normal run noise with a seed effect shared by all arms of a seed
(pairing removes it). It compares the anytime-valid intervals of reports/decisions.py with the naive
reading: the fixed-n t interval looked at after every round. Vectorised over studies with closed forms
(the balanced 2^3 fit below equals statsmodels' OLS; tests/test_decisions.py checks it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reports.decisions import ALPHA, anytime_radius, fixed_radius  # noqa: E402


def _first_decision(estimate, radius, margin):
    """Per study and comparison, over looks (last axis): the first decided look's call, or undecided; and
    the look it came at (the last look if never). Calls: 1 = a false or true non-zero, 0 = equivalent, -1 none."""
    low, high = estimate - radius, estimate + radius
    equivalent = (low > -margin) & (high < margin)
    nonzero = ((low > 0) | (high < 0)) & ~equivalent
    decided = equivalent | nonzero
    any_decided = decided.any(axis=-1)
    first = np.where(any_decided, decided.argmax(axis=-1), decided.shape[-1] - 1)
    call = np.take_along_axis(nonzero, first[..., None], axis=-1)[..., 0]
    sign = np.sign(np.take_along_axis(estimate, first[..., None], axis=-1)[..., 0])
    return np.where(any_decided, np.where(call, sign, 0), np.nan), first, any_decided


def _summary(call, first, first_seeds: int) -> dict:
    """Per comparison: the shares called positive, negative, equivalent and undecided, and the seeds it took;
    per study: whether any comparison was called non-zero, and the seeds until the last one was decided."""
    return {
        "positive": (call > 0).mean(axis=0),
        "negative": (call < 0).mean(axis=0),
        "equivalent": (call == 0).mean(axis=0),
        "undecided": np.isnan(call).mean(axis=0),
        "any_nonzero": ((call != 0) & ~np.isnan(call)).any(axis=1).mean(),
        "seeds_to_decide": (first + first_seeds).mean(axis=0),
        "study_seeds": (first.max(axis=1) + first_seeds).mean(),
    }


def one_at_a_time(
    effects,
    studies=4000,
    first_seeds=3,
    max_seeds=20,
    run_sd=1.0,
    seed_sd=2.5,
    margin=0.5,
    alpha=ALPHA,
    sequential=True,
    rng=None,
):
    """Arms against a baseline, paired by seed; `effects` are the arms' true differences. Returns, per arm,
    the share of studies that called it better/worse in each direction, equivalent, or left it undecided,
    and the mean seeds it used. The seed effect (seed_sd) cancels in the pairs, as it does in the harness."""
    rng = rng or np.random.default_rng(0)
    effects = np.asarray(effects, float)
    m, n = len(effects), np.arange(1, max_seeds + 1)
    seed_effect = rng.normal(0, seed_sd, (studies, 1, max_seeds))
    base = 10 + seed_effect + rng.normal(0, run_sd, (studies, 1, max_seeds))
    arms = 10 + effects[None, :, None] + seed_effect + rng.normal(0, run_sd, (studies, m, max_seeds))
    d = arms - base
    mean = np.cumsum(d, axis=-1) / n
    var = (np.cumsum(d**2, axis=-1) - n * mean**2) / np.maximum(n - 1, 1)
    se = np.sqrt(np.maximum(var, 0) / n)
    looks = slice(first_seeds - 1, max_seeds)
    nu = (n - 1).astype(float)
    level = alpha / m
    radius = anytime_radius(se, nu, n, level) if sequential else fixed_radius(se, nu, level)
    call, first, _ = _first_decision(mean[..., looks], radius[..., looks], margin)
    return _summary(call, first, first_seeds)


def factorial(
    effects,
    studies=4000,
    first_seeds=2,
    max_seeds=12,
    run_sd=1.0,
    seed_sd=2.5,
    margin=0.5,
    alpha=ALPHA,
    sequential=True,
    rng=None,
):
    """A 2^3 factorial, one full seed (8 runs) per round, fitted as value ~ C(seed) + A + B + C + two-way
    interactions; `effects` are the three true main effects. The same summary as one_at_a_time, per effect."""
    rng = rng or np.random.default_rng(0)
    signs = np.array([[(arm >> bit) & 1 for bit in range(3)] for arm in range(8)]) - 0.5  # 8 x 3, +-1/2
    contrasts = np.column_stack(
        [
            signs * 2,
            2 * signs[:, [0]] * 2 * signs[:, [1]],
            2 * signs[:, [0]] * 2 * signs[:, [2]],
            2 * signs[:, [1]] * 2 * signs[:, [2]],
            8 * signs.prod(axis=1, keepdims=True),
        ]
    )  # +-1 columns: A, B, C, AB, AC, BC, ABC
    mean_y = 10 + signs @ np.asarray(effects, float)  # 8 arms
    y = (
        mean_y[None, None, :]
        + rng.normal(0, seed_sd, (studies, max_seeds, 1))
        + rng.normal(0, run_sd, (studies, max_seeds, 8))
    )
    c = y @ contrasts / 4  # per seed, each contrast: mean(+) - mean(-), variance run_sd^2 / 2
    n = np.arange(1, max_seeds + 1)[None, :, None]
    c_mean = np.cumsum(c, axis=1) / n
    # residual SS of the blocked fit: the six fitted contrasts' spread over seeds, and all of ABC
    ss_fitted = 2 * (np.cumsum(c[..., :6] ** 2, axis=1) - n * c_mean[..., :6] ** 2).sum(axis=-1)
    ss = ss_fitted + 2 * np.cumsum(c[..., 6] ** 2, axis=1)
    nu = 7 * n[..., 0] - 6.0
    scale = ss / np.where(nu > 0, nu, np.nan)
    se = np.sqrt(scale[..., None] / (2 * n))
    z2 = 2 * n * np.ones_like(se)
    level = alpha / 3
    nu3 = np.broadcast_to(nu[..., None], se.shape)
    radius = anytime_radius(se, nu3, z2, level) if sequential else fixed_radius(se, nu3, level)
    looks = slice(first_seeds - 1, max_seeds)
    est = np.moveaxis(c_mean[..., :3][:, looks], 1, -1)  # studies x 3 x looks
    rad = np.moveaxis(radius[..., :3][:, looks], 1, -1)
    # a study stops when all three are decided; each effect's call is its first decided look
    call, first, _ = _first_decision(est, rad, margin)
    return _summary(call, first, first_seeds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sequential_sim.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4000)
    args = parser.parse_args(argv)
    print(
        f"{args.studies} simulated studies per row; run sd 1, seed sd 2.5, margin 0.5, family-wise alpha {ALPHA}; "
        "one-at-a-time: 3 arms, 3 to 20 seeds; factorial: 2^3, 2 to 12 seeds"
    )
    print("| design | truth | intervals | any false better/worse | true effect found | its seeds | study's seeds |")
    print("|---|---|---|---|---|---|---|")
    for design, simulate in (("one-at-a-time", one_at_a_time), ("2^3 factorial", factorial)):
        for label, truth in (("all equal", [0, 0, 0]), ("one effect of 1.0", [1.0, 0, 0])):
            for sequential in (True, False):
                r = simulate(truth, studies=args.studies, sequential=sequential)
                name = "anytime-valid" if sequential else "naive t, every round"
                real = truth[0] != 0
                false = (r["positive"][1:] + r["negative"][1:]).max() if real else r["any_nonzero"]
                found = f"{r['positive'][0]:.3f}" if real else "-"
                seeds = f"{r['seeds_to_decide'][0]:.1f}" if real else "-"
                print(f"| {design} | {label} | {name} | {false:.3f} | {found} | {seeds} | {r['study_seeds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
