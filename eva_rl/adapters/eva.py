"""EVA (Explained Variance Adaptation, arXiv 2410.07170) for Decision Transformers.

EVA initialises LoRA's A with the top right-singular vectors of each adapted matrix's inputs on
the downstream task's data (B = 0), and may move rank to the matrices whose inputs have the
most explained variance. (The module runs a little past 600 lines because it holds both the
native EVA and PEFT's, the reference it is tested and benchmarked against, with its report.)

Tokens: the DT interleaves three tokens per step, (return-to-go, state, action), so a window of
K steps is 3K tokens: token 3k is the return of step k, 3k + 1 its state, 3k + 2 its action.
The per-step `attention_mask` (B, K) is expanded to (B, 3K) and only the chosen token kinds of
real steps enter the statistics; left padding never does.

The native backend keeps, per matrix, the running sums of the centred inputs (float64):
    n, s = sum(x - c), S = sum((x - c)(x - c)^T)   (c: a fixed shift, the first batch's mean)
so the covariance (S - s s^T / n) / (n - 1) is exact for all tokens seen so far (no truncation,
unlike incremental PCA). Its top eigenvectors are found by warm-started subspace iteration with
Rayleigh-Ritz (an oversampled block of p = 2 r rho columns, at least r rho + 8), whose cost per
batch is a few (d x d)(d x p) products; a full eigh (d^3, and slow on busy CPUs) is only used
for matrices at most `eigh_max_width` wide. The sums add across
processes, so under torch.distributed they are all-reduced and every rank gets the same A.
After each batch the span of the top k components has converged when the smallest cosine of its
principal angles with the previous batch's span is >= tau (and the eigen-solver's residuals for
them are small): per span, not per component, since components with near-equal eigenvalues
rotate into each other long after their span is stable. A matrix stops being fed once the span
of the components its current rank needs has converged, and the forward pass stops after the last
block that still has an unconverged matrix. Matrices whose inputs are identical (same tokens,
same values) share one computation.

The `peft` backend runs PEFT's `get_eva_state_dict` with DT token masks and a batch cap; it is
the reference in tests and benchmarks. It relies on PEFT internals (as of peft PEFT_EVA_TESTED),
all of them inside `_peft_backend` and its helper at the end of this file. Whichever backend
computes A, `methods.apply_method` loads it with PEFT's public `initialize_lora_eva_weights`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from eva_rl.adapters.methods import DEFAULT_TARGET_MODULES, layer_features, resolve_target_modules
from eva_rl.distributed import collective_device, distributed

TOKEN_KINDS: tuple[str, ...] = ("return", "state", "action")  # order of the tokens within a step
# Only the GPT-2 blocks see the (B, 3K) token stream the step mask is expanded to; the embeddings
# and prediction heads see (B, K) per-kind inputs, so the token mask cannot select their rows.
_BLOCKS_PREFIX = "encoder.h."
BACKENDS: tuple[str, ...] = ("native", "peft")


@dataclass
class EvaReport:
    """What EVA found and how long it took (written as eva_report.json)."""

    backend: str
    rank: int  # the user's rank r (budget = number of matrices * r)
    rho: float
    tau: float
    tokens: tuple[str, ...]
    ranks: dict[str, int]  # module name -> rank given (0 = no adapter there)
    explained_variance_ratio: dict[str, list[float]]  # module name -> ratio of each offered component (r * rho)
    batches: dict[str, int]  # module name -> batches its statistics took in
    converged: dict[str, bool]  # module name -> the components its rank needs converged
    batches_total: int  # forward passes run
    tokens_seen: dict[str, int]  # module name -> selected tokens in its statistics (this process + others)
    shared_inputs: dict[str, str]  # module name -> module whose identical inputs it reuses
    seconds: float

    @property
    def not_converged(self) -> list[str]:
        return [name for name, ok in self.converged.items() if not ok and self.ranks.get(name, 0) > 0]

    def to_json(self) -> dict:
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        data["not_converged"] = self.not_converged
        return data

    def summary(self) -> str:
        ranks = list(self.ranks.values())
        text = (f"EVA ({self.backend}): {self.batches_total} batches, {self.seconds:.2f} s, ranks {min(ranks)}-{max(ranks)} "
                f"over {len(ranks)} matrices")
        if self.not_converged:
            text += f"; not converged at the batch cap: {', '.join(self.not_converged)}"
        return text

    def save(self, directory: str | os.PathLike) -> Path:
        """Write eva_report.json and eva_ranks.png (rank per layer) into `directory`."""
        from eva_rl.storage import write_text_atomic

        directory = Path(directory)
        write_text_atomic(directory / "eva_report.json", json.dumps(self.to_json(), indent=2))
        self.plot(directory / "eva_ranks.png")
        return directory / "eva_report.json"

    def plot(self, path: str | os.PathLike) -> None:
        """Bar chart of the rank given to each matrix, with the uniform rank r as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.ranks)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 1.5), 3.2))
        ax.bar(range(len(names)), [self.ranks[n] for n in names], color="tab:blue")
        ax.axhline(self.rank, color="gray", linestyle="--", linewidth=1, label=f"r = {self.rank}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.removeprefix("encoder.") for n in names], rotation=90, fontsize=7)
        ax.set_ylabel("rank")
        ax.set_title(f"EVA rank allocation (rho = {self.rho:g})")
        # outside the axes: inside, the legend covered the tallest bars
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def log_tensorboard(self, writer: Any, step: int = 0) -> None:
        """Scalars per matrix (rank, explained variance kept, batches) and the totals."""
        writer.add_scalar("eva/seconds", self.seconds, step)
        writer.add_scalar("eva/batches", self.batches_total, step)
        for name, rank in self.ranks.items():
            writer.add_scalar(f"eva_rank/{name}", rank, step)
            writer.add_scalar(f"eva_explained_variance/{name}", sum(self.explained_variance_ratio[name][:rank]), step)
            writer.add_scalar(f"eva_batches/{name}", self.batches[name], step)


def token_mask(attention_mask: torch.Tensor, tokens: Sequence[str] = ("state", "action")) -> torch.Tensor:
    """(B, 3K) bool: which of the 3K interleaved tokens are real steps of a chosen kind.

    attention_mask: (B, K), 1 = real step, 0 = padding. tokens: any of "return", "state", "action".
    """
    unknown = [t for t in tokens if t not in TOKEN_KINDS]
    if unknown or not tokens:
        raise ValueError(f"EVA tokens must be a non-empty subset of {TOKEN_KINDS}, got {tuple(tokens)}.")
    kinds = torch.tensor([kind in tokens for kind in TOKEN_KINDS], device=attention_mask.device)  # (3,)
    steps = attention_mask.bool()  # (B, K)
    return (steps[:, :, None] & kinds[None, None, :]).reshape(steps.shape[0], -1)  # (B, 3K)


def redistribute_ranks(explained: Mapping[str, Sequence[float]], budget: int, max_rank: int) -> dict[str, int]:
    """Ranks from explained-variance ratios: the global top `budget` components, at most `max_rank` each.

    explained: module name -> ratios of its components, largest first. Ties keep module order.
    """
    entries = [(float(v), i, name) for i, (name, values) in enumerate(explained.items())
               for v in list(values)[:max_rank]]
    entries.sort(key=lambda e: (-e[0], e[1]))
    ranks = {name: 0 for name in explained}
    for _, _, name in entries[:budget]:
        ranks[name] += 1
    return ranks


def _dt_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """One forward pass of a policy (`policy(batch)`) or a bare DecisionTransformerModel."""
    if hasattr(model, "loss") and hasattr(model, "model"):
        model(batch)
        return
    rtg = batch["returns_to_go"]
    model(states=batch["states"], actions=batch["actions"], rewards=batch.get("rewards", torch.zeros_like(rtg)),
          returns_to_go=rtg, timesteps=batch["timesteps"], attention_mask=batch["attention_mask"], return_dict=True)


def _all_reduce(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """`tensor` reduced over all processes (sum by default), on its own device.

    The collective runs on the backend's device (NCCL: the current GPU; gloo: the CPU), so the
    same code serves CUDA and CPU jobs whichever device the statistics live on.
    """
    if not distributed():
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM if op is None else op)
    return moved.to(tensor.device)


class _StopForward(Exception):
    """Raised by the last hook that still needs this batch: the rest of the forward is not needed."""


class _LayerStatistics:
    """Running centred input statistics of one matrix and its top eigenvectors (float64)."""

    def __init__(self, name: str, width: int, components: int, eigh_max_width: int, seed: int,
                 tau: float = 0.99) -> None:
        self.name, self.width, self.components, self.tau = name, width, components, tau
        self.use_eigh = width <= eigh_max_width
        self.block = min(width, components + max(components, 8))  # oversampled block for subspace iteration
        self.n = 0.0
        self.shift: torch.Tensor | None = None  # (width,) float64
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.scatter = torch.zeros(width, width, dtype=torch.float64)
        self.batches = 0
        self.vectors: torch.Tensor | None = None  # (width, block) eigenvectors, largest first
        self.values: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None  # (width, components) of the last estimate
        self.converged = torch.zeros(components, dtype=torch.bool)
        self.solved = torch.zeros(components, dtype=torch.bool)  # eigen-solver residual small enough
        self.generator = torch.Generator().manual_seed(seed)
        self.fingerprint: torch.Tensor | None = None
        self._covariance: torch.Tensor | None = None  # cached until the next add

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the selected input rows x (n, width) of one batch (all-reduced across processes)."""
        x = x.detach()
        if self.shift is None:
            local = _all_reduce(torch.stack([x.sum(0).double(), torch.full(
                (self.width,), float(x.shape[0]), dtype=torch.float64, device=x.device)]))
            self.shift = local[0] / local[1].clamp(min=1.0)
            probes = torch.randn(self.width, 3, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
            self.fingerprint = (x.double().cpu() @ probes).sum(0)  # identical inputs -> identical fingerprint
            self.sum, self.scatter = self.sum.to(x.device), self.scatter.to(x.device)
            self.shift = self.shift.to(x.device)
        xc = x.float() - self.shift.float()
        scatter = (xc.T @ xc).double()  # float32 GEMM (fast), accumulated in float64
        total = xc.sum(0).double()
        count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        if distributed():
            flat = _all_reduce(torch.cat([scatter.reshape(-1), total, count]))
            scatter = flat[: self.width ** 2].reshape(self.width, self.width)
            total, count = flat[self.width ** 2: -1], flat[-1:]
        self.scatter += scatter
        self.sum += total
        self.n += float(count.item())
        self.batches += 1
        self._covariance = None

    def covariance(self) -> torch.Tensor:
        """(width, width) centred covariance of every row seen so far (cached until the next add)."""
        if self._covariance is None:
            n = max(self.n, 2.0)
            mean = self.sum / n
            self._covariance = (self.scatter - n * torch.outer(mean, mean)) / (n - 1.0)
        return self._covariance

    @torch.no_grad()
    def solve(self, *, max_iters: int = 10, tol: float = 1e-4) -> None:
        """Top eigenvectors of the current covariance; then per-component convergence vs the last ones.

        tol: largest eigen-residual |C v - l v| / l_1 at which a component counts as solved; a
        component can only converge once solved, so a slow solver never fakes convergence.
        """
        cov = self.covariance()
        m = self.components
        if self.use_eigh or self.block * 2 >= self.width:
            values, vectors = torch.linalg.eigh(cov)
            self.values, self.vectors = values.flip(0), vectors.flip(1)[:, : self.block].float()
            self.solved = torch.ones(m, dtype=torch.bool)
        else:
            # float32 products: the statistics stay float64, the iteration needs no more than 1e-6.
            c32 = cov.float()
            q = self.vectors if self.vectors is not None else torch.linalg.qr(
                torch.randn(self.width, self.block, generator=self.generator).to(cov.device))[0]
            for iteration in range(max_iters):
                z = c32 @ q  # (width, block)
                ritz, small = torch.linalg.eigh((q.T @ z).double())  # Rayleigh-Ritz on the block
                ritz, small = ritz.flip(0), small.flip(1).float()
                q, z = q @ small, z @ small
                residual = (z[:, :m] - q[:, :m] * ritz[:m].float()).norm(dim=0) / float(ritz[0].clamp(min=1e-30))
                self.solved = (residual <= tol).cpu()
                if bool(self.solved.all()) or iteration == max_iters - 1:
                    break
                q = torch.linalg.qr(z)[0]
            self.values, self.vectors = ritz, q
        current = self.vectors[:, :m]
        if self.previous is not None:
            # converged[k - 1]: the span of the top k components has converged, i.e. the smallest
            # cosine of the principal angles between it and the last batch's is >= tau. Components
            # with near-equal eigenvalues keep rotating into each other from batch to batch while
            # the subspace they span, all that the captured variance depends on, is long stable:
            # a per-component cosine waited for that rotation and took twice PEFT's batches.
            overlap = (current.T @ self.previous).double().cpu()  # (m, m)
            cosine = torch.stack([torch.linalg.svdvals(overlap[:k, :k]).min() for k in range(1, m + 1)])
            solved = torch.cummin(self.solved.int(), 0).values.bool()  # the top k all solved
            self.converged = (cosine >= self.tau) & solved
        self.previous = current.clone()

    def subspace_converged(self, k: int) -> bool:
        """Whether the span of the top `k` components has converged (k = 0: nothing to wait for)."""
        return k == 0 or bool(self.converged[k - 1])

    def explained_variance_ratio(self) -> torch.Tensor:
        total = torch.diagonal(self.covariance()).sum().clamp(min=1e-30)
        return (self.values[: self.components].clamp(min=0.0) / total).float().cpu()

    @torch.no_grad()
    def finish(self) -> None:
        """Tighten the wide matrices' eigenvectors once at the end (no convergence bookkeeping)."""
        if not (self.use_eigh or self.block * 2 >= self.width) and self.vectors is not None:
            previous, converged = self.previous, self.converged
            self.solve(max_iters=30, tol=1e-5)
            self.previous, self.converged = previous, converged

    def components_rows(self, rank: int) -> torch.Tensor:
        """A: (rank, width) float32 unit rows, each with its largest entry positive (a fixed sign)."""
        a = self.vectors[:, :rank].T.float().cpu()
        signs = torch.sign(a.gather(1, a.abs().argmax(1, keepdim=True)))
        return (a * signs).contiguous()


def _check_inputs(model: nn.Module, names: Sequence[str], rank: int, rho: float, tau: float, max_batches: int,
                  backend: str) -> int:
    if backend not in BACKENDS:
        raise ValueError(f"EVA backend must be one of {BACKENDS}, got {backend!r}.")
    if rank < 1:
        raise ValueError(f"EVA rank must be >= 1, got {rank}.")
    if rho < 1.0:
        raise ValueError(f"EVA rho must be >= 1 (rho = 1: uniform ranks), got {rho}.")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"EVA tau must be in (0, 1], got {tau}.")
    if max_batches < 2:
        raise ValueError(f"EVA max_batches must be >= 2 (convergence compares two batches), got {max_batches}.")
    components = max(rank, round(rank * rho))
    outside = [name for name in names if not name.startswith(_BLOCKS_PREFIX)]
    if outside:
        raise ValueError(
            f"EVA can only initialise matrices inside the GPT-2 blocks ({_BLOCKS_PREFIX}*), whose inputs are the "
            f"3K interleaved (return, state, action) tokens; {', '.join(outside)} see other inputs. Leave them "
            f"out of target_modules (modules_to_save trains an embedding or head in full)."
        )
    for name in names:
        width = layer_features(model, name)[0]
        if components > width:
            raise ValueError(
                f"EVA needs r * rho = {components} components of {name}, whose inputs are only {width} wide; "
                f"lower rank or rho, or leave {name} out of target_modules."
            )
    return components


