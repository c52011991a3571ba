"""One bad token must not poison a router (issue 17, items 12-14): non-finite rows stay out of router statistics,
a later token cannot reach an earlier one in a causal router even as NaN, the layer and the decision refuse NaN, and
the training loop stops on a non-finite loss keeping the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import routelab
from routelab.routing.base import RoutingContext, RoutingDecision
from zoo_cases import CASES, D, IDS, make_ctx, make_routers


def batch_with_a_bad_row(T=24, D=16, bad=7, value=float("nan"), seed=0):
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    poisoned = x.clone()
    poisoned[bad, 3] = value
    return poisoned, torch.cat([x[:bad], x[bad + 1:]])


# -- item 12 ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["random", "first_batch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_kmeans_centroids_ignore_non_finite_tokens(init, value):
    """Reference: the same router fed the batch without the bad row."""
    make = lambda: routelab.create_router("kmeans", d_model=16, num_experts=4, k=2, init=init, momentum=0.5)
    router, reference = make().train(), make().train()
    poisoned, clean = batch_with_a_bad_row(value=value)
    for step in range(3):
        router(poisoned if step == 1 else clean)
        reference(clean)
        routelab.update_routers(router)
        routelab.update_routers(reference)
    assert torch.isfinite(router.centroids).all()
    assert torch.equal(router.centroids, reference.centroids)
    assert int(router.skipped_nonfinite) == 1
    probe = torch.randn(64, 16)
    assert torch.equal(router.eval()(probe).expert_index, reference.eval()(probe).expert_index)


@pytest.mark.parametrize("balance, state", [("loss_free", "expert_bias"), ("bip", "bip_dual")])
@pytest.mark.parametrize("padding", [False, True])
def test_topk_balancing_state_ignores_non_finite_tokens(balance, state, padding):
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=16, num_experts=4, k=2, balance=balance,
                                    bias_update_rate=0.1).train()
    reference = routelab.create_router("topk", d_model=16, num_experts=4, k=2, balance=balance,
                                       bias_update_rate=0.1).train()
    reference.load_state_dict(router.state_dict())
    poisoned, clean = batch_with_a_bad_row(T=24)
    ctx = ref_ctx = None
    if padding:  # a padded position is left out already; the bad row is a real one
        pad = torch.zeros(24, dtype=torch.bool)
        pad[0] = True
        ctx = RoutingContext(padding_mask=pad)
        ref_ctx = RoutingContext(padding_mask=torch.cat([pad[:7], pad[8:]]))
    # the NaN row makes NaN weights, which the decision refuses, after the statistics were gathered: a caller that
    # catches the error and goes on (skipping the batch) must find the balancing state unharmed
    with pytest.raises(FloatingPointError, match="RoutingDecision.weight must be finite, got NaN weights"):
        router(poisoned, ctx)
    reference(clean, ref_ctx)
    routelab.update_routers(router)
    routelab.update_routers(reference)
    assert torch.isfinite(getattr(router, state)).all()
    assert torch.equal(getattr(router, state), getattr(reference, state))
    assert getattr(router, state).abs().sum() > 0  # the update did happen, from the 23 good rows
    assert int(router.skipped_nonfinite) == 1


# -- item 13 ------------------------------------------------------------------------------------------------------------

def test_similarity_a_later_nan_cannot_reach_earlier_tokens():
    torch.manual_seed(0)
    router = routelab.create_router("similarity", d_model=8, num_experts=4, k=2, causal=True)
    L, bad = 10, 5
    x_LD = torch.randn(L, 8)
    x_LD[bad] = float("nan")
    probs_LE = torch.softmax(x_LD @ torch.randn(8, 4), -1)[None]
    real = torch.ones(1, L, dtype=torch.bool)
    mix_LL = router.mixing(x_LD[None], real)
    mixed = router.mix(mix_LL, probs_LE)[0]
    # reference: the prefix alone, where the bad token does not exist
    prefix = router.mix(router.mixing(x_LD[None, :bad], real[:, :bad]), probs_LE[:, :bad])[0]
    assert torch.isfinite(mixed[:bad]).all()
    torch.testing.assert_close(mixed[:bad], prefix, rtol=0, atol=1e-7)
    assert torch.isnan(mixed[bad:]).all()  # the bad token and the ones after it, which do see it


def test_similarity_a_nan_padding_token_changes_no_routing():
    torch.manual_seed(0)
    router = routelab.create_router("similarity", d_model=8, num_experts=4, k=2, causal=True)
    B, L = 2, 10
    x = torch.randn(B, L, 8)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 5] = True
    ctx = RoutingContext(batch_shape=(B, L), padding_mask=pad)
    zeroed = x.clone()
    zeroed[0, 5] = 0.0
    x[0, 5] = float("nan")
    got, want = router(x.reshape(-1, 8), ctx), router(zeroed.reshape(-1, 8), ctx)
    assert torch.equal(got.token_index, want.token_index) and torch.equal(got.expert_index, want.expert_index)
    torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=1e-7)


# -- item 14 ------------------------------------------------------------------------------------------------------------

def test_moe_layer_check_finite_names_the_problem_before_routing():
    layer = routelab.MoELayer(16, 32, routelab.create_router("kmeans", d_model=16, num_experts=4, k=2),
                              check_finite=True).train()
    x = torch.randn(2, 5, 16)
    x[1, 2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"1 non-finite value\(s\) \(NaN/inf\) in a tensor of shape \(2, 5, 16\)"):
        layer(x)
    assert float(layer.router._pending_count.sum()) == 0  # refused before the router saw it
    with pytest.raises(ValueError, match="check_finite must be one of True, False; got 1"):
        routelab.MoELayer(16, 32, routelab.create_router("topk", d_model=16, num_experts=4), check_finite=1)


def test_routing_decision_rejects_nan_negative_weights_and_non_integer_sizes():
    tok, ex = torch.tensor([0, 1]), torch.tensor([1, 0])

    def make(weight=(0.5, 0.5), **kw):
        args = {"token_index": tok, "expert_index": ex, "weight": torch.tensor(weight), "num_tokens": 2,
                "num_experts": 2, **kw}
        return RoutingDecision(**args)

    make()
    with pytest.raises(FloatingPointError, match="got NaN weights"):
        make((0.5, float("nan")))
    with pytest.raises(FloatingPointError, match="got infinite weights"):
        make((float("inf"), 0.5))
    with pytest.raises(ValueError, match="must be >= 0, got negative weights"):
        make((-0.1, 0.5))
    for field, value in (("num_tokens", 2.0), ("num_tokens", True), ("num_experts", torch.tensor(2))):
        with pytest.raises(ValueError, match=f"RoutingDecision.{field} must be an int"):
            make(**{field: value})


def test_training_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import routelab.train.loop as loop
    from routelab.data import Domain, tokenize_domains
    from routelab.models import ModelConfig
    from routelab.train import TrainConfig, train

    text = "".join(f"The cat {i} sat on the mat, and then it slept.\n" for i in range(300))
    data = tokenize_domains([Domain("prose", text, "t")], vocab_size=300, cache=tmp_path / "cache")
    config = ModelConfig(vocab_size=data.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4,
                         max_seq_len=16, router_options={"k": 2, "balance": "loss_free"})
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup=0, eval_every=6, eval_windows=1, eval_batch_size=2,
                      checkpoint_every=2)

    class BlowsUpAtStep4(loop.MoETransformerLM):  # the fault: the loss of the 4th step is NaN
        def forward(self, *args, step=None, **kwargs):
            logits, loss = super().forward(*args, step=step, **kwargs)
            return logits, loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(loop, "MoETransformerLM", BlowsUpAtStep4)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"non-finite values at step 4 \(the training loss is nan\); "
                                                 r"training stopped .*the last good checkpoint, step 2, is in"):
        train(config, cfg, data, out_dir=out, progress=False)
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(out / meta["weights"]).values())


# -- every registered router ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_no_router_keeps_a_non_finite_statistic_or_leaks_a_later_nan(name, options):
    """Checklist item 25 over the whole zoo: a training forward with one NaN token (refused or not), then
    update_routers, leaves every floating buffer finite; and in a causal router a NaN padded token after position
    `cut` changes nothing before it."""
    torch.manual_seed(1)
    (router,) = make_routers(name, options, 1)
    router.train()
    x = torch.randn(2, 6, D)
    x[1, 3, 0] = float("nan")
    try:
        router(x.reshape(-1, D), make_ctx(2, 6).replace(batch_shape=(2, 6)))
    except FloatingPointError:
        pass  # the decision refuses NaN weights; the statistics gathered before must still be clean
    routelab.update_routers(router)
    for key, buf in router.named_buffers():
        if buf.is_floating_point():
            assert torch.isfinite(buf).all(), f"{name}: buffer {key} holds a non-finite value"

    if not router.causal:
        return
    router.eval()
    cut, L = 4, 7
    clean = torch.randn(1, L, D)
    poisoned = clean.clone()
    poisoned[0, cut] = float("nan")
    pad = torch.zeros(1, L, dtype=torch.bool)
    pad[0, cut] = True
    ctx = make_ctx(1, L, padding_mask=pad).replace(batch_shape=(1, L))
    a, b = router(clean.reshape(-1, D), ctx), router(poisoned.reshape(-1, D), ctx)
    keep_a, keep_b = a.token_index < cut, b.token_index < cut
    assert torch.equal(a.expert_index[keep_a], b.expert_index[keep_b]), name
    torch.testing.assert_close(a.weight[keep_a], b.weight[keep_b], rtol=0, atol=1e-7)
