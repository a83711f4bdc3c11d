"""Evaluation throughput: env steps/s of `eva_rl.evaluate` with 16 envs vs a sequential loop.

    python bench/eval_throughput.py [--task reach-v3] [--horizon 100] [--num-envs 16] [--threads 1]

All in one run, on the same task, horizon and `small`-preset policy (random weights: speed does
not depend on them):

- ours (the value): `evaluate(policy, task, episodes=num_envs, num_envs=num_envs)`, fp32: one
  batched incremental `act` per vector step (cached token embeddings and block-0 projections,
  only the last state token's path through the last block);
- reference: the sequential loop people write from the transformers example: one env, and
  at every step one full-context `DecisionTransformerModel` forward on the last K steps;
- the same evaluation with `asynchronous=True`: the envs step in worker processes in two
  groups, pipelined with acting (one group steps while the other's actions are computed); its
  episodes must equal the synchronous ones (checked here); its CPU rate counts this process
  and the env workers, and its two-core bound, steps / max(this process's CPU seconds, the
  workers'), is the rate it reaches where both have a core of their own (on a loaded machine
  its wall clock cannot show that);
- the scripted expert stepping the same envs alone, synchronously (the simulator's own rate
  in one process): `ratio_to_expert` = evaluate's rate / the expert's (CPU time, like for
  like), `wall_async_ratio_to_expert` = the pipelined evaluation's wall-clock rate / the
  expert's, `async_two_core_bound_ratio_to_expert` = its two-core bound / the expert's CPU
  rate, all from the same run;
- the same evaluation with bf16 inference (autocast; fast only on GPUs and on CPUs with
  AVX512-BF16/AMX, emulated and slow elsewhere).

The script prints the CPU model, its AVX2/AVX-512/BF16/AMX flags and the load average (the
machines differ, and a shared machine's load moves wall-clock figures). Env construction is not
timed (Meta-World builds 50 task variants per env, about 2 s each). The runs alternate
`--rounds` times and the best rate of each counts. Rates are given by wall clock and by this
process's CPU time; the JSON's value/reference/ratio use CPU time, because on a shared machine
the wall clock mostly measures the neighbours' load (the synchronous runs use this one process
on one torch thread, so on an idle machine the two agree).
Ends with one JSON line: {"bench": "eval_throughput", "value", "unit", "reference", "ratio", "target", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

from eva_rl.envs import make_env  # noqa: E402
from eva_rl.evaluate import evaluate, evaluate_reference  # noqa: E402
from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata  # noqa: E402
from eva_rl.distributed import cpu_supports_bf16  # noqa: E402


def build_policy(task: str, obs_dim: int, act_dim: int, target: float) -> DecisionTransformerPolicy:
    torch.manual_seed(0)
    config = PolicyConfig.from_preset("small", state_dim=obs_dim, act_dim=act_dim, max_ep_len=1000)
    metadata = PolicyMetadata(state_mean=np.zeros(obs_dim), state_std=np.ones(obs_dim), return_scale=1000.0,
                              tasks=(task,), target_returns={task: target}, obs_dims=(obs_dim,), act_dims=(act_dim,))
    return DecisionTransformerPolicy(config, metadata).eval()


@torch.no_grad()
def sequential_steps_per_second(policy: DecisionTransformerPolicy, task: str, horizon: int, episodes: int,
                                target: float) -> tuple[float, float, int]:
    """One env; every step: the left-padded last-K window as tensors, one full forward, last action."""
    k, meta = policy.config.context_length, policy.metadata
    mean, std = torch.tensor(meta.state_mean_array), torch.tensor(meta.state_std_array)
    env = make_env(task, 0, horizon=horizon)
    steps, seconds, cpu_seconds = 0, 0.0, 0.0
    for _ in range(episodes):
        obs, _ = env.reset()
        start, start_cpu = time.perf_counter(), time.process_time()
        states = [(torch.as_tensor(obs) - mean) / std]
        actions: list[torch.Tensor] = []
        rtg = [target / meta.return_scale]
        done = False
        while not done:
            n = len(states)
            lo, w = max(0, n - k), min(n, k)
            pad = k - w
            batch = {
                "states": torch.cat([torch.zeros(pad, policy.config.state_dim), torch.stack(states[lo:])])[None],
                "actions": torch.cat([torch.zeros(pad + w, policy.config.act_dim)]
                                     if not actions else
                                     [torch.zeros(pad, policy.config.act_dim), torch.stack(actions[lo:]),
                                      torch.zeros(1, policy.config.act_dim)])[None],
                "returns_to_go": torch.cat([torch.zeros(pad), torch.tensor(rtg[lo:])])[None, :, None],
                "timesteps": torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(lo, n)])[None],
                "attention_mask": torch.cat([torch.zeros(pad, dtype=torch.long),
                                             torch.ones(w, dtype=torch.long)])[None],
            }
            action = policy(batch)[0, -1]
            obs, reward, terminated, truncated, _ = env.step(action.numpy())
            done = terminated or truncated
            actions.append(action)
            states.append((torch.as_tensor(obs) - mean) / std)
            rtg.append(rtg[-1] - float(reward) / meta.return_scale)
            steps += 1
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - start_cpu
    env.close()
    return steps / seconds, steps / cpu_seconds, steps


def cpu_description() -> str:
    """The CPU model and the instruction sets that decide the policy's matmul speed."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    present = ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)
    return (f"{model}; {os.cpu_count()} cpus; flags: {present}; native bf16 matmul: {cpu_supports_bf16()}; "
            f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}")