def _dt_of(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "loss") else model


def eva_state_dict(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    rank: int = 8,
    rho: float = 1.0,
    tau: float = 0.99,
    tokens: Sequence[str] = ("state", "action"),
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    max_batches: int = 100,
    backend: str = "native",
    eigh_max_width: int = 64,
    device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], EvaReport]:
    """EVA's A for each target matrix of a frozen DT, and a report.

    model: a DecisionTransformerPolicy or a bare DecisionTransformerModel (not yet adapted).
    batches: `TrajectoryDataset.sample` dicts: states (B, K, state_dim), actions (B, K, act_dim),
        returns_to_go (B, K, 1), timesteps (B, K), attention_mask (B, K). At most `max_batches`
        are used; running out of batches ends EVA like the cap does.
    rank: r; every matrix offers r * rho components, the global top (number of matrices) * r
        by explained-variance ratio are kept (rho = 1: every matrix gets r).
    tau: cosine between consecutive batches' components at which a component has converged.
    tokens: token kinds whose inputs feed the statistics (subset of return, state, action).
    Returns ({module name (as in the DT): A (rank_i, in_features) float32}, EvaReport); rank_i
    may be 0 (then A is (0, in_features) and the matrix gets no adapter).
    """
    dt = _dt_of(model)
    names = resolve_target_modules(dt, target_modules)
    components = _check_inputs(dt, names, rank, rho, tau, max_batches, backend)
    token_mask(torch.ones(1, 1), tuple(tokens))  # validates the token kinds
    tokens = tuple(t for t in TOKEN_KINDS if t in tokens)
    device = torch.device(device) if device is not None else next(dt.parameters()).device
    runner = _native if backend == "native" else _peft_backend
    training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        weights, report = runner(model, dt, names, _limited(batches, max_batches, device), rank=rank, rho=rho,
                                 tau=tau, tokens=tokens, components=components, max_batches=max_batches,
                                 eigh_max_width=eigh_max_width)
    finally:
        model.train(training)
    report.seconds = time.perf_counter() - start
    return weights, report


