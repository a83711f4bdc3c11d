"""DecisionTransformerPolicy: config, metadata, checkpoints, forward and loss (acting: test_rollout.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DecisionTransformerModel

from eva_rl import evaluate as eva_rl_evaluate
from eva_rl.policy import DecisionTransformerPolicy, MissingMetadataError, PolicyConfig, PolicyMetadata, load_policy

STATE_DIM, ACT_DIM = 6, 3


def make_metadata(**overrides) -> PolicyMetadata:
    rng = np.random.default_rng(1)
    kwargs = dict(
        state_mean=rng.standard_normal(STATE_DIM), state_std=rng.random(STATE_DIM) + 0.5, return_scale=10.0,
        tasks=("wide", "narrow"), target_returns={"wide": 5.0, "narrow": 2.0}, obs_dims=(6, 4), act_dims=(3, 2),
    )
    kwargs.update(overrides)
    return PolicyMetadata(**kwargs)


def make_policy(n_layer: int = 1, **overrides) -> DecisionTransformerPolicy:
    torch.manual_seed(0)
    config = PolicyConfig.from_preset("tiny", state_dim=STATE_DIM, act_dim=ACT_DIM, n_layer=n_layer,
                                      max_ep_len=12, **overrides)
    return DecisionTransformerPolicy(config, make_metadata()).eval()


def make_batch(batch_size: int = 4, context: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch_size, context, dtype=torch.long)
    mask[0, :2] = 0  # left padding, as the sampler makes at episode starts
    return {
        "states": torch.randn(batch_size, context, STATE_DIM, generator=g),
        "actions": torch.rand(batch_size, context, ACT_DIM, generator=g) * 2 - 1,
        "rewards": torch.randn(batch_size, context, 1, generator=g),
        "returns_to_go": torch.randn(batch_size, context, 1, generator=g),
        "timesteps": torch.arange(context).repeat(batch_size, 1) + 3,
        "attention_mask": mask,
        "task_ids": torch.tensor([0, 1, 0, 1][:batch_size]),
    }


# -- config and metadata ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PolicyConfig.PRESETS))
def test_a_preset_builds_the_model_it_names_and_takes_overrides(name):
    config = PolicyConfig.from_preset(name, state_dim=3, act_dim=1)
    model = DecisionTransformerModel(config.to_transformers())
    blocks = model.encoder.h
    assert len(blocks) == config.n_layer and blocks[0].attn.num_heads == config.n_head
    assert model.embed_state.out_features == config.hidden_size and model.embed_state.in_features == 3
    wider = PolicyConfig.from_preset(name, state_dim=3, act_dim=1, hidden_size=2 * config.hidden_size)
    assert wider.hidden_size == 2 * config.hidden_size and wider.n_layer == config.n_layer  # the rest stays the preset's
    with pytest.raises(ValueError, match="Unknown policy preset 'huge'"):
        PolicyConfig.from_preset("huge", state_dim=3, act_dim=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=30, n_head=4), "divisible by n_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(context_length=0), "context_length"),
    (dict(activation="swishy"), "activation"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(state_dim=3, act_dim=1, **kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown policy preset 'huge'"):
        PolicyConfig.from_preset("huge", state_dim=3, act_dim=1)


@pytest.mark.parametrize("overrides, match", [
    (dict(state_std=np.ones(5)), "same length"),
    (dict(state_std=np.zeros(STATE_DIM)), "> 0"),
    (dict(act_dims=(3,)), "act_dims has 1 entries but tasks has 2"),
    (dict(return_scale=0.0), "return_scale"),
    (dict(obs_dims=(7, 4)), "exceed the state width"),
])
def test_metadata_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_metadata(**overrides)


def test_metadata_json_round_trip():
    meta = make_metadata()
    assert PolicyMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_policy_rejects_mismatched_metadata():
    config = PolicyConfig.from_preset("tiny", state_dim=STATE_DIM + 1, act_dim=ACT_DIM)
    with pytest.raises(ValueError, match=r"6-dim states but the policy takes state_dim=7"):
        DecisionTransformerPolicy(config, make_metadata())


# -- loss ----------------------------------------------------------------------------------------

def test_loss_ignores_padding_steps_and_unused_action_dims():
    policy = make_policy()
    batch = make_batch()
    loss = policy.loss(batch)
    pred = policy(batch).detach()
    dims = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])  # task 0: 3 action dims, task 1: 2
    mask = batch["attention_mask"][..., None].float() * dims[:, None]
    expected = ((pred - batch["actions"]) ** 2 * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), expected)
    # targets where the mask is 0 do not matter
    changed = dict(batch, actions=batch["actions"].clone())
    changed["actions"][0, :2] = 9.0  # padding steps
    changed["actions"][1, :, 2] = 9.0  # task 1 has 2 action dims
    torch.testing.assert_close(policy.loss(changed), loss)
    loss.backward()
    assert policy.model.predict_action[0].weight.grad.abs().sum() > 0


def test_loss_rejects_unknown_task_ids():
    batch = dict(make_batch(), task_ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="task_ids go up to 2"):
        make_policy().loss(batch)


def test_forward_rejects_wrong_state_width():
    batch = dict(make_batch(), states=torch.zeros(4, 5, STATE_DIM + 2))
    with pytest.raises(ValueError, match=r"\(batch, context, 6\)"):
        make_policy()(batch)


# -- forward against transformers ---------------------------------------------------------------

def padded_batch() -> dict[str, torch.Tensor]:
    batch = make_batch()
    batch["attention_mask"][1, :4] = 0  # a single real step
    batch["attention_mask"][2, :1] = 0
    return batch


def transformers_actions(policy: DecisionTransformerPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: transformers' own DecisionTransformerModel.forward (adapters injected in place)."""
    return policy._dt()(states=batch["states"], actions=batch["actions"], rewards=batch["rewards"],
                        returns_to_go=batch["returns_to_go"], timesteps=batch["timesteps"],
                        attention_mask=batch["attention_mask"], return_dict=True).action_preds


