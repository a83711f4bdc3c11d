"""Fine-tuning methods: a registry from a method name to how PEFT builds and initialises it.

Every method adapts the GPT-2 blocks of a Decision Transformer. Their matrices are
`transformers` `Conv1D` modules: weight (in_features, out_features), the transpose of
`nn.Linear`. PEFT handles that layout for its LoRA layers (`fan_in_fan_out=True`); where its
initialisation does not (OLoRA), the init is done here in the transposed layout.

At step 0 every method leaves the policy's outputs unchanged: B = 0 (lora, dora, eva,
eva_dora), E = 0 (adalora), or the base weight holds the residual of the initial product
(pissa, olora). Methods that rewrite the base weight are saved as the equivalent plain LoRA
delta (rank 2r) so that `PeftModel.from_pretrained(original base, dir)` reproduces them.

Usage:
    policy = apply_method(policy, "lora", rank=8)
    policy = apply_method(policy, "eva", rank=8, eva_weights=components)  # from eva.eva_state_dict
    save_adapter(policy, "run/adapter"); save_merged(policy, "run/merged")
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from eva_rl.loading import ADAPTER_METADATA_FILE
from eva_rl.storage import atomic_dir
from eva_rl.train import count_parameters  # noqa: F401  (the package's one; methods.count_parameters stays a name)

# Every attention and MLP matrix of a GPT-2 block; suffixes of module names, as PEFT matches them.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class AdaLoraOptions:
    """AdaLoRA's settings (method adalora only); `rank` is the average rank it prunes to."""

    # Weight of the orthogonality penalty on P and Q. PEFT's default, 0.1, is sized for language-model
    # cross-entropy (about 2); a DT's action MSE is about 0.1, and at 0.1 the penalty outweighs it
    # and AdaLoRA barely moves off the pretrained policy in a run of hundreds of steps (measured:
    # held-out action error 0.151 after 300 steps vs 0.086 at 0.01 and 0.071 for LoRA).
    orth_reg_weight: float = 0.01
    # Starting rank per matrix, pruned to `rank` on average; None = ceil(1.5 * rank).
    init_rank: int | None = None
    # Share of the steps before pruning starts, and share at the end with the allocation fixed
    # (the AdaLoRA paper's schedule shape).
    warmup_fraction: float = 0.1
    final_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.orth_reg_weight < 0:
            raise ValueError(f"adalora.orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if self.init_rank is not None and self.init_rank < 1:
            raise ValueError(f"adalora.init_rank must be >= 1 (or null for 1.5 x rank), got {self.init_rank}.")
        if not (0 <= self.warmup_fraction and 0 <= self.final_fraction and self.warmup_fraction + self.final_fraction < 1):
            raise ValueError(f"adalora.warmup_fraction ({self.warmup_fraction}) and final_fraction "
                             f"({self.final_fraction}) must be >= 0 and leave some steps for pruning (sum < 1).")

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) for PEFT: steps before pruning and steps with the allocation fixed; an
        error naming these settings unless some steps are left to prune in."""
        total = max(total_steps, 3)
        tinit, tfinal = round(total * self.warmup_fraction), max(1, round(total * self.final_fraction))
        if tinit >= total - tfinal:
            raise ValueError(f"AdaLoRA has no steps left to prune in: {total_steps} steps with "
                             f"adalora.warmup_fraction {self.warmup_fraction} ({tinit} steps) and final_fraction "
                             f"{self.final_fraction} ({tfinal}). Lower the fractions or raise train.steps.")
        return tinit, tfinal

    def initial_rank(self, rank: int) -> int:
        """The starting rank for a target average `rank`; an error unless there is something to prune."""
        init_r = self.init_rank or math.ceil(1.5 * rank)
        if init_r <= rank:
            raise ValueError(f"adalora.init_rank ({init_r}) must be above rank ({rank}): AdaLoRA prunes from "
                             f"init_rank down to rank. Raise adalora.init_rank or leave it null (1.5 x rank).")
        return init_r


@dataclass(frozen=True)
class MethodOptions:
    """What a method is built from; `apply_method`'s keyword arguments, resolved."""

    rank: int  # LoRA rank r (AdaLoRA: the target average rank)
    alpha: float  # LoRA alpha; the adapter's output is scaled by alpha / r
    target_modules: tuple[str, ...]  # full module names to adapt (resolved from suffixes)
    dropout: float  # dropout on the adapter's input
    modules_to_save: tuple[str, ...]  # extra modules trained in full (e.g. "predict_action")
    total_steps: int  # optimizer steps of the run (AdaLoRA's budget schedule)
    eva_weights: Mapping[str, torch.Tensor] | None  # EVA: module name -> A (rank_i, in_features)
    adalora: AdaLoraOptions = AdaLoraOptions()


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method: how its PEFT config is built and what init runs after PEFT's."""

    name: str
    description: str
    build_config: Callable[[MethodOptions], peft.PeftConfig] | None  # None: full fine-tuning, no adapter
    init: Callable[[PeftModel, MethodOptions], None] | None = None  # runs after get_peft_model
    needs_eva: bool = False  # needs A from eva.eva_state_dict
    mutates_base: bool = False  # base weights hold a residual: save as a plain LoRA delta
    uses_rank_schedule: bool = False  # AdaLoRA: call `step_hook` after every optimizer step


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry under `spec.name`."""
    if spec.name in METHODS:
        raise ValueError(f"Method {spec.name!r} is registered twice.")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`; an unknown name lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"Unknown fine-tuning method {name!r}. Known methods: {', '.join(METHODS)}.")
    return METHODS[name]


@dataclass
class AdapterInfo:
    """What `apply_method` did to a policy; kept on the adapted model as `.eva_rl_adapter`."""

    method: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    ranks: dict[str, int]  # module name -> rank actually used (EVA may redistribute; 0 = none)
    trainable_params: int
    total_params: int
    # pissa/olora: the adapter at init, {peft state-dict key: tensor}, to save as a plain LoRA delta
    initial_lora: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("initial_lora")
        data["target_modules"] = list(self.target_modules)
        return data


# --- building PEFT configs -------------------------------------------------------------------------

def _lora_config(options: MethodOptions, **kw: Any) -> LoraConfig:
    return LoraConfig(
        r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=list(options.target_modules), fan_in_fan_out=True,
        modules_to_save=list(options.modules_to_save) or None, **kw,
    )


def _eva_config(options: MethodOptions, use_dora: bool) -> LoraConfig:
    """Uniform rank r on every target; `_eva_init` then hands EVA's components to PEFT, which sets
    each layer's rank and alpha from them."""
    if options.eva_weights is None:
        raise ValueError(
            "Method 'eva' needs the EVA components: compute them with "
            "eva_rl.adapters.eva.eva_state_dict(model, batches, rank=...) and pass eva_weights=..."
        )
    missing = [name for name in options.target_modules if name not in options.eva_weights]
    if missing:  # else those matrices would get PEFT's plain LoRA init with only a warning
        raise ValueError(
            f"eva_weights has no components for {', '.join(missing)}; compute them with eva_state_dict(..., "
            f"target_modules=...) for the same target_modules as apply_method."
        )
    if all(options.eva_weights[name].shape[0] == 0 for name in options.target_modules):
        raise ValueError("EVA assigned rank 0 to every target module; raise the rank or lower rho.")
    return _lora_config(options, init_lora_weights="eva", use_dora=use_dora,
                        # alpha * rank_i / r on a layer EVA gave rank_i, so alpha / r stays what the user set
                        eva_config=peft.EvaConfig(adjust_scaling_factors=True))


