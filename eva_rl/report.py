"""Tables and plots from a directory of runs: `eva-rl report RUNS_DIR`.

Reads every `metrics.json` under a directory (the layout `eva_rl.experiment` writes, or any
tree of fine-tuning runs), and writes, into `RUNS_DIR/report/`:

- the paper's table shape for success, return, final training loss and held-out action error:
  methods as rows, tasks as columns, mean +- standard error over seeds, and the suite average
  (markdown in `report.md`, one CSV per measure);
- interquartile mean (IQM) and mean with stratified-bootstrap 95% confidence intervals across
  tasks x seeds (`aggregate.csv`);
- paired differences of every method to `lora` and to `fft`, over the (task, seed) pairs both
  ran, with standard errors (`paired.csv`);
- PNG plots: each measure vs fine-tuning steps per method (mean over tasks ± standard error
  over seeds, as in the tables), EVA's rank per layer, trainable parameters vs success; and a tensorboard hparams view (`tb_hparams/`).

The statistics (standard errors, IQM, bootstrap, Wilson intervals, power) come from `eva_rl.stats`.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from eva_rl.stats import MeanStderr as Cell
from eva_rl.stats import iqm, mean_stderr, stratified_bootstrap_ci

# The EVA paper's row order (its Meta-World table); methods it does not list follow, sorted.
METHOD_ORDER = ("fft", "lora", "adalora", "pissa", "olora", "eva", "dora", "eva_dora")


@dataclass(frozen=True)
class Measure:
    """One column family of the report: where its final value lives and which way is better."""

    name: str            # short name used in file names and tables
    title: str           # human title
    final_key: str       # key in metrics.json's "final"
    higher_is_better: bool
    digits: int          # decimals shown in markdown


MEASURES: dict[str, Measure] = {
    m.name: m for m in (
        Measure("success", "Success rate", "success_rate", True, 2),
        Measure("return", "Return", "return_mean", True, 1),
        Measure("train_loss", "Final training loss", "train_loss", False, 4),
        Measure("val_action_error", "Held-out action error", "val_action_error", False, 4),
    )
}


@dataclass(frozen=True)
class RunRecord:
    """One fine-tuning (or pretraining) run found on disk."""

    path: Path                 # the run directory (holds metrics.json)
    kind: str                  # "pretrain" | "finetune"
    task: str | None
    method: str | None
    rank: int | None
    seed: int
    point: dict[str, Any]      # the grid point (run.json), or method/rank from metrics.json
    variant: str               # row label: method, plus the grid keys that vary between runs
    metrics: dict[str, Any]    # metrics.json as read

    def final(self, measure: str) -> float:
        """The run's final value of a measure (NaN when the run did not record it)."""
        value = (self.metrics.get("final") or {}).get(MEASURES[measure].final_key)
        return float(value) if value is not None else math.nan


@dataclass(frozen=True)
class Table:
    """Variants x tasks of one measure, plus each variant's average over tasks."""

    measure: str
    variants: tuple[str, ...]
    tasks: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]        # (variant, task) -> Cell
    average: dict[str, Cell]                  # variant -> mean over tasks of per-task means

    def to_markdown(self) -> str:
        digits = MEASURES[self.measure].digits
        head = "| method | " + " | ".join(self.tasks) + " | average |"
        rule = "|" + " --- |" * (len(self.tasks) + 2)
        rows = [head, rule]
        for v in self.variants:
            cells = [format_cell(self.cells.get((v, t)), digits) for t in self.tasks]
            rows.append(f"| {v} | " + " | ".join(cells) + f" | {format_cell(self.average.get(v), digits)} |")
        return "\n".join(rows)

    def to_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            columns = [c for t in (*self.tasks, "average") for c in (t, f"{t} stderr", f"{t} n")]
            writer.writerow(["method", *columns])
            for v in self.variants:
                row: list[Any] = [v]
                for t in self.tasks:
                    row.extend(_cell_fields(self.cells.get((v, t))))
                row.extend(_cell_fields(self.average.get(v)))
                writer.writerow(row)


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


