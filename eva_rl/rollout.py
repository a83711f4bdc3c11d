"""Batched incremental acting: a Decision Transformer driving many envs at once, one step at a time.

`DecisionTransformerPolicy.start_rollout` / `.act` delegate here. The loop is:

    ctx = policy.start_rollout(num_envs, target_returns)      # raw target returns, (num_envs,)
    obs = ...                                                  # (num_envs, obs_dim) raw
    while ...:
        actions = policy.act(ctx, obs)                         # (num_envs, act_dim)
        obs, rewards, ... = envs.step(actions)
        ctx.step(actions, rewards)                             # history advances one step
        ctx.reset(done_ids, targets)                           # envs whose episode ended

Tokens per step: (return-to-go, state, action); a window of K steps is 3K tokens; the action for
step t is read from the hidden state of the state token s_t. `act` computes only what that one
hidden state needs: each token's embedding and block 0's query/key/value projections are cached
in the context when the token is new (they depend on that token alone), the trailing unknown
action token is never built, and the last block runs its query, output projection and MLP for
the last state token only. The result equals `DecisionTransformerPolicy.forward` on the same
left-padded window (tests check it, also through PEFT adapter layers).

This re-implements GPT-2's block computation (the modules are called, so adapters apply; plain
`Conv1D`s are sliced) and so is coupled to transformers' GPT-2 internals (`attn.scaling`,
`num_heads`, `head_dim`, `wpe`): pyproject bounds the transformers versions it is tested with.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from eva_rl.distributed import cpu_supports_bf16

if TYPE_CHECKING:
    from eva_rl.policy import DecisionTransformerPolicy

_MIN_ROWS = 4  # act computes at least this many rows (see `act`)


class RolloutContext:
    """The last K steps of each of `num_envs` running episodes, right-aligned (slot K-1 = now).

    Made by `start_rollout` (or `DecisionTransformerPolicy.start_rollout`); see the module
    docstring for the loop. Every method takes optional `env_ids` to work on a subset (rows of
    the arguments follow it). Besides the raw history, the context caches each step's token
    embeddings and the first block's query/key/value projections: they depend only on that
    token, so they are computed once per step, not K times. A context therefore belongs to one
    policy's current weights.
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
        """An index of the rows of `env_ids` and their count. A run of consecutive envs (all of
        them, or one group of a pipelined evaluation) indexes as a slice: views, no copies."""
        if env_ids is None:
            return slice(0, self.num_envs), self.num_envs
        ids = np.asarray(env_ids, dtype=np.int64).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.num_envs):
            raise ValueError(f"env_ids must be in [0, {self.num_envs}), got {ids.tolist()}.")
        if ids.size and np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)):
            return slice(int(ids[0]), int(ids[0]) + ids.size), int(ids.size)
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


def start_rollout(policy: DecisionTransformerPolicy, num_envs: int,
                  target_returns: float | Sequence[float] | np.ndarray, *, bf16: bool = False) -> RolloutContext:
    """A fresh `RolloutContext` for `num_envs` episodes of `policy` conditioned on RAW
    `target_returns` (a number or one per env). `bf16=True` runs `act` in bfloat16 autocast."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
    if bf16 and policy.device.type == "cpu" and not cpu_supports_bf16():
        warnings.warn("bf16 inference on this CPU is emulated (no AVX512-BF16/AMX) and much slower than fp32; "
                      "use fp32 here.", RuntimeWarning, stacklevel=3)
    if policy.device.type == "cpu":
        _keep_freed_memory()
    config = policy.config
    ctx = RolloutContext(
        num_envs=num_envs, context_length=config.context_length, state_dim=config.state_dim,
        act_dim=config.act_dim, hidden_size=config.hidden_size, return_scale=policy.metadata.return_scale,
        max_ep_len=config.max_ep_len, device=policy.device, dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    ctx.reset(None, target_returns)
    return ctx


def normalize_observations(policy: DecisionTransformerPolicy, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, obs_dim) raw observations -> (n, state_dim) zero-padded and normalised by `policy`'s metadata."""
    obs = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=policy.device)
    state_dim = policy.config.state_dim
    if obs.ndim != 2:
        raise ValueError(f"Observations must be (num_envs, obs_dim), got shape {tuple(obs.shape)}.")
    if obs.shape[1] > state_dim:
        raise ValueError(
            f"Observations have {obs.shape[1]} dims but the policy takes at most state_dim="
            f"{state_dim}; this env does not fit this policy."
        )
    padded = F.pad(obs, (0, state_dim - obs.shape[1]))
    return (padded - policy.state_mean) / policy.state_std