def _adalora_config(options: MethodOptions) -> AdaLoraConfig:
    ada = options.adalora
    init_r = ada.initial_rank(options.rank)
    total = max(options.total_steps, 3)
    tinit, tfinal = ada.schedule(total)
    return AdaLoraConfig(
        init_r=init_r, target_r=options.rank, orth_reg_weight=ada.orth_reg_weight,
        lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=list(options.target_modules),
        fan_in_fan_out=True, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=1,
        modules_to_save=list(options.modules_to_save) or None,
    )


def _lora_layers(model: PeftModel) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in getattr(module, "lora_A", {}):
            yield name, module


@torch.no_grad()
def _olora_init(model: PeftModel, options: MethodOptions) -> None:
    """OLoRA (QR of the weight) done in nn.Linear layout, so it is right on Conv1D too.

    PEFT's own OLoRA takes the QR of the stored weight, which for Conv1D is (in, out): its Q
    has the wrong shape for lora_B. Here W = weight^T for Conv1D, W = Q R, B = Q[:, :r],
    A = R[:r], and the base keeps W - scaling * B A (stored back in the layer's layout).
    """
    for _, layer in _lora_layers(model):
        base = layer.get_base_layer()
        conv = isinstance(base, Conv1D)
        weight = base.weight.to(torch.float32)
        w = weight.T if conv else weight  # (out_features, in_features)
        q, rr = torch.linalg.qr(w)
        r = layer.r["default"]
        b, a = q[:, :r].contiguous(), rr[:r].contiguous()
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        residual = w - layer.scaling["default"] * (b @ a)
        base.weight.copy_((residual.T if conv else residual).to(base.weight.dtype))


