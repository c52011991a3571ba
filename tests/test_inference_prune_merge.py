"""prune_experts, merge_experts (MC-SMoE) and calibrate_skipping (MoDES) on small routelab LMs.

References: routing mass and usage counted by hand from each layer's dense weights, a hand frequency-weighted
average, the unpruned layer for tokens whose experts were all kept, and save_model → load_model.
"""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.inference import calibrate_skipping, merge_experts, moe_layers, prune_experts
from routelab.inference.merge import merge_groups
from routelab.models import ModelConfig, MoETransformerLM

E = 6


def _lm(**router_options) -> MoETransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=E,
                      router_options=router_options, max_seq_len=64)
    return MoETransformerLM(cfg).eval()


DATA = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))


def _hand_stats(model):
    """Per layer: (Σ weights per expert, assignments per expert), from dense weights of each forward."""
    mass = [torch.zeros(E, dtype=torch.float64) for _ in model.moe_layers]
    count = [torch.zeros(E, dtype=torch.float64) for _ in model.moe_layers]
    with torch.no_grad():
        for row in DATA.split(4):
            model(row)
            for j, layer in enumerate(model.moe_layers):
                dense = layer.last_decision.dense_weights().double()
                mass[j] += dense.sum(0)
                count[j] += (dense > 0).sum(0)
    return mass, count


def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))


def test_prune_keeps_the_top_mass_experts_and_round_trips(tmp_path):
    model = _lm()
    mass, _ = _hand_stats(model)
    pruned = prune_experts(model, DATA, keep=4)
    assert model.config.num_experts == E and all(l.router.num_experts == E for l in model.moe_layers)  # untouched
    assert pruned.config.num_experts == 4
    for j, (old, new) in enumerate(zip(model.moe_layers, pruned.moe_layers)):
        kept = sorted(torch.argsort(mass[j], descending=True)[:4].tolist())
        assert new.router.num_experts == 4 and new.experts.num_experts == 4
        assert torch.equal(new.router.gate.weight, old.router.gate.weight[kept])
        assert torch.equal(new.experts.w_gate_up, old.experts.w_gate_up[kept])
        assert torch.equal(new.experts.w_down, old.experts.w_down[kept])
        # A token whose experts were all kept is computed as before ("selected" weights ignore other experts).
        x = torch.randn(40, 32)
        with torch.no_grad():
            y_old, y_new = old(x), new(x)
            used = old.last_decision.dense_weights() > 0
        inside = ~used[:, [e for e in range(E) if e not in kept]].any(1)
        assert inside.any() and not inside.all()
        torch.testing.assert_close(y_new[inside], y_old[inside], rtol=1e-5, atol=1e-6)
    routelab.save_model(pruned, _tokenizer(), tmp_path / "pruned")
    loaded, _ = routelab.load_model(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(DATA)[0], pruned(DATA)[0])


