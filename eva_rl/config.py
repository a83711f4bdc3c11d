"""Typed configs: frozen dataclasses loaded from YAML with dotted command-line overrides.

OmegaConf does the merging and type checking; this module adds what it lacks for us: one
clear error for an unknown key or a bad value (naming the key and the fix), frozen results,
and saving a resolved config back to YAML that reloads to the same object.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


def _field_names(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, for the 'did you mean' hint."""
    names = []
    for field in dataclasses.fields(cls):
        names.append(prefix + field.name)
        if dataclasses.is_dataclass(field.type) and isinstance(field.type, type):
            names.extend(_field_names(field.type, prefix + field.name + "."))
    return names


def _unknown_key_error(cls: type, key: str, source: str) -> ValueError:
    known = _field_names(cls)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"Unknown config key {key!r} in {source} for {cls.__name__}.{hint} "
        f"Known keys: {', '.join(known)}."
    )


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), base: dict | None = None) -> T:
    """Build a `cls` config from defaults, then `base`, then the YAML at `path`, then `overrides`.

    Overrides are dotted `key=value` strings (`optim.lr=3e-4`). Unknown keys and values of
    the wrong type raise one `ValueError` naming the key; the dataclass's own `__post_init__`
    checks run last, on the merged values.
    """
    schema = OmegaConf.structured(cls)
    layers: list[tuple[str, Any]] = []
    if base:
        layers.append(("the base config", OmegaConf.create(base)))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Config file {str(path)!r} does not exist. Pass the path of a YAML file "
                f"(examples are in the configs/ folder)."
            )
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as exc:  # yaml's errors are many; one message for all of them
            raise ValueError(f"Config file {str(path)!r} is not valid YAML: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form key=value (e.g. optim.lr=3e-4).")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as exc:
            raise _unknown_key_error(cls, str(exc.full_key), source) from None
        except (ValidationError, OmegaConfBaseException) as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise ValueError(f"Bad value for config key {key!r} in {source}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"Config keys {missing} have no value: set them in the YAML or as key=value overrides.")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        cause = exc.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise ValueError(str(exc)) from None


def config_to_dict(config: Any) -> dict:
    """A plain dict of a config dataclass (tuples become lists), ready for YAML or JSON."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write `config` as YAML atomically, so that `load_config(type(config), path)` rebuilds it."""
    text = OmegaConf.to_yaml(OmegaConf.structured(config))
    write_text_atomic(Path(path), text)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so a crash never leaves half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def as_dictconfig(config: Any) -> DictConfig:
    """The OmegaConf view of a config dataclass (for logging hyperparameters)."""
    return OmegaConf.structured(config)
