"""Offloaded execution: experts on disk (safetensors, mmap), a bounded cache, outputs bit-identical to the resident
model, miss counts equal to the simulator's replay of the run's trace, memory within the capacity, clear errors."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from routelab.experts.clamped import ClampedSwiGLUExperts
from routelab.experts.swiglu import SwiGLUExperts
from routelab.inference.cache import CapacityError, simulate_cache
from routelab.inference.offload import OffloadedExperts, StoreError, offload_experts
from routelab.inference.trace import TraceError, TraceRecorder, record_trace
from routelab.layers.moe import MoELayer
from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing import create_router

CFG = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=24, num_experts=8, max_seq_len=64)


def twin_models(router="topk", sizes=None, **options):
    """Two identical models: one to offload, one to stay resident."""
    cfg = ModelConfig(**{**CFG, **(sizes or {})}, router=router, router_options=options)
    torch.manual_seed(0)
    a = MoETransformerLM(cfg).eval()
    torch.manual_seed(0)
    b = MoETransformerLM(cfg).eval()
    return a, b


def decode_inputs(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, 1), generator=g) for _ in range(n)]


@torch.no_grad()
def test_prefill_outputs_bit_identical_and_weights_freed(tmp_path):
    model, resident = twin_models()
    old = weakref.ref(model.moe_layers[0].experts.w_gate_up)
    ex = offload_experts(model, tmp_path / "store", capacity=8)
    gc.collect()
    assert old() is None, "the resident expert weights are still alive after offloading"
    assert not any("experts.w_" in name for name, _ in model.named_parameters())
    assert all(isinstance(layer.experts, OffloadedExperts) for layer in model.moe_layers)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids)[0], resident(ids)[0])
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert files == ["layer0.safetensors", "layer1.safetensors", "layer2.safetensors", "manifest.json"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "store" / "layer1.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 16  # one tensor per expert and weight
        w = resident.moe_layers[1].experts.w_gate_up[5]
        assert torch.equal(f.get_tensor("expert.5.w_gate_up"), w)
    assert ex.totals()["misses"] == ex.totals()["requests"] - ex.totals()["hits"]


@pytest.mark.parametrize("scope,capacity", [("layer", 3), ("global", 8)])
@pytest.mark.parametrize("policy,prefetch", [("lru", False), ("lfu", False), ("arc", False), ("belady", False),
                                             ("lru", True), ("arc", True)])
@torch.no_grad()
def test_executor_misses_equal_the_simulators_on_the_runs_trace(tmp_path, policy, prefetch, scope, capacity):
    model, resident = twin_models()
    inputs = decode_inputs()
    trace_in = None
    if policy == "belady":  # Belady needs the run's future: record it from the resident twin on the same inputs
        with TraceRecorder(resident) as rec:
            for ids in inputs:
                resident(ids)
        trace_in = rec.trace()
    ex = offload_experts(model, tmp_path / "s", capacity=capacity, policy=policy, prefetch=prefetch, scope=scope,
                         trace=trace_in)
    with TraceRecorder(model) as rec:
        for ids in inputs:
            assert torch.equal(model(ids)[0], resident(ids)[0])
    trace = rec.trace()
    sim = simulate_cache(trace, capacity, policy, scope=scope, prefetch=prefetch)
    got = ex.totals()
    assert (got["misses"], got["hits"], got["prefetch_loads"]) == (sim.misses, sim.hits, sim.prefetch_loads)
    assert got["misses"] > 0 and got["hits"] > 0
    # memory: measured from the tensors held, never above the capacity
    per_expert = trace.expert_bytes[0]
    bound = capacity * per_expert * (len(model.moe_layers) if scope == "layer" else 1)
    assert 0 < ex.peak_resident_bytes <= bound
    assert got["bytes_read"] == (sim.misses + sim.prefetch_loads) * per_expert


@torch.no_grad()
def test_pregate_prefetch_is_exact(tmp_path):
    model, resident = twin_models("pregate")
    ex = offload_experts(model, tmp_path / "s", capacity=2, prefetch=True)
    with TraceRecorder(model) as rec:
        for ids in decode_inputs():
            assert torch.equal(model(ids)[0], resident(ids)[0])
    sim = simulate_cache(rec.trace(), 2, "pregated")
    assert sim.prediction_recall == 1.0
    # every layer after the first is always prefetched correctly: its only misses are none
    assert all(s.misses == 0 for s in ex.stats[1:]) and ex.stats[0].misses > 0


@torch.no_grad()
def test_clamped_experts_bit_identical(tmp_path):
    torch.manual_seed(0)
    router = create_router("topk", d_model=16, num_experts=4, k=2)
    layer = MoELayer(16, 8, router, experts=ClampedSwiGLUExperts(4, 16, 8, limit=0.5)).eval()
    torch.nn.init.normal_(layer.experts.b_gate_up)
    x = torch.randn(10, 16)
    want = layer(x)
    ex = offload_experts(layer, tmp_path / "s", capacity=4)
    assert torch.equal(layer(x), want)
    assert ex.totals()["misses"] == len(set(layer.last_decision.expert_index.tolist()))


@torch.no_grad()
def test_hf_mixtral_offloaded_equals_resident(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    from routelab.interop.hf import patch_model

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    hf_logits = hf(input_ids=ids, use_cache=False).logits
    patch_model(hf)
    want = hf(input_ids=ids, use_cache=False).logits  # the resident patched model
    torch.testing.assert_close(want, hf_logits, rtol=1e-5, atol=1e-6)
    ex = offload_experts(hf, tmp_path / "s", capacity=4)
    assert torch.equal(hf(input_ids=ids, use_cache=False).logits, want)
    assert ex.totals()["requests"] > 0


@torch.no_grad()
def test_bad_input_leaves_the_model_untouched(tmp_path):
    model, resident = twin_models()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(4))
    want = resident(ids)[0]

    def untouched():
        assert all(type(layer.experts) is SwiGLUExperts for layer in model.moe_layers)
        assert torch.equal(model(ids)[0], want)

    with pytest.raises(CapacityError, match="capacity=1 is below the 2 experts one token needs"):
        offload_experts(model, tmp_path / "a", capacity=1)
    with pytest.raises(ValueError, match="policy must be one of"):
        offload_experts(model, tmp_path / "a", capacity=2, policy="fifo")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("user data")
    with pytest.raises(StoreError, match="not empty"):
        offload_experts(model, busy, capacity=2)
    assert (busy / "mine.txt").read_text() == "user data"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        offload_experts(model, tmp_path / "file", capacity=2)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(StoreError, match="not writable"):
            offload_experts(model, locked, capacity=2)
        locked.chmod(0o700)
    other, _ = twin_models()
    torch.nn.init.normal_(other.moe_layers[0].router.gate.weight)
    foreign = record_trace(other, [torch.arange(5)])
    with pytest.raises(TraceError, match="different model"):
        offload_experts(model, tmp_path / "b", capacity=2, policy="belady", trace=foreign)
    with pytest.raises(ValueError, match="needs trace="):
        offload_experts(model, tmp_path / "b", capacity=2, policy="belady")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    untouched()


@torch.no_grad()
def test_a_step_beyond_the_capacity_and_a_corrupted_store_fail_clearly(tmp_path):
    model, _ = twin_models()
    offload_experts(model, tmp_path / "s", capacity=2)
    with pytest.raises(CapacityError, match="needs .* experts at once .* shorter prefill chunk"):
        model(torch.arange(12)[None])
    model, _ = twin_models()
    offload_experts(model, tmp_path / "t", capacity=2)
    path = tmp_path / "t" / "layer0.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last expert's last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"layer0.safetensors is corrupted: tensor expert.7.w_\w+ fails its CRC"):
        for ids in decode_inputs(60):
            model(ids)
    path.write_bytes(bytes(data[:100]))
    model, _ = twin_models()
    offload_experts(model, tmp_path / "u", capacity=2)
    (tmp_path / "u" / "layer1.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(StoreError, match="layer1.safetensors is unreadable or corrupted"):
        model(torch.tensor([[3]]))


@pytest.mark.parametrize("capacity,chunk", [(8, None), (4, 1)])
def test_generate_bit_identical_and_misses_equal_the_simulators(tmp_path, capacity, chunk):
    from routelab.models.decoding import generate

    # Widths where the decode kernel (gathered bmm) and the sort-based one round differently: the offloaded bank must
    # take the resident bank's kernel to stay bit-identical.
    model, resident = twin_models(sizes=dict(d_model=128, d_ff=256, n_layers=2))
    prompts = [[5, 9, 2, 33, 7, 1, 60], [11, 3]]  # different lengths: left padding in the batch
    want = generate(resident, prompts, max_new_tokens=10, keep_logits=True, prefill_chunk=chunk)
    ex = offload_experts(model, tmp_path / "s", capacity=capacity, policy="arc")
    with TraceRecorder(model) as rec:
        got = generate(model, prompts, max_new_tokens=10, keep_logits=True, prefill_chunk=chunk)
    assert got.tokens == want.tokens
    assert torch.equal(got.logits, want.logits)
    trace = rec.trace()
    assert trace.num_steps == (1 if chunk is None else 7) + 9  # prefill forwards, then one per new token but the last
    sim = simulate_cache(trace, capacity, "arc")
    assert (ex.totals()["misses"], ex.totals()["hits"]) == (sim.misses, sim.hits)


def test_chunked_prefill_generates_what_a_whole_prefill_does():
    from routelab.models.decoding import generate

    model, _ = twin_models()
    prompts = [[5, 9, 2, 33, 7, 1, 60], [11, 3]]
    whole = generate(model, prompts, max_new_tokens=6, keep_logits=True)
    chunked = generate(model, prompts, max_new_tokens=6, keep_logits=True, prefill_chunk=3)
    assert chunked.tokens == whole.tokens
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1"):
        generate(model, prompts, max_new_tokens=2, prefill_chunk=0)


def test_cli_trace_cache_sim_and_offloaded_generate(tmp_path, capsys):
    import json

    import routelab
    from routelab.cli import main
    from routelab.data.tokenizer import train_tokenizer

    text = "The quick brown fox jumps over the lazy dog.\n" * 40 + "def f(x):\n    return x + 1\n" * 40
    tok = train_tokenizer([text], vocab_size=300)
    model, _ = twin_models()
    cfg = ModelConfig(**{**CFG, "vocab_size": 300})
    torch.manual_seed(0)
    folder = routelab.save_model(MoETransformerLM(cfg), tok, tmp_path / "m")
    data = tmp_path / "text.txt"
    data.write_text(text)
    trace_path = tmp_path / "t.safetensors"
    assert main(["trace", str(folder), "--data", str(data), "--out", str(trace_path), "--seq-len", "32",
                 "--max-tokens", "300"]) == 0
    gen_path = tmp_path / "gen.safetensors"
    assert main(["trace", str(folder), "--data", str(data), "--out", str(gen_path), "--seq-len", "6",
                 "--max-tokens", "12", "--generate", "3", "--prefill-chunk", "1"]) == 0
    from routelab.inference.trace import load_trace

    gen = load_trace(gen_path)  # 2 prompts of 6 tokens fed one by one, then 2 new tokens fed back each
    assert gen.num_steps == 2 * (6 + 2) and gen.sequence_ids.tolist() == [0] * 8 + [1] * 8
    assert gen.positions.tolist() == list(range(8)) * 2
    out = tmp_path / "sim"
    assert main(["cache-sim", str(trace_path), "--capacity", "2,4,8", "--granularity", "token", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| belady | 4 |" in printed and "| pregated | 2 |" in printed and "SRP(16)" in printed
    result = json.loads((out / "cache_sim.json").read_text())
    assert {r["policy"] for r in result["results"]} == {"lru", "lfu", "arc", "belady", "pregated"}
    assert [row["layer"] for row in result["local_consistency"]] == [0, 1, 2]
    assert (out / "hit_rate.png").read_bytes()[:4] == b"\x89PNG"
    # errors: one line, exit 2; nothing of the user's is overwritten
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"user data")
    assert main(["trace", str(folder), "--data", str(data), "--out", str(precious)]) == 2
    assert precious.read_bytes() == b"user data"
    assert main(["cache-sim", str(trace_path), "--capacity", "1", "--granularity", "step", "--out", str(out)]) == 2
    assert main(["cache-sim", str(precious)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "capacity=1 is below" in err and "not a readable routelab trace" in err

    assert main(["generate", str(folder), "--prompt", "The quick", "--max-new-tokens", "8"]) == 0
    resident_text = capsys.readouterr().out
    assert main(["generate", str(folder), "--prompt", "The quick", "--max-new-tokens", "8", "--offload",
                 "--capacity", "2", "--store", str(tmp_path / "experts")]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "hit rate" in captured.err and "MB read" in captured.err
    # capacity 2 < 8 experts: the prompt is fed one token at a time, so compare with a resident run fed alike
    from routelab.models.decoding import generate

    resident, tok2 = routelab.load_model(folder)
    ids = tok2.encode("The quick", add_special_tokens=False).ids
    want = generate(resident, [ids], max_new_tokens=8, prefill_chunk=1, eos_id=tok2.token_to_id("<|endoftext|>"))
    assert captured.out == "The quick" + tok2.decode(want.tokens[0], skip_special_tokens=False) + "\n"
    assert resident_text.startswith("The quick")
    assert main(["generate", str(folder), "--prompt", "x", "--offload", "--capacity", "1"]) == 2
    assert main(["generate", str(folder), "--prompt", "x", "--capacity", "3"]) == 2
    assert main(["generate", str(folder), "--prompt", "x", "--offload", "--store", str(tmp_path / "experts")]) == 2
    err = capsys.readouterr().err
    assert "below the 2 experts" in err and "need --offload" in err and "not empty" in err


def test_a_forward_with_gradients_takes_the_differentiable_path(tmp_path):
    model, resident = twin_models()
    offload_experts(model, tmp_path / "s", capacity=8)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    logits, _ = model(ids)
    want, _ = resident(ids)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    logits.sum().backward()  # reaches the routers and attention through the offloaded experts
    grad = model.moe_layers[0].router.gate.weight.grad
    resident_logits, _ = resident(ids)
    resident_logits.sum().backward()
    torch.testing.assert_close(grad, resident.moe_layers[0].router.gate.weight.grad, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_prefill_bit_identical_where_the_resident_kernel_choice_matters(tmp_path):
    # 80 assignments of 64-wide experts: past the tiny-S kernel's assignment limit, within its weight budget; the
    # offloaded bank must make the resident dispatcher's choice (LocalDispatcher.takes_decode_path) to stay exact.
    model, resident = twin_models(sizes=dict(d_model=64, d_ff=64, n_layers=2))
    offload_experts(model, tmp_path / "s", capacity=8)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids)[0], resident(ids)[0])
