"""Mixture-of-Depths (layers/depth.py) in MoETransformerLM, against independent references: token counts from
⌈capacity·L⌉ in exact arithmetic, an fp64 hand loop per sequence (select, run a plain block on the subsequence at
its original positions, add the router-weighted update), the plain model at capacity 1, a full recompute for
decoding, a hand FLOPs count; and its configuration errors."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from reference import reference_moe, reference_topk
from zoo_cases import CASES, IDS, make_ctx, make_layer

import routelab
from routelab.models.decoding import generate
from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing.registry import router_class
from routelab.train.loop import evaluate

BASE = {"vocab_size": 40, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 12, "num_experts": 4,
        "router_options": {"k": 2}}


def _model(seed: int = 0, **kw) -> MoETransformerLM:
    """A small fp64 MoD model whose predictors choose some tokens and not others, as trained ones do (at
    initialisation the predictor's bias decides alone: every token or none)."""
    torch.manual_seed(seed)
    model = MoETransformerLM(ModelConfig(**{**BASE, "mod_capacity": 0.3, **kw})).double()
    with torch.no_grad():
        for block in model.blocks:
            if block.mod is not None:
                block.mod.predictor[0].bias.zero_()
                block.mod.predictor[2].bias.zero_()
                block.mod.predictor[0].weight.mul_(20)
    return model


def _ids(B: int, L: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (B, L), generator=torch.Generator().manual_seed(seed))


def _grab(store, key):
    """A forward pre-hook keeping the first input it sees under `key` (returning None: the input is unchanged)."""
    def hook(module, args):
        store.setdefault(key, args[0])
    return hook


# --- the fp64 hand reference: one sequence at a time, loops over queries and heads -------------------------------

def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(t_LHK, pos_L, model):
    c, s = model.rope_cos[pos_L][:, None], model.rope_sin[pos_L][:, None]  # the model's table, at these positions
    out = torch.empty_like(t_LHK)
    out[..., 0::2] = t_LHK[..., 0::2] * c - t_LHK[..., 1::2] * s
    out[..., 1::2] = t_LHK[..., 0::2] * s + t_LHK[..., 1::2] * c
    return out


def _ref_attention(model, attn, x_LD, pos_L):
    """Causal attention of the rows of x among themselves (row order = causal order), at rotary positions pos_L."""
    L, D = x_LD.shape
    H = attn.n_heads
    Dh = D // H
    q, k, v = (x_LD @ attn.qkv.weight.T).view(L, 3, H, Dh).unbind(1)
    q, k = _rope(q, pos_L, model), _rope(k, pos_L, model)
    rows = []
    for i in range(L):
        heads = []
        for h in range(H):
            scores = torch.stack([q[i, h] @ k[j, h] for j in range(i + 1)]) / math.sqrt(Dh)
            p = torch.softmax(scores, 0)
            heads.append(sum(p[j] * v[j, h] for j in range(i + 1)))
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ attn.proj.weight.T


def _ref_block(model, block, x_LD, pos_L):
    x = x_LD + _ref_attention(model, block.attn, _rms(x_LD, block.attn_norm.weight), pos_L)
    h = _rms(x, block.ffn_norm.weight)
    if isinstance(block.ffn, routelab.MoELayer):
        layer = block.ffn
        chosen = reference_topk(h, layer.router.gate.weight, k=2, normalize="selected")
        return x + reference_moe(h, chosen, layer.experts.w_gate_up, layer.experts.w_down)
    gate, up = (h @ block.ffn.gate_up.weight.T).chunk(2, -1)
    return x + (F.silu(gate) * up) @ block.ffn.down.weight.T


def _ref_predictor(mod, x_LD):
    first, _, last = mod.predictor
    return (F.silu(x_LD @ first.weight.T + first.bias) @ last.weight.T + last.bias).squeeze(-1)


def _ref_forward(model, ids_BL, *, mode):
    """Logits [B, L, V] and each routed block's predictor BCE (training); mode "train": top-C of r, "eval": the
    predictor's choice."""
    cap = Fraction(str(model.config.mod_capacity))
    out, bce = [], {}
    for ids_L in ids_BL:
        L = len(ids_L)
        x = model.embed.weight[ids_L]
        for i, block in enumerate(model.blocks):
            if block.mod is None:
                x = _ref_block(model, block, x, torch.arange(L))
                continue
            r = x @ block.mod.router.weight[0]
            pred = _ref_predictor(block.mod, x.detach())
            if mode == "train":
                C = math.ceil(cap * L)
                idx = sorted(sorted(range(L), key=lambda t: -r[t].item())[:C])
                member = torch.zeros(L, dtype=x.dtype)
                member[idx] = 1
                bce.setdefault(i, []).append(-(member * F.logsigmoid(pred) + (1 - member) * F.logsigmoid(-pred)))
            else:
                idx = [t for t in range(L) if pred[t] > 0]
            if idx:
                pos = torch.tensor(idx)
                sub = x[pos]
                update = torch.sigmoid(r[pos])[:, None] * (_ref_block(model, block, sub, pos) - sub)
                x = x.index_add(0, pos, update)
        out.append(_rms(x, model.final_norm.weight) @ model.embed.weight.T)
    return torch.stack(out), {i: torch.cat(terms).mean() for i, terms in bce.items()}


# --- training: exactly C tokens, the hand loop, gradients ----------------------------------------------------------

@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5, 1.0])
def test_training_processes_exactly_ceil_capacity_times_L_tokens_per_sequence(capacity):
    model = _model(mod_capacity=capacity, n_layers=3, mod_every=1).train()  # every block routed
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    for L in (1, 3, 7, 8, 10, 13):
        seen.clear()
        model(_ids(3, L))
        C = max(1, math.ceil(Fraction(str(capacity)) * L))  # exact arithmetic: 0.3 · 10 is 3, not 3.0000000000000004
        assert seen == [torch.Size([3, C])] * 3, (L, seen)
        assert [layer.last_decision.num_tokens for layer in model.moe_layers] == [3 * C] * 3
        assert [b.mod.last_processed for b in model.blocks] == [3 * C] * 3


