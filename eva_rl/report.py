"""Tables and plots from a directory of runs: `eva-rl report RUNS_DIR`.

Reads every `metrics.json` under a directory (`eva_rl.run_records`: the layout
`eva_rl.experiment` writes, or any tree of fine-tuning runs), and writes, into `RUNS_DIR/report/`:

- a header with the evaluation protocol (seed, episodes, target returns) and what older runs lack;
- the paper's table shape for success, return, final training loss, held-out action error and
  the success curve's area: methods as rows (the pretrained policy at step 0 first, as `base`),
  tasks as columns, mean +- standard error over seeds, the suite average, and for success the
  episode-level Wilson 95% interval beside it; each table says how many tasks, seeds and
  episodes it rests on and warns below 3 seeds (markdown in `report.md`, one CSV per measure);
- per task, the lowest and highest final success over the methods, and whether every method is
  at >= 0.95 (saturated) or <= 0.05 (floored), where success cannot tell them apart (`task_spread.csv`);
- IQM and mean with stratified-bootstrap 95% CIs across tasks x seeds (`aggregate.csv`);
- paired differences of every method to `lora` and to `fft` over the (task, seed) pairs both
  ran, for final success, curve area, steps to a fraction of final success, loss and held-out
  error, each with its minimum detectable difference `mde80`, the paired t-test's 95% interval and
  p-value (`paired.csv`); for success, the
  variance of the pairs split into episode, seed and task parts, and the grid an MDE of 0.05 needs;
- `success_curve.csv` (one row per run and evaluation step), `runs.csv` (one row per run, one
  column per setting that differs between runs), EVA's ranks per layer, data-size tables when
  `train.data.episodes` varies;
- PNG plots: each measure vs fine-tuning steps per method (mean over tasks ± standard error over
  seeds), success vs data size, EVA's rank per layer, trainable parameters vs success; and a
  tensorboard hparams view (`tb_hparams/`).

The statistics (standard errors, IQM, bootstrap, Wilson intervals, power) come from `eva_rl.stats`.
Reading runs is `eva_rl.run_records`; the numbers `eva_rl.report_tables`; plots `eva_rl.report_plots`;
this module writes the document.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from eva_rl.report_plots import (curve, plot_curves, plot_data_size, plot_eva_ranks, plot_params_vs_success,
                                 write_hparams)
from eva_rl.report_tables import (BASE, FLOORED, MDE_TARGET, SATURATED, Aggregate, Paired, Resolution, Table,
                                  TaskSpread, aggregate_scores, data_size_table, format_cell, matched_pairs,
                                  metric_table, paired_comparisons, resolutions, csv_number, task_spreads, write_rows)
from eva_rl.run_records import (DATA_SIZE_KEY, DEFAULT_FRACTION, MEASURES, METHOD_ORDER, TABLE_MEASURES, Measure,
                                RunRecord, load_replicates, load_runs, read_eva_ranks, read_eva_report, run_files,
                                run_value, replicate_settings, setting_columns, short_layer, size_text, value_text,
                                variant_order)
from eva_rl.stats import iqm, mean_stderr, stratified_bootstrap_ci, suite_average
from eva_rl.storage import write_text_atomic

# Names other code reaches through eva_rl.report (the report's readers, statistics and plots).
__all__ = ["METHOD_ORDER", "MEASURES", "Measure", "RunRecord", "load_runs", "read_eva_ranks", "mean_stderr", "iqm",
           "stratified_bootstrap_ci", "suite_average", "curve", "plot_curves", "BASE", "Table", "Aggregate", "Paired",
           "Resolution", "TaskSpread", "task_spreads", "metric_table", "aggregate_scores", "matched_pairs",
           "paired_comparisons", "resolutions", "data_size_table", "format_cell", "write_report", "summary_table"]

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
    resolutions: tuple[Resolution, ...] = ()


# --- report sections -------------------------------------------------------------------------------

def protocol_lines(runs: Sequence[RunRecord]) -> list[str]:
    """The evaluation protocol(s) of the runs, and how many runs did not record one."""
    protocols: dict[str, dict] = {}
    targets: dict[str, set[float]] = {}
    for r in runs:
        p = dict(r.metrics.get("eval_protocol") or {})
        if not p:
            continue
        for task, value in (p.pop("target_returns", None) or {}).items():
            targets.setdefault(str(task), set()).add(float(value))
        protocols.setdefault(json.dumps(p, sort_keys=True), p)
    lines = []
    if len(protocols) > 1:
        lines.append("**The runs were evaluated under different protocols:**")
    for p in protocols.values():
        steps = ", ".join(str(s) for s in p.get("steps") or []) or "not recorded"
        lines.append(f"Evaluation protocol: seed {p.get('seed')}, {p.get('episodes')} episodes per task on "
                     f"{p.get('num_envs')} envs, horizon {p.get('horizon')}, at fine-tuning steps {steps}.")
    if targets:
        lines.append("Target returns: " + ", ".join(
            f"{t} {'/'.join(f'{v:g}' for v in sorted(vs))}" for t, vs in sorted(targets.items())) + ".")
    missing = sum(1 for r in runs if not r.metrics.get("eval_protocol"))
    if missing:
        lines.append(f"{missing} of {len(runs)} runs predate the recorded evaluation protocol (no eval_protocol in "
                     f"metrics.json).")
    return lines


def missing_lines(runs: Sequence[RunRecord]) -> list[str]:
    """What older runs lack, said once, so a missing row or interval is not a mystery."""
    lines = []
    no_base = sum(1 for r in runs if r.evaluation(0) is None)
    if no_base:
        consequence = ("no base row, and curve areas span the evaluated steps only" if no_base == len(runs)
                       else f"the base row rests on the other {len(runs) - no_base}")
        lines.append(f"{no_base} of {len(runs)} runs have no step-0 evaluation (recorded since the base policy "
                     f"is evaluated before the first update): {consequence}.")
    no_counts = sum(1 for r in runs if r.episode_counts() is None)
    if no_counts:
        lines.append(f"{no_counts} of {len(runs)} runs record no per-task episode counts: no Wilson interval "
                     f"and no episode-sampling variance from them.")
    return lines


def basis_lines(table: Table, runs: Sequence[RunRecord], *, episodes: bool) -> list[str]:
    """How many tasks, seeds (and evaluation episodes) a table rests on; a warning below 3 seeds."""
    seeds = {v: max((c.n for (w, _), c in table.cells.items() if w == v), default=0)
             for v in table.variants if v != BASE}
    seeds = {v: n for v, n in seeds.items() if n}
    if not seeds:
        return []
    low, high = min(seeds.values()), max(seeds.values())
    trees = len({r.replicate for r in runs})
    text = (f"Rests on {len(table.tasks)} tasks × {low if low == high else f'{low}-{high}'} seeds per cell"
            + (f" (the seeds of all {trees} run trees)" if trees > 1 else ""))
    if episodes:
        counts = sorted({c[1] for r in runs if (c := r.episode_counts())})
        text += (f" × {'/'.join(map(str, counts))} evaluation episodes per task and run" if counts
                 else " × an unrecorded number of evaluation episodes")
    lines = [text + "."]
    few = [v for v, n in seeds.items() if n < 3]
    if few:
        wilson = "; the bracketed Wilson interval is episode sampling alone" if table.episodes else ""
        lines.append(f"**Warning: fewer than 3 seeds** for {', '.join(few)}: their ± is a standard error from "
                     f"1-2 values (blank with one){wilson}.")
    return lines


def eva_rank_lines(runs: Sequence[RunRecord]) -> list[str]:
    """Per EVA variant: rank and explained variance kept per layer (mean over runs), and whether
    rank redistribution (rho > 1) moved any rank away from the uniform r."""
    reports: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        data = read_eva_report(r.path)
        if data:
            reports.setdefault(r.variant, []).append(data)
    lines: list[str] = []
    for variant, found in reports.items():
        layers = list(dict.fromkeys(layer for d in found for layer in d["ranks"]))
        lines += [f"### {variant} ({len(found)} runs)", "",
                  "| layer | rank | explained variance of the kept components |", "| --- | --- | --- |"]
        for layer in layers:
            ranks = [int(d["ranks"].get(layer, 0)) for d in found]
            kept = [float(sum((d.get("explained_variance_ratio") or {}).get(layer, [])[:rank]))
                    for d, rank in zip(found, ranks)]
            lines.append(f"| {short_layer(layer)} | {np.mean(ranks):g} | {np.mean(kept):.3f} |")
        lines.append("")
        rhos = sorted({float(d.get("rho", 1.0)) for d in found})
        uniform = all(set(map(int, d["ranks"].values())) == {int(d.get("rank", -1))} for d in found)
        if max(rhos) > 1 and uniform:
            lines += [f"Rank redistribution changed nothing for {variant}: rho = {'/'.join(f'{x:g}' for x in rhos)} "
                      f"offered more components, yet every layer kept the uniform rank in every run.", ""]
        elif max(rhos) > 1:
            all_ranks = [int(v) for d in found for v in d["ranks"].values()]
            lines += [f"Rank redistribution (rho = {'/'.join(f'{x:g}' for x in rhos)}) gave ranks "
                      f"{min(all_ranks)}-{max(all_ranks)} (uniform: {'/'.join(str(d.get('rank')) for d in found[:1])}).",
                      ""]
    return lines


def task_spread_lines(spreads: Sequence[TaskSpread]) -> list[str]:
    """Which tasks can tell the methods apart on final success: the spread of the methods per task."""
    if not spreads:
        return []
    lines = ["### Which tasks can tell the methods apart", "",
             f"Per task, the lowest and highest mean final success over the methods (the base row aside). On a "
             f"task where every method scores ≥ {SATURATED:g} (saturated) or ≤ {FLOORED:g} (floored), success "
             f"cannot tell them apart: such tasks add pairs whose differences are episode noise around 0 to the "
             f"paired comparisons below.", "",
             "| task | base | lowest | highest | verdict |", "| --- | --- | --- | --- | --- |"]
    for s in spreads:
        base = "" if s.base is None else f"{s.base:.2f}"
        if s.lowest == s.highest:  # no method to name: they all scored the same
            low = high = f"{s.lowest:.2f} (all)"
        else:
            low, high = f"{s.lowest:.2f} ({s.lowest_variant})", f"{s.highest:.2f} ({s.highest_variant})"
        lines.append(f"| {s.task} | {base} | {low} | {high} | {s.verdict} |")
    dead = [s for s in spreads if s.verdict != "informative"]
    named = "; ".join(f"{s.task} ({s.verdict})" for s in dead)
    lines += ["", f"{len(spreads) - len(dead)} of {len(spreads)} tasks are informative on final success"
              + (f"; {len(dead)} {'is' if len(dead) == 1 else 'are'} not: {named}." if dead else "."), ""]
    return lines


def data_size_lines(groups: Sequence[str], sizes: Sequence[Any], cells: dict) -> list[str]:
    lines = [f"Mean over tasks ± standard error over seeds, against `{DATA_SIZE_KEY}` (episodes per task).", ""]
    for measure in ("success", "success_auc", "train_loss", "val_action_error"):
        digits = MEASURES[measure].digits
        lines += [f"**{MEASURES[measure].title}**", "",
                  "| method | " + " | ".join(size_text(s) for s in sizes) + " |", "|" + " --- |" * (len(sizes) + 1)]
        lines += [f"| {g} | " + " | ".join(format_cell(cells.get((g, measure, s)), digits) for s in sizes) + " |"
                  for g in groups]
        lines.append("")
    return lines


def _aggregate_markdown(aggregates: Sequence[Aggregate]) -> str:
    rows = ["| method | measure | runs | tasks | mean [95% CI] | IQM [95% CI] |", "| --- | --- | --- | --- | --- | --- |"]
    for a in aggregates:
        d = MEASURES[a.measure].digits
        rows.append(f"| {a.variant} | {a.measure} | {a.n_runs} | {a.n_tasks} | "
                    f"{a.mean:.{d}f} [{a.mean_ci[0]:.{d}f}, {a.mean_ci[1]:.{d}f}] | "
                    f"{a.iqm:.{d}f} [{a.iqm_ci[0]:.{d}f}, {a.iqm_ci[1]:.{d}f}] |")
    return "\n".join(rows)


def _paired_markdown(paired: Sequence[Paired], *, pooled: bool = False) -> str:
    """The paired table; pooled run trees add the models and the MDE over models, and rows of one
    tree (`Paired.model`) name it."""
    grid = "tasks × seeds × models" if pooled else "tasks × seeds"
    extra = " mde80 over models | 95% CI over models | p over models |" if pooled else ""
    per_tree = any(p.model for p in paired)
    rows = [f"| method | vs | measure |{' model |' if per_tree else ''} pairs ({grid}) | "
            f"difference ± stderr | mde80 | 95% CI | p |{extra} verdict | better in |"]
    rows.append("|" + " --- |" * (rows[0].count("|") - 1))
    for p in paired:
        d = MEASURES[p.measure].digits
        err = f" ± {p.stderr:.{d}f}" if math.isfinite(p.stderr) else ""
        model = f" {p.model} |" if per_tree else ""
        size = f"{p.n_tasks} × {p.n_seeds}" + (f" × {p.models}" if pooled else "")
        over_models = (f" {_number(p.between.mde80, d)} | {_interval(p.between.ci95, d)} | {_p(p.between.p_value)} |"
                       if pooled else "")
        rows.append(f"| {p.variant} | {p.baseline} | {p.measure} |{model} {p.n_pairs} ({size}) | "
                    f"{p.mean_diff:+.{d}f}{err} | {_number(p.mde80, d)} | {_interval(p.ci95, d)} | {_p(p.p_value)} |"
                    f"{over_models} {p.verdict} | {p.n_better}/{p.n_pairs} |")
    return "\n".join(rows)


def _interval(ci: tuple[float, float], digits: int) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if all(map(math.isfinite, ci)) else "–"


def _p(p_value: float) -> str:
    return "–" if not math.isfinite(p_value) else "< 0.001" if p_value < 0.001 else f"{p_value:.3f}"


def _number(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "–"


def _resolution_markdown(found: Sequence[Resolution]) -> str:
    pooled = any(res.parts.models > 1 for res in found)
    grid = "tasks × seeds × episodes" + (" × models" if pooled else "")
    models = " model | task × model |" if pooled else ""
    rows = [f"| method | vs | {grid} | mde80 | SD per pair | episode | seed | task |{models} "
            f"projected MDE | an MDE of {MDE_TARGET} needs |"]
    rows.append("|" + " --- |" * (rows[0].count("|") - 1))

    def sd(variance: float) -> str:
        return f"{math.sqrt(variance):.3f}" if math.isfinite(variance) else "–"

    for res in found:
        p, parts = res.paired, res.parts
        needs = "; ".join(f"{axis}: " + ("unreachable" if grid is None else " × ".join(map(str, grid)))
                          for axis, grid in res.grids.items())
        size = f"{parts.tasks} × {parts.seeds:g} × {parts.episodes}" + (f" × {parts.models}" if pooled else "")
        one = parts.models == 1  # a comparison only one tree ran: no model parts to show
        model = f" {'–' if one else sd(parts.model)} | {'–' if one else sd(parts.interaction)} |" if pooled else ""
        rows.append(f"| {p.variant} | {p.baseline} | {size} | {p.mde80:.3f} | {sd(parts.total)} | {sd(parts.episode)} | "
                    f"{sd(parts.run)} | {sd(parts.task)} |{model} {res.projected:.3f} | {needs} |")
    return "\n".join(rows)


def run_trees(runs_dir: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """{name: folder} of `write_report`'s runs_dir: {"": folder} for one tree (a mapping of one
    too); several need distinct non-empty names and distinct folders (one folder twice would
    pass for two pretrained models)."""
    if not isinstance(runs_dir, Mapping):
        return {"": Path(runs_dir)}
    trees = {str(name): Path(path) for name, path in runs_dir.items()}
    if not trees:
        raise ValueError("write_report needs a runs directory, or a mapping of names to run trees.")
    if len(trees) == 1:
        return {"": next(iter(trees.values()))}
    if any(not name.strip() for name in trees):
        raise ValueError(f"Every pooled run tree needs a name; got {list(trees)}. Name each, e.g. "
                         f"{{'a': 'runs/x', 'b': 'runs/y'}}.")
    folders: dict[Path, str] = {}
    for name, path in trees.items():
        other = folders.setdefault(path.resolve(), name)
        if other != name:
            raise ValueError(f"Run trees {other!r} and {name!r} are the same folder {str(path)!r}: counted twice it "
                             f"would pass for two pretrained models. Give each folder once.")
    return trees


def pooled_lines(trees: Mapping[str, Path], runs: Sequence[RunRecord]) -> list[str]:
    """What a report pooled over several run trees rests on: each tree, and every setting that
    differs between them (the pretrained checkpoint at least), with its value per tree."""
    lines = ["## Pooled run trees", "",
             f"{len(trees)} run trees of the same grid, each taken as one pretrained model: runs pair only within "
             f"their tree, a table cell's seeds are the seeds of every tree, and the paired rows pool the pairs of "
             f"every tree (what holds on these {len(trees)} models; `mde80`). `mde80 over models` treats the trees "
             f"as a sample of pretrained models: the t-based MDE of their {len(trees)} mean differences "
             f"({len(trees) - 1} degree{'s' if len(trees) > 2 else ''} of freedom).", "",
             "| model | runs | folder |", "| --- | --- | --- |"]
    lines += [f"| {name} | {sum(1 for r in runs if r.replicate == name)} | {root} |" for name, root in trees.items()]
    keys = replicate_settings(runs)
    lines += ["", "Settings that differ between the trees: " + (", ".join(f"`{k}`" for k in keys) if keys else
                                                                 "none recorded") + ".", ""]
    for key in keys:
        values = {name: sorted({_short(value_text(r.settings.get(key))) for r in runs if r.replicate == name})
                  for name in trees}
        lines.append(f"- `{key}`: " + "; ".join(f"{name} {' / '.join(v)}" for name, v in values.items()))
    return lines + [""] if keys else lines


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- the report ----------------------------------------------------------------------------------

def write_report(runs_dir: str | Path | Mapping[str, str | Path], out_dir: str | Path | None = None, *,
                 n_bootstrap: int = 2000, seed: int = 0, plots: bool = True, tensorboard: bool = True,
                 run_dirs: Iterable[str | Path] | None = None, fraction: float = DEFAULT_FRACTION) -> ReportResult:
    """Write report.md, CSVs, PNG plots and a tensorboard hparams view for the runs in `runs_dir`
    (only those in `run_dirs` when given). `fraction`: the share of its final success whose
    first evaluated step a run's `steps_to_fraction` records.

    runs_dir may map names to several run trees of the same grid, each with its own pretrained
    model ({"intel": "runs/a", "zen4": "runs/b"}): the report pools them (`load_replicates`), names
    what differs between them, and gives the paper's claims per tree; out_dir is then required.
    out_dir defaults to `runs_dir/report`. Raises FileNotFoundError when no fine-tuning run
    has a metrics.json yet.
    """
    trees = run_trees(runs_dir)
    pooled = len(trees) > 1
    if pooled and (out_dir is None or run_dirs is not None):
        raise ValueError("A report over several run trees needs out_dir (it has no single runs_dir to write into) "
                         "and takes no run_dirs.")
    run_dirs = None if run_dirs is None else list(run_dirs)  # read twice: runs, then failed runs
    root = next(iter(trees.values()))
    runs = (load_replicates(trees, fraction=fraction) if pooled
            else load_runs(root, run_dirs=run_dirs, fraction=fraction))
    empty = [name for name in trees if not any(r.replicate == name for r in runs)]
    if empty:
        raise FileNotFoundError(
            f"No fine-tuning metrics.json under {str(trees[empty[0]])!r}"
            + (f" (run tree {empty[0]!r})" if pooled else "") + ". Run `eva-rl experiment CONFIG` (or "
            f"`eva-rl finetune`) first, and pass the directory that holds the runs.")
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    title = (f"pooled over {len(trees)} run trees ({', '.join(trees)})" if pooled else str(root))
    sections = [f"# Report: {title}", "",
                f"{len(runs)} fine-tuning runs; cells are mean ± standard error over seeds, and for success the "
                f"episode-level Wilson 95% interval (episodes pooled over seeds) in brackets; the average is the "
                f"mean over tasks; `{BASE}` is the pretrained policy before any update. Steps to fraction: the "
                f"first evaluated step reaching {fraction:g} of the run's final success.", ""]
    sections += [line + "\n" for line in protocol_lines(runs) + missing_lines(runs)]
    if pooled:
        sections += pooled_lines(trees, runs)
    failed = [(name, path) for name, tree in trees.items() for path in _failed_runs(tree, run_dirs)]
    if failed:
        sections += [f"**{len(failed)} runs failed** (see error.txt in each): "
                     + ", ".join(str(path.relative_to(trees[name])) + (f" ({name})" if name else "")
                                 for name, path in failed), ""]
    tables = {m: metric_table(runs, m) for m in TABLE_MEASURES}
    for name, table in tables.items():
        if not table.cells:
            continue
        basis = basis_lines(table, runs, episodes=name in ("success", "return", "score", "success_auc"))
        sections += [f"## {MEASURES[name].title}", "", *(line + "\n" for line in basis), table.to_markdown(), ""]
        table.to_csv(out / f"{name}.csv")
        files.append(out / f"{name}.csv")
        if name == "success":
            spreads = task_spreads(table)
            sections += task_spread_lines(spreads)
            write_rows(out / "task_spread.csv", ["task", "base", "lowest", "lowest_method", "highest", "highest_method",
                                                  "verdict"],
                       [[s.task, "" if s.base is None else s.base, s.lowest, s.lowest_variant, s.highest,
                         s.highest_variant, s.verdict] for s in spreads])
            files.append(out / "task_spread.csv")
    aggregates = [a for m in TABLE_MEASURES for a in aggregate_scores(runs, m, n_bootstrap=n_bootstrap, seed=seed)]
    sections += ["## Aggregates over tasks x seeds (stratified bootstrap 95% CI)", "", _aggregate_markdown(aggregates), ""]
    write_rows(out / "aggregate.csv", ["method", "measure", "runs", "tasks", "mean", "mean_ci_low", "mean_ci_high",
                                        "iqm", "iqm_ci_low", "iqm_ci_high"],
                [[a.variant, a.measure, a.n_runs, a.n_tasks, a.mean, *a.mean_ci, a.iqm, *a.iqm_ci] for a in aggregates])
    files.append(out / "aggregate.csv")
    paired = paired_comparisons(runs)
    found = resolutions(runs, paired)
    if paired:
        sections += _paired_sections(paired, found, pooled=pooled)
        models = (["model", "models", "model_sd", "mde80_models", "ci95_models_low", "ci95_models_high",
                   "p_value_models"] if pooled else [])
        write_rows(out / "paired.csv", ["method", "baseline", "measure", *models, "pairs", "tasks", "seeds",
                                         "episodes", "mean_diff", "stderr", "sd", "mde80", "ci95_low", "ci95_high",
                                         "p_value", "verdict", "better"],
                    [[p.variant, p.baseline, p.measure, *([p.model, p.models, p.between.sd, p.between.mde80,
                                                           *p.between.ci95, p.between.p_value] if pooled else []),
                      p.n_pairs, p.n_tasks, p.n_seeds, p.episodes, p.mean_diff, p.stderr, p.sd, p.mde80, *p.ci95,
                      p.p_value, p.verdict, p.n_better] for p in paired])
        files.append(out / "paired.csv")
    groups, sizes, size_cells = data_size_table(runs)
    if size_cells:
        sections += ["## Fine-tuning data size", "", *data_size_lines(groups, sizes, size_cells)]
    eva_lines = eva_rank_lines(runs)
    if eva_lines:
        sections += ["## EVA ranks per layer (mean over runs)", "", *eva_lines]
    files += [_write_runs_csv(out / "runs.csv", runs, trees), _write_curve_csv(out / "success_curve.csv", runs, trees)]
    if plots:
        made = [plot_curves(runs, m, out / f"{m}_vs_steps.png") for m in ("success", "train_loss", "val_action_error")]
        made += [plot_data_size(groups, sizes, size_cells, out / "success_vs_data_size.png"),
                 plot_eva_ranks(runs, out / "eva_ranks.png"), plot_params_vs_success(runs, out / "params_vs_success.png")]
        pngs = [p for p in made if p is not None]
        files += pngs
        if pngs:
            sections += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    if tensorboard:
        tb = write_hparams(runs, out / "tb_hparams")
        if tb is not None:
            sections += [f"Tensorboard hparams view: `tensorboard --logdir {tb}`", ""]
    markdown = "\n".join(sections)
    write_text_atomic(out / "report.md", markdown)
    files.insert(0, out / "report.md")
    return ReportResult(out, tuple(runs), tables, tuple(aggregates), tuple(paired), markdown, tuple(files),
                        tuple(found))


def _paired_sections(paired: Sequence[Paired], found: Sequence[Resolution], *, pooled: bool = False) -> list[str]:
    per_model = [p for p in paired if p.model]
    paired = [p for p in paired if not p.model]
    sections = ["## Paired differences (method − baseline over the same task × seed)", "",
                "Success, curve area and normalised score: higher is better; steps to fraction, training loss and "
                "held-out action "
                "error: lower is better. `mde80`: the smallest true difference these pairs detect with 80% power "
                "at 5% two-sided (t-based, from the SD of the paired differences; `eva_rl.stats`); a difference "
                "below it is not resolved by this grid, whatever its sign. `95% CI` and `p`: the paired t-test's "
                "interval and two-sided p-value; a difference can fall between the 5% threshold and the MDE "
                "(p < 0.05, yet below the MDE): evidence of a difference the grid had under 80% power to detect, "
                "one test among the many of this table.", "", _paired_markdown(paired, pooled=pooled),
                ""]
    if per_model:
        sections += ["### The paper's claims per pretrained model", "",
                     "Each run tree's own pairs: when the trees disagree beyond their MDEs, the pooled row above "
                     "averages over a model-to-model difference rather than measuring one effect.", "",
                     _paired_markdown(per_model), ""]
    below = [p for p in paired if p.measure == "success" and p.verdict == "below the MDE"]
    if below:
        sections += ["Below the MDE (final success): " + "; ".join(
            f"{p.variant} vs {p.baseline} {p.mean_diff:+.3f} < {p.mde80:.3f}" for p in below)
            + ". These grids cannot reliably tell these methods apart (their p-values are in the table).", ""]
    if found:
        sections += ["### What the success comparisons can resolve", "",
                     "The variance of the paired success differences split into episode sampling (from each "
                     "run's per-episode successes on the shared starts), run to run (seed) and task to task, "
                     "as SDs; the projected MDE of the suite-average difference treats tasks as a sample too, "
                     "so seeds and episodes alone cannot take it below the task term. The last column gives the "
                     f"smallest grid (tasks × seeds × episodes) reaching an MDE of {MDE_TARGET}, growing one axis "
                     "of the current grid at a time (`eva_rl.stats.grids_for_mde` computes it for any grid). The parts "
                     "are estimated separately (negative estimates clipped to 0), so with few pairs they need not "
                     "add up to the observed SD, nor the projected MDE equal `mde80`."
                     + (" With pooled run trees, model to model is the spread of the trees' suite-average "
                        "differences beyond their noise and task × model how differently the trees rank the tasks "
                        "(two-way mean squares over the tasks every tree ran; with one seed per cell the latter "
                        "also holds the seed part); the grids gain a models axis, whose projection uses the "
                        "pairs' degrees of freedom and so is optimistic next to `mde80 over models`." if pooled else ""),
                     "", _resolution_markdown(found), ""]
    return sections


def _identity(r: RunRecord, trees: Mapping[str, Path]) -> list[Any]:
    """A run's first columns: (model, when trees are pooled,) its folder in its tree, task, method, rank, seed, row."""
    model = [r.replicate] if len(trees) > 1 else []
    return [*model, str(r.path.relative_to(trees[r.replicate])), r.task, r.method, r.rank, r.seed, r.variant]


