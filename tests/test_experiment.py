"""The experiment engine: grid expansion, skip/resume, failures, a killed worker, the ray backend.

The executors run any `run_fn(run_dir, config) -> metrics`; these tests pass `tiny_run` below
(a few file writes standing in for a training loop with checkpoints) so they need no pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from eva_rl.experiment import (ExperimentConfig, FinetuneStage, Job, config_path, expand_grid, is_done,
                               load_experiment, run_jobs, run_name)

TESTS_DIR = Path(__file__).resolve().parent


def tiny_run(run_dir: Path, config: dict) -> dict:
    """A 'training loop' of config['steps'] steps that checkpoints every step and resumes from it."""
    checkpoint = run_dir / "checkpoint.json"
    start = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    with open(run_dir / "calls.txt", "a") as handle:
        handle.write(f"{start}\n")
    print(f"starting at step {start}")
    if config.get("fail"):
        raise RuntimeError("boom: this run fails on purpose")
    for step in range(start, config["steps"]):
        time.sleep(config.get("sleep", 0.0))
        checkpoint.write_text(json.dumps({"step": step + 1}))
    return {"kind": "finetune", "task": "t", "method": "lora", "rank": 8, "seed": 0, "final": {"success_rate": 1.0},
            "steps_done": config["steps"], "omp_threads": os.environ.get("OMP_NUM_THREADS")}


def jobs_in(root: Path, configs: dict[str, dict]) -> list[Job]:
    return [Job(name, root / name, config, {"name": name}) for name, config in configs.items()]


def test_grid_expansion_and_names() -> None:
    stage = FinetuneStage(tasks=("task-a", "task-b"), methods=("fft", "lora", "eva"), ranks=(4, 8), seeds=(0, 1),
                          sweep={"train.optim.lr": [1e-3, 1e-4]})
    points = expand_grid(stage)
    assert len(points) == 2 * (1 + 2 * 2) * 2 * 2  # tasks x (fft + 2 methods x 2 ranks) x seeds x lr
    assert points[0] == {"task": "task-a", "method": "fft", "rank": None, "seed": 0, "train.optim.lr": 1e-3}
    names = [run_name(p) for p in points]
    assert len(set(names)) == len(names)
    assert names[0] == "task-a/fft-s0-train.optim.lr=0.001"
    assert "task-b/eva-r8-s1-train.optim.lr=0.0001" in names
    assert sum(p["method"] == "fft" for p in points) == 2 * 2 * 2


def test_experiment_yaml_loads_and_rejects_bad_keys(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("name: g\nout_dir: out\npretrain:\n  tasks: [reach-v3]\n  overrides:\n    optim: {lr: 0.001}\n"
                    "finetune:\n  tasks: [push-v3]\n  methods: [lora, eva]\n  seeds: [0, 1, 2]\n"
                    "  sweep:\n    train.optim.lr: [0.001, 0.0003]\n")
    config = load_experiment(path, ["finetune.ranks=[2,4]"])
    assert isinstance(config, ExperimentConfig)
    assert config.finetune.seeds == (0, 1, 2) and config.finetune.ranks == (2, 4)
    assert config.pretrain.overrides == {"optim": {"lr": 0.001}}
    assert len(expand_grid(config.finetune)) == 2 * 2 * 3 * 2
    with pytest.raises(ValueError, match="finetune.method"):
        load_experiment(path, ["finetune.method=[lora]"])
    with pytest.raises(ValueError, match="finetune.tasks is empty"):
        load_experiment(path, ["finetune.tasks=[]"])
    with pytest.raises(ValueError, match="sweep"):
        FinetuneStage(tasks=("a",), sweep={"train.optim.lr": 0.1})
    with pytest.raises(FileNotFoundError, match="not found"):
        config_path("no-such-config.yaml")


def test_readme_config_paths_work_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged ones are found
    assert config_path("configs/cw10-cpu.yaml").read_text() == config_path("cw10-cpu.yaml").read_text()
    assert config_path("configs/cw10-cpu.yaml").name == "cw10-cpu.yaml"


def test_package_configs_resolve_against_the_pipeline_configs(tmp_path: Path) -> None:
    from eva_rl.envs import resolve_tasks
    from eva_rl.experiment import finetune_jobs, pretrain_job

    for name in ("quickstart.yaml", "cw10-cpu.yaml", "cw10-cpu-lite.yaml", "cw10-paper.yaml", "mujoco.yaml"):
        full = load_experiment(name)
        # one task and seed per config keeps this fast; every key is still checked by TrainConfig/FinetuneConfig
        config = load_experiment(name, [f"out_dir={tmp_path / name}", "finetune.seeds=[0]",
                                        f"finetune.tasks=[{resolve_tasks(list(full.finetune.tasks))[0]}]"])
        job = pretrain_job(config, resolve_tasks(list(config.pretrain.tasks)))
        assert job.config["out_dir"] == str(tmp_path / name / "pretrain") and job.config["data"]["paths"], name
        jobs = finetune_jobs(config, list(config.finetune.tasks), tmp_path / "model")
        assert len(jobs) == len(full.finetune.methods) * len(full.finetune.ranks) - (len(full.finetune.ranks) - 1) * (
            "fft" in full.finetune.methods), name
        for job in jobs:
            assert job.config["method"] == job.point["method"] and job.config["train"]["seed"] == 0
            assert job.config["train"]["out_dir"] == str(job.run_dir) and job.config["train"]["resume"] is True
            assert len(job.config["train"]["data"]["paths"]) == len(config.collect.noises)
    lite = load_experiment("cw10-cpu-lite.yaml")
    fft = [j for j in finetune_jobs(lite, ["hammer-v3"], tmp_path / "model") if j.point["method"] == "fft"]
    assert fft and all(j.config["train"]["optim"]["lr"] == 1e-4 for j in fft)  # method_overrides apply
    typo = load_experiment("cw10-cpu-lite.yaml", ["finetune.method_overrides={ftt: {train.optim.lr: 1e-4}}"])
    with pytest.raises(ValueError, match=r"method_overrides names \['ftt'\], which are not methods"):
        finetune_jobs(typo, ["hammer-v3"], tmp_path / "model")


def test_failed_run_is_recorded_and_others_finish_then_rerun_skips(tmp_path: Path, capsys) -> None:
    jobs = jobs_in(tmp_path, {"a": {"steps": 3}, "b": {"steps": 2, "fail": True}, "c": {"steps": 1}})
    results = run_jobs(jobs, tiny_run, workers=2, label="grid")
    assert [(r.name, r.status) for r in results] == [("a", "done"), ("b", "failed"), ("c", "done")]
    assert is_done(tmp_path / "a") and not (tmp_path / "b" / "done").exists()
    assert "RuntimeError: boom" in (tmp_path / "b" / "error.txt").read_text()
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "failed"
    assert "starting at step 0" in (tmp_path / "a" / "log.txt").read_text()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps_done"] == 3 and metrics["omp_threads"] == "1"  # threads set per worker
    progress = capsys.readouterr().err
    assert "[grid] 2/3 done, 0 running, 1 failed" in progress and "ETA" in progress
    # the same command again: finished runs are skipped, the failed one is tried again
    again = run_jobs(jobs, tiny_run, workers=2, progress=False)
    assert [r.status for r in again] == ["skipped", "failed", "skipped"]
    assert (tmp_path / "a" / "calls.txt").read_text() == "0\n"
    assert json.loads((tmp_path / "b" / "run.json").read_text())["attempts"] == 2


def test_killed_worker_fails_only_its_run_and_resumes_on_rerun(tmp_path: Path) -> None:
    jobs = jobs_in(tmp_path, {"slow": {"steps": 60, "sleep": 0.1}, "fast": {"steps": 2}})
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(run_jobs(jobs, tiny_run, workers=2, progress=False)))
    thread.start()
    checkpoint = tmp_path / "slow" / "checkpoint.json"
    deadline = time.time() + 60  # spawning is slow on a busy machine
    while time.time() < deadline:
        try:
            if json.loads(checkpoint.read_text())["step"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    pid = json.loads((tmp_path / "slow" / "run.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert {r.name: r.status for r in results} == {"slow": "failed", "fast": "done"}
    assert "killed by signal 9" in (tmp_path / "slow" / "error.txt").read_text()
    killed_at = json.loads(checkpoint.read_text())["step"]
    assert 3 <= killed_at < 60
    fast = jobs_in(tmp_path, {"slow": {"steps": 60, "sleep": 0.0}, "fast": {"steps": 2}})
    # a changed config in an existing run directory is refused, not overwritten ...
    with pytest.raises(FileExistsError, match="different config"):
        run_jobs(fast, tiny_run, workers=2, progress=False)
    # ... so resume with the same config: the killed run continues from its checkpoint
    again = run_jobs(jobs, tiny_run, workers=2, progress=False)
    assert [r.status for r in again] == ["done", "skipped"]
    starts = [int(x) for x in (tmp_path / "slow" / "calls.txt").read_text().split()]
    assert starts[0] == 0 and starts[1] >= killed_at - 1 and len(starts) == 2
    assert json.loads((tmp_path / "slow" / "metrics.json").read_text())["steps_done"] == 60
    assert not (tmp_path / "slow" / "error.txt").exists()


def test_overwrite_moves_the_old_run_aside(tmp_path: Path) -> None:
    run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}}), tiny_run, workers=1, progress=False)
    results = run_jobs(jobs_in(tmp_path, {"a": {"steps": 2}}), tiny_run, workers=1, progress=False, overwrite=True)
    assert [r.status for r in results] == ["done"]
    [old] = list((tmp_path / "_replaced").iterdir())
    assert json.loads((old / "run.json").read_text())["config"] == {"steps": 1}
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["steps_done"] == 2


def test_ray_backend_on_a_local_instance(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)])}})
    try:
        jobs = jobs_in(tmp_path, {"a": {"steps": 2}, "b": {"steps": 1, "fail": True}, "c": {"steps": 1}})
        results = run_jobs(jobs, tiny_run, backend="ray", progress=False)
        assert [(r.name, r.status) for r in results] == [("a", "done"), ("b", "failed"), ("c", "done")]
        assert "boom" in (tmp_path / "b" / "error.txt").read_text()
        assert run_jobs(jobs[:1], tiny_run, backend="ray", progress=False)[0].status == "skipped"
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EVA_RL_SLOW_TESTS"), reason="about 60 s of CPU: set EVA_RL_SLOW_TESTS=1")
def test_pipeline_end_to_end_at_toy_scale(tmp_path: Path) -> None:
    """collect -> pretrain -> lora/eva grid -> report with the real stage functions, at toy scale."""
    from eva_rl.experiment import run_experiment
    from eva_rl.report import write_report

    tiny = {"policy": {"preset": "tiny"}, "batch_size": 8, "log_every": 5, "val_every": 0, "eval_every": 0,
            "checkpoint_every": 0, "optim": {"warmup_steps": 2}}
    grid = {
        "out_dir": str(tmp_path),
        "collect": {"noises": [0.5], "pretrain_episodes": 2, "finetune_episodes": 3, "horizon": 20},
        "pretrain": {"tasks": ["reach-v3"], "overrides": {**tiny, "steps": 10}},
        "finetune": {"tasks": ["push-v3"], "methods": ["lora", "eva"], "ranks": [2], "overrides": {
            # no train.policy: fine-tuning takes the architecture from the checkpoint (set, it is an error)
            "train": {**{k: v for k, v in tiny.items() if k != "policy"}, "steps": 6, "data": {"val_fraction": 0.34}, "val_every": 3, "eval_every": 6,
                      "eval_episodes": 2, "eval_num_envs": 2, "eval_horizon": 20},
            "eva": {"batch_size": 8, "max_batches": 4}}},
    }
    config = load_experiment(None, [f"{key}={json.dumps(value)}" for key, value in grid.items()])
    result = run_experiment(config, workers=2, progress=False)
    assert [r.status for r in result.runs] == ["done", "done"], [r.error for r in result.runs]
    assert (tmp_path / "pretrain" / "model").is_dir() and is_done(tmp_path / "pretrain")
    eva = tmp_path / "runs" / "push-v3" / "eva-r2-s0"
    metrics = json.loads((eva / "metrics.json").read_text())
    assert metrics["kind"] == "finetune" and metrics["method"] == "eva" and metrics["final"]["success_rate"] is not None
    assert (eva / "eva_report.json").is_file()
    # the same command again does no work: every stage is skipped
    again = run_experiment(config, workers=2, progress=False)
    assert again.pretrain.status == "skipped" and [r.status for r in again.runs] == ["skipped", "skipped"]
    report = write_report(tmp_path, n_bootstrap=50, tensorboard=False)
    assert report.tables["success"].variants == ("lora", "eva")
    assert (tmp_path / "report" / "eva_ranks.png").is_file()


def test_a_run_another_process_is_running_is_left_alone(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
    try:
        assert other.stdout.readline().strip() == b"ready"  # exec'd: its /proc cmdline is python's
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "run.json").write_text(json.dumps(
            {"status": "running", "pid": other.pid, "host": socket.gethostname(), "config": {"steps": 1}}))
        [result] = run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}}), tiny_run, workers=1, progress=False)
        assert result.status == "busy" and not (tmp_path / "a" / "calls.txt").exists()
    finally:
        other.kill()
        other.wait()
    [result] = run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}}), tiny_run, workers=1, progress=False)
    assert result.status == "done"


def test_pretraining_that_another_process_runs_stops_the_experiment_before_fine_tuning(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from eva_rl.experiment import StageFailed, dataset_paths, pretrain_job, run_experiment

    config = load_experiment(None, [f"out_dir={tmp_path}", "collect.enabled=false", "pretrain.tasks=[reach-v3]",
                                    "finetune.tasks=[push-v3]"])
    for task, which in (("reach-v3", "pretrain"), ("push-v3", "finetune")):
        for path in dataset_paths(config, [task], which):
            path.mkdir(parents=True)  # stand-ins: collection only checks that they exist
    job = pretrain_job(config, ["reach-v3"])
    other = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
    try:
        assert other.stdout.readline().strip() == b"ready"
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "run.json").write_text(json.dumps(
            {"status": "running", "pid": other.pid, "host": socket.gethostname(), "config": job.config}))
        with pytest.raises(StageFailed, match=f"running in process {other.pid}"):
            run_experiment(config, workers=1, progress=False)
    finally:
        other.kill()
        other.wait()
    assert not (tmp_path / "runs").exists()  # no fine-tuning run was started against a missing checkpoint
