"""The MoE DiT: output shape, class conditioning, guidance scale 1 = the conditional model (against an Euler loop
written here), deterministic sampling, every router in it, and `routelab diffusion-demo` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import routelab
from routelab.cli import main
from routelab.models.dit import DiT, DiTConfig
from zoo_cases import CASES

SMALL = dict(d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4)


def small(router="topk", options=None, seed=0):
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**SMALL, router=router, router_options=options or {}))
    with torch.no_grad():  # adaLN-Zero starts every block (and the output) at zero: give them weights to matter
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return model.eval()


def test_output_shape_and_patchify_round_trip():
    model = small()
    x = torch.randn(3, 1, 8, 8)
    v = model(x, torch.rand(3), torch.tensor([0, 4, 10]))
    assert v.shape == (3, 1, 8, 8) and torch.isfinite(v).all()
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    # patch 0 holds the top-left 2×2 pixels in row-major order
    assert torch.equal(model.patchify(x)[:, 0], x[:, 0, :2, :2].reshape(3, 4))
    with pytest.raises(ValueError, match="y must hold class ids in \\[0, 10\\]"):
        model(x, torch.rand(3), torch.tensor([0, 4, 11]))


def test_changing_the_class_changes_the_output():
    model = small()
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    a = model(x, t, torch.tensor([3, 3]))
    b = model(x, t, torch.tensor([7, 7]))
    assert not torch.allclose(a, b)
    # ... and only the sample whose class changed
    c = model(x, t, torch.tensor([3, 7]))
    torch.testing.assert_close(c[0], a[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c[1], b[1], rtol=1e-5, atol=1e-6)


def _euler(model, y, steps, seed, guidance=None):
    """The sampler written out: Euler from t = 1 to 0 on the conditional (or unconditional, y = None) velocity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((y.shape[0], 1, 8, 8), generator=g)
    labels = y if guidance is None else torch.full_like(y, 10)
    with torch.no_grad():
        for i in range(steps):
            t, s = 1 - i / steps, 1 - (i + 1) / steps
            x = x - (t - s) * model(x, torch.full((y.shape[0],), t), labels)
    return x


def test_guidance_one_is_the_conditional_model_and_zero_the_unconditional():
    model = small()
    y = torch.tensor([1, 5, 9])
    got = model.sample(y, steps=6, guidance=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, _euler(model, y, 6, 3), rtol=1e-4, atol=1e-5)
    got0 = model.sample(y, steps=6, guidance=0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got0, _euler(model, y, 6, 3, guidance=0.0), rtol=1e-4, atol=1e-5)
    got3 = model.sample(y, steps=6, guidance=3.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(got3, got, atol=1e-3)


def test_sampling_is_deterministic_under_a_seed():
    model = small("condition_aware")
    y = torch.tensor([0, 2])
    a = model.sample(y, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(0))
    b = model.sample(y, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(0))
    c = model.sample(y, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flow_matching_loss_is_the_velocity_mse():
    model = small()
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    _, mse = model.loss(x0, y, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the same draws, in the documented order: t, ε, label dropout
    t = torch.rand(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    drop = torch.rand(4, generator=g) < 0.1
    yy = torch.where(drop, torch.full_like(y, 10), y)
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    with torch.no_grad():
        want = ((model(xt, t, yy) - (eps - x0)) ** 2).mean()
    assert mse.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("name", routelab.list_routers())
def test_every_registered_router_trains_a_step_in_the_dit(name):
    options = next(o for n, o in CASES if n == name)
    model = small(name, options).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for step in range(2):
        loss, _ = model.loss(x0, y, generator=torch.Generator().manual_seed(step), step=step)
        assert math.isfinite(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        routelab.update_routers(model)


def test_diffusion_demo_writes_a_grid_and_a_quality_number(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    assert main(["diffusion-demo", "--router", "dtr", "--option", "active_fraction=0.5", "--steps", "3",
                 "--samples-per-class", "2", "--sample-steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["generated_accuracy"] <= 1 and result["real_heldout_accuracy"] > 0.9
    assert set(result["generated_accuracy_by_class"]) == {str(c) for c in range(10)}
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "classifier accuracy on generated digits" in (out / "report.md").read_text()
    assert main(["diffusion-demo", "--router", "topk", "--option", "kk=2", "--out", str(tmp_path / "x")]) == 2
    assert "router 'topk' has no option(s) kk" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