@torch.no_grad()
def act(policy: DecisionTransformerPolicy, ctx: RolloutContext, obs: np.ndarray | torch.Tensor,
        env_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Actions (n, act_dim) float32 for raw observations `obs` (n, obs_dim) of `env_ids` (all
    envs when None), each conditioned on its own last K steps in `ctx`. One pass for all envs;
    an env's action does not depend on which other envs act in the same call, to float rounding
    (bit for bit where the BLAS rounds a row alike at any row count from 4, as MKL does on AVX2;
    MKL's AVX-512 kernels differ between row counts in the last bit of float32)."""
    ids, n = ctx._rows(env_ids)
    states = normalize_observations(policy, obs)
    if states.shape[0] != n:
        raise ValueError(f"act got {states.shape[0]} observations for {n} envs.")
    if not torch.isfinite(states).all():
        raise ValueError("Observations contain NaN or inf.")
    ctx.states[ids, -1] = states
    ctx.mask[ids, -1] = True
    if n == 0:
        return np.zeros((0, policy.config.act_dim), dtype=np.float32)
    rows, n_rows = ids, n
    if n < _MIN_ROWS:
        # BLAS (MKL / oneDNN) rounds a product of 1-3 rows differently from the same rows in a
        # larger one. Acting on at least 4 rows (the last env repeated; its caches get the same
        # values written twice) makes an env's action independent of which envs act beside it on
        # AVX2, so there a pipelined evaluation acting for half the envs at a time equals the
        # synchronous one bit for bit; on AVX-512 the two agree to float32 rounding.
        listed = torch.arange(ids.start, ids.stop, device=ctx.device) if isinstance(ids, slice) else ids
        rows, n_rows = torch.cat([listed, listed[-1:].expand(_MIN_ROWS - n)]), _MIN_ROWS
    was_training = policy.training
    if was_training:
        policy.eval()  # dropout off: acting is inference
    try:
        with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=ctx.dtype == torch.bfloat16):
            actions = _act_tokens(policy, ctx, rows, n_rows)[:n]
    finally:
        if was_training:
            policy.train()
    return actions.float().cpu().numpy()


def _embed(policy: DecisionTransformerPolicy, ctx: RolloutContext, ids: torch.Tensor | slice, slot: int,
           kinds: Sequence[int]) -> None:
    """Embed the tokens `kinds` (0 = return, 1 = state, 2 = action) of context slot `slot`
    and cache them with block 0's query/key/value projections."""
    dt = policy._dt()
    gpt = dt.encoder
    t = ctx.timesteps[ids, slot].clamp(max=policy.config.max_ep_len - 1)
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
    index = (ids, slot, kinds_t) if isinstance(ids, slice) else (ids[:, None], slot, kinds_t[None, :])
    ctx.tokens[index] = tokens.float()
    ctx.qkv0[index] = qkv.to(ctx.dtype)


def _act_tokens(policy: DecisionTransformerPolicy, ctx: RolloutContext, ids: torch.Tensor | slice,
                n: int) -> torch.Tensor:
    """The action (n, act_dim) read from the last state token of each context row in `ids`."""
    k = ctx.context_length
    # new this step: the previous step's action token (its action is now known) and (R_t, s_t)
    if k > 1:
        _embed(policy, ctx, ids, k - 2, (2,))
    _embed(policy, ctx, ids, k - 1, (0, 1))
    hidden = policy.config.hidden_size
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

    dt = policy._dt()
    blocks = dt.encoder.h
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
    h_last = dt.encoder.ln_f(x[:, -1])  # the hidden state of s_t, (n, H)
    return dt.predict_action(h_last)  # (n, act_dim)


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


@functools.cache
def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Each `act` allocates and frees a few MB of intermediate tensors (16 envs x 3K tokens x 4H
    floats for the MLP alone); PyTorch's CPU allocator does not cache, and glibc by default
    returns the freed top of the heap to the OS (and serves blocks over a dynamic threshold with
    fresh mappings), so every step page-faults the same memory back in: about a third of act's
    time with the `small` policy and 16 envs. Fixed thresholds (blocks up to 32 MB come from the
    heap; up to 64 MB of free heap is kept) remove that. It is process-wide and changes no
    result; elsewhere than glibc it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value on 64-bit
    mallopt(m_trim_threshold, 64 << 20)
