"""The offline training loop: schedule, optimizer groups, exact kill-and-resume, atomic checkpoints,
metrics.json, DDP with two CPU processes, config errors, and a tiny Meta-World pretrain."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eva_rl.config import load_config
from eva_rl.data.trajectories import TrajectoryDataset
from eva_rl import storage
from eva_rl.checkpoint import find_checkpoint, save_checkpoint
from eva_rl.train import (RunInfo, TrainConfig, build_policy, evaluation_steps, lr_factor, parameter_groups,
                          train)

TINY_POLICY = ["policy.preset=tiny", "policy.hidden_size=16", "policy.n_layer=1", "policy.n_head=1",
               "policy.context_length=4", "policy.max_ep_len=32", "policy.dropout=0.1"]


def tiny_dataset(episodes: int = 12, length: int = 16, seed: int = 0) -> TrajectoryDataset:
    """Two tasks, obs 5 / act 2, actions a fixed smooth function of the observation (learnable)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(5, 2)).astype(np.float32)
    data = []
    for i in range(episodes):
        obs = np.cumsum(rng.normal(scale=0.3, size=(length + 1, 5)), axis=0).astype(np.float32)
        data.append({"observations": obs, "actions": np.tanh(obs[:-1] @ weight),
                     "rewards": rng.random(length).astype(np.float32), "terminations": np.zeros(length, bool),
                     "truncations": np.eye(1, length, length - 1, dtype=bool)[0],
                     "task": ("task-a", "task-b")[i % 2]})
    return TrajectoryDataset.from_episodes(data, ("task-a", "task-b"), return_scale=10.0)


def tiny_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    base = [*TINY_POLICY, "steps=12", "batch_size=8", "log_every=2", "checkpoint_every=6",
            "optim.warmup_steps=3", "optim.lr=1e-3", "progress=false", f"out_dir={tmp_path}"]
    return load_config(TrainConfig, None, base + list(overrides))


def fresh_policy(config: TrainConfig, dataset: TrajectoryDataset) -> torch.nn.Module:
    return build_policy(config, dataset)  # seeded by config.seed: same weights every call


class Kill(Exception):
    pass


def kill_at(step: int):
    def hook(done: int) -> None:
        if done == step:
            raise Kill
    return hook


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("keys,expected", [
    ({"eval_every": 0, "eval_steps": ()}, []),
    ({"eval_every": 0, "eval_steps": (0, 100, 250, 500)}, [0, 100, 250, 500, 1000]),
    ({"eval_every": 400, "eval_steps": (0, 100, 5000)}, [0, 100, 400, 800, 1000]),
    ({"eval_every": 500, "eval_steps": ()}, [500, 1000]),
])
def test_evaluation_steps_join_the_list_the_multiples_and_the_end(keys, expected):
    assert evaluation_steps(TrainConfig(steps=1000, **keys)) == expected


def test_data_episodes_subset_is_drawn_after_the_validation_split(tmp_path):
    from eva_rl.train import split_data

    dataset = tiny_dataset(episodes=20)
    full_train, full_val = split_data(dataset, tiny_config(tmp_path, "data.val_fraction=0.2"))
    few_train, few_val = split_data(dataset, tiny_config(tmp_path, "data.val_fraction=0.2", "data.episodes=3"))
    np.testing.assert_array_equal(few_val.observations, full_val.observations)  # held-out set unchanged
    assert np.bincount(few_train.episode_tasks).tolist() == [3, 3]
    rows = {tuple(row) for row in full_train.observations.tolist()}
    assert all(tuple(row) in rows for row in few_train.observations.tolist())  # from the training split
    # the run's seed picks the subset unless episodes_seed is set
    def subset(*keys: str):
        return split_data(dataset, tiny_config(tmp_path, "data.val_fraction=0.2", "data.episodes=3", *keys))[0]

    np.testing.assert_array_equal(subset("data.episodes_seed=0").observations, few_train.observations)
    assert not np.array_equal(subset("data.episodes_seed=5").observations, few_train.observations)
    with pytest.raises(ValueError, match="has only 8 training episodes"):
        split_data(dataset, tiny_config(tmp_path, "data.val_fraction=0.2", "data.episodes=9"))


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(19, 4, 20) == pytest.approx(0.0, abs=1e-12)  # last update: the floor
    assert lr_factor(19, 4, 20, min_lr_ratio=0.1) == pytest.approx(0.1)
    middle = 4 + (20 - 4 - 1) / 2
    assert lr_factor(middle, 4, 20) == pytest.approx(0.5)
    values = [lr_factor(s, 4, 20) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)


