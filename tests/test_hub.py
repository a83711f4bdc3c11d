"""`eva-rl import`: plain DTs (a directory, a Hub cache entry) -> eva-rl checkpoints that evaluate and fine-tune."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from eva_rl.data.collect import CollectConfig, collect_task
from eva_rl.data.trajectories import load_trajectories
from eva_rl.evaluate import evaluate
from eva_rl.hub import import_model, resolve_model_dir
from eva_rl.policy import DecisionTransformerPolicy

TASK = "Pendulum-v1"  # obs 3, act 1
MEAN, STD = [0.1, -0.2, 0.3], [1.5, 2.0, 0.5]


def plain_dt(directory, state_dim=3, act_dim=1):
    torch.manual_seed(0)
    config = DecisionTransformerConfig(state_dim=state_dim, act_dim=act_dim, hidden_size=16, n_layer=1, n_head=2,
                                       max_ep_len=256, n_positions=64)
    model = DecisionTransformerModel(config)
    model.save_pretrained(directory)
    return model


def hub_cache(root, repo="org/tiny-dt", revision="0123abcd" * 5):
    """The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/<rev>/...}."""
    entry = root / f"models--{repo.replace('/', '--')}"
    model = plain_dt(entry / "snapshots" / revision)
    config_file = entry / "snapshots" / revision / "config.json"
    # the published DTs record their context length K as max_length, a key transformers 5 no longer reads
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "max_length": 6}))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    return model


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def card(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump({"state_mean": MEAN, "state_std": STD, "return_scale": 100.0,
                                    "target_return": -150.0}))
    return path


def test_local_directory_imports_with_card_statistics_and_evaluates(tmp_path, card):
    model = plain_dt(tmp_path / "plain")
    result = import_model(str(tmp_path / "plain"), TASK, tmp_path / "out", metadata_file=str(card), context_length=4)
    policy = DecisionTransformerPolicy.from_pretrained(result.out)
    assert policy.metadata.state_mean == tuple(MEAN) and policy.metadata.state_std == tuple(STD)
    assert policy.metadata.return_scale == 100.0 and policy.metadata.target_returns == {TASK: -150.0}
    assert policy.metadata.tasks == (TASK,) and policy.config.context_length == 4
    torch.testing.assert_close(policy.model.state_dict(), model.state_dict())
    outcome = evaluate(policy, [TASK], episodes=2, seed=0, num_envs=2, horizon=10)
    assert outcome.describe()


def test_hub_id_resolves_from_the_cache_offline(offline_cache, tmp_path, card):
    model = hub_cache(offline_cache)
    assert resolve_model_dir("org/tiny-dt").parent.name == "snapshots"
    result = import_model("org/tiny-dt", TASK, tmp_path / "out", metadata_file=str(card))
    policy = DecisionTransformerPolicy.from_pretrained(result.out)
    assert policy.config.context_length == 6
    torch.testing.assert_close(policy.model.state_dict(), model.state_dict())


def test_hub_id_missing_from_the_cache_says_how_to_download(offline_cache, tmp_path, card):
    with pytest.raises(FileNotFoundError, match=r"not in .*hub.*hf download org/absent"):
        import_model("org/absent", TASK, tmp_path / "out", metadata_file=str(card))


def test_dims_that_do_not_fit_the_task_show_both_sides(tmp_path, card):
    plain_dt(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"states of 3 dims and actions of 1.*'Hopper-v5' has observations of 11 "
                                         r"dims and actions of 3"):
        import_model(str(tmp_path / "plain"), "Hopper-v5", tmp_path / "out", metadata_file=str(card))
    assert not (tmp_path / "out").exists()


def test_a_card_without_statistics_is_refused(tmp_path):
    plain_dt(tmp_path / "plain")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"target_return": 3600}))
    with pytest.raises(ValueError, match=r"lacks \['state_mean', 'state_std', 'return_scale'\].*model card"):
        import_model(str(tmp_path / "plain"), TASK, tmp_path / "out", metadata_file=str(card))
    card.write_text(json.dumps({"state_mean": MEAN, "state_std": STD, "return_scale": 1, "mean": 0}))
    with pytest.raises(ValueError, match=r"unknown keys \['mean'\]"):
        import_model(str(tmp_path / "plain"), TASK, tmp_path / "out", metadata_file=str(card))


def test_statistics_of_another_width_and_no_source_are_refused(tmp_path):
    plain_dt(tmp_path / "plain")
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({"state_mean": [0.0] * 11, "state_std": [1.0] * 11, "return_scale": 1000}))
    with pytest.raises(ValueError, match="11 state dims but the model takes 3"):
        import_model(str(tmp_path / "plain"), TASK, tmp_path / "out", metadata_file=str(card))
    with pytest.raises(ValueError, match="exactly one of --stats-from DATASET or --metadata FILE"):
        import_model(str(tmp_path / "plain"), TASK, tmp_path / "out")


def test_statistics_from_a_dataset(tmp_path):
    data = collect_task(TASK, CollectConfig(policy="random", noise=0.0, episodes=3, seed=1, horizon=16,
                                            out=str(tmp_path / "data")))
    plain_dt(tmp_path / "plain")
    result = import_model(str(tmp_path / "plain"), TASK, tmp_path / "out", stats_from=[str(data.path)])
    dataset = load_trajectories(data.path)
    np.testing.assert_allclose(result.metadata.state_mean, dataset.state_mean, rtol=1e-6)
    np.testing.assert_allclose(result.metadata.state_std, dataset.state_std, rtol=1e-6)
    assert result.metadata.target_returns[TASK] == pytest.approx(float(dataset.max_return(TASK)))


@pytest.mark.slow
def test_cli_imports_a_hub_id_then_evaluates_and_finetunes(tmp_path, card):
    hub_cache(tmp_path / "hub")
    data = collect_task(TASK, CollectConfig(policy="random", noise=0.0, episodes=4, seed=2, horizon=16,
                                            out=str(tmp_path / "data")))
    out = tmp_path / "imported"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "eva_rl.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "imported" in cli("import", "org/tiny-dt", "--task", TASK, "--out", str(out), "--metadata", str(card),
                             "--context-length", "4")
    assert "Pendulum-v1" in cli("evaluate", str(out), "--tasks", TASK, "--episodes", "2", "--num-envs", "2",
                                "--horizon", "10")
    cli("finetune", f"checkpoint={out}", "method=lora", "rank=2", f"train.data.paths=[{data.path}]",
        f"train.out_dir={tmp_path / 'ft'}", "train.steps=2", "train.batch_size=4", "train.eval_every=0",
        "train.eval_steps=[]", "train.val_every=0", "train.checkpoint_every=2", "train.progress=false",
        "train.data.val_fraction=0.25")
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("name", ["hopper-expert-dt.yaml", "hopper-medium-dt.yaml"])
def test_shipped_cards_import_a_hopper_dt(tmp_path, name):
    from eva_rl.experiment import config_path

    plain_dt(tmp_path / "plain", state_dim=11, act_dim=3)
    result = import_model(str(tmp_path / "plain"), "Hopper-v5", tmp_path / "out", metadata_file=str(config_path(name)))
    assert result.metadata.state_dim == 11 and result.metadata.target_returns == {"Hopper-v5": 3600.0}
    assert result.metadata.return_scale == 1000.0
