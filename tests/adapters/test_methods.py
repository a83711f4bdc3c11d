"""Fine-tuning methods on the DT's Conv1D layers: step-0 identity, inits, save/load/merge, AdaLoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from eva_rl.adapters import methods
from eva_rl import policy as policy_mod
from eva_rl.adapters.methods import METHODS, apply_method, resolve_target_modules
from eva_rl.policy import load_policy

STATE, ACT, B, K = 5, 3, 4, 6


def tiny_model(seed: int = 0) -> DecisionTransformerModel:
    torch.manual_seed(seed)
    config = DecisionTransformerConfig(state_dim=STATE, act_dim=ACT, hidden_size=16, n_layer=2, n_head=2,
                                       max_ep_len=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = DecisionTransformerModel(config)
    with torch.no_grad():  # weights well away from GPT-2's 0.02-std init so that errors show
        for name, p in model.named_parameters():
            if "encoder.h." in name and p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, :2] = 0
    return dict(states=torch.randn(B, K, STATE, generator=g), actions=torch.randn(B, K, ACT, generator=g),
                rewards=torch.randn(B, K, 1, generator=g), returns_to_go=torch.randn(B, K, 1, generator=g),
                timesteps=torch.randint(0, 64, (B, K), generator=g), attention_mask=mask)


def actions_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch, return_dict=False)[1]


def random_eva_weights(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in resolve_target_modules(model):
        width = methods.layer_features(model, name)[0]
        out[name] = torch.linalg.qr(torch.randn(width, rank))[0].T.contiguous()
    return out


def adapted(method: str, rank: int = 4, seed: int = 0, **kw) -> torch.nn.Module:
    model = tiny_model(seed)
    if method.startswith("eva"):
        kw.setdefault("eva_weights", random_eva_weights(model, rank))
    return apply_method(model, method, rank=rank, alpha=2.0 * rank, **kw)


@torch.no_grad()
def perturb_adapter(model: torch.nn.Module) -> None:
    """Stand-in for training: move every trainable adapter tensor."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", list(METHODS))
def test_step_zero_leaves_actions_unchanged(method: str) -> None:
    batch = make_batch()
    reference = actions_of(tiny_model(), batch)
    model = adapted(method)
    assert torch.allclose(actions_of(model, batch), reference, atol=1e-5)
    info = methods.adapter_info(model)
    assert info.trainable_params == methods.count_parameters(model)[0] > 0


def test_trainable_parameter_counts() -> None:
    counts = {m: methods.adapter_info(adapted(m)).trainable_params for m in ("fft", "lora", "dora", "eva", "pissa")}
    model = tiny_model()
    lora = sum(4 * sum(methods.layer_features(model, n)) for n in resolve_target_modules(model))
    assert counts["lora"] == counts["eva"] == counts["pissa"] == lora
    # DoRA adds one magnitude per output feature
    assert counts["dora"] == lora + sum(methods.layer_features(model, n)[1] for n in resolve_target_modules(model))
    # full fine-tuning trains everything but GPT-2's token embedding, which the DT never uses
    unused = model.encoder.wte.weight.numel()
    assert counts["fft"] == sum(p.numel() for p in model.parameters()) - unused


