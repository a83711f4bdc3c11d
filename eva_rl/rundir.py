"""A run directory's state: which checkpoints are complete, whether the run finished, and whether
a config may write into it (the one check pretraining, fine-tuning and the experiment share).

    checkpoints/step_<n>/   complete once it has its name (see eva_rl.checkpoint)
    metrics.json            written last by the training loop (after model/ or adapter/): finished
    config.yaml             the run's whole config (pretrain, finetune)

"Made by another config" is one comparison, `config_differences`: a key the saved config lacks
counts as equal when the current config has it at its default, so the runs of an older release
stay valid when a newer one adds keys with defaults; a key absent and set to another value, or
present with another value, differs. Torch-free, so the job runner can use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_FILES = ("meta.json", "trainer.pt", "model.safetensors")
METRICS_FILE = "metrics.json"
# config keys (at any depth) a resumed run may change: how it is shown, where its dir is spelt from
FREE_KEYS = ("resume", "progress", "out_dir")

_ABSENT = object()


# --- finished? ---------------------------------------------------------------------------------

def is_finished(run_dir: str | os.PathLike) -> bool:
    """A run is finished when its metrics.json exists: the training loop writes it last (after the
    model or adapter), atomically, and the job runner for run functions that return metrics."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint dirs, newest first.

    A step_* dir only gets its name once complete (eva_rl.checkpoint writes it through
    storage.atomic_dir), so the highest one with all its files is the newest good one, even where a
    crash came between its rename and the `latest` pointer (kept for people and tools). The file
    check keeps a stray step_* dir made by hand from counting.
    """
    if not checkpoints.is_dir():
        return []
    return [path for path in sorted(checkpoints.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True)
            if path.is_dir() and all((path / name).is_file() for name in CHECKPOINT_FILES)]


def find_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint dir, or None."""
    found = complete_checkpoints(checkpoints)
    return found[0] if found else None


# --- made by another config? -------------------------------------------------------------------

def config_differences(saved: Any, current: Any, defaults: Any = None, free: Iterable[str] = (),
                       saved_as: str = "checkpoint") -> list[str]:
    """`key: <saved_as> A, now B` for every dotted key where `current` differs from `saved` (plain
    dicts compared key by key). A key `saved` lacks is equal when `current` holds the value
    `defaults` (a dict of the same shape) gives it; keys named in `free` are skipped at any depth."""
    free, diffs = frozenset(free), []

    def shown(value: Any) -> str:
        return "unset" if value is _ABSENT else repr(value)

    def walk(old: Any, new: Any, default: Any, key: str) -> None:
        if isinstance(new, dict) and (isinstance(old, dict) or old is _ABSENT):
            old_map = old if isinstance(old, dict) else {}  # a section a newer release added: key by key
            default_map = default if isinstance(default, dict) else {}
            for name in sorted(set(old_map) | set(new)):
                if name not in free:
                    walk(old_map.get(name, _ABSENT), new.get(name, _ABSENT), default_map.get(name, _ABSENT),
                         f"{key}{name}.")
        elif old is _ABSENT and new is not _ABSENT and default is not _ABSENT and new == default:
            return  # added by a newer release and left at its default: the old run ran that way
        elif old is _ABSENT or new is _ABSENT or old != new:
            diffs.append(f"{key[:-1]}: {saved_as} {shown(old)}, now {shown(new)}")

    walk(saved, current, defaults if defaults is not None else {}, "")
    return diffs


def check_same_config(saved: dict, current: dict, defaults: dict | None = None,
                      free: Iterable[str] = FREE_KEYS) -> None:
    """Raise ValueError listing every key where `current` differs from the `saved` config that wrote
    a run's checkpoints (see `config_differences`; keys in `free` may differ)."""
    diffs = config_differences(saved, current, defaults, free)
    if diffs:
        raise ValueError("Cannot resume: the config differs from the one that wrote the checkpoint ("
                         + "; ".join(diffs) + "). Resume with the same config, or start a new out_dir.")


def check_run_dir(out_dir: Path, config: dict, defaults: dict, resume: bool,
                  config_file: str | None = None) -> Path | None:
    """May `config` (a plain dict; `defaults` its class's defaults, same shape) write into out_dir?
    Returns the newest complete checkpoint to resume from, or None to start fresh.

    Refuses (FileExistsError) a directory holding checkpoints or a finished run unless `resume`,
    and a finished run without checkpoints to resume from; refuses (ValueError, naming each key) a
    run made by another config. config_file: the file in out_dir holding the config that made the
    run (fine-tuning's whole config.yaml); None: the newest checkpoint's meta.json (the training
    loop's config). Call it before writing anything into out_dir, so that a refused run leaves the
    old run's files as they were.
    """
    out_dir = Path(out_dir)
    found = find_checkpoint(out_dir / CHECKPOINTS_DIR)
    finished = is_finished(out_dir)
    if found is None and not finished:
        return None
    held = f"checkpoints of a run ({found.name})" if found is not None else f"a finished run ({METRICS_FILE})"
    if not resume:
        raise FileExistsError(f"{str(out_dir)!r} already holds {held}. Pass --resume (resume=true) to "
                              f"continue it, or choose another out_dir.")
    if found is None:
        raise FileExistsError(f"{str(out_dir)!r} already holds a finished run ({METRICS_FILE}) and no checkpoint "
                              f"to resume from. Choose another out_dir, or move the old run away.")
    saved = _saved_config(out_dir, found, config_file)
    if saved is not None:  # unreadable: the loader falls back to an older checkpoint and checks that one
        check_same_config(saved, config, defaults)
    return found


def _saved_config(out_dir: Path, checkpoint: Path, config_file: str | None) -> dict | None:
    """The config that made the run, None where its record is missing or damaged."""
    try:
        if config_file is None:
            return json.loads((checkpoint / "meta.json").read_text())["config"]
        path = out_dir / config_file
        if not path.is_file():
            return None  # every caller writes it before the first checkpoint; absent = nothing to compare
        # read as written (OmegaConf's YAML), not through the config class, so that absent keys stay absent
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError, OmegaConfBaseException):
        return None
