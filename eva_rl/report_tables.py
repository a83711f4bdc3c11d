"""The numbers of a report: tables over tasks and seeds, aggregates, paired differences and what
they can resolve, computed from `eva_rl.run_records` runs with `eva_rl.stats`.

Conventions: a table cell is the mean ± standard error over seeds of one (row, task); the
average is the mean over tasks with its error over seeds (`stats.suite_average`); success cells
also carry the episodes pooled over seeds, for a Wilson interval. `BASE` is the pretrained
policy, read from every run's step-0 evaluation.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from eva_rl import stats
from eva_rl.storage import write_text_atomic
from eva_rl.run_records import (DATA_SIZE_KEY, MEASURES, PAIRED_MEASURES, RunRecord, base_value, label_keys, partner,
                                run_value, setting_columns, value_order, variant_label, variant_order)
from eva_rl.stats import MeanStderr as Cell
from eva_rl.stats import iqm, mean_stderr, stratified_bootstrap_ci, suite_average

BASE = "base (step 0)"  # the pretrained policy before any update: the row every method must beat
MDE_TARGET = 0.05  # the suite-average paired success difference the paper's claims need resolved
# A task on which every method's final success is at least SATURATED, or at most FLOORED, cannot
# tell the methods apart on success: its paired differences are zero up to episode noise.
SATURATED, FLOORED = 0.95, 0.05


@dataclass(frozen=True)
class Table:
    """Variants x tasks of one measure, plus each variant's average over tasks."""

    measure: str
    variants: tuple[str, ...]
    tasks: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]        # (variant, task) -> Cell
    average: dict[str, Cell]                  # variant -> mean over tasks of per-task means
    episodes: dict[tuple[str, str], tuple[int, int]] | None = None  # (variant, task or "average") -> (successes, episodes)

    def wilson(self, variant: str, task: str) -> tuple[float, float] | None:
        counts = (self.episodes or {}).get((variant, task))
        return stats.wilson_interval(*counts) if counts else None

    def to_markdown(self) -> str:
        digits = MEASURES[self.measure].digits
        head = "| method | " + " | ".join(self.tasks) + " | average |"
        rule = "|" + " --- |" * (len(self.tasks) + 2)
        rows = [head, rule]
        for v in self.variants:
            cells = [format_cell(self.cells.get((v, t)), digits, self.wilson(v, t)) for t in self.tasks]
            average = format_cell(self.average.get(v), digits, self.wilson(v, "average"))
            rows.append(f"| {v} | " + " | ".join(cells) + f" | {average} |")
        return "\n".join(rows)

    def to_csv(self, path: Path) -> None:
        wilson = bool(self.episodes)
        extra = ("successes", "episodes", "wilson_low", "wilson_high") if wilson else ()
        columns = [c for t in (*self.tasks, "average") for c in (t, f"{t} stderr", f"{t} n", *(f"{t} {e}" for e in extra))]
        rows = []
        for v in self.variants:
            row: list[Any] = [v]
            for t in (*self.tasks, "average"):
                row.extend(_cell_fields(self.cells.get((v, t)) if t != "average" else self.average.get(v)))
                if wilson:
                    counts = self.episodes.get((v, t))
                    row.extend([*counts, *map(csv_number, stats.wilson_interval(*counts))] if counts else ["", "", "", ""])
            rows.append(row)
        write_rows(path, ["method", *columns], rows)


@dataclass(frozen=True)
class Aggregate:
    """One variant's score over all task x seed runs, with stratified-bootstrap 95% CIs."""

    variant: str
    measure: str
    n_runs: int
    n_tasks: int
    mean: float
    mean_ci: tuple[float, float]
    iqm: float
    iqm_ci: tuple[float, float]


