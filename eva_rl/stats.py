"""The statistics of evaluation and reports, with one convention each.

- Mean and standard error: the sample standard deviation (ddof = 1) over sqrt(n), of the finite
  values. With fewer than two values the standard error is NaN: one value says nothing about
  spread, and 0 would claim certainty (tables then show the mean alone).
- Interquartile mean (IQM): scipy's `trim_mean(x, 0.25)`, which drops floor(n / 4) values at each
  end (rliable's `aggregate_iqm`, Agarwal et al., 2021).
- Bootstrap: percentile 95% intervals; the stratified version resamples the runs within each
  task, keeping each task's run count (rliable's `StratifiedBootstrap`); one stratum is the plain
  bootstrap. Seeded, so a report reproduces exactly.
- A proportion of episodes: the Wilson score interval (scipy's `binomtest(...).proportion_ci`),
  which stays inside [0, 1] and is not degenerate at 0/n or n/n, unlike mean +- 1.96 se.
- Power: the minimum detectable difference (MDE) of a paired comparison at 80% power and 5%
  two-sided significance, t-based because the comparisons here rest on few pairs:

      MDE = (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)

  with sd the standard deviation of the n paired differences. This is the usual approximation
  to the paired t-test's power (the normal version (z_{0.975} + z_{0.8}) * sd / sqrt(n) =
  2.80 sd / sqrt(n) is its large-n limit; at n = 4 the t version is 1.5x larger, which is the
  honest size of what four pairs can resolve).
- Variance decomposition of paired success differences d[task, seed] (one-way random effects
  by the method of moments): episode sampling (the variance of each cell's difference that
  comes from evaluating a finite number of episodes), run to run (seed, beyond episode sampling)
  and task to task. It drives `projected_mde`, the MDE of the suite-average paired difference
  for any grid of tasks x seeds x episodes.
- Several pretrained models (one run tree each, the same tasks): d[task, model, seed] is a
  two-way crossed design with seeds nested in its cells, and the decomposition adds the
  model-to-model part and the task-by-model interaction (two-way ANOVA mean squares). Pairs pooled
  over the models answer "on these models"; `pool_models` also gives the answer over pretrained
  models as a sample: the t-based MDE of the per-model mean differences, with M - 1 degrees of freedom.

rliable (arch, statsmodels, pandas, seaborn) is not a dependency for these few lines of numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class MeanStderr:
    """Mean and standard error of the finite values; stderr is NaN with fewer than two."""

    mean: float
    stderr: float
    n: int


def finite(values: Iterable[float | None]) -> np.ndarray:
    """The finite values as a float64 array, (n,); None and NaN are dropped."""
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def mean_stderr(values: Iterable[float | None]) -> MeanStderr:
    """Mean and standard error (sample std, ddof 1, / sqrt(n)) of the finite values."""
    x = finite(values)
    if x.size == 0:
        return MeanStderr(math.nan, math.nan, 0)
    stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return MeanStderr(float(x.mean()), stderr, int(x.size))


def suite_average(points: Iterable[tuple[Hashable, str, float | None]]) -> MeanStderr:
    """The average over tasks of (seed, task, value) points: the mean of the per-task means
    (a seed is any hashable: the report's (run tree, seed) units).

    Its standard error follows the EVA paper's "mean +- standard error over seeds": when every
    seed ran the same tasks, average over tasks within each seed and take the error across seeds.
    Otherwise (an unfinished grid) the per-task errors are combined as independent
    (sqrt(sum se^2) / n_tasks); single-seed tasks add nothing.
    """
    by_task: dict[str, list[float]] = {}
    by_seed: dict[Hashable, dict[str, float]] = {}
    for seed, task, value in points:
        if value is not None and math.isfinite(value):
            by_task.setdefault(task, []).append(value)
            by_seed.setdefault(seed, {})[task] = value
    if not by_task:
        return MeanStderr(math.nan, math.nan, 0)
    row = [mean_stderr(values) for values in by_task.values()]
    if len(by_seed) >= 2 and len({frozenset(values) for values in by_seed.values()}) == 1:
        stderr = mean_stderr(np.mean(list(values.values())) for values in by_seed.values()).stderr
    else:
        errors = [c.stderr for c in row if math.isfinite(c.stderr)]
        stderr = math.sqrt(sum(e * e for e in errors)) / len(row) if errors else math.nan
    return MeanStderr(float(np.mean([c.mean for c in row])), stderr, sum(c.n for c in row))


def iqm(values: Sequence[float] | np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean after dropping floor(n / 4) values at each end.

    axis None: over all values (a float); otherwise along `axis` (an array)."""
    result = scipy_stats.trim_mean(np.asarray(values, dtype=np.float64), proportiontocut=0.25, axis=axis)
    return float(result) if axis is None else result


def stratified_bootstrap_ci(groups: Sequence[np.ndarray], statistic: Callable[[np.ndarray], np.ndarray], *,
                            n_bootstrap: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic` over all values, resampling within each group.

    groups: one 1-D array per stratum (a task's run scores); each resample keeps every group's
    size. statistic maps (n_bootstrap, n_values) to (n_bootstrap,). One group is the plain bootstrap.
    """
    rng = np.random.default_rng(seed)
    samples = [g[rng.integers(0, g.size, size=(n_bootstrap, g.size))] for g in map(np.asarray, groups) if g.size]
    if not samples:
        return math.nan, math.nan
    values = statistic(np.concatenate(samples, axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, episodes: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a success proportion; (NaN, NaN) for no episodes."""
    if episodes <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= episodes:
        raise ValueError(f"successes must lie in [0, episodes={episodes}], got {successes}.")
    ci = scipy_stats.binomtest(int(successes), int(episodes)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


# --- paired comparisons and power ----------------------------------------------------------------

def minimum_detectable_difference(sd: float, n: int, *, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean difference a paired t-test on n pairs detects with `power` at two-sided
    level `alpha`: (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n). NaN for n < 2 or no sd."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    multiplier = scipy_stats.t.ppf(1 - alpha / 2, df) + scipy_stats.t.ppf(power, df)
    return float(multiplier * sd / math.sqrt(n))


def pairs_needed(sd: float, target: float, *, power: float = 0.8, alpha: float = 0.05, limit: int = 10**7) -> int | None:
    """Fewest pairs whose MDE (`minimum_detectable_difference`) is at most `target`; None beyond `limit`."""
    if target <= 0:
        raise ValueError(f"target MDE must be > 0, got {target}.")
    if sd == 0:
        return 2
    # The normal approximation is a lower bound on the t-based n: start there and walk up.
    z = scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power)
    n = max(2, math.ceil((z * sd / target) ** 2))
    while minimum_detectable_difference(sd, n, power=power, alpha=alpha) > target:
        n += 1
        if n > limit:
            return None
    return n


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired differences (variant - baseline), their spread and the power it buys."""

    n: int
    mean: float
    stderr: float           # sd / sqrt(n); NaN with fewer than two pairs
    sd: float               # sample standard deviation of the differences (ddof 1)
    mde80: float            # minimum detectable difference, 80% power, 5% two-sided
    p_value: float          # paired t-test, two-sided (NaN with fewer than two pairs or sd 0)

    @property
    def resolved(self) -> bool:
        """A nonzero difference at least the MDE (False when the MDE is not defined)."""
        return math.isfinite(self.mde80) and abs(self.mean) >= self.mde80 and self.mean != 0

    @property
    def ci95(self) -> tuple[float, float]:
        """The paired t-test's two-sided 95% interval of the mean difference, mean ± t(0.975, n-1) ·
        stderr; (NaN, NaN) with fewer than two pairs."""
        if self.n < 2 or not math.isfinite(self.stderr):
            return math.nan, math.nan
        half = float(scipy_stats.t.ppf(0.975, self.n - 1)) * self.stderr
        return self.mean - half, self.mean + half


def paired_difference(differences: Iterable[float | None]) -> PairedDifference:
    """Summary of paired differences (one per matched pair, e.g. per task x seed)."""
    d = finite(differences)
    summary = mean_stderr(d)
    sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
    p_value = math.nan
    if d.size > 1 and sd > 1e-12 * max(1.0, abs(summary.mean)):  # equal differences up to rounding: no test
        p_value = float(scipy_stats.ttest_1samp(d, 0.0).pvalue)
    return PairedDifference(summary.n, summary.mean, summary.stderr, sd, minimum_detectable_difference(sd, d.size),
                            p_value)


# --- variance decomposition and projection -------------------------------------------------------

@dataclass(frozen=True)
class ModelPooled:
    """Paired differences pooled over several pretrained models (one group of pairs each)."""

    pooled: PairedDifference   # every pair as one sample: the difference on these models
    between: PairedDifference  # the per-model mean differences: over pretrained models as a sample
    per_model: dict[str, PairedDifference]


def pool_models(groups: dict[str, Sequence[float]]) -> ModelPooled:
    """Pool paired differences grouped by pretrained model ({model: differences}).

    `pooled` treats the pairs of all models as exchangeable, so its MDE holds for these models;
    `between` is `paired_difference` over the models' mean differences (n = number of models), whose
    MDE carries the model-to-model variance with M - 1 degrees of freedom (NaN for one model).
    """
    per_model = {name: paired_difference(d) for name, d in groups.items()}
    pooled = paired_difference(x for d in groups.values() for x in d)
    between = paired_difference(p.mean for p in per_model.values() if p.n)
    return ModelPooled(pooled, between, per_model)


@dataclass(frozen=True)
class PairedCell:
    """One (task, seed) paired success difference and its episode-sampling variance."""

    task: str
    seed: int
    difference: float       # success(variant) - success(baseline)
    episode_variance: float  # variance of `difference` from evaluating finitely many episodes
    episodes: int           # episodes per side
    model: str = ""         # the pretrained model (run tree) when several are pooled


def episode_variance(variant: Sequence[float] | None, baseline: Sequence[float] | None,
                     variant_rate: float, baseline_rate: float, episodes: int) -> float:
    """Variance of a cell's success difference that comes from sampling `episodes` episodes.

    With per-episode successes (0/1) of both sides on the same starts, the episodes are paired:
    var(s_variant - s_baseline, ddof 1) / episodes, which credits the shared starts. Without them,
    two independent binomials: p(1 - p) / (episodes - 1) per side (the unbiased estimate).
    """
    if episodes < 2:
        return math.nan
    if variant is not None and baseline is not None and len(variant) == len(baseline) == episodes:
        diff = np.asarray(variant, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
        return float(diff.var(ddof=1) / episodes)
    return float((variant_rate * (1 - variant_rate) + baseline_rate * (1 - baseline_rate)) / (episodes - 1))


@dataclass(frozen=True)
class VarianceDecomposition:
    """Parts of the variance of paired differences d[task, seed] (each a variance, not an SD).

    total = the variance of all cells' differences; episode = the mean episode-sampling variance
    of a cell at `episodes` episodes; run = within-task variance beyond episode sampling (seed to
    seed); task = variance of the task means beyond what within-task noise explains. Negative
    method-of-moments estimates are clipped to 0. With several pretrained models, model = the
    variance of the models' suite-average differences beyond the noise in them, interaction = the
    task-by-model variance and task the task main effect; with one model both are 0 by
    construction (one model cannot show them; task then holds the interaction too).
    """

    tasks: int
    seeds: float            # mean seeds per task (per task and model with several models)
    episodes: int           # evaluation episodes per cell (per side)
    total: float
    episode: float
    run: float
    task: float
    models: int = 1
    model: float = 0.0
    interaction: float = 0.0

    def describe(self) -> str:
        sd = {name: math.sqrt(v) if math.isfinite(v) else math.nan
              for name, v in (("total", self.total), ("episode", self.episode), ("run", self.run), ("task", self.task),
                              ("model", self.model), ("interaction", self.interaction))}
        models = (f", model to model {sd['model']:.3f}, task by model {sd['interaction']:.3f} ({self.models} models)"
                  if self.models > 1 else "")
        return (f"per-pair SD {sd['total']:.3f}; episode sampling {sd['episode']:.3f} ({self.episodes} episodes), "
                f"run to run (seed) {sd['run']:.3f}, task to task {sd['task']:.3f}{models} (SDs; variances add)")


def decompose_variance(cells: Sequence[PairedCell]) -> VarianceDecomposition:
    """Split the variance of paired differences into episode, run (seed) and task parts, and with
    cells of several models (`PairedCell.model`) the model and task-by-model parts.

    Within task t (n_t seeds), var_s(d) estimates run + episode; across tasks, the variance of
    the task means estimates task + (run + episode) / n_t. Needs two seeds in some task for the
    run part and two tasks for the task part (NaN otherwise). With M models, over the tasks every
    model ran (T of them), the T x M table of cell means gives the two-way mean squares: the
    interaction's estimates interaction + noise, the task means' variance task + MS_int / M, the
    model means' variance model + MS_int / T (NaN below two such tasks).
    """
    if not cells:
        raise ValueError("decompose_variance needs at least one paired cell.")
    by_cell: dict[tuple[str, str], list[float]] = {}
    for c in cells:
        by_cell.setdefault((c.task, c.model), []).append(c.difference)
    all_d = np.array([c.difference for c in cells])
    total = float(all_d.var(ddof=1)) if all_d.size > 1 else math.nan
    episode = float(np.nanmean([c.episode_variance for c in cells])) if any(
        math.isfinite(c.episode_variance) for c in cells) else math.nan
    within, harmonic_seeds = _within(list(by_cell.values()))
    run = max(0.0, within - episode) if math.isfinite(within) and math.isfinite(episode) else math.nan
    seeds = float(np.mean([len(v) for v in by_cell.values()]))
    episodes = int(round(np.mean([c.episodes for c in cells])))
    tasks = list(dict.fromkeys(c.task for c in cells))
    models = list(dict.fromkeys(c.model for c in cells))
    if len(models) == 1:
        task = math.nan
        if len(tasks) > 1 and math.isfinite(within):
            task_means = np.array([np.mean(v) for v in by_cell.values()])
            task = max(0.0, float(task_means.var(ddof=1)) - within / harmonic_seeds)
        return VarianceDecomposition(len(tasks), seeds, episodes, total, episode, run, task)
    shared = [t for t in tasks if all((t, m) in by_cell for m in models)]
    if len(shared) < 2:
        return VarianceDecomposition(len(tasks), seeds, episodes, total, episode, run, math.nan, len(models),
                                     math.nan, math.nan)
    means = np.array([[np.mean(by_cell[t, m]) for m in models] for t in shared])  # tasks x models
    n_tasks, n_models = means.shape
    residual = means - means.mean(axis=1, keepdims=True) - means.mean(axis=0, keepdims=True) + means.mean()
    ms_interaction = float((residual ** 2).sum() / ((n_tasks - 1) * (n_models - 1)))
    # the noise in a cell mean: its seeds' variance over their number, over the cells of the table;
    # with one seed per cell only episode sampling is known, and the interaction keeps the seed part
    shared_within, shared_seeds = _within([by_cell[t, m] for t in shared for m in models])
    noise = (shared_within / shared_seeds if math.isfinite(shared_within)
             else episode if math.isfinite(episode) else 0.0)
    interaction = max(0.0, ms_interaction - noise)
    task = max(0.0, float(means.mean(axis=1).var(ddof=1)) - ms_interaction / n_models)
    model = max(0.0, float(means.mean(axis=0).var(ddof=1)) - ms_interaction / n_tasks)
    return VarianceDecomposition(len(tasks), seeds, episodes, total, episode, run, task, n_models, model, interaction)


def _within(groups: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(mean within-group variance, ddof 1, over the groups of two or more values (NaN without
    any), harmonic mean group size) of the seeds of each cell."""
    spread = [float(np.var(g, ddof=1)) for g in groups if len(g) > 1]
    return (float(np.mean(spread)) if spread else math.nan), len(groups) / sum(1 / len(g) for g in groups)


def projected_mde(parts: VarianceDecomposition, tasks: int, seeds: int, episodes: int, models: int | None = None, *,
                  power: float = 0.8, alpha: float = 0.05) -> float:
    """MDE of the suite-average paired difference over `tasks` x `seeds` cells of `episodes`
    episodes on each of `models` pretrained models (default: as many as the parts came from).

    The average's variance is task / T + model / M + interaction / (T M) + (run + episode * E0 / E)
    / (T M S): tasks (and models) are a sample too, so seeds and episodes alone cannot take the MDE
    below the task term. The multiplier is the t-based one of `minimum_detectable_difference` with
    T M S pairs, which is optimistic for the model term (M - 1 degrees of freedom: `pool_models`'
    MDE over models is the honest one for few models). Parts from one model hold no model term:
    their projection is for that model. NaN where the model parts could not be estimated.
    """
    models = parts.models if models is None else models
    if min(tasks, seeds, episodes, models) < 1:
        raise ValueError(f"tasks, seeds, episodes and models must each be >= 1, got {tasks}, {seeds}, {episodes}, "
                         f"{models}.")
    if parts.models > 1 and not all(math.isfinite(v) for v in (parts.task, parts.model, parts.interaction)):
        return math.nan  # fewer than two tasks every model ran: no model parts to project with
    task, run, episode, model, interaction = (v if math.isfinite(v) else 0.0 for v in (
        parts.task, parts.run, parts.episode, parts.model, parts.interaction))
    pairs = tasks * seeds * models
    variance = (task / tasks + model / models + interaction / (tasks * models)
                + (run + episode * parts.episodes / episodes) / pairs)
    if pairs < 2:
        return math.nan
    # minimum_detectable_difference(sd, n) = multiplier * sd / sqrt(n); here sd / sqrt(n) is sqrt(variance)
    return minimum_detectable_difference(math.sqrt(variance * pairs), pairs, power=power, alpha=alpha)


def grids_for_mde(parts: VarianceDecomposition, target: float, *, tasks: int, seeds: int, episodes: int,
                  models: int | None = None, limit: int = 10_000) -> dict[str, tuple[int, ...] | None]:
    """Smallest grids reaching `target`, each varying one axis of the current grid:
    {"seeds": (T, S', E), "tasks": (T', S, E), "episodes": (T, S, E')}; None where that axis alone
    cannot reach it within `limit`. With parts of several models the grids are (T, S, E, M) and
    a "models" axis is added."""
    models = parts.models if models is None else models
    several = parts.models > 1

    def grid(t: int, s: int, e: int, m: int) -> tuple[int, ...]:
        return (t, s, e, m) if several else (t, s, e)

    def smallest(make: Callable[[int], tuple[int, int, int, int]]) -> tuple[int, ...] | None:
        # the projected MDE falls as any axis grows: bisect for the first k that reaches the target
        if not projected_mde(parts, *make(limit)) <= target:
            return None
        low, high = 1, limit
        while low < high:
            mid = (low + high) // 2
            if projected_mde(parts, *make(mid)) <= target:
                high = mid
            else:
                low = mid + 1
        return grid(*make(low))

    axes = {"seeds": smallest(lambda s: (tasks, s, episodes, models)),
            "tasks": smallest(lambda t: (t, seeds, episodes, models)),
            "episodes": smallest(lambda e: (tasks, seeds, e, models))}
    if several:
        axes["models"] = smallest(lambda m: (tasks, seeds, episodes, m))
    return axes
