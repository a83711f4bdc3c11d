"""The experiment's science: config loading, grid expansion and run names, the stages' jobs.

The job runner (skip/resume, failures, killed workers, Ray) is tested in test_jobs.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from eva_rl.experiment import ExperimentConfig, FinetuneStage, config_path, expand_grid, load_experiment, run_name
from eva_rl.rundir import is_finished

def test_grid_expansion_and_names() -> None:
    stage = FinetuneStage(tasks=("task-a", "task-b"), methods=("fft", "lora", "eva"), ranks=(4, 8), seeds=(0, 1),
                          sweep={"train.optim.lr": [1e-3, 1e-4]})
    points = expand_grid(stage)
    assert len(points) == 2 * (1 + 2 * 2) * 2 * 2  # tasks x (fft + 2 methods x 2 ranks) x seeds x lr
    assert points[0] == {"task": "task-a", "method": "fft", "rank": None, "seed": 0, "train.optim.lr": 1e-3}
    names = [run_name(p) for p in points]
    assert len(set(names)) == len(names)
    assert names[0] == "task-a/fft-s0-train.optim.lr-0.001"  # shell-safe: no "=", no quotes needed
    assert "task-b/eva-r8-s1-train.optim.lr-0.0001" in names
    assert run_name({"task": "t", "method": "eva", "rank": 4, "seed": 0, "train.optim.betas": [0.9, 0.99],
                     "train.data.paths": ["/d/a b"]}) == "t/eva-r4-s0-train.optim.betas-0.9_0.99-train.data.paths-d_a_b"
    assert sum(p["method"] == "fft" for p in points) == 2 * 2 * 2


def test_method_seeds_give_some_methods_more_seeds() -> None:
    stage = FinetuneStage(tasks=("task-a",), methods=("fft", "lora", "eva"), seeds=(0, 1),
                          method_seeds={"lora": [0, 1, 2, 3], "eva": [0, 1, 2, 3]})
    seeds = {m: [p["seed"] for p in expand_grid(stage) if p["method"] == m] for m in stage.methods}
    assert seeds == {"fft": [0, 1], "lora": [0, 1, 2, 3], "eva": [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="method_seeds names 'dora', which is not in finetune.methods"):
        FinetuneStage(tasks=("task-a",), methods=("lora",), method_seeds={"dora": [0]})
    with pytest.raises(ValueError, match="method_seeds.lora must be a non-empty list"):
        FinetuneStage(tasks=("task-a",), methods=("lora",), method_seeds={"lora": []})


def test_task_policies_list_gives_a_dataset_per_policy(tmp_path: Path) -> None:
    """A medium and an expert snapshot for one body: one dataset per policy and noise level, in
    both stages; other tasks keep the stage's policy."""
    from eva_rl.data.collect import dataset_id
    from eva_rl.experiment import dataset_paths

    path = tmp_path / "mj.yaml"
    path.write_text("name: mj\nout_dir: out\ncollect:\n  policy: random\n  noises: [0.1, 0.3]\n  task_policies:\n"
                    "    Hopper-v5: [sb3:m/Hopper-v5-sac-100000.zip, sb3:m/Hopper-v5-sac.zip]\n"
                    "pretrain:\n  tasks: [Hopper-v5, Pendulum-v1]\nfinetune:\n  tasks: [Hopper-v5]\n  methods: [lora]\n")
    config = load_experiment(path)
    names = [f"{p.parent.name}/{p.name}" for p in dataset_paths(config, ["Hopper-v5", "Pendulum-v1"], "pretrain")]
    assert names == [dataset_id("Hopper-v5", policy, noise)
                     for policy in ("sb3:m/Hopper-v5-sac-100000.zip", "sb3:m/Hopper-v5-sac.zip") for noise in (0.1, 0.3)] \
        + [dataset_id("Pendulum-v1", "random", noise) for noise in (0.1, 0.3)]
    assert len(set(names)) == 6 and len(dataset_paths(config, ["Hopper-v5"], "finetune")) == 4
    with pytest.raises(ValueError, match="task_policies.Hopper-v5 must be a policy"):
        load_experiment(path, ["collect.task_policies={Hopper-v5: []}"])


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
    from eva_rl.experiment import dataset_paths, finetune_jobs, pretrain_job

    for name in ("quickstart.yaml", "cw10-cpu.yaml", "cw10-cpu-lite.yaml", "cw10-cpu-data.yaml", "cw10-paper.yaml",
                 "mujoco.yaml"):
        full = load_experiment(name)
        # one task and seed per config keeps this fast; every key is still checked by TrainConfig/FinetuneConfig
        config = load_experiment(name, [f"out_dir={tmp_path / name}", "finetune.seeds=[0]",
                                        f"finetune.tasks=[{resolve_tasks(list(full.finetune.tasks))[0]}]"])
        swept = int(np.prod([len(values) for values in full.finetune.sweep.values()]))
        job = pretrain_job(config, resolve_tasks(list(config.pretrain.tasks)))
        assert job.config["out_dir"] == str(tmp_path / name / "pretrain") and job.config["data"]["paths"], name
        jobs = finetune_jobs(config, list(config.finetune.tasks), tmp_path / "model")
        stage = config.finetune  # one run per seed (more where method_seeds says) and rank; fft has no rank
        assert len(jobs) == swept * sum(len(stage.method_seeds.get(m, stage.seeds)) * (1 if m == "fft" else len(stage.ranks))
                                        for m in stage.methods), name
        for job in jobs:
            assert job.config["method"] == job.point["method"] and job.config["train"]["seed"] == job.point["seed"]
            assert job.config["train"]["out_dir"] == str(job.run_dir) and job.config["train"]["resume"] is True
            assert job.config["train"]["data"]["paths"] == [str(p) for p in dataset_paths(config, [job.point["task"]],
                                                                                          "finetune")]
            assert len(job.config["train"]["data"]["paths"]) % len(config.collect.noises) == 0
    lite = load_experiment("cw10-cpu-lite.yaml")
    fft = [j for j in finetune_jobs(lite, ["hammer-v3"], tmp_path / "model") if j.point["method"] == "fft"]
    assert fft and all(j.config["train"]["optim"]["lr"] == 1e-4 for j in fft)  # method_overrides apply
    typo = load_experiment("cw10-cpu-lite.yaml", ["finetune.method_overrides={ftt: {train.optim.lr: 1e-4}}"])
    with pytest.raises(ValueError, match=r"method_overrides names \['ftt'\], which are not methods"):
        finetune_jobs(typo, ["hammer-v3"], tmp_path / "model")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EVA_RL_SLOW_TESTS"), reason="about 60 s of CPU: set EVA_RL_SLOW_TESTS=1")