@pytest.mark.parametrize("layout", [{}, {"moe_every": 2, "mod_every": 1}], ids=["moe-routed", "dense-and-moe-routed"])
def test_training_forward_equals_the_fp64_hand_loop_and_gradients_reach_the_router(layout):
    model = _model(mod_capacity=0.3, **layout).train()
    ids = _ids(2, 7)
    logits, _ = model(ids)
    aux = model.blocks[1].mod.last_aux_losses["mod_predictor"]
    ref, ref_bce = _ref_forward(model, ids, mode="train")
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)
    assert set(ref_bce) == set(model.config.mod_block_indices())
    for i, want_bce in ref_bce.items():
        torch.testing.assert_close(model.blocks[i].mod.last_aux_losses["mod_predictor"], want_bce, rtol=1e-10,
                                   atol=1e-12)
    params = [p for p in model.parameters()]
    g = torch.randn_like(logits)
    got = torch.autograd.grad(logits, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, got, want):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    for i in model.config.mod_block_indices():
        router_grad = got[names.index(f"blocks.{i}.mod.router.weight")]
        assert router_grad is not None and router_grad.abs().max() > 0
    # the predictor learns from its own loss only, and that loss sends nothing back into the model
    pred_grads = torch.autograd.grad(aux, params, allow_unused=True)
    for name, g_ in zip(names, pred_grads):
        assert (g_ is not None and g_.abs().max() > 0) == name.startswith("blocks.1.mod.predictor"), name


