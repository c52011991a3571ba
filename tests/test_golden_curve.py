"""A golden loss curve: a tiny model, seed and synthetic token stream, compared with the values kept in
tests/golden/. A change to the model, the layer, the routers' maths or the training loop shows up here.

Intentional changes: regenerate with `ROUTELAB_UPDATE_GOLDEN=1 ./dev.sh test tests/test_golden_curve.py` and commit
the new file with the change that explains it. The tolerance allows for float summation order across CPUs; a
different torch version may change initialisation and need a regeneration (the file records the version).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from routelab.data.dataset import DomainTokens, TokenData
from routelab.models import ModelConfig
from routelab.train import TrainConfig, train

GOLDEN = Path(__file__).parent / "golden" / "tiny_topk_curve.json"


def synthetic_data() -> TokenData:
    """Two 'domains' of a repeating pattern plus noise: learnable, so the curve falls."""
    gen = torch.Generator().manual_seed(1234)
    domains = []
    for d, period in enumerate((7, 11)):
        n = 4000
        ids = (torch.arange(n) % period + 10 * d + torch.randint(0, 3, (n,), generator=gen)) % 64
        domains.append(DomainTokens(f"d{d}", "synthetic", ids[:3600], ids[3600:]))
    return TokenData(domains, tokenizer=None, vocab_size=64, tokenizer_key="synthetic", tokenizer_cached=True)


def run_curve() -> list[float]:
    # NOTE: the golden curve is recorded with one torch thread, as conftest sets for every test.
    model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4, max_seq_len=32,
                        router_options={"k": 2})
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=6, eval_windows=2, seed=0)
    run = train(model, cfg, synthetic_data(), progress=False)
    return [r["loss"] for r in run.train_curve] + [r["val_loss"] for r in run.val_curve]


def test_tiny_training_run_matches_the_golden_curve():
    curve = run_curve()
    if os.environ.get("ROUTELAB_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "curve": curve}, indent=1) + "\n")
        pytest.skip(f"golden curve rewritten: {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert curve[0] > curve[11]  # it learns
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(golden["curve"]), rtol=2e-3, atol=2e-3,
                               msg=lambda m: f"training curve differs from {GOLDEN.name} (torch {golden['torch']}): {m}")
