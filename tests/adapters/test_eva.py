"""EVA: token selection, padding, exact subspaces, redistribution, the PEFT backend, torch.distributed."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from eva_rl.adapters import eva
from eva_rl.adapters.eva import eva_state_dict, redistribute_ranks, token_mask

STATE, ACT = 5, 3


def tiny_dt(seed: int = 0, hidden: int = 16) -> DecisionTransformerModel:
    torch.manual_seed(seed)
    config = DecisionTransformerConfig(state_dim=STATE, act_dim=ACT, hidden_size=hidden, n_layer=2, n_head=2,
                                       max_ep_len=64)
    return DecisionTransformerModel(config).eval()


def make_batches(n: int, *, seed: int = 0, batch: int = 16, context: int = 6, low_rank: bool = False,
                 pad_value: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """Sampler-format batches; the first 4 windows are left-padded by 3 steps (padding holds pad_value)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(2, STATE, generator=g)
    out = []
    for _ in range(n):
        states = torch.randn(batch, context, 2, generator=g) @ mix if low_rank else \
            torch.randn(batch, context, STATE, generator=g)
        mask = torch.ones(batch, context, dtype=torch.long)
        mask[:4, :3] = 0
        b = dict(states=states, actions=torch.randn(batch, context, ACT, generator=g).tanh(),
                 rewards=torch.zeros(batch, context, 1), returns_to_go=torch.rand(batch, context, 1, generator=g),
                 timesteps=torch.randint(0, 64, (batch, context), generator=g), attention_mask=mask,
                 task_ids=torch.zeros(batch, dtype=torch.long))
        for key in ("states", "actions", "returns_to_go"):
            b[key][mask == 0] = pad_value
        out.append(b)
    return out


def captured_fraction(a: torch.Tensor, cov: torch.Tensor) -> float:
    """Variance the rows of `a` capture, as a fraction of the exact top-k eigenvalues' sum."""
    q = torch.linalg.qr(a.double().T)[0]
    values = torch.linalg.eigvalsh(cov).flip(0)
    return float(torch.trace(q.T @ cov @ q) / values[: a.shape[0]].sum())


def smallest_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the largest principal angle between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return float(torch.linalg.svdvals(qa.T @ qb).min())


def layer_inputs(model: torch.nn.Module, name: str, batches: list[dict], tokens=("state", "action")) -> torch.Tensor:
    """The rows EVA should see at `name`: inputs of the chosen token kinds of real steps, by hand."""
    rows = []

    def hook(module, inputs, output):
        x = inputs[0]  # (B, 3K, d)
        b, t, d = x.shape
        per_step = x.reshape(b, t // 3, 3, d)  # tokens per step: (return, state, action)
        kinds = [eva.TOKEN_KINDS.index(k) for k in tokens]
        keep = current["mask"].bool()
        for k in kinds:
            rows.append(per_step[:, :, k][keep])

    handle = model.get_submodule(name).register_forward_hook(hook)
    current = {}
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            eva._dt_forward(model, batch)
    handle.remove()
    return torch.cat(rows).double()


def centred_cov(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0)
    return xc.T @ xc / (x.shape[0] - 1)


def test_token_mask_expands_steps_to_interleaved_tokens() -> None:
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert token_mask(mask, ("state",)).tolist() == [[False] * 3 + [False, True, False] * 2, [False, True, False] * 3]
    assert token_mask(mask, ("return", "action"))[0].tolist() == [False] * 3 + [True, False, True] * 2
    with pytest.raises(ValueError, match="subset of"):
        token_mask(mask, ("reward",))


@pytest.mark.parametrize("tokens", [("state", "action"), ("return",), ("return", "state", "action")])
def test_components_are_the_exact_eigenvectors_of_the_selected_rows(tokens) -> None:
    """Feeding one batch twice makes the statistics exact: A must be the top eigenvectors of the
    covariance of exactly the selected rows (a wrong row would change it)."""
    model = tiny_dt()
    batch = make_batches(1)[0]
    weights, report = eva_state_dict(model, [batch, batch], rank=3, tokens=tokens, max_batches=2)
    for name in ("encoder.h.0.attn.c_attn", "encoder.h.1.mlp.c_proj"):
        x = layer_inputs(model, name, [batch], tokens)
        assert report.tokens_seen[name] == 2 * x.shape[0]
        cov = centred_cov(x)
        assert captured_fraction(weights[name], cov) > 1 - 1e-6
        vectors = torch.linalg.eigh(cov)[1].flip(1)[:, :3].T
        assert smallest_cosine(weights[name], vectors) > 0.9999


def test_padding_never_enters() -> None:
    model = tiny_dt()
    clean = make_batches(3, pad_value=0.0)
    dirty = make_batches(3, pad_value=1e3)
    a, _ = eva_state_dict(model, clean, rank=3, max_batches=3)
    b, _ = eva_state_dict(model, dirty, rank=3, max_batches=3)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5)


