"""Running jobs: each `run_fn(run_dir, config)` in a process of its own or a Ray task, orphan-free.

A job is one directory and the plain config its run function receives; the science that makes
jobs (grid points, stage configs) lives in `experiment.py`. Each run directory holds:

    run.json      the job's name, grid point and config, its status, the pid that owns it, times
    log.txt       the run's stdout and stderr
    metrics.json  written last by the run function (or by the runner, from what it returns): the
                  run is finished (`eva_rl.rundir.is_finished`)
    error.txt     the traceback of a failed attempt

Running the same jobs again skips the finished ones and resumes the others (their run function
picks up their checkpoints). A run directory holding another config is never overwritten silently
(the comparison is `eva_rl.rundir.config_differences`: keys a newer release added, at their
defaults, do not make an older run another config). A local child process dies with the process
that started it (Linux parent-death signal, or a thread watching the parent elsewhere), so a
killed command leaves no run behind; a run whose recorded owner is gone is resumed by the next
command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from eva_rl.rundir import METRICS_FILE, config_differences, is_finished
from eva_rl.storage import write_text_atomic

RunFn = Callable[[Path, dict], "dict | None"]
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """One run: a directory, the config its run function receives, and its resource needs."""

    name: str                  # run directory relative to the experiment's out_dir
    run_dir: Path
    config: dict[str, Any]     # handed to run_fn; JSON-serialisable
    point: dict[str, Any] = field(default_factory=dict)   # grid labels (task, method, rank, seed, swept keys)
    cpus: int = 1
    gpus: float = 0.0
    # the config's default values, same shape: a key run.json lacks (recorded before a release
    # added it) matches when the job has it at its default
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    name: str
    status: str                # "done" | "skipped" (finished before) | "failed" | "busy" (another process runs it)
    seconds: float
    error: str | None = None


# --- running one job (inside a worker) ----------------------------------------------------------

RUN_JSON = "run.json"


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_run_json(run_dir: Path, **fields: Any) -> None:
    data = _read_run_json(run_dir)
    data.update(fields)
    write_text_atomic(run_dir / RUN_JSON, json.dumps(data, indent=2, default=str))


def set_threads(threads: int, *, alone: bool = False) -> None:
    """Limit BLAS/OpenMP and torch to `threads` in this process (before torch does its work).

    alone: no other run of ours shares the machine, so OpenMP threads may spin at barriers."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # Spinning OpenMP threads on a busy machine wait a whole time slice at every barrier: 2 spinning
    # threads ran a small DT 15x slower than 1 thread under load; passive waits fix most of it. On a
    # machine the run has to itself, passive waits cost instead (bench/threads.py, idle 2-core Zen 4:
    # hidden 64 x2 layers 0.57x of one thread passive, 1.23x spinning). An OMP_WAIT_POLICY set by the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if alone and threads > 1 else "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def execute_job(run_fn: RunFn, job: Job, threads: int | None = None, owner: int | None = None) -> JobResult:
    """Run one job in this process: log to log.txt, record status, write `done` or error.txt.

    owner: the pid of the command this run belongs to (default: this process); run.json records
    it so that a later command can tell a live run from one whose command was killed.
    Never raises for the run's own errors: a failure is returned (and written) so a grid goes on.
    """
    start = time.time()
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        set_threads(threads)
    attempts = int(_read_run_json(run_dir).get("attempts", 0)) + 1
    owner = owner or os.getpid()
    # a pid alone may be reused by an unrelated process later: its start time tells them apart
    _write_run_json(run_dir, name=job.name, point=job.point, config=job.config, status="running",
                    pid=os.getpid(), pid_started=process_start(os.getpid()), owner=owner,
                    owner_started=process_start(owner), host=socket.gethostname(), started=start,
                    attempts=attempts)
    (run_dir / "error.txt").unlink(missing_ok=True)
    error = None
    with _redirect_output(run_dir / "log.txt"):
        # the training loop reports through `logging`; without a handler its lines would vanish
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            metrics = run_fn(run_dir, job.config)
            metrics_path = run_dir / METRICS_FILE
            if metrics is not None and not metrics_path.is_file():
                write_text_atomic(metrics_path, json.dumps(metrics, indent=2))
            if not metrics_path.is_file():
                raise RuntimeError(f"The run function finished without writing {metrics_path}.")
        except BaseException:  # noqa: BLE001 - a run's failure of any kind is recorded, not raised
            error = traceback.format_exc()
            traceback.print_exc()
    seconds = time.time() - start
    if error is not None:
        write_text_atomic(run_dir / "error.txt", error)
        _write_run_json(run_dir, status="failed", finished=time.time(), seconds=seconds,
                        error=error.strip().splitlines()[-1])
        return JobResult(job.name, "failed", seconds, error)
    _write_run_json(run_dir, status="done", finished=time.time(), seconds=seconds)
    return JobResult(job.name, "done", seconds)


