"""Loading a policy from disk, whatever eva-rl or transformers wrote there: `load_policy`.

One loader for checkpoints (`DecisionTransformerPolicy.save_pretrained`), plain `transformers`
DecisionTransformerModel directories, run directories and PEFT adapters on their base, used by
`evaluate`, `finetune` and `DecisionTransformerPolicy.from_pretrained`. It reads only
safetensors (never a pickle) and loads them strictly: every error a damaged or mismatched
directory can cause is one exception naming the file and the fix. `eva_rl.policy.load_policy`
is this function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from eva_rl.policy import _FORMAT_VERSION, METADATA_FILE, DecisionTransformerPolicy, PolicyConfig, PolicyMetadata
from eva_rl.storage import recover_dir


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers 5 draws a progress bar for every save and load; a run's log.txt is not a terminal."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# PEFT probes `model.is_gradient_checkpointing`, which transformers 5 deprecated: a FutureWarning
# on every PeftModel built. The probe is PEFT's, so eva-rl's loads silence it.
_PEFT_PROBE_WARNING = ".*is_gradient_checkpointing.*"


ADAPTER_METADATA_FILE = "eva_rl_adapter.json"  # next to a PEFT adapter: method, ranks, base checkpoint, metadata
_IMPORT_HINT = ("convert it once with `eva-rl import` (it writes eva_rl.json from a dataset's statistics), "
                "or from Python pass metadata=PolicyMetadata(...) to eva_rl.load_policy")


class MissingMetadataError(ValueError):
    """A plain DecisionTransformerModel checkpoint was loaded without the metadata it lacks."""


def load_policy(path: str | os.PathLike, *, base: str | os.PathLike | None = None,
                metadata: PolicyMetadata | None = None, context_length: int | None = None,
                device: str | torch.device | None = None) -> DecisionTransformerPolicy:
    """The policy stored at `path`, in eval mode, whatever eva-rl or transformers wrote there:

    - a checkpoint (`save_pretrained`: config.json, model.safetensors, eva_rl.json);
    - a plain `transformers` DecisionTransformerModel directory (then `metadata` is required);
    - a run directory holding one of those as `model/` (pretraining, full fine-tuning);
    - a PEFT adapter directory (fine-tuning's `adapter/`), applied to its base checkpoint:
      `base`, or the one recorded when it was saved. The adapter's metadata (its task and
      target return) replaces the base's.

    `metadata` and `context_length` override the saved ones. Only safetensors are read (never a
    pickle), and every tensor must be present and of the shape config.json says.
    """
    path = Path(path)
    recover_dir(path)  # a replacement a crash interrupted is settled first
    if not path.is_dir():
        raise FileNotFoundError(f"No policy at {str(path)!r}: not a directory. Pass a checkpoint directory "
                                f"(a run's model/ or merged/) or an adapter directory (a run's adapter/).")
    if (path / "config.json").exists():
        policy = load_checkpoint(DecisionTransformerPolicy, path, metadata=metadata, context_length=context_length)
    elif (path / "model" / "config.json").exists():
        policy = load_checkpoint(DecisionTransformerPolicy, path / "model", metadata=metadata,
                                  context_length=context_length)
    elif (path / "adapter_config.json").exists() or (path / ADAPTER_METADATA_FILE).exists():
        policy = _load_adapter(path, base=base, metadata=metadata, context_length=context_length)
    else:
        inside = [p.name for p in sorted(path.iterdir()) if (p / "config.json").exists()
                  or (p / "adapter_config.json").exists()]
        hint = f"; it contains {inside}: pass one of those" if inside else ""
        raise FileNotFoundError(
            f"{str(path)!r} holds neither a checkpoint (config.json) nor an adapter (adapter_config.json){hint}."
        )
    if device is not None:
        _check_device(device)
        policy.to(device)
    return policy.eval()


def _check_device(device: str | torch.device) -> None:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use --device cpu.")


def _read_json(file: Path, what: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON ({exc}): the {what} is damaged; save it again, "
                         f"or restore that file.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds {type(data).__name__}, not a JSON object: the {what} is damaged.")
    return data


def load_checkpoint(cls: type[DecisionTransformerPolicy], path: Path, *, metadata: PolicyMetadata | None,
                     context_length: int | None) -> DecisionTransformerPolicy:
    recover_dir(path)  # a replacement a crash interrupted is settled first
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.exists():
        raise FileNotFoundError(f"No checkpoint at {str(path)!r}: no config.json there. Pass a directory made by "
                                f"save_pretrained (a run's model/ or merged/).")
    raw = _read_json(config_file, "checkpoint's config")
    if raw.get("model_type") != "decision_transformer":
        raise ValueError(f"{str(config_file)!r} describes a {raw.get('model_type')!r} model, not a "
                         f"decision_transformer; pass a Decision Transformer checkpoint.")
    saved: PolicyConfig | None = None
    meta_file = path / METADATA_FILE
    if meta_file.exists():
        payload = _read_json(meta_file, "checkpoint's eva-rl metadata")
        if payload.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{str(meta_file)!r} has format {payload.get('format')!r}, this eva-rl reads format "
                             f"{_FORMAT_VERSION}.")
        saved = PolicyConfig(**payload["config"])
        metadata = metadata or PolicyMetadata.from_dict(payload["metadata"])
    elif metadata is None:
        raise MissingMetadataError(
            f"{str(path)!r} is a plain DecisionTransformerModel checkpoint without {METADATA_FILE} (state "
            f"normalisation, return scale, tasks): {_IMPORT_HINT}."
        )
    hf_config = DecisionTransformerConfig.from_dict(raw)
    k = context_length or (saved.context_length if saved else 20)
    try:
        config = PolicyConfig.from_transformers(hf_config, context_length=k)
    except ValueError as exc:
        raise ValueError(f"{str(config_file)!r}: {exc}") from None
    if saved is not None:
        mismatched = saved.mismatches(config)
        if mismatched:
            raise ValueError(f"{METADATA_FILE} and config.json in {str(path)!r} disagree (eva_rl.json vs config.json): "
                             + "; ".join(mismatched) + ". The checkpoint was edited by hand or mixed from two saves; "
                             "save it again.")
        config = dataclasses.replace(config, dropout=saved.dropout)
    model = DecisionTransformerModel(hf_config)
    _load_weights(model, path)
    return cls(config, metadata, model=model)


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load the checkpoint's safetensors into `model` strictly. transformers' from_pretrained
    would initialise missing tensors afresh with a warning; a policy with random layers must be
    an error instead, naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in _read_json(index, "checkpoint's weight index").get("weight_map", {}).values()})
    else:
        files = [path / "model.safetensors"]
    if not all(f.exists() for f in files):
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        raise FileNotFoundError(
            f"{str(path)!r} has no {files[0].name}" + (f" but {pickles}: eva-rl never loads pickled weights (they can "
                                                      f"run code); convert them with safetensors first" if pickles else
                                                      ": the checkpoint is incomplete; save it again") + "."
        )
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{str(file)!r} cannot be read ({exc}): the file is truncated or damaged; "
                             f"save the checkpoint again.") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"The weights in {str(path)!r} are not the tensors config.json describes: "
            + (f"missing {_few(missing)}" if missing else "") + ("; " if missing and unexpected else "")
            + (f"unexpected {_few(unexpected)}" if unexpected else "")
            + ". The files come from different saves or were edited; save the checkpoint again "
              "(eva-rl never fills missing layers with fresh random weights)."
        )
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} from config.json"
             for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"config.json in {str(path)!r} no longer matches the weights: {_few(wrong)}. Restore the "
                         f"config.json saved with these weights, or save the checkpoint again.")
    model.load_state_dict(state, strict=True)


def _few(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _load_adapter(path: Path, *, base: str | os.PathLike | None, metadata: PolicyMetadata | None,
                  context_length: int | None) -> DecisionTransformerPolicy:
    from peft import PeftModel

    info = _read_json(path / ADAPTER_METADATA_FILE, "adapter") if (path / ADAPTER_METADATA_FILE).exists() else {}
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has {ADAPTER_METADATA_FILE} but no adapter_config.json: the adapter "
                                f"is incomplete; fine-tune again.")
    if not (path / "adapter_model.safetensors").exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        raise (ValueError if pickles else FileNotFoundError)(
            f"{str(path)!r} has no adapter_model.safetensors"
            + (f", only {pickles}: eva-rl never loads pickled weights (they can run code). Convert it where you "
               f"trust it: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)."
               if pickles else ": the adapter is incomplete; fine-tune again.")
        )
    adapter_config = _read_json(path / "adapter_config.json", "adapter's config")
    if base is None:
        base = info.get("checkpoint") or adapter_config.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(
                f"The adapter in {str(path)!r} records its base checkpoint as {base!r}, which is not a directory "
                f"here; pass the pretrained checkpoint with base=... (--base DIR), the one it was fine-tuned from."
            )
    if (Path(base) / "adapter_config.json").exists():
        raise ValueError(f"base {str(base)!r} is an adapter; pass the pretrained checkpoint the adapter was "
                         f"fine-tuned from.")
    if metadata is None and info.get("metadata"):
        metadata = PolicyMetadata.from_dict(info["metadata"])
    # a plain DecisionTransformerModel base does not record K; the adapter does
    policy = load_policy(base, metadata=metadata, context_length=context_length or info.get("context_length"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=_PEFT_PROBE_WARNING, category=FutureWarning)
        try:
            policy.model = PeftModel.from_pretrained(policy.model, str(path))
        except RuntimeError as exc:  # torch's size mismatch, deep inside PEFT
            detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise ValueError(f"The adapter in {str(path)!r} does not fit the base checkpoint {str(base)!r} ({detail}); "
                             f"pass the checkpoint it was fine-tuned from (--base DIR, or base=...).") from None
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise ValueError(f"The adapter in {str(path)!r} does not fit the base checkpoint {str(base)!r}: "
                             f"{warning.message} Pass the checkpoint it was fine-tuned from.")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return policy