@torch.no_grad()
def _eva_init(model: PeftModel, options: MethodOptions) -> None:
    """Load EVA's components (eva.eva_state_dict) into the LoRA layers with PEFT's own loader.

    PEFT gives each layer the rank of its A (alpha scaled with it), writes A (B stays 0), and
    puts the base layer back where the rank is 0. The layers were built on the meta device
    (`get_peft_model(low_cpu_mem_usage=True)`), so each is materialised once, at its final rank.
    """
    assert options.eva_weights is not None
    prefix = "base_model.model."
    # PEFT pops the entries it loads: hand it a dict of its own, keyed by PeftModel module names.
    components = {prefix + name: options.eva_weights[name] for name in options.target_modules}
    peft.initialize_lora_eva_weights(model, eva_state_dict=components, show_progress_bar=False)
    # PEFT shortens 20 or more target names to suffixes that set them apart from the model's other
    # modules, but leaves the rank-0 layers it dropped out of those others: a suffix such as
    # "c_attn" would then re-create an adapter on them when the saved adapter is loaded. The exact
    # names of the layers that kept an adapter cannot match anything else.
    model.peft_config["default"].target_modules = {
        name for name in options.target_modules if options.eva_weights[name].shape[0] > 0}


register_method(MethodSpec("fft", "full fine-tuning: every parameter trains", None))
register_method(MethodSpec("lora", "LoRA: A random, B = 0", lambda o: _lora_config(o)))
register_method(MethodSpec("dora", "DoRA: LoRA with a learned magnitude per output", lambda o: _lora_config(o, use_dora=True)))
register_method(MethodSpec("pissa", "PiSSA: A, B from the top singular triplets of W; base keeps the residual",
                           lambda o: _lora_config(o, init_lora_weights="pissa"), mutates_base=True))
register_method(MethodSpec("olora", "OLoRA: A, B from the QR of W; base keeps the residual",
                           lambda o: _lora_config(o, init_lora_weights=False), init=_olora_init, mutates_base=True))
register_method(MethodSpec("adalora", "AdaLoRA: SVD-form adapter whose ranks are pruned by importance during training",
                           _adalora_config, uses_rank_schedule=True))
register_method(MethodSpec("eva", "EVA: A = top right-singular vectors of the layer inputs on the task data, B = 0",
                           lambda o: _eva_config(o, use_dora=False), init=_eva_init, needs_eva=True))
register_method(MethodSpec("eva_dora", "EVA-initialised DoRA", lambda o: _eva_config(o, use_dora=True),
                           init=_eva_init, needs_eva=True))


# --- applying a method ------------------------------------------------------------------------------