class _redirect_output:
    """Send this process's stdout/stderr (file descriptors too: C code, tqdm) to a log file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        sys.stdout.flush(), sys.stderr.flush()
        self.log = open(self.path, "a", buffering=1)
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        os.close(self.saved[0]), os.close(self.saved[1])
        self.log.close()


def _child_main(run_fn: RunFn, job: Job, threads: int, parent: int, alone: bool = False) -> None:
    die_with_parent(parent)
    set_threads(threads, alone=alone)  # before the run function imports torch
    result = execute_job(run_fn, job, threads, owner=parent)
    sys.exit(0 if result.status == "done" else 1)


# --- no orphans -----------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int | None = None) -> None:
    """End this process when its parent process ends (call it first thing in a child process).

    A killed command (kill -9, out of memory) cannot stop its children itself; without this they
    would go on writing results nobody collects, while a re-run starts the same runs beside them.
    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG; strictly, when
    the parent's thread that started this process ends, so start children from a thread that
    outlives them). Elsewhere a daemon thread polls the parent's pid once a second.
    parent: the pid this process was started by (default: the current parent). Passing the pid
    the parent had when it started us closes the race of a parent that died before this call.
    Usable as a `multiprocessing.Pool(initializer=die_with_parent)`.
    """
    parent = os.getppid() if parent is None else parent
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="eva-rl-parent-watch").start()
    if os.getppid() != parent:  # the parent died before the signal was set up: nothing will send it
        os._exit(1)


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc prctl (unusual builds): the watching thread does it
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def process_start(pid: int) -> str | None:
    """When process `pid` started (Linux clock ticks since boot, from /proc), None when unknown.

    Together with the pid this names one process: a pid reused by a later process has another
    start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields after its last ")"
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)