@dataclass(frozen=True)
class Paired:
    """`variant - baseline` over the (task, seed) pairs both ran (lower-is-better measures too)."""

    variant: str
    baseline: str
    measure: str
    n_pairs: int
    mean_diff: float
    stderr: float
    n_better: int          # pairs where the variant beat the baseline (in the measure's direction)
    sd: float = math.nan   # standard deviation of the pairs' differences
    mde80: float = math.nan  # minimum detectable difference (80% power, 5% two-sided; eva_rl.stats)
    n_tasks: int = 0
    n_seeds: int = 0
    episodes: int | None = None  # evaluation episodes per task and run (None: not recorded)
    models: int = 1        # pretrained models (pooled run trees) the pairs come from
    model: str = ""        # "": pooled over every run tree; a tree's name: that tree's pairs alone
    ci95: tuple[float, float] = (math.nan, math.nan)  # paired t 95% interval of mean_diff
    p_value: float = math.nan  # paired t-test, two-sided (NaN: fewer than 2 pairs or no spread)
    # over pretrained models as a sample: the per-model mean differences (`stats.pool_models`'
    # `between`: sd, mde80 with models - 1 df, ci95, p_value); all NaN unless pooled over trees
    between: stats.PairedDifference = field(default_factory=lambda: stats.paired_difference(()))

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.mde80):
            return "no MDE (fewer than 2 pairs)"
        if self.mean_diff == 0:
            return "no difference"
        if self.sd == 0:  # every pair differs by the same amount: an MDE of 0 would clear anything
            return "no MDE (no spread over the pairs)"
        return "clears the MDE" if abs(self.mean_diff) >= self.mde80 else "below the MDE"


@dataclass(frozen=True)
class Resolution:
    """What a paired success comparison can resolve, and the grid an MDE of `MDE_TARGET` needs."""

    paired: Paired
    parts: stats.VarianceDecomposition
    projected: float                                 # projected MDE at the observed grid
    grids: dict[str, tuple[int, ...] | None]         # stats.grids_for_mde's answer


@dataclass(frozen=True)
class TaskSpread:
    """The lowest and highest mean final success over the methods on one task (the base row aside)."""

    task: str
    base: float | None   # the pretrained policy's success (None: no step-0 evaluation)
    lowest: float
    lowest_variant: str
    highest: float
    highest_variant: str

    @property
    def verdict(self) -> str:
        if self.lowest >= SATURATED:
            return "saturated"
        if self.highest <= FLOORED:
            return "floored"
        return "informative"


# --- tables ----------------------------------------------------------------------------------------

def metric_table(runs: Sequence[RunRecord], measure: str) -> Table:
    """Variants x tasks of `measure` (mean +- stderr over seeds), and the average over tasks
    (`suite_average`); the pretrained policy's row (`BASE`) first where runs evaluated step 0."""
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}; expected one of {sorted(MEASURES)}.")
    runs = [r for r in runs if r.kind == "finetune"]
    tasks = tuple(sorted({str(r.task) for r in runs}))
    rows = {v: [(r.unit, str(r.task), run_value(r, measure)) for r in runs if r.variant == v]
            for v in variant_order(runs)}
    base = _base_points(runs, measure)
    if base:
        rows = {BASE: base, **rows}
    cells: dict[tuple[str, str], Cell] = {}
    average = {}
    for v, points in rows.items():
        for t in tasks:
            cell = mean_stderr(value for _, task, value in points if task == t)
            if cell.n:
                cells[(v, t)] = cell
        if any((v, t) in cells for t in tasks):
            average[v] = suite_average(points)
    episodes = _episode_table(runs, tasks) if measure == "success" else None
    return Table(measure, tuple(rows), tasks, cells, average, episodes or None)


def task_spreads(table: Table) -> list[TaskSpread]:
    """Per task of a success table, how far apart its methods (every row but `BASE`) lie."""
    spreads = []
    for task in table.tasks:
        means = [(table.cells[(v, task)].mean, v) for v in table.variants if v != BASE and (v, task) in table.cells]
        if not means:
            continue
        (low, low_variant), (high, high_variant) = min(means), max(means)
        base = table.cells.get((BASE, task))
        spreads.append(TaskSpread(task, None if base is None else base.mean, low, low_variant, high, high_variant))
    return spreads