def test_capacity_one_is_the_plain_block_scaled_by_the_router_weight():
    mod_model = _model(mod_capacity=1.0)
    plain = MoETransformerLM(ModelConfig(**BASE)).double()
    missing, unexpected = plain.load_state_dict(mod_model.state_dict(), strict=False)
    assert not missing and all(k.startswith("blocks.1.mod.") for k in unexpected)
    ids = _ids(2, 9)
    caught = {}
    plain.blocks[1].attn_norm.register_forward_pre_hook(_grab(caught, "x"))
    plain.final_norm.register_forward_pre_hook(_grab(caught, "y"))
    plain(ids)
    x, y = caught["x"], caught["y"]
    mixed = x + torch.sigmoid(x @ mod_model.blocks[1].mod.router.weight[0])[..., None] * (y - x)
    want = F.linear(plain.final_norm(mixed), plain.embed.weight)
    torch.testing.assert_close(mod_model.train()(ids)[0], want, rtol=1e-12, atol=1e-12)
    # eval mode with a predictor that selects every token: the masked path is the same block
    with torch.no_grad():
        mod_model.blocks[1].mod.predictor[2].bias.fill_(1e3)
    torch.testing.assert_close(mod_model.eval()(ids)[0], want, rtol=1e-12, atol=1e-12)


# --- eval mode and decoding: the causal predictor ------------------------------------------------------------------

def _selection(model, ids):
    """BoolTensor [B, L]: the tokens block 1 processes in an eval forward (read from its input, by hand)."""
    got = {}
    hook = model.blocks[1].mod.register_forward_pre_hook(_grab(got, "x"))
    model(ids)
    hook.remove()
    return _ref_predictor(model.blocks[1].mod, got["x"]) > 0


def test_eval_forward_equals_the_hand_loop_over_the_predictors_choice():
    model = _model().eval()
    ids = _ids(2, 9)
    chosen = _selection(model, ids)
    assert 0 < int(chosen.sum()) < chosen.numel()  # some tokens skip, some run: the test is not vacuous
    logits, _ = model(ids)
    assert model.blocks[1].mod.last_processed == int(chosen.sum())
    ref, _ = _ref_forward(model, ids, mode="eval")
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)


def test_eval_selection_and_logits_of_a_token_do_not_depend_on_later_tokens():
    model = _model().eval()
    a = _ids(1, 12, seed=3)
    b = a.clone()
    b[0, 6:] = _ids(1, 6, seed=4)[0]
    sel_a, sel_b = _selection(model, a), _selection(model, b)
    assert torch.equal(sel_a[:, :6], sel_b[:, :6])
    torch.testing.assert_close(model(a)[0][:, :6], model(b)[0][:, :6], rtol=0, atol=1e-13)


def test_decoding_with_the_cache_equals_a_full_recompute_and_batched_left_padded_prompts_equal_each_alone():
    model = _model(n_layers=3, mod_every=1).eval()  # blocks 0, 1, 2 routed (block 0 too)
    prompts = [_ids(1, n, seed=10 + n)[0].tolist() for n in (5, 2, 8)]
    batched = generate(model, prompts, max_new_tokens=6, keep_logits=True)
    processed = tokens = 0
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=6, keep_logits=True)
        assert alone.tokens[0] == batched.tokens[b]
        torch.testing.assert_close(batched.logits[b], alone.logits[0], rtol=1e-10, atol=1e-10)
        seq = prompt + alone.tokens[0]
        for n in range(6):  # step n chose from the logits after prompt + the first n new tokens
            full, _ = model(torch.tensor([seq[: len(prompt) + n]]))
            torch.testing.assert_close(alone.logits[0, n], full[0, -1].float(), rtol=1e-6, atol=1e-6)
            assert int(full[0, -1].argmax()) == alone.tokens[0][n]
        model(torch.tensor([seq]))
        processed += sum(block.mod.last_processed for block in model.blocks)
        tokens += sum(block.mod.last_tokens for block in model.blocks)
    assert 0 < processed < tokens  # blocks were skipped by some tokens and run by others


