"""One-shot GPU check: everything a session lent a GPU for a few minutes should measure, in one run.

    python bench/gpu_check.py                 # on a CUDA machine: all parts, about 5-8 minutes
    python bench/gpu_check.py --parts tests,throughput

Parts (each timed; one failing is reported and the others still run):
  tests       `pytest -m gpu` (the CUDA tests), pass/fail counts
  throughput  the `paper` preset (hidden 512, 4 layers, 8 heads, K 50; batch 128, Meta-World dims)
              training updates/s in bf16 autocast, and its model FLOP utilisation: matmul FLOPs of
              one update counted by torch's FlopCounterMode (forward + backward as executed)
              x updates/s, over the GPU's dense bf16 peak from NVIDIA's datasheets
  eva         EVA (native backend) of the paper preset on CUDA: seconds, batches, and the fraction of
              the exact top-r variance its components capture per layer (bench/eva_init.py's measure)
  evaluate    batched evaluation of a paper-preset DT on CUDA in Meta-World envs: env steps/s
  smoke       `eva-rl experiment cw10-paper.yaml` with overrides that shrink every stage to minutes

Ends with one JSON line: {"bench": "gpu_check", "value": MFU, "unit": "fraction of bf16 peak",
"reference": peak TFLOP/s, ...}. Without CUDA it prints {"bench": "gpu_check", "skipped": true,
"reason": ...} within seconds and exits 0, so it can run anywhere. `--device cpu` runs the parts
on the CPU anyway (small sizes are then advised), which is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "throughput", "eva", "evaluate", "smoke")
STATE_DIM, ACT_DIM = 39, 4  # Meta-World

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (which print the
# "with sparsity" figure, twice these). Checked in order: the first substring of the device name wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10", 125.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def _timed(name: str, part, results: dict) -> None:
    """Run one part; its result (or its error) goes into results[name] with its wall time."""
    start = time.perf_counter()
    try:
        results[name] = part()
    except Exception as exc:  # a broken part is a finding to report, not a reason to lose the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}",
                         "where": traceback.format_exc(limit=-2).strip().splitlines()[-3:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[gpu_check] {name}: {json.dumps(results[name])[:400]}", file=sys.stderr, flush=True)


def run_gpu_tests(timeout: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    out = {"returncode": done.returncode, "summary": summary, **counts}
    if done.returncode not in (0, 5):  # 5 = nothing collected
        out["failures"] = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))][:10]
    return out


def _paper_policy(device, preset: str):
    import numpy as np

    from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

    config = PolicyConfig.from_preset(preset, state_dim=STATE_DIM, act_dim=ACT_DIM)
    metadata = PolicyMetadata(state_mean=np.zeros(STATE_DIM), state_std=np.ones(STATE_DIM))
    return DecisionTransformerPolicy(config, metadata).to(device)


def _synthetic_dataset():
    """bench/eva_init.py's random walks of Meta-World's dims (values do not change throughput or EVA's cost)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from eva_init import synthetic_dataset

    return synthetic_dataset()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(device, preset: str, batch_size: int, steps: int) -> dict:
    """bf16-autocast updates/s of `preset` at `batch_size`, and its model FLOP utilisation."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from eva_rl.train import autocast

    policy = _paper_policy(device, preset).train()
    data = _synthetic_dataset()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.01)
    generator = np.random.default_rng(0)
    k = policy.config.context_length
    batches = [_to(data.sample(batch_size, k, generator=generator), device) for _ in range(4)]

    def update(batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, torch.bfloat16):
            loss = policy.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.25)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        update(batches[0])
    flops = float(counter.get_total_flops())
    for i in range(3):  # warm-up: kernels, allocator
        update(batches[i % 4])
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        update(batches[i % 4])
    _sync(device)
    per_second = steps / (time.perf_counter() - start)
    out = {"preset": preset, "batch_size": batch_size, "context": k, "updates_per_second": round(per_second, 2),
           "flops_per_update": flops, "achieved_tflops": round(flops * per_second / 1e12, 2)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = bf16_peak_tflops(name)
        out.update(device_name=name, peak_bf16_tflops=peak,
                   mfu=None if peak is None else round(flops * per_second / (peak * 1e12), 4),
                   max_memory_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
    return out


def measure_eva(device, preset: str, batch_size: int, max_batches: int, rank: int) -> dict:
    """EVA on `device`: seconds, batches, captured fraction of the exact top-r variance per layer."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from eva_init import captured, exact_covariances  # the measure bench/eva_init.py reports

    from eva_rl.adapters import methods
    from eva_rl.adapters.eva import eva_state_dict

    policy = _paper_policy(device, preset).eval()
    data = _synthetic_dataset()
    generator = np.random.default_rng(0)
    k = policy.config.context_length
    batches = [_to(data.sample(batch_size, k, generator=generator), device) for _ in range(max_batches)]
    tokens = ("state", "action")
    _sync(device)
    start = time.perf_counter()
    weights, report = eva_state_dict(policy, batches, rank=rank, rho=1.0, tau=0.99, tokens=tokens,
                                     max_batches=max_batches, backend="native")
    _sync(device)
    seconds = time.perf_counter() - start
    names = list(methods.resolve_target_modules(policy.model))
    covs = exact_covariances(policy, names, batches, tokens)
    fractions = {n: captured(weights[n].to(covs[n].device), covs[n]) for n in names}
    worst = min(fractions, key=fractions.get)
    return {"preset": preset, "rank": rank, "batch_size": batch_size, "eva_seconds": round(seconds, 3),
            "batches": report.batches_total, "not_converged": len(report.not_converged),
            "captured_mean": round(float(np.mean(list(fractions.values()))), 4),
            "captured_worst": round(fractions[worst], 4), "worst_layer": worst,
            "a_device": str(next(iter(weights.values())).device)}


def measure_evaluate(device, preset: str, tasks: list[str], episodes: int, num_envs: int, horizon: int) -> dict:
    """Batched rollouts of a (random-weight) DT on `device`: env steps/s and where the time goes."""
    from eva_rl.evaluate import evaluate

    policy = _paper_policy(device, preset).eval()
    result = evaluate(policy, tasks, episodes, seed=0, num_envs=num_envs, horizon=horizon, target_returns=1000.0,
                      bf16=device.type == "cuda")
    return {"tasks": tasks, "episodes": episodes, "num_envs": num_envs, "horizon": horizon,
            "env_steps": result.env_steps, "seconds_rollout": round(result.seconds, 2),
            "env_steps_per_second": round(result.env_steps / max(result.seconds, 1e-9), 1),
            "build_seconds": round(result.build_seconds, 2)}


def smoke_overrides(out_dir: str, steps: int, preset: str = "paper", batch_size: int = 128) -> list[str]:
    """cw10-paper.yaml shrunk to minutes: two pretraining tasks, one fine-tuning task, LoRA and EVA,
    `steps` updates, a few short episodes; the paper preset and batch 128 stay unless given."""
    tune = max(steps // 2, 1)
    sizes = [] if (preset, batch_size) == ("paper", 128) else [
        f"pretrain.overrides.policy.preset={preset}", f"pretrain.overrides.batch_size={batch_size}",
        f"finetune.overrides.train.batch_size={batch_size}", "finetune.overrides.eva.batch_size=8"]
    return sizes + [f"out_dir={out_dir}", "collect.noises=[0.1]", "collect.pretrain_episodes=4", "collect.finetune_episodes=4",
            "collect.horizon=100", "pretrain.tasks=[reach-v3,push-v3]", f"pretrain.overrides.steps={steps}",
            "pretrain.overrides.val_every=0", "pretrain.overrides.data.val_fraction=0.25", "pretrain.overrides.eval_every=0", f"pretrain.overrides.log_every={steps}",
            f"pretrain.overrides.checkpoint_every={steps}", "pretrain.overrides.optim.warmup_steps=1",
            "pretrain.cpus=0", "pretrain.gpus=0", "finetune.tasks=[hammer-v3]", "finetune.methods=[lora,eva]",
            "finetune.ranks=[8]", "finetune.seeds=[0]", f"finetune.overrides.train.steps={tune}",
            "finetune.overrides.train.val_every=0", "finetune.overrides.train.data.val_fraction=0.25", f"finetune.overrides.train.eval_every={tune}",
            "finetune.overrides.train.eval_episodes=2", f"finetune.overrides.train.log_every={tune}",
            f"finetune.overrides.train.checkpoint_every={tune}", "finetune.overrides.train.optim.warmup_steps=1",
            "finetune.cpus_per_run=1", "finetune.gpus_per_run=0"]


def run_smoke(steps: int, timeout: int, preset: str, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out_dir:
        args = [sys.executable, "-m", "eva_rl.cli", "experiment", "cw10-paper.yaml",
                *smoke_overrides(str(Path(out_dir) / "runs"), steps, preset, batch_size), "--workers", "2", "--no-report"]
        env = {**os.environ, "MINARI_DATASETS_PATH": str(Path(out_dir) / "datasets")}
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = {"returncode": done.returncode, "steps": steps, "tail": done.stdout.strip().splitlines()[-4:]}
        if done.returncode != 0:
            out["stderr_tail"] = done.stderr.strip().splitlines()[-8:]
        errors = sorted((Path(out_dir) / "runs").rglob("error.txt"))
        if errors:  # the temporary directory goes away: keep what each failed job said
            out["errors"] = {str(e.relative_to(out_dir)): e.read_text().strip().splitlines()[-6:] for e in errors}
        runs = Path(out_dir) / "runs" / "runs"  # runs/<task>/<method>-r<rank>-s<seed>/metrics.json
        out["runs"] = {}
        for path in sorted(runs.rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            out["runs"][str(path.parent.relative_to(runs))] = {
                **metrics.get("final", {}), "train_seconds": metrics.get("train_seconds"),
                "eva_seconds": metrics.get("eva_seconds")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--device", default="cuda", help="cuda (skips without one) or cpu (to test this script)")
    parser.add_argument("--preset", default="paper", help="policy preset measured (paper; tiny to test the script)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed training updates")
    parser.add_argument("--eva-batches", type=int, default=40, help="EVA's batch cap")
    parser.add_argument("--eval-tasks", default="hammer-v3,push-wall-v3")
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--eval-horizon", type=int, default=200)
    parser.add_argument("--smoke-steps", type=int, default=400, help="pretraining updates of the smoke run")
    parser.add_argument("--timeout", type=int, default=240, help="seconds allowed to the tests and the smoke run each")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_check", "skipped": True,
                          "reason": f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"}))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {}
    steps = {
        "tests": lambda: run_gpu_tests(args.timeout),
        "throughput": lambda: measure_throughput(device, args.preset, args.batch_size, args.steps),
        "eva": lambda: measure_eva(device, args.preset, 32, args.eva_batches, rank=8),
        "evaluate": lambda: measure_evaluate(device, args.preset, args.eval_tasks.split(","), args.eval_episodes,
                                             num_envs=min(args.eval_episodes, 16), horizon=args.eval_horizon),
        "smoke": lambda: run_smoke(args.smoke_steps, args.timeout, args.preset, args.batch_size),
    }
    for part in parts:
        _timed(part, steps[part], results)
    throughput = results.get("throughput", {})
    print(json.dumps({"bench": "gpu_check", "skipped": False, "value": throughput.get("mfu"),
                      "unit": "fraction of dense bf16 peak", "reference": throughput.get("peak_bf16_tflops"),
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
