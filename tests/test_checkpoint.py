"""Training checkpoints are written through eva_rl.storage: a writer killed after any rename leaves
a whole checkpoint (old or new) that loads, and nothing else behind once the run dir is reopened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_rl import storage
from eva_rl.checkpoint import load_newest_good, recover_checkpoints, save_checkpoint

_SCRIPT = """
import os, sys
from pathlib import Path
import torch
from eva_rl import storage
from eva_rl.checkpoint import save_checkpoint
checkpoints, step, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "journal":
    storage._exchange = lambda a, b: False
def die_at(at):
    if at == step:
        os._exit(9)
storage._after_rename = die_at
torch.manual_seed(2)
save_checkpoint(checkpoints, int(sys.argv[4]), torch.nn.Linear(2, 2), {"version": 2}, {"history": {}}, keep=5)
"""


def _save(checkpoints: Path, step: int, version: int) -> None:
    torch.manual_seed(version)
    save_checkpoint(checkpoints, step, torch.nn.Linear(2, 2), {"version": version}, {"history": {}}, keep=5)


@pytest.mark.slow
@pytest.mark.skipif(storage._renameat2 is None, reason="no renameat2 on this system")
@pytest.mark.parametrize("mode, rename, step, expected", [
    ("exchange", "rename", 2, (2, 2)),    # a new step: the rename makes it whole
    ("exchange", "exchange", 1, (1, 2)),  # a re-saved step: one atomic swap
    ("journal", "aside", 1, (1, 1)),      # no exchange: killed with the old copy moved aside; it comes back
    ("journal", "swap", 1, (1, 2)),       # ... or with the new one in place
])
def test_a_checkpoint_writer_killed_after_any_rename_leaves_a_whole_checkpoint(tmp_path, mode, rename, step,
                                                                               expected) -> None:
    checkpoints = tmp_path / "checkpoints"
    _save(checkpoints, 1, version=1)
    killed = subprocess.run([sys.executable, "-c", _SCRIPT, str(checkpoints), rename, mode, str(step)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr  # died right after that rename, not before
    recover_checkpoints(checkpoints)  # what resuming does first (rank 0)
    path, trainer_state, meta = load_newest_good(checkpoints, torch.nn.Linear(2, 2))
    assert (meta["step"], trainer_state["version"]) == expected
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []


def test_recover_checkpoints_removes_dead_writers_temp_dirs_and_keeps_a_live_ones(tmp_path) -> None:
    checkpoints = tmp_path / "checkpoints"
    _save(checkpoints, 1, version=1)
    writing = storage.temp_dir_for(checkpoints / "step_00000002")  # this process: still writing step 2
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    # the same naming as `writing` (storage's: .NAME.<pid>-<host>.XXXX), of a killed writer's step 7
    abandoned = checkpoints / writing.name.replace(f".{os.getpid()}-", f".{dead}-").replace("00000002", "00000007")
    abandoned.mkdir()  # a step the run may never save again: no later save of it would clean it
    recover_checkpoints(checkpoints)
    assert writing.is_dir() and not abandoned.exists()
