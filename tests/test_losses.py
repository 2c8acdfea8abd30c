import math

import pytest
import torch
from torch import nn

from hyper_dm.diffusion import LossConfig, make_ddpm, training_loss
from hyper_dm.diffusion.losses import sample_timesteps
from hyper_dm.networks import ConditionalMLP, ConditionalUNet, HyperNetwork, balance_latents


@pytest.fixture
def model():
    backbone = ConditionalUNet(
        channels=(8, 16), attention_levels=(False, False), norm_num_groups=8, num_head_channels=8
    )
    return backbone, HyperNetwork(backbone, z_dim=4, hidden=16, rank=2)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 16, 16, generator=g) * 2 - 1, torch.rand(2, 1, 16, 16, generator=g) * 2 - 1


def grads_of(hyper, term):
    hyper.zero_grad()
    term.backward(retain_graph=True)
    return {name: p.grad for name, p in hyper.named_parameters()}


@pytest.mark.parametrize("mode", ["standard", "eu", "au"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_every_mode_trains_the_hypernet_and_never_the_backbone(model, mode, prediction_type):
    backbone, hyper = model
    target, cond = batch()
    out = training_loss(hyper, backbone, make_ddpm(prediction_type=prediction_type), target, cond,
                        LossConfig(mode, m_weights=2, lambda_eu=0.01, n_noisy=2, sigma_noise=0.05),
                        torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    grads = grads_of(hyper, out["loss"])
    for name, g in grads.items():
        if name.startswith("target."):
            assert g is None, f"frozen backbone parameter {name} received a gradient"
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in ("head.weight", "left.0", "base.0"))


def test_eu_diversity_term_sends_gradient_to_the_hypernet(model):
    backbone, hyper = model
    target, cond = batch()
    out = training_loss(hyper, backbone, make_ddpm(), target, cond, LossConfig(mode="eu", m_weights=3, lambda_eu=0.1))
    assert out["diversity"] > 0
    assert out["loss"].item() == pytest.approx((out["mse"] - 0.1 * out["diversity"]).item())
    grads = grads_of(hyper, out["diversity"])
    # the z-dependent parts (coefficient head and subspace bases) move the weight sets apart
    assert grads["head.weight"].abs().sum() > 0 and grads["right.0"].abs().sum() > 0
    # the shared offset moves all weight sets together, so it cannot change their pairwise distance much
    assert grads["trunk.0.weight"].abs().sum() > 0


def test_au_mode_replicates_the_batch_with_noisy_conditions(model):
    backbone, hyper = model
    target, cond = batch()
    a = training_loss(hyper, backbone, make_ddpm(), target, cond, LossConfig(mode="au", n_noisy=3, sigma_noise=0.0),
                      torch.Generator().manual_seed(0))
    b = training_loss(hyper, backbone, make_ddpm(), target, cond, LossConfig(mode="au", n_noisy=3, sigma_noise=0.5),
                      torch.Generator().manual_seed(0))
    assert a["loss"].item() != pytest.approx(b["loss"].item())


def test_mode_errors_list_the_valid_modes():
    with pytest.raises(ValueError, match=r"'standard', 'eu', 'au'"):
        LossConfig(mode="epistemic")
    with pytest.raises(ValueError, match="m_weights"):
        LossConfig(mode="eu", m_weights=1, lambda_eu=0.01)
    with pytest.raises(ValueError, match=r"'au' needs n_noisy, sigma_noise"):
        LossConfig(mode="au")  # the values live in the bundle config, not in Python defaults


class GivenWeightSets(nn.Module):
    """Stands in for a HyperNetwork whose M weight sets are given: ``{"bias": [M, 1]}``."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def sample_z(self, m, generator=None, draws="iid"):
        return torch.zeros(m, 1)

    def forward(self, z):
        return {"bias": self.bias}


class ConstantBackbone(nn.Module):
    """Predicts its bias everywhere, so with ``prediction_type="sample"`` weight set i's x0 is ``bias_i``."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, cond):
        return self.bias.expand_as(x_t)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_eu_kl_term_is_the_gaussian_kl_of_the_x0_spread_to_the_prior(scale):
    s, lam = 0.3, 0.1
    a = s * scale / 2**0.5  # weight sets +-a: Var_i x0 (ddof=1) = 2 a^2 = (scale * s)^2
    hyper = GivenWeightSets(torch.tensor([[a], [-a]]))
    target, cond = torch.zeros(8, 1), torch.zeros(8, 1)
    config = LossConfig(mode="eu", m_weights=2, lambda_eu=lam, eu_term="kl", prior_std=s)
    out = training_loss(hyper, ConstantBackbone(), make_ddpm(prediction_type="sample"), target, cond, config,
                        torch.Generator().manual_seed(0))
    expected = 0.5 * (scale**2 - 2 * torch.log(torch.tensor(scale)) - 1)
    assert out["kl"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx((out["mse"] + lam * out["kl"]).item())
    grad_a = torch.autograd.grad(out["kl"], hyper.bias)[0][0, 0].item()
    # spread below the prior is pushed up, above it pulled back (the L1 reward pushes up without bound)
    if scale == 1.0:
        assert abs(grad_a) < 1e-6
    else:
        assert (grad_a > 0) == (scale > 1), grad_a


def probed_loss(eu_term: str):
    """``run(probe_cond=..., probe_mask=...)``: one seeded mode-eu loss of a small HyperNetwork on 16 scalars, and
    their ``cond``."""
    torch.manual_seed(0)
    backbone = ConditionalMLP(hidden=16, depth=2)
    hyper = HyperNetwork(backbone, z_dim=4, hidden=16, rank=2)
    target, cond = torch.rand(16, 1) * 2 - 1, torch.rand(16, 1) * 2 - 1
    config = LossConfig(mode="eu", m_weights=3, lambda_eu=0.1, eu_term=eu_term)
    return (lambda **probe: training_loss(hyper, backbone, make_ddpm(prediction_type="v_prediction"), target, cond,
                                          config, torch.Generator().manual_seed(1), **probe)), cond


@pytest.mark.parametrize("eu_term", ["l1", "kl"])
def test_probe_cond_moves_the_diversity_term_and_not_the_mse(eu_term):
    run, cond = probed_loss(eu_term)
    key = "kl" if eu_term == "kl" else "diversity"
    plain, here, elsewhere = run(), run(probe_cond=cond), run(probe_cond=cond + 3.0)
    assert here["mse"].item() == elsewhere["mse"].item() == plain["mse"].item()
    assert elsewhere[key].item() != pytest.approx(here[key].item(), rel=1e-3)
    assert here[key].item() != pytest.approx(plain[key].item(), rel=1e-3)  # its own draw of x_t and t


@pytest.mark.parametrize("eu_term", ["l1", "kl"])
def test_probe_mask_averages_the_diversity_term_over_the_marked_elements(eu_term):
    probed, cond = probed_loss(eu_term)
    run = lambda mask: probed(probe_cond=cond + 3.0, probe_mask=mask)  # noqa: E731
    key = "kl" if eu_term == "kl" else "diversity"
    first = torch.arange(16)[:, None] < 5
    whole, every, a, b = run(None), run(torch.ones(16, 1, dtype=torch.bool)), run(first), run(~first)
    assert every[key].item() == pytest.approx(whole[key].item(), rel=1e-6)
    assert (5 * a[key] + 11 * b[key]).item() / 16 == pytest.approx(whole[key].item(), rel=1e-5)
    assert a[key].item() != pytest.approx(b[key].item(), rel=1e-3)
    assert a["mse"].item() == whole["mse"].item()
    with pytest.raises(ValueError, match="probe_mask"):
        run(torch.zeros(16, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="probe_mask"):
        probed(probe_mask=first)


class StripeBackbone(nn.Module):
    """Predicts its bias times ``cos(pi w / 2 + pi / 4)`` along the last axis (8 columns): frequency +-2 of 8, which
    are the centred k-space columns 6 and 2."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, cond):
        return self.bias * torch.cos(torch.arange(8.0) * math.pi / 2 + math.pi / 4).expand_as(x_t)


def test_probe_columns_leave_the_measured_part_of_the_spread_out_of_the_kl():
    s, a = 0.3, 0.2
    hyper = GivenWeightSets(torch.tensor([[a], [-a]]))  # x0 spread 2 a^2 cos^2 = a^2 at every pixel
    target, cond = torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8)
    config = LossConfig(mode="eu", m_weights=2, lambda_eu=0.1, eu_term="kl", prior_std=s)
    columns = lambda *k: (torch.arange(8) == torch.tensor(k)[:, None]).any(0).expand(2, 8)  # noqa: E731
    run = lambda measured: training_loss(hyper, StripeBackbone(), make_ddpm(prediction_type="sample"), target,  # noqa: E731
                                         cond, config, torch.Generator().manual_seed(0), cond + 1.0, None, measured)
    kl = lambda ratio: 0.5 * (ratio - math.log(ratio) - 1)  # noqa: E731
    assert run(None)["kl"].item() == pytest.approx(kl(a**2 / s**2), rel=1e-5)
    assert run(columns(4))["kl"].item() == pytest.approx(kl(a**2 / s**2), rel=1e-5)  # DC: not where the sets differ
    assert run(columns(6))["kl"].item() == pytest.approx(kl(a**2 / s**2 / 4), rel=1e-4)  # frequency -2 is left
    assert run(columns(2, 6))["kl"].item() > 10  # all of the spread is measured: the entropy part pushes it back
    each = torch.stack([columns(6)[0], torch.zeros(8, dtype=torch.bool)])  # one slice measures column 6, one none
    assert run(each)["kl"].item() == pytest.approx((kl(a**2 / s**2 / 4) + kl(a**2 / s**2)) / 2, rel=1e-4)
    standard = LossConfig(mode="standard")
    for probe_cond, settings, measured in ((None, config, columns(4)), (cond, LossConfig(mode="eu", m_weights=2,
                                           lambda_eu=0.1), columns(4)), (cond, standard, columns(4)),
                                           (cond, config, columns(4)[0])):
        with pytest.raises(ValueError, match="probe_columns"):
            training_loss(hyper, StripeBackbone(), make_ddpm(prediction_type="sample"), target, cond, settings, None,
                          probe_cond, None, measured)


def test_timestep_samplings_follow_their_distributions():
    g = torch.Generator().manual_seed(0)
    a = make_ddpm(1000, 1e-4, 0.02, "v_prediction").alphas_cumprod
    uniform, quadratic, lognormal = (sample_timesteps(a, 20000, s, g) for s in ("uniform", "quadratic", "lognormal"))
    for t in (uniform, quadratic, lognormal):
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert (uniform < 250).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert (quadratic < 250).float().mean().item() == pytest.approx(0.5, abs=0.02)  # P(u^2 < 1/4)
    assert (quadratic < 10).float().mean().item() == pytest.approx(0.1, abs=0.01)  # P(u < 0.1)
    # EDM: the median noise level is exp(-1.2); half the draws land at or below the step whose sigma_t reaches it
    sigma = ((1 - a) / a).sqrt()
    median_step = int(torch.searchsorted(sigma, torch.tensor(math.exp(-1.2)).to(sigma)))
    assert (lognormal <= median_step).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert sigma[lognormal].log().std().item() == pytest.approx(1.2, abs=0.1)


def test_option_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"'l1', 'kl'"):
        LossConfig(mode="eu", m_weights=2, lambda_eu=0.01, eu_term="entropy")
    with pytest.raises(ValueError, match=r"'uniform', 'quadratic'"):
        LossConfig(mode="standard", timestep_sampling="log")
    with pytest.raises(ValueError, match="prior_std"):
        LossConfig(mode="standard", prior_std=0.0)
    with pytest.raises(ValueError, match=r"latent_draws 'sobol'; expected one of \('iid', 'balanced'\)"):
        LossConfig(mode="standard", latent_draws="sobol")


def test_latent_draws_choose_how_a_steps_weight_sets_are_drawn(model):
    backbone, hyper = model
    seen = []
    hyper.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    for draws in ("iid", "balanced"):
        config = LossConfig(mode="eu", m_weights=3, lambda_eu=0.01, latent_draws=draws)
        training_loss(hyper, backbone, make_ddpm(), *batch(), config, torch.Generator().manual_seed(0))
    iid, balanced = seen
    assert iid.shape == balanced.shape == (3, 4)
    assert torch.allclose(balanced, balance_latents(iid), atol=1e-6)  # the same draws, centred and whitened
    assert balanced.mean(0).abs().max() < 1e-5 < iid.mean(0).abs().max()


@pytest.mark.parametrize("probes, columns", [("objects", False), ("objects_inside", True)])
def test_the_trainer_hands_its_probes_to_the_loss(model, monkeypatch, probes, columns):
    """``training_cfg#probes`` / ``#probe_columns``: each iteration pastes objects into the batch's inputs, marks
    them (``objects_inside`` only) and draws each slice's measured columns, and the loss gets all three."""
    from monai.inferers import DiffusionInferer

    from hyper_dm.engines import HyperDiffusionTrainer
    from hyper_dm.engines import trainer as trainer_module

    backbone, hyper = model
    target, cond = batch()
    seen, loss = [], trainer_module.training_loss
    monkeypatch.setattr(trainer_module, "training_loss", lambda *a: seen.append(a) or loss(*a))
    config = {"mode": "eu", "m_weights": 2, "lambda_eu": 0.01, "eu_term": "kl"}
    trainer = HyperDiffusionTrainer("cpu", 1, [{"target": target, "cond": cond}], hyper,
                                    torch.optim.SGD(hyper.trainable_parameters(), lr=0.0),
                                    DiffusionInferer(make_ddpm()), config, probes=probes, probe_columns=columns)
    trainer.run()
    (args,) = seen
    probe, pasted, measured = args[7:]
    assert probe.shape == cond.shape and (probe != cond).any()
    if probes == "objects_inside":
        assert pasted.dtype == torch.bool and ((probe != cond) <= pasted).all()
    else:
        assert pasted is None
    if columns:
        assert measured.shape == (2, 16) and measured.dtype == torch.bool and measured[:, 8].all()  # DC measured
    else:
        assert measured is None
    assert "kl" in trainer.state.output


def test_the_trainer_refuses_probes_its_loss_cannot_use(model):
    from monai.inferers import DiffusionInferer

    from hyper_dm.engines import HyperDiffusionTrainer

    _, hyper = model
    build = lambda loss, **kw: HyperDiffusionTrainer("cpu", 1, [], hyper, torch.optim.SGD(  # noqa: E731
        hyper.trainable_parameters(), lr=0.0), DiffusionInferer(make_ddpm()), loss, **kw)
    eu_l1 = {"mode": "eu", "m_weights": 2, "lambda_eu": 0.01}
    with pytest.raises(ValueError, match="unknown probes 'ellipses'"):
        build(eu_l1, probes="ellipses")
    with pytest.raises(ValueError, match="diversity term of mode 'eu'; the mode is 'standard'"):
        build({"mode": "standard"}, probes="objects")
    with pytest.raises(ValueError, match="needs probes and eu_term 'kl', got probes 'objects', eu_term 'l1'"):
        build(eu_l1, probes="objects", probe_columns=True)
