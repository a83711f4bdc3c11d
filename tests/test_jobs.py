"""The job runner: skip/resume, failures, a killed worker, runs another process owns, the ray backend.

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

from eva_rl.jobs import Job, is_done, run_jobs

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
    assert "[grid] 3/3 finished, 2 done, 0 running, 1 failed" in progress and "ETA" in progress
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


