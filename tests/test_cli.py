"""The command line: user errors are one line (no traceback), checked before the work starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import eva_rl.cli as cli
from eva_rl.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def test_report_out_naming_an_existing_file_is_one_clear_error(capsys, tmp_path: Path, a_file: Path) -> None:
    code, err = run_cli(capsys, "report", tmp_path, "--out", a_file)
    assert code == 2
    assert "--out (the report's directory)" in one_line_error(err) and "is an existing file, not a directory" in err


def test_outputs_under_a_regular_file_fail_before_any_work(capsys, a_file: Path, monkeypatch) -> None:
    import eva_rl.evaluate
    import eva_rl.train

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before its output was checked")

    monkeypatch.setattr(eva_rl.train, "pretrain", no_work)
    monkeypatch.setattr(eva_rl.evaluate, "evaluate_reference", no_work)
    code, err = run_cli(capsys, "pretrain", f"out_dir={a_file / 'run'}", "data.paths=[nowhere]")
    assert code == 2 and "out_dir" in one_line_error(err) and f"{str(a_file)!r} is a file, not a directory" in err
    code, err = run_cli(capsys, "evaluate", "--reference", "random", "--tasks", "CartPole-v1",
                        "--json", a_file / "out.json")
    assert code == 2 and "--json" in one_line_error(err) and "is a file, not a directory" in err
    code, err = run_cli(capsys, "collect", "--task", "reach-v3", "--out", a_file)
    assert code == 2 and "the datasets' root" in one_line_error(err) and "existing file" in err
    code, err = run_cli(capsys, "experiment", "quickstart.yaml", f"out_dir={a_file / 'x'}")
    assert code == 2 and "out_dir" in one_line_error(err) and "is a file" in err


def test_an_output_in_a_read_only_place_is_one_clear_error(capsys, tmp_path: Path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes read-only directories: stand in for a read-only mount
        access = os.access
        monkeypatch.setattr(cli.os, "access", lambda path, mode: access(path, mode) and Path(path) != locked)
    try:
        code, err = run_cli(capsys, "report", tmp_path, "--out", locked / "report")
    finally:
        locked.chmod(0o755)
    assert code == 2 and "read-only or not yours" in one_line_error(err) and str(locked) in err


def test_check_output_accepts_new_and_existing_places_and_refuses_the_wrong_kind(tmp_path: Path, a_file: Path) -> None:
    assert cli.check_output(tmp_path / "new" / "deeper", "out", directory=True) == tmp_path / "new" / "deeper"
    assert cli.check_output(tmp_path, "out", directory=True) == tmp_path
    assert cli.check_output(a_file, "--json", directory=False) == a_file  # an existing file is replaced
    with pytest.raises(ValueError, match="is an existing directory, not a file"):
        cli.check_output(tmp_path, "--json", directory=False)
    assert not (tmp_path / "new").exists()  # checking makes nothing


def test_target_return_naming_a_task_not_evaluated_is_an_error(capsys, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "evaluate", tmp_path / "no-model", "--tasks", "reach-v3",
                        "--target-return", "reach-v2=4500")
    assert code == 2
    assert "names reach-v2, which is not evaluated (tasks: reach-v3)" in one_line_error(err)


def test_user_errors_are_one_line_and_debug_or_bugs_show_the_traceback(capsys, monkeypatch) -> None:
    code, err = run_cli(capsys, "pretrain", "optim.lrr=1")
    assert code == 2 and "Unknown config key 'optim.lrr'" in one_line_error(err)
    with pytest.raises(ValueError, match="optim.lrr"):
        main(["pretrain", "optim.lrr=1", "--debug"])

    def bug(args):
        raise RuntimeError("an internal error")

    monkeypatch.setitem(cli.COMMANDS, "report", cli.COMMANDS["report"]._replace(run=bug))
    with pytest.raises(RuntimeError, match="an internal error"):
        main(["report", "runs"])


def test_experiment_exits_non_zero_when_a_grid_point_has_no_result(capsys, tmp_path: Path, monkeypatch) -> None:
    import eva_rl.experiment as experiment

    def run_experiment(config, **kwargs):
        runs = (experiment.JobResult("push-v3/lora-r8-s0", "done", 1.0),
                experiment.JobResult("push-v3/eva-r8-s0", "busy", 0.0, "running in process 4242"))
        return experiment.ExperimentResult(tmp_path, tmp_path / "model", None, runs)

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)
    code, err = run_cli(capsys, "experiment", "quickstart.yaml", f"out_dir={tmp_path}", "--no-report")
    assert code == 1
    assert "MISSING push-v3/eva-r8-s0: running in process 4242" in err


def test_collect_loads_its_config_from_yaml_overrides_and_flags(capsys, tmp_path: Path, monkeypatch) -> None:
    import eva_rl.data.collect as collect

    seen = []
    monkeypatch.setattr(collect, "collect_tasks", lambda tasks, config: seen.append((tasks, config)) or [])
    yaml_file = tmp_path / "collect.yaml"
    yaml_file.write_text("episodes: 7\nnoise: 0.3\npolicy: random\n")
    out = tmp_path / "datasets"
    assert main(["collect", str(yaml_file), "seed=3", "--task", "reach-v3", "--noise", "0", "--out", str(out)]) == 0
    [(tasks, config)] = seen
    assert tasks == ["reach-v3"]
    # the YAML's keys, then the overrides, then the flags; a flag not given leaves its key alone
    assert (config.episodes, config.noise, config.policy, config.seed, config.out) == (7, 0.0, "random", 3, str(out))
    assert config.workers == collect.CollectConfig().workers and config.overwrite is False
    code, err = run_cli(capsys, "collect", "--task", "reach-v3", "episodes=0")
    assert code == 2 and "episodes must be >= 1" in one_line_error(err)


def test_evaluate_loads_its_config_from_yaml_overrides_and_flags(capsys, tmp_path: Path, monkeypatch) -> None:
    import eva_rl.evaluate as evaluate

    class Result:
        def describe(self) -> str:
            return "described"

    seen = []
    monkeypatch.setattr(evaluate, "evaluate_reference",
                        lambda kind, tasks, episodes, seed, **kw: seen.append((kind, tasks, episodes, seed, kw)) or Result())
    yaml_file = tmp_path / "evaluate.yaml"
    yaml_file.write_text("episodes: 3\nnum_envs: 2\nreference: expert\n")
    assert main(["evaluate", "--config", str(yaml_file), "seed=9", "--tasks", "reach-v3", "--reference", "random",
                 "--video-every", "2"]) == 0
    [(kind, tasks, episodes, seed, kw)] = seen
    assert (kind, tasks, episodes, seed) == ("random", ["reach-v3"], 3, 9)
    assert kw["num_envs"] == 2 and kw["video_every"] == 2 and kw["asynchronous"] is False
    config = evaluate.EvaluateConfig(model_dir="m", target_return=10.0, target_returns={"a": 1.0})
    assert config.targets(["a", "b"]) == {"a": 1.0, "b": 10.0}
    code, err = run_cli(capsys, "evaluate", "model", "--reference", "random")
    assert code == 2 and "not both" in one_line_error(err)


def test_evaluate_takes_its_target_returns_from_a_dataset(capsys, tmp_path: Path, monkeypatch) -> None:
    import eva_rl.evaluate as evaluate
    from tests.data.test_trajectories import make_episode, write_minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))  # write_minari writes there
    directory = write_minari(tmp_path / "minari", "eva-rl/toy-v0", [make_episode(3), make_episode(4, value=2.0)])
    # returns: 1+2+3 = 6 and 3+4+5+6 = 18; the best one is the target
    assert evaluate.dataset_target_returns([str(directory)]) == {"toy-task": 18.0}
    config = evaluate.EvaluateConfig(model_dir="m", target_return_from=(str(directory),))
    assert config.targets(["toy-task", "other"], {"toy-task": 18.0}) == {"toy-task": 18.0}
    given = evaluate.EvaluateConfig(model_dir="m", target_return_from=(str(directory),), target_returns={"toy-task": 5.0})
    assert given.targets(["toy-task"], {"toy-task": 18.0}) == {"toy-task": 5.0}  # an explicit value wins
    with pytest.raises(ValueError, match="holds none of the evaluated tasks"):
        config.targets(["other"], {"toy-task": 18.0})
    loaded = []
    monkeypatch.setattr(evaluate, "load_policy", lambda *a, **kw: loaded.append(a) or pytest.fail("loaded the policy"))
    code, err = run_cli(capsys, "evaluate", tmp_path / "model", "--tasks", "reach-v3", "--target-return-from", directory)
    assert code == 2 and "holds none of the evaluated tasks" in one_line_error(err) and not loaded


def test_report_fraction_is_checked_and_passed_on(capsys, tmp_path: Path, monkeypatch) -> None:
    import eva_rl.report as report

    code, err = run_cli(capsys, "report", tmp_path, "--fraction", "1.5")
    assert code == 2 and "--fraction must be in (0, 1]" in one_line_error(err)
    seen = {}

    class Result:
        markdown, out_dir = "table", tmp_path / "report"

    monkeypatch.setattr(report, "write_report", lambda *a, **kw: seen.update(kw) or Result())
    assert main(["report", str(tmp_path), "--fraction", "0.5"]) == 0 and seen["fraction"] == 0.5
