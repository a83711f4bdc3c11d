"""The top-level Python API: every public name resolves, `import eva_rl` stays light, README's
Python section runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import eva_rl

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", eva_rl.__all__)
def test_every_public_name_resolves(name):
    value = getattr(eva_rl, name)
    assert callable(value), name  # functions, config classes, and the callable evaluate/finetune modules
    assert name in dir(eva_rl)


def test_unknown_names_are_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_polcy'"):
        eva_rl.load_polcy  # noqa: B018


def test_import_is_lazy():
    code = "import sys, eva_rl; print(sorted(m for m in ('torch', 'transformers', 'peft', 'minari') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluate_and_finetune_are_functions_even_after_their_modules_are_imported(monkeypatch):
    import eva_rl.evaluate
    import eva_rl.finetune
    from eva_rl.evaluate import EvalResult

    assert eva_rl.evaluate.EvalResult is EvalResult  # still the module for attribute access
    monkeypatch.setattr(eva_rl.evaluate, "evaluate", lambda *a, **kw: ("evaluated", a, kw))
    monkeypatch.setattr(eva_rl.finetune, "finetune", lambda config: ("finetuned", config))
    assert eva_rl.evaluate("policy", "reach-v3", 2, seed=0) == ("evaluated", ("policy", "reach-v3", 2), {"seed": 0})
    assert eva_rl.finetune("config") == ("finetuned", "config")
    assert eva_rl.load_policy is eva_rl.evaluate.load_policy  # one loader, two homes


@pytest.mark.slow
def test_readme_python_section_runs_as_written(tmp_path, monkeypatch):
    """README's "Use it from Python" blocks, run in a folder holding the runs they name."""
    section = README.read_text().split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    from eva_rl.adapters.methods import apply_method, save_adapter
    from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

    monkeypatch.chdir(tmp_path)
    config = PolicyConfig.from_preset("tiny", state_dim=3, act_dim=1)
    metadata = PolicyMetadata(state_mean=[0.0] * 3, state_std=[1.0] * 3, tasks=("Pendulum-v1",),
                              target_returns={"Pendulum-v1": -200.0}, obs_dims=(3,), act_dims=(1,))
    DecisionTransformerPolicy(config, metadata).save_pretrained("runs/pretrain/model")
    policy = apply_method(eva_rl.load_policy("runs/pretrain/model"), "lora", rank=2)
    save_adapter(policy, "runs/finetune/adapter", extra={"checkpoint": "runs/pretrain/model"})
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def _policy_for(state_dim: int, act_dim: int, tasks: tuple = ()):
    from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

    config = PolicyConfig.from_preset("tiny", state_dim=state_dim, act_dim=act_dim)
    metadata = PolicyMetadata(state_mean=[0.0] * state_dim, state_std=[1.0] * state_dim, tasks=tasks,
                              target_returns={t: 1.0 for t in tasks}, obs_dims=[state_dim] * len(tasks),
                              act_dims=[act_dim] * len(tasks))
    return DecisionTransformerPolicy(config, metadata)


def test_evaluate_refuses_a_task_whose_spaces_differ_from_the_checkpoint_before_any_episode(monkeypatch):
    from eva_rl import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_run", lambda *a, **kw: pytest.fail("rolled out"))
    metaworld_sized = _policy_for(39, 4, tasks=("reach-v3",))
    with pytest.raises(ValueError, match=r"'Pendulum-v1': the env has obs/action dims \(3, 1\) but the policy was "
                                         r"not trained on it, and takes \(39, 4\)"):
        eva_rl.evaluate(metaworld_sized, ["reach-v3", "Pendulum-v1"], 2, 0, target_returns=1.0)


def test_a_target_return_for_a_task_not_evaluated_is_an_error(monkeypatch):
    from eva_rl import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_run", lambda *a, **kw: pytest.fail("rolled out"))
    policy = _policy_for(3, 1, tasks=("Pendulum-v1",))
    with pytest.raises(ValueError, match=r"name \['Pendulm-v1'\], which are not evaluated here.*--target-return"):
        eva_rl.evaluate(policy, "Pendulum-v1", 2, 0, target_returns={"Pendulm-v1": -100.0})


def test_cli_turns_a_plain_checkpoint_and_a_missing_device_into_one_line(tmp_path, capsys, monkeypatch):
    import torch

    from eva_rl.cli import main

    policy = _policy_for(3, 1, tasks=("Pendulum-v1",))
    policy.model.save_pretrained(tmp_path / "plain")
    assert main(["evaluate", str(tmp_path / "plain"), "--tasks", "Pendulum-v1", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "without eva_rl.json" in err and "`eva-rl import`" in err and "Traceback" not in err
    policy.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", str(tmp_path / "ckpt"), "--tasks", "Pendulum-v1", "--episodes", "1",
                 "--device", "cuda"]) == 2
    assert "CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err