def test_pipeline_end_to_end_at_toy_scale(tmp_path: Path) -> None:
    """collect -> pretrain -> lora/eva grid -> report with the real stage functions, at toy scale."""
    from eva_rl.experiment import run_experiment
    from eva_rl.report import BASE, write_report

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
    assert (tmp_path / "pretrain" / "model").is_dir() and is_finished(tmp_path / "pretrain")
    eva = tmp_path / "runs" / "push-v3" / "eva-r2-s0"
    metrics = json.loads((eva / "metrics.json").read_text())
    assert metrics["kind"] == "finetune" and metrics["method"] == "eva" and metrics["final"]["success_rate"] is not None
    assert (eva / "eva_report.json").is_file()
    # the same command again does no work: every stage is skipped
    again = run_experiment(config, workers=2, progress=False)
    assert again.pretrain.status == "skipped" and [r.status for r in again.runs] == ["skipped", "skipped"]
    report = write_report(tmp_path, n_bootstrap=50, tensorboard=False)
    # the pretrained policy (every run's step-0 evaluation) heads the table
    assert report.tables["success"].variants == (BASE, "lora", "eva")
    assert (tmp_path / "report" / "eva_ranks.png").is_file()


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


def test_dotted_sweep_keys_from_the_command_line_are_one_key(tmp_path: Path) -> None:
    from eva_rl.experiment import finetune_jobs

    config = load_experiment(None, [f"out_dir={tmp_path}", "finetune.tasks=[push-v3]", "finetune.methods=[eva]",
                                    "finetune.ranks=[4]", "finetune.sweep.eva.rho=[1.0, 2.0]"])
    assert config.finetune.sweep == {"eva.rho": [1.0, 2.0]}
    jobs = finetune_jobs(config, ["push-v3"], tmp_path / "model")
    # rho 1.0 is the config's own value: that run is the unswept grid's, named like it
    assert [job.name for job in jobs] == ["push-v3/eva-r4-s0", "push-v3/eva-r4-s0-eva.rho-2.0"]
    assert [job.config["eva"]["rho"] for job in jobs] == [1.0, 2.0]
    assert jobs[0].point == {"task": "push-v3", "method": "eva", "rank": 4, "seed": 0, "eva.rho": 1.0}
    # a YAML's dotted sweep key and a command-line override of it: the override wins
    yaml_file = tmp_path / "grid.yaml"
    yaml_file.write_text("finetune:\n  tasks: [push-v3]\n  sweep:\n    eva.rho: [3.0]\n")
    assert load_experiment(yaml_file, ["finetune.sweep.eva.rho=[1.0]"]).finetune.sweep == {"eva.rho": [1.0]}


