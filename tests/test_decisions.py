"""reports/decisions.py against known answers, and its error control proven by simulation (reports/sequential_sim.py):
the anytime-valid intervals keep the false better/worse rate at or below alpha under stopping when decided,
where the naive fixed-n interval looked at after every round does not."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reports import decisions, sequential_sim

FACTORS = {"mixer": ("cfc", "conv"), "relax": ("temb", "none"), "kernels": ("k357", "k3")}


def test_the_anytime_p_value_is_one_over_the_normal_prior_bayes_factor_of_the_t_test():
    """Rouder et al. (2009) with a fixed g = 1/phi: BF10 = (1+ng)^(-1/2) ((1+t^2/nu) / (1+t^2/(nu(1+ng))))^(n/2)."""
    for n, t in [(5, 2.0), (8, 3.5), (20, 1.0)]:
        g, nu = 1 / decisions.PHI, n - 1
        bf = (1 + n * g) ** -0.5 * ((1 + t**2 / nu) / (1 + t**2 / (nu * (1 + n * g)))) ** (n / 2)
        assert decisions.anytime_p(t, nu, n) == pytest.approx(min(1.0, 1 / bf))


def test_the_interval_edge_is_where_the_anytime_p_value_equals_alpha():
    se, nu, z2, alpha = 0.7, 11.0, 12.0, 0.05 / 3
    radius = float(decisions.anytime_radius(se, nu, z2, alpha))
    assert decisions.anytime_p(radius / se, nu, z2) == pytest.approx(alpha)
    assert radius > float(decisions.fixed_radius(se, nu, alpha))  # the price of looking at every round
    assert math.isinf(decisions.anytime_radius(1.0, 1.0, 2.0, alpha))  # two seeds can never decide


@pytest.mark.parametrize(
    ("low", "high", "lower_better", "expected"),
    [
        (-0.2, 0.3, True, "equivalent"),
        (0.1, 0.3, True, "equivalent"),  # excludes 0 but too small to matter
        (0.2, 0.9, True, "worse"),
        (0.2, 0.9, False, "better"),
        (-0.9, -0.6, True, "better"),
        (-0.9, 0.3, True, "undecided"),
    ],
)
def test_decide(low, high, lower_better, expected):
    assert decisions.decide(low, high, 0.5, lower_better) == expected


def _factorial_runs(seeds=4, effects=(2.0, 0.0, 0.0), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seeds):
        block = rng.normal(0, 3)
        for arm in range(8):
            levels = {name: FACTORS[name][(arm >> bit) & 1] for bit, name in enumerate(FACTORS)}
            value = 10 + block + sum(e * ((arm >> bit) & 1) for bit, e in enumerate(effects)) + rng.normal()
            rows.append({"arm": str(arm), "seed": s, "value": value, **levels})
    return pd.DataFrame(rows)


def test_factorial_effects_are_the_level_differences_with_seed_blocks_and_7n_minus_6_residual_df():
    runs = _factorial_runs()
    effects = decisions.factorial_effects(runs, FACTORS).set_index("term")
    for name, (first, second) in FACTORS.items():
        direct = runs.loc[runs[name] == second, "value"].mean() - runs.loc[runs[name] == first, "value"].mean()
        assert effects.loc[name, "estimate"] == pytest.approx(direct)
    assert set(effects["nu"]) == {7 * 4 - 6}
    assert effects.loc["mixer", "z2"] == pytest.approx(2 * 4)  # the closed form sequential_sim uses
    assert list(effects.index[3:]) == ["mixer x relax", "mixer x kernels", "relax x kernels"]


def test_a_half_fraction_names_what_each_main_effect_is_aliased_with():
    runs = _factorial_runs()
    half = runs[[((a >> 0) + (a >> 1) + (a >> 2)) % 2 == 0 for a in runs["arm"].astype(int)]]  # kernels = mixer x relax
    effects = decisions.factorial_effects(half, FACTORS).set_index("term")
    assert list(effects.index) == ["mixer", "relax", "kernels"]
    assert effects.loc["mixer", "aliased_with"] == "relax x kernels"
    assert effects.loc["kernels", "aliased_with"] == "mixer x relax"


def test_replicated_effects_estimate_each_half_of_the_seeds_on_its_own():
    runs = _factorial_runs(seeds=5, effects=(3.0, 0.0, 0.0))
    halves = decisions.replicated_effects(runs, FACTORS).set_index("term")
    assert halves.attrs["halves"] == ([0, 1], [2, 3, 4])  # the upper half takes the odd seed out
    upper = decisions.factorial_effects(runs[runs["seed"] >= 2], FACTORS).set_index("term")
    assert halves.loc["relax", "second_half"] == pytest.approx(upper.loc["relax", "estimate"])
    assert halves.loc["mixer", "same_sign"]  # +3 against noise of sd 1 over 8-12 runs

    flipped = runs.copy()  # the mixer's effect reversed on the upper half: it does not replicate
    upper_mixer = (flipped["seed"] >= 2) & (flipped["mixer"] == "conv")
    flipped.loc[upper_mixer, "value"] -= 6.0
    assert not decisions.replicated_effects(flipped, FACTORS).set_index("term").loc["mixer", "same_sign"]


def test_study_decisions_call_a_large_effect_and_leave_a_null_one_undecided_or_equivalent():
    table, margin = decisions.study_decisions(
        _factorial_runs(seeds=6, effects=(3.0, 0.0, 0.0)), "0", "5%", True, sequential=True, factors=FACTORS
    )
    rows = table.set_index("term")
    assert rows.loc["mixer", "decision"] == "worse"  # conv raises fd_digits by 3: worse, lower is better
    assert rows.loc["relax", "decision"] in ("undecided", "equivalent")
    assert margin == pytest.approx(
        0.05 * abs(_factorial_runs(seeds=6, effects=(3.0, 0, 0)).query("arm == '0'")["value"].mean())
    )
    undecided = rows[rows["decision"] == "undecided"]
    assert (undecided["extra_seeds"] > 0).all()


def test_under_the_null_the_anytime_intervals_keep_the_error_rate_and_naive_looks_do_not():
    """4000 sequential studies with no true difference: 3 arms or a 2^3 factorial, seeds added every round
    until decided (cap 20 or 12 seeds). Monte-Carlo sd of a rate near 0.05 is 0.0035."""
    for simulate in (sequential_sim.one_at_a_time, sequential_sim.factorial):
        anytime = simulate([0, 0, 0], studies=4000, sequential=True)
        naive = simulate([0, 0, 0], studies=4000, sequential=False)
        assert anytime["any_nonzero"] <= 0.05 + 0.007, simulate.__name__
        assert naive["any_nonzero"] > 0.10, simulate.__name__  # the wrong method fails


def test_a_true_effect_is_found_with_the_stated_power_and_fewer_seeds_than_the_cap():
    result = sequential_sim.factorial([1.0, 0, 0], studies=2000, sequential=True)
    assert result["positive"][0] >= 0.8  # the effect of one run sd: found in most studies by 12 seeds
    assert result["negative"][0] == 0.0  # never called in the wrong direction
    assert result["seeds_to_decide"][0] < 12  # decided before the cap, on average


def test_the_simulation_command_prints_its_table():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sequential_sim.main(["--studies", "300"]) == 0
    assert "anytime-valid" in out.getvalue() and "naive t, every round" in out.getvalue()


def test_fixed_intervals_are_the_bonferroni_t_intervals():
    d = pd.Series([1.0, 2.0, 1.5, 2.5]), pd.Series([0.0, 0.0, 0.0, 0.0])
    effect = decisions.paired_effect(*d)
    table = decisions.with_decisions(pd.DataFrame([effect]), 0.1, True, sequential=False, comparisons=2)
    half = stats.t.ppf(1 - 0.05 / 4, 3) * np.std([1, 2, 1.5, 2.5], ddof=1) / 2
    assert table.loc[0, "ci_high"] - table.loc[0, "estimate"] == pytest.approx(half)
