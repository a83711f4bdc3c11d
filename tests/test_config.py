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
