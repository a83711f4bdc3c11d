"""Typed configs: frozen dataclasses loaded from YAML with dotted command-line overrides.

OmegaConf does the merging and type checking; this module adds what it lacks for us: one
clear error for an unknown key or a bad value (naming the key and the fix), frozen results,
and saving a resolved config back to YAML that reloads to the same object.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import os
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from eva_rl.storage import write_text_atomic

T = TypeVar("T")


def _field_names(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (nested sections included), for error hints."""
    # get_type_hints, not field.type: under `from __future__ import annotations` the latter is a string
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        names.append(prefix + field.name)
        kind = hints.get(field.name)
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            names.extend(_field_names(kind, prefix + field.name + "."))
    return names


def _unknown_key_error(cls: type, key: str, source: str) -> ValueError:
    known = _field_names(cls)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    section, _, _ = key.rpartition(".")
    siblings = [name for name in known if name.rpartition(".")[0] == section]  # same nesting level
    where = f"in section {section!r}" if section else "at the top level"
    return ValueError(
        f"Unknown config key {key!r} in {source} for {cls.__name__}.{hint} "
        f"Known keys {where}: {', '.join(siblings)}."
    )


def _first_line(exc: BaseException) -> str:
    """OmegaConf appends 'full_key: ...' / 'object_type=...' lines to its messages: keep the first."""
    lines = str(getattr(exc, "msg", None) or exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    """The YAML mapping at `path`; one-line errors for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Config file {str(path)!r} {what}. Pass the path of a YAML file "
            f"(examples are in the configs/ folder)."
        )
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"Config file {str(path)!r} is not valid YAML{at}: {exc.problem}. "
                         "Fix the file's syntax.") from None
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        raise ValueError(f"Config file {str(path)!r} is not valid YAML: {_first_line(exc)}.") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"Config file {str(path)!r} holds a list, expected a mapping of "
                         "keys to values (e.g. `steps: 1000`).")
    return loaded


def _merge(cls: type, merged: DictConfig, layer: DictConfig, source: str, key_hint: str | None) -> DictConfig:
    """`layer` merged over `merged`, with one clear ValueError for an unknown key or a bad value."""
    try:
        return OmegaConf.merge(merged, layer)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise _unknown_key_error(cls, str(exc.full_key or key_hint), source) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or key_hint
        named = f" for config key {key!r}" if key else ""
        raise ValueError(f"Bad value{named} in {source}: {_first_line(exc)}.") from None


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), base: dict | None = None) -> T:
    """Build a `cls` config from defaults, then `base`, then the YAML at `path`, then `overrides`.

    Overrides are dotted `key=value` strings (`optim.lr=3e-4`). Unknown keys and values of
    the wrong type raise one `ValueError` naming the key; the dataclass's own `__post_init__`
    checks run last, on the merged values.
    """
    layers: list[tuple[str, DictConfig, str | None]] = []  # (source, values, the key it sets)
    if base:
        layers.append(("the base config", OmegaConf.create(base), None))
    if path is not None:
        layers.append((str(path), _read_yaml(path), None))
    for item in overrides:
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"Override {item!r} is not of the form key=value (e.g. optim.lr=3e-4).")
        try:
            values = OmegaConf.from_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as exc:  # the value is parsed as YAML
            raise ValueError(
                f"Override {item!r}: its value is not valid YAML ({_first_line(exc)}). Flow mappings need a "
                f"space after each colon and quoting in the shell, e.g. 'finetune.method_seeds={{lora: [0, 1]}}'."
            ) from None
        layers.append((f"override {item!r}", values, key.strip()))
    merged = OmegaConf.structured(cls)
    for source, layer, key in layers:
        merged = _merge(cls, merged, layer, source, key)
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ValueError(f"Config keys {missing} have no value: set them in the YAML or as key=value overrides.")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, ValueError):  # a __post_init__ check: its message is the one to show
            raise exc.__cause__ from None
        key = getattr(exc, "full_key", None)
        named = f" for config key {key!r}" if key else ""
        raise ValueError(f"Bad value{named}: {_first_line(exc)}.") from None


def config_to_dict(config: Any) -> dict:
    """A plain dict of a config dataclass (tuples become lists), ready for YAML or JSON."""
    return _lists(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def _lists(value: Any) -> Any:
    """`value` with every tuple, nested ones too, turned into a list (OmegaConf keeps tuples)."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write `config` as YAML atomically, so that `load_config(type(config), path)` rebuilds it."""
    text = OmegaConf.to_yaml(OmegaConf.structured(config))
    write_text_atomic(Path(path), text)


# --- the config reference (`eva-rl COMMAND --print-config`) --------------------------------------

def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} of a config dataclass, read from its source code.

    A field's comment is the run of `#` lines right above it plus a `#` comment at the end of its
    line: the comments written where each field is declared are the reference, with no second
    copy to drift. Fields of dataclass bases are included; a field without a comment maps to "".
    A class made with `dataclasses.make_dataclass` has no source: it carries a `FIELD_COMMENTS`
    dict, built from the classes its fields come from.
    """
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            comments.update(_class_field_comments(klass))
    return {f.name: comments.get(f.name, "") for f in dataclasses.fields(cls)}


def _class_field_comments(klass: type) -> dict[str, str]:
    if "FIELD_COMMENTS" in vars(klass):  # a class built at run time names its fields' comments itself
        return dict(vars(klass)["FIELD_COMMENTS"])
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # defined in a REPL or built at run time: no source to read
        return {}
    lines = source.splitlines()
    inline = {token.start[0]: token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
              if token.type == tokenize.COMMENT}
    [node] = ast.parse(source).body
    comments: dict[str, str] = {}
    group, group_end = "", -1  # the comment of the field above and its last line
    for statement in node.body:  # type: ignore[attr-defined]
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            group_end = -1
            continue
        above, row = [], statement.lineno - 1  # 1-based line numbers: lines[row - 1] is the line above
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, lines[row - 1].strip())
            row -= 1
        last = statement.end_lineno or statement.lineno
        end = inline[last].lstrip("#").strip() if last in inline else ""
        text = " ".join(line.lstrip("#").strip() for line in above)
        if end:
            text = f"{text} {end[0].upper()}{end[1:]}" if text.endswith(".") else "; ".join(filter(None, (text, end)))
        if not text and statement.lineno == group_end + 1:
            text = group  # a field right under another with no comment of its own: one comment for the pair
        comments[statement.target.id] = text
        group, group_end = text, last
    return comments


def config_yaml(config: Any, width: int = 100) -> str:
    """`config` (an instance, or a config class for its defaults) as YAML, each key's comment above it.

    Nested sections are included; the text reloads to the same config with `load_config`. A class's
    defaults are read without running its checks, so a class whose defaults alone do not validate
    (a required key left empty) still prints.
    """
    cls = config if isinstance(config, type) else type(config)
    values = _lists(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
    return "\n".join(_yaml_lines(cls, values, 0, width)) + "\n"


def _yaml_lines(cls: type, values: dict, indent: int, width: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    previous = None
    for item in dataclasses.fields(cls):
        comment = comments[item.name]
        if comment and comment != previous:  # a comment shared by a group of fields is written once
            lines += [f"{pad}# {line}" for line in textwrap.wrap(comment, max(40, width - indent - 2))]
        previous = comment
        kind, value = hints.get(item.name), values[item.name]
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            lines.append(f"{pad}{item.name}:")
            lines += _yaml_lines(kind, value, indent + 2, width)
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            text = text.removesuffix("...").strip()  # a scalar is dumped as a document: drop its end marker
            lines.append(f"{pad}{item.name}: {text}")
    return lines