@pytest.mark.parametrize("router", [{}, {"router": "similarity", "router_options": {"k": 2}}], ids=["topk", "similarity"])
def test_decoding_logits_match_in_fp64_step_by_step(router):
    """The cache path in fp64, logits kept as the model computes them (generate hands back fp32); the similarity
    router reads earlier tokens from its RouterCache, where tokens that skipped its block are padding."""
    model = _model(n_layers=3, mod_every=1, **router).eval()
    ids = _ids(2, 10, seed=7)
    full, _ = model(ids)
    cache = model.new_cache(2, 10)
    steps = [model(ids[:, :4], cache=cache)[0]] + [model(ids[:, t : t + 1], cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
    assert set(cache.processed) == {0, 1, 2}
    assert model.blocks[1].mod.last_agreement is None  # top-C over a sequence is not defined one token at a time
    assert 0 < int(cache.processed[1].sum()) < 20


# --- save / load, accounting, errors ----------------------------------------------------------------------------

def test_save_load_round_trip_gives_bit_identical_logits(tmp_path):
    import json

    from routelab.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "The quick brown fox.\n" * 20], vocab_size=300)
    model = _model(vocab_size=300, mod_every=1).float().eval()
    routelab.save_model(model, tok, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert saved["mod_capacity"] == 0.3 and saved["mod_every"] == 1
    loaded, _ = routelab.load_model(tmp_path / "m")
    ids = _ids(2, 11)
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    plain = ModelConfig(**BASE).to_dict()
    assert "mod_capacity" not in plain and "mod_every" not in plain  # older folders' config.json is unchanged


def test_flops_columns_equal_a_hand_count():
    from routelab.compare.runner import block_flops_fields

    D, dff, dense, shared = 16, 12, 20, 1
    model = _model(n_layers=2, moe_every=2, dense_d_ff=dense, shared_experts=shared).eval()  # block 1: MoE, routed
    ids = _ids(4, 9)
    chosen = _selection(model, ids)
    p = chosen.double().mean().item()
    assert 0 < p < 1
    final = evaluate(model, [("all", ids, ids)], batch_size=4, stats=True)
    # per token: block 0 (dense, every token): 4·D² + 3·D·dense; block 1 for the fraction p: 4·D² + 2 experts + shared
    hand = 2 * (4 * D * D + 3 * D * dense + p * (4 * D * D + 2 * 3 * D * dff + 3 * D * shared * dff))
    reference = 2 * (4 * D * D + 3 * D * dense + 4 * D * D + 2 * 3 * D * dff + 3 * D * shared * dff)
    assert final["processed_fraction_by_block"] == pytest.approx([1.0, p])
    # the predictor's agreement with top-C membership (C = ⌈0.3 · 9⌉ = 3 of each row), counted by hand
    got = {}
    hook = model.blocks[1].mod.register_forward_pre_hook(_grab(got, "x"))
    model(ids)
    hook.remove()
    r = (got["x"] @ model.blocks[1].mod.router.weight[0]).tolist()
    member = torch.tensor([[t in sorted(range(9), key=lambda u: -row[u])[:3] for t in range(9)] for row in r])
    assert final["mod_predictor_accuracy"] == pytest.approx([(member == chosen).double().mean().item()])
    assert final["active_expert_flops_by_layer"] == pytest.approx([2 * p])  # skipped tokens spend no expert
    assert final["block_flops_per_token"] == pytest.approx(hand)
    fields = block_flops_fields(final, model.config, 2)
    assert fields["active_block_flops_vs_topk"] == pytest.approx(hand / reference)


def test_flops_of_a_model_without_mod_count_every_block():
    from routelab.compare.runner import block_flops_fields

    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig(**{**BASE, "router": "topk", "router_options": {"k": 1}})).eval()
    final = evaluate(model, [("all", _ids(2, 8), _ids(2, 8))], batch_size=2, stats=True)
    D, dff = 16, 12
    hand = 2 * 2 * (4 * D * D + 1 * 3 * D * dff)
    assert final["block_flops_per_token"] == pytest.approx(hand)
    ratio = block_flops_fields(final, model.config, 2)["active_block_flops_vs_topk"]
    assert ratio == pytest.approx(hand / (2 * 2 * (4 * D * D + 2 * 3 * D * dff)))


