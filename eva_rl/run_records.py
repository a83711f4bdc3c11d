"""Fine-tuning runs as the report reads them: metrics, settings, labels, curves, episode counts.

A run directory holds `metrics.json` (the training loop's), and, when an experiment made it,
`run.json` (its grid point) and `config.yaml` (the resolved config). What is read from
metrics.json:

- "kind", "task", "method", "rank", "seed", "trainable_params", "final" {success_rate, ...};
- "eval": evaluations sorted by step, {"step", "success_rate", "return_mean", "score_mean" (D4RL's
  normalised return, for tasks with reference scores), ..., "per_task":
  {task: {"successes", "episodes", "episode_success": [0/1 per episode], ...}}}; step 0 is the
  pretrained policy before any update, on the same starts for every method and seed;
- "eval_protocol": {"seed", "episodes", "num_envs", "horizon", "target_returns", "steps"};
- "train_loss", "val_action_error": [[step, value], ...].

Runs written before step-0 evaluations, per-task episode counts and the protocol were recorded
still load: what they lack is None here, and the report says what is missing.

Row labels (`variant`) name the method and every setting that tells apart runs of one method on
the same task and seed (rank, target modules, rho, data size, ...), read from the resolved
config and the grid point, so two configurations never share a row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

# The EVA paper's row order (its Meta-World table); methods it does not list follow, sorted.
METHOD_ORDER = ("fft", "lora", "adalora", "pissa", "olora", "eva", "dora", "eva_dora")
# Config keys that differ between runs by construction (each run's own directory, resume flags):
# never a setting that distinguishes results.
BOOKKEEPING_KEYS = frozenset({"train.out_dir", "train.resume", "train.progress", "train.seed", "method", "rank"})
# Keys that only shape adapters: fft ignores them, so they neither label nor unpair its runs.
ADAPTER_KEYS = frozenset({"alpha", "dropout", "target_modules", "modules_to_save"})
DEFAULT_FRACTION = 0.9
DATA_SIZE_KEY = "train.data.episodes"  # episodes per task fine-tuned on (None: all)


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
    variant: str               # row label: method, plus the settings that tell its runs apart
    metrics: dict[str, Any]    # metrics.json as read
    settings: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value (config + grid point)
    scores: dict[str, float] = field(default_factory=dict)  # measures computed from curves (success_auc, ...)
    replicate: str = ""        # the run tree (its pretrained model) when a report pools several; "" for one

    @property
    def unit(self) -> tuple[str, int]:
        """What a seed is in tables and pairs: (run tree, seed), so pooled trees' seeds stay apart."""
        return self.replicate, self.seed

    def final(self, key: str) -> float:
        """The run's final value of a measure (a name in `MEASURES`) or of a key of metrics.json's
        "final" or of `scores` (NaN when not recorded)."""
        key = MEASURES[key].key if key in MEASURES else key
        if key in self.scores:
            return self.scores[key]
        value = (self.metrics.get("final") or {}).get(key)
        return float(value) if value is not None else math.nan

    def evaluation(self, step: int | None = None) -> dict[str, Any] | None:
        """The evaluation at `step` (the last one when None), or None."""
        evals = [e for e in self.metrics.get("eval") or [] if e.get("step") is not None]
        if not evals:
            return None
        if step is None:
            return max(evals, key=lambda e: int(e["step"]))
        return next((e for e in evals if int(e["step"]) == step), None)

    def episode_counts(self, step: int | None = None) -> tuple[int, int, list[int] | None] | None:
        """(successes, episodes, per-episode 0/1 or None) of the run's task at `step` (last when
        None), from the evaluation's "per_task"; None for runs that did not record it."""
        entry = self.evaluation(step)
        per_task = (entry or {}).get("per_task") or {}
        cell = per_task.get(str(self.task)) or (next(iter(per_task.values())) if len(per_task) == 1 else None)
        if not cell or cell.get("episodes") is None:
            return None
        episodes = int(cell["episodes"])
        flags = cell.get("episode_success")
        successes = int(cell["successes"]) if cell.get("successes") is not None else int(sum(flags or []))
        return successes, episodes, [int(f) for f in flags] if flags is not None else None