def test_optimizer_gets_only_trainable_params_and_no_decay_on_bias_norm_embedding(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config(tmp_path, "steps=4", "checkpoint_every=0")
    policy = fresh_policy(config, dataset)
    groups = parameter_groups(policy, 0.1)
    names = {id(p): n for n, p in policy.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    assert any("timestep" in n for n in no_decay)  # the embedding table
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert not any("timestep" in names[id(p)] for p in groups[0]["params"])

    for name, param in policy.named_parameters():
        param.requires_grad = "predict_action" in name
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimized = sum(p.numel() for g in parameter_groups(policy, 0.1) for p in g["params"])
    assert optimized == trainable
    result = train(config, policy=policy, dataset=dataset)
    assert result.metrics["trainable_params"] == trainable
    assert result.metrics["total_params"] == sum(p.numel() for p in policy.parameters())
    for name, param in policy.named_parameters():
        assert torch.equal(before[name], param.detach()) == ("predict_action" not in name), name


def test_loss_decreases_and_metrics_json(tmp_path):
    dataset = tiny_dataset(episodes=16)
    config = tiny_config(tmp_path, "steps=150", "log_every=25", "batch_size=16", "checkpoint_every=0",
                         "data.val_fraction=0.25", "val_every=50", "val_batches=2", "policy.dropout=0.0",
                         "precision=fp32")  # the step-0 loss is checked against an fp32 forward below
    seen = []
    result = train(config, dataset=dataset, on_step=seen.append, run_info=RunInfo(extra={"label": "x"}))
    assert seen == list(range(1, 151))
    losses = [v for _, v in result.metrics["train_loss"]]
    assert losses[-1] < 0.6 * losses[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # the loop knows no fine-tuning fields: the caller's extra ones are written as given
    assert set(metrics) == {"kind", "task", "label", "seed", "trainable_params", "total_params",
                            "train_seconds", "train_loss", "val_action_error", "eval", "eval_protocol", "final"}
    assert metrics["kind"] == "pretrain" and metrics["seed"] == 0 and metrics["label"] == "x"
    assert [s for s, _ in metrics["train_loss"]] == [0, 25, 50, 75, 100, 125, 150]
    assert [s for s, _ in metrics["val_action_error"]] == [0, 50, 100, 150]
    assert metrics["eval_protocol"]["steps"] == [] and metrics["eval_protocol"]["seed"] == config.eval_seed
    # step 0: the loss of the untouched policy on the first batch the loop trains on
    policy = build_policy(config, dataset)
    train_split, _ = dataset.split(0.25, config.seed)
    first = train_split.sample(16, 4, generator=np.random.default_rng([config.seed, 0]))
    first["action_mask"] = (torch.arange(dataset.act_dim) < torch.as_tensor(dataset.act_dims)[first["task_ids"]][:, None]).float()
    with torch.no_grad():
        assert metrics["train_loss"][0][1] == pytest.approx(float(policy.loss(first)), rel=1e-5)
    assert metrics["val_action_error"][-1][1] < metrics["val_action_error"][0][1]
    assert metrics["eval"] == [] and metrics["train_seconds"] > 0
    assert metrics["final"] == {"success_rate": None, "success_stderr": None, "return_mean": None,
                                "return_stderr": None, "score_mean": None, "score_stderr": None,
                                "train_loss": losses[-1],
                                "val_action_error": metrics["val_action_error"][-1][1]}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_regularizer_trains_the_weights_but_stays_out_of_the_logged_loss(tmp_path):
    """AdaLoRA's penalty goes through this path: the gradient sees it, train_loss does not."""
    dataset = tiny_dataset()
    runs = {}
    for name in ("plain", "constant", "shrink"):
        config = tiny_config(tmp_path / name, "checkpoint_every=0", "policy.dropout=0.0")
        policy = fresh_policy(config, dataset)
        params = [p for p in policy.parameters() if p.requires_grad]
        regularizer = {"plain": None,
                       "constant": lambda: torch.tensor(5.0),  # no gradient: must change nothing at all
                       "shrink": lambda: 10.0 * sum(p.square().sum() for p in params)}[name]
        runs[name] = train(config, policy=policy, dataset=dataset, regularizer=regularizer)
    plain, constant, shrink = (runs[n] for n in ("plain", "constant", "shrink"))
    assert constant.metrics["train_loss"] == plain.metrics["train_loss"]  # the 5.0 is not in the log
    assert_same_weights(constant.policy, plain.policy)
    norm = {n: sum(float(p.square().sum()) for p in r.policy.parameters() if p.requires_grad) for n, r in runs.items()}
    assert norm["shrink"] < norm["plain"]  # the penalty's gradient was applied


# before any checkpoint, right after one, between; log_every=4 does not divide checkpoint_every=6, so
# the checkpoint at 6 falls inside a log window whose losses must survive the kill
@pytest.mark.parametrize("kill_step, log_every", [(3, 2), (7, 2), (10, 2), (7, 4)])
def test_kill_and_resume_gives_the_same_weights(tmp_path, monkeypatch, kill_step, log_every):
    dataset = tiny_dataset()
    straight_config = tiny_config(tmp_path / "straight", f"log_every={log_every}")
    straight = train(straight_config, policy=fresh_policy(straight_config, dataset), dataset=dataset)

    config = tiny_config(tmp_path / "killed", f"log_every={log_every}")
    with pytest.raises(Kill):
        train(config, policy=fresh_policy(config, dataset), dataset=dataset, on_step=kill_at(kill_step))
    assert not (tmp_path / "killed" / "metrics.json").exists()
    # resumed from another working directory, the run dir named by an absolute path: still the same run
    monkeypatch.chdir(tmp_path)
    resumed_config = tiny_config(Path("killed"), f"log_every={log_every}", "resume=true")
    resumed = train(resumed_config, policy=fresh_policy(config, dataset), dataset=dataset)
    assert_same_weights(straight.policy, resumed.policy)
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]


def test_checkpoint_is_atomic_and_last_good_one_loads(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config(tmp_path, "keep_checkpoints=2", "checkpoint_every=3")
    with pytest.raises(Kill):
        train(config, policy=fresh_policy(config, dataset), dataset=dataset, on_step=kill_at(11))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", "step_00000009"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000009"
    # a killed writer's temp dirs hold half the files, nothing else changed: one of a step the run
    # never saves again (storage's naming: writer pid and host) and one of eva-rl 0.1 (.tmp-*)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    crashed = [checkpoints / f".step_00000099.{dead}-{storage._HOST}.x1y2", checkpoints / ".tmp-step_00000012-999"]
    for path in crashed:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    assert find_checkpoint(checkpoints) == checkpoints / "step_00000009"
    # a crash between the rename and the pointer, and a dir without its meta.json
    (checkpoints / "latest").write_text("step_00000099\n")
    (checkpoints / "step_00000010").mkdir()
    assert find_checkpoint(checkpoints) == checkpoints / "step_00000009"

    # and a complete-looking newest checkpoint whose optimizer state is damaged: step 6 loads instead
    trainer = checkpoints / "step_00000009" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])

    straight_config = tiny_config(tmp_path / "straight", "checkpoint_every=3")
    straight = train(straight_config, policy=fresh_policy(config, dataset), dataset=dataset)
    resumed = train(tiny_config(tmp_path, "keep_checkpoints=2", "checkpoint_every=3", "resume=true"),
                    policy=fresh_policy(config, dataset), dataset=dataset)
    assert_same_weights(straight.policy, resumed.policy)
    assert not any(path.exists() for path in crashed)


def test_save_checkpoint_keeps_last_n(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, {"x": torch.zeros(1)}, {"history": {}}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert find_checkpoint(tmp_path).name == "step_00000004"
    # a stray step dir without its files (not a checkpoint) must not push a good one out
    (tmp_path / "step_00000009").mkdir()
    save_checkpoint(tmp_path, 5, model, {"x": torch.zeros(1)}, {"history": {}}, keep=2)
    assert find_checkpoint(tmp_path).name == "step_00000005"
    assert {"step_00000004", "step_00000005"} <= {p.name for p in tmp_path.glob("step_*")}
    # re-saving a step replaces it whole, leaving no temp dir
    save_checkpoint(tmp_path, 5, torch.nn.Linear(2, 2), {"x": torch.ones(1)}, {"history": {}}, keep=2)
    assert torch.load(tmp_path / "step_00000005" / "trainer.pt")["x"].item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dir, no journal


def test_a_nan_update_stops_the_run_before_it_is_checkpointed(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config(tmp_path, "log_every=4", "checkpoint_every=3")
    policy = fresh_policy(config, dataset)

    def break_weights(step: int) -> None:
        if step == 5:  # the update of step 5 went NaN: the checkpoint at 6 must not hold it
            with torch.no_grad():
                policy.model.predict_action[0].weight.fill_(float("nan"))

    with pytest.raises(ValueError, match="non-finite by update 6"):
        train(config, policy=policy, dataset=dataset, on_step=break_weights)
    assert find_checkpoint(tmp_path / "checkpoints").name == "step_00000003"


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config(tmp_path, "steps=6", "checkpoint_every=3")
    with pytest.raises(Kill):
        train(config, policy=fresh_policy(config, dataset), dataset=dataset, on_step=kill_at(5))
    with pytest.raises(FileExistsError, match="resume"):
        train(config, policy=fresh_policy(config, dataset), dataset=dataset)
    changed = tiny_config(tmp_path, "steps=6", "checkpoint_every=3", "resume=true", "optim.lr=5e-4")
    with pytest.raises(ValueError, match=r"optim\.lr: checkpoint 0\.001, now 0\.0005"):
        train(changed, policy=fresh_policy(config, dataset), dataset=dataset)


@pytest.mark.parametrize("override, message", [
    ("steps=-1", "steps must be >= 0"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("precision=fp16", "precision must be one of"),
    ("device=tpu", "device must be"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("data.val_fraction=1.0", r"data.val_fraction must be in \[0, 1\)"),
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1"),
    ("eval_steps=[0,-5]", "eval_steps must be updates done"),
    ("data.episodes=0", "data.episodes must be >= 1"),
    ("optim.learning_rate=1", "Unknown config key 'optim.learning_rate'"),
])
def test_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, None, [override])


def test_refused_pretrain_leaves_the_runs_config_yaml(tmp_path, monkeypatch):
    import eva_rl.train as train_module

    dataset = tiny_dataset()
    config = tiny_config(tmp_path, "steps=6", "checkpoint_every=3")
    train(config, policy=fresh_policy(config, dataset), dataset=dataset)
    (tmp_path / "config.yaml").write_text("the run's own config\n")
    monkeypatch.setattr(train_module, "load_dataset", lambda config: dataset)
    with pytest.raises(FileExistsError, match="resume"):
        train_module.pretrain(tiny_config(tmp_path, "steps=6", "checkpoint_every=3", "optim.lr=5e-4"))
    with pytest.raises(ValueError, match=r"optim\.lr: checkpoint 0\.001, now 0\.0005"):
        train_module.pretrain(tiny_config(tmp_path, "steps=6", "checkpoint_every=3", "optim.lr=5e-4", "resume=true"))
    assert (tmp_path / "config.yaml").read_text() == "the run's own config\n"


def test_no_trainable_parameter_is_an_error(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config(tmp_path)
    policy = fresh_policy(config, dataset)
    policy.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(config, policy=policy, dataset=dataset)


def test_config_roundtrips_through_yaml(tmp_path):
    from eva_rl.config import save_config

    config = tiny_config(tmp_path, "data.paths=[a,b]", "eval_tasks=[reach-v3]", "optim.betas=[0.8,0.9]")
    save_config(config, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == config


def ddp_worker(out: Path, rank: int, port: int) -> None:
    """One of two gloo ranks: a straight 8-step run, then a run killed at step 6 and resumed."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    try:
        dataset = tiny_dataset()
        config = tiny_config(out / "straight", "steps=8", "checkpoint_every=4")
        straight = train(config, policy=fresh_policy(config, dataset), dataset=dataset)
        torch.save(straight.policy.state_dict(), out / f"straight{rank}.pt")
        config = tiny_config(out / "killed", "steps=8", "checkpoint_every=4")
        with pytest.raises(Kill):
            train(config, policy=fresh_policy(config, dataset), dataset=dataset, on_step=kill_at(6))
        resumed = train(tiny_config(out / "killed", "steps=8", "checkpoint_every=4", "resume=true"),
                        policy=fresh_policy(config, dataset), dataset=dataset)
        torch.save(resumed.policy.state_dict(), out / f"resumed{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # rank 1 in a child process, rank 0 here (saves one interpreter start on a 2-core machine)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_train; "
            f"test_train.ddp_worker(__import__('pathlib').Path({str(tmp_path)!r}), 1, {port})")
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ddp_worker(tmp_path, 0, port)
    finally:
        output = child.communicate(timeout=120)[0]
    assert child.returncode == 0, output
    straight = [torch.load(tmp_path / f"straight{r}.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / f"resumed{r}.pt") for r in range(2)]
    for key in straight[0]:
        assert torch.equal(straight[0][key], straight[1][key]), key
        assert torch.equal(straight[0][key], resumed[0][key]), key
        assert torch.equal(resumed[0][key], resumed[1][key]), key
    # rank 0 wrote the checkpoint, holding both ranks' sampler states; the ranks sampled differently
    state = torch.load(find_checkpoint(tmp_path / "killed" / "checkpoints") / "trainer.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["rng"][0]["numpy"] != state["rng"][1]["numpy"]
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text())["train_loss"]


@pytest.fixture(scope="module")
def metaworld_datasets(tmp_path_factory) -> list[str]:
    """Short noisy scripted-expert episodes of two Meta-World tasks, written as Minari datasets."""
    import gymnasium as gym

    from eva_rl.data.collect import CollectConfig, collect_episodes, write_dataset

    root = tmp_path_factory.mktemp("datasets")
    config = CollectConfig(policy="expert", noise=0.1, episodes=4, seed=0, horizon=40, out=str(root))
    # collect_episodes + write_dataset rather than collect_task: one env per task instead of two
    spaces = gym.spaces.Box(-np.inf, np.inf, (39,), np.float32), gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    return [str(write_dataset(collect_episodes(task, config), f"eva-rl/{task}-expert-v0", root, *spaces,
                              {"eva_rl_task": task}))
            for task in ("reach-v3", "push-v3")]


@pytest.mark.slow
def test_pretrain_on_two_metaworld_tasks_lowers_the_loss(tmp_path, metaworld_datasets):
    from eva_rl.cli import main

    out = tmp_path / "run"
    (tmp_path / "pretrain.yaml").write_text(
        "data:\n  paths: [" + ", ".join(metaworld_datasets) + "]\n  return_scale: 100.0\n"
        "policy: {preset: tiny, hidden_size: 32, n_layer: 1, n_head: 1, context_length: 5, max_ep_len: 64}\n"
        "optim: {lr: 1e-3, warmup_steps: 20}\nsteps: 250\nbatch_size: 16\nlog_every: 50\n"
        "checkpoint_every: 125\nprogress: false\n"
        "eval_every: 250\neval_episodes: 1\neval_num_envs: 2\neval_horizon: 10\n")
    assert main(["pretrain", str(tmp_path / "pretrain.yaml"), f"out_dir={out}", "policy.dropout=0.0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [v for _, v in metrics["train_loss"]]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    # one evaluation, at the last update, on both training tasks
    assert [entry["step"] for entry in metrics["eval"]] == [250]
    assert 0.0 <= metrics["final"]["success_rate"] <= 1.0 and metrics["final"]["return_mean"] is not None
    assert set(metrics["eval"][0]) == {"step", "success_rate", "success_stderr", "return_mean", "return_stderr",
                                       "episodes", "per_task"}
    assert metrics["eval"][0]["episodes"] == 2 and len(metrics["eval"][0]["per_task"]) == 2
    config = load_config(TrainConfig, out / "config.yaml")
    assert config.steps == 250 and config.policy.dropout == 0.0 and config.out_dir == str(out)
    assert (out / "model" / "config.json").is_file()
    assert find_checkpoint(out / "checkpoints").name == "step_00000250"
    # the saved model rebuilds with the data's dims and predicts the same actions as the trained one
    from transformers import DecisionTransformerModel

    model = DecisionTransformerModel.from_pretrained(out / "model")
    assert model.config.state_dim == 39 and model.config.act_dim == 4


def _drop_from_checkpoints(run_dir: Path, *keys: str) -> None:
    """Make every checkpoint's config look written by an older release that had not these keys yet."""
    for meta_path in (run_dir / "checkpoints").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        for key in keys:
            section = meta["config"]
            *parents, leaf = key.split(".")
            for part in parents:
                section = section[part]
            del section[leaf]
        meta_path.write_text(json.dumps(meta))


def test_resume_from_a_checkpoint_saved_before_a_key_existed(tmp_path):
    dataset = tiny_dataset()
    straight_config = tiny_config(tmp_path / "straight")
    straight = train(straight_config, policy=fresh_policy(straight_config, dataset), dataset=dataset)
    config = tiny_config(tmp_path / "old")
    with pytest.raises(Kill):
        train(config, policy=fresh_policy(config, dataset), dataset=dataset, on_step=kill_at(8))
    _drop_from_checkpoints(tmp_path / "old", "val_batches", "data.episodes_seed")
    # absent and set to another value than the default: another config
    with pytest.raises(ValueError, match=r"Cannot resume: .*val_batches: checkpoint unset, now 4\)"):
        train(tiny_config(tmp_path / "old", "resume=true", "val_batches=4"), policy=fresh_policy(config, dataset),
              dataset=dataset)
    with pytest.raises(ValueError, match=r"data\.episodes_seed: checkpoint unset, now 7"):
        train(tiny_config(tmp_path / "old", "resume=true", "data.episodes_seed=7"),
              policy=fresh_policy(config, dataset), dataset=dataset)
    # absent and at the default: the same run (data.episodes_seed at TrainConfig's None). The
    # defaults are the caller's (fine-tuning's differ from TrainConfig's): where val_batches=4 is
    # the default, 4 matches the checkpoint that lacks it (no validation split here, so the weights
    # are the uninterrupted run's)
    resumed = train(tiny_config(tmp_path / "old", "resume=true", "val_batches=4"), policy=fresh_policy(config, dataset),
                    dataset=dataset, defaults=dataclasses.replace(TrainConfig(), val_batches=4))
    assert_same_weights(straight.policy, resumed.policy)
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path):
    dataset = tiny_dataset()
    config = tiny_config(tmp_path, "steps=4", "checkpoint_every=0")
    train(config, policy=fresh_policy(config, dataset), dataset=dataset)
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a finished run \(metrics.json\)\. Pass --resume"):
        train(config, policy=fresh_policy(config, dataset), dataset=dataset)
    with pytest.raises(FileExistsError, match="no checkpoint to resume from"):
        train(tiny_config(tmp_path, "steps=4", "checkpoint_every=0", "resume=true"),
              policy=fresh_policy(config, dataset), dataset=dataset)
    assert (tmp_path / "metrics.json").read_text() == before