def process_alive(pid: int, started: str | None = None) -> bool:
    """True when `pid` runs (not a zombie) and, if `started` is given, is the process that started then."""
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        now = process_start(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (PermissionError)
        pass
    return True


# --- planning and executors ---------------------------------------------------------------------

def plan_jobs(jobs: Sequence[Job], *, overwrite: bool = False) -> tuple[list[Job], list[JobResult]]:
    """Split jobs into those to run and those already finished; protect runs of another config.

    A run directory whose run.json holds a different config than the job (`config_differences`,
    with the job's defaults) is an error (results are never overwritten silently), unless
    overwrite=True: the old directory then moves to `<parent of runs>/_replaced/<name>-<time>`.
    """
    todo, skipped, conflicts = [], [], []
    for job in jobs:
        recorded = _read_run_json(job.run_dir)
        differences = (config_differences(recorded["config"], _jsonable(job.config), job.defaults, saved_as="run.json")
                       if recorded and recorded.get("config") is not None else [])
        if differences:
            if not overwrite:
                conflicts.append((job, differences))
                continue
            replaced = job.run_dir.parent / "_replaced" / f"{job.run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            replaced.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(job.run_dir), replaced)
        elif is_finished(job.run_dir):
            skipped.append(JobResult(job.name, "skipped", 0.0))
            continue
        elif _running_elsewhere(recorded):
            # another experiment process is running this very run: two writers would corrupt it
            skipped.append(JobResult(job.name, "busy", 0.0, f"running in process {recorded['pid']}"))
            continue
        todo.append(job)
    if conflicts:
        names = ", ".join(str(j.run_dir) for j, _ in conflicts[:5]) + (" ..." if len(conflicts) > 5 else "")
        first = "; ".join(conflicts[0][1][:3]) + ("; ..." if len(conflicts[0][1]) > 3 else "")
        raise FileExistsError(
            f"{len(conflicts)} run directories hold results of a different config: {names} (the first: {first}). "
            f"Use another out_dir, or pass --overwrite to move them to _replaced/ and run again.")
    return todo, skipped


def _running_elsewhere(recorded: dict[str, Any], wait_seconds: float = 5.0) -> bool:
    """True when run.json says running and the process that claimed the run still runs it.

    A run whose command was killed is not running: its process died with its parent, or its pid
    now names another process (another start time). A run process still alive whose owner is
    gone is dying (die_with_parent): wait a few seconds for it rather than start a second writer.
    """
    if recorded.get("status") != "running" or recorded.get("host") != socket.gethostname():
        return False
    try:
        pid = int(recorded["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False
    started = recorded.get("pid_started")
    if started is None:  # no start time recorded (no /proc): a live python process with that pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path("/proc").is_dir() else b"python"
        except OSError:
            return False
        return process_alive(pid) and b"python" in cmdline
    owner, owner_started = recorded.get("owner"), recorded.get("owner_started")
    deadline = time.monotonic() + wait_seconds
    while process_alive(pid, started):
        if owner is None or process_alive(int(owner), owner_started) or time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def default_workers(cpus_per_run: int = 1) -> int:
    """Runs at once on this machine: its cores (as this process may use them) // cpus_per_run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, cpus_per_run))


class Progress:
    """A tqdm status line of a batch of jobs: finished of total, then done / running / failed.

    tqdm draws the line and its ETA (from the rate at which runs finish, so parallel runs count);
    the per-status counts, which tqdm has no notion of, go in its postfix.
    """

    def __init__(self, label: str, total: int, skipped: int = 0, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.done, self.failed, self.running, self.skipped = skipped, 0, 0, skipped
        self.bar = tqdm(total=total, initial=skipped, desc=label, file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, postfix=self._counts(),
                        bar_format="[{desc}] {n_fmt}/{total_fmt} finished{postfix}, elapsed {elapsed}, ETA {remaining}")

    def update(self, running: int, finished: Iterable[JobResult] = ()) -> None:
        finished = list(finished)
        for result in finished:
            if result.status == "failed":
                self.failed += 1
            else:
                self.done += 1
        if finished or running != self.running:
            self.running = running
            self.bar.set_postfix_str(self._counts(), refresh=not finished)
            self.bar.update(len(finished))  # draws the line (at most every tqdm.mininterval; close draws the last)

    def _counts(self) -> str:
        skipped = f" ({self.skipped} already)" if self.skipped else ""
        return f"{self.done} done{skipped}, {self.running} running, {self.failed} failed"

    def close(self) -> None:
        self.bar.close()


def run_jobs(jobs: Sequence[Job], run_fn: RunFn, *, backend: str = "local", workers: int | None = None,
             address: str | None = None, overwrite: bool = False, progress: bool = True,
             label: str = "runs", poll_seconds: float = 0.2) -> list[JobResult]:
    """Run every unfinished job with `run_fn(run_dir, config)`; returns one result per job.

    local: one spawned process per run (a fresh interpreter: no torch/MuJoCo state is forked),
    at most `workers` at once (default: cores // the jobs' cpus), each limited to the job's cpus
    in threads. A process pool (concurrent.futures) is not used because one killed worker breaks
    every pending run of such a pool; here it fails only its own run.
    ray: one Ray task per run with num_cpus/num_gpus from the job, on the running Ray instance,
    the cluster at `address`, or a new local one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    todo, results = plan_jobs(jobs, overwrite=overwrite)
    cpus = max((j.cpus for j in todo), default=1)
    workers = workers or default_workers(cpus)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    busy = [r for r in results if r.status == "busy"]
    for r in busy:
        print(f"[{label}] {r.name} is {r.error}; left alone", file=sys.stderr)
    bar = Progress(label, len(jobs) - len(busy), skipped=len(results) - len(busy), enabled=progress)
    try:
        if todo:
            if backend == "local":
                results += _run_local(todo, run_fn, workers, bar, poll_seconds)
            else:
                results += _run_ray(todo, run_fn, address, bar, poll_seconds)
    finally:
        bar.close()
    order = {j.name: i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order.get(r.name, len(order)))


def _run_local(jobs: Sequence[Job], run_fn: RunFn, workers: int, bar: Progress, poll: float) -> list[JobResult]:
    import multiprocessing as mp

    context = mp.get_context("spawn")
    pending = list(jobs)
    running: dict[str, tuple[Any, Job]] = {}
    results: list[JobResult] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a batch system's stop) must reach our runs too: turn it into an exception so
        # `finally` stops the children instead of leaving them orphaned.
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # one run at a time, within the machine's cores: its threads may spin (set_threads)
    alone, cores = min(workers, len(jobs)) == 1, default_workers(1)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                process = context.Process(target=_child_main,
                                          args=(run_fn, job, job.cpus, os.getpid(), alone and job.cpus <= cores),
                                          daemon=True, name=f"eva-rl:{job.name}")
                process.start()
                running[job.name] = (process, job)
            finished = []
            for name, (process, job) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[name]
                finished.append(_local_result(job, process.exitcode))
            results += finished
            bar.update(len(running), finished)
            if running:
                time.sleep(poll)
    finally:
        for process, _ in running.values():  # interrupted (Ctrl-C, SIGTERM): stop our own children
            process.terminate()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


def _raise_terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _local_result(job: Job, exitcode: int | None) -> JobResult:
    recorded = _read_run_json(job.run_dir)
    seconds = float(recorded.get("seconds") or (time.time() - float(recorded.get("started", time.time()))))
    if exitcode == 0 and is_finished(job.run_dir):
        return JobResult(job.name, "done", seconds)
    if recorded.get("status") == "failed":
        error = (job.run_dir / "error.txt").read_text() if (job.run_dir / "error.txt").is_file() else "failed"
        return JobResult(job.name, "failed", seconds, error)
    # The worker died without recording why (killed, out of memory): record it for it.
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    error = (f"The worker process running {job.name} died ({how}) before the run finished. "
             f"Run the experiment again to resume it from its latest checkpoint.\n")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job.run_dir / "error.txt", error)
    _write_run_json(job.run_dir, status="failed", finished=time.time(), seconds=seconds, error=error.strip())
    return JobResult(job.name, "failed", seconds, error)


def _run_ray(jobs: Sequence[Job], run_fn: RunFn, address: str | None, bar: Progress, poll: float) -> list[JobResult]:
    try:
        import ray
    except ImportError:
        raise ValueError("The ray backend needs Ray: pip install 'eva-rl[ray]' (or 'ray[default]').") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False) if address else ray.init(include_dashboard=False)
    remote = ray.remote(max_retries=0)(execute_job)
    refs = {}
    for job in jobs:
        ref = remote.options(num_cpus=job.cpus, num_gpus=job.gpus).remote(run_fn, job, job.cpus)
        refs[ref] = job
    results: list[JobResult] = []
    # Ray queues what does not fit; count as running only what the cluster's CPUs can hold at once.
    capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // max(1, max(j.cpus for j in jobs))))
    bar.update(min(len(refs), capacity))
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(poll, 1.0))
        finished = []
        for ref in ready:
            job = refs.pop(ref)
            try:
                finished.append(ray.get(ref))
            except Exception as exc:  # the worker died (ray.exceptions.WorkerCrashedError and kin)
                error = f"The Ray task running {job.name} failed outside the run: {exc}\n"
                write_text_atomic(job.run_dir / "error.txt", error)
                _write_run_json(job.run_dir, status="failed", finished=time.time(), error=error.strip())
                finished.append(JobResult(job.name, "failed", 0.0, error))
        results += finished
        bar.update(min(len(refs), capacity), finished)
    return results


