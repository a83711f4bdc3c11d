import numpy as np
import pytest

from eva_rl.envs import (TaskSpec, expert_policy, load_suites, make_env, make_vector_env, resolve_tasks,
                         task_spec)

CW10 = ["hammer-v3", "push-wall-v3", "faucet-close-v3", "push-back-v3", "stick-pull-v3",
        "handle-press-side-v3", "push-v3", "shelf-place-v3", "window-close-v3", "peg-unplug-side-v3"]


def test_suites_have_the_documented_tasks():
    suites = load_suites()
    assert list(resolve_tasks("cw10")) == CW10
    assert len(resolve_tasks("mt50")) == 50
    mt40 = resolve_tasks("mt40")
    assert len(mt40) == 40 and not set(mt40) & set(CW10)
    assert set(mt40) | set(CW10) == set(resolve_tasks("mt50"))
    assert len(resolve_tasks("mt10")) == 10
    assert resolve_tasks("mujoco") == ["Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"]
    assert suites["classic"].tasks[0].success == "return>=-200"
    assert task_spec("hammer-v3").horizon == 200 and task_spec("hammer-v3").expert == "metaworld"
    assert task_spec("hammer-v3").terminate_on_success is False


def test_a_task_declared_differently_in_two_suites_is_an_error(monkeypatch):
    from eva_rl import envs

    a = envs.Suite("a", "metaworld", (TaskSpec("push-v3", "metaworld", horizon=200),))
    b = envs.Suite("b", "metaworld", (TaskSpec("push-v3", "metaworld", horizon=500),))
    monkeypatch.setattr(envs, "load_suites", lambda: {"a": a, "b": b})
    envs._all_tasks.cache_clear()
    try:
        with pytest.raises(ValueError, match="'push-v3' is declared differently in suites 'a' .* and 'b'"):
            task_spec("push-v3")
    finally:
        envs._all_tasks.cache_clear()


def test_resolve_keeps_order_and_drops_repeats():
    assert resolve_tasks(["reach-v3", "cw10", "hammer-v3"])[:3] == ["reach-v3", "hammer-v3", "push-wall-v3"]
    assert len(resolve_tasks(["cw10", "hammer-v3"])) == 10


def test_unknown_task_lists_close_matches():
    with pytest.raises(ValueError, match="hammer-v3.*Suites: .*cw10"):
        resolve_tasks("hamer-v3")
    with pytest.raises(ValueError, match="No tasks"):
        resolve_tasks([])


def test_task_spec_validation():
    with pytest.raises(ValueError, match="at most 500"):
        TaskSpec(name="reach-v3", family="metaworld", horizon=600)
    with pytest.raises(ValueError, match="success rule"):
        TaskSpec(name="x", family="classic", horizon=10, success="return>x")
    with pytest.raises(ValueError, match="at most 500"):
        make_env("reach-v3", 0, horizon=501)


@pytest.mark.parametrize("task", ["reach-v3", "Pendulum-v1", "Hopper-v5"])
def test_seeding_is_deterministic(task):
    a, b, c = make_env(task, 3), make_env(task, 3), make_env(task, 4)
    firsts_a = [a.reset()[0] for _ in range(3)]
    firsts_b = [b.reset()[0] for _ in range(3)]
    first_c = c.reset()[0]
    for x, y in zip(firsts_a, firsts_b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(firsts_a[0], first_c)
    assert not np.allclose(firsts_a[0], firsts_a[1])  # successive resets move on
    assert firsts_a[0].dtype == np.float32 and a.observation_space.dtype == np.float32


def test_metaworld_goal_depends_on_seed_and_steps_are_identical():
    a, b = make_env("push-v3", 0), make_env("push-v3", 0)
    oa, ob = a.reset()[0], b.reset()[0]
    action = np.array([0.3, -0.2, 0.1, 0.5], dtype=np.float32)
    for _ in range(5):
        oa, ra, *_ = a.step(action)
        ob, rb, *_ = b.step(action)
    np.testing.assert_array_equal(oa, ob)
    assert ra == rb
    goals = {tuple(np.round(make_env("push-v3", s).reset()[0][-3:], 5)) for s in range(4)}
    assert len(goals) == 4


def test_horizon_and_success_key():
    env = make_env("reach-v3", 0, horizon=120)
    _, info = env.reset()
    assert info["success"] is False
    act = expert_policy("reach-v3")
    obs, steps, ever = env.reset()[0], 0, False
    while True:
        obs, _, terminated, truncated, info = env.step(act(obs))
        steps += 1
        assert isinstance(info["success"], bool)
        ever |= info["success"]
        if terminated or truncated:
            break
    assert steps == 120 and truncated and not terminated  # success does not end the episode
    assert ever  # the reach expert succeeds within ~75 steps on seed 0


def test_terminate_on_success_is_explicit():
    act = expert_policy("reach-v3")
    env = make_env("reach-v3", 0, terminate_on_success=True)
    obs, steps = env.reset()[0], 0
    while True:
        obs, _, terminated, truncated, info = env.step(act(obs))
        steps += 1
        if terminated or truncated:
            break
    assert terminated and info["success"] and steps < 200


def test_terminate_on_success_needs_a_rule_read_during_the_episode():
    # it used to be ignored silently outside Meta-World; "survive"/"return>=X" are known only at the end
    with pytest.raises(ValueError, match="terminate_on_success needs the 'info' success rule.*'return>=-200'"):
        make_env("Pendulum-v1", 0, terminate_on_success=True)
    with pytest.raises(ValueError, match="terminate_on_success needs the 'info' success rule.*'survive'"):
        TaskSpec(name="Hopper-v5", family="mujoco", horizon=10, success="survive", terminate_on_success=True)


def test_return_threshold_success_is_read_at_the_end():
    env = make_env("Pendulum-v1", 0, horizon=5)
    env.reset()
    flags = [env.step(np.zeros(1, dtype=np.float32))[4]["success"] for _ in range(5)]
    assert flags[:4] == [False] * 4  # only the last step can report it
    # 5 steps cost at most 5 * 16.3 < 200, so the return is above -200: a success at the last step.
    assert flags[4] is True


def test_survive_success_on_truncation():
    env = make_env("Hopper-v5", 0, horizon=3)
    env.reset()
    for _ in range(3):
        _, _, terminated, truncated, info = env.step(np.zeros(3, dtype=np.float32))
    assert truncated and not terminated and info["success"] is True


def test_vector_env_seeds_each_env():
    vec = make_vector_env(["reach-v3"], 2, seed=5)
    obs, _ = vec.reset()
    assert obs.shape == (2, 39) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[1], make_env("reach-v3", 6).reset()[0])
    vec.close()
    with pytest.raises(ValueError, match="num_envs"):
        make_vector_env(["reach-v3"], 0, seed=0)
    # sizes differ within a family too: one clear error, not gymnasium's RuntimeError
    with pytest.raises(ValueError, match=r"different observation/action sizes.*Hopper-v5 \(11,\)/\(3,\).*"
                                         r"HalfCheetah-v5 \(17,\)/\(6,\)"):
        make_vector_env(["Hopper-v5", "HalfCheetah-v5"], 2, seed=0)
    with pytest.raises(ValueError, match="different observation/action sizes"):
        make_vector_env(["reach-v3", "Pendulum-v1"], 2, seed=0)
    vec = make_vector_env(["Hopper-v5", "HalfCheetah-v5"], 1, seed=0)  # only Hopper is used
    assert vec.single_observation_space.shape == (11,)
    vec.close()


