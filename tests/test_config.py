"""Typed configs: YAML + dotted overrides, one clean error per mistake, and a YAML round trip."""

from __future__ import annotations  # field types are strings here: the key hints must still see sections

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eva_rl.config import config_to_dict, load_config, save_config


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3  # learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas


@dataclass(frozen=True)
class Run:
    optim: Optim = field(default_factory=Optim)  # a nested section
    steps: int = 10  # updates
    name: str = "run"  # run name
    tags: tuple[str, ...] = ()  # free-form labels
    horizon: int | None = None  # optional

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}.")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def assert_one_clean_line(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert "\n" not in message and "full_key" not in message and "object_type" not in message, message
    chained = error.value.__cause__ or (None if error.value.__suppress_context__ else error.value.__context__)
    assert chained is None, "the traceback of the library's own error is not shown"


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 0.01\ntags: [a, b]\n")
    config = load_config(Run, path, ["optim.lr=3e-4", "horizon=7"])
    assert config == Run(optim=Optim(lr=3e-4), steps=5, tags=("a", "b"), horizon=7)
    assert isinstance(config.tags, tuple) and isinstance(config.optim.betas, tuple)
    assert load_config(Run) == Run()
    assert load_config(Run, None, ["name=a=b"]).name == "a=b"  # only the first '=' splits
    assert load_config(Run, None, [], base={"steps": 3}).steps == 3


@pytest.mark.parametrize("source", ["override", "yaml"])
def test_unknown_nested_key_suggests_the_close_one_in_its_section(tmp_path, source):
    path, overrides = (None, ["optim.lrr=1"]) if source == "override" else (write(tmp_path, "optim:\n  lrr: 1\n"), [])
    with pytest.raises(ValueError, match=r"Unknown config key 'optim\.lrr'.*Did you mean 'optim\.lr'") as error:
        load_config(Run, path, overrides)
    assert "Known keys in section 'optim': optim.lr, optim.betas." in str(error.value)
    assert_one_clean_line(error)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown config key 'stepz'.*Did you mean 'steps'.*top level: optim, steps"):
        load_config(Run, None, ["stepz=3"])


@pytest.mark.parametrize("override, key, detail", [
    ("steps=abc", "steps", "could not be converted to Integer"),
    ("optim.lr=fast", "optim.lr", "could not be converted to Float"),
    ("tags=3", "tags", "is not a"),
    ("optim=3", "optim", "not a subclass of Optim"),
])
def test_wrong_type_names_the_key_in_one_line(override, key, detail):
    message = rf"Bad value for config key '{key}' in override '{override}': .*{detail}"
    with pytest.raises(ValueError, match=message) as error:
        load_config(Run, None, [override])
    assert_one_clean_line(error)
    assert not str(error.value).endswith("..")


def test_wrong_type_in_yaml_and_post_init_check(tmp_path):
    with pytest.raises(ValueError, match=r"Bad value for config key 'steps' in .*config\.yaml") as error:
        load_config(Run, write(tmp_path, "steps: many\n"))
    assert_one_clean_line(error)
    with pytest.raises(ValueError, match=r"^steps must be >= 0, got -1\.$"):  # the dataclass's own message
        load_config(Run, None, ["steps=-1"])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml' does not exist.*configs/"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="is a directory, not a file"):
        load_config(Run, tmp_path)


@pytest.mark.parametrize("text, message", [
    ("steps: [1\n", r"is not valid YAML at line 2, column 1: did not find expected ','"),
    ("steps: 1\nsteps: 2\n", "is not valid YAML at line 2, column 1: found duplicate key steps"),
    ("- 1\n- 2\n", "holds a list, expected a mapping"),
])
def test_invalid_yaml_is_one_line_with_its_position(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as error:
        load_config(Run, write(tmp_path, text))
    assert_one_clean_line(error)


def test_bad_override_form_and_interpolation():
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(Run, None, ["steps"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(Run, None, ["=3"])
    with pytest.raises(ValueError, match=r"Override 'name=\{a:\[0\]\}': its value is not valid YAML") as error:
        load_config(Run, None, ["name={a:[0]}"])  # a flow mapping without a space after the colon
    assert_one_clean_line(error)
    message = r"Bad value for config key 'name': Interpolation key 'oops' not found"
    with pytest.raises(ValueError, match=message) as error:
        load_config(Run, None, ["name=${oops}"])
    assert_one_clean_line(error)


def test_save_config_round_trip(tmp_path):
    config = Run(optim=Optim(lr=2e-4, betas=(0.8, 0.95)), steps=3, name="x", tags=("a",), horizon=None)
    path = tmp_path / "sub" / "config.yaml"
    save_config(config, path)
    assert load_config(Run, path) == config
    assert config_to_dict(config) == {"optim": {"lr": 2e-4, "betas": [0.8, 0.95]}, "steps": 3, "name": "x",
                                      "tags": ["a"], "horizon": None}
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


# --- the config reference: `eva-rl COMMAND --print-config` ----------------------------------------

@dataclass(frozen=True)
class Documented:
    # A comment above,
    # on two lines.
    above: int = 1
    inline: str = "x"  # a comment at the end of the line
    # Both kinds.
    both: float = 0.5  # and this
    # One comment for a pair of fields:
    first: int = 0
    second: int = 0

    plain: bool = False


def test_field_comments_are_read_from_the_source() -> None:
    from eva_rl.config import field_comments

    assert field_comments(Documented) == {
        "above": "A comment above, on two lines.", "inline": "a comment at the end of the line",
        "both": "Both kinds. And this", "first": "One comment for a pair of fields:",
        "second": "One comment for a pair of fields:", "plain": ""}
    assert field_comments(Run)["optim"] == "a nested section"


def _printed_comments(text: str) -> dict[str, str]:
    """{dotted key: the comment written above it} of --print-config's YAML (a group's comment repeats)."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    last = ""
    for line in text.splitlines():
        indent, body = len(line) - len(line.lstrip()), line.strip()
        if body.startswith("# eva-rl"):
            continue
        if body.startswith("#"):
            pending.append(body[1:].strip())
            continue
        key = body.split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([name for _, name in stack] + [key])
        last = " ".join(pending) if pending else last
        found[path], pending = last, []
        if body.endswith(":"):
            stack.append((indent, key))
    return found


def _fields(cls: type, prefix: str = ""):
    import dataclasses
    import typing

    from eva_rl.config import field_comments

    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    for item in dataclasses.fields(cls):
        yield prefix + item.name, comments[item.name], cls
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            yield from _fields(kind, prefix + item.name + ".")


@pytest.mark.parametrize("command", ["collect", "pretrain", "finetune", "evaluate", "experiment"])
def test_print_config_writes_every_field_with_its_comment_and_reloads(command, capsys, tmp_path) -> None:
    from eva_rl.cli import COMMANDS, main

    assert main([command, "--print-config"]) == 0
    text = capsys.readouterr().out
    cls = COMMANDS[command].config()
    printed = _printed_comments(text)
    for key, comment, owner in _fields(cls):
        assert comment, f"{owner.__name__}.{key.rpartition('.')[2]} has no comment where it is declared"
        assert printed.get(key) == comment, key
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    required = ["model_dir=m"] if command == "evaluate" else []  # its one key without a usable default
    assert load_config(cls, path, required) == load_config(cls, None, required)
