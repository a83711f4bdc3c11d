"""Expert data collection on CW10: episodes/s, env steps/s and the expert's success rate per task.

Runs `collect_task` (rollouts + Minari write) for every CW10 task at noise 0 and at the default
noise, and, as the reference in the same run, the same number of steps of the bare Meta-World env
(`gym.make("Meta-World/MT1")`) driven by the same scripted expert without eva-rl's wrappers or any
dataset writing. ratio = our steps/s / bare steps/s (1.0 = no overhead).

    python bench/collect.py [--episodes 20] [--tasks cw10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import gymnasium as gym
import numpy as np

warnings.filterwarnings("ignore")

from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from eva_rl.data.collect import CollectConfig, collect_task  # noqa: E402
from eva_rl.envs import resolve_tasks  # noqa: E402


def bare_steps_per_second(task: str, steps: int, seed: int = 0) -> float:
    env = gym.make("Meta-World/MT1", env_name=task, seed=seed, max_episode_steps=200, disable_env_checker=True)
    policy = ENV_POLICY_MAP[task]()
    obs, _ = env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(policy.get_action(obs))
        if terminated or truncated:
            obs, _ = env.reset()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--tasks", default="cw10")
    parser.add_argument("--noise", type=float, default=CollectConfig().noise, help="the non-zero noise level")
    args = parser.parse_args()
    rows, ours_steps, ours_seconds, bare = [], 0, 0.0, []
    with tempfile.TemporaryDirectory() as root:
        for task in resolve_tasks(args.tasks):
            row = {"task": task}
            for noise in (0.0, args.noise):
                config = CollectConfig(noise=noise, episodes=args.episodes, out=root)
                start = time.perf_counter()
                summary = collect_task(task, config)
                seconds = time.perf_counter() - start
                ours_steps += summary.steps
                ours_seconds += seconds
                row[f"success@{noise:g}"] = summary.success_rate
                row[f"return@{noise:g}"] = summary.mean_return
            bare.append(bare_steps_per_second(task, summary.steps))
            rows.append(row)
            print(json.dumps(row))
    ours = ours_steps / ours_seconds
    reference = float(np.mean(bare))
    episodes_per_second = ours_steps / 200 / ours_seconds
    print(f"\n| task | expert success (noise 0) | success (noise {args.noise:g}) | return (noise 0) | return (noise {args.noise:g}) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['task']} | {row['success@0']:.2f} | {row[f'success@{args.noise:g}']:.2f} | "
              f"{row['return@0']:.0f} | {row[f'return@{args.noise:g}']:.0f} |")
    print(f"\ncollection incl. Minari write: {ours:.0f} steps/s, {episodes_per_second:.2f} episodes/s "
          f"(200-step episodes); bare env + expert: {reference:.0f} steps/s")
    print(json.dumps({"bench": "collect", "value": round(ours, 1), "unit": "steps/s", "reference": round(reference, 1),
                      "ratio": round(ours / reference, 3), "target": 0.9}))


if __name__ == "__main__":
    main()
