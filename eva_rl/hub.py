"""Import a plain transformers Decision Transformer (a local directory or a Hugging Face Hub id)
as an eva-rl checkpoint: the weights plus what a DT needs at inference and transformers does not
store (state mean/std, return scale, target return), checked against the task's env.

The statistics come from a dataset the model was trained on (`stats_from`, Minari ids or paths)
or from a small JSON/YAML file (`metadata_file`) holding what a published model's card gives:

    state_mean: [...]     # (state_dim,) mean of the raw observations the model was trained on
    state_std: [...]      # (state_dim,) their std
    return_scale: 1000    # returns-to-go were divided by this in training
    target_return: 3600   # optional: raw return to condition on (else evaluate needs --target-return)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from eva_rl.envs import make_env
from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

METADATA_KEYS = ("state_mean", "state_std", "return_scale", "target_return")


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at its import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_dir(source: str) -> Path:
    """The local directory of `source`: itself when it is a directory, else the snapshot of the
    Hub model id `source` in the Hugging Face cache (downloaded first unless HF_HUB_OFFLINE is set)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{source!r} is neither a model directory nor a Hugging Face Hub id (ORG/NAME). "
            "Give the directory written by DecisionTransformerModel.save_pretrained, or a Hub model id."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE")  # read at call time, like HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(source, cache_dir=cache, local_files_only=_offline()))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        where = cache or "the default Hugging Face cache"
        raise FileNotFoundError(
            f"Model {source!r} is not in {where} and could not be downloaded "
            f"({type(exc).__name__}). Download it on a machine that reaches the Hub "
            f"(`hf download {source}`, or `huggingface-cli download {source}` with older huggingface_hub), "
            f"copy its cache folder models--{source.replace('/', '--')} into HF_HUB_CACHE here, "
            "or pass the model's local directory."
        ) from None


def read_metadata_file(path: str | Path) -> dict[str, Any]:
    """state_mean, state_std, return_scale (and target_return when given) from a JSON/YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Metadata file {str(path)!r} does not exist.")
    data = yaml.safe_load(path.read_text())  # YAML reads JSON too
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping with keys {list(METADATA_KEYS)}.")
    unknown = sorted(set(data) - set(METADATA_KEYS))
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; known keys: {list(METADATA_KEYS)}.")
    missing = [k for k in ("state_mean", "state_std", "return_scale") if k not in data]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: the model's observation statistics and return scale are needed to run it. "
            "Copy them from the model card (or the training code), or use --stats-from DATASET "
            "with the data the model was trained on."
        )
    return data


def _statistics(stats_from: Sequence[str] | None, metadata_file: str | None) -> dict[str, Any]:
    """state_mean, state_std, return_scale and target_return (or None) from one of the two sources."""
    if (stats_from is None) == (metadata_file is None):
        raise ValueError("Give the model's statistics from exactly one of --stats-from DATASET or --metadata FILE.")
    if metadata_file is not None:
        data = read_metadata_file(metadata_file)
        return {**data, "target_return": data.get("target_return")}
    from eva_rl.data.trajectories import load_trajectories

    dataset = load_trajectories(list(stats_from))
    return {"state_mean": dataset.state_mean, "state_std": dataset.state_std,
            "return_scale": dataset.return_scale,
            "target_return": max(float(dataset.max_return(t)) for t in dataset.task_names)}


@dataclass(frozen=True)
class ImportResult:
    """Where the checkpoint went and what it holds."""

    out: Path  # the eva-rl checkpoint directory
    source: Path  # the local directory the weights came from
    config: PolicyConfig  # the architecture read from the model's config.json
    metadata: PolicyMetadata  # the statistics written with it

    def describe(self) -> str:
        c, m = self.config, self.metadata
        target = m.target_returns.get(m.tasks[0])
        return (f"imported {self.source} -> {self.out}: DT {c.n_layer} layers x {c.hidden_size}, "
                f"state {c.state_dim} / action {c.act_dim} dims, context {c.context_length}, "
                f"return scale {m.return_scale:g}, target return {target if target is not None else 'none'} "
                f"for {m.tasks[0]}")


def _load_plain(model_dir: Path, metadata: PolicyMetadata, context_length: int) -> DecisionTransformerPolicy:
    if any(model_dir.glob("*.safetensors")):
        return DecisionTransformerPolicy.from_pretrained(model_dir, metadata=metadata, context_length=context_length)
    # Published DTs (2022) ship pytorch_model.bin only. transformers unpickles it with
    # weights_only=True (tensors, no code); the checkpoint written here is safetensors.
    from transformers import DecisionTransformerModel

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json, so it is not a DecisionTransformerModel.")
    model = DecisionTransformerModel.from_pretrained(model_dir)
    config = PolicyConfig.from_transformers(model.config, context_length=context_length)
    return DecisionTransformerPolicy(config, metadata, model=model).eval()


def _read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as written, before transformers drops keys it no longer knows (max_length)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json, so it is not a DecisionTransformerModel.")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "decision_transformer":
        raise ValueError(f"{config_file} describes a {config.get('model_type')!r} model, not a decision_transformer.")
    return config


def import_model(source: str, task: str, out: str | Path, *, stats_from: Sequence[str] | None = None,
                 metadata_file: str | None = None, context_length: int | None = None,
                 target_return: float | None = None) -> ImportResult:
    """Write the plain DT `source` (directory or Hub id) as an eva-rl checkpoint for `task` at `out`.

    The model's state/action dims must equal the task env's observation/action dims.
    context_length: the K the model was trained with; None = config.json's max_length (the
        published D4RL DTs record theirs, 20 there), else 20.
    target_return: raw return to condition on, over the statistics source's.
    """
    model_dir = resolve_model_dir(source)
    model_config = _read_config(model_dir)
    state_dim, act_dim = int(model_config["state_dim"]), int(model_config["act_dim"])
    context_length = context_length or int(model_config.get("max_length") or 20)
    env = make_env(task, 0)
    try:
        obs_dim, env_act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    finally:
        env.close()
    if (state_dim, act_dim) != (obs_dim, env_act_dim):
        raise ValueError(
            f"The model {source!r} takes states of {state_dim} dims and actions of {act_dim}, but task {task!r} "
            f"has observations of {obs_dim} dims and actions of {env_act_dim}. Import it for a task of its dims."
        )
    stats = _statistics(stats_from, metadata_file)
    if len(np.asarray(stats["state_mean"]).reshape(-1)) != state_dim:
        raise ValueError(
            f"The statistics have {len(np.asarray(stats['state_mean']).reshape(-1))} state dims but the model "
            f"takes {state_dim}; they belong to another model or dataset."
        )
    target = target_return if target_return is not None else stats["target_return"]
    metadata = PolicyMetadata(state_mean=stats["state_mean"], state_std=stats["state_std"],
                              return_scale=stats["return_scale"], tasks=(task,),
                              target_returns={task: float(target)} if target is not None else {},
                              obs_dims=(obs_dim,), act_dims=(act_dim,))
    policy = _load_plain(model_dir, metadata, context_length)
    written = policy.save_pretrained(out)
    return ImportResult(out=written, source=model_dir, config=policy.config, metadata=metadata)
