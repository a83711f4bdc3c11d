"""Report tables, statistics and plots from hand-made metrics.json files (exact numbers)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import trim_mean

from eva_rl import report
from eva_rl.report import (aggregate_scores, load_runs, mean_stderr, metric_table, paired_comparisons,
                           stratified_bootstrap_ci, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (method, task, seed) -> (success, train loss, held-out action error)
FINALS = {
    ("lora", "task-a", 0): (0.5, 0.40, 0.30), ("lora", "task-a", 1): (0.7, 0.20, 0.10),
    ("lora", "task-b", 0): (0.2, 0.50, 0.50), ("lora", "task-b", 1): (0.4, 0.30, 0.30),
    ("eva", "task-a", 0): (0.6, 0.30, 0.20), ("eva", "task-a", 1): (0.8, 0.10, 0.10),
    ("eva", "task-b", 0): (0.3, 0.40, 0.40), ("eva", "task-b", 1): (0.3, 0.20, 0.20),
    ("fft", "task-a", 0): (1.0, 0.05, 0.05),
}


def write_run(root: Path, method: str, task: str, seed: int, success: float, loss: float, error: float,
              *, rank: int | None = 8, point: dict | None = None, params: int = 1000) -> Path:
    run_dir = root / f"{task}__{method}__s{seed}" if point is None else root / "__".join(f"{k}={v}" for k, v in point.items())
    run_dir.mkdir(parents=True)
    steps = [0, 50, 100]
    metrics = {
        "kind": "finetune", "task": task, "method": method, "rank": None if method == "fft" else rank, "seed": seed,
        "trainable_params": params, "total_params": 100_000, "train_seconds": 1.0, "eva_seconds": None,
        "train_loss": [[s, loss * (3 - i)] for i, s in enumerate(steps)],
        "val_action_error": [[s, error * (3 - i)] for i, s in enumerate(steps)],
        "eval": [{"step": s, "success_rate": success * i / 2, "success_stderr": 0.1, "return_mean": 100 * success * i,
                  "return_stderr": 1.0} for i, s in enumerate(steps)],
        "final": {"success_rate": success, "success_stderr": 0.1, "return_mean": 1000 * success, "return_stderr": 5.0,
                  "train_loss": loss, "val_action_error": error},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if point is not None:
        (run_dir / "run.json").write_text(json.dumps({"point": point, "status": "done"}))
    return run_dir


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    for (method, task, seed), (success, loss, error) in FINALS.items():
        write_run(tmp_path, method, task, seed, success, loss, error,
                  params={"fft": 100_000, "lora": 2000, "eva": 2000}[method])
    # runs moved aside by --overwrite are not rows either
    write_run(tmp_path / "task-a" / "_replaced", "lora", "task-a", 0, 0.0, 9.0, 9.0)
    # a pretraining run in the same tree is not a table row
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.json").write_text(json.dumps({"kind": "pretrain", "seed": 0, "final": {}}))
    return tmp_path


def test_table_cells_are_mean_and_stderr_over_seeds(runs_dir: Path) -> None:
    runs = load_runs(runs_dir)
    assert len(runs) == 9
    table = metric_table(runs, "success")
    assert table.variants == ("fft", "lora", "eva")  # the paper's row order
    assert table.tasks == ("task-a", "task-b")
    a = table.cells[("lora", "task-a")]
    assert a.n == 2 and a.mean == pytest.approx(0.6) and a.stderr == pytest.approx(0.1)
    assert table.cells[("eva", "task-b")].stderr == pytest.approx(0.0)
    avg = table.average["lora"]
    # both tasks ran seeds 0 and 1: per-seed suite averages 0.35 and 0.55 -> stderr 0.1 over seeds
    assert avg.mean == pytest.approx(0.45) and avg.stderr == pytest.approx(0.1)
    assert table.average["eva"].mean == pytest.approx(0.5)
    fft = table.cells[("fft", "task-a")]
    assert fft.n == 1 and math.isnan(fft.stderr) and ("fft", "task-b") not in table.cells
    markdown = table.to_markdown()
    assert "| lora | 0.60 ± 0.10 | 0.30 ± 0.10 | 0.45 ± 0.10 |" in markdown
    assert "| fft | 1.00 | – | 1.00 |" in markdown
    returns = metric_table(runs, "return")
    assert returns.cells[("eva", "task-a")].mean == pytest.approx(700.0)


def test_suite_error_of_an_unfinished_grid_combines_task_errors(runs_dir: Path) -> None:
    write_run(runs_dir, "lora", "task-a", 2, 0.9, 0.1, 0.1)  # seed 2 ran task-a only
    avg = metric_table(load_runs(runs_dir), "success").average["lora"]
    a, b = mean_stderr([0.5, 0.7, 0.9]), mean_stderr([0.2, 0.4])
    assert avg.stderr == pytest.approx(math.sqrt(a.stderr ** 2 + b.stderr ** 2) / 2)


def test_iqm_and_stratified_bootstrap(runs_dir: Path) -> None:
    aggregates = {a.variant: a for a in aggregate_scores(load_runs(runs_dir), "success", n_bootstrap=500)}
    lora = aggregates["lora"]
    assert lora.n_runs == 4 and lora.n_tasks == 2
    assert lora.mean == pytest.approx(0.45)
    assert lora.iqm == pytest.approx(0.45)  # sorted 0.2 0.4 0.5 0.7 -> mean of 0.4, 0.5
    assert aggregates["eva"].iqm == pytest.approx(0.45)  # 0.3 0.3 0.6 0.8 -> mean of 0.3, 0.6
    assert lora.mean_ci[0] <= lora.mean <= lora.mean_ci[1] and lora.mean_ci[0] < lora.mean_ci[1]
    assert aggregates["fft"].mean_ci == pytest.approx((1.0, 1.0))
    # stratified: each resample keeps every task's own run count, so constant tasks stay constant
    groups = [np.array([0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0])]
    assert stratified_bootstrap_ci(groups, lambda s: s.mean(axis=1)) == pytest.approx((2 / 3, 2 / 3))
    x = np.arange(12.0)
    assert report.iqm(x) == pytest.approx(trim_mean(x, 0.25)) == pytest.approx(5.5)


def test_paired_differences_against_lora_and_fft(runs_dir: Path) -> None:
    paired = {(p.variant, p.baseline, p.measure): p for p in paired_comparisons(load_runs(runs_dir))}
    success = paired[("eva", "lora", "success")]
    assert success.n_pairs == 4
    assert success.mean_diff == pytest.approx(0.05) and success.stderr == pytest.approx(0.05)
    assert success.n_better == 3
    loss = paired[("eva", "lora", "train_loss")]
    assert loss.mean_diff == pytest.approx(-0.1) and loss.stderr == pytest.approx(0.0) and loss.n_better == 4
    error = paired[("eva", "lora", "val_action_error")]
    assert error.mean_diff == pytest.approx(-0.075) and error.n_better == 3
    # fft ran one (task, seed): a single pair, no stderr
    vs_fft = paired[("lora", "fft", "success")]
    assert vs_fft.n_pairs == 1 and vs_fft.mean_diff == pytest.approx(-0.5) and math.isnan(vs_fft.stderr)
    assert ("fft", "lora", "success") in paired and paired[("fft", "lora", "success")].n_pairs == 1


def test_ranks_become_rows_and_pairs_match_the_rank(tmp_path: Path) -> None:
    for rank, lora, eva in ((4, 0.2, 0.6), (8, 0.5, 0.5)):
        for method, success in (("lora", lora), ("eva", eva)):
            write_run(tmp_path, method, "task-a", 0, success, 0.1, 0.1, rank=rank,
                      point={"task": "task-a", "method": method, "rank": rank, "seed": 0})
    runs = load_runs(tmp_path)
    assert sorted(r.variant for r in runs) == ["eva r=4", "eva r=8", "lora r=4", "lora r=8"]
    paired = {(p.variant, p.measure): p for p in paired_comparisons(runs, baselines=("lora",))}
    assert paired[("eva r=4", "success")].mean_diff == pytest.approx(0.4)
    assert paired[("eva r=8", "success")].mean_diff == pytest.approx(0.0)


def test_a_rank_the_baseline_did_not_run_has_no_pairs(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "task-a", 0, 0.5, 0.1, 0.1, rank=8,
              point={"task": "task-a", "method": "lora", "rank": 8, "seed": 0})
    write_run(tmp_path, "eva", "task-a", 0, 0.9, 0.1, 0.1, rank=4,
              point={"task": "task-a", "method": "eva", "rank": 4, "seed": 0})
    write_run(tmp_path, "fft", "task-a", 0, 1.0, 0.1, 0.1, point={"task": "task-a", "method": "fft", "rank": None,
                                                                  "seed": 0})
    paired = {(p.variant, p.baseline) for p in paired_comparisons(load_runs(tmp_path))}
    assert ("eva r=4", "lora") not in paired  # rank 4 against rank 8 would mix method and capacity
    assert {("eva r=4", "fft"), ("lora r=8", "fft"), ("fft", "lora")} <= paired


def test_summary_counts_runs_without_a_final_evaluation(tmp_path: Path) -> None:
    for seed in (0, 1):
        run_dir = write_run(tmp_path, "lora", "task-a", seed, 0.5, 0.2, 0.1)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["eval"], metrics["final"]["success_rate"] = [], None  # evaluation was off
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    result = write_report(tmp_path, plots=False, tensorboard=False)
    assert "| lora | 2 | – | 0.2000 ± 0.0000 |" in report.summary_table(result)


def test_write_report_files_plots_and_hparams(runs_dir: Path) -> None:
    eva_run = runs_dir / "task-a__eva__s0"
    (eva_run / "eva_report.json").write_text(json.dumps({"ranks": {"encoder.h.0.attn.c_attn": 8, "encoder.h.0.mlp.c_fc": 4}}))
    result = write_report(runs_dir, n_bootstrap=200)
    out = runs_dir / "report"
    for name in ("report.md", "success.csv", "return.csv", "train_loss.csv", "val_action_error.csv",
                 "aggregate.csv", "paired.csv", "runs.csv"):
        assert (out / name).is_file(), name
    for name in ("success_vs_steps.png", "train_loss_vs_steps.png", "val_action_error_vs_steps.png",
                 "eva_ranks.png", "params_vs_success.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    with open(out / "success.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(rows["lora"]["task-a"]) == pytest.approx(0.6)
    assert float(rows["lora"]["task-a stderr"]) == pytest.approx(0.1)
    assert float(rows["eva"]["average"]) == pytest.approx(0.5)
    assert rows["fft"]["task-b"] == "" and rows["fft"]["task-a stderr"] == ""
    assert "## Paired differences" in result.markdown and "| eva | lora | success | 4 | +0.05 ± 0.05 | 3/4 |" in result.markdown
    assert list((out / "tb_hparams").rglob("events.out.tfevents.*"))
    assert report.read_eva_ranks(runs_dir / "task-b__eva__s0") is None
    table = report.summary_table(result)
    assert "| eva | 4 | 0.50 ± 0.12 |" in table


def test_a_report_of_a_subset_of_the_runs(runs_dir: Path) -> None:
    """cw10-cpu-lite's report in cw10-cpu's out_dir: only its own runs, in its own folder."""
    write_report(runs_dir, n_bootstrap=50, plots=False, tensorboard=False)  # report/ is never read as runs
    subset = [runs_dir / f"task-a__{m}__s{s}" for m in ("lora", "eva") for s in (0, 1)]
    result = write_report(runs_dir, runs_dir / "report-lite", n_bootstrap=50, plots=False, tensorboard=False,
                          run_dirs=subset)
    assert sorted(str(r.path) for r in load_runs(runs_dir, run_dirs=subset)) == sorted(map(str, subset))
    assert "4 fine-tuning runs" in result.markdown
    with open(runs_dir / "report-lite" / "success.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"lora", "eva"} and "task-b" not in rows["lora"]
    assert float(rows["lora"]["task-a"]) == pytest.approx(0.6)
    assert len(load_runs(runs_dir)) == len(FINALS)
    write_run(runs_dir / "report-lite", "lora", "task-c", 0, 0.0, 9.0, 9.0)  # a report folder is never runs
    assert len(load_runs(runs_dir)) == len(FINALS)


def test_an_experiment_reports_its_own_runs_into_its_report_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    """`eva-rl experiment cw10-cpu-lite.yaml` shares cw10-cpu's out_dir; its report holds its runs only."""
    import eva_rl.experiment as experiment
    from eva_rl.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "cw10-cpu"
    for (method, task, seed), (success, loss, error) in FINALS.items():
        write_run(out / "runs", method, task, seed, success, loss, error)
    mine = [f"task-b__{m}__s{s}" for m in ("lora", "eva") for s in (0, 1)]

    def fake_run(config, **kwargs):
        assert config.name == "cw10-cpu-lite"
        runs = tuple(experiment.JobResult(name, "skipped", 0.0) for name in mine)
        return experiment.ExperimentResult(out.resolve(), out / "pretrain" / "model", None, runs)

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    assert main(["experiment", "cw10-cpu-lite.yaml"]) == 0
    assert "Report: runs/cw10-cpu/report-lite/report.md" in capsys.readouterr().out
    with open(out / "report-lite" / "success.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"lora", "eva"} and "task-a" not in rows["lora"]
    assert float(rows["lora"]["task-b"]) == pytest.approx(0.3)
    assert not (out / "report").exists()


def test_curve_bands_are_over_seeds_of_the_task_average(tmp_path: Path) -> None:
    """Tasks far apart but seeds agreeing: the band is narrow (it is not the spread over runs)."""
    for seed, shift in ((0, 0.0), (1, 0.02)):
        write_run(tmp_path, "lora", "easy", seed, 0.9 + shift, 0.1, 0.1)
        write_run(tmp_path, "lora", "hard", seed, 0.1 + shift, 0.1, 0.1)
    steps, mean, stderr = report.curve(load_runs(tmp_path), "success")
    assert list(steps) == [0, 50, 100]
    assert mean[-1] == pytest.approx(0.51) and stderr[-1] == pytest.approx(0.01)  # seeds' averages 0.50, 0.52
    assert mean[0] == 0.0 and stderr[0] == 0.0
    write_run(tmp_path, "lora", "easy", 2, 0.5, 0.1, 0.1)  # an unfinished grid: seed 2 lacks "hard"
    runs = load_runs(tmp_path)
    steps, mean, stderr = report.curve(runs, "success")
    average = metric_table(runs, "success").average["lora"]
    assert (mean[-1], stderr[-1]) == pytest.approx((average.mean, average.stderr))  # the table's last column


def test_success_measured_once_is_drawn_as_bars(tmp_path: Path, monkeypatch) -> None:
    for method in ("lora", "eva"):
        run = write_run(tmp_path, method, "task-a", 0, 0.5, 0.1, 0.1)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["eval"] = metrics["eval"][-1:]  # evaluated only at the end
        (run / "metrics.json").write_text(json.dumps(metrics))
    drawn = {}
    real_save = report._save_figure

    def save(fig, ax, path, *args, **kwargs):
        drawn["bars"], drawn["lines"] = len(ax.patches), len(ax.lines)
        return real_save(fig, ax, path, *args, **kwargs)

    monkeypatch.setattr(report, "_save_figure", save)
    path = report.plot_curves(load_runs(tmp_path), "success", tmp_path / "success.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert drawn["bars"] == 2
    report.plot_curves(load_runs(tmp_path), "train_loss", tmp_path / "loss.png")  # three steps: lines
    assert drawn["bars"] == 0 and drawn["lines"] == 2


def test_no_runs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No fine-tuning metrics.json"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs(tmp_path / "missing")
    assert mean_stderr([]).n == 0