def measure_rounds(policy: DecisionTransformerPolicy, args: argparse.Namespace,
                   target: float) -> dict[str, tuple[float, float]]:
    """Run every measurement `args.rounds` times, alternating; the best (wall, cpu) steps/s of each."""
    n = args.num_envs
    labels = {"sequential": "sequential, 1 env, full forward per step, fp32", "evaluate": f"evaluate, {n} envs, fp32",
              "pipelined": f"evaluate, {n} envs, fp32, asynchronous (pipelined)",
              "bound": "  asynchronous, bound with two free cores", "expert": f"scripted expert alone, {n} envs"}
    best: dict[str, tuple[float, float]] = {}

    def keep(name: str, wall: float, cpu_rate: float, note: str = "") -> None:
        print(f"{labels[name]:52s} {wall:8.1f} {cpu_rate:8.1f}  {note}")
        old = best.get(name, (0.0, 0.0))
        best[name] = (max(old[0], wall), max(old[1], cpu_rate))

    def rates(result) -> tuple[float, float]:
        return result.env_steps / result.seconds, result.env_steps / result.cpu_seconds

    for _ in range(args.rounds):
        wall, cpu_rate, steps = sequential_steps_per_second(policy, args.task, args.horizon,
                                                            args.sequential_episodes, target)
        keep("sequential", wall, cpu_rate, f"({steps} steps)")
        result = evaluate(policy, args.task, episodes=n, seed=0, num_envs=n, horizon=args.horizon)
        keep("evaluate", *rates(result),
             f"({result.env_steps} steps; {result.build_seconds:.0f} s building envs, not counted)")
        piped = evaluate(policy, args.task, episodes=n, seed=0, num_envs=n, horizon=args.horizon, asynchronous=True)
        if [r.to_dict() for r in piped.episodes] != [r.to_dict() for r in result.episodes]:
            raise SystemExit("the pipelined evaluation's episodes differ from the synchronous ones")
        main_cpu, workers_cpu = piped.cpu_seconds, piped.worker_cpu_seconds
        keep("pipelined", piped.env_steps / piped.seconds, piped.env_steps / (main_cpu + workers_cpu),
             f"(cpu: this process {main_cpu:.1f} s + env workers {workers_cpu:.1f} s)")
        # the pipeline's rate when this process and the stepping worker each have a core of their own
        keep("bound", 0.0, piped.env_steps / max(main_cpu, workers_cpu), "(steps / max(this process, workers) cpu)")
        reference = evaluate_reference("expert", args.task, episodes=n, seed=0, num_envs=n, horizon=args.horizon)
        keep("expert", *rates(reference))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--horizon", type=int, default=100, help="steps per episode")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--sequential-episodes", type=int, default=2)
    parser.add_argument("--bf16-horizon", type=int, default=20,
                        help="shorter episodes for the bf16 run (slow where the CPU emulates bf16); 0 skips it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared 2-core machine)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="the runs alternate this many times; the best rate of each counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    probe = make_env(args.task, 0, horizon=args.horizon)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    target = 1000.0
    policy = build_policy(args.task, obs_dim, act_dim, target)
    n = args.num_envs
    cpu = cpu_description()
    print(f"cpu: {cpu}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    params = sum(p.numel() for p in policy.parameters())
    print(f"task {args.task}, horizon {args.horizon}, policy small ({params} params, K={policy.config.context_length})")
    print(f"{'':52s} {'wall':>8s} {'cpu':>8s}  steps/s")

    best = measure_rounds(policy, args, target)

    bf16_rate = None
    if args.bf16_horizon:
        bf16 = evaluate(policy, args.task, episodes=n, seed=0, num_envs=n, horizon=args.bf16_horizon, bf16=True)
        bf16_wall, bf16_rate = bf16.env_steps / bf16.seconds, bf16.env_steps / bf16.cpu_seconds
        print(f"{f'evaluate, {n} envs, bf16':52s} {bf16_wall:8.1f} {bf16_rate:8.1f}  (horizon {args.bf16_horizon})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")

    seq, ours, pipe, bound, expert = "sequential", "evaluate", "pipelined", "bound", "expert"
    print(json.dumps({
        "bench": "eval_throughput", "value": round(best[ours][1], 1), "unit": "steps/s",
        "reference": round(best[seq][1], 1), "ratio": round(best[ours][1] / best[seq][1], 2), "target": 3,
        "clock": "process cpu time",
        "wall_value": round(best[ours][0], 1), "wall_reference": round(best[seq][0], 1),
        "wall_ratio": round(best[ours][0] / best[seq][0], 2),
        "expert": round(best[expert][1], 1), "ratio_to_expert": round(best[ours][1] / best[expert][1], 3),
        "ratio_to_expert_target": 0.5,
        "wall_expert": round(best[expert][0], 1), "wall_ratio_to_expert": round(best[ours][0] / best[expert][0], 3),
        "wall_async": round(best[pipe][0], 1), "wall_async_ratio_to_expert": round(best[pipe][0] / best[expert][0], 3),
        "async_two_core_bound": round(best[bound][1], 1),
        "async_two_core_bound_ratio_to_expert": round(best[bound][1] / best[expert][1], 3),
        "bf16": None if bf16_rate is None else round(bf16_rate, 1),
        "cpu": cpu, "task": args.task, "horizon": args.horizon, "num_envs": n, "threads": torch.get_num_threads(),
        "rounds": args.rounds,
    }))


if __name__ == "__main__":
    sys.exit(main())