@dataclass(frozen=True)
class ReportResult:
    """What `write_report` produced."""

    out_dir: Path
    runs: tuple[RunRecord, ...]
    tables: dict[str, Table]
    aggregates: tuple[Aggregate, ...]
    paired: tuple[Paired, ...]
    markdown: str
    files: tuple[Path, ...]


# --- reading runs -------------------------------------------------------------------------------

def _run_files(root: Path, name: str, run_dirs: Iterable[str | Path] | None) -> list[Path]:
    """`name` files of the runs under root, skipping report folders (any folder holding a
    report.md) and runs an --overwrite moved aside; only those in `run_dirs` when given."""
    if run_dirs is not None:
        return sorted(Path(d) / name for d in run_dirs if (Path(d) / name).is_file())

    def skipped(path: Path) -> bool:
        folders = path.relative_to(root).parents  # path's folders up to root ("." last)
        return any(f.name == "_replaced" or (root / f / "report.md").is_file() for f in list(folders)[:-1])

    return [path for path in sorted(root.rglob(name)) if not skipped(path)]


def load_runs(runs_dir: str | Path, *, kind: str | None = "finetune",
              run_dirs: Iterable[str | Path] | None = None) -> list[RunRecord]:
    """Every run under `runs_dir` with a readable metrics.json (of `kind`, or all when None);
    with `run_dirs`, only the runs in those directories (one experiment's grid in a shared out_dir).

    A run's grid point comes from `run.json` (written by eva_rl.experiment) when present, else
    from metrics.json's method and rank. Row labels name the method plus every grid key (other
    than task and seed) whose value differs between runs, e.g. `eva r=8` when ranks vary.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Runs directory {str(root)!r} does not exist. Pass the out_dir of an experiment.")
    found: list[tuple[Path, dict, dict]] = []
    for path in _run_files(root, "metrics.json", run_dirs):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run killed while writing; the experiment rewrites it on resume
        if kind is not None and metrics.get("kind") != kind:
            continue
        run_json = path.parent / "run.json"
        point: dict[str, Any] = {}
        if run_json.is_file():
            try:
                point = dict(json.loads(run_json.read_text()).get("point") or {})
            except json.JSONDecodeError:
                point = {}
        point.setdefault("method", metrics.get("method"))
        point.setdefault("rank", metrics.get("rank"))
        found.append((path.parent, metrics, point))
    varying = _varying_keys([p for _, _, p in found])
    runs = []
    for run_dir, metrics, point in found:
        runs.append(RunRecord(
            path=run_dir, kind=str(metrics.get("kind")), task=metrics.get("task"),
            method=metrics.get("method"), rank=metrics.get("rank"), seed=int(metrics.get("seed", 0)),
            point=point, variant=_variant_label(point, varying), metrics=metrics))
    return runs


def _varying_keys(points: Sequence[dict[str, Any]]) -> list[str]:
    # None (e.g. fft's rank) is "not applicable", not a value that makes a key vary
    keys = sorted({k for p in points for k in p} - {"task", "seed", "method"})
    return [k for k in keys if len({json.dumps(p[k], sort_keys=True) for p in points if p.get(k) is not None}) > 1]


def _variant_label(point: dict[str, Any], varying: Sequence[str]) -> str:
    label = str(point.get("method"))
    extras = [f"{'r' if k == 'rank' else k}={point[k]}" for k in varying if point.get(k) is not None]
    return " ".join([label, *extras])


def _variant_order(runs: Sequence[RunRecord]) -> tuple[str, ...]:
    def key(run: RunRecord) -> tuple:
        method = run.method or ""
        order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return (order, method, run.rank if run.rank is not None else -1, run.variant)
    return tuple(dict.fromkeys(r.variant for r in sorted(runs, key=key)))


# --- statistics ----------------------------------------------------------------------------------

def metric_table(runs: Sequence[RunRecord], measure: str) -> Table:
    """Variants x tasks of `measure` (mean +- stderr over seeds), and the average over tasks
    (`suite_average`)."""
    if measure not in MEASURES:
        raise ValueError(f"Unknown measure {measure!r}; expected one of {sorted(MEASURES)}.")
    runs = [r for r in runs if r.kind == "finetune"]
    variants = _variant_order(runs)
    tasks = tuple(sorted({str(r.task) for r in runs}))
    cells: dict[tuple[str, str], Cell] = {}
    average = {}
    for v in variants:
        points = [(r.seed, str(r.task), r.final(measure)) for r in runs if r.variant == v]
        for t in tasks:
            cell = mean_stderr(value for _, task, value in points if task == t)
            if cell.n:
                cells[(v, t)] = cell
        if any((v, t) in cells for t in tasks):
            average[v] = suite_average(points)
    return Table(measure, variants, tasks, cells, average)


def suite_average(points: Iterable[tuple[int, str, float | None]]) -> Cell:
    """The average over tasks of (seed, task, value) points: the mean of the per-task means.

    Its standard error follows the EVA paper's "mean +- standard error over seeds": when every
    seed ran the same tasks, average over tasks within each seed and take the error across seeds.
    Otherwise (an unfinished grid) the per-task errors are combined as independent
    (sqrt(sum se^2) / n_tasks); single-seed tasks add nothing.
    """
    by_task: dict[str, list[float]] = {}
    by_seed: dict[int, dict[str, float]] = {}
    for seed, task, value in points:
        if value is not None and math.isfinite(value):
            by_task.setdefault(task, []).append(value)
            by_seed.setdefault(seed, {})[task] = value
    if not by_task:
        return Cell(math.nan, math.nan, 0)
    row = [mean_stderr(values) for values in by_task.values()]
    if len(by_seed) >= 2 and len({frozenset(values) for values in by_seed.values()}) == 1:
        stderr = mean_stderr(np.mean(list(values.values())) for values in by_seed.values()).stderr
    else:
        errors = [c.stderr for c in row if math.isfinite(c.stderr)]
        stderr = math.sqrt(sum(e * e for e in errors)) / len(row) if errors else math.nan
    return Cell(float(np.mean([c.mean for c in row])), stderr, sum(c.n for c in row))


def aggregate_scores(runs: Sequence[RunRecord], measure: str = "success", *, n_bootstrap: int = 2000,
                     seed: int = 0) -> list[Aggregate]:
    """Per variant: mean and IQM over all task x seed runs, with stratified-bootstrap 95% CIs."""
    runs = [r for r in runs if r.kind == "finetune"]
    result = []
    for v in _variant_order(runs):
        per_task = {}
        for r in runs:
            value = r.final(measure)
            if r.variant == v and math.isfinite(value):
                per_task.setdefault(str(r.task), []).append(value)
        if not per_task:
            continue
        groups = [np.asarray(per_task[t], dtype=np.float64) for t in sorted(per_task)]
        flat = np.concatenate(groups)
        mean_ci = stratified_bootstrap_ci(groups, lambda s: s.mean(axis=1), n_bootstrap=n_bootstrap, seed=seed)
        iqm_ci = stratified_bootstrap_ci(groups, lambda s: iqm(s, axis=1), n_bootstrap=n_bootstrap,
                                         seed=seed)
        result.append(Aggregate(v, measure, int(flat.size), len(groups), float(flat.mean()), mean_ci,
                                iqm(flat), iqm_ci))
    return result


def paired_comparisons(runs: Sequence[RunRecord], baselines: Sequence[str] = ("lora", "fft"),
                       measures: Sequence[str] = ("success", "train_loss", "val_action_error")) -> list[Paired]:
    """Each variant minus each baseline method over the (task, seed) pairs both ran.

    Pairs also match every other grid key; a baseline with ranks is matched at the variant's
    rank, or at its only rank when the variant has none (fft vs lora). Since every method
    evaluates on the same task variants and seeds, a pair's difference has no start-to-start
    noise, and the standard error of the mean difference says whether a gap is real.
    """
    runs = [r for r in runs if r.kind == "finetune"]
    result = []
    for baseline in baselines:
        base_runs = [r for r in runs if r.method == baseline]
        if not base_runs:
            continue
        index: dict[tuple, dict[Any, RunRecord]] = {}
        for r in base_runs:
            index.setdefault(_pair_key(r), {})[r.rank] = r
        for v in _variant_order(runs):
            mine = [r for r in runs if r.variant == v]
            if not mine or mine[0].method == baseline:
                continue
            for measure in measures:
                sign = 1.0 if MEASURES[measure].higher_is_better else -1.0
                diffs = []
                for r in mine:
                    partner = _partner(index.get(_pair_key(r), {}), r.rank)
                    if partner is None:
                        continue
                    d = r.final(measure) - partner.final(measure)
                    if math.isfinite(d):
                        diffs.append(d)
                if not diffs:
                    continue
                cell = mean_stderr(diffs)
                better = sum(1 for d in diffs if sign * d > 0)
                result.append(Paired(v, baseline, measure, cell.n, cell.mean, cell.stderr, better))
    return result


def _partner(by_rank: dict[Any, RunRecord], rank: int | None) -> RunRecord | None:
    """The baseline run at `rank`; where one side has no rank (fft), the baseline's only run.
    Two different ranks never pair: the difference would mix method and capacity."""
    if rank in by_rank:
        return by_rank[rank]
    if len(by_rank) == 1 and (rank is None or None in by_rank):
        return next(iter(by_rank.values()))
    return None


def _pair_key(run: RunRecord) -> tuple:
    extras = {k: v for k, v in run.point.items() if k not in ("method", "rank", "task", "seed")}
    return (str(run.task), run.seed, json.dumps(extras, sort_keys=True, default=str))


# --- formatting ----------------------------------------------------------------------------------

def format_cell(cell: Cell | None, digits: int) -> str:
    """`0.85 ± 0.05`; a single seed shows the mean alone; a missing cell shows `–`."""
    if cell is None or cell.n == 0:
        return "–"
    if not math.isfinite(cell.stderr):
        return f"{cell.mean:.{digits}f}"
    return f"{cell.mean:.{digits}f} ± {cell.stderr:.{digits}f}"


def _cell_fields(cell: Cell | None) -> list[Any]:
    if cell is None:
        return ["", "", 0]
    return [_num(cell.mean), _num(cell.stderr), cell.n]


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else repr(float(x))


def _aggregate_markdown(aggregates: Sequence[Aggregate]) -> str:
    rows = ["| method | measure | runs | tasks | mean [95% CI] | IQM [95% CI] |", "| --- | --- | --- | --- | --- | --- |"]
    for a in aggregates:
        d = MEASURES[a.measure].digits
        rows.append(f"| {a.variant} | {a.measure} | {a.n_runs} | {a.n_tasks} | "
                    f"{a.mean:.{d}f} [{a.mean_ci[0]:.{d}f}, {a.mean_ci[1]:.{d}f}] | "
                    f"{a.iqm:.{d}f} [{a.iqm_ci[0]:.{d}f}, {a.iqm_ci[1]:.{d}f}] |")
    return "\n".join(rows)


def _paired_markdown(paired: Sequence[Paired]) -> str:
    rows = ["| method | vs | measure | pairs | difference ± stderr | better in |", "| --- | --- | --- | --- | --- | --- |"]
    for p in paired:
        d = MEASURES[p.measure].digits
        err = f" ± {p.stderr:.{d}f}" if math.isfinite(p.stderr) else ""
        rows.append(f"| {p.variant} | {p.baseline} | {p.measure} | {p.n_pairs} | {p.mean_diff:+.{d}f}{err} | "
                    f"{p.n_better}/{p.n_pairs} |")
    return "\n".join(rows)


# --- plots -----------------------------------------------------------------------------------------

def _series(run: RunRecord, measure: str) -> list[tuple[int, float]]:
    """(step, value) points of a run's curve for a measure."""
    if measure == "success":
        return [(int(e["step"]), float(e["success_rate"])) for e in run.metrics.get("eval") or []
                if e.get("success_rate") is not None]
    if measure == "return":
        return [(int(e["step"]), float(e["return_mean"])) for e in run.metrics.get("eval") or []
                if e.get("return_mean") is not None]
    return [(int(s), float(v)) for s, v in run.metrics.get(measure) or [] if v is not None]