def _limited(batches: Iterable[Mapping[str, torch.Tensor]], limit: int, device: torch.device) -> Iterator[dict]:
    """At most `limit` batches, on `device`, with the DT's keys only."""
    for i, batch in enumerate(batches):
        if i >= limit:
            return
        yield {k: v.to(device) for k, v in batch.items()}


def _check_token_count(batch: Mapping[str, torch.Tensor], tokens: Sequence[str], components: int) -> None:
    count = int(_all_reduce(token_mask(batch["attention_mask"], tokens).sum().double().reshape(1)).item())
    if count < components:
        raise ValueError(
            f"An EVA batch holds {count} selected tokens ({'+'.join(tokens)} of real steps) but EVA needs at least "
            f"r * rho = {components} per batch; sample larger batches (eva.batch_size) or select more token kinds."
        )


def _native(model: nn.Module, dt: nn.Module, names: Sequence[str], batches: Iterator[dict], *, rank: int, rho: float,
            tau: float, tokens: tuple[str, ...], components: int, max_batches: int,
            eigh_max_width: int) -> tuple[dict[str, torch.Tensor], EvaReport]:
    stats = {name: _LayerStatistics(name, layer_features(dt, name)[0], components, eigh_max_width, seed=i, tau=tau)
             for i, name in enumerate(names)}
    needed = {name: components for name in names}  # components each matrix's current rank needs
    shared: dict[str, str] = {}  # follower -> leader (identical inputs)
    state: dict[str, Any] = {"mask": None, "last": None}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]  # (B, 3K, in_features)
            stats[name].add(x.reshape(-1, x.shape[-1])[state["mask"]])
            if name == state["last"]:
                raise _StopForward
        return hook

    handles = {name: dt.get_submodule(name).register_forward_hook(make_hook(name)) for name in names}
    active = list(names)
    forwards = 0
    try:
        for batch in _synchronised(batches):
            if forwards == 0:
                _check_token_count(batch, tokens, components)
            state["mask"] = token_mask(batch["attention_mask"], tokens).reshape(-1)  # (B * 3K,)
            state["last"] = active[-1]
            try:
                with torch.no_grad():
                    _dt_forward(model, batch)
            except _StopForward:
                pass
            forwards += 1
            if forwards == 1:
                shared = _group_identical(stats, names)
                for follower in shared:
                    handles.pop(follower).remove()
            for name in active:
                if name not in shared:
                    stats[name].solve()
            if all(stats[n].previous is not None for n in names if n not in shared):
                needed = _components_needed(stats, names, shared, rank * len(names), components)
            active = [n for n in names if n not in shared and not stats[n].subspace_converged(needed[n])]
            for name in names:
                if name in shared:
                    continue
                if name in active and name not in handles:
                    handles[name] = dt.get_submodule(name).register_forward_hook(make_hook(name))
                elif name not in active and name in handles:
                    handles.pop(name).remove()
            if not active:
                break
    finally:
        for handle in handles.values():
            handle.remove()
    if forwards == 0:
        raise ValueError("EVA got no batches; pass an iterable of TrajectoryDataset.sample batches.")
    for name in names:
        if name not in shared:
            stats[name].finish()
    explained = {n: stats[shared.get(n, n)].explained_variance_ratio() for n in names}
    ranks = redistribute_ranks(explained, rank * len(names), components)
    weights = {n: stats[shared.get(n, n)].components_rows(ranks[n]) for n in names}
    report = EvaReport(
        backend="native", rank=rank, rho=rho, tau=tau, tokens=tokens, ranks=ranks,
        explained_variance_ratio={n: [float(v) for v in explained[n]] for n in names},
        batches={n: stats[shared.get(n, n)].batches for n in names},
        converged={n: stats[shared.get(n, n)].subspace_converged(ranks[n]) for n in names},
        batches_total=forwards, tokens_seen={n: int(stats[shared.get(n, n)].n) for n in names},
        shared_inputs=shared, seconds=0.0,
    )
    return weights, report


