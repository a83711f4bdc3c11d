"""eva-rl: fine-tune pretrained Decision Transformer agents offline with EVA-initialised adapters.

The Python API (each name is imported on first use, so `import eva_rl` stays fast):

    policy = eva_rl.load_policy("runs/x/model")              # checkpoint, plain DT, run dir or adapter
    result = eva_rl.evaluate(policy, "reach-v3", episodes=10, seed=0)
    eva_rl.finetune(eva_rl.FinetuneConfig(...)); eva_rl.pretrain(eva_rl.TrainConfig(...))
    env = eva_rl.make_env("reach-v3", seed=0); data = eva_rl.load_trajectories([...])
    eva_rl.apply_method(policy, "lora", rank=8); eva_rl.eva_state_dict(model, batches, rank=8)
    eva_rl.run_experiment(...); eva_rl.write_report("runs/x")         # or {"a": "runs/x", "b": "runs/y"}, out_dir
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_policy": "eva_rl.loading",
    "DecisionTransformerPolicy": "eva_rl.policy",
    "PolicyConfig": "eva_rl.policy",
    "PolicyMetadata": "eva_rl.policy",
    "evaluate": "eva_rl.evaluate",
    "evaluate_reference": "eva_rl.evaluate",
    "EvalResult": "eva_rl.evaluate",
    "finetune": "eva_rl.finetune",
    "FinetuneConfig": "eva_rl.finetune",
    "pretrain": "eva_rl.train",
    "TrainConfig": "eva_rl.train",
    "DataConfig": "eva_rl.train",
    "OptimConfig": "eva_rl.train",
    "make_env": "eva_rl.envs",
    "make_vector_env": "eva_rl.envs",
    "load_trajectories": "eva_rl.data.trajectories",
    "CollectConfig": "eva_rl.data.collect",
    "collect_tasks": "eva_rl.data.collect",
    "apply_method": "eva_rl.adapters.methods",
    "save_adapter": "eva_rl.adapters.methods",
    "save_merged": "eva_rl.adapters.methods",
    "AdaLoraOptions": "eva_rl.adapters.methods",
    "eva_state_dict": "eva_rl.adapters.eva",
    "ExperimentConfig": "eva_rl.experiment",
    "run_experiment": "eva_rl.experiment",
    "write_report": "eva_rl.report",
}
# Names that are also submodules: Python binds `eva_rl.evaluate` to the submodule whenever it is
# imported, so these modules are made callable and call their function of the same name.
_CALLABLE_MODULES = ("evaluate", "finetune")

__all__ = sorted(_EXPORTS)


class _CallableModule(types.ModuleType):
    """A module that calls its function of the same name: `eva_rl.evaluate(...)` is
    `eva_rl.evaluate.evaluate(...)`, while `eva_rl.evaluate.EvalResult` stays reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _make_callable(module_name: str) -> None:
    """Called at the end of eva_rl.evaluate and eva_rl.finetune (see _CALLABLE_MODULES)."""
    sys.modules[module_name].__class__ = _CallableModule


def __getattr__(name: str) -> Any:  # PEP 562: import on first use
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eva_rl' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name in _CALLABLE_MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