def test_vector_env_autoreset_mode_and_a_recorded_first_env():
    import gymnasium as gym

    vec = make_vector_env(["Pendulum-v1"], 3, seed=2, asynchronous=True, first_env_kwargs={"render_mode": "rgb_array"},
                          autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    try:
        assert isinstance(vec, gym.vector.SyncVectorEnv)  # env 0 must be reachable to record it
        assert [env.render_mode for env in vec.envs] == ["rgb_array", None, None]
        assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.DISABLED
        obs, _ = vec.reset()
        np.testing.assert_array_equal(obs[0], make_env("Pendulum-v1", 2).reset()[0])
    finally:
        vec.close()


def test_subprocess_vector_env_steps_like_the_in_process_one():
    import gymnasium as gym

    from eva_rl.envs import SubprocessVectorEnv

    kwargs = dict(horizon=5, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    local = make_vector_env(["Pendulum-v1"], 2, seed=4, **kwargs)
    remote = SubprocessVectorEnv(["Pendulum-v1"], 2, 4, **kwargs)
    try:
        assert remote.num_envs == 2 and remote.single_action_space == local.single_action_space
        np.testing.assert_array_equal(remote.reset()[0], local.reset()[0])
        actions = np.full((2, 1), 0.5, np.float32)
        for _ in range(5):
            remote.step_async(actions)
            for mine, theirs in zip(local.step(actions)[:4], remote.step_wait()[:4]):
                np.testing.assert_array_equal(mine, theirs)
        mask = np.array([True, False])
        np.testing.assert_array_equal(remote.reset(options={"reset_mask": mask})[0],
                                      local.reset(options={"reset_mask": mask})[0])
        assert remote.cpu_seconds() > 0
    finally:
        local.close()
        remote.close()
    with pytest.raises(RuntimeError, match="Unknown task or suite 'nope-v3'"):
        SubprocessVectorEnv(["nope-v3"], 1, 0)


def test_expert_only_where_one_exists():
    with pytest.raises(ValueError, match="sb3:PATH"):
        expert_policy("Hopper-v5")


def test_metaworld_env_matches_metaworlds_own_seeded_benchmark():
    import metaworld

    reference = metaworld.make_mt_envs("push-v3", seed=2, max_episode_steps=200)
    ours, again = make_env("push-v3", 2), make_env("push-v3", 2)  # the second reuses the cached goals
    for _ in range(3):
        expected = reference.reset()[0]
        np.testing.assert_allclose(ours.reset()[0], expected, rtol=1e-6)
        np.testing.assert_allclose(again.reset()[0], expected, rtol=1e-6)


def test_expert_actions_are_what_the_env_executes():
    env, act = make_env("reach-v3", 0), expert_policy("reach-v3")
    obs = env.reset()[0]
    actions = []
    for _ in range(20):
        actions.append(act(obs))
        obs = env.step(actions[-1])[0]
    actions = np.stack(actions)
    assert actions.dtype == np.float32 and np.abs(actions).max() <= 1.0
    assert np.isclose(np.abs(actions).max(), 1.0)  # the reach expert saturates early on
