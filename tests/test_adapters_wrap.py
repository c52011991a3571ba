"""Wrapping real models (a routelab LM, a tiny random-init Hugging Face Llama), clear errors, and the adapters'
save → load round trip."""

import json

import pytest
import torch
from torch import nn

import routelab
from routelab.adapters import adapter_aux_loss, add_lora_experts, load_adapters, routed_lora_layers, save_adapters
from routelab.models.transformer import ModelConfig, MoETransformerLM

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=48, num_experts=4, moe_every=2)
TARGETS = ["qkv", "proj", "gate_up", "down"]


def _lm(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return MoETransformerLM(cfg)


def _train_steps(model, ids, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        _, loss = model(ids, ids)
        (loss + adapter_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        routelab.update_routers(model)


@pytest.mark.parametrize("method", ["molora", "hydra", "smora", "flylora", "remix", "mhr", "lora"])
def test_routelab_lm_wrap_train_save_load(method, tmp_path, capsys):
    model = _lm()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    opts = {"n_splits": 2} if method == "mhr" else None
    add_lora_experts(model, target_modules=TARGETS, method=method, num_experts=4, r=2, method_options=opts)
    assert "trainable params" in capsys.readouterr().out
    names = set(routed_lora_layers(model))
    # qkv and proj in both blocks; gate_up and down only in the dense block (block 0); the MoE layer's experts are
    # 3-D tensors and its router gate is never wrapped.
    assert names == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj",
                     "blocks.0.ffn.gate_up", "blocks.0.ffn.down"}
    ids = torch.randint(0, 97, (2, 16))
    _train_steps(model, ids)
    for key, value in model.state_dict().items():  # every base tensor is unchanged by training
        base_key = key.replace(".base.", ".")
        if ".adapter." not in key:
            assert torch.equal(value, base_state[base_key]), key
    model.eval()
    logits = model(ids)[0]
    save_adapters(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapters.json").read_text())
    assert meta["spec"]["method"] == method and set(meta["layers"]) == names
    fresh = _lm()  # the same base, unwrapped: load wraps it with the saved method and options
    load_adapters(fresh, tmp_path / "ad")
    fresh.eval()
    assert torch.equal(fresh(ids)[0], logits)


def test_load_into_an_already_wrapped_model_and_refusals(tmp_path):
    model = _lm()
    add_lora_experts(model, target_modules=["qkv"], method="molora", num_experts=4, r=2, verbose=False)
    _train_steps(model, torch.randint(0, 97, (2, 8)))
    save_adapters(model, tmp_path / "ad")
    same = _lm()
    add_lora_experts(same, target_modules=["qkv"], method="molora", num_experts=4, r=2, verbose=False)
    load_adapters(same, tmp_path / "ad")
    for name, layer in routed_lora_layers(same).items():
        assert torch.equal(layer.adapter.A, routed_lora_layers(model)[name].adapter.A)
    other = _lm()
    add_lora_experts(other, target_modules=["qkv"], method="hydra", num_experts=4, r=2, verbose=False)
    with pytest.raises(ValueError, match="other options"):
        load_adapters(other, tmp_path / "ad")
    wider = _lm(cfg=ModelConfig(**{**CFG.to_dict(), "d_model": 48, "n_heads": 2}))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="different base model"):
        load_adapters(wider, tmp_path / "ad")
    assert not routed_lora_layers(wider)  # refused before anything changed
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())
    shallow = _lm(cfg=ModelConfig(**{**CFG.to_dict(), "n_layers": 1, "moe_every": 1}))
    with pytest.raises(ValueError, match="does not have"):
        load_adapters(shallow, tmp_path / "ad")
    with pytest.raises(ValueError, match="not found"):
        load_adapters(_lm(), tmp_path / "nothing")


def test_wrapping_errors():
    model = _lm()
    with pytest.raises(ValueError, match="matches no nn.Linear.*blocks.0.attn.qkv"):
        add_lora_experts(model, target_modules=["q_proj"], verbose=False)
    with pytest.raises(ValueError, match="not nn.Linear"):
        add_lora_experts(model, target_modules=["attn"], verbose=False)
    with pytest.raises(ValueError, match="method must be one of"):
        add_lora_experts(model, target_modules=["qkv"], method="moe", verbose=False)
    with pytest.raises(ValueError, match="unknown router"):
        add_lora_experts(model, target_modules=["qkv"], router="nope", verbose=False)
    with pytest.raises(ValueError, match="has no option"):
        add_lora_experts(model, target_modules=["qkv"], router_options={"kk": 1}, verbose=False)
    with pytest.raises(ValueError, match="no method option"):
        add_lora_experts(model, target_modules=["qkv"], method_options={"n_splits": 2}, verbose=False)
    with pytest.raises(ValueError, match="r must be"):
        add_lora_experts(model, target_modules=["qkv"], r=0, verbose=False)
    assert not routed_lora_layers(model)  # every refusal left the model as it was
    assert all(p.requires_grad for p in model.parameters())
    add_lora_experts(model, target_modules=r"blocks\.1\.attn\.(qkv|proj)", verbose=False)  # a regex
    assert set(routed_lora_layers(model)) == {"blocks.1.attn.qkv", "blocks.1.attn.proj"}
    with pytest.raises(ValueError, match="wrapping twice"):
        add_lora_experts(model, target_modules=["qkv"], verbose=False)


def test_router_gates_are_never_wrapped():
    model = _lm(cfg=ModelConfig(**{**CFG.to_dict(), "moe_every": 1}))
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        add_lora_experts(model, target_modules=["gate"], verbose=False)


def test_tiny_hugging_face_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 101, (2, 12))
    ref = model(ids).logits.detach()
    add_lora_experts(model, target_modules=["q_proj", "v_proj"], method="molora", num_experts=4, r=4,
                     router_options={"k": 2}, verbose=False)
    assert len(routed_lora_layers(model)) == 4
    torch.testing.assert_close(model(ids).logits, ref)  # B = 0 at the start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(ids, labels=ids)
        (out.loss + adapter_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    logits = model(ids).logits.detach()
    assert not torch.allclose(logits, ref)
    save_adapters(model, tmp_path / "hf")
    torch.manual_seed(0)
    fresh = transformers.LlamaForCausalLM(cfg)
    fresh.load_state_dict(base_state)
    load_adapters(fresh, tmp_path / "hf")
    fresh.eval()
    assert torch.equal(fresh(ids).logits, logits)


def test_adapter_aux_loss_sums_every_layers_router_losses():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    add_lora_experts(model, target_modules=["0", "1"], num_experts=4, r=2,
                     router_options={"k": 2, "aux_loss_coef": 0.5}, verbose=False)
    assert adapter_aux_loss(model).item() == 0.0  # before any forward
    model(torch.randn(5, 8))
    expected = sum(layer.last_decision.aux_losses["aux"] for layer in routed_lora_layers(model).values())
    total = adapter_aux_loss(model)
    assert total.requires_grad and torch.equal(total, expected)
    assert total.item() >= 2 * 0.5 * 0.99  # the Switch loss is at least 1·coef per layer


def test_save_and_load_refuse_bad_paths(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no routed-LoRA layers"):
        save_adapters(model, tmp_path / "a")
    add_lora_experts(model, target_modules=["0"], num_experts=2, r=1, verbose=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        save_adapters(model, tmp_path / "file")
    save_adapters(model, tmp_path / "a")
    (tmp_path / "a" / "adapters.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapters.json"):
        load_adapters(nn.Sequential(nn.Linear(8, 8)), tmp_path / "a")


def test_id_routers_get_the_models_input_ids():
    """hash routing reads RoutingContext.token_ids: the wrapped model hands its input ids to every adapter, so the
    same token id goes to the same LoRA expert wherever it appears."""
    model = _lm()
    add_lora_experts(model, target_modules=["qkv"], num_experts=4, r=2, router="hash", verbose=False)
    ids = torch.tensor([[5, 9, 5, 17, 9, 5]])
    model(ids)
    decision = routed_lora_layers(model)["blocks.0.attn.qkv"].last_decision
    from routelab.routing.hashing import hash_ids

    assert torch.equal(decision.token_index, torch.arange(6))
    assert torch.equal(decision.expert_index, hash_ids(ids.reshape(-1), 0) % 4)