def _components_needed(stats: Mapping[str, _LayerStatistics], names: Sequence[str], shared: Mapping[str, str],
                       budget: int, components: int) -> dict[str, int]:
    """Components each computation must converge: the rank the current spectra would give its
    matrix, or for a shared computation the largest rank among the matrices that use it."""
    explained = {n: stats[shared.get(n, n)].explained_variance_ratio() for n in names}
    ranks = redistribute_ranks(explained, budget, components)
    needed = {n: 0 for n in names}
    for n in names:
        leader = shared.get(n, n)
        needed[leader] = max(needed[leader], ranks[n])
    return needed


def _synchronised(batches: Iterator[dict]) -> Iterator[dict]:
    """Batches while every process still has one (so collectives inside hooks stay matched)."""
    for batch in batches:
        if distributed() and _all_reduce(torch.ones(1), dist.ReduceOp.MIN).item() == 0:
            return
        yield batch
    if distributed():
        _all_reduce(torch.zeros(1), dist.ReduceOp.MIN)  # tell the others this process ran out


def _group_identical(stats: Mapping[str, _LayerStatistics], names: Sequence[str]) -> dict[str, str]:
    """follower -> leader for matrices whose first-batch inputs were identical (same fingerprint)."""
    shared: dict[str, str] = {}
    for i, name in enumerate(names):
        for leader in names[:i]:
            if leader in shared:
                continue
            a, b = stats[name], stats[leader]
            if (a.width == b.width and a.n == b.n and a.fingerprint is not None
                    and torch.equal(a.fingerprint, b.fingerprint) and torch.equal(a.scatter, b.scatter)):
                shared[name] = leader
                break
    return shared