def _base_points(runs: Sequence[RunRecord], measure: str) -> list[tuple[tuple[str, int], str, float]]:
    """(unit, task, value) of the pretrained policy: each (task, seed)'s step-0 value, averaged
    over its runs (every method evaluates the same base policy on the same starts); each pooled
    run tree has its own pretrained policy."""
    found: dict[tuple[tuple[str, int], str], list[float]] = {}
    for r in runs:
        value = base_value(r, measure)
        if math.isfinite(value):
            found.setdefault((r.unit, str(r.task)), []).append(value)
    return [(unit, task, float(np.mean(v))) for (unit, task), v in sorted(found.items())]


def _episode_table(runs: Sequence[RunRecord], tasks: Sequence[str]) -> dict[tuple[str, str], tuple[int, int]]:
    """Episode counts pooled over seeds per (variant, task) and over tasks per (variant, "average").

    The base row counts each distinct step-0 evaluation of a task once: the same pretrained
    policy on the same starts gives the same episodes in every run, and repeats are no evidence."""
    counts: dict[tuple[str, str], list[int]] = {}

    def add(variant: str, task: str, k: int, n: int) -> None:
        for key in ((variant, task), (variant, "average")):
            total = counts.setdefault(key, [0, 0])
            total[0] += k
            total[1] += n

    base_seen = set()
    for r in runs:
        final = r.episode_counts()
        if final:
            add(r.variant, str(r.task), final[0], final[1])
        start = r.episode_counts(0)
        seen = (r.replicate, r.task, start[0], start[1], tuple(start[2] or ())) if start else None
        if start and seen not in base_seen:
            base_seen.add(seen)
            add(BASE, str(r.task), start[0], start[1])
    return {key: (k, n) for key, (k, n) in counts.items()}


def aggregate_scores(runs: Sequence[RunRecord], measure: str = "success", *, n_bootstrap: int = 2000,
                     seed: int = 0) -> list[Aggregate]:
    """Per variant: mean and IQM over all task x seed runs, with stratified-bootstrap 95% CIs."""
    runs = [r for r in runs if r.kind == "finetune"]
    result = []
    for v in variant_order(runs):
        per_task: dict[str, list[float]] = {}
        for r in runs:
            value = run_value(r, measure)
            if r.variant == v and math.isfinite(value):
                per_task.setdefault(str(r.task), []).append(value)
        if not per_task:
            continue
        groups = [np.asarray(per_task[t], dtype=np.float64) for t in sorted(per_task)]
        flat = np.concatenate(groups)
        mean_ci = stratified_bootstrap_ci(groups, lambda s: s.mean(axis=1), n_bootstrap=n_bootstrap, seed=seed)
        iqm_ci = stratified_bootstrap_ci(groups, lambda s: iqm(s, axis=1), n_bootstrap=n_bootstrap, seed=seed)
        result.append(Aggregate(v, measure, int(flat.size), len(groups), float(flat.mean()), mean_ci,
                                iqm(flat), iqm_ci))
    return result


# --- paired differences and power ----------------------------------------------------------------

def matched_pairs(runs: Sequence[RunRecord], baseline: str) -> dict[str, list[tuple[RunRecord, RunRecord]]]:
    """{variant: [(run, its baseline partner)]} for every variant not of method `baseline`
    (`eva_rl.run_records.partner` says which runs pair)."""
    runs = [r for r in runs if r.kind == "finetune"]
    base_runs = [r for r in runs if r.method == baseline]
    keys = label_keys(runs)
    pairs: dict[str, list[tuple[RunRecord, RunRecord]]] = {}
    for v in variant_order(runs):
        mine = [r for r in runs if r.variant == v and r.method != baseline]
        matched = [(r, p) for r in mine if (p := partner(r, base_runs, keys)) is not None]
        if matched:
            pairs[v] = matched
    return pairs


