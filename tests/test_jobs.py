"""The job runner: skip/resume, failures, a killed worker, runs another process owns, the ray backend.

The executors run any `run_fn(run_dir, config) -> metrics`; these tests pass `tiny_run` below
(a few file writes standing in for a training loop with checkpoints) so they need no pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from eva_rl.jobs import Job, default_workers, process_alive, process_start, run_jobs
from eva_rl.rundir import is_finished
from eva_rl.storage import write_text_atomic

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
        # atomic, as the package's checkpoints are: a kill -9 landing inside a plain write_text can
        # leave an empty file, which the resumed run would fail to read (a failure of the test's toy loop)
        write_text_atomic(checkpoint, json.dumps({"step": step + 1}))
    return {"kind": "finetune", "task": "t", "method": "lora", "rank": 8, "seed": 0, "final": {"success_rate": 1.0},
            "steps_done": config["steps"], "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def jobs_in(root: Path, configs: dict[str, dict]) -> list[Job]:
    return [Job(name, root / name, config, {"name": name}) for name, config in configs.items()]


def test_failed_run_is_recorded_and_others_finish_then_rerun_skips(tmp_path: Path, capsys) -> None:
    jobs = jobs_in(tmp_path, {"a": {"steps": 3}, "b": {"steps": 2, "fail": True}, "c": {"steps": 1}})
    results = run_jobs(jobs, tiny_run, workers=2, label="grid")
    assert [(r.name, r.status) for r in results] == [("a", "done"), ("b", "failed"), ("c", "done")]
    assert is_finished(tmp_path / "a") and not is_finished(tmp_path / "b")
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


def test_a_run_recorded_before_a_key_existed_is_the_same_config(tmp_path: Path) -> None:
    defaults = {"steps": 10, "sleep": 0.0}  # `sleep`: a key a newer release added, default 0.0
    old = run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}, "b": {"steps": 1}}), tiny_run, workers=1, progress=False)
    assert [r.status for r in old] == ["done", "done"]
    now = [Job(name, tmp_path / name, {"steps": 1, "sleep": 0.0}, {"name": name}, defaults=defaults) for name in "ab"]
    (tmp_path / "b" / "metrics.json").unlink()  # b was killed before it finished: resumed, not refused
    assert [r.status for r in run_jobs(now, tiny_run, workers=1, progress=False)] == ["skipped", "done"]
    # absent from run.json and set to another value than the default: another config
    changed = [Job("a", tmp_path / "a", {"steps": 1, "sleep": 0.5}, {"name": "a"}, defaults=defaults)]
    with open(tmp_path / "a" / "run.json") as handle:
        recorded = json.load(handle)
    (tmp_path / "a" / "run.json").write_text(json.dumps({**recorded, "config": {"steps": 1}}))
    with pytest.raises(FileExistsError, match=r"different config: .*a \(the first: sleep: run.json unset, now 0.5\)"):
        run_jobs(changed, tiny_run, workers=1, progress=False)


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
        # with its start time recorded, the pid must still name the process that claimed the run
        recorded = {"status": "running", "pid": other.pid, "pid_started": process_start(other.pid),
                    "host": socket.gethostname(), "config": {"steps": 1}}
        (tmp_path / "a" / "run.json").write_text(json.dumps(recorded))
        [result] = run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}}), tiny_run, workers=1, progress=False)
        assert result.status == "busy"
        # the same pid with another start time is a reused pid: the run's owner is gone, resume it
        (tmp_path / "a" / "run.json").write_text(json.dumps({**recorded, "pid_started": "1"}))
        [result] = run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}}), tiny_run, workers=1, progress=False)
        assert result.status == "done"
        (tmp_path / "a" / "metrics.json").unlink()  # unfinished again, claimed by a process about to be killed
        (tmp_path / "a" / "run.json").write_text(json.dumps(recorded))
    finally:
        other.kill()
        other.wait()
    [result] = run_jobs(jobs_in(tmp_path, {"a": {"steps": 1}}), tiny_run, workers=1, progress=False)
    assert result.status == "done"




@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_killing_the_parent_ends_its_runs_and_a_rerun_completes_every_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    configs = {"a": {"steps": 40, "sleep": 0.1}, "b": {"steps": 40, "sleep": 0.1}, "c": {"steps": 2}}
    script = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); from pathlib import Path\n"
              f"from test_jobs import jobs_in, tiny_run\nfrom eva_rl.jobs import run_jobs\n"
              f"run_jobs(jobs_in(Path({str(tmp_path)!r}), {configs!r}), tiny_run, workers=2, progress=False)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120  # spawning is slow on a busy machine
        while time.time() < deadline and not all(_step(tmp_path / name) >= 2 for name in ("a", "b")):
            assert parent.poll() is None, "the experiment ended before it was killed"
            time.sleep(0.05)
        children = [json.loads((tmp_path / name / "run.json").read_text())["pid"] for name in ("a", "b")]
        assert all(process_alive(pid) for pid in children)
        parent.kill()
        parent.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(process_alive(pid) for pid in children):
            time.sleep(0.05)
        assert not any(process_alive(pid) for pid in children), "a run outlived the killed command"
    finally:
        parent.kill()
        parent.wait()
    killed_at = {name: _step(tmp_path / name) for name in ("a", "b")}
    assert all(step < 40 for step in killed_at.values())
    results = run_jobs(jobs_in(tmp_path, configs), tiny_run, workers=2, progress=False)
    assert [(r.name, r.status) for r in results] == [("a", "done"), ("b", "done"), ("c", "done")]
    for name, step in killed_at.items():  # resumed from the checkpoint, not started over
        starts = [int(x) for x in (tmp_path / name / "calls.txt").read_text().split()]
        assert starts[0] == 0 and starts[-1] >= step - 1 and len(starts) == 2


def _step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_child_that_calls_die_with_parent_ends_with_its_parent(tmp_path: Path) -> None:
    import subprocess

    # parent -> child; the child arms die_with_parent, prints its pid, sleeps; kill -9 the parent
    child = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
             "from eva_rl.jobs import die_with_parent; die_with_parent()\nprint(flush=True); time.sleep(60)\n")
    parent_code = ("import subprocess, sys, time\n"
                   f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE)\n"
                   "p.stdout.readline(); print(p.pid, flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    try:
        pid = int(parent.stdout.readline())
        assert process_alive(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and process_alive(pid):
        time.sleep(0.02)
    assert not process_alive(pid)


def test_threads_spin_only_for_a_run_that_has_the_machine_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def policy(name: str) -> str:
        return json.loads((tmp_path / name / "metrics.json").read_text())["omp_wait_policy"]

    # a lone two-thread run (a pretraining stage) spins; runs beside each other wait passively
    run_jobs([Job("alone", tmp_path / "alone", {"steps": 1}, {}, cpus=2)], tiny_run, workers=1, progress=False)
    run_jobs(jobs_in(tmp_path, {"x": {"steps": 1}, "y": {"steps": 1}}), tiny_run, workers=2, progress=False)
    assert policy("alone") == ("ACTIVE" if default_workers(1) >= 2 else "PASSIVE")  # 2 threads must fit the cores
    assert policy("x") == policy("y") == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's choice wins
    run_jobs([Job("mine", tmp_path / "mine", {"steps": 1}, {}, cpus=2)], tiny_run, workers=1, progress=False)
    assert policy("mine") == "PASSIVE"
