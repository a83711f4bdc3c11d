"""The Decision Transformer policy: config, metadata, checkpoints, and batched incremental acting.

The network is `transformers.DecisionTransformerModel` (GPT-2 blocks); this module adds what a
policy needs around it:

- `PolicyConfig`: the architecture (one frozen dataclass, with the `tiny`/`small`/`paper` presets);
- `PolicyMetadata`: what the network cannot know (state normalisation, return scale, the tasks it
  was trained on, their true observation/action widths and target returns);
- `DecisionTransformerPolicy.save_pretrained` / `.from_pretrained`: a checkpoint directory that
  plain `DecisionTransformerModel.from_pretrained(dir)` also loads (config.json + model.safetensors),
  plus `eva_rl.json` (config and metadata as JSON: loading never unpickles);
- `forward(batch)` / `loss(batch)` on `TrajectoryDataset.sample()` batches;
- `start_rollout` / `act`: inference for many envs at once, each with its own context of its last
  K steps, in one forward pass that computes only what the next action needs.

Tokens per step: (return-to-go, state, action); a window of K steps is 3K tokens; the action for
step t is read from the hidden state of the state token s_t.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DecisionTransformerConfig, DecisionTransformerModel
from transformers.pytorch_utils import Conv1D

import eva_rl
from eva_rl.distributed import cpu_supports_bf16
from eva_rl.storage import atomic_dir

METADATA_FILE = "eva_rl.json"
_FORMAT_VERSION = 1  # of eva_rl.json; bump when its layout changes


# ------------------------------------------------------------------------------------------------
# Config and metadata
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyConfig:
    """Architecture of the Decision Transformer. Values found in the data (dims) are passed in."""

    state_dim: int  # observation width the network takes (the widest task's, others zero-padded)
    act_dim: int  # action width the network predicts (the widest task's)
    hidden_size: int = 128  # width of every token embedding and of the GPT-2 blocks
    n_layer: int = 3  # GPT-2 blocks
    n_head: int = 4  # attention heads per block; must divide hidden_size
    context_length: int = 20  # K: steps of history the policy sees (3K tokens)
    max_ep_len: int = 1000  # timestep embeddings; later timesteps are clipped to max_ep_len - 1
    dropout: float = 0.1  # residual, embedding and attention dropout (training only)
    activation: str = "relu"  # MLP activation, a transformers ACT2FN name (relu, gelu, gelu_new, ...)
    action_tanh: bool = True  # squash predicted actions into [-1, 1]

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # tests: a forward pass in well under a millisecond
        "tiny": dict(hidden_size=32, n_layer=1, n_head=2, context_length=5),
        # CPU experiments
        "small": dict(hidden_size=128, n_layer=3, n_head=4, context_length=20),
        # the EVA paper's Meta-World DT
        "paper": dict(hidden_size=512, n_layer=4, n_head=8, context_length=50, dropout=0.2),
    }

    def __post_init__(self) -> None:
        for name in ("state_dim", "act_dim", "hidden_size", "n_layer", "n_head", "context_length", "max_ep_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PolicyConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.n_head:
            raise ValueError(
                f"PolicyConfig.hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head among {[h for h in range(1, 17) if self.hidden_size % h == 0]}."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"PolicyConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        from transformers.activations import ACT2FN

        if self.activation not in ACT2FN:
            raise ValueError(
                f"PolicyConfig.activation {self.activation!r} is not a transformers activation; "
                f"use one of {sorted(ACT2FN)}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PolicyConfig":
        """The preset `name` ("tiny", "small", "paper") with `overrides` (state_dim and act_dim are required)."""
        if name not in cls.PRESETS:
            raise ValueError(f"Unknown policy preset {name!r}; choose one of {sorted(cls.PRESETS)}.")
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_transformers(self) -> DecisionTransformerConfig:
        """The `transformers` config of this architecture (what config.json holds)."""
        return DecisionTransformerConfig(
            **{theirs: getattr(self, ours) for ours, theirs in TRANSFORMERS_FIELDS},
            n_inner=4 * self.hidden_size,
            # the DT gives every token position 0, so only the first row is ever used; 3K is the real length
            n_positions=3 * self.context_length,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            bos_token_id=None,
            eos_token_id=None,
        )

    @classmethod
    def from_transformers(cls, config: DecisionTransformerConfig, *, context_length: int) -> "PolicyConfig":
        """Read a `transformers` DT config back (context length is not part of it)."""
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        if inner != 4 * config.hidden_size:
            raise ValueError(
                f"The checkpoint's MLP width n_inner={config.n_inner} is not 4 x hidden_size "
                f"({4 * config.hidden_size}); eva-rl policies use the GPT-2 default."
            )
        return cls(**{ours: getattr(config, theirs) for ours, theirs in TRANSFORMERS_FIELDS},
                   context_length=context_length, dropout=float(config.resid_pdrop))

    def mismatches(self, other: "PolicyConfig") -> list[str]:
        """The architecture fields (those config.json records) where `other` differs, as
        "name: self's vs other's" lines; empty when the same network fits both."""
        return [f"{ours} ({theirs}): {getattr(self, ours)!r} vs {getattr(other, ours)!r}"
                for ours, theirs in TRANSFORMERS_FIELDS if getattr(self, ours) != getattr(other, ours)]


# PolicyConfig field -> DecisionTransformerConfig field, for the fields that map one to one. It
# drives to_transformers, from_transformers and every "does this checkpoint match" check; the
# others are derived (n_inner = 4 x hidden, n_positions = 3K, the three dropouts = dropout).
TRANSFORMERS_FIELDS: tuple[tuple[str, str], ...] = (
    ("state_dim", "state_dim"), ("act_dim", "act_dim"), ("hidden_size", "hidden_size"), ("n_layer", "n_layer"),
    ("n_head", "n_head"), ("max_ep_len", "max_ep_len"), ("activation", "activation_function"),
    ("action_tanh", "action_tanh"),
)


@dataclass(frozen=True)
class PolicyMetadata:
    """What the network needs at inference beyond its weights; saved as JSON in `eva_rl.json`.

    Sequences are stored as tuples of Python numbers (so the metadata compares, hashes and
    serialises exactly); `state_mean_array` / `state_std_array` give numpy views.
    """

    state_mean: tuple[float, ...]  # (state_dim,) mean of the raw, zero-padded observations
    state_std: tuple[float, ...]  # (state_dim,) their std, floored above 0
    return_scale: float = 1000.0  # returns-to-go are divided by this before they enter the network
    tasks: tuple[str, ...] = ()  # task names, in the order of the training data's task ids
    target_returns: Mapping[str, float] = field(default_factory=dict)  # task -> RAW target return
    obs_dims: tuple[int, ...] = ()  # true observation width of each task in `tasks`
    act_dims: tuple[int, ...] = ()  # true action width of each task in `tasks`
    version: str = eva_rl.__version__  # eva-rl version that wrote the checkpoint

    def __post_init__(self) -> None:
        # accept lists / numpy arrays (from JSON or a dataset) and store plain tuples
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("state_mean", tuple(float(v) for v in np.asarray(self.state_mean, dtype=np.float64).reshape(-1)))
        set_("state_std", tuple(float(v) for v in np.asarray(self.state_std, dtype=np.float64).reshape(-1)))
        set_("tasks", tuple(str(t) for t in self.tasks))
        set_("obs_dims", tuple(int(d) for d in self.obs_dims))
        set_("act_dims", tuple(int(d) for d in self.act_dims))
        set_("target_returns", {str(k): float(v) for k, v in dict(self.target_returns).items()})
        set_("return_scale", float(self.return_scale))
        if len(self.state_mean) != len(self.state_std) or not self.state_mean:
            raise ValueError(
                f"PolicyMetadata.state_mean ({len(self.state_mean)} values) and state_std "
                f"({len(self.state_std)} values) must be non-empty and of the same length (state_dim)."
            )
        if not all(math.isfinite(v) for v in self.state_mean + self.state_std):
            raise ValueError("PolicyMetadata.state_mean / state_std contain NaN or inf; recompute them from the data.")
        if min(self.state_std) <= 0:
            raise ValueError(f"PolicyMetadata.state_std must be > 0 everywhere, got min {min(self.state_std)}.")
        if not self.return_scale > 0 or not math.isfinite(self.return_scale):
            raise ValueError(f"PolicyMetadata.return_scale must be a positive number, got {self.return_scale}.")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"PolicyMetadata.tasks has duplicates: {list(self.tasks)}.")
        for name in ("obs_dims", "act_dims"):
            dims = getattr(self, name)
            if len(dims) != len(self.tasks):
                raise ValueError(
                    f"PolicyMetadata.{name} has {len(dims)} entries but tasks has {len(self.tasks)}; "
                    f"give one width per task."
                )
            if any(d < 1 for d in dims):
                raise ValueError(f"PolicyMetadata.{name} must be positive, got {list(dims)}.")
        if self.obs_dims and max(self.obs_dims) > len(self.state_mean):
            raise ValueError(
                f"PolicyMetadata.obs_dims {list(self.obs_dims)} exceed the state width {len(self.state_mean)}."
            )

    @property
    def state_dim(self) -> int:
        return len(self.state_mean)

    @property
    def state_mean_array(self) -> np.ndarray:
        return np.asarray(self.state_mean, dtype=np.float32)

    @property
    def state_std_array(self) -> np.ndarray:
        return np.asarray(self.state_std, dtype=np.float32)

    @classmethod
    def from_dataset(cls, dataset: Any) -> "PolicyMetadata":
        """Metadata of a policy trained on `dataset` (a `TrajectoryDataset`): its normalisation,
        tasks, widths, and per-task target return = the task's best return in the data."""
        return cls(
            state_mean=dataset.state_mean,
            state_std=dataset.state_std,
            return_scale=dataset.return_scale,
            tasks=tuple(dataset.task_names),
            target_returns={t: float(dataset.max_return(t)) for t in dataset.task_names},
            obs_dims=tuple(dataset.obs_dims),
            act_dims=tuple(dataset.act_dims),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_mean": list(self.state_mean),
            "state_std": list(self.state_std),
            "return_scale": self.return_scale,
            "tasks": list(self.tasks),
            "target_returns": dict(self.target_returns),
            "obs_dims": list(self.obs_dims),
            "act_dims": list(self.act_dims),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyMetadata":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown policy metadata keys {unknown}; known keys: {sorted(known)}.")
        return cls(**dict(data))

    def act_dim_of(self, task: str, default: int) -> int:
        """True action width of `task` (`default` for a task the policy was not trained on)."""
        return self.act_dims[self.tasks.index(task)] if task in self.tasks else default


