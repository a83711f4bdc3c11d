"""EVA initialisation: this project's native EVA vs PEFT's, on the same batches, against an exact reference.

For each DT preset (small, paper; random weights) and a Meta-World dataset (the scripted
expert with action noise, collected here; --synthetic uses random data of Meta-World's dims
instead), both backends run EVA (rank r, rho 1) on the same sequence of batches. Each is judged
against the exact top-r components of the full centred covariance of every batch (float64):
per layer, the fraction of the exact top-r variance its subspace captures. Prints times,
batches used, that fraction (mean and worst layer), and EVA's time as a fraction of the
fine-tuning run it starts: for each preset, the updates and batch size its experiment config
fine-tunes with (small: configs/cw10-cpu.yaml, paper: configs/cw10-paper.yaml), each update's
time measured here on the same machine (a LoRA update, median of 10).

Ends with one JSON line: value = native seconds (paper preset), reference = PEFT seconds
(paper preset), ratio = reference / value (> 1: native is faster), plus per-preset details.

    python bench/eva_init.py                 # both presets
    python bench/eva_init.py --presets small --synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from eva_rl.adapters import methods
from eva_rl.adapters.eva import _dt_forward, eva_state_dict, token_mask
from eva_rl.data.trajectories import TrajectoryDataset
from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

STATE_DIM, ACT_DIM = 39, 4  # Meta-World


def metaworld_dataset(task: str, episodes: int, horizon: int, noise: float, synthetic: bool) -> tuple[TrajectoryDataset, str]:
    if not synthetic:
        try:
            from eva_rl.data.collect import CollectConfig, collect_episodes

            data = collect_episodes(task, CollectConfig(policy="expert", noise=noise, episodes=episodes, seed=0,
                                                        horizon=horizon))
            return TrajectoryDataset.from_episodes(data, task), f"Meta-World {task}, scripted expert, noise {noise}, " \
                                                                f"{episodes} episodes x {horizon} steps"
        except Exception as exc:  # no Meta-World here: say so and use data of its dims
            print(f"collection failed ({exc}); using synthetic data", file=sys.stderr)
    return synthetic_dataset(episodes, horizon, task), f"synthetic random walks with Meta-World dims (39/4), " \
                                                       f"{episodes} episodes x {horizon} steps"


def synthetic_dataset(episodes: int = 40, horizon: int = 200, name: str = "synthetic") -> TrajectoryDataset:
    """Random walks of Meta-World's dims: throughput and EVA's cost do not depend on the values."""
    rng = np.random.default_rng(0)
    eps = []
    for _ in range(episodes):
        walk = np.cumsum(rng.normal(scale=0.05, size=(horizon + 1, STATE_DIM)), axis=0).astype(np.float32)
        eps.append({"observations": walk, "actions": np.tanh(rng.normal(size=(horizon, ACT_DIM))).astype(np.float32),
                    "rewards": rng.random(horizon).astype(np.float32), "terminations": np.zeros(horizon, bool),
                    "truncations": np.eye(1, horizon, horizon - 1, dtype=bool)[0]})
    return TrajectoryDataset.from_episodes(eps, name)


@torch.no_grad()
def exact_covariances(policy: torch.nn.Module, names: list[str], batches: list[dict], tokens) -> dict[str, torch.Tensor]:
    """Centred covariance (float64) of each layer's selected inputs over all batches."""
    sums = {n: None for n in names}
    current = {}

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[current["mask"]].double()
            n, s, ss = x.shape[0], x.sum(0), x.T @ x
            old = sums[name]
            sums[name] = (n, s, ss) if old is None else (old[0] + n, old[1] + s, old[2] + ss)
        return hook

    handles = [policy.model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    for batch in batches:
        current["mask"] = token_mask(batch["attention_mask"], tokens).reshape(-1)
        _dt_forward(policy, batch)
    for h in handles:
        h.remove()
    out = {}
    for name, (n, s, ss) in sums.items():
        mean = s / n
        out[name] = (ss - n * torch.outer(mean, mean)) / (n - 1)
    return out


def captured(a: torch.Tensor, cov: torch.Tensor) -> float:
    if a.shape[0] == 0:
        return 1.0
    q = torch.linalg.qr(a.double().T)[0]
    top = torch.linalg.eigvalsh(cov).flip(0)[: a.shape[0]].sum()
    return float(torch.trace(q.T @ cov @ q) / top)


# The experiment config whose fine-tuning runs each preset's EVA starts.
FINETUNE_CONFIGS = {"small": "cw10-cpu.yaml", "paper": "cw10-paper.yaml"}


def finetune_run_shape(preset: str) -> tuple[int, int, str]:
    """(updates, batch size, config name) of a fine-tuning run in the preset's experiment config."""
    name = FINETUNE_CONFIGS[preset]
    path = Path(__file__).resolve().parent.parent / "configs" / name
    train = yaml.safe_load(path.read_text())["finetune"]["overrides"]["train"]
    return int(train["steps"]), int(train["batch_size"]), name


def train_step_seconds(dataset: TrajectoryDataset, preset: str, batch_size: int, steps: int = 10) -> float:
    """Seconds per LoRA update (rank 8) of the preset at the batch size, median over `steps` updates."""
    config = PolicyConfig.from_preset(preset, state_dim=STATE_DIM, act_dim=ACT_DIM)
    policy = DecisionTransformerPolicy(config, PolicyMetadata.from_dataset(dataset)).train()
    methods.apply_method(policy, "lora", rank=8)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    generator = np.random.default_rng(1)
    times = []
    for _ in range(steps + 2):
        batch = dataset.sample(batch_size, config.context_length, generator=generator)
        start = time.perf_counter()
        optimizer.zero_grad()
        policy.loss(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def run_preset(preset: str, dataset: TrajectoryDataset, args: argparse.Namespace) -> dict:
    config = PolicyConfig.from_preset(preset, state_dim=STATE_DIM, act_dim=ACT_DIM)
    torch.manual_seed(0)
    policy = DecisionTransformerPolicy(config, PolicyMetadata.from_dataset(dataset)).eval()
    generator = np.random.default_rng(0)
    batches = [dataset.sample(args.batch_size, config.context_length, generator=generator)
               for _ in range(args.max_batches)]
    tokens = ("state", "action")
    names = list(methods.resolve_target_modules(policy.model))
    results = {}
    for backend in args.order:
        weights, report = eva_state_dict(policy, batches, rank=args.rank, rho=1.0, tau=0.99, tokens=tokens,
                                         max_batches=args.max_batches, backend=backend)
        results[backend] = (weights, report)
    start = time.perf_counter()
    covs = exact_covariances(policy, names, batches, tokens)
    exact_seconds = time.perf_counter() - start
    row = {"preset": preset, "hidden": config.hidden_size, "layers": config.n_layer, "context": config.context_length,
           "batch_size": args.batch_size, "reference_batches": len(batches), "exact_seconds": exact_seconds}
    for backend, (weights, report) in results.items():
        fractions = {n: captured(weights[n], covs[n]) for n in names}
        worst = min(fractions, key=fractions.get)
        row[backend] = {"seconds": report.seconds, "batches": report.batches_total,
                        "captured_mean": float(np.mean(list(fractions.values()))),
                        "captured_worst": fractions[worst], "worst_layer": worst,
                        "not_converged": report.not_converged}
    row["ratio"] = row["peft"]["seconds"] / row["native"]["seconds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--task", default="push-v3")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--synthetic", action="store_true", help="random data of Meta-World's dims (no collection)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=40, help="batch cap of both backends = reference batches")
    parser.add_argument("--order", nargs=2, default=["peft", "native"], help="which backend runs first")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset, source = metaworld_dataset(args.task, args.episodes, args.horizon, args.noise, args.synthetic)
    print(f"data: {source}; torch threads {torch.get_num_threads()}")
    rows = []
    for preset in args.presets:
        row = run_preset(preset, dataset, args)
        rows.append(row)
        for backend in ("native", "peft"):
            r = row[backend]
            print(f"{preset:5s} {backend:6s}: {r['seconds']:6.2f} s, {r['batches']:3d} batches, captured variance "
                  f"mean {r['captured_mean']:.4f}, worst {r['captured_worst']:.4f} ({r['worst_layer']})"
                  + (f", not converged: {len(r['not_converged'])}" if r["not_converged"] else ""))
        print(f"{preset:5s} PEFT / native time: {row['ratio']:.2f}x")
    for row in rows:
        updates, batch_size, config_name = finetune_run_shape(row["preset"])
        step = train_step_seconds(dataset, row["preset"], batch_size)
        run_seconds = updates * step
        row["eva_fraction_of_finetune_run"] = row["native"]["seconds"] / (row["native"]["seconds"] + run_seconds)
        print(f"{row['preset']:5s} fine-tuning run of {config_name} ({updates} updates x {step * 1000:.0f} ms at "
              f"batch {batch_size}): EVA native = {100 * row['eva_fraction_of_finetune_run']:.3f}% of it")
    main_row = next((r for r in rows if r["preset"] == "paper"), rows[-1])
    print(json.dumps({"bench": "eva_init", "value": round(main_row["native"]["seconds"], 3), "unit": "s",
                      "reference": round(main_row["peft"]["seconds"], 3), "ratio": round(main_row["ratio"], 3),
                      "target": 1, "preset": main_row["preset"], "data": source,
                      "presets": {r["preset"]: {"ratio": round(r["ratio"], 3),
                                                "native_captured_worst": round(r["native"]["captured_worst"], 4),
                                                "peft_captured_worst": round(r["peft"]["captured_worst"], 4),
                                                "native_batches": r["native"]["batches"],
                                                "peft_batches": r["peft"]["batches"],
                                                "eva_fraction_of_finetune_run":
                                                    round(r["eva_fraction_of_finetune_run"], 6)} for r in rows}}))


if __name__ == "__main__":
    main()