def _identity_header(trees: Mapping[str, Path]) -> list[str]:
    return [*(["model"] if len(trees) > 1 else []), "run", "task", "method", "rank", "seed", "variant"]


def _write_runs_csv(path: Path, runs: Sequence[RunRecord], trees: Mapping[str, Path]) -> Path:
    """One row per run: identity, every setting that differs between runs (by dotted key), measures."""
    columns = setting_columns(runs)
    write_rows(path, [*_identity_header(trees), *columns, "trainable_params", *MEASURES, "episodes"],
                [[*_identity(r, trees),
                  *(value_text(r.settings[k]) if r.settings.get(k) is not None else "" for k in columns),
                  r.metrics.get("trainable_params"), *(csv_number(run_value(r, m)) for m in MEASURES),
                  (r.episode_counts() or ("", ""))[1]] for r in runs])
    return path


def _write_curve_csv(path: Path, runs: Sequence[RunRecord], trees: Mapping[str, Path]) -> Path:
    """One row per run and evaluation step (step 0 = the base policy when recorded)."""
    rows = []
    for r in runs:
        for e in sorted(r.metrics.get("eval") or [], key=lambda e: int(e.get("step", 0))):
            counts = r.episode_counts(int(e["step"])) or ("", "", None)
            rows.append([*_identity(r, trees), int(e["step"]), e.get("success_rate"), e.get("success_stderr"),
                         e.get("return_mean"), counts[0], counts[1]])
    write_rows(path, [*_identity_header(trees), "step", "success_rate", "success_stderr", "return_mean", "successes",
                       "episodes"], rows)
    return path


def _failed_runs(root: Path, run_dirs: Iterable[str | Path] | None) -> list[Path]:
    failed = []
    for run_json in run_files(root, "run.json", run_dirs):
        try:
            if json.loads(run_json.read_text()).get("status") == "failed":
                failed.append(run_json.parent)
        except json.JSONDecodeError:
            continue
    return failed


def summary_table(result: ReportResult) -> str:
    """The short table the quickstart prints: success, final training loss, held-out action error."""
    names = ("success", "train_loss", "val_action_error")
    header = "| method | runs | " + " | ".join(MEASURES[n].title for n in names) + " |"
    rows = [header, "|" + " --- |" * (len(names) + 2)]
    for v in variant_order(result.runs):
        count = sum(1 for r in result.runs if r.variant == v)  # runs without a final evaluation count too
        cells = [format_cell(mean_stderr(run_value(r, n_) for r in result.runs if r.variant == v), MEASURES[n_].digits)
                 for n_ in names]
        rows.append(f"| {v} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
