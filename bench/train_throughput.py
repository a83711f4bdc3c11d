"""Training throughput: eva-rl's loop against d3rlpy's DecisionTransformer on the same data.

Measures, in one run, on the same synthetic Meta-World-shaped data (obs 39, act 4):
  * eva-rl `train()` updates/s (the whole loop: sampling, forward, backward, clip, AdamW, schedule)
    with the `small` preset (hidden 128, 3 layers, 4 heads, K 20),
    batch 64, in fp32 and in bf16 autocast;
  * d3rlpy's DecisionTransformer of the same size (hidden 128, 3 layers, 4 heads, K 20, batch 64)
    in its own virtual environment (d3rlpy pins its own gymnasium), run as a subprocess;
  * that bf16's loss curve follows fp32's (same seed, same batches);
  * achieved model FLOP/s (matmul FLOPs of one forward, counted by torch's FlopCounterMode, x3
    for forward + backward) against the best plain matmul FLOP/s of this machine per dtype.
Ends with one JSON line: {"bench": "train_throughput", "value": eva-rl updates/s at precision
"auto", "unit": "updates/s", "reference": d3rlpy updates/s, "ratio": value / reference, "target": 1.5}.

    python bench/train_throughput.py [--threads N] [--rounds 5] [--timed-steps 20] [--curve-steps 300]

Timing rounds alternate eva-rl and d3rlpy (d3rlpy stays loaded in its child process between
rounds), so that load from others on a shared machine hits both alike; medians are reported.

The first run creates the d3rlpy venv under ~/.cache/eva-rl (pip, a few minutes); later runs reuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eva_rl.config import load_config
from eva_rl.data.trajectories import TrajectoryDataset
from eva_rl.train import TrainConfig, build_policy, cpu_supports_bf16, resolve_precision, train

OBS_DIM, ACT_DIM, EPISODES, LENGTH = 39, 4, 50, 200
HIDDEN, LAYERS, HEADS, CONTEXT, BATCH = 128, 3, 4, 20, 64
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eva-rl" / "bench-d3rlpy-venv"
D3RLPY_REQUIREMENTS = ["torch==2.13.0", "d3rlpy==2.8.1"]

D3RLPY_SCRIPT = r'''
# d3rlpy side, in its own venv: build the DT through fit() (1 update), then time its update loop
# (what fit() does per step: sample_trajectory_batch + update) on request, so that the parent can
# interleave its own timing rounds with these on a shared machine.
import json, sys, time
import numpy as np, torch, d3rlpy
path, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
data = np.load(path)
dataset = d3rlpy.dataset.MDPDataset(data["observations"], data["actions"], data["rewards"],
                                    data["terminals"], data["timeouts"])
hidden, layers, heads, context, batch = (int(v) for v in data["shape"])
algo = d3rlpy.algos.DecisionTransformerConfig(
    batch_size=batch, context_size=context, num_heads=heads, num_layers=layers, max_timestep=1000,
    encoder_factory=d3rlpy.models.VectorEncoderFactory([hidden], exclude_last_activation=True),
).create(device="cpu:0")
algo.fit(dataset, n_steps=1, n_steps_per_epoch=1, logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
         show_progress=False)
params = sum(p.numel() for p in algo.impl.modules.transformer.parameters())
print(json.dumps({"ready": True, "params": params}), flush=True)
for line in sys.stdin:
    warmup, timed = (int(v) for v in line.split())
    for i in range(warmup + timed):
        if i == warmup:
            start = time.perf_counter()
        algo.update(dataset.sample_trajectory_batch(batch, length=context))
    print(json.dumps({"updates_per_second": timed / (time.perf_counter() - start)}), flush=True)
'''


class D3rlpyRunner:
    """d3rlpy's DecisionTransformer of the same size on the same episodes, in its own venv (a child process)."""

    def __init__(self, episodes: list[dict], threads: int, workdir: Path) -> None:
        python = ensure_d3rlpy_venv()
        path = workdir / "episodes.npz"
        timeouts = np.concatenate([ep["truncations"] for ep in episodes]).astype(np.float32)
        np.savez(path, observations=np.concatenate([ep["observations"][:-1] for ep in episodes]),
                 actions=np.concatenate([ep["actions"] for ep in episodes]),
                 rewards=np.concatenate([ep["rewards"] for ep in episodes]),
                 terminals=np.zeros_like(timeouts), timeouts=timeouts,
                 shape=np.array([HIDDEN, LAYERS, HEADS, CONTEXT, BATCH]))
        script = workdir / "d3rlpy_bench.py"
        script.write_text(D3RLPY_SCRIPT)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
        self.process = subprocess.Popen([str(python), str(script), str(path), str(threads)], env=env, cwd=workdir,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, bufsize=1)
        self.params = self._reply()["params"]

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the d3rlpy process ended (exit code {self.process.wait()}); run "
                           f"{self.process.args[1]} by hand with {self.process.args[0]} to see why")

    def updates_per_second(self, warmup: int, timed: int) -> float:
        self.process.stdin.write(f"{warmup} {timed}\n")
        return float(self._reply()["updates_per_second"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def synthetic_episodes(seed: int = 0) -> list[dict]:
    """Meta-World-shaped episodes: smooth random observations, actions a fixed function of them."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(OBS_DIM, ACT_DIM)).astype(np.float32) / np.sqrt(OBS_DIM)
    episodes = []
    for _ in range(EPISODES):
        obs = np.cumsum(rng.normal(scale=0.1, size=(LENGTH + 1, OBS_DIM)), axis=0).astype(np.float32)
        episodes.append({"observations": obs, "actions": np.tanh(obs[:-1] @ weight),
                         "rewards": rng.random(LENGTH).astype(np.float32),
                         "terminations": np.zeros(LENGTH, bool),
                         "truncations": np.eye(1, LENGTH, LENGTH - 1, dtype=bool)[0]})
    return episodes


def ensure_d3rlpy_venv() -> Path:
    """A clean venv with d3rlpy and the CPU torch wheel (not --system-site-packages: d3rlpy pins gymnasium)."""
    python = VENV / "bin" / "python"
    ready = VENV / ".eva-rl-ready"
    if not ready.exists():
        print(f"creating the d3rlpy venv in {VENV} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *D3RLPY_REQUIREMENTS], check=True)
        ready.write_text(" ".join(D3RLPY_REQUIREMENTS) + "\n")
    return python


def run_ours(dataset: TrajectoryDataset, precision: str, steps: int, warmup: int, batch: int,
             log_every: int, workdir: Path) -> dict:
    """eva-rl train(): updates/s over the updates after `warmup`, and the loss curve."""
    stamps: dict[int, float] = {}
    config = load_config(TrainConfig, None, [
        "policy.preset=small", f"policy.hidden_size={HIDDEN}", f"policy.n_layer={LAYERS}",
        f"policy.n_head={HEADS}", f"policy.context_length={CONTEXT}", f"batch_size={batch}", f"steps={steps}",
        f"precision={precision}", f"log_every={log_every}", "checkpoint_every=0", "progress=false",
        "optim.warmup_steps=50", "optim.lr=1e-4", "seed=0", "device=cpu",
        f"out_dir={tempfile.mkdtemp(dir=workdir)}"])
    result = train(config, dataset=dataset, on_step=lambda step: stamps.__setitem__(step, time.perf_counter()))
    return {"updates_per_second": (steps - warmup) / (stamps[steps] - stamps[warmup]),
            "loss": result.metrics["train_loss"], "params": result.metrics["total_params"]}


def model_flops_per_update(dataset: TrajectoryDataset) -> dict[str, float]:
    """Matmul FLOPs of one training update of the `small` model at batch 64 (3 x forward):
    "executed" = eva-rl's training forward (the last block on the state tokens only, no
    state/return heads); "full" = transformers' own `DecisionTransformerModel.forward`, the work
    a plain implementation such as d3rlpy's does."""
    from torch.utils.flop_counter import FlopCounterMode

    config = load_config(TrainConfig, None, [f"policy.hidden_size={HIDDEN}", f"policy.n_layer={LAYERS}",
                                             f"policy.n_head={HEADS}", f"policy.context_length={CONTEXT}"])
    policy = build_policy(config, dataset)
    batch = dataset.sample(BATCH, CONTEXT, generator=np.random.default_rng(0))
    inputs = {name: batch[name] for name in ("states", "actions", "rewards", "returns_to_go", "timesteps",
                                              "attention_mask")}
    flops = {}
    for kind, forward in (("executed", lambda: policy.train()(batch)), ("full", lambda: policy.model(**inputs))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward()
        flops[kind] = 3.0 * counter.get_total_flops()
    return flops


def peak_matmul_flops(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 3) -> float:
    """Best FLOP/s of a plain matmul: square n x n over `sizes`, and the model's own GEMM shapes
    ((B * 3K) x hidden times hidden x {hidden, 3 hidden, 4 hidden})."""
    tokens = BATCH * 3 * CONTEXT
    shapes = [(n, n, n) for n in sizes] + [(tokens, HIDDEN, HIDDEN * k) for k in (1, 3, 4)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds (eva-rl, d3rlpy, eva-rl, ...); medians are reported")
    parser.add_argument("--warmup-steps", type=int, default=3, help="updates before timing starts, each round")
    parser.add_argument("--timed-steps", type=int, default=20, help="timed updates per round")
    parser.add_argument("--curve-steps", type=int, default=None,
                        help="updates of the fp32-vs-bf16 loss-curve check (default 300; 100 where bf16 is emulated)")
    parser.add_argument("--curve-batch", type=int, default=None,
                        help="batch of the loss-curve check (default 64; 8 where bf16 is emulated, ~8x slower)")
    parser.add_argument("--skip-d3rlpy", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native_bf16 = cpu_supports_bf16()
    curve_steps = args.curve_steps or (300 if native_bf16 else 100)
    curve_batch = args.curve_batch or (BATCH if native_bf16 else 8)
    auto = "bf16" if resolve_precision("auto", torch.device("cpu")) is not None else "fp32"
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
          f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: {native_bf16} "
          f"(precision auto -> {auto}); load average {os.getloadavg()[0]:.1f} (shared machine: expect noise)")

    episodes = synthetic_episodes()
    dataset = TrajectoryDataset.from_episodes(episodes, "reach-v3")
    steps = args.warmup_steps + args.timed_steps
    # bf16 where it is emulated is ~8x slower: fewer timed updates keep the run short
    bf16_timed = args.timed_steps if native_bf16 else max(3, args.timed_steps // 5)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": [], "d3rlpy": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        d3rlpy = None if args.skip_d3rlpy else D3rlpyRunner(episodes, args.threads, workdir)
        for round_ in range(args.rounds):
            run = run_ours(dataset, "fp32", steps, args.warmup_steps, BATCH, steps, workdir)
            rates["fp32"].append(run["updates_per_second"])
            params = run["params"]
            if d3rlpy is not None:
                rates["d3rlpy"].append(d3rlpy.updates_per_second(args.warmup_steps, args.timed_steps))
            if round_ == 0 or native_bf16:
                run = run_ours(dataset, "bf16", 1 + bf16_timed, 1, BATCH, 1 + bf16_timed, workdir)
                rates["bf16"].append(run["updates_per_second"])
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items() if v)
                  + " updates/s", flush=True)
        if d3rlpy is not None:
            d3rlpy.close()
        log_every = max(1, curve_steps // 6)
        curve = {p: run_ours(dataset, p, curve_steps, 1, curve_batch, log_every, workdir)["loss"]
                 for p in ("fp32", "bf16")}

    flops = model_flops_per_update(dataset)
    peak = {"fp32": peak_matmul_flops(torch.float32, (512, 1024, 2048)),
            "bf16": peak_matmul_flops(torch.bfloat16, (256, 512) if not native_bf16 else (512, 1024, 2048))}
    median = {k: float(np.median(v)) for k, v in rates.items() if v}
    print(f"\nmodel: small preset, {params:,} params, batch {BATCH}, K {CONTEXT}; "
          f"{flops['executed'] / 1e9:.2f} GFLOP per update executed (3 x forward matmul FLOPs; the full DT "
          f"forward is {flops['full'] / 1e9:.2f}: training skips the last block's non-state tokens and the unused "
          f"heads); medians of {args.rounds} rounds")
    for precision in ("fp32", "bf16"):
        achieved = flops["executed"] * median[precision]
        print(f"eva-rl {precision}: {median[precision]:.2f} updates/s, {achieved / 1e9:.1f} GFLOP/s = "
              f"{100 * achieved / peak[precision]:.0f}% of the best plain {precision} matmul here "
              f"({peak[precision] / 1e9:.1f} GFLOP/s)")
    if not native_bf16 and flops["executed"] * median["bf16"] > peak["bf16"]:
        print("  (bf16 is emulated on this CPU: its plain matmul is slower than the mix of bf16 and fp32 kernels "
              "autocast runs, hence a share above 100%)")
    if d3rlpy is not None:
        achieved = flops["full"] * median["d3rlpy"]
        print(f"d3rlpy fp32: {median['d3rlpy']:.2f} updates/s ({d3rlpy.params:,} params), "
              f"~{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak['fp32']:.0f}% of the fp32 matmul best "
              f"(same-size model, the full DT forward's FLOP count)")
    print(f"\nloss curve, same seed and batches, batch {curve_batch}, {curve_steps} updates:")
    print("  step   fp32 loss   bf16 loss")
    for (step, fp32), (_, bf16) in zip(curve["fp32"], curve["bf16"]):
        print(f"  {step:4d}   {fp32:9.4f}   {bf16:9.4f}")
    final_fp32, final_bf16 = curve["fp32"][-1][1], curve["bf16"][-1][1]
    print(f"final loss fp32 {final_fp32:.4f}, bf16 {final_bf16:.4f} "
          f"(relative difference {abs(final_bf16 - final_fp32) / final_fp32:.1%})")
    value = median[auto]
    ref_value = median.get("d3rlpy")
    print(json.dumps({"bench": "train_throughput", "value": round(value, 3), "unit": "updates/s",
                      "reference": round(ref_value, 3) if ref_value else None,
                      "ratio": round(value / ref_value, 3) if ref_value else None, "target": 1.5}))


if __name__ == "__main__":
    main()