def with_random_lora(policy: DecisionTransformerPolicy) -> DecisionTransformerPolicy:
    from eva_rl.adapters.methods import apply_method

    apply_method(policy, "lora", rank=4)
    with torch.no_grad():  # PEFT starts B at 0, a no-op adapter: random B makes it change the outputs
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return policy


@pytest.mark.parametrize("adapter", [False, True])
def test_forward_equals_transformers_in_eval_mode(adapter):
    policy = make_policy(n_layer=2)
    batch = padded_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        plain = policy(batch)
        if adapter:
            with_random_lora(policy).eval()
        ours, reference = policy(batch), transformers_actions(policy, batch)
    if adapter:
        assert (ours - plain)[real].abs().max() > 1e-3
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", [False, True])
def test_training_forward_and_gradients_equal_transformers_without_dropout(adapter):
    """Train mode (last block on the state tokens only, attention written out) with dropout 0
    computes transformers' actions and the same loss gradients."""
    policy = make_policy(n_layer=2, dropout=0.0)
    if adapter:
        with_random_lora(policy)
    policy.train()
    batch = padded_batch()
    real = batch["attention_mask"].bool()
    params = [p for p in policy.parameters() if p.requires_grad]
    ours = policy(batch)
    reference = transformers_actions(policy, batch)
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=0)
    mask = real[..., None] * policy.action_dim_mask(batch["task_ids"], 4)[:, None]
    reference_loss = ((reference - batch["actions"]).square() * mask).sum() / mask.sum()
    grads = torch.autograd.grad(policy.loss(batch), params, allow_unused=True)
    reference_grads = torch.autograd.grad(reference_loss, params, allow_unused=True)
    assert sum(g is not None for g in grads) > len(params) // 2
    for ours_grad, reference_grad in zip(grads, reference_grads):
        assert (ours_grad is None) == (reference_grad is None)
        if ours_grad is not None:
            torch.testing.assert_close(ours_grad, reference_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("site", ["encoder.drop", "attn.attn_dropout", "attn.resid_dropout", "mlp.dropout"])
def test_training_forward_applies_each_gpt2_dropout(site):
    policy = make_policy(n_layer=2, dropout=0.0)
    batch = padded_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        clean = policy(batch)
        for name, module in policy.model.named_modules():
            if name.endswith(site):
                module.p = 0.5
        policy.train()
        outputs = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            outputs.append(policy(batch))
    assert torch.equal(outputs[0], outputs[1])  # the masks follow torch's generator
    # (a tiny freshly initialised model moves little: 1e-5 is still 100x float32 rounding here)
    assert (outputs[0] - clean)[real].abs().max() > 1e-5
    assert (outputs[0] - outputs[2])[real].abs().max() > 1e-5


def test_dropout_keeps_1_minus_p_rescaled_with_a_new_mask_each_call():
    from eva_rl.policy import _Dropout

    module = torch.nn.Dropout(0.25)
    drop = _Dropout(torch.device("cpu"))
    out = drop(torch.ones(200_000), module)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 5 standard errors
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert not torch.equal(drop(torch.ones(100), module), drop(torch.ones(100), module))
    assert torch.equal(drop(torch.ones(100), module.eval()), torch.ones(100))


# -- checkpoints ---------------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    policy = make_policy(n_layer=2)
    batch = make_batch()
    policy.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors" in files and "config.json" in files and "eva_rl.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = DecisionTransformerPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == policy.config and loaded.metadata == policy.metadata
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(batch), policy(batch))
    obs = np.random.default_rng(0).standard_normal((2, STATE_DIM)).astype(np.float32)
    np.testing.assert_array_equal(loaded.act(loaded.start_rollout(2, 5.0), obs),
                                  policy.act(policy.start_rollout(2, 5.0), obs))