def series(run: RunRecord, measure: str) -> list[tuple[int, float]]:
    """(step, value) points of a run's curve: "success", "return" and "score" from its evaluations,
    "train_loss" and "val_action_error" from their logs."""
    if measure in ("success", "return", "score"):
        key = {"success": "success_rate", "return": "return_mean", "score": "score_mean"}[measure]
        return sorted((int(e["step"]), float(e[key])) for e in run.metrics.get("eval") or []
                      if e.get(key) is not None and e.get("step") is not None)
    return sorted((int(s), float(v)) for s, v in run.metrics.get(measure) or [] if v is not None)


def curve_auc(points: Sequence[tuple[int, float]]) -> float:
    """Area under a success curve normalised to [0, 1]: the trapezoid over the evaluated steps
    divided by the steps they span (from step 0 when it was evaluated). NaN below two points."""
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return math.nan
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(points, points[1:]))
    return float(area / (points[-1][0] - points[0][0]))


def steps_to_fraction(points: Sequence[tuple[int, float]], fraction: float = DEFAULT_FRACTION) -> float:
    """The first evaluated step whose success is at least `fraction` of the run's final success
    (no interpolation between evaluations); NaN when the final success is 0 or there is no curve."""
    if not points or points[-1][1] <= 0:
        return math.nan
    goal = fraction * points[-1][1]
    return float(next(step for step, value in points if value >= goal - 1e-12))


# --- reading ---------------------------------------------------------------------------------------

def run_files(root: Path, name: str, run_dirs: Iterable[str | Path] | None) -> list[Path]:
    """`name` files of the runs under root, skipping report folders (any folder holding a
    report.md) and runs an --overwrite moved aside; only those in `run_dirs` when given."""
    if run_dirs is not None:
        return sorted(Path(d) / name for d in run_dirs if (Path(d) / name).is_file())

    def skipped(path: Path) -> bool:
        folders = path.relative_to(root).parents  # path's folders up to root ("." last)
        return any(f.name == "_replaced" or (root / f / "report.md").is_file() for f in list(folders)[:-1])

    return [path for path in sorted(root.rglob(name)) if not skipped(path)]


