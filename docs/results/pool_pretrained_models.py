"""The paper's two claims over several runs of one recipe, each with its own pretrained model,
from the `runs.csv` of committed reports (whose run folders are not committed).

`eva-rl report NAME=DIR NAME=DIR --out OUT` does this, and more, from run folders; this script
does the same pooling (`eva_rl.stats.pool_models`) from reports alone. Each `runs.csv` (a
report's one row per run) pairs a method with its baseline over the same task and seed; the
pooled line takes every pair of every run as one sample (what holds on these models), the
"over models" line the per-model means (pretrained models as a sample, M - 1 degrees of freedom).

    python docs/results/pool_pretrained_models.py intel=docs/results/cw10-cpu/runs.csv \\
        zen4=docs/results/cw10-cpu-zen4/runs.csv
"""

from __future__ import annotations

import csv
import sys

from eva_rl.report_tables import PAPER_CLAIMS
from eva_rl.run_records import MEASURES
from eva_rl.stats import pool_models


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
            groups = {name: pairs(path, variant, baseline, measure) for name, path in runs.items()}
            result = pool_models(groups)
            for name, d in groups.items():
                p = result.per_model[name]
                print(f"{measure:17s} {variant} vs {baseline:5s} {name:7s} {p.n:3d} pairs {p.mean:+.4f} ± "
                      f"{p.stderr:.4f}  mde80 {p.mde80:.4f}  better in {sum(sign * x > 0 for x in d)}/{len(d)}")
            for label, p in (("pooled", result.pooled), ("over models", result.between)):
                unit = "pairs" if label == "pooled" else "models"
                low, high = p.ci95
                print(f"{measure:17s} {variant} vs {baseline:5s} {label:7s} {p.n:3d} {unit} {p.mean:+.4f} ± "
                      f"{p.stderr:.4f}  mde80 {p.mde80:.4f}  95% CI [{low:+.4f}, {high:+.4f}]  p {p.p_value:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