@torch.no_grad()
def test_pissa_on_conv1d_takes_the_top_singular_triplets() -> None:
    base = tiny_model()
    model = adapted("pissa")
    layer = model.base_model.model.encoder.h[0].mlp.c_fc
    w = base.encoder.h[0].mlp.c_fc.weight.T  # (out, in), nn.Linear layout
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(delta, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    assert torch.allclose(layer.base_layer.weight.T + delta, w, atol=1e-5)


@torch.no_grad()
def test_olora_on_conv1d_is_the_qr_of_the_linear_layout_weight() -> None:
    base = tiny_model()
    model = adapted("olora")
    for block in (0, 1):
        for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"):
            layer = model.base_model.model.encoder.h[block].get_submodule(name)
            w = base.encoder.h[block].get_submodule(name).weight.T  # (out, in)
            b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            assert b.shape == (w.shape[0], 4) and a.shape == (4, w.shape[1])
            assert torch.allclose(b.T @ b, torch.eye(4), atol=1e-5)  # Q's columns
            q, r = torch.linalg.qr(w)
            assert torch.allclose((b @ a).abs(), (q[:, :4] @ r[:4]).abs(), atol=1e-5)
            assert torch.allclose(layer.base_layer.weight.T + layer.scaling["default"] * b @ a, w, atol=1e-5)


def test_peft_olora_alone_is_wrong_on_conv1d() -> None:
    """Why olora has its own init: PEFT takes the QR of the (in, out) Conv1D weight, so lora_B gets
    in_features rows instead of out_features and the forward fails."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["c_fc"], init_lora_weights="olora"))
    assert model.base_model.model.encoder.h[0].mlp.c_fc.lora_B["default"].weight.shape == (16, 4)  # not (64, 4)
    with pytest.raises(RuntimeError):
        actions_of(model, make_batch())


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "olora", "eva", "eva_dora", "adalora"])
def test_saved_adapter_loads_with_peft_and_merges_to_the_same_outputs(method: str, tmp_path) -> None:
    batch = make_batch()
    model = adapted(method)
    perturb_adapter(model)
    model.eval()
    expected = actions_of(model, batch)
    assert not torch.allclose(expected, actions_of(tiny_model(), batch), atol=1e-4)  # the adapter does something

    methods.save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    assert torch.allclose(actions_of(loaded, batch), expected, atol=1e-5)

    methods.save_merged(model, tmp_path / "merged")
    merged = DecisionTransformerModel.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.encoder.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.allclose(actions_of(merged, batch), expected, atol=1e-5)
    assert isinstance(model, PeftModel)  # merging worked on a copy


def _peft_converted_adapter(model: PeftModel, directory) -> dict[str, torch.Tensor]:
    """PEFT's own pissa/olora -> LoRA conversion: the initial adapter written first (its config
    with init_lora_weights=True, as PEFT's docs say), then save_pretrained converts against it."""
    import copy

    from safetensors.torch import load_file, save_file

    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True
    config.save_pretrained(str(directory / "initial"))
    save_file({k: v.contiguous() for k, v in methods.adapter_info(model).initial_lora.items()},
              str(directory / "initial" / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory / "peft"), path_initial_model_for_weight_conversion=str(directory / "initial"))
    return load_file(str(directory / "peft" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_residual_adapters_save_as_peft_converts_them_and_keep_modules_to_save(method: str, tmp_path) -> None:
    """save_adapter writes what PEFT's path_initial_model_for_weight_conversion writes, and also
    the modules_to_save weights, which PEFT's conversion drops (its file then does not load)."""
    from safetensors.torch import load_file

    model = adapted(method)
    perturb_adapter(model)
    methods.save_adapter(model, tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_made = _peft_converted_adapter(model, tmp_path)
    assert ours.keys() == peft_made.keys()
    assert all(torch.equal(ours[k], peft_made[k]) for k in ours)

    model = adapted(method, modules_to_save=("predict_action",))
    perturb_adapter(model)
    model.eval()
    expected = actions_of(model, make_batch())
    methods.save_adapter(model, tmp_path / "ours_head")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "ours_head").eval()
    assert torch.allclose(actions_of(loaded, make_batch()), expected, atol=1e-5)
    peft_made = _peft_converted_adapter(model, tmp_path / "head")
    assert not [k for k in peft_made if "predict_action" in k]
    with pytest.raises(KeyError, match="predict_action"):
        PeftModel.from_pretrained(tiny_model(), tmp_path / "head" / "peft")


def redistributed_eva_weights(model: torch.nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """EVA components as rank redistribution (rho > 1) leaves them: ranks 2, 6, 0, then r."""
    weights = random_eva_weights(model, rank)
    names = list(weights)
    weights[names[0]] = weights[names[0]][:2]
    weights[names[1]] = torch.linalg.qr(torch.randn(16, 6))[0].T
    weights[names[2]] = weights[names[2]][:0]
    return weights


@pytest.mark.parametrize("method", ["eva", "eva_dora"])
def test_eva_ranks_and_alpha_follow_the_given_components(method: str) -> None:
    model = tiny_model()
    weights = redistributed_eva_weights(model)
    names = list(weights)
    batch = make_batch()
    reference = actions_of(model, batch)
    peft_model = apply_method(model, method, rank=4, alpha=8.0, eva_weights=weights)
    info = methods.adapter_info(peft_model)
    assert info.ranks[names[0]] == 2 and info.ranks[names[1]] == 6 and info.ranks[names[2]] == 0
    assert all(info.ranks[n] == 4 for n in names[3:])
    for name in (names[0], names[1], names[3]):
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.scaling["default"] == pytest.approx(2.0)  # alpha / r kept at 8 / 4
        assert torch.equal(layer.lora_A["default"].weight, weights[name])
        assert not layer.lora_B["default"].weight.any()
    assert not hasattr(peft_model.base_model.model.get_submodule(names[2]), "lora_A")  # rank 0: no adapter
    config = peft_model.peft_config["default"]
    assert config.rank_pattern == {names[0]: 2, names[1]: 6}
    assert config.alpha_pattern == {names[0]: 4.0, names[1]: 12.0}
    assert set(config.target_modules) == set(names) - {names[2]}
    assert torch.allclose(actions_of(peft_model, batch), reference, atol=1e-5)
    if method == "eva_dora":  # the magnitude of W + scaling B A with B = 0: the base weight's column norms
        layer = peft_model.base_model.model.get_submodule(names[1])
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert torch.allclose(magnitude, layer.get_base_layer().weight.T.norm(dim=1), atol=1e-6)


def deep_model(n_layer: int = 6) -> DecisionTransformerModel:
    """24 target matrices: enough for PEFT to shorten target_modules to suffixes (it does from 20)."""
    torch.manual_seed(0)
    config = DecisionTransformerConfig(state_dim=STATE, act_dim=ACT, hidden_size=16, n_layer=n_layer, n_head=2,
                                       max_ep_len=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return DecisionTransformerModel(config).eval()


@pytest.mark.parametrize("method", ["eva", "eva_dora"])
def test_eva_rank_zero_layers_stay_bare_when_the_adapter_is_loaded(method: str, tmp_path) -> None:
    batch = make_batch()
    weights = redistributed_eva_weights(deep_model())
    dropped = list(weights)[2]
    model = apply_method(deep_model(), method, rank=4, alpha=8.0, eva_weights=weights)
    perturb_adapter(model)
    model.eval()
    expected = actions_of(model, batch)
    methods.save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(deep_model(), tmp_path / "adapter").eval()
    assert not [w for w in caught if "keys" in str(w.message)]  # no missing or unexpected adapter keys
    assert not hasattr(loaded.base_model.model.get_submodule(dropped), "lora_A")
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == \
        sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert torch.allclose(actions_of(loaded, batch), expected, atol=1e-5)


def test_peft_eva_loader_alone_re_adapts_a_dropped_layer_on_load(tmp_path) -> None:
    """Why _eva_init rewrites target_modules: PEFT's loader shortens 20+ targets to suffixes
    ("c_attn") without counting the rank-0 layers it dropped, so loading the saved adapter puts
    an adapter (random A, B = 0) back on them."""
    import peft
    from peft import LoraConfig, get_peft_model

    weights = redistributed_eva_weights(deep_model())
    dropped = list(weights)[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(deep_model(), LoraConfig(r=4, lora_alpha=8, target_modules=list(weights),
                                                        init_lora_weights="eva", fan_in_fan_out=True))
        peft.initialize_lora_eva_weights(model, eva_state_dict={"base_model.model." + k: v for k, v in weights.items()},
                                         show_progress_bar=False)
        assert not hasattr(model.base_model.model.get_submodule(dropped), "lora_A")
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(deep_model(), tmp_path / "adapter")
    assert hasattr(loaded.base_model.model.get_submodule(dropped), "lora_A")


def test_adalora_ranks_shrink_when_the_loop_calls_the_step_hook() -> None:
    steps = 30
    model = adapted("adalora", rank=2, total_steps=steps)
    model.train()
    hook = methods.step_hook(model)
    assert hook is not None and methods.step_hook(adapted("lora")) is None
    start = sum(methods.adalora_ranks(model).values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = actions_of(model, batch).square().mean() + methods.regularization_loss(model)
        loss.backward()
        optimizer.step()
        hook(step)  # gradients still in place, as train.py calls it
    ranks = methods.adalora_ranks(model)
    assert start == 3 * len(ranks)  # init_r = 1.5 r
    assert sum(ranks.values()) == 2 * len(ranks) < start  # pruned to the target budget


def test_adalora_options_reach_peft_and_scale_the_penalty() -> None:
    light = adapted("adalora", rank=2, total_steps=40)
    heavy = adapted("adalora", rank=2, total_steps=40,
                    adalora=methods.AdaLoraOptions(orth_reg_weight=0.5, init_rank=4, warmup_fraction=0.25,
                                                   final_fraction=0.5))
    config = heavy.peft_config["default"]
    assert (config.orth_reg_weight, config.init_r, config.target_r, config.tinit, config.tfinal) == (0.5, 4, 2, 10, 20)
    assert light.peft_config["default"].orth_reg_weight == 0.01  # the default, sized for a DT's action MSE
    assert sum(methods.adalora_ranks(heavy).values()) == 4 * len(methods.adalora_ranks(heavy))
    unweighted = float(methods.regularization_loss(heavy)) / 0.5
    assert unweighted > 1.0  # random P, Q are far from orthonormal
    with pytest.raises(ValueError, match="init_rank .* must be above rank"):
        adapted("adalora", rank=2, adalora=methods.AdaLoraOptions(init_rank=2))
    with pytest.raises(ValueError, match="leave some steps for pruning"):
        methods.AdaLoraOptions(warmup_fraction=0.5, final_fraction=0.5)
    with pytest.raises(ValueError, match="no steps left to prune in: 10 steps"):
        methods.AdaLoraOptions(warmup_fraction=0.9, final_fraction=0.05).schedule(10)
    assert methods.AdaLoraOptions(warmup_fraction=0.7).schedule(90) == (63, 18)  # rounded, not truncated


def test_adalora_penalty_is_the_one_peft_adds_to_a_loss(monkeypatch) -> None:
    """regularization_loss mirrors AdaLoraModel.forward's orth_reg, which PEFT only adds to an
    output carrying `.loss`: give the DT's output one (0) and PEFT's sum is the penalty alone."""
    from types import SimpleNamespace

    model = adapted("adalora", rank=2, total_steps=40, adalora=methods.AdaLoraOptions(orth_reg_weight=0.3))
    perturb_adapter(model)
    dt = model.base_model.model
    monkeypatch.setattr(dt, "forward", lambda *a, **kw: SimpleNamespace(loss=torch.zeros(())))
    peft_penalty = model.base_model(**make_batch()).loss
    ours = methods.regularization_loss(model)
    assert float(ours) > 0.0
    assert torch.allclose(ours, peft_penalty, rtol=1e-5)


def _adalora_steps(model: torch.nn.Module, hook, steps: range) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in steps:
        optimizer.zero_grad()
        actions_of(model, make_batch(step)).square().mean().backward()
        optimizer.step()
        hook(step)


def test_hook_state_round_trips() -> None:
    """A resumed run's schedule carries on from the saved importance averages and rank pattern."""
    model = adapted("adalora", rank=2, total_steps=12)
    hook = methods.step_hook(model)
    _adalora_steps(model, hook, range(1, 8))  # past tinit: pruning has started
    state = hook.state_dict()
    assert state["ipt"] and state["rank_pattern"]
    fresh = adapted("adalora", rank=2, total_steps=12)
    fresh.load_state_dict(model.state_dict())
    restored = methods.step_hook(fresh)
    restored.load_state_dict(state)
    again = restored.state_dict()
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc", "rank_pattern"):
        assert again[key].keys() == state[key].keys()
        assert all(torch.equal(again[key][k], state[key][k]) for k in state[key])
    assert methods.adalora_ranks(fresh) == methods.adalora_ranks(model)


def test_bad_input_is_reported_before_any_work() -> None:
    with pytest.raises(ValueError, match="Known methods: fft, lora, dora, pissa, olora, adalora, eva, eva_dora"):
        apply_method(tiny_model(), "qlora")
    with pytest.raises(ValueError, match="rank 17 is above the width"):
        apply_method(tiny_model(), "lora", rank=17)
    with pytest.raises(ValueError, match="matches no Linear/Conv1D"):
        apply_method(tiny_model(), "lora", target_modules=("q_proj",))
    with pytest.raises(ValueError, match="eva_state_dict"):
        apply_method(tiny_model(), "eva")
    partial = random_eva_weights(tiny_model(), 2)
    partial.pop("encoder.h.1.mlp.c_fc")
    with pytest.raises(ValueError, match="no components for encoder.h.1.mlp.c_fc"):
        apply_method(tiny_model(), "eva", rank=2, eva_weights=partial)
    with pytest.raises(ValueError, match="'predict_actoin', which matches no module"):
        apply_method(tiny_model(), "lora", modules_to_save=("predict_actoin",))  # PEFT would skip it silently


def test_policy_keeps_working_with_adapters(tmp_path) -> None:
    config = policy_mod.PolicyConfig.from_preset("tiny", state_dim=STATE, act_dim=ACT, max_ep_len=64, dropout=0.0)
    metadata = policy_mod.PolicyMetadata(state_mean=[0.0] * STATE, state_std=[1.0] * STATE, tasks=("t",),
                                         obs_dims=(STATE,), act_dims=(ACT,))
    policy = policy_mod.DecisionTransformerPolicy(config, metadata).eval()
    batch = {**make_batch(), "task_ids": torch.zeros(B, dtype=torch.long)}
    before = policy(batch)
    same = apply_method(policy, "lora", rank=2)
    assert same is policy and isinstance(policy.model, PeftModel)
    assert torch.allclose(policy(batch), before, atol=1e-6)
    assert methods.adapter_info(policy).trainable_params == methods.count_parameters(policy)[0]
    perturb_adapter(policy)
    methods.save_merged(policy, tmp_path / "merged")
    loaded = policy_mod.DecisionTransformerPolicy.from_pretrained(tmp_path / "merged")
    assert torch.allclose(loaded(batch), policy(batch), atol=1e-5)


def _policy(seed: int = 0, hidden_size: int = 32) -> "policy_mod.DecisionTransformerPolicy":
    torch.manual_seed(seed)
    config = policy_mod.PolicyConfig.from_preset("tiny", state_dim=STATE, act_dim=ACT, max_ep_len=64,
                                                 hidden_size=hidden_size)
    metadata = policy_mod.PolicyMetadata(state_mean=[0.0] * STATE, state_std=[1.0] * STATE)
    return policy_mod.DecisionTransformerPolicy(config, metadata).eval()


def _saved_adapter(tmp_path):
    _policy().save_pretrained(tmp_path / "base")
    policy = apply_method(load_policy(tmp_path / "base"), "lora", rank=2)
    perturb_adapter(policy)
    methods.save_adapter(policy, tmp_path / "adapter", extra={"checkpoint": str(tmp_path / "base")})
    return policy.eval()


@pytest.mark.parametrize("method", ["eva", "eva_dora"])
def test_eva_adapter_with_redistributed_ranks_loads_with_load_policy(method: str, tmp_path) -> None:
    _policy().save_pretrained(tmp_path / "base")
    policy = load_policy(tmp_path / "base")
    weights = random_eva_weights(policy.model, 4)
    names = list(weights)
    weights[names[0]], weights[names[1]] = weights[names[0]][:0], torch.linalg.qr(torch.randn(32, 6))[0].T
    apply_method(policy, method, rank=4, eva_weights=weights)
    perturb_adapter(policy)
    methods.save_adapter(policy, tmp_path / "adapter", extra={"checkpoint": str(tmp_path / "base")})
    batch = make_batch()
    with torch.no_grad():
        expected = policy.eval()(batch)
        loaded = load_policy(tmp_path / "adapter")
        assert torch.allclose(loaded(batch), expected, atol=1e-6)
    assert not hasattr(loaded.model.base_model.model.get_submodule(names[0]), "lora_A")
    assert loaded.model.base_model.model.get_submodule(names[1]).r["default"] == 6


def test_peft_on_a_policy_either_loads_the_adapter_or_names_load_policy(tmp_path) -> None:
    """README's route, PeftModel.from_pretrained, on the obvious object must never give the base
    policy with only a warning."""
    trained = _saved_adapter(tmp_path)
    batch = make_batch()
    with torch.no_grad():
        expected = trained(batch)
        assert not torch.allclose(load_policy(tmp_path / "base")(batch), expected, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "missing adapter keys" warning either
            assert torch.allclose(load_policy(tmp_path / "adapter")(batch), expected, atol=1e-6)
        with pytest.raises(ValueError, match=r"eva_rl.load_policy\(adapter_dir\)"):
            PeftModel.from_pretrained(load_policy(tmp_path / "base"), tmp_path / "adapter")
        policy = load_policy(tmp_path / "base")  # the other route: the policy's model takes it whole
        policy.model = PeftModel.from_pretrained(policy.model, tmp_path / "adapter")
        assert torch.allclose(policy.eval()(batch), expected, atol=1e-6)


def test_an_adapter_on_the_wrong_base_or_pickled_is_a_clear_error(tmp_path) -> None:
    _saved_adapter(tmp_path)
    _policy(hidden_size=16).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"adapter in .*adapter' does not fit the base checkpoint .*other'.*"
                                         r"pass the checkpoint it was fine-tuned from"):
        load_policy(tmp_path / "adapter", base=tmp_path / "other")
    (tmp_path / "adapter" / "adapter_model.safetensors").rename(tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"only \['adapter_model.bin'\]: eva-rl never loads pickled weights"):
        load_policy(tmp_path / "adapter")
