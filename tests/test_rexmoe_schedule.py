"""ReXMoE's progressive scaling routing (model.reuse_schedule): the candidate pool per step against the paper's
formula computed by hand, the layer against the plain per-layer layer and a hand-masked top-k (fp64, outputs and
gradients), the model after the schedule against unscheduled ReXMoE, the training loop's steps, config errors and
a save/load round trip."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from reference import reference_moe, reference_topk

import routelab
from routelab.data import Domain, tokenize_domains
from routelab.experts.reused import ProgressiveScaling, ReusedExperts
from routelab.experts.swiglu import SwiGLUExperts
from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing.base import RoutingContext

D, F_, N = 8, 6, 4  # model width, expert width, experts per layer (the layer's own bank)


def paper_pool_size(t: int, *, t_s: int, t_e: int, r: int, n: int) -> int:
    """The paper's Eq. 6, in exact fractions."""
    if t <= t_s:
        return n
    if t > t_e:
        return r * n
    return math.floor((1 + Fraction((r - 1) * (t - t_s), t_e - t_s)) * n)


def test_pool_size_and_available_candidates_follow_the_paper_s_schedule():
    sched = ProgressiveScaling(start=10, end=30, num_candidates=24, own=(8, 16), layer=1)
    by_hand = {0: 8, 10: 8, 11: 8, 12: 9, 15: 12, 20: 16, 29: 23, 30: 24, 31: 24, 500: 24}  # ⌊8 + 16·(t−10)/20⌋
    for t, want in by_hand.items():
        assert sched.pool_size(t) == want == paper_pool_size(t, t_s=10, t_e=30, r=3, n=8), t
    own = torch.zeros(24, dtype=torch.bool)
    own[8:16] = True
    masks = {}
    for t in range(30):
        mask = sched.available(t)
        assert mask.dtype == torch.bool and mask.shape == (24,)
        assert int(mask.sum()) == paper_pool_size(t, t_s=10, t_e=30, r=3, n=8)
        assert bool(mask[own].all())  # the layer's own experts are always candidates
        masks[t] = mask
    assert torch.equal(masks[5], own)
    assert sched.available(30) is None and sched.available(31) is None  # the whole window: nothing masked
    assert torch.equal(sched.available(20), masks[20])  # a fixed function of the step (resume, ranks)
    assert len({tuple(masks[t].tolist()) for t in range(12, 29)}) > 10  # the neighbours are redrawn every step
    other_layer = ProgressiveScaling(start=10, end=30, num_candidates=24, own=(8, 16), layer=2)
    assert any(not torch.equal(other_layer.available(t), masks[t]) for t in range(12, 29))


def _banks(seed: int) -> list[SwiGLUExperts]:
    torch.manual_seed(seed)
    banks = [SwiGLUExperts(N, D, F_).double() for _ in range(3)]
    for b in banks:  # not the tiny default init: distinct, well-separated experts
        torch.nn.init.normal_(b.w_gate_up, std=0.5)
        torch.nn.init.normal_(b.w_down, std=0.5)
    return banks


def _scheduled_layer(seed: int = 0, **router_options) -> routelab.MoELayer:
    banks = _banks(seed)
    router = routelab.create_router("topk", d_model=D, num_experts=3 * N, **router_options).double()
    sched = ProgressiveScaling(start=4, end=12, num_candidates=3 * N, own=(N, 2 * N))
    return routelab.MoELayer(D, F_, router, experts=ReusedExperts(banks, own=1), candidate_schedule=sched)


def test_with_only_its_own_bank_available_the_layer_is_the_plain_per_layer_layer():
    rex = _scheduled_layer(k=2, z_loss_coef=1e-2).train()
    own = rex.experts.banks[1]
    plain_router = routelab.create_router("topk", d_model=D, num_experts=N, k=2, z_loss_coef=1e-2).double()
    with torch.no_grad():
        plain_router.gate.weight.copy_(rex.router.gate.weight[N:2 * N])
    plain_bank = SwiGLUExperts(N, D, F_).double()
    plain_bank.load_state_dict(own.state_dict())
    plain = routelab.MoELayer(D, F_, plain_router, experts=plain_bank).train()

    x = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y_rex = rex(x, RoutingContext(step=4))  # t ≤ t_s: the pool is the own bank
    y_plain = plain(x)
    torch.testing.assert_close(y_rex, y_plain, rtol=0, atol=1e-12)
    assert set(rex.last_decision.aux_losses) == {"aux", "z"}
    for key in ("aux", "z"):  # the balance and z losses are those of the plain layer's N experts
        torch.testing.assert_close(rex.last_decision.aux_losses[key], plain.last_decision.aux_losses[key])
    assert torch.equal(rex.last_decision.expert_index - N, plain.last_decision.expert_index)

    def loss(y, layer):
        return (y * g).sum() + sum(layer.last_decision.aux_losses.values())

    got = torch.autograd.grad(loss(y_rex, rex), [x, rex.router.gate.weight, own.w_gate_up, own.w_down])
    want = torch.autograd.grad(loss(y_plain, plain), [x, plain_router.gate.weight, plain_bank.w_gate_up,
                                                      plain_bank.w_down])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][N:2 * N], want[1])
    assert got[1][:N].abs().max() == 0 and got[1][2 * N:].abs().max() == 0  # unavailable rows learn nothing
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])