# The EVA paper's claims about its own variants, each against the method it initialises differently
PAPER_CLAIMS = (("eva", "lora"), ("eva_dora", "dora"))


def paired_comparisons(runs: Sequence[RunRecord], baselines: Sequence[str] = ("lora", "fft"),
                       measures: Sequence[str] = PAIRED_MEASURES,
                       claims: Sequence[tuple[str, str]] = PAPER_CLAIMS) -> list[Paired]:
    """Each variant minus each baseline method over the (task, seed) pairs both ran, plus the
    (variant, baseline) `claims` whose baseline is not among `baselines` (eva_dora vs dora).

    Every method evaluates on the same starts, so a pair's difference has no start-to-start
    noise; `mde80` says how large a true difference these pairs would detect 80% of the time.
    With pooled run trees (several pretrained models) the rows pool the pairs of every tree and
    carry `stats.pool_models`' MDE over models; each claim also gets one row per tree (`model`).
    """
    result = []
    comparisons = [(b, None) for b in baselines] + [(b, v) for v, b in claims if b not in baselines]
    for baseline, only in comparisons:
        for v, pairs in matched_pairs(runs, baseline).items():
            # a claim names a method; its variants carry swept settings ("eva_dora train.data.episodes=5")
            if only is not None and pairs[0][0].method != only:
                continue
            for measure in measures:
                matched = [(r, run_value(r, measure) - run_value(p, measure)) for r, p in pairs]
                matched = [(r, d) for r, d in matched if math.isfinite(d)]
                if not matched:
                    continue
                by_model: dict[str, list[tuple[RunRecord, float]]] = {}
                for r, d in matched:
                    by_model.setdefault(r.replicate, []).append((r, d))
                if len(by_model) == 1:
                    result.append(_paired_row(v, baseline, measure, matched))
                    continue
                pooled = stats.pool_models({name: [d for _, d in group] for name, group in by_model.items()})
                result.append(_paired_row(v, baseline, measure, matched, models=len(by_model),
                                          between=pooled.between))
                if (pairs[0][0].method, baseline) in claims:
                    result += [_paired_row(v, baseline, measure, group, model=name) for name, group in by_model.items()]
    return result


def _paired_row(variant: str, baseline: str, measure: str, matched: Sequence[tuple[RunRecord, float]],
                **models: Any) -> Paired:
    """A Paired row from (run, its difference to the baseline partner) pairs."""
    sign = 1.0 if MEASURES[measure].higher_is_better else -1.0
    summary = stats.paired_difference(d for _, d in matched)
    counts = {c[1] for r, _ in matched if (c := r.episode_counts())}
    trees = len({r.replicate for r, _ in matched})
    seeds = round(len({r.unit for r, _ in matched}) / trees)  # per tree: trees may number their seeds apart
    return Paired(variant, baseline, measure, summary.n, summary.mean, summary.stderr,
                  sum(1 for _, d in matched if sign * d > 0), summary.sd, summary.mde80,
                  len({r.task for r, _ in matched}), seeds, counts.pop() if len(counts) == 1 else None,
                  ci95=summary.ci95, p_value=summary.p_value, **models)