def test_data_size_grid_shares_the_lite_grids_runs_at_all_episodes(tmp_path: Path) -> None:
    """cw10-cpu-data sweeps train.data.episodes over [5, 10, 20, null]; at null (the default) its
    runs are cw10-cpu-lite's, same folder and same config, so running both skips them once done."""
    from eva_rl.experiment import finetune_jobs

    out = [f"out_dir={tmp_path}"]
    lite = {j.name: j for j in finetune_jobs(load_experiment("cw10-cpu-lite.yaml", out), ["push-back-v3"], tmp_path / "m")}
    data = finetune_jobs(load_experiment("cw10-cpu-data.yaml", out), ["push-back-v3"], tmp_path / "m")
    shared = [j for j in data if j.point["train.data.episodes"] is None]
    assert shared and all(j.name in lite and j.config == lite[j.name].config for j in shared
                          if not (j.point["method"] == "fft" and j.point["seed"] == 1))  # lite runs fft on seed 0 only
    assert "push-back-v3/lora-r8-s0" in {j.name for j in shared}
    assert {j.name for j in data if j.point["train.data.episodes"] == 5} >= {"push-back-v3/eva-r8-s1-train.data.episodes-5"}
    # a folder made when the default value still named its run is found under that name
    old = tmp_path / "runs" / "push-back-v3" / "dora-r8-s0-train.data.episodes-None"
    old.mkdir(parents=True)
    again = finetune_jobs(load_experiment("cw10-cpu-data.yaml", out), ["push-back-v3"], tmp_path / "m")
    assert old in {j.run_dir for j in again}


def test_runs_made_under_the_old_folder_names_are_still_found(tmp_path: Path) -> None:
    from eva_rl.experiment import finetune_jobs

    config = load_experiment(None, [f"out_dir={tmp_path}", "finetune.tasks=[push-v3]", "finetune.methods=[eva]",
                                    "finetune.ranks=[4]", "finetune.sweep={eva.rho: [2.0, 3.0]}"])
    (tmp_path / "runs" / "push-v3" / "eva-r4-s0-eva.rho=2.0").mkdir(parents=True)
    jobs = finetune_jobs(config, ["push-v3"], tmp_path / "model")
    assert [job.name for job in jobs] == ["push-v3/eva-r4-s0-eva.rho=2.0", "push-v3/eva-r4-s0-eva.rho-3.0"]
    assert jobs[0].config["train"]["out_dir"] == str(tmp_path / "runs" / "push-v3" / "eva-r4-s0-eva.rho=2.0")


def test_runs_of_an_older_release_are_skipped_not_replaced(tmp_path: Path) -> None:
    """A release that adds config keys with defaults (train.eval_steps, ...) keeps earlier runs:
    the pretraining and the grid points are skipped, not refused or (with --overwrite) redone."""
    from eva_rl.experiment import finetune_jobs, pretrain_job
    from eva_rl.jobs import plan_jobs

    config = load_experiment(None, [f"out_dir={tmp_path}", "finetune.tasks=[push-v3]", "finetune.methods=[lora]"])
    jobs = [pretrain_job(config, ["reach-v3"]), *finetune_jobs(config, ["push-v3"], tmp_path / "model")]
    for job, missing in zip(jobs, (["eval_steps"], ["train", "eval_steps"])):
        old = json.loads(json.dumps(job.config))
        section = old
        for part in missing[:-1]:
            section = section[part]
        del section[missing[-1]]
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "run.json").write_text(json.dumps({"status": "done", "config": old}))
        (job.run_dir / "metrics.json").write_text("{}")
    todo, skipped = plan_jobs(jobs, overwrite=True)
    assert todo == [] and [r.status for r in skipped] == ["skipped", "skipped"]
    assert not (tmp_path / "_replaced").exists() and not (tmp_path / "runs" / "push-v3" / "_replaced").exists()
    # the key absent and set to another value: another config, refused (or moved aside with overwrite)
    changed = load_experiment(None, [f"out_dir={tmp_path}", "finetune.tasks=[push-v3]", "finetune.methods=[lora]",
                                     "finetune.overrides={train: {eval_steps: [0, 5]}}"])
    [job] = finetune_jobs(changed, ["push-v3"], tmp_path / "model")
    with pytest.raises(FileExistsError, match=r"different config: .*train\.eval_steps: run\.json unset, now \[0, 5\]"):
        plan_jobs([job])
    todo, _ = plan_jobs([job], overwrite=True)
    assert todo == [job] and len(list((tmp_path / "runs" / "push-v3" / "_replaced").iterdir())) == 1