def test_mid_schedule_the_decision_is_a_hand_masked_top_k_outputs_and_gradients():
    rex = _scheduled_layer(seed=3, k=2).train()
    step = 8  # N_t = 4 + 8·4/8 = 8 of 12
    available = rex.candidate_schedule.available(step)
    assert int(available.sum()) == 8
    idx = available.nonzero().flatten().tolist()
    x = torch.randn(11, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = rex(x, RoutingContext(step=step))
    w_gu = torch.cat([b.w_gate_up for b in rex.experts.banks])
    w_dn = torch.cat([b.w_down for b in rex.experts.banks])
    gate = rex.router.gate.weight
    # by hand: a softmax top-2 over the available rows of the gate only, mapped back to candidate ids
    local = reference_topk(x, gate[idx], k=2, normalize="selected")
    hand = [(t, idx[e], w) for t, e, w in local]
    ref = reference_moe(x, hand, w_gu, w_dn)
    torch.testing.assert_close(y, ref)
    got_pairs = sorted(zip(rex.last_decision.token_index.tolist(), rex.last_decision.expert_index.tolist()))
    assert got_pairs == sorted((t, e) for t, e, _ in hand)
    unmasked = {(t, e) for t, e, _ in reference_topk(x, gate, k=2, normalize="selected")}
    assert unmasked != set(got_pairs)  # the mask decided something here
    params = [x, gate, *[b.w_gate_up for b in rex.experts.banks], *[b.w_down for b in rex.experts.banks]]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def _tiny(**kw) -> MoETransformerLM:
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=16, n_layers=3, n_heads=2, d_ff=12, num_experts=4, expert_pool="rexmoe",
                reuse_window=1)
    return MoETransformerLM(ModelConfig(**{**base, **kw})).double()


