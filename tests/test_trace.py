"""Routing traces: the recorded experts equal what each layer decided (and what transformers' own router picks),
a trace round-trips through its file, decode order and sequence boundaries are kept, and bad files are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routelab.inference import TraceError, TraceRecorder, load_trace, record_trace, save_trace
from routelab.models.transformer import ModelConfig, MoETransformerLM


def tiny_lm(router="topk", seed=0, **options):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=24, num_experts=8, max_seq_len=64,
                      router=router, router_options=options)
    return MoETransformerLM(cfg).eval()


def test_trace_equals_each_layers_decision_and_round_trips(tmp_path):
    model = tiny_lm()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (9,), generator=g) for _ in range(4)] + [torch.randint(0, 64, (5,), generator=g)]
    trace = record_trace(model, seqs, batch_size=2)
    # Reference: run the same batches by hand and read every layer's last decision.
    batches = [torch.stack(seqs[0:2]), torch.stack(seqs[2:4]), seqs[4][None]]
    assert trace.step_offsets.tolist() == [0, 18, 36, 41]
    row = 0
    for ids in batches:
        with torch.no_grad():
            model(ids)
        n = ids.numel()
        for layer, moe in enumerate(model.moe_layers):
            d = moe.last_decision
            want = {(int(t), int(e)): float(w) for t, e, w in zip(d.token_index, d.expert_index, d.weight)}
            got = {}
            for t in range(n):
                for e, w in zip(trace.experts[layer][row + t], trace.weights[layer][row + t]):
                    if e >= 0:
                        got[(t, int(e))] = float(w)
            assert got.keys() == want.keys()
            assert np.allclose([got[k] for k in want], list(want.values()), rtol=0, atol=1e-7)
        assert trace.token_ids[row : row + n].tolist() == ids.reshape(-1).tolist()
        row += n
    assert trace.sequence_ids.tolist() == [0] * 9 + [1] * 9 + [2] * 9 + [3] * 9 + [4] * 5
    assert trace.positions.tolist() == list(range(9)) * 4 + list(range(5))

    path = save_trace(trace, tmp_path / "t.safetensors")
    back = load_trace(path)
    for name in ("token_ids", "sequence_ids", "positions", "step_offsets"):
        assert np.array_equal(getattr(back, name), getattr(trace, name))
    for a, b in zip(back.experts + back.weights, trace.experts + trace.weights):
        assert np.array_equal(a, b)
    assert all(np.array_equal(a, b) for a, b in zip(back.predicted[1:], trace.predicted[1:]))
    assert back.predicted[0] is None and back.num_experts == [8, 8, 8]
    assert back.expert_bytes == [(32 * 48 + 24 * 32) * 4] * 3
    assert back.experts[0].dtype == np.int16
    back.check_model(model)


def test_decode_order_continues_sequences():
    model = tiny_lm()
    with torch.no_grad(), TraceRecorder(model) as rec:
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]))  # prefill of two sequences
        model(torch.tensor([[7], [8]]))  # decode steps continue them
        model(torch.tensor([[9], [10]]))
        rec.new_sequences()
        model(torch.tensor([[11]]))
    trace = rec.trace()
    assert trace.step_offsets.tolist() == [0, 6, 8, 10, 11]
    assert trace.sequence_ids.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 2]
    assert trace.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 3, 4, 4, 0]
    assert trace.token_ids.tolist() == list(range(1, 12))


def test_pregate_predictions_are_exact_and_other_routers_are_guesses():
    seqs = [torch.arange(12) % 64, torch.arange(30, 42)]
    exact = record_trace(tiny_lm("pregate"), seqs)
    for layer in (1, 2):
        assert np.array_equal(exact.predicted[layer], exact.experts[layer])
    guess = record_trace(tiny_lm("topk"), seqs)
    assert guess.predicted[1].shape == guess.experts[1].shape
    assert not all(np.array_equal(guess.predicted[i], guess.experts[i]) for i in (1, 2))


def test_bad_files_and_other_models_are_refused(tmp_path):
    model = tiny_lm()
    trace = record_trace(model, [torch.arange(6)])
    path = save_trace(trace, tmp_path / "t.safetensors")
    with pytest.raises(TraceError, match="different model"):
        trace.check_model(tiny_lm(seed=5))
    with pytest.raises(TraceError, match="different model"):
        trace.check_model(MoETransformerLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=24)))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(TraceError, match="broken.safetensors"):
        load_trace(broken)
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TraceError, match="not a routelab trace"):
        load_trace(tmp_path / "other.safetensors")


def test_hf_mixtral_trace_equals_transformers_router_topk():
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    from routelab.interop.hf import patch_model

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=2)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.1)
    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_router_logits=True, use_cache=False).router_logits
    patch_model(hf)
    trace = record_trace(hf, [ids[0]])
    assert trace.num_layers == 2 and trace.num_experts == [4, 4]
    for layer, logits in enumerate(ref):
        top = torch.sort(logits.topk(2, dim=-1).indices, dim=-1).values
        assert np.array_equal(trace.experts[layer].astype(np.int64), top.numpy())
    assert trace.token_ids.tolist() == ids[0].tolist()