# --- PEFT's EVA: the reference backend, on PEFT internals ----------------------------------------
PEFT_EVA_TESTED = "0.21"  # the peft release whose EVA internals `_peft_backend` was tested against


def _peft_backend(model: nn.Module, dt: nn.Module, names: Sequence[str], batches: Iterator[dict], *, rank: int,
                  rho: float, tau: float, tokens: tuple[str, ...], components: int, max_batches: int,
                  eigh_max_width: int) -> tuple[dict[str, torch.Tensor], EvaReport]:
    """PEFT's get_eva_state_dict with DT token masks, a batch cap, and DT-relative key names.

    The reference the native backend is checked against (tests/test_eva.py, bench/eva_init.py),
    and `eva.backend: peft`. Its inputs go through PEFT's public arguments (forward_fn,
    prepare_model_inputs_fn, prepare_layer_inputs_fn); the batch cap and the report rely on PEFT
    internals, as of peft PEFT_EVA_TESTED (see `_CappedSvdForward`). A PEFT release without them
    gets an error naming the native backend.
    """
    from peft import EvaConfig, LoraConfig

    try:
        from peft.tuners.lora.eva import SVDHook, get_eva_state_dict
    except ImportError as exc:
        raise _peft_internals_changed(exc) from exc
    batch_list = list(batches)
    if not batch_list:
        raise ValueError("EVA got no batches; pass an iterable of TrajectoryDataset.sample batches.")
    _check_token_count(batch_list[0], tokens, components)
    prefix = next(n for n, m in model.named_modules() if m is dt)
    prefix = prefix + "." if prefix else ""
    config = LoraConfig(r=rank, target_modules=[prefix + n for n in names], init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, tau=tau, use_label_mask=False))

    def prepare_model_inputs(inputs: Mapping[str, torch.Tensor], peft_config: Any) -> torch.Tensor:
        return token_mask(inputs["attention_mask"], tokens).reshape(-1)  # (B * 3K,) bool

    def prepare_layer_inputs(layer_input: Any, mask: torch.Tensor, layer_name: str) -> torch.Tensor:
        x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        return x.reshape(-1, x.shape[-1])[mask]

    forward = _CappedSvdForward(SVDHook, max_batches)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is initialized.*")
            raw = get_eva_state_dict(model, batch_list, peft_config=config, forward_fn=forward,
                                     prepare_model_inputs_fn=prepare_model_inputs,
                                     prepare_layer_inputs_fn=prepare_layer_inputs, show_progress_bar=False)
        layers = {n: forward.summary(prefix + n, components) for n in names}
    except AttributeError as exc:  # an SVDHook without converged / svd
        raise _peft_internals_changed(exc) from exc
    weights = {name.removeprefix(prefix): a.float().cpu().contiguous() for name, a in raw.items()}
    report = EvaReport(
        backend="peft", rank=rank, rho=rho, tau=tau, tokens=tokens, ranks={n: int(weights[n].shape[0]) for n in names},
        explained_variance_ratio={n: layers[n]["explained"] for n in names},
        batches={n: layers[n]["batches"] for n in names}, converged={n: layers[n]["converged"] for n in names},
        batches_total=forward.svd_forwards, tokens_seen={n: layers[n]["tokens"] for n in names},
        shared_inputs={}, seconds=0.0,
    )
    return weights, report


