"""`eva-rl finetune`: checkpoint + task data -> method -> train -> adapter, merged model, metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import DecisionTransformerModel

from eva_rl.cli import main
from eva_rl.config import load_config
from eva_rl.data.collect import CollectConfig, collect_task
from eva_rl.data.trajectories import load_trajectories
from eva_rl.finetune import FinetuneConfig, finetune
from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

TASK = "Pendulum-v1"  # obs 3, act 1: cheap to collect and to evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    pre = collect_task(TASK, CollectConfig(policy="random", noise=0.0, episodes=4, seed=1, horizon=24,
                                           out=str(root / "pre")))
    task = collect_task(TASK, CollectConfig(policy="random", noise=0.0, episodes=8, seed=2, horizon=24,
                                            out=str(root / "task")))
    config = PolicyConfig.from_preset("tiny", state_dim=3, act_dim=1, hidden_size=16, n_layer=1, n_head=2,
                                      context_length=4, max_ep_len=64, dropout=0.0)
    torch.manual_seed(0)
    policy = DecisionTransformerPolicy(config, PolicyMetadata.from_dataset(load_trajectories(pre.path)))
    policy.save_pretrained(root / "pretrained")
    policy.model.save_pretrained(root / "plain")  # a bare DecisionTransformerModel dir
    return {"root": root, "data": str(task.path), "checkpoint": str(root / "pretrained"), "plain": str(root / "plain")}


def overrides(setup: dict, out: Path, **extra) -> list[str]:
    keys = {"checkpoint": setup["checkpoint"], "train.data.paths": f"[{setup['data']}]", "train.out_dir": str(out),
            "train.steps": 6, "train.batch_size": 8, "train.eval_every": 6, "train.eval_episodes": 2,
            "train.eval_num_envs": 2, "train.eval_horizon": 8, "train.val_every": 3, "train.val_batches": 2,
            "train.log_every": 2, "train.checkpoint_every": 3, "train.progress": False, "train.data.val_fraction": 0.25,
            "train.optim.warmup_steps": 1, "eva.batch_size": 8, "eva.max_batches": 10, "rank": 2, **extra}
    return [f"{k}={v}" for k, v in keys.items()]


def window_batch(setup: dict, context: int = 4) -> dict:
    data = load_trajectories(setup["data"])
    policy = DecisionTransformerPolicy.from_pretrained(setup["checkpoint"])
    data = data.with_normalization(policy.metadata.state_mean_array, policy.metadata.state_std_array,
                                   policy.metadata.return_scale)
    import numpy as np

    return data.sample(6, context, generator=np.random.default_rng(0))


def test_eva_finetune_writes_adapter_merged_model_report_and_metrics(setup, tmp_path) -> None:
    out = tmp_path / "eva"
    config = load_config(FinetuneConfig, None, overrides(setup, out, method="eva", merge="true"))
    result = finetune(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "finetune" and metrics["method"] == "eva" and metrics["task"] == TASK
    assert metrics["rank"] == 2 and metrics["eva_seconds"] > 0 and metrics["train_seconds"] > 0
    assert [s for s, _ in metrics["train_loss"]] == [0, 2, 4, 6]
    assert [s for s, _ in metrics["val_action_error"]] == [0, 3, 6]
    assert [e["step"] for e in metrics["eval"]] == [0, 6] and metrics["final"]["success_rate"] is not None
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    report = json.loads((out / "eva_report.json").read_text())
    assert set(report["ranks"].values()) == {2} and (out / "eva_ranks.png").exists()
    # the resolved config says what was used: the checkpoint's K (4) and return scale, not the defaults
    saved = load_config(FinetuneConfig, out / "config.yaml")
    policy = DecisionTransformerPolicy.from_pretrained(setup["checkpoint"])
    assert saved.context_length == 4 and saved.train.data.return_scale == policy.metadata.return_scale
    assert saved == dataclasses.replace(config, context_length=4, train=dataclasses.replace(
        config.train, data=dataclasses.replace(config.train.data, return_scale=policy.metadata.return_scale)))

    batch = window_batch(setup)
    trained = result.policy.eval()
    expected = trained(batch)
    base = DecisionTransformerModel.from_pretrained(setup["checkpoint"])
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    plain = DecisionTransformerPolicy.from_pretrained(setup["checkpoint"])
    plain.model = adapted
    assert torch.allclose(plain(batch), expected, atol=1e-5)
    merged = DecisionTransformerPolicy.from_pretrained(out / "merged")
    assert TASK in merged.metadata.tasks
    assert torch.allclose(merged(batch), expected, atol=1e-5)
    assert json.loads((out / "adapter" / "eva_rl_adapter.json").read_text())["method"] == "eva"


def test_success_curve_points_are_the_configured_steps_on_the_same_starts_for_every_method(setup, tmp_path) -> None:
    runs = {}
    for method in ("lora", "eva"):
        runs[method] = finetune(load_config(FinetuneConfig, None, overrides(
            setup, tmp_path / method, method=method, **{"train.eval_every": 0, "train.eval_steps": "[0,3]"}))).metrics
    for metrics in runs.values():
        assert [e["step"] for e in metrics["eval"]] == [0, 3, 6]
        assert metrics["eval_protocol"]["steps"] == [0, 3, 6]
        assert [s for s, _ in metrics["train_loss"]][0] == 0 and metrics["val_action_error"][0][0] == 0
        cell = metrics["eval"][0]["per_task"][TASK]
        assert cell["episodes"] == 2 and len(cell["episode_success"]) == 2
        assert cell["successes"] == sum(cell["episode_success"]) and metrics["eval"][0]["episodes"] == 2
    assert runs["lora"]["eval_protocol"] == runs["eva"]["eval_protocol"]
    assert runs["eva"]["eval_protocol"]["seed"] == 1_000_000 and TASK in runs["eva"]["eval_protocol"]["target_returns"]
    # step 0 is the pretrained policy for both (B = 0): the same starts give the same episodes
    lora0, eva0 = runs["lora"]["eval"][0], runs["eva"]["eval"][0]
    assert lora0["return_mean"] == pytest.approx(eva0["return_mean"], rel=1e-4)
    assert lora0["per_task"][TASK]["episode_success"] == eva0["per_task"][TASK]["episode_success"]
    assert runs["lora"]["val_action_error"][0][1] == pytest.approx(runs["eva"]["val_action_error"][0][1], rel=1e-5)


def test_eva_draws_from_the_same_episode_subset_as_training_for_every_method(setup, tmp_path) -> None:
    import numpy as np

    from eva_rl.finetune import _eva_batches
    from eva_rl.train import split_data

    data = load_trajectories(setup["data"])
    data = data.with_normalization(np.zeros(data.state_dim, np.float32), np.ones(data.state_dim, np.float32))
    configs = [load_config(FinetuneConfig, None, overrides(setup, tmp_path, method=method,
                                                           **{"train.data.episodes": 2}))
               for method in ("eva", "eva_dora")]
    subsets = [split_data(data, config.train)[0] for config in configs]
    np.testing.assert_array_equal(subsets[0].observations, subsets[1].observations)
    assert subsets[0].num_episodes == 2
    kept = {tuple(np.round(row, 5)) for row in subsets[0].observations.tolist()}
    for batch in _eva_batches(data, configs[0], context=4):
        real = batch["states"][batch["attention_mask"].bool()]  # (real steps, state_dim)
        assert all(tuple(np.round(row, 5)) in kept for row in real.tolist())


def test_resume_reuses_eva_components_and_refuses_another_rank(setup, tmp_path, monkeypatch) -> None:
    out = tmp_path / "resume"
    finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="eva", **{"train.eval_every": 0})))
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    (out / "metrics.json").unlink()
    with pytest.raises(ValueError, match="Cannot resume.*rank: checkpoint 2, now 1"):  # not a tensor shape error
        finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="eva", rank=1, **{
            "train.eval_every": 0, "train.resume": "true"})))

    def no_eva(*args, **kwargs):
        raise AssertionError("EVA ran again on resume")

    monkeypatch.setattr("eva_rl.finetune.eva_state_dict", no_eva)
    result = finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="eva", **{
        "train.eval_every": 0, "train.resume": "true"})))
    assert result.metrics["eva_seconds"] is not None
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == first


def test_resume_recomputes_eva_made_with_another_rank(setup, tmp_path) -> None:
    out = tmp_path / "rerank"
    finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="eva", **{"train.steps": 0,
                                                                                       "train.eval_every": 0})))
    (out / "metrics.json").unlink()  # the run died before its first checkpoint; restarted with rank 1
    finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="eva", rank=1, **{
        "train.steps": 0, "train.eval_every": 0, "train.resume": "true"})))
    ranks = json.loads((out / "adapter" / "eva_rl_adapter.json").read_text())["ranks"]
    assert set(ranks.values()) == {1}


def test_a_refused_restart_leaves_the_old_run_untouched(setup, tmp_path) -> None:
    out = tmp_path / "refused"
    finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="lora", **{"train.eval_every": 0})))
    before = (out / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="resume"):
        finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="dora", **{"train.eval_every": 0})))
    assert (out / "config.yaml").read_text() == before


def test_zero_steps_writes_the_initial_adapter_and_evaluates_the_unchanged_policy(setup, tmp_path) -> None:
    out = tmp_path / "zero"
    result = finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="pissa", **{"train.steps": 0})))
    assert result.metrics["eval"][0]["step"] == 0
    batch = window_batch(setup)
    base = DecisionTransformerPolicy.from_pretrained(setup["checkpoint"])
    expected = base(batch)
    base.model = PeftModel.from_pretrained(base.model, out / "adapter").eval()
    assert torch.allclose(base(batch), expected, atol=1e-5)


def test_cli_adalora_from_yaml_and_a_plain_checkpoint(setup, tmp_path, capsys) -> None:
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text(yaml.safe_dump({"method": "adalora", "train": {"steps": 6, "eval_every": 0}}))
    out = tmp_path / "ada"
    args = overrides(setup, out, checkpoint=setup["plain"], **{"train.eval_every": 0})
    assert main(["finetune", str(yaml_file), *args]) == 0
    assert "adalora on Pendulum-v1" in capsys.readouterr().out
    meta = json.loads((out / "adapter" / "eva_rl_adapter.json").read_text())
    assert meta["method"] == "adalora"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 6


def test_adapter_on_a_plain_checkpoint_reloads_with_its_context_length(setup, tmp_path) -> None:
    from eva_rl.evaluate import load_policy

    out = tmp_path / "plain"
    finetune(load_config(FinetuneConfig, None, overrides(setup, out, method="lora", checkpoint=setup["plain"],
                                                         context_length=4, **{"train.steps": 2,
                                                                              "train.eval_every": 0})))
    assert load_policy(out / "adapter").config.context_length == 4  # not the plain default 20


@pytest.mark.parametrize("key,value,message", [
    ("method", "qlora", "Known methods: fft, lora"),
    ("rank", "64", "above the width"),
    ("target_modules", "[q_proj]", "matches no Linear/Conv1D"),
    ("eva.tokens", "[reward]", "eva.tokens"),
    ("modules_to_save", "[predict_actoin]", "matches no module"),
    ("train.policy.context_length", "8", "train.policy.context_length set in a fine-tuning config"),
])
def test_bad_input_fails_before_any_work(setup, tmp_path, capsys, key, value, message) -> None:
    out = tmp_path / "bad"
    assert main(["finetune", *overrides(setup, out, **{"method": "eva", key: value})]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "eva").exists()


def test_adalora_with_nothing_to_prune_fails_before_any_work(setup, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    assert main(["finetune", *overrides(setup, out, **{"method": "adalora", "rank": "4",
                                                        "adalora.init_rank": "4"})]) == 2
    assert "adalora.init_rank (4) must be above rank (4)" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_checkpoint_that_does_not_fit_the_data(setup, tmp_path, capsys) -> None:
    config = PolicyConfig.from_preset("tiny", state_dim=5, act_dim=1, hidden_size=16, n_layer=1, n_head=2,
                                      context_length=4, max_ep_len=64)
    DecisionTransformerPolicy(config, PolicyMetadata(state_mean=[0.0] * 5, state_std=[1.0] * 5)).save_pretrained(
        tmp_path / "wide")
    assert main(["finetune", *overrides(setup, tmp_path / "out", checkpoint=str(tmp_path / "wide"))]) == 2
    assert "takes states of 5 and actions of 1 dims but the dataset has 3 and 1" in capsys.readouterr().err


def _eva_worker(rank: int, port: int, args: list[str], out: str) -> None:
    """One of two gloo ranks of a fine-tuning job, started as torchrun would (environment variables)."""
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    result = finetune(load_config(FinetuneConfig, None, args))
    torch.save({k: v.detach().clone() for k, v in result.policy.state_dict().items() if "lora_A" in k},
               Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_distributed_eva_pools_every_process_share_and_matches_one_process(setup, tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    keys = {"method": "eva", "train.steps": 0, "train.eval_every": 0, "train.eval_steps": "[]",
            "train.checkpoint_every": 0, "eva.max_batches": 4}
    args = overrides(setup, tmp_path / "two", **keys)
    # fork: the children reuse the imported modules; each keeps its own rows of every EVA batch
    mp.start_processes(_eva_worker, args=(port, args, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = finetune(load_config(FinetuneConfig, None, overrides(setup, tmp_path / "one", **keys))).policy
    single_a = {k: v for k, v in single.state_dict().items() if "lora_A" in k}
    assert set(ranks[0]) == set(single_a) and single_a
    for name, a in single_a.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank ends with the same A
        # one process on the pooled windows: the same subspace (sums in another order)
        qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(ranks[0][name].double().T)[0]
        assert float(torch.linalg.svdvals(qa.T @ qb).min()) > 0.9999, name
    report = json.loads((tmp_path / "two" / "eva_report.json").read_text())
    assert report["tokens_seen"] == json.loads((tmp_path / "one" / "eva_report.json").read_text())["tokens_seen"]



class _Killed(Exception):
    pass


def _forget(out: Path, *keys: str) -> None:
    """Make config.yaml and every checkpoint's config look written before a release added `keys`."""
    def drop(config: dict, key: str) -> None:
        *parents, leaf = key.split(".")
        for part in parents:
            config = config[part]
        del config[leaf]

    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key in keys:
        drop(saved, key)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    for meta_path in (out / "checkpoints").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        for key in keys:
            if key.startswith("train."):
                drop(meta["config"], key.removeprefix("train."))
        meta_path.write_text(json.dumps(meta))