def test_after_the_schedule_and_in_eval_mode_the_model_is_unscheduled_rexmoe():
    scheduled = _tiny(reuse_schedule={"start": 2, "end": 6})
    plain = _tiny()
    plain.load_state_dict(scheduled.state_dict())  # the schedule adds no parameters or buffers
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    loss_s, loss_p = scheduled(ids, ids, step=7)[1], plain(ids, ids, step=7)[1]
    torch.testing.assert_close(loss_s, loss_p, rtol=0, atol=0)
    loss_s.backward()
    loss_p.backward()
    for (name, a), b in zip(scheduled.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    mid_train = scheduled(ids, ids, step=3)[1]  # while training mid-schedule it differs ...
    assert not torch.equal(mid_train, loss_p)
    scheduled.eval()
    plain.eval()
    with torch.no_grad():  # ... but eval-mode forwards route over the whole window, at any step
        torch.testing.assert_close(scheduled(ids, ids, step=3)[1], plain(ids, ids, step=3)[1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    text = "".join(f"The cat {i} sat on the mat, and then it slept.\n" for i in range(300))
    return tokenize_domains([Domain("prose", text, "t")], vocab_size=300, cache=tmp_path_factory.mktemp("cache"))


def test_the_training_loop_passes_its_step_and_evaluates_over_the_whole_window(data, tmp_path, monkeypatch):
    from routelab.train import TrainConfig, train

    seen: list[tuple[bool, int | None]] = []

    def record(router, args):
        available = args[1].available
        seen.append((router.training, None if available is None else int(available.sum())))

    mc = ModelConfig(vocab_size=data.vocab_size, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4,
                     max_seq_len=16, expert_pool="rexmoe", reuse_window=1, reuse_schedule={"start": 1, "end": 3})
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup=0, eval_every=4, eval_windows=1, eval_batch_size=2,
                      seed=1)
    original = MoETransformerLM.__init__

    def hooked(self, config):
        original(self, config)
        for layer in self.moe_layers:
            layer.router.register_forward_pre_hook(record)

    monkeypatch.setattr(MoETransformerLM, "__init__", hooked)
    result = train(mc, cfg, data, progress=False)
    monkeypatch.undo()
    training = [n for is_training, n in seen if is_training]
    # two layers (8 candidates, 4 own) per step; steps 0..3: ⌊4 + 4·(t−1)/2⌋ = 4, 4, 6, then all (no mask)
    assert training == [4, 4, 4, 4, 6, 6, None, None]
    assert all(n is None for is_training, n in seen if not is_training) and len(seen) > len(training)
    folder = routelab.save_model(result.model, data.tokenizer, tmp_path / "m")
    loaded, _ = routelab.load_model(folder)
    assert loaded.config.reuse_schedule == {"start": 1, "end": 3} and loaded.config == result.model.config
    assert all(layer.candidate_schedule.own == (0, 4) for layer in loaded.moe_layers[:1])
    ids = torch.randint(0, data.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids)[0], result.model.eval()(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("changes, message", [
    (dict(reuse_schedule=[10, 20]), r"model.reuse_schedule must be null or a mapping \{start, end\}"),
    (dict(reuse_schedule={"start": 1, "stop": 5}), "model.reuse_schedule has no field.s. stop; valid: start, end"),
    (dict(reuse_schedule={"start": 1}), "model.reuse_schedule needs both 'start' and 'end'"),
    (dict(reuse_schedule={"start": -1, "end": 5}), "model.reuse_schedule.start must be an integer >= 0"),
    (dict(reuse_schedule={"start": 5, "end": 5}), "model.reuse_schedule.end must be an integer > start=5"),
    (dict(reuse_schedule={"start": 0, "end": 5}, reuse_window=0),
     "model.reuse_schedule needs model.expert_pool: rexmoe with reuse_window >= 1"),
    (dict(reuse_schedule={"start": 0, "end": 5}, expert_pool="per_layer", reuse_window=0),
     "model.reuse_schedule needs model.expert_pool: rexmoe"),
])
def test_bad_schedules_fail_with_one_line_naming_the_field(changes, message):
    base = dict(expert_pool="rexmoe", reuse_window=1)
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig(**{**base, **changes}).validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("router, options, message", [
    ("expert_choice", {}, "router 'expert_choice' cannot restrict its choice"),
    ("topk", {"balance": "loss_free"}, "only with balance='none' and no n_group"),
    ("topk", {"k": 5}, "k=5 needs at least k available experts, but only 4 are"),
])
def test_routers_that_cannot_follow_the_schedule_are_refused_when_the_model_is_built(router, options, message):
    with pytest.raises(ValueError, match=message) as err:
        _tiny(router=router, router_options=options, reuse_schedule={"start": 0, "end": 5})
    assert "model.reuse_schedule" in str(err.value) and "\n" not in str(err.value)


def test_a_training_forward_without_a_step_is_refused():
    model = _tiny(reuse_schedule={"start": 0, "end": 5}).train()
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(ValueError, match="needs the training step"):
        model(ids, ids)
    with pytest.raises(ValueError, match="RoutingContext.available was given, but router 'expert_choice'"):
        layer = routelab.MoELayer(D, F_, routelab.create_router("expert_choice", d_model=D, num_experts=N))
        layer(torch.randn(5, D), RoutingContext(available=torch.ones(N, dtype=torch.bool)))


def test_every_chain_of_experts_iteration_follows_the_schedule():
    model = _tiny(chain_iterations=2, reuse_schedule={"start": 3, "end": 9}).train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    model(ids, ids, step=3)
    for layer, own in zip(model.moe_layers, [(0, 4), (4, 8), (8, 12)]):
        experts = layer.last_decision.expert_index  # both iterations' assignments
        assert experts.numel() == 2 * 14 * 2 and bool(((experts >= own[0]) & (experts < own[1])).all())
    model(ids, ids, step=10)
    assert any(bool(((layer.last_decision.expert_index < 4 * j) | (layer.last_decision.expert_index >= 4 * j + 4))
                    .any()) for j, layer in enumerate(model.moe_layers))


@pytest.mark.parametrize("options", [
    dict(k=2),
    dict(k=2, score="sigmoid"),
    dict(k=1, capacity_factor=1.0),
    dict(k=3, capacity_factor=1.0, drop_policy="position"),
    dict(k=2, aux_loss_form="per_slot", z_loss_coef=1e-2, router_bias=True),
], ids=["softmax", "sigmoid", "capacity", "capacity-position", "per-slot-z-bias"])
def test_topk_restricted_to_available_experts_equals_a_router_over_those_experts_only(options):
    torch.manual_seed(6)
    full = routelab.create_router("topk", d_model=D, num_experts=12, **options).double().train()
    idx = [0, 2, 3, 7, 9, 11]
    small = routelab.create_router("topk", d_model=D, num_experts=len(idx), **options).double().train()
    with torch.no_grad():
        small.gate.weight.copy_(full.gate.weight[idx])
        if full.gate.bias is not None:
            full.gate.bias.normal_()
            small.gate.bias.copy_(full.gate.bias[idx])
    available = torch.zeros(12, dtype=torch.bool)
    available[idx] = True
    x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got, want = full(x, RoutingContext(available=available)), small(x)
    as_full = torch.tensor(idx)[want.expert_index]
    assert torch.equal(got.token_index, want.token_index) and torch.equal(got.expert_index, as_full)
    torch.testing.assert_close(got.weight, want.weight)
    assert got.num_dropped == want.num_dropped and set(got.aux_losses) == set(want.aux_losses)
    assert ("capacity_factor" in options) == (got.num_dropped > 0)  # capacity counts the 6 available, not 12
    for key in want.aux_losses:
        torch.testing.assert_close(got.aux_losses[key], want.aux_losses[key])
    g_full = torch.autograd.grad(got.weight.sum() + sum(got.aux_losses.values()), full.gate.weight)[0]
    g_small = torch.autograd.grad(want.weight.sum() + sum(want.aux_losses.values()), small.gate.weight)[0]
    torch.testing.assert_close(g_full[idx], g_small)
    assert g_full[~available].abs().max() == 0
