"""Report tables, statistics and plots from hand-made metrics.json files (exact numbers)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats
from scipy.stats import trim_mean

from eva_rl import report, report_plots, report_tables, run_records, stats
from eva_rl.report import (aggregate_scores, load_runs, mean_stderr, metric_table, paired_comparisons,
                           stratified_bootstrap_ci, write_report)
from eva_rl.run_records import run_value, variant_order

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
    assert table.variants == (report.BASE, "fft", "lora", "eva")  # the base policy, then the paper's row order
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
    assert "## Paired differences" in result.markdown and "| eva | lora | success | 4 (2 × 2) | +0.05 ± 0.05 | 0.21 | [-0.11, +0.21] | 0.391 | below the MDE | 3/4 |" in result.markdown
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
    assert set(rows) == {report.BASE, "lora", "eva"} and "task-b" not in rows["lora"]
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
    assert set(rows) == {report.BASE, "lora", "eva"} and "task-a" not in rows["lora"]
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
    real_save = report_plots._save_figure

    def save(fig, ax, path, *args, **kwargs):
        drawn["bars"], drawn["lines"] = len(ax.patches), len(ax.lines)
        return real_save(fig, ax, path, *args, **kwargs)

    monkeypatch.setattr(report_plots, "_save_figure", save)
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


# --- the new metrics.json: step 0, per-task episodes, protocol; settings from config.yaml ---------

PROTOCOL = {"seed": 1_000_000, "episodes": 4, "num_envs": 2, "horizon": 200, "steps": [0, 50, 100]}


def write_new_run(root: Path, method: str, task: str, seed: int, flags: dict[int, list[int]], *,
                  rank: int | None = 4, config: dict | None = None, point: dict | None = None,
                  loss: float = 0.2, name: str | None = None) -> Path:
    """A run in the current format: `flags` maps each evaluated step to per-episode successes."""
    run_dir = root / task / (name or f"{method}-s{seed}")
    run_dir.mkdir(parents=True)
    evals = []
    for step, episode_success in sorted(flags.items()):
        k, n = sum(episode_success), len(episode_success)
        evals.append({"step": step, "success_rate": k / n, "success_stderr": 0.1, "return_mean": 10.0 * k,
                      "return_stderr": 1.0, "episodes": n,
                      "per_task": {task: {"success_rate": k / n, "successes": k, "episodes": n, "return_mean": 10.0 * k,
                                          "episode_success": episode_success}}})
    final = evals[-1]
    metrics = {
        "kind": "finetune", "task": task, "method": method, "rank": None if method == "fft" else rank, "seed": seed,
        "trainable_params": 1000, "total_params": 100_000, "train_seconds": 1.0, "eva_seconds": None,
        "train_loss": [[0, 1.0], [100, loss]], "val_action_error": [[0, 0.5], [100, loss / 2]], "eval": evals,
        "eval_protocol": {**PROTOCOL, "target_returns": {task: 4500.0}},
        "final": {"success_rate": final["success_rate"], "return_mean": final["return_mean"], "train_loss": loss,
                  "val_action_error": loss / 2},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    resolved = {"method": method, "rank": rank, "target_modules": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                "eva": {"rho": 1.0}, "train": {"seed": seed, "out_dir": str(run_dir),
                                               "optim": {"lr": 1e-4}, "data": {"paths": [f"/data/{task}"], "episodes": None}}}
    for key, value in (config or {}).items():  # dotted overrides
        *parents, last = key.split(".")
        node = resolved
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved))
    if point is not None:
        (run_dir / "run.json").write_text(json.dumps({"point": point, "status": "done"}))
    return run_dir


def test_curve_area_and_steps_to_fraction_on_hand_curves() -> None:
    rising = [(0, 0.0), (50, 0.5), (100, 1.0)]
    assert run_records.curve_auc(rising) == pytest.approx((50 * 0.25 + 50 * 0.75) / 100)
    assert run_records.steps_to_fraction(rising, 0.9) == 100 and run_records.steps_to_fraction(rising, 0.5) == 50
    early = [(0, 0.2), (100, 0.8), (200, 1.0), (300, 1.0)]
    assert run_records.curve_auc(early) == pytest.approx((100 * 0.5 + 100 * 0.9 + 100 * 1.0) / 300)
    assert run_records.steps_to_fraction(early, 0.2) == 0  # the base policy already has a fifth of it
    assert math.isnan(run_records.steps_to_fraction([(0, 0.0), (100, 0.0)]))  # nothing to reach
    assert math.isnan(run_records.curve_auc([(100, 0.5)]))
    with pytest.raises(ValueError, match="fraction must lie"):
        load_runs(Path("."), fraction=1.5)


def _grid(tmp_path: Path, seeds=(0, 1, 2)) -> Path:
    """lora and eva on two tasks; step 0 is the same base policy (1 of 4) on every run."""
    base = [1, 0, 0, 0]
    finals = {("lora", "a"): [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]],
              ("eva", "a"): [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]],
              ("lora", "b"): [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]],
              ("eva", "b"): [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]}
    for (method, task), per_seed in finals.items():
        for seed in seeds:
            write_new_run(tmp_path, method, task, seed, {0: base, 50: per_seed[seed][:2] + [0, 0], 100: per_seed[seed]})
    return tmp_path


def test_normalised_score_table_and_paired_rows(tmp_path: Path) -> None:
    """Runs on tasks with D4RL references record score_mean: the report tables it, base row
    included, and pairs it; Meta-World runs (no score) get no score table."""
    scores = {("lora", 0): 40.0, ("lora", 1): 50.0, ("eva", 0): 55.0, ("eva", 1): 58.0}
    for (method, seed), score in scores.items():
        run_dir = write_new_run(tmp_path, method, "Hopper-v5", seed, {0: [1, 0], 100: [1, 1]})
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for entry in metrics["eval"]:
            entry["score_mean"] = 20.0 if entry["step"] == 0 else score
        metrics["final"]["score_mean"] = score
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    result = write_report(tmp_path, n_bootstrap=50, plots=False, tensorboard=False)
    table = result.tables["score"]
    assert table.variants == (report.BASE, "lora", "eva")
    assert table.cells[(report.BASE, "Hopper-v5")].mean == 20.0 and table.cells[("eva", "Hopper-v5")].mean == 56.5
    paired = next(p for p in result.paired if p.measure == "score" and p.variant == "eva" and p.baseline == "lora")
    assert paired.mean_diff == pytest.approx(11.5) and paired.n_pairs == 2 and paired.n_better == 2
    assert "Normalised score" in result.markdown and (result.out_dir / "score.csv").is_file()
    plain = write_report(_grid(tmp_path / "mw"), n_bootstrap=50, plots=False, tensorboard=False)
    assert not plain.tables["score"].cells and "Normalised score" not in plain.markdown


def test_base_row_wilson_curve_csv_and_protocol(tmp_path: Path) -> None:
    result = write_report(_grid(tmp_path), n_bootstrap=50, plots=False, tensorboard=False)
    success = result.tables["success"]
    assert success.variants[0] == report.BASE
    assert success.average[report.BASE].mean == pytest.approx(0.25)
    assert result.tables["return"].cells[(report.BASE, "a")].mean == pytest.approx(10.0)
    # episode-level Wilson beside the across-seed error: lora on task a pooled 2 + 1 + 3 of 12 episodes
    assert success.episodes[("lora", "a")] == (6, 12)
    low, high = stats.wilson_interval(6, 12)
    assert f"0.50 ± 0.14 [{low:.2f}, {high:.2f}]" in success.to_markdown()
    assert "Evaluation protocol: seed 1000000, 4 episodes per task on 2 envs, horizon 200" in result.markdown
    assert "Target returns: a 4500, b 4500." in result.markdown
    assert "Rests on 2 tasks × 3 seeds per cell × 4 evaluation episodes per task and run." in result.markdown
    assert "fewer than 3 seeds" not in result.markdown and "predate" not in result.markdown
    with open(tmp_path / "report" / "success_curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 * 3 and {r["step"] for r in rows} == {"0", "50", "100"}
    assert all(r["successes"] == "1" and r["episodes"] == "4" for r in rows if r["step"] == "0")
    # the base policy's step 0 is the same 4 episodes in all 6 runs of a task: counted once, not 6 times
    assert success.episodes[(report.BASE, "a")] == (1, 4) and success.episodes[(report.BASE, "average")] == (2, 8)
    with open(tmp_path / "report" / "success.csv") as handle:
        csv_rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(csv_rows["lora"]["a wilson_low"]) == pytest.approx(low)


def test_paired_mde_and_variance_decomposition(tmp_path: Path) -> None:
    result = write_report(_grid(tmp_path), n_bootstrap=50, plots=False, tensorboard=False)
    runs = load_runs(tmp_path)
    paired = {(p.variant, p.measure): p for p in result.paired}
    diffs = [run_value(e, "success") - run_value(lo, "success") for e in runs if e.method == "eva"
             for lo in runs if lo.method == "lora" and (lo.task, lo.seed) == (e.task, e.seed)]
    success = paired[("eva", "success")]
    assert success.n_pairs == 6 and (success.n_tasks, success.n_seeds, success.episodes) == (2, 3, 4)
    assert success.mean_diff == pytest.approx(np.mean(diffs))
    assert success.mde80 == pytest.approx(stats.minimum_detectable_difference(np.std(diffs, ddof=1), 6))
    assert success.verdict == "below the MDE" and "Below the MDE (final success): eva vs lora" in result.markdown
    assert {"success_auc", "steps_to_fraction"} <= {m for _, m in paired}
    with open(tmp_path / "report" / "paired.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if (r["method"], r["measure"]) == ("eva", "success"))
    assert float(row["mde80"]) == pytest.approx(success.mde80) and row["verdict"] == "below the MDE"
    test = scipy_stats.ttest_1samp(diffs, 0.0)
    assert float(row["p_value"]) == pytest.approx(test.pvalue) and success.p_value == pytest.approx(test.pvalue)
    low, high = test.confidence_interval(0.95)
    assert (float(row["ci95_low"]), float(row["ci95_high"])) == pytest.approx((low, high))
    assert f"[{low:+.2f}, {high:+.2f}] | {test.pvalue:.3f} |" in result.markdown
    (resolution,) = result.resolutions
    # episode part of one cell by hand: eva a s0 [1,1,1,0] vs lora [1,1,0,0] -> diffs [0,0,1,0]: var 0.25 / 4
    cell = report_tables._paired_cell(*next((e, lo) for e in runs for lo in runs if e.method == "eva" and lo.method == "lora"
                                     and (e.task, e.seed, lo.task, lo.seed) == ("a", 0, "a", 0)))
    assert cell.episode_variance == pytest.approx(0.25 / 4)
    assert resolution.parts.total == pytest.approx(np.var(diffs, ddof=1))
    assert resolution.grids == stats.grids_for_mde(resolution.parts, 0.05, tasks=2, seeds=3, episodes=4)
    assert "### What the success comparisons can resolve" in result.markdown and "an MDE of 0.05 needs" in result.markdown


def test_fewer_than_three_seeds_is_a_warning(tmp_path: Path) -> None:
    result = write_report(_grid(tmp_path, seeds=(0, 1)), n_bootstrap=50, plots=False, tensorboard=False)
    assert "**Warning: fewer than 3 seeds** for lora, eva" in result.markdown


def test_configs_differing_in_target_modules_get_distinct_rows_and_columns(tmp_path: Path) -> None:
    flags = {0: [0, 0], 100: [1, 0]}
    for seed in (0, 1):
        write_new_run(tmp_path, "lora", "a", seed, flags)
        write_new_run(tmp_path, "eva", "a", seed, flags)  # every module
        write_new_run(tmp_path, "eva", "a", seed, {0: [0, 0], 100: [1, 1]}, name=f"eva-attn-s{seed}",
                      config={"target_modules": ["c_attn"]})
        write_new_run(tmp_path, "fft", "a", seed, flags, config={"train.optim.lr": 1e-5})
        write_new_run(tmp_path, "lora", "b", seed, flags)  # another task: other data paths, not a setting
    runs = load_runs(tmp_path)
    labels = {r.variant for r in runs}
    assert labels == {"fft", "lora target_modules=c_attn,attn.c_proj,c_fc,mlp.c_proj",
                      "eva target_modules=c_attn,attn.c_proj,c_fc,mlp.c_proj", "eva target_modules=c_attn"}
    result = write_report(tmp_path, n_bootstrap=50, plots=False, tensorboard=False)
    with open(tmp_path / "report" / "runs.csv") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert {"target_modules", "train.optim.lr"} <= set(reader.fieldnames)
    assert not {"train.out_dir", "train.data.paths", "train.seed"} & set(reader.fieldnames)
    assert {r["target_modules"] for r in rows if r["method"] == "eva"} == {"c_attn", "c_attn,attn.c_proj,c_fc,mlp.c_proj"}
    assert {r["train.optim.lr"] for r in rows if r["method"] == "fft"} == {"1e-05"}
    pairs = {(p.variant, p.baseline) for p in result.paired if p.measure == "success"}
    assert ("eva target_modules=c_attn,attn.c_proj,c_fc,mlp.c_proj", "lora") in pairs
    assert ("eva target_modules=c_attn", "lora") not in pairs  # lora never ran attention-only
    assert ("eva target_modules=c_attn", "fft") in pairs  # fft has no target modules; its own lr names no row


def test_a_single_valued_sweep_stays_in_the_label(tmp_path: Path) -> None:
    flags = {0: [0, 0], 100: [1, 0]}
    write_new_run(tmp_path, "eva", "a", 0, flags, point={"task": "a", "method": "eva", "rank": 4, "seed": 0,
                                                          "eva.rho": 2.0}, config={"eva.rho": 2.0})
    write_new_run(tmp_path, "eva", "a", 0, flags, name="plain", config={"eva.rho": 1.0})
    write_new_run(tmp_path, "lora", "a", 0, flags)
    assert sorted(r.variant for r in load_runs(tmp_path)) == ["eva eva.rho=1", "eva eva.rho=2", "lora"]


def test_data_size_results(tmp_path: Path) -> None:
    for size, rate in ((5, [1, 0, 0, 0]), (10, [1, 1, 0, 0]), (None, [1, 1, 1, 0])):
        for method in ("lora", "eva"):
            for seed in (0, 1, 2):
                write_new_run(tmp_path, method, "a", seed, {0: [0, 0, 0, 0], 100: rate}, loss=0.1 * (seed + 1),
                              name=f"{method}-s{seed}-n{size}", config={"train.data.episodes": size})
    runs = load_runs(tmp_path)
    assert {"eva train.data.episodes=5", "lora train.data.episodes=all"} <= {r.variant for r in runs}
    # rows by value, not by text ("10" < "5"), all last
    assert variant_order(runs) == tuple(f"{m} train.data.episodes={n}" for m in ("lora", "eva") for n in (5, 10, "all"))
    groups, sizes, cells = report.data_size_table(runs)
    assert groups == ["lora", "eva"] and sizes == [5, 10, None]
    assert cells[("eva", "success", 10)].mean == pytest.approx(0.5)
    assert cells[("lora", "train_loss", None)].mean == pytest.approx(0.2)
    assert cells[("lora", "success_auc", 5)].mean == pytest.approx(0.125)
    result = write_report(tmp_path, n_bootstrap=50, tensorboard=False)
    assert "## Fine-tuning data size" in result.markdown and "| method | 5 | 10 | all |" in result.markdown
    assert (tmp_path / "report" / "success_vs_data_size.png").read_bytes()[:8] == PNG_SIGNATURE
    with open(tmp_path / "report" / "runs.csv") as handle:
        assert {r["train.data.episodes"] for r in csv.DictReader(handle)} == {"5", "10", ""}


def test_eva_rank_table_and_redistribution_sentence(tmp_path: Path) -> None:
    flags = {0: [0, 0], 100: [1, 0]}
    layers = ["base_model.model.encoder.h.0.attn.c_attn", "base_model.model.encoder.h.0.mlp.c_fc"]
    uniform = write_new_run(tmp_path, "eva", "a", 0, flags, config={"eva.rho": 2.0})
    (uniform / "eva_report.json").write_text(json.dumps({
        "rank": 2, "rho": 2.0, "ranks": {layers[0]: 2, layers[1]: 2},
        "explained_variance_ratio": {layers[0]: [0.5, 0.2, 0.1, 0.1], layers[1]: [0.4, 0.3, 0.2, 0.05]}}))
    moved = write_new_run(tmp_path, "eva", "a", 0, flags, name="eva-moved", config={"eva.rho": 3.0})
    (moved / "eva_report.json").write_text(json.dumps({
        "rank": 2, "rho": 3.0, "ranks": {layers[0]: 3, layers[1]: 1},
        "explained_variance_ratio": {layers[0]: [0.5, 0.2, 0.1], layers[1]: [0.4, 0.3, 0.2]}}))
    result = write_report(tmp_path, n_bootstrap=50, plots=False, tensorboard=False)
    assert "## EVA ranks per layer" in result.markdown
    assert "| h.0.attn.c_attn | 2 | 0.700 |" in result.markdown and "| h.0.mlp.c_fc | 2 | 0.700 |" in result.markdown
    assert "Rank redistribution changed nothing for eva eva.rho=2: rho = 2" in result.markdown
    assert "Rank redistribution (rho = 3) gave ranks 1-3" in result.markdown
    assert "| h.0.attn.c_attn | 3 | 0.800 |" in result.markdown


def test_old_format_runs_still_report(runs_dir: Path) -> None:
    """Runs from before step-0 evaluations, per-task episodes and the protocol: every table, and
    the report says what is missing."""
    for metrics_path in runs_dir.rglob("metrics.json"):
        metrics = json.loads(metrics_path.read_text())
        metrics["eval"] = [e for e in metrics.get("eval") or [] if e["step"] > 0]
        metrics["train_loss"] = [p for p in metrics.get("train_loss") or [] if p[0] > 0]
        metrics["val_action_error"] = [p for p in metrics.get("val_action_error") or [] if p[0] > 0]
        metrics_path.write_text(json.dumps(metrics))
    result = write_report(runs_dir, n_bootstrap=50, plots=False, tensorboard=False)
    assert report.BASE not in result.tables["success"].variants
    assert "9 of 9 runs have no step-0 evaluation" in result.markdown and "no base row" in result.markdown
    assert "9 of 9 runs predate the recorded evaluation protocol" in result.markdown
    assert "9 of 9 runs record no per-task episode counts" in result.markdown
    assert "an unrecorded number of evaluation episodes" in result.markdown
    assert result.tables["success"].episodes is None and not result.resolutions
    paired = {(p.variant, p.baseline, p.measure): p for p in result.paired}
    assert paired[("eva", "lora", "success")].mde80 == pytest.approx(stats.minimum_detectable_difference(0.1, 4))
    # the curve area spans the evaluated steps 50..100: lora task-a s0 0.25 -> 0.5
    lora = next(r for r in result.runs if (r.method, r.task, r.seed) == ("lora", "task-a", 0))
    assert run_value(lora, "success_auc") == pytest.approx(0.375)


def test_pairs_without_spread_get_no_verdict_rather_than_an_mde_of_zero() -> None:
    from eva_rl.report_tables import Paired

    same = Paired("adalora", "fft", "success", n_pairs=2, mean_diff=-0.15, stderr=0.0, n_better=0, sd=0.0, mde80=0.0)
    assert same.verdict == "no MDE (no spread over the pairs)"
    spread = Paired("eva", "lora", "success", n_pairs=4, mean_diff=0.05, stderr=0.07, n_better=3, sd=0.14, mde80=0.31)
    assert spread.verdict == "below the MDE"
    assert Paired("dora", "lora", "success", 2, 0.0, 0.0, 0, sd=0.0, mde80=0.0).verdict == "no difference"


def test_the_papers_claims_are_paired_against_their_own_baselines(tmp_path: Path) -> None:
    from eva_rl.report_tables import paired_comparisons

    for method in ("dora", "eva_dora"):
        for seed in (0, 1):
            write_new_run(tmp_path, method, "a", seed, {0: [1, 0, 0, 0], 100: [1, 1, seed, 0]})
    runs = load_runs(_grid(tmp_path, seeds=(0, 1)))
    pairs = {(p.variant, p.baseline) for p in paired_comparisons(runs)}
    assert ("eva_dora", "dora") in pairs and ("eva", "lora") in pairs
    assert not {(v, b) for v, b in pairs if b == "dora" and v != "eva_dora"}  # dora is a baseline for its claim only


def test_a_claim_keeps_its_baseline_when_a_sweep_labels_the_variants(tmp_path: Path) -> None:
    # the data-size grid labels every variant with its size; eva_dora vs dora must still be paired
    from eva_rl.report_tables import paired_comparisons

    for size, rate in ((5, [1, 0, 0, 0]), (None, [1, 1, 0, 0])):
        for method in ("lora", "dora", "eva", "eva_dora"):
            for seed in (0, 1):
                write_new_run(tmp_path, method, "a", seed, {0: [0, 0, 0, 0], 100: rate[:3] + [seed]},
                              name=f"{method}-s{seed}-n{size}", config={"train.data.episodes": size})
    pairs = {(p.variant, p.baseline) for p in paired_comparisons(load_runs(tmp_path)) if p.measure == "success"}
    assert {(f"eva_dora train.data.episodes={n}", "dora") for n in (5, "all")} <= pairs
    assert not {(v, b) for v, b in pairs if b == "dora" and not v.startswith("eva_dora ")}


def test_saturated_and_floored_tasks_are_named(tmp_path: Path) -> None:
    """A task every method solves (or none does) is flagged; one where they differ is not; the
    base row does not count as a method."""
    base = [0, 0, 0, 0]
    finals = {("lora", "easy"): [1, 1, 1, 1], ("eva", "easy"): [1, 1, 1, 1],
              ("lora", "hard"): [0, 0, 0, 0], ("eva", "hard"): [0, 0, 0, 0],
              ("lora", "mid"): [1, 0, 0, 0], ("eva", "mid"): [1, 1, 1, 0]}
    for (method, task), flags in finals.items():
        write_new_run(tmp_path, method, task, 0, {0: [1, 1, 1, 1] if task == "hard" else base, 100: flags})
    result = write_report(tmp_path, n_bootstrap=50, plots=False, tensorboard=False)
    spreads = {s.task: s for s in report.task_spreads(result.tables["success"])}
    assert {t: s.verdict for t, s in spreads.items()} == {"easy": "saturated", "hard": "floored", "mid": "informative"}
    assert (spreads["mid"].lowest, spreads["mid"].lowest_variant) == (0.25, "lora")
    assert (spreads["mid"].highest, spreads["mid"].highest_variant) == (0.75, "eva")
    assert spreads["hard"].base == 1.0  # the base solved it; the methods did not: still floored
    assert "| mid | 0.00 | 0.25 (lora) | 0.75 (eva) | informative |" in result.markdown
    assert "| easy | 0.00 | 1.00 (all) | 1.00 (all) | saturated |" in result.markdown
    assert "1 of 3 tasks are informative on final success; 2 are not: easy (saturated); hard (floored)." in result.markdown
    single = write_report(tmp_path, tmp_path / "one", run_dirs=[p.parent for p in tmp_path.glob("[em]*/*/metrics.json")],
                          n_bootstrap=50, plots=False, tensorboard=False)
    assert "1 of 2 tasks are informative on final success; 1 is not: easy (saturated)." in single.markdown
    with open(tmp_path / "report" / "task_spread.csv") as handle:
        rows = {row["task"]: row for row in csv.DictReader(handle)}
    assert rows["easy"]["verdict"] == "saturated" and float(rows["mid"]["highest"]) == 0.75


def _tree(root: Path, model: str, eva_gain: int, seeds=(0, 1), base=(1, 0, 0, 0)) -> Path:
    """lora and eva on two tasks x 2 seeds of one pretrained model (whose step-0 episodes are
    `base`); eva solves `eva_gain` more of 4 episodes than lora on every task and seed."""
    for task in ("a", "b"):
        for i, seed in enumerate(seeds):
            lora = [1, i, 0, 0]
            eva = [1 if k < sum(lora) + eva_gain else 0 for k in range(4)]
            for method, flags in (("lora", lora), ("eva", eva)):
                write_new_run(root, method, task, seed, {0: list(base), 100: flags},
                              config={"checkpoint": f"/models/{model}"})
    return root


def test_run_trees_of_several_pretrained_models_pool_within_each_tree(tmp_path: Path, capsys) -> None:
    from eva_rl.cli import main

    # m2 numbers its seeds 5 and 6, and its pretrained policy solves 3 of 4 episodes at step 0
    trees = {"m1": _tree(tmp_path / "m1", "m1", 0),
             "m2": _tree(tmp_path / "m2", "m2", 2, seeds=(5, 6), base=(1, 1, 1, 0))}
    result = write_report(trees, tmp_path / "pooled", plots=False, tensorboard=False)
    rows = {(p.variant, p.baseline, p.measure, p.model): p for p in result.paired}
    pooled = rows[("eva", "lora", "success", "")]
    # pairs never cross trees: 2 tasks x 2 seeds per model, differences 0 (m1) and +0.5 (m2)
    assert (pooled.n_pairs, pooled.n_tasks, pooled.n_seeds, pooled.models) == (8, 2, 2, 2)
    assert pooled.mean_diff == pytest.approx(0.25)
    assert rows[("eva", "lora", "success", "m1")].mean_diff == 0.0
    assert rows[("eva", "lora", "success", "m2")].mean_diff == pytest.approx(0.5)
    # over models: means 0 and 0.5, se 0.25; t_{.975,1} = 12.706, t_{.8,1} = 1.376
    assert pooled.between.sd == pytest.approx(0.5 / math.sqrt(2))
    assert pooled.between.mde80 == pytest.approx((12.706 + 1.376) * 0.25, rel=1e-3)
    # each tree's base policy is its own: the base row averages 0.25 (m1) and 0.75 (m2) over 4 units
    base = result.tables["success"].cells[(report.BASE, "a")]
    assert base.n == 4 and base.mean == pytest.approx(0.5)
    markdown = result.markdown
    assert "## Pooled run trees" in markdown and "`checkpoint`: m1 /models/m1; m2 /models/m2" in markdown
    assert "### The paper's claims per pretrained model" in markdown and "mde80 over models" in markdown
    assert "model | task × model" in markdown  # the variance split names the model parts
    with open(tmp_path / "pooled" / "runs.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:2] == ["model", "run"] and "checkpoint" not in header  # a tree's setting, not a row's
    with open(tmp_path / "pooled" / "paired.csv") as handle:
        per_tree = [r for r in csv.DictReader(handle) if r["model"] == "m2" and r["measure"] == "success"]
    assert len(per_tree) == 1 and float(per_tree[0]["mean_diff"]) == pytest.approx(0.5)
    # over models: 0.25 ± 12.706 · 0.25 (two model means, 1 df)
    assert pooled.between.ci95 == pytest.approx((0.25 - 12.706 * 0.25, 0.25 + 12.706 * 0.25), rel=1e-3)
    assert "95% CI over models" in markdown
    with pytest.raises(ValueError, match="needs out_dir"):
        write_report(trees)
    # the command line: NAME=DIR (or DIR, named by its folder), --out required
    assert main(["report", f"x={trees['m1']}", str(trees["m2"]), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    assert "Report: pooled over 2 run trees (x, m2)" in (tmp_path / "cli" / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(trees["m1"]), str(trees["m2"])]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["report", f"m1={trees['m1']}", f"m1={trees['m2']}", "--out", str(tmp_path / "x")]) == 2
    assert "'m1' twice" in capsys.readouterr().err
    assert main(["report", f"a={trees['m1']}", f"b={trees['m1']}", "--out", str(tmp_path / "x")]) == 2
    assert "are the same folder" in capsys.readouterr().err  # one tree twice is not two models


def test_pooled_run_trees_are_checked(tmp_path: Path) -> None:
    one = _tree(tmp_path / "m1", "m1", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run tree 'm2'"):
        write_report({"m1": one, "m2": tmp_path / "empty"}, tmp_path / "out")
    with pytest.raises(ValueError, match="needs a name"):
        write_report({"m1": one, " ": _tree(tmp_path / "m2", "m2", 0)}, tmp_path / "out")
    # a mapping of one tree is that tree's plain report
    single = write_report({"only": one}, tmp_path / "single", plots=False, tensorboard=False)
    assert "Pooled run trees" not in single.markdown and {p.models for p in single.paired} == {1}
