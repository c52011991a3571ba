"""The masked-diffusion LM: its objective against hand computations, every router in it, expert choice's
t-dependent capacity, deterministic sampling, and `compare --preset diffusion` end to end."""

from __future__ import annotations

import math

import pytest
import torch

import routelab
from routelab.cli import main
from routelab.models.diffusion_lm import MaskedDiffusionLM, mask_tokens, nelbo_per_token
from routelab.models.transformer import ModelConfig
from routelab.train.diffusion_lm import bin_by_t
from zoo_cases import CASES

V = 40


def tiny(router="topk", options=None, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, router=router,
               router_options=options or {}, max_seq_len=32)
    cfg.update(kw)
    return MaskedDiffusionLM(ModelConfig(**cfg))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path_factory.getbasetemp() / "routelab-cache"))


def test_nelbo_equals_a_hand_computation():
    # Uniform logits over 2 tokens: every masked token costs log 2. Sequence 0 (t = 1/2) masks one token,
    # sequence 1 (t = 1/4) masks two: (log2 / 0.5 + 2·log2 / 0.25) / 2 sequences / L = 2 tokens = 2.5·log 2.
    logits = torch.zeros(2, 2, 2)
    x0 = torch.tensor([[0, 1], [1, 1]])
    masked = torch.tensor([[True, False], [True, True]])
    t = torch.tensor([0.5, 0.25])
    assert nelbo_per_token(logits, x0, masked, t).item() == pytest.approx(2.5 * math.log(2))
    # Peaked logits: the masked token of sequence 0 is predicted with p = e²/(e² + 1); sequence 1 as before.
    logits[0, 0] = torch.tensor([2.0, 0.0])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) / 0.5 + 2 * math.log(2) / 0.25) / 2 / 2
    assert nelbo_per_token(logits, x0, masked, t).item() == pytest.approx(expected, rel=1e-6)


def test_model_loss_is_the_weighted_masked_cross_entropy_of_its_denoiser():
    model = tiny().eval()
    x0 = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.6, 0.9])
    _, nelbo = model(x0, t=t, generator=torch.Generator().manual_seed(5))
    # The same masks, drawn from the same generator by hand; the loss recomputed with a loop in fp64.
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(5))
    masked = u < t[:, None]
    xt = torch.where(masked, torch.full_like(x0, V), x0)
    logp = model.logits(xt, t).double().log_softmax(-1)
    total = 0.0
    for b in range(3):
        total += sum(-logp[b, i, x0[b, i]].item() for i in range(10) if masked[b, i]) / t[b].item()
    assert nelbo.item() == pytest.approx(total / 3 / 10, rel=1e-5)
    assert masked.any()


def test_at_t_zero_nothing_is_masked_and_the_loss_is_zero():
    x0 = torch.randint(0, V, (4, 12))
    xt, masked = mask_tokens(x0, torch.zeros(4), V)
    assert not masked.any() and torch.equal(xt, x0)
    xt, masked = mask_tokens(x0, torch.ones(4), V)
    assert masked.all() and (xt == V).all()
    _, nelbo = tiny()(x0, t=torch.zeros(4))
    assert nelbo.item() == 0.0
    _, nelbo = tiny()(x0, t=torch.full((4,), 1e-9))  # t → 0: almost surely nothing masked, weight 1e9 times 0
    assert nelbo.item() == 0.0


def _first_case_per_router():
    seen = {}
    for name, options in CASES:
        seen.setdefault(name, options)
    return seen


@pytest.mark.parametrize("name", routelab.list_routers())
def test_every_registered_router_trains_in_the_diffusion_lm(name):
    options = _first_case_per_router()[name]  # tests/zoo_cases.py holds a case for every registered router
    model = tiny(name, options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x0 = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2))
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        loss, nelbo = model(x0, generator=torch.Generator().manual_seed(step), step=step)
        assert math.isfinite(loss.item()) and math.isfinite(nelbo.item()), (name, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        routelab.update_routers(model)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_expert_choice_capacity_at_t_is_its_schedule():
    # k(t) = round(1 + 2t) for the linear schedule with k_min 1, k_max 3: t = 0.1, 0.5, 0.9 → k = 1, 2, 3;
    # each of E = 4 experts takes C = floor(L·k/E) = floor(8k/4) = 2, 4, 6 tokens of each sequence (L = 8).
    model = tiny("expert_choice", dict(gating="post_softmax", schedule="linear", k_min=1, k_max=3)).eval()
    xt = torch.randint(0, V + 1, (3, 8))
    model.logits(xt, torch.tensor([0.1, 0.5, 0.9]))
    for layer in model.moe_layers:
        dec = layer.last_decision
        seq_S = dec.token_index // 8
        for b, capacity in enumerate((2, 4, 6)):
            load = torch.bincount(dec.expert_index[seq_S == b], minlength=4)
            assert load.tolist() == [capacity] * 4
    # the reverse schedule: k = 3, 2, 1
    model = tiny("expert_choice", dict(gating="post_softmax", schedule="linear_reverse", k_min=1, k_max=3)).eval()
    model.logits(xt, torch.tensor([0.1, 0.5, 0.9]))
    dec = model.moe_layers[0].last_decision
    for b, capacity in enumerate((6, 4, 2)):
        assert torch.bincount(dec.expert_index[dec.token_index // 8 == b], minlength=4).tolist() == [capacity] * 4


def test_sampling_is_deterministic_under_a_seed_and_unmasks_everything():
    model = tiny()
    a = model.sample(3, 10, steps=5, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, 10, steps=5, generator=torch.Generator().manual_seed(0))
    c = model.sample(3, 10, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 10) and int(a.max()) < V and int(a.min()) >= 0  # no [MASK] left
    assert model.training  # restored


def test_bad_input_is_refused_with_the_parameter_named():
    model = tiny()
    with pytest.raises(ValueError, match="x0 token ids must lie in"):
        model(torch.full((2, 4), V))
    with pytest.raises(ValueError, match="steps must be an integer"):
        model.sample(1, 4, steps=0)
    with pytest.raises(ValueError, match="one time per sequence"):
        model.logits(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3))


def test_bin_by_t_averages_within_bins():
    t = torch.tensor([0.05, 0.15, 0.5, 0.99])
    v = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert bin_by_t(t, v, bins=2) == [
        {"t_lo": 0.0, "t_hi": 0.5, "mean": 2.0, "count": 2}, {"t_lo": 0.5, "t_hi": 1.0, "mean": 6.0, "count": 2}]


def test_compare_diffusion_preset_reports_flops_by_t_without_a_comparability_flag(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["compare", "--preset", "diffusion", "--routers", "ec-t-linear,expert_choice,topk", "--steps", "2",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    import json

    results = json.loads((out / "results.json").read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert set(by_name) == {"ec-t-linear", "expert_choice", "topk"} and not any("error" in v for v in by_name.values())
    ec_t = [b["flops_vs_topk"] for b in by_name["ec-t-linear"]["flops_by_t"]]
    assert ec_t == sorted(ec_t) and ec_t[0] < 1 < ec_t[-1]  # capacity grows with the mask ratio
    assert all(b["flops_vs_topk"] == pytest.approx(1.0) for b in by_name["topk"]["flops_by_t"])
    report = (out / "report.md").read_text()
    assert "by diffusion time t" in report and "upper bound" in report
    assert "not comparable**" not in report.replace("not comparable with an autoregressive", "")
    assert "⚠" not in report