def curve(runs: Sequence[RunRecord], measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, standard error) of one variant's curve, in the tables' terms: at each step
    the average over tasks and its standard error over seeds (`suite_average`), so the band shows
    seed-to-seed spread rather than how far apart the tasks lie."""
    series = [(r, dict(_series(r, measure))) for r in runs]
    steps = np.array(sorted({step for _, points in series for step in points}), dtype=int)
    cells = [suite_average((r.seed, str(r.task), points.get(int(step))) for r, points in series) for step in steps]
    return (steps, np.array([c.mean for c in cells]),
            np.array([c.stderr if math.isfinite(c.stderr) else 0.0 for c in cells]))


def plot_curves(runs: Sequence[RunRecord], measure: str, path: Path) -> Path | None:
    """A measure vs fine-tuning steps per variant: mean over tasks, band +- one standard error over
    seeds (`curve`, the tables' average +- error). Variants all evaluated at one and the same step
    (success measured only at the end) get bars instead of lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.kind == "finetune"]
    curves = {v: curve([r for r in runs if r.variant == v], measure) for v in _variant_order(runs)}
    curves = {v: c for v, c in curves.items() if c[0].size}
    if not curves:
        return None
    title = MEASURES[measure].title.replace("Final training", "Training")  # a curve, not its last value
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if len({tuple(steps) for steps, _, _ in curves.values()}) == 1 and next(iter(curves.values()))[0].size == 1:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        names = list(curves)
        for i, v in enumerate(names):
            _, mean, stderr = curves[v]
            ax.bar(i, mean[0], yerr=stderr[0], color=colors[i % len(colors)], capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        step = int(next(iter(curves.values()))[0][0])
        return _save_figure(fig, ax, path, "method", title,
                            f"{title} after {step} fine-tuning steps\n(mean over tasks ± standard error over seeds)",
                            legend=False)
    for v, (steps, mean, stderr) in curves.items():
        line, = ax.plot(steps, mean, label=v, marker="o" if steps.size < 12 else None, markersize=3)
        ax.fill_between(steps, mean - stderr, mean + stderr, color=line.get_color(), alpha=0.2)
    if measure in ("train_loss", "val_action_error"):
        ax.set_yscale("log")
    return _save_figure(fig, ax, path, "fine-tuning steps", title,
                        f"{title} vs fine-tuning steps\n(mean over tasks ± standard error over seeds)")


def read_eva_ranks(run_dir: Path) -> dict[str, int] | None:
    """Rank per adapted layer from a run's eva_report.json (`EvaReport.to_json`'s "ranks"), or None."""
    path = run_dir / "eva_report.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    ranks = data.get("ranks")
    return {str(k): int(v) for k, v in ranks.items()} if isinstance(ranks, dict) else None


def plot_eva_ranks(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Mean rank per layer over the EVA runs of each variant (bars; one group per variant)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_variant: dict[str, list[dict[str, int]]] = {}
    for r in runs:
        ranks = read_eva_ranks(r.path)
        if ranks:
            per_variant.setdefault(r.variant, []).append(ranks)
    if not per_variant:
        return None
    layers = sorted({layer for allocs in per_variant.values() for a in allocs for layer in a})
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(layers) + 2), 4.2))
    width = 0.8 / len(per_variant)
    x = np.arange(len(layers))
    for i, (variant, allocs) in enumerate(sorted(per_variant.items())):
        mean = [np.mean([a.get(layer, 0) for a in allocs]) for layer in layers]
        ax.bar(x + i * width, mean, width, label=f"{variant} ({len(allocs)} runs)")
    ax.set_xticks(x + 0.4 - width / 2, [_short_layer(layer) for layer in layers], rotation=90, fontsize=7)
    ax.set_ylabel("rank")
    ax.set_title("EVA rank allocation per layer (mean over runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short_layer(name: str) -> str:
    """`base_model.model.encoder.h.0.attn.c_attn` -> `h.0.attn.c_attn`."""
    marker = name.find("h.")
    return name[marker:] if marker >= 0 else name


def plot_params_vs_success(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Trainable parameters (log x) vs success (mean +- stderr over task x seed runs), per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.kind == "finetune"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for v in _variant_order(runs):
        mine = [r for r in runs if r.variant == v and r.metrics.get("trainable_params")]
        if not mine:
            continue
        params = float(np.mean([r.metrics["trainable_params"] for r in mine]))
        cell = mean_stderr(r.final("success") for r in mine)
        if not cell.n:
            continue
        ax.errorbar([params], [cell.mean], yerr=[cell.stderr if math.isfinite(cell.stderr) else 0.0],
                    fmt="o", capsize=3, label=v)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    return _save_figure(fig, ax, path, "trainable parameters", "success rate",
                        "Trainable parameters vs success\n(mean ± stderr over runs)")


def _save_figure(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, *,
                 legend: bool = True) -> Path:
    """Label, legend and grid `ax`, write `fig` to `path` as PNG, and free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_hparams(runs: Sequence[RunRecord], log_dir: Path) -> Path | None:
    """One tensorboard hparams entry per run: its grid point and final measures."""
    runs = [r for r in runs if r.kind == "finetune"]
    if not runs:
        return None
    from torch.utils.tensorboard import SummaryWriter

    if log_dir.is_dir():
        shutil.rmtree(log_dir)  # regenerated from the runs each time; stale entries would show twice
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for r in runs:
            hparams: dict[str, Any] = {"task": str(r.task), "seed": r.seed, "method": str(r.method)}
            for key, value in r.point.items():
                hparams[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
            final = {f"final/{m}": r.final(m) for m in MEASURES if math.isfinite(r.final(m))}
            final["final/trainable_params"] = float(r.metrics.get("trainable_params") or 0)
            writer.add_hparams(hparams, final, run_name=r.path.name)
    return log_dir


# --- the report ----------------------------------------------------------------------------------

def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, *, n_bootstrap: int = 2000, seed: int = 0,
                 plots: bool = True, tensorboard: bool = True,
                 run_dirs: Iterable[str | Path] | None = None) -> ReportResult:
    """Write report.md, CSVs, PNG plots and a tensorboard hparams view for the runs in `runs_dir`
    (only those in `run_dirs` when given).

    out_dir defaults to `runs_dir/report`. Raises FileNotFoundError when no fine-tuning run
    has a metrics.json yet.
    """
    root = Path(runs_dir)
    run_dirs = None if run_dirs is None else list(run_dirs)  # read twice: runs, then failed runs
    runs = load_runs(root, run_dirs=run_dirs)
    if not runs:
        raise FileNotFoundError(
            f"No fine-tuning metrics.json under {str(root)!r}. Run `eva-rl experiment CONFIG` (or "
            f"`eva-rl finetune`) first, and pass the directory that holds the runs.")
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    tables = {m: metric_table(runs, m) for m in MEASURES}
    sections = [f"# Report: {root}", "",
                f"{len(runs)} fine-tuning runs; cells are mean ± standard error over seeds; "
                f"the average is the mean over tasks.", ""]
    failed = _failed_runs(root, run_dirs)
    if failed:
        sections += [f"**{len(failed)} runs failed** (see error.txt in each): "
                     + ", ".join(str(p.relative_to(root)) for p in failed), ""]
    for name, table in tables.items():
        if not table.cells:
            continue
        sections += [f"## {MEASURES[name].title}", "", table.to_markdown(), ""]
        table.to_csv(out / f"{name}.csv")
        files.append(out / f"{name}.csv")
    aggregates = [a for m in MEASURES for a in aggregate_scores(runs, m, n_bootstrap=n_bootstrap, seed=seed)]
    sections += ["## Aggregates over tasks x seeds (stratified bootstrap 95% CI)", "", _aggregate_markdown(aggregates), ""]
    _write_rows(out / "aggregate.csv", ["method", "measure", "runs", "tasks", "mean", "mean_ci_low", "mean_ci_high",
                                        "iqm", "iqm_ci_low", "iqm_ci_high"],
                [[a.variant, a.measure, a.n_runs, a.n_tasks, a.mean, *a.mean_ci, a.iqm, *a.iqm_ci] for a in aggregates])
    files.append(out / "aggregate.csv")
    paired = paired_comparisons(runs)
    if paired:
        sections += ["## Paired differences (method − baseline over the same task × seed)", "",
                     "Success: higher is better; training loss and held-out action error: lower is better.", "",
                     _paired_markdown(paired), ""]
        _write_rows(out / "paired.csv", ["method", "baseline", "measure", "pairs", "mean_diff", "stderr", "better"],
                    [[p.variant, p.baseline, p.measure, p.n_pairs, p.mean_diff, p.stderr, p.n_better] for p in paired])
        files.append(out / "paired.csv")
    _write_rows(out / "runs.csv", ["run", "task", "method", "rank", "seed", "variant", "trainable_params",
                                   *MEASURES],
                [[str(r.path.relative_to(root)), r.task, r.method, r.rank, r.seed, r.variant,
                  r.metrics.get("trainable_params"), *(_num(r.final(m)) for m in MEASURES)] for r in runs])
    files.append(out / "runs.csv")
    if plots:
        made = [plot_curves(runs, m, out / f"{m}_vs_steps.png") for m in ("success", "train_loss", "val_action_error")]
        made += [plot_eva_ranks(runs, out / "eva_ranks.png"), plot_params_vs_success(runs, out / "params_vs_success.png")]
        pngs = [p for p in made if p is not None]
        files += pngs
        if pngs:
            sections += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    if tensorboard:
        tb = write_hparams(runs, out / "tb_hparams")
        if tb is not None:
            sections += [f"Tensorboard hparams view: `tensorboard --logdir {tb}`", ""]
    markdown = "\n".join(sections)
    (out / "report.md").write_text(markdown)
    files.insert(0, out / "report.md")
    return ReportResult(out, tuple(runs), tables, tuple(aggregates), tuple(paired), markdown, tuple(files))


def _failed_runs(root: Path, run_dirs: Iterable[str | Path] | None) -> list[Path]:
    failed = []
    for run_json in _run_files(root, "run.json", run_dirs):
        try:
            if json.loads(run_json.read_text()).get("status") == "failed":
                failed.append(run_json.parent)
        except json.JSONDecodeError:
            continue
    return failed


def _write_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if (isinstance(x, float) and not math.isfinite(x)) else x for x in row])


def summary_table(result: ReportResult) -> str:
    """The short table the quickstart prints: success, final training loss, held-out action error."""
    names = ("success", "train_loss", "val_action_error")
    header = "| method | runs | " + " | ".join(MEASURES[n].title for n in names) + " |"
    rows = [header, "|" + " --- |" * (len(names) + 2)]
    tables = result.tables
    for v in tables["success"].variants:
        count = sum(1 for r in result.runs if r.variant == v)  # runs without a final evaluation count too
        cells = [format_cell(_pooled(result.runs, v, n_), MEASURES[n_].digits) for n_ in names]
        rows.append(f"| {v} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pooled(runs: Sequence[RunRecord], variant: str, measure: str) -> Cell:
    return mean_stderr(r.final(measure) for r in runs if r.variant == variant)