def test_plain_transformers_loads_the_weights(tmp_path):
    policy = make_policy(n_layer=2)
    policy.save_pretrained(tmp_path)
    model = DecisionTransformerModel.from_pretrained(tmp_path)
    reference = policy.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert model.config.state_dim == STATE_DIM and model.config.n_layer == 2


def test_save_replaces_a_checkpoint_but_not_other_directories(tmp_path):
    make_policy(n_layer=1).save_pretrained(tmp_path / "ckpt")
    make_policy(n_layer=2).save_pretrained(tmp_path / "ckpt")
    assert DecisionTransformerPolicy.from_pretrained(tmp_path / "ckpt").config.n_layer == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no checkpoint"):
        make_policy().save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def _saved(tmp_path, name="ckpt", **overrides) -> tuple[DecisionTransformerPolicy, Path]:
    policy = make_policy(**overrides)
    policy.save_pretrained(tmp_path / name)
    return policy, tmp_path / name


def _same_outputs(a: DecisionTransformerPolicy, b: DecisionTransformerPolicy) -> bool:
    batch = make_batch()
    with torch.no_grad():
        return torch.equal(a(batch), b(batch))


def test_load_policy_loads_checkpoints_plain_models_and_run_dirs(tmp_path):
    policy, path = _saved(tmp_path, "run/model", n_layer=2)
    assert load_policy(path).config == policy.config and _same_outputs(load_policy(path), policy)
    assert load_policy(tmp_path / "run").config == policy.config  # a pretraining run's folder: its model/
    assert eva_rl_evaluate.load_policy is load_policy  # the old home still works
    policy.model.save_pretrained(tmp_path / "plain")  # transformers alone: no eva_rl.json
    with pytest.raises(MissingMetadataError, match=r"without eva_rl.json.*`eva-rl import`.*metadata=PolicyMetadata"):
        load_policy(tmp_path / "plain")
    loaded = load_policy(tmp_path / "plain", metadata=make_metadata(), context_length=5)
    assert loaded.metadata == make_metadata() and loaded.config.context_length == 5 and _same_outputs(loaded, policy)
    (tmp_path / "finetuned" / "adapter").mkdir(parents=True)
    (tmp_path / "finetuned" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither a checkpoint.*contains \['adapter'\]: pass one"):
        load_policy(tmp_path / "finetuned")
    with pytest.raises(FileNotFoundError, match="No policy at .*missing"):
        load_policy(tmp_path / "missing")


def test_one_table_maps_the_config_both_ways():
    config = PolicyConfig.from_preset("tiny", state_dim=4, act_dim=2, activation="gelu_new", action_tanh=False)
    hf = config.to_transformers()
    assert hf.activation_function == "gelu_new" and hf.n_positions == 3 * config.context_length
    assert PolicyConfig.from_transformers(hf, context_length=config.context_length) == config
    other = dataclasses.replace(config, activation="relu")
    assert config.mismatches(other) == ["activation (activation_function): 'gelu_new' vs 'relu'"]
    with pytest.raises(ValueError, match=r"config vs model\): activation \(activation_function\): 'relu' vs 'gelu_new'"):
        DecisionTransformerPolicy(other, make_metadata(state_mean=np.zeros(4), state_std=np.ones(4), tasks=(),
                                                       target_returns={}, obs_dims=(), act_dims=()),
                                  model=DecisionTransformerModel(hf))


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    file.write_text(json.dumps(data))


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_damaged_checkpoints_are_one_clear_error_naming_the_file(tmp_path):
    _, path = _saved(tmp_path)
    (path / "config.json").write_text('{"model_type": "decision_tr')
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON.*damaged"):
        load_policy(path)

    _, path = _saved(tmp_path, "truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors' cannot be read .*truncated or damaged"):
        load_policy(path)

    _, path = _saved(tmp_path, "edited")  # config.json and eva_rl.json both say another width
    _edit_json(path / "config.json", state_dim=8)
    _edit_json(path / "eva_rl.json", **{"config.state_dim": 8})
    with pytest.raises(ValueError, match=r"config.json in .*edited' no longer matches the weights: "
                                         r"embed_state.weight: \(32, 6\) in the file, \(32, 8\) from config.json"):
        load_policy(path)

    _, path = _saved(tmp_path, "disagree")
    _edit_json(path / "eva_rl.json", **{"config.hidden_size": 64})
    with pytest.raises(ValueError, match=r"disagree.*hidden_size \(hidden_size\): 64 vs 32"):
        load_policy(path)


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop("predict_action.0.weight"), r"missing predict_action.0.weight"),
    (lambda state: state.update(extra=torch.zeros(2)), r"unexpected extra"),
])
def test_missing_or_unexpected_tensors_are_always_an_error(tmp_path, edit, message):
    _, path = _saved(tmp_path)
    _rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=message + r".*never fills missing layers"):
        load_policy(path)


def test_pickled_weights_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors but \['pytorch_model.bin'\].*never loads pickled"):
        load_policy(path)


def test_a_device_that_is_not_there_is_a_clear_error(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"'cuda': CUDA is not available on this machine; use --device cpu"):
        load_policy(path, device="cuda")


# -- normalisation -----------------------------------------------------------------------------

def test_replacing_metadata_updates_the_normalisation():
    policy = make_policy()
    obs = np.ones((1, STATE_DIM), np.float32)
    before = policy.normalize_observations(obs)
    policy.metadata = make_metadata(state_mean=np.zeros(STATE_DIM), state_std=np.full(STATE_DIM, 2.0))
    torch.testing.assert_close(policy.normalize_observations(obs), torch.full((1, STATE_DIM), 0.5))
    assert not torch.equal(before, policy.normalize_observations(obs))
    with pytest.raises(ValueError, match="5-dim states but the policy takes state_dim=6"):
        policy.metadata = PolicyMetadata(state_mean=np.zeros(5), state_std=np.ones(5))