def _model_of(policy_or_model: nn.Module) -> nn.Module:
    """The transformer under a policy (its `.model`, maybe a PeftModel) or the model itself."""
    if isinstance(policy_or_model, PeftModel):
        return policy_or_model
    inner = getattr(policy_or_model, "model", None)
    return inner if isinstance(inner, nn.Module) else policy_or_model


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> tuple[str, ...]:
    """Full names of the modules that `target_modules` (name suffixes, PEFT's rule) select.

    A suffix that selects nothing is an error naming the adaptable modules.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (Conv1D, nn.Linear))]
    chosen: list[str] = []
    for target in target_modules:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            shown = sorted({n.split(".", 3)[-1] if n.startswith("encoder.h.") else n for n in names})
            raise ValueError(
                f"Target module {target!r} matches no Linear/Conv1D module of the model. "
                f"Use name suffixes such as {', '.join(DEFAULT_TARGET_MODULES)}; the model has: {', '.join(shown)}."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return tuple(n for n in names if n in chosen)  # model order


def layer_features(model: nn.Module, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a Conv1D or Linear module."""
    module = model.get_submodule(name)
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def check_targets(policy_or_model: nn.Module, method: str, rank: int,
                  target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
                  modules_to_save: Sequence[str] = ()) -> tuple[str, ...]:
    """Validate a method, rank and targets against a model before any work; the resolved module names.

    Errors: an unknown method (lists the known ones), targets or modules_to_save that match
    nothing, a rank above a target matrix's width, a model that already carries adapters.
    """
    spec = get_method(method)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    model = _model_of(policy_or_model)
    if isinstance(model, PeftModel):
        raise ValueError("The model already has adapters; apply a method to the pretrained policy.")
    names = resolve_target_modules(model, target_modules)
    _check_modules_to_save(model, modules_to_save)
    for name in names:
        width = min(layer_features(model, name))
        if spec.build_config is not None and rank > width:
            raise ValueError(
                f"rank {rank} is above the width of {name} (in x out = {layer_features(model, name)}); "
                f"use rank <= {width} or leave that module out of target_modules."
            )
    return names


def _check_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> None:
    # PEFT skips a modules_to_save name that matches nothing, so a typo would silently train less.
    names = [name for name, _ in model.named_modules() if name]
    for wanted in modules_to_save:
        if not any(n == wanted or n.endswith("." + wanted) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"modules_to_save names {wanted!r}, which matches no module of the model; "
                             f"use one of its module names, e.g. {', '.join(top)}.")


# GPT-2's token embedding: the DT feeds inputs_embeds, so it never receives a gradient.
UNUSED_PARAMETER = "encoder.wte.weight"


