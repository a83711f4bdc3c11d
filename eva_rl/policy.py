"""The Decision Transformer policy: config, metadata, training forward and loss, checkpoints.

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
  K steps, in one forward pass that computes only what the next action needs (`eva_rl.rollout`).

Tokens per step: (return-to-go, state, action); a window of K steps is 3K tokens; the action for
step t is read from the hidden state of the state token s_t.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DecisionTransformerConfig, DecisionTransformerModel

import eva_rl
from eva_rl import rollout
from eva_rl.rollout import RolloutContext
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

    # -- acting (eva_rl.rollout) -------------------------------------------------------------------

    def start_rollout(self, num_envs: int, target_returns: float | Sequence[float] | np.ndarray, *,
                      bf16: bool = False) -> RolloutContext:
        """A fresh `RolloutContext` for `num_envs` episodes conditioned on RAW `target_returns`
        (a number or one per env). `bf16=True` runs `act` in bfloat16 autocast."""
        return rollout.start_rollout(self, num_envs, target_returns, bf16=bf16)

    def normalize_observations(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, obs_dim) raw observations -> (n, state_dim) zero-padded and normalised."""
        return rollout.normalize_observations(self, obs)

    def act(self, ctx: RolloutContext, obs: np.ndarray | torch.Tensor,
            env_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Actions (n, act_dim) float32 for raw observations `obs` (n, obs_dim) of `env_ids`
        (all envs when None), each conditioned on its own last K steps in `ctx`: one batched
        incremental pass (`eva_rl.rollout.act`), equal to `forward` on the same window's last step."""
        return rollout.act(self, ctx, obs, env_ids)

    def _dt(self) -> DecisionTransformerModel:
        """The DecisionTransformerModel, also when adapters wrapped it in a PeftModel."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

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
