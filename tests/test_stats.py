"""eva_rl.stats against hand computations (t and z values from printed tables)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eva_rl import stats
from eva_rl.stats import PairedCell


def test_mean_stderr_convention() -> None:
    s = stats.mean_stderr([0.0, 1.0, 1.0, 1.0, None, math.nan])  # None and NaN are not values
    assert s.n == 4 and s.mean == 0.75 and s.stderr == pytest.approx(0.5 / 2)
    one = stats.mean_stderr([7.0])
    assert one.mean == 7.0 and one.n == 1 and math.isnan(one.stderr)
    assert stats.mean_stderr([]).n == 0


def test_iqm_drops_a_quarter_at_each_end() -> None:
    assert stats.iqm(list(range(8))) == 3.5  # mean of [2, 3, 4, 5]
    assert stats.iqm([1.0, 2.0, 3.0, 4.0, 100.0]) == 3.0  # floor(5/4) = 1 each end
    rows = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 4.0, 4.0, 40.0]])
    assert stats.iqm(rows, axis=1) == pytest.approx([1.5, 4.0])


def test_stratified_bootstrap_keeps_group_sizes() -> None:
    groups = [np.array([0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0])]
    assert stats.stratified_bootstrap_ci(groups, lambda s: s.mean(axis=1)) == pytest.approx((2 / 3, 2 / 3))
    low, high = stats.stratified_bootstrap_ci([np.arange(10.0)], lambda s: s.mean(axis=1), n_bootstrap=500)
    assert low < 4.5 < high
    assert stats.stratified_bootstrap_ci([np.arange(10.0)], lambda s: s.mean(axis=1), n_bootstrap=500) == (low, high)


def test_wilson_interval_known_values() -> None:
    # 7 of 8, z = 1.959964: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p q / n + z^2 / 4n^2) / (1 + z^2/n)
    z, n, p = 1.959964, 8, 7 / 8
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    assert stats.wilson_interval(7, 8) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert stats.wilson_interval(7, 8) == pytest.approx((0.5291, 0.9776), abs=1e-4)
    low, high = stats.wilson_interval(0, 10)  # not degenerate at 0/n, unlike p +- 1.96 se
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z * z / (10 + z * z), abs=1e-6)
    assert all(math.isnan(x) for x in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes must lie"):
        stats.wilson_interval(9, 8)


def test_mde_against_a_hand_computation() -> None:
    # n = 10 pairs, sd 0.2: t_{0.975, 9} = 2.262, t_{0.80, 9} = 0.883 (t table)
    assert stats.minimum_detectable_difference(0.2, 10) == pytest.approx((2.262 + 0.883) * 0.2 / math.sqrt(10), rel=1e-3)
    # n = 4: t_{0.975, 3} = 3.182, t_{0.80, 3} = 0.978
    assert stats.minimum_detectable_difference(0.1, 4) == pytest.approx((3.182 + 0.978) * 0.1 / 2, rel=1e-3)
    # large n: the normal version (1.960 + 0.842) sd / sqrt(n)
    assert stats.minimum_detectable_difference(1.0, 100_000) == pytest.approx(2.802 / math.sqrt(100_000), rel=1e-3)
    assert math.isnan(stats.minimum_detectable_difference(0.2, 1))


def test_pairs_needed_is_the_first_n_that_reaches_the_target() -> None:
    n = stats.pairs_needed(0.2, 0.05)
    assert stats.minimum_detectable_difference(0.2, n) <= 0.05 < stats.minimum_detectable_difference(0.2, n - 1)
    assert n >= math.ceil((2.802 * 0.2 / 0.05) ** 2)  # the normal approximation's 126 is a lower bound
    assert stats.pairs_needed(0.0, 0.05) == 2
    with pytest.raises(ValueError, match="target MDE"):
        stats.pairs_needed(0.2, 0.0)


def test_paired_difference() -> None:
    p = stats.paired_difference([0.1, 0.3, 0.2, None])
    assert p.n == 3 and p.mean == pytest.approx(0.2) and p.sd == pytest.approx(0.1)
    assert p.stderr == pytest.approx(0.1 / math.sqrt(3))
    assert p.mde80 == pytest.approx(stats.minimum_detectable_difference(0.1, 3))
    assert 0 < p.p_value < 0.1 and not p.resolved  # 0.2 is below an MDE of ~0.36 with three pairs
    single = stats.paired_difference([0.4])
    assert math.isnan(single.mde80) and not single.resolved
    # 95% interval by hand: 0.2 ± t_{.975,2} (4.303) · 0.1 / sqrt 3
    assert p.ci95 == pytest.approx((0.2 - 4.303 * 0.1 / math.sqrt(3), 0.2 + 4.303 * 0.1 / math.sqrt(3)), rel=1e-3)
    assert all(math.isnan(x) for x in single.ci95)


def test_episode_variance_paired_and_binomial() -> None:
    # same starts: per-episode differences [0, 1, 0, 0], var (ddof 1) 0.25, over 4 episodes
    assert stats.episode_variance([1, 1, 0, 0], [1, 0, 0, 0], 0.5, 0.25, 4) == pytest.approx(0.0625)
    # without episodes: two binomials, p q / (n - 1) each
    assert stats.episode_variance(None, None, 0.5, 0.25, 4) == pytest.approx((0.25 + 0.1875) / 3)
    assert math.isnan(stats.episode_variance(None, None, 0.5, 0.5, 1))


def _cells() -> list[PairedCell]:
    values = {"a": [0.1, 0.2, 0.3], "b": [0.5, 0.6, 0.7]}
    return [PairedCell(task, seed, d, 0.004, 20) for task, ds in values.items() for seed, d in enumerate(ds)]


def test_variance_decomposition_by_hand() -> None:
    parts = stats.decompose_variance(_cells())
    assert (parts.tasks, parts.seeds, parts.episodes) == (2, 3.0, 20)
    assert parts.total == pytest.approx(0.28 / 5)  # deviations from 0.4: +-0.1, +-0.2, +-0.3
    assert parts.episode == pytest.approx(0.004)
    assert parts.run == pytest.approx(0.01 - 0.004)  # within-task variance 0.01 minus episode sampling
    assert parts.task == pytest.approx(0.08 - 0.01 / 3)  # task means 0.2, 0.6: variance 0.08
    assert "per-pair SD 0.237" in parts.describe()
    with pytest.raises(ValueError, match="at least one"):
        stats.decompose_variance([])


def test_projected_mde_and_grids() -> None:
    parts = stats.decompose_variance(_cells())
    # the observed grid: variance 0.07667 / 2 + (0.006 + 0.004) / 6 = 0.04; t_{.975,5} = 2.571, t_{.8,5} = 0.920
    assert stats.projected_mde(parts, 2, 3, 20) == pytest.approx((2.571 + 0.920) * 0.2, rel=1e-3)
    more_episodes = stats.projected_mde(parts, 2, 3, 80)
    assert more_episodes < stats.projected_mde(parts, 2, 3, 20)
    grids = stats.grids_for_mde(parts, 0.05, tasks=2, seeds=3, episodes=20)
    assert grids["seeds"] is None and grids["episodes"] is None  # the task term alone stays above 0.05
    t, s, e = grids["tasks"]
    assert (s, e) == (3, 20)
    assert stats.projected_mde(parts, t, 3, 20) <= 0.05 < stats.projected_mde(parts, t - 1, 3, 20)
    with pytest.raises(ValueError, match="must each be >= 1"):
        stats.projected_mde(parts, 0, 3, 20)


def _model_cells() -> list[PairedCell]:
    """3 tasks x 2 models x 2 seeds, episode variance 0.001 per cell."""
    d = {("a", "m1"): [0.1, 0.3], ("a", "m2"): [0.3, 0.5], ("b", "m1"): [0.4, 0.4], ("b", "m2"): [0.5, 0.7],
         ("c", "m1"): [0.0, 0.2], ("c", "m2"): [0.2, 0.2]}
    return [PairedCell(task, seed, x, 0.001, 20, model) for (task, model), xs in d.items() for seed, x in enumerate(xs)]


def test_variance_decomposition_with_models_by_hand() -> None:
    parts = stats.decompose_variance(_model_cells())
    assert (parts.tasks, parts.models, parts.seeds, parts.episodes) == (3, 2, 2.0, 20)
    # within cells (2 seeds): variances .02 .02 0 .02 .02 0 -> mean 0.04 / 3; minus episode sampling
    assert parts.run == pytest.approx(0.04 / 3 - 0.001)
    # cell means a (.2, .4), b (.4, .6), c (.1, .2); residuals of the additive fit -1/60, 1/60 (a, b)
    # and 1/30, -1/30 (c): MS_int = (4/3600 + 2/900) / 2 = 1/600, below the cell-mean noise (0.04/3)/2
    assert parts.interaction == 0.0
    # task means .3 .5 .15: variance 0.0308333 minus MS_int / 2 models
    assert parts.task == pytest.approx(0.061667 / 2 - 1 / 1200, abs=1e-6)
    # model means .2333 .4: variance (1/6)^2 / 2 minus MS_int / 3 tasks
    assert parts.model == pytest.approx((1 / 6) ** 2 / 2 - 1 / 1800)
    assert "model to model 0.115" in parts.describe()
    # a task one model lacks is left out of the two-way table; below two shared tasks there is none
    assert math.isnan(stats.decompose_variance([c for c in _model_cells() if c.task == "a" or c.model == "m1"]).model)


def test_projected_mde_and_grids_with_models() -> None:
    parts = stats.decompose_variance(_model_cells())
    variance = parts.task / 3 + parts.model / 2 + (parts.run + parts.episode) / 12
    # t_{.975,11} = 2.201, t_{.8,11} = 0.876
    assert stats.projected_mde(parts, 3, 2, 20) == pytest.approx((2.201 + 0.876) * math.sqrt(variance), rel=1e-3)
    assert stats.projected_mde(parts, 3, 2, 20, 8) < stats.projected_mde(parts, 3, 2, 20)
    grids = stats.grids_for_mde(parts, 0.35, tasks=3, seeds=2, episodes=20)
    assert set(grids) == {"seeds", "tasks", "episodes", "models"}
    t, s, e, m = grids["models"]
    assert (t, s, e) == (3, 2, 20)
    assert stats.projected_mde(parts, 3, 2, 20, m) <= 0.35 < stats.projected_mde(parts, 3, 2, 20, m - 1)


def test_pool_models_gives_the_mde_over_models() -> None:
    pooled = stats.pool_models({"m1": [0.1, 0.2, 0.3], "m2": [0.4, 0.5, 0.6]})
    assert pooled.pooled.n == 6 and pooled.pooled.mean == pytest.approx(0.35)
    assert pooled.per_model["m1"].mean == pytest.approx(0.2) and pooled.per_model["m2"].n == 3
    # two model means 0.2, 0.5: sd 0.3 / sqrt 2; t_{.975,1} = 12.706, t_{.8,1} = 1.376
    assert pooled.between.n == 2 and pooled.between.mean == pytest.approx(0.35)
    assert pooled.between.mde80 == pytest.approx((12.706 + 1.376) * (0.3 / math.sqrt(2)) / math.sqrt(2), rel=1e-3)
    # its interval: 0.35 ± 12.706 · 0.15; t = 0.35 / 0.15 with 1 df
    assert pooled.between.ci95 == pytest.approx((0.35 - 12.706 * 0.15, 0.35 + 12.706 * 0.15), rel=1e-3)
    assert pooled.between.p_value == pytest.approx(2 * (0.5 - math.atan(0.35 / 0.15) / math.pi))
    assert math.isnan(stats.pool_models({"m1": [0.1, 0.2]}).between.mde80)  # one model: no MDE over models


def test_one_seed_per_cell_leaves_the_seed_part_in_the_interaction() -> None:
    cells = [c for c in _model_cells() if c.seed == 0]  # a (.1, .3), b (.4, .5), c (0, .2)
    parts = stats.decompose_variance(cells)
    assert math.isnan(parts.run) and parts.seeds == 1.0
    # residuals of the additive fit -+1/60 (a, c) and +-1/30 (b): MS_int = (4/3600 + 2/900) / 2 = 1/600,
    # less episode sampling alone (0.001): no seed variance to take out
    assert parts.interaction == pytest.approx(1 / 600 - 0.001)
    assert parts.model == pytest.approx((1 / 6) ** 2 / 2 - 1 / 1800)  # model means 1/6 and 1/3
    assert math.isfinite(stats.projected_mde(parts, 3, 1, 20))