def spectral_gap_rows(n: int, width: int, g: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
    scales = torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0] + [0.5] * (width - 5))
    return (torch.randn(n, width, generator=g) * scales) @ basis.T + 3.0  # a mean offset, removed by centring


@pytest.mark.parametrize("width,eigh_max_width", [(24, 1024), (96, 16)])
def test_running_statistics_span_the_exact_top_subspace(width: int, eigh_max_width: int) -> None:
    """Activations made here, with a clear spectral gap after 5 components; both solvers (eigh and
    subspace iteration) must match the exact SVD of all rows, centred."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(width, width, generator=g))[0]
    stats = eva._LayerStatistics("x", width, 5, eigh_max_width, seed=0)
    rows = []
    for _ in range(12):
        x = spectral_gap_rows(200, width, g, basis)
        rows.append(x)
        stats.add(x)
        stats.solve()
    stats.finish()
    all_rows = torch.cat(rows).double()
    exact = torch.linalg.svd(all_rows - all_rows.mean(0), full_matrices=False)[2][:5]
    a = stats.components_rows(5)
    assert captured_fraction(a, centred_cov(all_rows)) >= 0.99
    assert smallest_cosine(a, exact) >= 0.99
    assert bool(stats.converged.all())


def test_rank_redistribution_on_a_hand_made_spectrum() -> None:
    explained = {"a": [0.5, 0.2, 0.1, 0.05], "b": [0.3, 0.01, 0.005, 0.001], "c": [0.15, 0.12, 0.11, 0.09]}
    # budget 3 * 2 = 6 of: .5 .3 .2 .15 .12 .11 | .1 .09 ...
    assert redistribute_ranks(explained, budget=6, max_rank=4) == {"a": 2, "b": 1, "c": 3}
    assert redistribute_ranks(explained, budget=6, max_rank=2) == {"a": 2, "b": 2, "c": 2}  # rho = 1: uniform
    assert redistribute_ranks({"a": [0.9, 0.8], "b": [0.1, 0.05]}, budget=2, max_rank=2) == {"a": 2, "b": 0}


def test_wide_layers_by_subspace_iteration_agree_with_eigh() -> None:
    model = tiny_dt()
    batches = make_batches(6)
    b, rb = eva_state_dict(model, batches, rank=3, max_batches=6, eigh_max_width=8)  # the 64-wide mlp.c_proj iterates
    c, rc = eva_state_dict(model, batches, rank=3, max_batches=6, eigh_max_width=4096)  # every layer by eigh
    assert rb.batches == rc.batches
    for name in c:
        assert smallest_cosine(b[name], c[name]) > 0.999


def test_native_and_peft_backends_agree_on_a_tiny_dt() -> None:
    model = tiny_dt()
    batches = make_batches(40, low_rank=True, batch=32)
    native, rn = eva_state_dict(model, batches, rank=2, max_batches=40)
    reference, rp = eva_state_dict(model, batches, rank=2, max_batches=40, backend="peft")
    assert set(native) == set(reference) == set(rn.ranks)
    for name in native:
        x = layer_inputs(model, name, batches[: max(rn.batches[name], rp.batches[name])])
        cov = centred_cov(x)
        assert captured_fraction(native[name], cov) >= 0.99
        assert smallest_cosine(native[name], reference[name]) >= 0.95, name
    # rho > 1: the same rank allocation
    _, rn2 = eva_state_dict(model, batches, rank=2, rho=2.0, max_batches=40)
    _, rp2 = eva_state_dict(model, batches, rank=2, rho=2.0, max_batches=40, backend="peft")
    assert rn2.ranks == rp2.ranks
    assert sum(rn2.ranks.values()) == 2 * len(rn2.ranks)


def test_peft_backend_names_the_native_one_when_peft_internals_are_gone(monkeypatch) -> None:
    import peft.tuners.lora.eva

    monkeypatch.delattr(peft.tuners.lora.eva, "SVDHook")
    with pytest.raises(RuntimeError, match=r"backend 'peft' relies on internals .* use eva.backend: native"):
        eva_state_dict(tiny_dt(), make_batches(3), rank=2, max_batches=3, backend="peft")


def test_batch_cap_ends_peft_and_reports_what_did_not_converge() -> None:
    model = tiny_dt()
    batches = make_batches(3)
    for backend in ("native", "peft"):
        _, report = eva_state_dict(model, batches, rank=4, tau=1.0, max_batches=3, backend=backend)
        assert report.batches_total == 3
        assert report.not_converged  # tau = 1 is never met
        assert "not converged" in report.summary()


def test_bad_input_is_reported_before_any_work() -> None:
    model = tiny_dt()
    with pytest.raises(ValueError, match="only 16 wide"):
        eva_state_dict(model, make_batches(2), rank=12, rho=2.0)
    with pytest.raises(ValueError, match="selected tokens"):
        eva_state_dict(model, make_batches(2, batch=1, context=2), rank=8, tokens=("return",))
    with pytest.raises(ValueError, match="matches no"):
        eva_state_dict(model, make_batches(2), target_modules=("q_proj",))
    with pytest.raises(ValueError, match="backend"):
        eva_state_dict(model, make_batches(2), backend="sklearn")
    with pytest.raises(ValueError, match="only initialise matrices inside the GPT-2 blocks"):
        eva_state_dict(model, make_batches(2), target_modules=("c_attn", "embed_state"))  # (B, K) inputs


def test_report_files(tmp_path) -> None:
    _, report = eva_state_dict(tiny_dt(), make_batches(4), rank=2, rho=2.0, max_batches=4)
    report.save(tmp_path)
    data = json.loads((tmp_path / "eva_report.json").read_text())
    assert data["ranks"] == report.ranks and len(data["explained_variance_ratio"]["encoder.h.0.attn.c_attn"]) == 4
    assert (tmp_path / "eva_ranks.png").stat().st_size > 1000


def _distributed_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        batches = make_batches(5, seed=10 + rank, batch=8)
        weights, report = eva_state_dict(tiny_dt(), batches, rank=3, max_batches=5)
        torch.save({"weights": weights, "tokens": report.tokens_seen}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_get_the_same_components(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported modules (spawn would import torch and transformers again)
    mp.start_processes(_distributed_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # one process seeing both ranks' windows in each batch computes the same statistics
    both = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(make_batches(5, seed=10, batch=8),
                                                                    make_batches(5, seed=11, batch=8))]
    single, report = eva_state_dict(tiny_dt(), both, rank=3, max_batches=5)
    for name in single:
        assert torch.equal(r0["weights"][name], r1["weights"][name])
        assert smallest_cosine(r0["weights"][name], single[name]) > 0.9999
    assert r0["tokens"] == report.tokens_seen


def test_a_policy_feeds_eva_the_same_rows_as_its_bare_dt() -> None:
    """The policy runs its own forward through the blocks (trimmed in training); EVA switches it to
    eval mode, where every token must still reach every matrix, exactly as in transformers' DT."""
    from eva_rl.policy import DecisionTransformerPolicy, PolicyConfig, PolicyMetadata

    torch.manual_seed(0)
    config = PolicyConfig.from_preset("tiny", state_dim=STATE, act_dim=ACT, hidden_size=16, n_layer=2, n_head=2,
                                      context_length=6, max_ep_len=64)
    policy = DecisionTransformerPolicy(config, PolicyMetadata(state_mean=[0.0] * STATE, state_std=[1.0] * STATE,
                                                              tasks=("t",), obs_dims=(STATE,), act_dims=(ACT,)))
    policy.train()
    batches = make_batches(4)
    via_policy, report = eva_state_dict(policy, batches, rank=3, max_batches=4)
    via_dt, bare = eva_state_dict(policy.model, batches, rank=3, max_batches=4)
    assert policy.training  # EVA puts the mode back
    assert report.tokens_seen == bare.tokens_seen
    for name in via_dt:
        assert torch.allclose(via_policy[name], via_dt[name], atol=1e-5), name


def test_a_span_of_components_with_equal_variance_converges_though_they_rotate() -> None:
    from eva_rl.adapters.eva import _LayerStatistics

    # two directions of equal variance: each batch picks its own basis of their plane, so single
    # components never settle, while the plane they span (all the adapter's A depends on) does at once
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([3.0, 3.0, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1])
    stats = _LayerStatistics("layer", width=8, components=2, eigh_max_width=64, seed=0, tau=0.99)
    first_cosines = []
    for _ in range(4):
        stats.add(torch.randn(4000, 8, generator=generator) * scale)
        previous = None if stats.previous is None else stats.previous[:, 0].clone()
        stats.solve()
        if previous is not None:
            first_cosines.append(float((stats.vectors[:, 0] * previous).sum().abs()))
    assert stats.subspace_converged(2) and stats.subspace_converged(0)
    assert min(first_cosines) < 0.99  # the first component alone kept rotating in the plane