def resolutions(runs: Sequence[RunRecord], paired: Sequence[Paired]) -> list[Resolution]:
    """For each paired success comparison: the variance split (episode, seed, task) and the
    grids (tasks x seeds x episodes) that an MDE of `MDE_TARGET` would need."""
    result = []
    for baseline in dict.fromkeys(p.baseline for p in paired):
        pairs_of = matched_pairs(runs, baseline)
        for p in paired:
            if p.baseline != baseline or p.measure != "success" or p.model or p.variant not in pairs_of:
                continue
            cells = [cell for r, q in pairs_of[p.variant] if (cell := _paired_cell(r, q)) is not None]
            if len(cells) < 2 or any(c.episodes < 2 for c in cells):
                continue  # older runs without episode counts: missing_lines says so
            parts = stats.decompose_variance(cells)
            seeds = max(1, round(parts.seeds))
            result.append(Resolution(p, parts, stats.projected_mde(parts, parts.tasks, seeds, parts.episodes),
                                     stats.grids_for_mde(parts, MDE_TARGET, tasks=parts.tasks, seeds=seeds,
                                                         episodes=parts.episodes)))
    return result


def _paired_cell(run: RunRecord, base: RunRecord) -> stats.PairedCell | None:
    a, b = run_value(run, "success"), run_value(base, "success")
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    ca, cb = run.episode_counts(), base.episode_counts()
    if ca is None or cb is None or ca[1] != cb[1]:
        return stats.PairedCell(str(run.task), run.seed, a - b, math.nan, ca[1] if ca else 0, run.replicate)
    return stats.PairedCell(str(run.task), run.seed, a - b, stats.episode_variance(ca[2], cb[2], a, b, ca[1]), ca[1],
                            run.replicate)


def data_size_table(runs: Sequence[RunRecord]) -> tuple[list[str], list[Any], dict[tuple[str, str, Any], Cell]]:
    """When `train.data.episodes` varies: (groups, sizes, {(group, measure, size): suite average});
    a group is a row label without the data size. Empty when it does not vary."""
    runs = [r for r in runs if r.kind == "finetune"]
    if DATA_SIZE_KEY not in setting_columns(runs):
        return [], [], {}
    keys = [k for k in label_keys(runs) if k != DATA_SIZE_KEY]
    show_rank = len({r.rank for r in runs if r.rank is not None}) > 1
    group_of = {r.path: variant_label(r, keys, show_rank=show_rank) for r in runs}
    sizes = sorted({r.settings.get(DATA_SIZE_KEY) for r in runs}, key=value_order)
    by_variant = {v: [r for r in runs if r.variant == v] for v in variant_order(runs)}
    groups = list(dict.fromkeys(group_of[r.path] for rows in by_variant.values() for r in rows))
    cells = {}
    for g in groups:
        for size in sizes:
            mine = [r for r in runs if group_of[r.path] == g and r.settings.get(DATA_SIZE_KEY) == size]
            for measure in ("success", "success_auc", "train_loss", "val_action_error"):
                cell = suite_average((r.unit, str(r.task), run_value(r, measure)) for r in mine)
                if cell.n:
                    cells[(g, measure, size)] = cell
    return groups, sizes, cells


# --- formatting ----------------------------------------------------------------------------------

def format_cell(cell: Cell | None, digits: int, wilson: tuple[float, float] | None = None) -> str:
    """`0.85 ± 0.05`, plus `[0.70, 0.93]` (episode-level Wilson 95%) when given; a single seed
    shows the mean alone; a missing cell shows `–`."""
    if cell is None or cell.n == 0:
        return "–"
    text = f"{cell.mean:.{digits}f}"
    if math.isfinite(cell.stderr):
        text += f" ± {cell.stderr:.{digits}f}"
    if wilson is not None and all(map(math.isfinite, wilson)):
        text += f" [{wilson[0]:.{digits}f}, {wilson[1]:.{digits}f}]"
    return text


def _cell_fields(cell: Cell | None) -> list[Any]:
    if cell is None:
        return ["", "", 0]
    return [csv_number(cell.mean), csv_number(cell.stderr), cell.n]


def csv_number(x: float) -> str:
    return "" if not math.isfinite(x) else repr(float(x))


def write_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file, written atomically; None and non-finite floats become empty cells."""
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if x is None or (isinstance(x, float) and not math.isfinite(x)) else x for x in row])
    write_text_atomic(path, handle.getvalue())
