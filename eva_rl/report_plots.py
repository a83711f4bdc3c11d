"""The report's plots (PNG) and tensorboard hparams view, from runs read by `eva_rl.run_records`.

Curves are in the tables' terms: at each evaluated step (step 0 = the pretrained policy) the
mean over tasks, with a band of one standard error over seeds (`eva_rl.stats.suite_average`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from eva_rl.run_records import (DATA_SIZE_KEY, MEASURES, RunRecord, read_eva_ranks, run_value, series,
                                setting_columns, short_layer, size_text, variant_order)
from eva_rl.stats import mean_stderr, suite_average


def curve(runs: Sequence[RunRecord], measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, standard error) of one variant's curve, in the tables' terms: at each step
    the average over tasks and its standard error over seeds (`suite_average`), so the band shows
    seed-to-seed spread rather than how far apart the tasks lie."""
    curves = [(r, dict(series(r, measure))) for r in runs]
    steps = np.array(sorted({step for _, points in curves for step in points}), dtype=int)
    cells = [suite_average((r.unit, str(r.task), points.get(int(step))) for r, points in curves) for step in steps]
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
    curves = {v: curve([r for r in runs if r.variant == v], measure) for v in variant_order(runs)}
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
    ax.set_xticks(x + 0.4 - width / 2, [short_layer(layer) for layer in layers], rotation=90, fontsize=7)
    return _save_figure(fig, ax, path, "", "rank", "EVA rank allocation per layer (mean over runs)")


def plot_params_vs_success(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Trainable parameters (log x) vs success (mean +- stderr over task x seed runs), per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.kind == "finetune"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for v in variant_order(runs):
        mine = [r for r in runs if r.variant == v and r.metrics.get("trainable_params")]
        if not mine:
            continue
        params = float(np.mean([r.metrics["trainable_params"] for r in mine]))
        cell = mean_stderr(run_value(r, "success") for r in mine)
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


def plot_data_size(groups: Sequence[str], sizes: Sequence[Any], cells: dict, path: Path) -> Path | None:
    """Final success against training episodes per task, per method (mean over tasks ± standard
    error over seeds; `data_size_table`'s cells); "all" sits at the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(sizes))
    for g in groups:
        found = [(i, cells[(g, "success", s)]) for i, s in enumerate(sizes) if (g, "success", s) in cells]
        if found:
            ax.errorbar([i for i, _ in found], [c.mean for _, c in found],
                        yerr=[c.stderr if math.isfinite(c.stderr) else 0.0 for _, c in found],
                        marker="o", capsize=3, label=g)
    ax.set_xticks(x, [size_text(s) for s in sizes])
    return _save_figure(fig, ax, path, f"fine-tuning episodes per task ({DATA_SIZE_KEY})", "success rate",
                        "Success vs fine-tuning data\n(mean over tasks ± standard error over seeds)")


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
    """One tensorboard hparams entry per run: its grid point, the settings that differ between
    runs, and its final measures."""
    runs = [r for r in runs if r.kind == "finetune"]
    if not runs:
        return None
    columns = setting_columns(runs)
    from torch.utils.tensorboard import SummaryWriter

    if log_dir.is_dir():
        shutil.rmtree(log_dir)  # regenerated from the runs each time; stale entries would show twice
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for r in runs:
            hparams: dict[str, Any] = {"task": str(r.task), "seed": r.seed, "method": str(r.method)}
            if r.replicate:
                hparams["model"] = r.replicate
            for key, value in {**r.point, **{k: r.settings[k] for k in columns if k in r.settings}}.items():
                hparams[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
            final = {f"final/{m}": run_value(r, m) for m in MEASURES if math.isfinite(run_value(r, m))}
            final["final/trainable_params"] = float(r.metrics.get("trainable_params") or 0)
            # task (and tree) in the name: run folders are named alike across tasks
            writer.add_hparams(hparams, final, run_name="/".join(filter(None, (r.replicate, str(r.task), r.path.name))))
    return log_dir