class _CappedSvdForward:
    """PEFT's forward_fn, plus a batch cap and per-layer bookkeeping, on PEFT's EVA internals.

    PEFT cycles its dataloader until every layer converges (forever if one never does). Each
    call finds the `SVDHook`s PEFT registered (in torch's `_forward_hooks`), counts the batches
    they see and, at the cap, sets every hook's `converged` flags (recording which were not) so
    that PEFT's loop ends. `summary` reads a hook's incremental PCA (`svd.explained_variance_ratio_`,
    `svd.n_samples_seen_`).
    """

    def __init__(self, hook_type: type, max_batches: int) -> None:
        self.hook_type, self.max_batches = hook_type, max_batches
        self.svd_forwards = 0
        self.hooks: dict[str, Any] = {}  # module name (as in the model PEFT was given) -> SVDHook
        self.seen: dict[str, int] = {}  # module name -> batches its hook saw
        self.unconverged_at_cap: set[str] = set()

    def __call__(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
        hooked = {name: hook for name, module in model.named_modules()
                  for hook in module._forward_hooks.values() if isinstance(hook, self.hook_type)}
        _dt_forward(model, inputs)
        if not hooked:
            return  # PEFT's first pass only hashes the inputs
        self.svd_forwards += 1
        for name, hook in hooked.items():
            self.hooks[name] = hook
            self.seen[name] = self.seen.get(name, 0) + 1
        if self.svd_forwards >= self.max_batches:
            for name, hook in self.hooks.items():
                if not bool(hook.converged.all()):
                    self.unconverged_at_cap.add(name)
                hook.converged = torch.ones_like(hook.converged)

    def summary(self, name: str, components: int) -> dict[str, Any]:
        """explained (ratios of the first `components`), batches, converged, tokens of one layer."""
        hook = self.hooks.get(name)
        return {"explained": [float(v) for v in hook.svd.explained_variance_ratio_[:components]] if hook is not None else [],
                "batches": self.seen.get(name, 0), "converged": name not in self.unconverged_at_cap,
                "tokens": int(getattr(hook.svd, "n_samples_seen_", 0)) if hook is not None else 0}


def _peft_internals_changed(exc: Exception) -> RuntimeError:
    import peft

    return RuntimeError(f"EVA backend 'peft' relies on internals of PEFT's EVA (peft.tuners.lora.eva.SVDHook) as of "
                        f"peft {PEFT_EVA_TESTED}, which peft {peft.__version__} does not have ({exc}); use "
                        f"eva.backend: native (backend='native'), or a peft with the tested internals.")
