import pytest
import torch

from hyper_dm.diffusion import LossConfig, make_ddpm, training_loss
from hyper_dm.networks import ConditionalUNet, HyperNetwork


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