# ------------------------------------------------------------------------------------------------
# Rollout context: the per-env history `act` reads
# ------------------------------------------------------------------------------------------------

class RolloutContext:
    """The last K steps of each of `num_envs` running episodes, right-aligned (slot K-1 = now).

    Made by `DecisionTransformerPolicy.start_rollout`. The loop is:

        ctx = policy.start_rollout(num_envs, target_returns)      # raw target returns, (num_envs,)
        obs = ...                                                  # (num_envs, obs_dim) raw
        while ...:
            actions = policy.act(ctx, obs)                         # (num_envs, act_dim)
            obs, rewards, ... = envs.step(actions)
            ctx.step(actions, rewards)                             # history advances one step
            ctx.reset(done_ids, targets)                           # envs whose episode ended

    Every method takes optional `env_ids` to work on a subset (rows of the arguments follow it).
    Besides the raw history, the context caches each step's token embeddings and the first
    block's query/key/value projections: they depend only on that token, so they are computed
    once per step, not K times. A context therefore belongs to one policy's current weights.
    """

    def __init__(self, *, num_envs: int, context_length: int, state_dim: int, act_dim: int, hidden_size: int,
                 return_scale: float, max_ep_len: int, device: torch.device, dtype: torch.dtype) -> None:
        n, k = num_envs, context_length
        self.num_envs = num_envs
        self.context_length = context_length
        self.return_scale = return_scale
        self.max_ep_len = max_ep_len
        self.device = device
        self.dtype = dtype  # compute dtype of `act` (float32 or bfloat16)
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        self.states = zeros(n, k, state_dim)  # normalised states
        self.actions = zeros(n, k, act_dim)  # actions taken (slot K-1: not yet)
        self.returns_to_go = zeros(n, k)  # RAW / return_scale
        self.timesteps = zeros(n, k, dtype=torch.long)  # step index in the episode (unclipped)
        self.mask = zeros(n, k, dtype=torch.bool)  # True = a real step
        self.episode_steps = zeros(n, dtype=torch.long)  # steps taken in the current episode
        # caches, in token order (R, s, a) per step
        self.tokens = zeros(n, k, 3, hidden_size)  # embedded tokens entering block 0 (fp32: the residual stream)
        self.qkv0 = zeros(n, k, 3, 3 * hidden_size, dtype=dtype)  # block 0's c_attn(ln_1(token))

    def _rows(self, env_ids: Sequence[int] | np.ndarray | None) -> tuple[torch.Tensor | slice, int]:
        """An index of the rows of `env_ids` and their count; all envs index as a slice (views, no copies)."""
        if env_ids is None:
            return slice(None), self.num_envs
        ids = np.asarray(env_ids, dtype=np.int64).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.num_envs):
            raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {ids.tolist()}.")
        if ids.size == self.num_envs and np.array_equal(ids, np.arange(self.num_envs)):
            return slice(None), self.num_envs
        return torch.as_tensor(ids, device=self.device), int(ids.size)

    def reset(self, env_ids: Sequence[int] | np.ndarray | None = None,
              target_returns: float | Sequence[float] | np.ndarray = 0.0) -> None:
        """Start new episodes in `env_ids` (all when None) conditioned on RAW `target_returns`."""
        ids, n = self._rows(env_ids)
        targets = torch.as_tensor(np.asarray(target_returns, dtype=np.float32), device=self.device)
        targets = targets.expand(n) if targets.ndim == 0 else targets.reshape(-1)
        if len(targets) != n:
            raise ValueError(f"reset got {len(targets)} target returns for {n} envs.")
        if not torch.isfinite(targets).all():
            raise ValueError(f"Target returns must be finite, got {targets.tolist()}.")
        for buf in (self.states, self.actions, self.returns_to_go, self.timesteps, self.mask,
                    self.episode_steps, self.tokens, self.qkv0):
            buf[ids] = 0
        self.returns_to_go[ids, -1] = targets / self.return_scale

    def step(self, actions: np.ndarray | torch.Tensor, rewards: np.ndarray | torch.Tensor,
             env_ids: Sequence[int] | np.ndarray | None = None) -> None:
        """Record the actions taken (rows, (n, act_dim) or narrower) and rewards got ((n,), RAW);
        the context moves on one step: the return-to-go drops by the reward."""
        ids, n = self._rows(env_ids)
        actions = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=self.device)
        rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float32), device=self.device).reshape(-1)
        if actions.ndim != 2 or actions.shape[0] != n or actions.shape[1] > self.actions.shape[2]:
            raise ValueError(
                f"step expects actions of shape ({n}, <= {self.actions.shape[2]}), got {tuple(actions.shape)}."
            )
        if rewards.shape[0] != n:
            raise ValueError(f"step expects {n} rewards, got {rewards.shape[0]}.")
        self.actions[ids, -1, : actions.shape[1]] = actions
        self.actions[ids, -1, actions.shape[1]:] = 0
        next_rtg = self.returns_to_go[ids, -1] - rewards / self.return_scale
        next_t = self.timesteps[ids, -1] + 1
        for buf in (self.states, self.actions, self.returns_to_go, self.timesteps, self.mask,
                    self.tokens, self.qkv0):
            buf[ids] = torch.roll(buf[ids], shifts=-1, dims=1)
        # the new slot K-1 waits for its observation (act fills the state and the mask)
        self.states[ids, -1] = 0
        self.actions[ids, -1] = 0
        self.mask[ids, -1] = False
        self.returns_to_go[ids, -1] = next_rtg
        self.timesteps[ids, -1] = next_t
        self.episode_steps[ids] += 1