def test_a_run_saved_before_a_key_existed_resumes_exactly(setup, tmp_path, monkeypatch) -> None:
    import eva_rl.finetune as finetune_module

    keys = {"method": "lora", "train.eval_every": 0, "train.val_every": 0}
    straight = finetune(load_config(FinetuneConfig, None, overrides(setup, tmp_path / "straight", **keys)))
    out = tmp_path / "old"
    real_train = finetune_module.train

    def killed_at_step_4(*args, **kwargs):
        def hook(step: int) -> None:
            if step == 4:
                raise _Killed
        return real_train(*args, **{**kwargs, "on_step": hook})

    monkeypatch.setattr(finetune_module, "train", killed_at_step_4)
    with pytest.raises(_Killed):
        finetune(load_config(FinetuneConfig, None, overrides(setup, out, **keys)))
    monkeypatch.setattr(finetune_module, "train", real_train)
    # train.eval_steps: fine-tuning's default [0] is not TrainConfig's [], and still counts as the default
    _forget(out, "dropout", "train.eval_steps")
    with pytest.raises(ValueError, match=r"Cannot resume: .*dropout: checkpoint unset, now 0\.1"):
        finetune(load_config(FinetuneConfig, None, overrides(setup, out, dropout=0.1, **keys, **{"train.resume": "true"})))
    with pytest.raises(ValueError, match=r"Cannot resume: .*train\.eval_steps: checkpoint unset, now \[6\]"):
        finetune(load_config(FinetuneConfig, None, overrides(setup, out, **keys, **{
            "train.resume": "true", "train.eval_steps": "[6]"})))
    resumed = finetune(load_config(FinetuneConfig, None, overrides(setup, out, **keys, **{"train.resume": "true"})))
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    for key, value in straight.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[key]), key
