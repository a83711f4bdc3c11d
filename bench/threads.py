"""Training threads: what `pretrain.cpus` (torch/OpenMP threads of one run) buys on this machine.

For two DT sizes, the CPU recipes' (hidden 64, 2 layers, K 10) and the `small` preset (hidden 128,
3 layers, K 20), both at batch 64 and precision `auto`, times eva-rl `train()` on synthetic
Meta-World-shaped data (bench/train_throughput.py's) with 1 thread and with every core, the
latter under both OpenMP wait policies: PASSIVE (what `eva_rl.jobs.set_threads` sets, so that
threads sleep at barriers instead of spinning on a shared machine) and ACTIVE (spinning).
Each setting runs in its own process (OpenMP reads the policy at start), rounds interleave the
settings so that background load hits them alike, and medians are reported.

Ends with one JSON line: {"bench": "threads", "value": the best all-core updates/s over 1-thread
updates/s for the recipes' DT, "unit": "ratio", "small": the same for the small preset, ...}.
A ratio below 1 means more threads slow a run of that size down on this machine.

    python bench/threads.py [--rounds 3] [--steps 300]

Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from eva_rl.jobs import default_workers

BENCH = Path(__file__).resolve().parent
SIZES = {"recipe": (64, 2, 2, 10), "small": (128, 3, 4, 20)}  # hidden, layers, heads, context

CHILD = r'''
import json, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from eva_rl.config import load_config
from eva_rl.data.trajectories import TrajectoryDataset
from eva_rl.jobs import set_threads
from eva_rl.train import TrainConfig, train
from train_throughput import synthetic_episodes
threads, steps = int(sys.argv[2]), int(sys.argv[3])
hidden, layers, heads, context = (int(x) for x in sys.argv[4:8])
set_threads(threads)
dataset = TrajectoryDataset.from_episodes(synthetic_episodes(), "reach-v3")
warmup, stamps = 20, {}
config = load_config(TrainConfig, None, [
    f"policy.hidden_size={hidden}", f"policy.n_layer={layers}", f"policy.n_head={heads}",
    f"policy.context_length={context}", "batch_size=64", f"steps={steps}", "precision=auto", "log_every=1000000",
    "val_every=0", "eval_every=0", "checkpoint_every=0", "progress=false", "seed=0", "device=cpu",
    f"out_dir={tempfile.mkdtemp()}"])
train(config, dataset=dataset, on_step=lambda step: stamps.__setitem__(step, time.perf_counter()))
print(json.dumps({"updates_per_second": (steps - warmup) / (stamps[steps] - stamps[warmup])}))
'''


def measure(threads: int, policy: str, size: tuple[int, int, int, int], steps: int) -> float:
    """updates/s of one train() in a fresh process with `threads` threads and OpenMP wait `policy`."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "PYTHONPATH": str(BENCH)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(BENCH.parent), str(threads), str(steps), *map(str, size)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["updates_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=300, help="updates per measurement (the first 20 untimed)")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    from eval_throughput import cpu_description

    cores = default_workers(1)  # the cores this process may use, as the experiment runner counts them
    print(f"machine: {cpu_description()}; {cores} cores for this process; load average {os.getloadavg()[0]:.1f}")
    settings = [(1, "PASSIVE"), (cores, "PASSIVE"), (cores, "ACTIVE")] if cores > 1 else [(1, "PASSIVE")]
    found: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, size in SIZES.items():
            for threads, policy in settings:
                found.setdefault((name, threads, policy), []).append(measure(threads, policy, size, args.steps))
    ratios = {}
    for name in SIZES:
        one = statistics.median(found[(name, 1, "PASSIVE")])
        for (size, threads, policy), values in found.items():
            if size == name:
                rate = statistics.median(values)
                print(f"{name:6s} {threads} thread(s) {policy:7s}: {rate:6.1f} updates/s (x{rate / one:.2f} of one "
                      f"thread; rounds {', '.join(f'{v:.1f}' for v in values)})")
        best = max(statistics.median(v) for (s, t, _), v in found.items() if s == name and t == cores)
        ratios[name] = best / one
    print(json.dumps({"bench": "threads", "value": round(ratios["recipe"], 3), "unit": "ratio",
                      "small": round(ratios["small"], 3), "cores": cores, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