# ------------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------------

class DecisionTransformerPolicy(nn.Module):
    """A Decision Transformer with its normalisation and task metadata.

    `model` is the `transformers.DecisionTransformerModel`; adapters (PEFT) may wrap its linear
    layers, and `forward` and `act` stay correct with them (they call the modules, never their
    raw weights, unless they are plain `Conv1D`s).
    """

    def __init__(self, config: PolicyConfig, metadata: PolicyMetadata,
                 model: DecisionTransformerModel | None = None) -> None:
        super().__init__()
        if model is None:
            model = DecisionTransformerModel(config.to_transformers())
        else:
            _check_model_matches(model.config, config)
        self.config = config
        self.model = model
        # GPT-2's token embedding is never used (the DT feeds inputs_embeds); frozen so that it is
        # neither trained nor counted as trainable.
        self.model.encoder.wte.weight.requires_grad_(False)
        # non-persistent: they are in eva_rl.json, not in the weights file
        self.register_buffer("state_mean", torch.zeros(config.state_dim), persistent=False)
        self.register_buffer("state_std", torch.ones(config.state_dim), persistent=False)
        self.metadata = metadata
        self.register_load_state_dict_pre_hook(_refuse_model_keys)

    @property
    def metadata(self) -> PolicyMetadata:
        return self._metadata

    @metadata.setter
    def metadata(self, metadata: PolicyMetadata) -> None:
        """Replace the metadata (e.g. add a fine-tuning task); the normalisation buffers follow it."""
        if metadata.state_dim != self.config.state_dim:
            raise ValueError(
                f"Metadata normalises {metadata.state_dim}-dim states but the policy takes "
                f"state_dim={self.config.state_dim}; they must match."
            )
        if metadata.act_dims and max(metadata.act_dims) > self.config.act_dim:
            raise ValueError(
                f"Metadata task action widths {list(metadata.act_dims)} exceed the policy's "
                f"act_dim={self.config.act_dim}."
            )
        self.__dict__["_metadata"] = metadata
        self.state_mean.copy_(torch.as_tensor(metadata.state_mean_array))
        self.state_std.copy_(torch.as_tensor(metadata.state_std_array))

    # -- training ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.state_mean.device

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Action predictions (B, K, act_dim) for a `TrajectoryDataset.sample` batch:
        states (B, K, state_dim) normalised, actions (B, K, act_dim), returns_to_go (B, K, 1)
        scaled, timesteps (B, K) int64, attention_mask (B, K) (1 = real step)."""
        states = batch["states"]
        if states.ndim != 3 or states.shape[-1] != self.config.state_dim:
            raise ValueError(
                f"batch['states'] must be (batch, context, {self.config.state_dim}), got {tuple(states.shape)}."
            )
        actions = batch["actions"]
        if actions.shape[-1] != self.config.act_dim:
            raise ValueError(
                f"batch['actions'] must have {self.config.act_dim} action dims, got {tuple(actions.shape)}."
            )
        rtg = batch["returns_to_go"]
        if rtg.ndim == 2:
            rtg = rtg.unsqueeze(-1)
        timesteps = batch["timesteps"].clamp(max=self.config.max_ep_len - 1)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return self._predict_actions(states, actions, rtg, timesteps, mask)

    def _predict_actions(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                         timesteps: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """`DecisionTransformerModel.forward`'s action predictions (B, K, act_dim), computed through
        the GPT-2 blocks' own modules (so adapters wrapped around c_attn / c_proj / c_fc apply) with
        the per-layer work transformers repeats done once per batch: one additive causal+padding
        mask, no state/return heads (rewards are not an input of the DT either).

        Training mode: the last block computes queries, output projection and MLP for the state
        tokens only (the loss reads nothing else; about a sixth of the update's matmul work),
        attention is written out so that dropout hits the attention weights as in GPT-2, and
        every dropout draws its masks through `_Dropout`. Eval mode: every block sees all 3K
        tokens (forward hooks on the blocks' modules, as EVA's statistics use, get (B, 3K, .)
        inputs) and attention is `F.scaled_dot_product_attention`.
        """
        dt = self._dt()
        gpt = dt.encoder
        b, k = states.shape[:2]
        hidden = self.config.hidden_size
        drop = _Dropout(states.device)
        time = dt.embed_timestep(timesteps)  # (B, K, H), added to each of the step's three tokens
        # tokens per step: (return-to-go, state, action) -> (B, 3K, H)
        tokens = torch.stack((dt.embed_return(returns_to_go) + time, dt.embed_state(states) + time,
                              dt.embed_action(actions) + time), dim=2).reshape(b, 3 * k, hidden)
        # the DT gives every token position 0, so every token gets wpe[0]
        x = drop(dt.embed_ln(tokens) + gpt.wpe.weight[0], gpt.drop)
        n = 3 * k
        key_mask = step_mask.bool().repeat_interleave(3, dim=1)  # (B, 3K)
        # causal, padding keys removed; a padding query sees itself so that no softmax row is empty
        # (real tokens never attend to padding, so what padding tokens compute does not matter)
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & key_mask[:, None, :]
        allowed |= torch.eye(n, dtype=torch.bool, device=x.device)
        bias = torch.zeros(b, 1, n, n, dtype=x.dtype, device=x.device)
        bias.masked_fill_(~allowed[:, None], float("-inf"))  # (B, 1, 3K, 3K), added to the attention scores
        state_rows = slice(1, None, 3)  # s_t is token 3t + 1

        blocks = gpt.h
        for i, block in enumerate(blocks):
            attn = block.attn
            states_only = self.training and i == len(blocks) - 1
            q, key, value = attn.c_attn(block.ln_1(x)).split(hidden, dim=-1)
            if states_only:
                x, q, bias = x[:, state_rows], q[:, state_rows], bias[:, :, state_rows]
            heads = lambda t: t.reshape(b, t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
            q, key, value = heads(q), heads(key), heads(value)  # (B, heads, tokens, head_dim)
            if self.training:
                weights = torch.softmax(torch.matmul(q * attn.scaling, key.transpose(-1, -2)) + bias, dim=-1)
                out = torch.matmul(drop(weights, attn.attn_dropout), value)
            else:
                out = F.scaled_dot_product_attention(q, key, value, attn_mask=bias.to(q.dtype), scale=attn.scaling)
            out = out.transpose(1, 2).reshape(b, q.shape[2], hidden)
            x = x + drop(attn.c_proj(out), attn.resid_dropout)
            mlp = block.mlp
            x = x + drop(mlp.c_proj(mlp.act(mlp.c_fc(block.ln_2(x)))), mlp.dropout)
        if not self.training:
            x = x[:, state_rows]
        return dt.predict_action(gpt.ln_f(x))  # (B, K, act_dim), from the state tokens

    def loss(self, batch: Mapping[str, torch.Tensor], *, act_dims: Sequence[int] | None = None) -> torch.Tensor:
        """Mean squared action error over real steps (attention_mask = 1) and each sample's true
        action dims: `batch["action_mask"]` (B, act_dim) if present, else the widths `act_dims`
        (default: the metadata's) indexed by `batch["task_ids"]` (B,)."""
        pred = self.forward(batch)  # (B, K, act_dim)
        target = batch["actions"]
        step_mask = batch.get("attention_mask")
        if step_mask is None:
            step_mask = torch.ones(pred.shape[:2], device=pred.device)
        dim_mask = batch.get("action_mask")
        if dim_mask is None:
            dim_mask = self.action_dim_mask(batch.get("task_ids"), pred.shape[0], act_dims=act_dims)
        mask = step_mask.to(pred.dtype).unsqueeze(-1) * dim_mask.to(pred.dtype).reshape(pred.shape[0], 1, -1)
        se = (pred - target.to(pred.dtype)).square() * mask
        return se.sum() / mask.sum().clamp(min=1.0)

    def action_dim_mask(self, task_ids: torch.Tensor | None, batch_size: int, *,
                        act_dims: Sequence[int] | None = None) -> torch.Tensor:
        """(B, act_dim) float mask: 1 on each sample's task's real action dims."""
        dims = tuple(self.metadata.act_dims if act_dims is None else act_dims)
        width = self.config.act_dim
        if task_ids is None or not dims:
            return torch.ones(batch_size, width, device=self.device)
        task_ids = task_ids.to(self.device)
        if int(task_ids.max()) >= len(dims) or int(task_ids.min()) < 0:
            raise ValueError(
                f"batch task_ids go up to {int(task_ids.max())} but only {len(dims)} task action widths are known "
                f"({list(dims)}); pass act_dims= the dataset's act_dims."
            )
        per_sample = torch.as_tensor(dims, device=self.device)[task_ids]  # (B,)
        return (torch.arange(width, device=self.device) < per_sample[:, None]).float()

    # -- acting -----------------------------------------------------------------------------------

    def start_rollout(self, num_envs: int, target_returns: float | Sequence[float] | np.ndarray, *,
                      bf16: bool = False) -> RolloutContext:
        """A fresh `RolloutContext` for `num_envs` episodes conditioned on RAW `target_returns`
        (a number or one per env). `bf16=True` runs `act` in bfloat16 autocast."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
        if bf16 and self.device.type == "cpu" and not cpu_supports_bf16():
            warnings.warn("bf16 inference on this CPU is emulated (no AVX512-BF16/AMX) and much slower than fp32; "
                          "use fp32 here.", RuntimeWarning, stacklevel=2)
        ctx = RolloutContext(
            num_envs=num_envs, context_length=self.config.context_length, state_dim=self.config.state_dim,
            act_dim=self.config.act_dim, hidden_size=self.config.hidden_size,
            return_scale=self.metadata.return_scale, max_ep_len=self.config.max_ep_len, device=self.device,
            dtype=torch.bfloat16 if bf16 else torch.float32,
        )
        ctx.reset(None, target_returns)
        return ctx

    def normalize_observations(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, obs_dim) raw observations -> (n, state_dim) zero-padded and normalised."""
        obs = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
        if obs.ndim != 2:
            raise ValueError(f"Observations must be (num_envs, obs_dim), got shape {tuple(obs.shape)}.")
        if obs.shape[1] > self.config.state_dim:
            raise ValueError(
                f"Observations have {obs.shape[1]} dims but the policy takes at most state_dim="
                f"{self.config.state_dim}; this env does not fit this policy."
            )
        padded = F.pad(obs, (0, self.config.state_dim - obs.shape[1]))
        return (padded - self.state_mean) / self.state_std

    @torch.no_grad()
    def act(self, ctx: RolloutContext, obs: np.ndarray | torch.Tensor,
            env_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Actions (n, act_dim) float32 for raw observations `obs` (n, obs_dim) of `env_ids`
        (all envs when None), each conditioned on its own last K steps in `ctx`.

        One pass for all envs that computes only the last state token's path: the per-token
        embeddings and block 0's projections come from `ctx`'s cache, the last block runs its
        attention query, output projection and MLP for that one token, and the trailing (unknown)
        action token is never built. Equal to `forward` on the same window's last step.
        """
        ids, n = ctx._rows(env_ids)
        states = self.normalize_observations(obs)
        if states.shape[0] != n:
            raise ValueError(f"act got {states.shape[0]} observations for {n} envs.")
        if not torch.isfinite(states).all():
            raise ValueError("Observations contain NaN or inf.")
        ctx.states[ids, -1] = states
        ctx.mask[ids, -1] = True
        was_training = self.training
        if was_training:
            self.eval()  # dropout off: acting is inference
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=ctx.dtype == torch.bfloat16):
                actions = self._act_tokens(ctx, ids, n)
        finally:
            if was_training:
                self.train()
        return actions.float().cpu().numpy()

    def _dt(self) -> DecisionTransformerModel:
        """The DecisionTransformerModel, also when adapters wrapped it in a PeftModel."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _embed(self, ctx: RolloutContext, ids: torch.Tensor | slice, slot: int, kinds: Sequence[int]) -> None:
        """Embed the tokens `kinds` (0 = return, 1 = state, 2 = action) of context slot `slot`
        and cache them with block 0's query/key/value projections."""
        dt = self._dt()
        gpt = dt.encoder
        t = ctx.timesteps[ids, slot].clamp(max=self.config.max_ep_len - 1)
        time = dt.embed_timestep(t)  # (n, H)
        parts = {
            0: lambda: dt.embed_return(ctx.returns_to_go[ids, slot, None]),
            1: lambda: dt.embed_state(ctx.states[ids, slot]),
            2: lambda: dt.embed_action(ctx.actions[ids, slot]),
        }
        emb = torch.stack([parts[k]() + time for k in kinds], dim=1)  # (n, len(kinds), H)
        # position ids are all 0 in the DT, so every token gets wpe[0]
        tokens = dt.embed_ln(emb) + gpt.wpe.weight[0]
        block = gpt.h[0]
        qkv = block.attn.c_attn(block.ln_1(tokens))
        kinds_t = torch.as_tensor(list(kinds), device=ctx.device)
        index = (slice(None), slot, kinds_t) if isinstance(ids, slice) else (ids[:, None], slot, kinds_t[None, :])
        ctx.tokens[index] = tokens.float()
        ctx.qkv0[index] = qkv.to(ctx.dtype)

    def _act_tokens(self, ctx: RolloutContext, ids: torch.Tensor | slice, n: int) -> torch.Tensor:
        k = ctx.context_length
        # new this step: the previous step's action token (its action is now known) and (R_t, s_t)
        if k > 1:
            self._embed(ctx, ids, k - 2, (2,))
        self._embed(ctx, ids, k - 1, (0, 1))
        hidden = self.config.hidden_size
        n_tok = 3 * k - 1  # (R, s, a) * K without the last, unknown action
        x = ctx.tokens[ids].reshape(n, 3 * k, hidden)[:, :n_tok]
        qkv0 = ctx.qkv0[ids].reshape(n, 3 * k, 3 * hidden)[:, :n_tok]
        key_mask = ctx.mask[ids].repeat_interleave(3, dim=1)[:, :n_tok]  # (n, 3K-1)
        # causal mask with padding keys removed; a padding query sees itself so no row is empty
        # (real tokens never attend to padding, so what padding tokens compute does not matter)
        causal = torch.ones(n_tok, n_tok, dtype=torch.bool, device=x.device).tril()
        full_mask = (causal & key_mask[:, None, :]) | torch.eye(n_tok, dtype=torch.bool, device=x.device)
        full_mask = full_mask[:, None]  # (n, 1, T, T)
        last_mask = key_mask[:, None, None, :]  # (n, 1, 1, T): the last token is causal to all

        blocks = self._dt().encoder.h
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            h = block.ln_1(x) if i > 0 else None
            attn = block.attn
            if last:
                q, key, value = _last_query_qkv(attn.c_attn, h, qkv0 if i == 0 else None, hidden)
                x_res = x[:, -1:]
                mask = last_mask
            else:
                qkv = qkv0 if i == 0 else attn.c_attn(h)
                q, key, value = qkv.split(hidden, dim=-1)
                x_res = x
                mask = full_mask
            heads = lambda t: t.reshape(n, t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
            q, key, value = heads(q), heads(key), heads(value)
            # match the compute dtype (the caches are stored in ctx.dtype)
            key, value = key.to(q.dtype), value.to(q.dtype)
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=attn.scaling)
            out = out.transpose(1, 2).reshape(n, q.shape[2], hidden)
            x = x_res + attn.c_proj(out).to(x_res.dtype)
            x = x + block.mlp(block.ln_2(x)).to(x.dtype)
        dt = self._dt()
        h_last = dt.encoder.ln_f(x[:, -1])  # the hidden state of s_t, (n, H)
        return dt.predict_action(h_last)  # (n, act_dim)

    # -- checkpoints ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors (plain `DecisionTransformerModel.from_pretrained`
        loads them) and eva_rl.json (config, metadata). Atomic: written into a temporary sibling
        directory, then swapped in (`storage.replace_dir`); an existing checkpoint at `directory`
        is replaced, and a crash at any instant leaves the old or the new one."""
        target = Path(directory)
        if hasattr(self.model, "peft_config"):
            raise ValueError(
                "This policy's model carries PEFT adapters: save the adapter with "
                "eva_rl.adapters.methods.save_adapter(policy, dir), or a merged checkpoint with save_merged."
            )
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{str(target)!r} exists and is a file; give a directory path for the checkpoint.")
        if target.is_dir() and any(target.iterdir()) and not (
            (target / "config.json").exists() or (target / METADATA_FILE).exists()
        ):
            raise FileExistsError(
                f"{str(target)!r} is a non-empty directory that holds no checkpoint; refusing to replace it. "
                f"Choose a new or empty directory."
            )
        from eva_rl.loading import no_progress_bars

        with atomic_dir(target) as tmp, no_progress_bars():
            self.model.save_pretrained(tmp, safe_serialization=True)
            payload = {
                "format": _FORMAT_VERSION,
                "eva_rl_version": eva_rl.__version__,
                "config": dataclasses.asdict(self.config),
                "metadata": self.metadata.to_dict(),
            }
            (tmp / METADATA_FILE).write_text(json.dumps(payload, indent=2))  # atomic_dir fsyncs the tree
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, metadata: PolicyMetadata | None = None,
                        context_length: int | None = None,
                        device: str | torch.device | None = None) -> "DecisionTransformerPolicy":
        """Load a checkpoint written by `save_pretrained`, or a plain `DecisionTransformerModel`
        directory (then `metadata` is required and `context_length` defaults to 20). `metadata`
        and `context_length` override the saved ones. Only safetensors weights are read, and they
        must be exactly the tensors config.json describes. The policy comes back in eval mode.
        `load_policy` also loads adapters and run directories."""
        from eva_rl.loading import load_checkpoint

        policy = load_checkpoint(cls, Path(directory), metadata=metadata, context_length=context_length)
        if device is not None:
            policy.to(device)
        return policy.eval()

    def check_env(self, task: str, observation_space: Any, action_space: Any) -> None:
        """Raise a ValueError naming both sides when an env's spaces do not fit this policy: a task
        it was trained on must have the widths it had then; any other task must have exactly the
        network's widths (as fine-tuning data must), since the policy knows no padding for it."""
        obs_dim = int(np.prod(observation_space.shape))
        act_dim = int(np.prod(action_space.shape))
        if task in self.metadata.tasks:
            i = self.metadata.tasks.index(task)
            expected, why = (self.metadata.obs_dims[i], self.metadata.act_dims[i]), "was trained on it with"
        else:
            expected, why = (self.config.state_dim, self.config.act_dim), "was not trained on it, and takes"
        if (obs_dim, act_dim) != expected:
            raise ValueError(
                f"Task {task!r}: the env has obs/action dims ({obs_dim}, {act_dim}) but the policy {why} "
                f"({expected[0]}, {expected[1]}). Evaluate on tasks with the spaces of the pretraining data, "
                f"or fine-tune / pretrain a policy for this task."
            )


class _Dropout:
    """Dropout for one forward pass, with each `nn.Dropout` module's own p and train/eval state:
    inverted (kept values scaled by 1 / (1 - p)), an independent mask per call, as GPT-2 applies it.

    On CPU the keep masks come from one NumPy PCG64 stream per forward pass, seeded by a draw
    from torch's generator, so runs stay reproducible under `torch.manual_seed` and resume with
    torch's RNG state; torch's CPU Bernoulli sampling costs two to three times as much per element
    and was ~12% of a training update. A mask is a 24-bit uniform compared with p (as a `torch.rand`
    mask). On other devices, and under torch.compile, it is `F.dropout`.
    """

    def __init__(self, device: torch.device) -> None:
        self.numpy = device.type == "cpu"
        self.rng: np.random.Generator | None = None

    def __call__(self, x: torch.Tensor, module: nn.Dropout) -> torch.Tensor:
        p = float(module.p)
        if not module.training or p == 0.0:
            return x
        if not self.numpy or torch.compiler.is_compiling():
            return F.dropout(x, p, training=True)
        if self.rng is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            self.rng = np.random.Generator(np.random.PCG64(seed))
        keep = torch.from_numpy(self.rng.random(x.shape, dtype=np.float32)).ge_(p).mul_(1.0 / (1.0 - p))
        return x * keep.to(x.dtype)


def _last_query_qkv(c_attn: nn.Module, h: torch.Tensor | None, qkv0: torch.Tensor | None,
                    hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query of the last token only, keys/values of all: q (n, 1, H), k and v (n, T, H).

    A plain Conv1D is sliced so the unused queries are never computed; any other module
    (a PEFT adapter layer) is called whole so its own logic applies."""
    if qkv0 is not None:
        q, key, value = qkv0.split(hidden, dim=-1)
        return q[:, -1:], key, value
    if type(c_attn) is Conv1D:
        weight, bias = c_attn.weight, c_attn.bias  # (H, 3H), (3H,): Conv1D is x @ W + b
        kv = torch.addmm(bias[hidden:], h.reshape(-1, hidden), weight[:, hidden:]).reshape(*h.shape[:2], 2 * hidden)
        q = h[:, -1:] @ weight[:, :hidden] + bias[:hidden]
        key, value = kv.split(hidden, dim=-1)
        return q, key, value
    q, key, value = c_attn(h).split(hidden, dim=-1)
    return q[:, -1:], key, value


def _refuse_model_keys(policy: "DecisionTransformerPolicy", state_dict: dict, prefix: str, *_: Any) -> None:
    """Refuse a DecisionTransformerModel's keys ("encoder.h.0...") loaded into the policy (whose
    own are "model.encoder.h.0..."). PEFT adapters are saved from the model, so
    `PeftModel.from_pretrained(policy, adapter_dir)` would match none of the adapter's tensors and
    PEFT would only warn, leaving the base policy to be evaluated as if it were fine-tuned."""
    names = set(dict(policy._dt().named_children()))
    stray = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in names]
    if stray:
        raise ValueError(
            f"Weights keyed for a DecisionTransformerModel (e.g. {stray[0]!r}) were loaded into a "
            f"DecisionTransformerPolicy, whose model sits under 'model.'. Load an adapter with "
            f"eva_rl.load_policy(adapter_dir) (or PeftModel.from_pretrained(policy.model, adapter_dir)), and a "
            f"model's state dict with policy.model.load_state_dict(...)."
        )


def _check_model_matches(model_config: DecisionTransformerConfig, config: PolicyConfig) -> None:
    mismatched = config.mismatches(PolicyConfig.from_transformers(model_config, context_length=config.context_length))
    if mismatched:
        raise ValueError("The model does not match the policy config (config vs model): " + "; ".join(mismatched) + ".")


def __getattr__(name: str) -> Any:  # PEP 562: the loader lives in eva_rl.loading, which imports this module
    if name in ("load_policy", "MissingMetadataError", "ADAPTER_METADATA_FILE"):
        from eva_rl import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