def test_merge_groups_by_logit_similarity_and_averages_by_frequency(tmp_path):
    count = torch.tensor([10.0, 1.0, 8.0, 3.0])
    # columns: expert 1 ~ expert 2's direction, expert 3 ~ expert 0's
    z = torch.tensor([[1.0, 0.1, 0.0, 0.9], [0.0, 1.0, 1.0, 0.1], [0.2, 0.0, 0.1, 0.3]], dtype=torch.float64)
    dominant, group = merge_groups(count, z.T @ z, keep=2)
    assert dominant.tolist() == [0, 2] and group.tolist() == [0, 1, 1, 0]

    model = _lm()
    _, counts = _hand_stats(model)
    merged = merge_experts(model, DATA, keep=3)
    assert merged.config.num_experts == 3 and all(l.experts.w_down.shape[0] == 3 for l in merged.moe_layers)
    for j, (old, new) in enumerate(zip(model.moe_layers, merged.moe_layers)):
        stats_dom = sorted(torch.sort(counts[j], descending=True, stable=True).indices[:3].tolist())
        assert torch.equal(new.router.gate.weight, old.router.gate.weight[stats_dom])
        # each merged expert is a frequency-weighted average of some old experts that include its dominant one
        for k, d in enumerate(stats_dom):
            w_new = new.experts.w_down[k].double()
            if torch.equal(w_new, old.experts.w_down[d].double()):
                continue  # a group of one
            members = [e for e in range(E) if e not in stats_dom]
            found = False
            for r in range(1, len(members) + 1):
                import itertools

                for extra in itertools.combinations(members, r):
                    ids = [d, *extra]
                    f = counts[j][ids]
                    avg = (f[:, None, None] * old.experts.w_down[ids].double()).sum(0) / f.sum()
                    found = found or torch.allclose(w_new, avg, atol=1e-6)
            assert found, (j, k)
    routelab.save_model(merged, _tokenizer(), tmp_path / "merged")
    loaded, _ = routelab.load_model(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(loaded(DATA)[0], merged(DATA)[0])


def test_merging_identical_experts_changes_nothing_for_the_tokens_it_keeps():
    model = _lm()
    with torch.no_grad():
        for layer in model.moe_layers:  # experts 4 and 5 are copies of expert 0, their logits half of expert 0's
            for e in (4, 5):
                layer.experts.w_gate_up[e] = layer.experts.w_gate_up[0]
                layer.experts.w_down[e] = layer.experts.w_down[0]
                layer.router.gate.weight[e] = layer.router.gate.weight[0] * 0.5
    _, counts = _hand_stats(model)
    merged = merge_experts(model, DATA, keep=4)
    for j, (old, new) in enumerate(zip(model.moe_layers, merged.moe_layers)):
        # precondition of this case: 0-3 dominate; 4 and 5 (logit columns parallel to 0's) join expert 0
        assert sorted(torch.sort(counts[j], descending=True, stable=True).indices[:4].tolist()) == [0, 1, 2, 3]
        assert torch.equal(new.router.gate.weight, old.router.gate.weight[:4])
        for name in ("w_gate_up", "w_down"):  # a frequency-weighted average of identical tensors is that tensor
            torch.testing.assert_close(getattr(new.experts, name), getattr(old.experts, name)[:4], rtol=0, atol=1e-7)
        x = torch.randn(60, 32)
        with torch.no_grad():
            y_old, y_new = old(x), new(x)
            used = old.last_decision.dense_weights() > 0
        untouched = ~used[:, 4:].any(1)  # tokens that did not use a merged-away copy
        assert untouched.any()
        torch.testing.assert_close(y_new[untouched], y_old[untouched], rtol=1e-5, atol=1e-6)


def test_calibrate_skipping_skips_the_requested_fraction():
    model = _lm(normalize="none")
    with torch.no_grad():
        model(DATA)
        before = sum(l.last_decision.num_assignments for l in model.moe_layers)
        weights = [l.last_decision.weight.clone() for l in model.moe_layers]
        handle = calibrate_skipping(model, DATA, 0.3)
        model(DATA)
        after = [l.last_decision.num_assignments for l in model.moe_layers]
    info = handle.info
    assert handle.active and handle.options[0].renormalize is False
    assert info["calibration_skip"] == pytest.approx(0.3, abs=1 / before)
    # the rule, by hand, on the first layer (later layers see inputs changed by the skipping below them)
    assert after[0] == int((info["importance"][0] * weights[0] >= info["threshold"]).sum())
    assert 1 - sum(after) / before == pytest.approx(0.3, abs=0.05)
    assert all(v > 0 for v in info["importance"]) and sum(info["importance"]) == pytest.approx(len(weights))
    handle.remove()
    with torch.no_grad():
        model(DATA)
    assert sum(l.last_decision.num_assignments for l in model.moe_layers) == before


def test_bad_input():
    model = _lm()
    for bad in (0, E, 7, 2.5):
        with pytest.raises(ValueError, match=r"keep must be an integer in \[1, 5\]"):
            prune_experts(model, DATA, keep=bad)
    with pytest.raises(ValueError, match="below layer 0's router k=2"):
        merge_experts(model, DATA, keep=1)
    with pytest.raises(ValueError, match="target_skip"):
        calibrate_skipping(model, DATA, 1.0)
    with pytest.raises(ValueError, match="data must be token ids"):
        prune_experts(model, DATA.float(), keep=3)
    with pytest.raises(ValueError, match="no MoE layers"):
        prune_experts(torch.nn.Linear(2, 2), DATA, keep=1)
    assert len(moe_layers(model)) == 2
    torch.manual_seed(0)
    ec = MoETransformerLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=32, num_experts=E,
                                      router="expert_choice"))
    for call in (lambda: calibrate_skipping(ec, DATA, 0.2), lambda: prune_experts(ec, DATA, keep=3)):
        with pytest.raises(ValueError, match="ExpertChoiceRouter"):
            call()
