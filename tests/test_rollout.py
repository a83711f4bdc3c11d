"""Batched incremental acting (eva_rl.rollout) against transformers' own full forward."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

STATE_DIM, ACT_DIM = 6, 3


def make_policy(n_layer: int = 1, **overrides) -> DecisionTransformerPolicy:
    torch.manual_seed(0)
    config = PolicyConfig.from_preset("tiny", state_dim=STATE_DIM, act_dim=ACT_DIM, n_layer=n_layer,
                                      max_ep_len=12, **overrides)
    rng = np.random.default_rng(1)
    metadata = PolicyMetadata(state_mean=rng.standard_normal(STATE_DIM), state_std=rng.random(STATE_DIM) + 0.5,
                              return_scale=10.0, tasks=("wide", "narrow"), target_returns={"wide": 5.0, "narrow": 2.0},
                              obs_dims=(6, 4), act_dims=(3, 2))
    return DecisionTransformerPolicy(config, metadata).eval()


def full_forward_action(policy: DecisionTransformerPolicy, history: dict) -> np.ndarray:
    """The reference: transformers' own `DecisionTransformerModel.forward` (adapters injected in
    place) on the left-padded last-K window; the action of its last step."""
    k, meta = policy.config.context_length, policy.metadata
    n = len(history["obs"])
    lo = max(0, n - k)
    w = n - lo
    states = np.zeros((1, k, STATE_DIM), np.float32)
    actions = np.zeros((1, k, ACT_DIM), np.float32)
    rtg = np.zeros((1, k, 1), np.float32)
    timesteps = np.zeros((1, k), np.int64)
    mask = np.zeros((1, k), np.int64)
    obs = np.stack(history["obs"][lo:])
    states[0, k - w:, : obs.shape[1]] = obs
    states[0, k - w:] = (states[0, k - w:] - meta.state_mean_array) / meta.state_std_array
    actions[0, k - w:] = np.stack((history["actions"] + [np.zeros(ACT_DIM, np.float32)])[lo:n])
    rtg[0, k - w:, 0] = np.array(history["rtg"][lo:]) / meta.return_scale
    timesteps[0, k - w:] = np.minimum(np.arange(lo, n), policy.config.max_ep_len - 1)
    mask[0, k - w:] = 1
    with torch.no_grad():
        out = policy._dt()(states=torch.tensor(states), actions=torch.tensor(actions),
                           rewards=torch.zeros(1, k, 1), returns_to_go=torch.tensor(rtg),
                           timesteps=torch.tensor(timesteps), attention_mask=torch.tensor(mask), return_dict=True)
    return out.action_preds[0, -1].numpy()


@pytest.mark.parametrize("n_layer", [1, 2])
def test_incremental_act_matches_full_forward(n_layer):
    """Several envs, subsets acting, a reset mid-way, episodes longer than K and max_ep_len."""
    policy = make_policy(n_layer=n_layer)
    rng = np.random.default_rng(0)
    targets = [5.0, 3.0, 7.0]
    ctx = policy.start_rollout(3, targets)
    histories = [{"obs": [], "actions": [], "rewards": [], "rtg": []} for _ in range(3)]
    worst = 0.0
    for t in range(16):
        ids = np.array([0, 2]) if t % 5 == 3 else np.arange(3)
        obs = rng.standard_normal((len(ids), STATE_DIM)).astype(np.float32)
        actions = policy.act(ctx, obs, ids)
        assert actions.shape == (len(ids), ACT_DIM) and actions.dtype == np.float32
        rewards = rng.standard_normal(len(ids)).astype(np.float32)
        for row, i in enumerate(ids):
            h = histories[i]
            h["obs"].append(obs[row])
            h["rtg"].append(targets[i] - sum(h["rewards"]))
            worst = max(worst, float(np.abs(full_forward_action(policy, h) - actions[row]).max()))
            h["actions"].append(actions[row])
            h["rewards"].append(float(rewards[row]))
        ctx.step(actions, rewards, ids)
        if t == 9:
            ctx.reset([1], [4.0])
            histories[1] = {"obs": [], "actions": [], "rewards": [], "rtg": []}
            targets[1] = 4.0
    assert worst < 1e-5


def test_act_pads_narrow_observations_and_matches_forward():
    policy = make_policy()
    obs = np.ones((1, 4), np.float32)  # the "narrow" task: 4 of 6 state dims
    action = policy.act(policy.start_rollout(1, 2.0), obs)[0]
    history = {"obs": [np.pad(obs[0], (0, 2))], "actions": [], "rewards": [], "rtg": [2.0]}
    np.testing.assert_allclose(action, full_forward_action(policy, history), atol=1e-5)


def test_act_uses_eval_mode_and_restores_training():
    policy = make_policy(dropout=0.5).train()
    obs = np.ones((2, STATE_DIM), np.float32)
    first = policy.act(policy.start_rollout(2, 1.0), obs)
    second = policy.act(policy.start_rollout(2, 1.0), obs)
    np.testing.assert_array_equal(first, second)
    assert policy.training


def test_bf16_act_is_close_to_fp32():
    policy = make_policy()
    obs = np.random.default_rng(0).standard_normal((2, STATE_DIM)).astype(np.float32)
    fp32 = policy.act(policy.start_rollout(2, 5.0), obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # emulated bf16 on CPUs without AVX512-BF16
        bf16 = policy.act(policy.start_rollout(2, 5.0, bf16=True), obs)
    np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_act_errors():
    policy = make_policy()
    ctx = policy.start_rollout(2, 1.0)
    with pytest.raises(ValueError, match="policy takes at most state_dim=6"):
        policy.act(ctx, np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="2 observations for 1 envs"):
        policy.act(ctx, np.zeros((2, 6), np.float32), env_ids=[0])
    with pytest.raises(ValueError, match=r"env_ids must be in \[0, 2\)"):
        ctx.step(np.zeros((1, 3)), np.zeros(1), env_ids=[5])
    with pytest.raises(ValueError, match="NaN or inf"):
        policy.act(ctx, np.full((2, 6), np.nan, np.float32))


@pytest.mark.parametrize("use_dora", [False, True])
def test_incremental_act_matches_full_forward_with_peft_adapters(use_dora):
    """Adapters replace the Conv1D layers: act must go through them, not the base weights."""
    from peft import LoraConfig, get_peft_model

    policy = make_policy(n_layer=2)
    before = policy.act(policy.start_rollout(1, 5.0), np.ones((1, STATE_DIM), np.float32))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                        init_lora_weights=False, use_dora=use_dora, fan_in_fan_out=True)  # random B
    policy.model = get_peft_model(policy.model, config)
    policy.eval()
    ctx = policy.start_rollout(1, 5.0)
    history = {"obs": [], "actions": [], "rewards": [], "rtg": []}
    rng = np.random.default_rng(0)
    for t in range(7):
        obs = rng.standard_normal((1, STATE_DIM)).astype(np.float32)
        action = policy.act(ctx, obs)
        if t == 0:
            assert np.abs(action - before).max() > 1e-4
        history["obs"].append(obs[0])
        history["rtg"].append(5.0 - sum(history["rewards"]))
        np.testing.assert_allclose(action[0], full_forward_action(policy, history), atol=1e-5)
        history["actions"].append(action[0])
        history["rewards"].append(1.0)
        ctx.step(action, np.ones(1, np.float32))


def test_an_envs_action_does_not_depend_on_the_envs_acting_beside_it():
    """Whatever the subset that acts (1 to 5 of 6 envs), as the pipelined evaluation needs: to
    float32 rounding (bit for bit on AVX2; MKL's AVX-512 kernels round 4 and 6 rows differently)."""
    policy = make_policy(n_layer=2)
    rng = np.random.default_rng(3)
    together, apart = policy.start_rollout(6, 5.0), policy.start_rollout(6, 5.0)
    for t in range(7):
        obs = rng.standard_normal((6, STATE_DIM)).astype(np.float32)
        expected = policy.act(together, obs)
        subsets = [[0], [1, 2], [3, 4, 5]] if t % 2 else [[0, 1, 2, 3, 4], [5]]
        got = np.concatenate([policy.act(apart, obs[ids], ids) for ids in subsets])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        again = np.concatenate([policy.act(apart, obs[ids], ids) for ids in subsets])
        np.testing.assert_array_equal(again, got)  # the same call twice: the same bits
        rewards = rng.standard_normal(6).astype(np.float32)
        together.step(expected, rewards)
        apart.step(got, rewards)
    assert policy.act(apart, np.zeros((0, STATE_DIM), np.float32), []).shape == (0, ACT_DIM)
