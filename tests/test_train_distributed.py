"""Training on 2 ranks (data parallel + expert parallel, spawned gloo group) equals one process on the same global
batches; its consolidated checkpoint resumes in one process, and a one-process checkpoint resumes on 2 ranks."""

from __future__ import annotations

import json

import pytest
import torch

from ep_harness import run_group
from routelab.data import Domain, tokenize_domains
from routelab.models import ModelConfig
from routelab.train import TrainConfig, train

# fp32 training: the ranks sum the same terms in another order (per-rank means, all-reduced gradients), so curves
# agree to float32 rounding (measured: 9e-8 relative over 8 steps; asserted: 1e-6).
RTOL = 1e-6


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    words = ["cat", "dog", "bird"] * 60
    prose = "".join(f"The {w} sat on the mat number {i}, and then it slept.\n" for i, w in enumerate(words))
    code = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(150))
    return tokenize_domains([Domain("prose", prose, "t"), Domain("code", code, "t")], vocab_size=300,
                            cache=tmp_path_factory.mktemp("cache"))


def _model(data):
    return ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4,
                       max_seq_len=32, shared_experts=1, router_options={"k": 2, "balance": "loss_free"})


CFG = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=4, eval_windows=2,
                  eval_batch_size=4, checkpoint_every=4, seed=3)


def _curve(folder):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"], [r["val_loss"] for r in records if r["kind"] == "eval"]


def _stop_at(n):
    def on_step(step, record):
        if step == n:
            raise Stop

    return on_step


def _two_ranks(rank, world, data, out):
    # 2 ranks from step 0, stopped after their step-4 checkpoint (one process resumes it below) ...
    try:
        train(_model(data), CFG, data, out_dir=out / "two_cut", progress=False, on_step=_stop_at(5))
    except Stop:
        pass
    # ... and a one-process step-4 checkpoint resumed on 2 ranks.
    train(_model(data), CFG, data, out_dir=out / "one_cut", resume=True, progress=False)


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_and_checkpoints_move_between_world_sizes(data, tmp_path):
    one = train(_model(data), CFG, data, out_dir=tmp_path / "one", progress=False)
    with pytest.raises(Stop):
        train(_model(data), CFG, data, out_dir=tmp_path / "one_cut", progress=False, on_step=_stop_at(5))
    run_group(_two_ranks, 2, data, tmp_path, timeout=200)
    two_loss, two_val = _curve(tmp_path / "two_cut")  # steps 1-5 on 2 ranks (records up to the stop)

    loss_one, val_one = _curve(tmp_path / "one")
    assert len(two_loss) == 5 and two_loss == pytest.approx(loss_one[:5], rel=RTOL)
    assert two_val == pytest.approx(val_one[:2], rel=RTOL)
    loss, val = _curve(tmp_path / "one_cut")  # 1 process to step 4, then 2 ranks
    assert loss == pytest.approx(loss_one, rel=RTOL) and val == pytest.approx(val_one, rel=RTOL)
    # The 2-rank checkpoint (step 4) is consolidated: one process resumes it and ends where one process does.
    resumed = train(_model(data), CFG, data, out_dir=tmp_path / "two_cut", resume=True, progress=False)
    assert _curve(tmp_path / "two_cut")[0] == pytest.approx(loss_one, rel=RTOL)
    for name, p in one.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], p, rtol=1e-4, atol=1e-6, msg=name)