@pytest.mark.parametrize("fields,needle", [
    ({"mod_capacity": 0}, "model.mod_capacity must be null"),
    ({"mod_capacity": 1.5}, "model.mod_capacity must be null"),
    ({"mod_capacity": "half"}, "model.mod_capacity must be null"),
    ({"mod_capacity": True}, "model.mod_capacity must be null"),
    ({"mod_capacity": 0.5, "mod_every": 0}, "model.mod_every must be a positive integer"),
    ({"mod_every": 1.5}, "model.mod_every must be a positive integer"),
    ({"mod_capacity": 0.5, "mod_every": 3}, "model.mod_every must be an integer from 1 to n_layers=2"),
    ({"mod_every": 1}, "model.mod_every=1 needs model.mod_capacity"),
    ({"mod_capacity": 0.5, "router": "recurrent", "router_options": {}}, "cannot combine with router 'recurrent'"),
    ({"mod_capacity": 0.5, "router": "pregate"}, "cannot combine with router 'pregate'"),
])
def test_bad_configuration_is_one_line_naming_the_field(fields, needle):
    with pytest.raises(ValueError) as err:
        MoETransformerLM(ModelConfig(**{**BASE, **fields}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_one_layer_model_without_mod_is_valid():
    MoETransformerLM(ModelConfig(**{**BASE, "n_layers": 1})).forward(_ids(1, 3))


def test_diffusion_lm_refuses_mod_and_training_mode_refuses_to_decode():
    from routelab.models.diffusion_lm import MaskedDiffusionLM

    with pytest.raises(ValueError, match="model.mod_capacity .* autoregressive LM only"):
        MaskedDiffusionLM(ModelConfig(**{**BASE, "mod_capacity": 0.5}))
    model = _model().train()
    with pytest.raises(ValueError, match="Mixture-of-Depths block 1"):
        model(_ids(1, 3), cache=model.new_cache(1, 3))


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_routers_that_hand_on_state_declare_it(name, options):
    """hands_on_state is what lets a Mixture-of-Depths model refuse them: a router that returns state must say so."""
    layer = make_layer(name, options)
    _, decision = layer.forward_with_decision(torch.randn(2, 5, layer.d_model), make_ctx(2, 5))
    if decision.state is not None:
        assert router_class(name).hands_on_state


def test_compare_with_a_mod_variant_end_to_end_and_its_model_generates(tmp_path, capsys):
    import json

    from routelab.cli import main

    out = tmp_path / "c"
    assert main(["compare", "--preset", "depth", "--routers", "topk,mod", "--steps", "3", "--seeds", "1",
                 "--quiet", "--out", str(out)]) == 0
    topk, mod = json.loads((out / "results.json").read_text())["variants"]
    assert topk["active_block_flops_vs_topk"] == pytest.approx(1.0) and topk["mod_predictor_accuracy"] == []
    p = mod["processed_fraction_by_block"][1]
    assert mod["processed_fraction_by_block"][0] == 1.0 and 0 <= p <= 1
    # depth preset: d_model 64, d_ff 128, two MoE blocks, top-2: block 1 runs for the fraction p of the tokens
    assert mod["active_block_flops_vs_topk"] == pytest.approx((1 + p) / 2)
    assert mod["causal_eval"] and not mod["causal_train"]
    report = (out / "report.md").read_text()
    assert "block FLOPs vs top-k" in report and "Mixture-of-Depths blocks" in report
    capsys.readouterr()
    assert main(["generate", str(out / "variants" / "mod" / "model"), "--prompt", "def f(x):", "--prompt", "The",
                 "--max-new-tokens", "4"]) == 0
    assert "prompt 2" in capsys.readouterr().out
