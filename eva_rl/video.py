"""Recording episodes as MP4: MuJoCo offscreen frames (EGL with a GPU, OSMesa on CPUs) of the
first episode of env 0 of a task, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eva_rl.envs import task_spec
from eva_rl.storage import atomic_path


class Video:
    """The first episode of env 0: its reset frame and every `every`-th step's, written to
    `path` as MP4 when the episode ends."""

    def __init__(self, path: Path, env: Any, task: str, every: int) -> None:
        self.path, self.env, self.every = path, env, every
        self.flip = task_spec(task).family == "metaworld"
        self.frames: list[np.ndarray] | None = [_frame(env, self.flip)]

    def after_step(self, length: int, ended: bool) -> None:
        """Env 0 took its `length`-th step of the episode (`ended`: the episode's last)."""
        if self.frames is None:
            return
        if length % self.every == 0:
            self.frames.append(_frame(self.env, self.flip))
        if ended:
            _write_video(self.path, self.frames, self.env, self.every)
            self.frames = None


def select_gl_backend() -> None:
    """MuJoCo offscreen rendering: EGL where a GPU is present, OSMesa otherwise (unless MUJOCO_GL is set)."""
    if "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl" if torch.cuda.is_available() else "osmesa"


def _frame(env: Any, flip: bool) -> np.ndarray:
    frame = np.asarray(env.render())
    # Meta-World's offscreen camera images come out upside down
    return np.ascontiguousarray(frame[::-1]) if flip else frame


def render_size(task: str) -> dict[str, int]:
    # 240 x 240 keeps OSMesa at a few frames per second; Gymnasium's MuJoCo envs take the same kwargs
    return {"width": 240, "height": 240} if task_spec(task).family in ("metaworld", "mujoco") else {}


def _write_video(path: Path, frames: list[np.ndarray], env: Any, every: int) -> None:
    import imageio.v2 as imageio

    frames = [np.asarray(f) for f in frames if f is not None]
    if not frames:
        raise ValueError(f"The env of {path.stem!r} rendered no frames; it cannot be recorded.")
    # real-time playback: the env's frame rate over the frames skipped
    fps = max(1, round(float(env.metadata.get("render_fps") or 30) / every))
    try:
        with atomic_path(path) as tmp:
            imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
    except Exception as exc:
        if isinstance(exc, (ImportError, RuntimeError)) and "ffmpeg" in str(exc).lower():
            raise RuntimeError("Writing MP4 needs imageio-ffmpeg: pip install imageio-ffmpeg") from exc
        raise