def read_settings(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as dotted keys (config.yaml, else run.json's "config"); {} without one."""
    config: Any = None
    try:
        if (run_dir / "config.yaml").is_file():
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
        elif (run_dir / "run.json").is_file():
            config = json.loads((run_dir / "run.json").read_text()).get("config")
    except (OSError, yaml.YAMLError, json.JSONDecodeError):
        return {}
    return flatten(config) if isinstance(config, dict) else {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_runs(runs_dir: str | Path, *, kind: str | None = "finetune", run_dirs: Iterable[str | Path] | None = None,
              fraction: float = DEFAULT_FRACTION) -> list[RunRecord]:
    """Every run under `runs_dir` with a readable metrics.json (of `kind`, or all when None);
    with `run_dirs`, only the runs in those directories (one experiment's grid in a shared out_dir).

    Settings are the resolved config's keys overlaid with the grid point's (run.json). Labels
    name the method, `r=RANK` when ranks vary, and every `key=value` of `label_keys`.
    `fraction` is the share of final success `steps_to_fraction` waits for.
    """
    return _labelled(_read_runs(Path(runs_dir), kind, run_dirs, fraction, ""))


def load_replicates(trees: dict[str, str | Path], *, kind: str | None = "finetune",
                    fraction: float = DEFAULT_FRACTION) -> list[RunRecord]:
    """The runs of several run trees ({name: runs_dir}), each one replicate of the same grid with
    its own pretrained model: `RunRecord.replicate` is the tree's name, runs pair only within their
    tree, and settings that differ between the trees (`replicate_settings`) label no row."""
    if len(trees) < 1:
        raise ValueError("load_replicates needs at least one run tree.")
    return _labelled([r for name, root in trees.items() for r in _read_runs(Path(root), kind, None, fraction, name)])


def _labelled(found: list[RunRecord]) -> list[RunRecord]:
    keys = label_keys(found)
    show_rank = len({r.rank for r in found if r.rank is not None}) > 1
    return [replace(r, variant=variant_label(r, keys, show_rank=show_rank)) for r in found]


def _read_runs(root: Path, kind: str | None, run_dirs: Iterable[str | Path] | None, fraction: float,
               replicate: str) -> list[RunRecord]:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    if not root.is_dir():
        raise FileNotFoundError(f"Runs directory {str(root)!r} does not exist. Pass the out_dir of an experiment.")
    found: list[RunRecord] = []
    for path in run_files(root, "metrics.json", run_dirs):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run killed while writing; the experiment rewrites it on resume
        if kind is not None and metrics.get("kind") != kind:
            continue
        point = _read_point(path.parent)
        point.setdefault("method", metrics.get("method"))
        point.setdefault("rank", metrics.get("rank"))
        settings = read_settings(path.parent)
        settings.update({k: v for k, v in point.items() if k not in ("task", "seed", "method", "rank")})
        run = RunRecord(path=path.parent, kind=str(metrics.get("kind")), task=metrics.get("task"),
                        method=metrics.get("method"), rank=metrics.get("rank"), seed=int(metrics.get("seed", 0)),
                        point=point, variant="", metrics=metrics, settings=settings, replicate=replicate)
        curve = series(run, "success")
        run.scores.update(success_auc=curve_auc(curve), steps_to_fraction=steps_to_fraction(curve, fraction))
        found.append(run)
    return found


def _read_point(run_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run_dir / "run.json").read_text()).get("point") or {})
    except (OSError, json.JSONDecodeError):
        return {}


def value_text(value: Any) -> str:
    """A setting as a label shows it: lists joined by commas, floats without trailing noise."""
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def applies(key: str, method: str | None) -> bool:
    """Whether a setting can affect a method: EVA's section only EVA methods, AdaLoRA's only
    adalora, adapter shape keys not fft."""
    method = method or ""
    if key.startswith("eva.") and not method.startswith("eva"):
        return False
    if key.startswith("adalora.") and method != "adalora":
        return False
    return not (method == "fft" and key in ADAPTER_KEYS)


def _differ(runs: Sequence[RunRecord], key: str, group: Any) -> bool:
    """Two runs in one group (by `group(run)`) hold different values of `key`; a run without the
    key (older config, or not a grid key there) holds none. None is a value (e.g. all episodes)."""
    seen: dict[Any, str] = {}
    for r in runs:
        if key not in r.settings:
            continue
        text = json.dumps(r.settings[key], sort_keys=True, default=str)
        g = group(r)
        if seen.setdefault(g, text) != text:
            return True
    return False


def setting_columns(runs: Sequence[RunRecord]) -> list[str]:
    """Settings that differ between runs of the same task and seed (runs.csv's columns); keys
    that follow the task (its data paths) or the seed, and bookkeeping keys, are not settings.
    Pooled run trees are compared within each tree (`replicate_settings` names what differs between them)."""
    keys = sorted({k for r in runs for k in r.settings} - BOOKKEEPING_KEYS)
    return [k for k in keys if _differ(runs, k, lambda r: (r.replicate, r.task, r.seed))]


def label_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Settings that split one method's runs on the same task and seed into rows. A setting that
    follows the method (fft's own learning rate) names no row: the method does; runs.csv has it."""
    return [k for k in setting_columns(runs)
            if _differ([r for r in runs if applies(k, r.method)], k, lambda r: (r.replicate, r.task, r.seed, r.method))]


def replicate_settings(runs: Sequence[RunRecord]) -> list[str]:
    """Settings whose values differ between pooled run trees for the same task and row (the
    pretrained checkpoint, data paths, anything else): what the pooled report rests on besides
    the grid. Compared as each tree's set of values, so trees that ran other seed numbers are
    compared too. Empty for a single tree."""
    if len({r.replicate for r in runs}) < 2:
        return []

    def differs(key: str) -> bool:
        values: dict[tuple[Any, str], dict[str, set[str]]] = {}
        for r in runs:
            if key in r.settings:
                text = json.dumps(r.settings[key], sort_keys=True, default=str)
                values.setdefault((r.task, r.variant), {}).setdefault(r.replicate, set()).add(text)
        return any(len({frozenset(v) for v in trees.values()}) > 1 for trees in values.values())

    return [k for k in sorted({k for r in runs for k in r.settings} - BOOKKEEPING_KEYS) if differs(k)]


def variant_label(run: RunRecord, keys: Sequence[str], *, show_rank: bool) -> str:
    parts = [str(run.method)]
    if show_rank and run.rank is not None:
        parts.append(f"r={run.rank}")
    parts += [f"{k}={size_text(run.settings[k]) if k == DATA_SIZE_KEY else value_text(run.settings[k])}"
              for k in keys if applies(k, run.method) and k in run.settings]
    return " ".join(parts)


def variant_order(runs: Sequence[RunRecord]) -> tuple[str, ...]:
    """Row order: the paper's method order, then rank, then the values of the settings that tell
    runs apart in their own order (numbers by value, so 5 episodes come before 10; None, i.e.
    all, last), then label."""
    keys = label_keys(runs)

    def key(run: RunRecord) -> tuple:
        method = run.method or ""
        order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        swept = tuple(value_order(run.settings.get(k)) for k in keys)
        return (order, method, run.rank if run.rank is not None else -1, swept, run.variant)
    return tuple(dict.fromkeys(r.variant for r in sorted(runs, key=key)))


def value_order(value: Any) -> tuple[int, float, str]:
    """A sort key for any swept value: numbers by value, then the rest by their text, None last."""
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, json.dumps(value, sort_keys=True, default=str))


def partner(run: RunRecord, candidates: Sequence[RunRecord], keys: Sequence[str]) -> RunRecord | None:
    """The baseline run `run` pairs with among `candidates` (runs of one baseline method).

    Same task, seed and run tree; the same rank, or the baseline's only rank when one side has none (fft vs
    lora): two different ranks never pair, the difference would mix method and capacity. Every
    label key that applies to both methods must agree; if several candidates remain, the one
    agreeing on all label keys, else none."""
    same = [c for c in candidates if c.task == run.task and c.unit == run.unit
            and all(run.settings.get(k) == c.settings.get(k) for k in keys
                    if applies(k, run.method) and applies(k, c.method))]
    ranks = {c.rank for c in same}
    if run.rank in ranks:
        same = [c for c in same if c.rank == run.rank]
    elif not (len(ranks) == 1 and (run.rank is None or None in ranks)):
        return None
    if len(same) > 1:
        same = [c for c in same if all(run.settings.get(k) == c.settings.get(k) for k in keys)]
    return same[0] if len(same) == 1 else None


# --- measures ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """One column family of the report: where its value lives and which way is better."""

    name: str            # short name used in file names and tables
    title: str           # human title
    key: str             # key in metrics.json's "final", or in RunRecord.scores for curve measures
    higher_is_better: bool
    digits: int          # decimals shown in markdown
    step0: str | None = None  # where the base policy's value is: an "eval" key or a [step, value] log


MEASURES: dict[str, Measure] = {
    m.name: m for m in (
        Measure("success", "Success rate", "success_rate", True, 2, "success"),
        Measure("return", "Return", "return_mean", True, 1, "return"),
        Measure("score", "Normalised score (D4RL: 0 random, 100 expert)", "score_mean", True, 1, "score"),
        Measure("train_loss", "Final training loss", "train_loss", False, 4, "train_loss"),
        Measure("val_action_error", "Held-out action error", "val_action_error", False, 4, "val_action_error"),
        Measure("success_auc", "Area under the success curve (normalised)", "success_auc", True, 2),
        Measure("steps_to_fraction", "Steps to the fraction of final success", "steps_to_fraction", False, 0),
    )
}
TABLE_MEASURES = ("success", "return", "score", "train_loss", "val_action_error", "success_auc")
PAIRED_MEASURES = ("success", "success_auc", "steps_to_fraction", "score", "train_loss", "val_action_error")


def run_value(run: RunRecord, measure: str) -> float:
    """The run's final value of a measure (NaN when the run did not record it)."""
    return run.final(MEASURES[measure].key)


def base_value(run: RunRecord, measure: str) -> float:
    """The measure of the pretrained policy (step 0) in this run, NaN when not recorded."""
    source = MEASURES[measure].step0
    if source is None:
        return math.nan
    points = dict(series(run, source))
    return points.get(0, math.nan)


def size_text(size: Any) -> str:
    """A `train.data.episodes` value as tables show it (None: all episodes)."""
    return "all" if size is None else value_text(size)


def read_eva_report(run_dir: Path) -> dict[str, Any] | None:
    """A run's eva_report.json (`EvaReport.to_json`), or None."""
    path = run_dir / "eva_report.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("ranks"), dict) else None


def read_eva_ranks(run_dir: Path) -> dict[str, int] | None:
    """Rank per adapted layer from a run's eva_report.json (`EvaReport.to_json`'s "ranks"), or None."""
    data = read_eva_report(run_dir)
    return {str(k): int(v) for k, v in data["ranks"].items()} if data else None


def short_layer(name: str) -> str:
    """`base_model.model.encoder.h.0.attn.c_attn` -> `h.0.attn.c_attn`."""
    marker = name.find("h.")
    return name[marker:] if marker >= 0 else name
