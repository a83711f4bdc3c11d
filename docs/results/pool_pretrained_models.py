"""The paper's two claims over several runs of one recipe, each with its own pretrained model.

Each `runs.csv` (a report's one row per run) pairs a method with its baseline over the same task
and seed, as the report does; the pooled line takes every pair of every run as one sample
(`eva_rl.stats.paired_difference`). That treats the pretrained models as exchangeable: with two
of them, the model-to-model variance cannot be estimated, so the per-model lines are printed too.

    python docs/results/pool_pretrained_models.py intel=docs/results/cw10-cpu/runs.csv \\
        zen4=docs/results/cw10-cpu-zen4/runs.csv
"""

from __future__ import annotations

import csv
import sys

from eva_rl.report_tables import PAPER_CLAIMS
from eva_rl.run_records import MEASURES
from eva_rl.stats import paired_difference


def pairs(path: str, variant: str, baseline: str, measure: str) -> list[float]:
    """variant - baseline over the (task, seed) both ran."""
    with open(path) as handle:
        rows = {(r["variant"], r["task"], r["seed"]): r for r in csv.DictReader(handle)}
    return [float(r[measure]) - float(rows[(baseline, task, seed)][measure])
            for (v, task, seed), r in sorted(rows.items()) if v == variant and (baseline, task, seed) in rows]


def main(named_paths: list[str]) -> None:
    runs = dict(arg.split("=", 1) for arg in named_paths)
    for measure in ("success", "success_auc", "train_loss", "val_action_error"):
        sign = 1.0 if MEASURES[measure].higher_is_better else -1.0
        for variant, baseline in PAPER_CLAIMS:
            pooled: list[float] = []
            for name, path in runs.items():
                d = pairs(path, variant, baseline, measure)
                pooled += d
                better = sum(sign * x > 0 for x in d)
                p = paired_difference(d)
                print(f"{measure:17s} {variant} vs {baseline:5s} {name:7s} {p.n:3d} pairs {p.mean:+.4f} ± "
                      f"{p.stderr:.4f}  mde80 {p.mde80:.4f}  better in {better}/{len(d)}")
            p = paired_difference(pooled)
            print(f"{measure:17s} {variant} vs {baseline:5s} {'pooled':7s} {p.n:3d} pairs {p.mean:+.4f} ± "
                  f"{p.stderr:.4f}  mde80 {p.mde80:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