def apply_method(
    policy_or_model: nn.Module,
    method: str,
    *,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    total_steps: int = 1000,
    eva_weights: Mapping[str, torch.Tensor] | None = None,
    adalora: AdaLoraOptions | None = None,
) -> nn.Module:
    """Adapt a policy (or a bare DecisionTransformerModel) with `method`; returns it.

    A policy (anything with `.model`) gets `.model` replaced by a `peft.PeftModel` and is
    returned; a bare model comes back wrapped as a `PeftModel`. `fft` leaves the model as it
    is with every parameter trainable. `alpha` defaults to `rank` (scaling 1). `total_steps`
    is the run's optimizer step count (AdaLoRA's budget schedule). `eva_weights` is the
    first return value of `eva.eva_state_dict` (needed by `eva` and `eva_dora`). `adalora`
    holds AdaLoRA's penalty weight and schedule (defaults: `AdaLoraOptions()`).
    What was done is recorded in `adapter_info(result)`.
    """
    spec = get_method(method)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    model = _model_of(policy_or_model)
    names = check_targets(model, method, rank, target_modules, modules_to_save)
    options = MethodOptions(
        rank=rank, alpha=float(rank if alpha is None else alpha), target_modules=names, dropout=dropout,
        modules_to_save=tuple(modules_to_save), total_steps=total_steps, eva_weights=eva_weights,
        adalora=adalora or AdaLoraOptions(),
    )
    if spec.build_config is None:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith(UNUSED_PARAMETER))
        adapted = model
        ranks = {n: 0 for n in names}
    else:
        config = spec.build_config(options)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(eva initialization|fan_in_fan_out|r` is not used|is_gradient_checkpointing).*")
            # EVA's init gives each layer its own rank: built on the meta device, each is made once
            adapted = get_peft_model(model, config, low_cpu_mem_usage=spec.needs_eva)
        if spec.init is not None:
            spec.init(adapted, options)
        ranks = {n: 0 for n in names}
        for name, layer in _lora_layers(adapted):
            ranks[name.removeprefix("base_model.model.")] = int(layer.r["default"])
    trainable, total = count_parameters(adapted)
    info = AdapterInfo(method=method, rank=rank, alpha=options.alpha, target_modules=names, ranks=ranks,
                       trainable_params=trainable, total_params=total)
    if spec.mutates_base:
        info.initial_lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(adapted).items()}
    adapted.eva_rl_adapter = info
    if policy_or_model is not model:  # a policy: it keeps working through its adapted .model
        policy_or_model.model = adapted
        return policy_or_model
    return adapted


def adapter_info(policy_or_model: nn.Module) -> AdapterInfo:
    """What `apply_method` did (method, ranks, trainable parameters)."""
    model = _model_of(policy_or_model)
    info = getattr(model, "eva_rl_adapter", None)
    if info is None:
        raise ValueError("This model has no method applied; call apply_method(policy, method, ...) first.")
    return info


class AdaLoraSchedule:
    """AdaLoRA's budget schedule as a training-loop hook: `hook(step)` after every optimizer step.

    `step` = optimizer steps completed (1-based); it calls PEFT's `update_and_allocate(step - 1)`,
    which reads the gradients, so it must run after `optimizer.step()` and before `zero_grad()`.
    `state_dict()` / `load_state_dict()` carry the importance averages and the rank pattern
    through checkpoints, so a resumed run prunes exactly as an uninterrupted one.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def __call__(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step - 1)

    def state_dict(self) -> dict:
        allocator = self.model.base_model.rankallocator
        pattern = self.model.peft_config["default"].rank_pattern
        return {
            "ipt": dict(allocator.ipt), "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc),
            "rank_pattern": {k: torch.as_tensor(v, dtype=torch.bool) for k, v in (pattern or {}).items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        allocator = self.model.base_model.rankallocator
        allocator.ipt = dict(state["ipt"])
        allocator.exp_avg_ipt = dict(state["exp_avg_ipt"])
        allocator.exp_avg_unc = dict(state["exp_avg_unc"])
        pattern = {k: v.tolist() for k, v in state["rank_pattern"].items()}
        self.model.peft_config["default"].rank_pattern = pattern or None


def step_hook(policy_or_model: nn.Module) -> AdaLoraSchedule | None:
    """The per-optimizer-step callback a method needs (AdaLoRA's schedule), or None."""
    model = _model_of(policy_or_model)
    if not get_method(adapter_info(model).method).uses_rank_schedule:
        return None
    return AdaLoraSchedule(model)


def regularization_loss(policy_or_model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on P and Q (weight included), or None for other methods.

    This mirrors PEFT's own, the `orth_reg` that `peft.tuners.adalora.AdaLoraModel.forward` adds
    to `outputs.loss`: mean over lora_A (P P^T) and lora_B (Q^T Q) of ||cov - I||_F, times
    orth_reg_weight. PEFT adds it only to outputs with a `.loss`, which the DT does not return,
    so the training loss adds it here.
    """
    model = _model_of(policy_or_model)
    if not get_method(adapter_info(model).method).uses_rank_schedule:
        return None
    weight = model.peft_config["default"].orth_reg_weight
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype)))
    return weight * torch.stack(terms).mean() if terms else None


def adalora_ranks(policy_or_model: nn.Module) -> dict[str, int]:
    """Current AdaLoRA rank per module: its init_r until the schedule first prunes, then the
    number of singular values E the allocator's rank pattern keeps."""
    model = _model_of(policy_or_model)
    pattern = model.peft_config["default"].rank_pattern or {}
    ranks = {}
    for name, module in model.named_modules():
        e = getattr(module, "lora_E", None)
        if e is not None and "default" in e:
            short = name.removeprefix("base_model.model.")
            kept = [v for k, v in pattern.items() if k.removeprefix("base_model.model.").startswith(short + ".")]
            ranks[short] = int(sum(bool(x) for x in kept[0])) if kept else int(e["default"].shape[0])
    return ranks


# --- saving -----------------------------------------------------------------------------------------

def save_adapter(policy_or_model: nn.Module, directory: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the adapter so that `eva_rl.load_policy(directory)` loads it on its base, and
    `PeftModel.from_pretrained(base, directory)` too.

    `base` is the original pretrained DecisionTransformerModel (a policy's `.model`, not the
    policy: that refuses the adapter's keys). pissa/olora are written as the equivalent plain
    LoRA delta W' - W = [B, -B0] [A; A0] (rank 2r), as PEFT's weight conversion does. `fft`
    writes the whole policy (`save_pretrained`). `eva_rl_adapter.json` holds the method,
    ranks and parameter counts, plus `extra`. Atomic: a crash never leaves half a directory.
    """
    model = _model_of(policy_or_model)
    info = adapter_info(model)
    target = Path(directory)
    with atomic_dir(target) as tmp:
        if not isinstance(model, PeftModel):
            saver = policy_or_model if hasattr(policy_or_model, "save_pretrained") else model
            saver.save_pretrained(tmp / "model")
        elif info.initial_lora is None:
            model.save_pretrained(tmp)
        else:
            _save_as_plain_lora(model, info, tmp)
        meta = {"method": info.method, **info.to_json(), **dict(extra or {})}
        (tmp / ADAPTER_METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return target


def _save_as_plain_lora(model: PeftModel, info: AdapterInfo, directory: Path) -> None:
    """Save a residual-base adapter (pissa/olora) as a LoRA on the original weights.

    The same conversion as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`
    (tests check the tensors agree), done here because PEFT's keeps only lora_A/lora_B: the
    weights of `modules_to_save` (e.g. a retrained action head) are dropped from the file, which
    then fails to load. PEFT's also needs the initial adapter written to disk and loaded back
    into the live model as a second adapter; the initial tensors are already in memory here.
    """
    assert info.initial_lora is not None
    state = get_peft_model_state_dict(model)
    converted = {}
    for key, value in state.items():
        if "lora_A" in key:
            converted[key] = torch.cat([value, info.initial_lora[key]], dim=0).contiguous()
        elif "lora_B" in key:
            converted[key] = torch.cat([value, -info.initial_lora[key]], dim=1).contiguous()
        else:
            converted[key] = value.contiguous()
    config = copy.deepcopy(model.peft_config["default"])
    # Same scaling alpha/r at twice the rank; the init is now the plain product, nothing to subtract.
    config.r *= 2
    config.lora_alpha *= 2
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    config.init_lora_weights = True
    config.inference_mode = True
    config.save_pretrained(str(directory))
    from safetensors.torch import save_file

    save_file(converted, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def merged_model(policy_or_model: nn.Module) -> nn.Module:
    """A standalone copy with the adapter folded into the weights (the input is untouched).

    Returns a policy (if given one) whose `.model` is a plain DecisionTransformerModel, or
    the plain model.
    """
    has_policy = _model_of(policy_or_model) is not policy_or_model
    clone = copy.deepcopy(policy_or_model)
    model = clone.model if has_policy else clone
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.__dict__.pop("eva_rl_adapter", None)
    if has_policy:
        clone.model = model
        return clone
    return model


def save_merged(policy_or_model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the merged policy as a standalone checkpoint (`save_pretrained` of the policy).

    `DecisionTransformerModel.from_pretrained(directory)` loads it, and so does eva-rl's
    policy loader when given a policy.
    """
    merged = merged_model(policy_or_model)
    merged.save_pretrained(directory)
    return Path(directory)
