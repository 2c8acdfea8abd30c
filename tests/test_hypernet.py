import pytest
import torch
from torch import nn

from hyper_dm.networks import ConditionalMLP, ConditionalUNet, HyperNetwork, apply_weight_sets, balance_latents


def small_unet() -> ConditionalUNet:
    return ConditionalUNet(channels=(16, 32), attention_levels=(False, True), norm_num_groups=8, num_head_channels=16)


def test_weights_have_template_shapes_and_differ_across_z():
    backbone = ConditionalMLP(hidden=32, depth=2)
    hyper = HyperNetwork(backbone, z_dim=4, hidden=16, rank=2)
    weights = hyper(hyper.sample_z(3, torch.Generator().manual_seed(1)))
    for name, p in backbone.named_parameters():
        assert weights[name].shape == (3, *p.shape)
    w = weights["net.0.weight"]
    assert (w[0] - w[1]).abs().max() > 1e-3


def test_template_is_frozen_and_parameter_count_matches_docstring_formula():
    backbone = ConditionalMLP(hidden=32, depth=2)
    p_target = sum(p.numel() for p in backbone.parameters())
    z_dim, hidden, rank = 4, 16, 3
    hyper = HyperNetwork(backbone, z_dim=z_dim, hidden=hidden, rank=rank)
    assert all(not p.requires_grad for p in backbone.parameters())
    counts = hyper.count_parameters()
    ranks, sub = [], 0
    for p in backbone.parameters():
        rows = p.shape[0]
        cols = p.numel() // rows
        r = min(rank, rows, cols)
        ranks.append(r)
        sub += r * (rows + cols)
    total_r = sum(ranks)
    mlp = z_dim * hidden + hidden + hidden * hidden + hidden + hidden * total_r + total_r
    assert counts["target"] == p_target
    assert counts["trainable"] == p_target + sub + mlp
    assert counts["trainable"] == sum(p.numel() for p in hyper.trainable_parameters())


@pytest.mark.parametrize("m", [2, 4, 9, 16])
def test_balanced_latents_are_centred_and_spread_evenly(m):
    hyper = HyperNetwork(ConditionalMLP(hidden=16, depth=1), z_dim=8, hidden=16, rank=2)
    z = hyper.sample_z(m, torch.Generator().manual_seed(m), draws="balanced")
    assert torch.equal(z, balance_latents(hyper.sample_z(m, torch.Generator().manual_seed(m))))  # same seed, same draws
    covariance = z.T @ z / (m - 1)
    spread = torch.linalg.eigvalsh(covariance)
    assert z.mean(0).abs().max() < 1e-5 and torch.trace(covariance) == pytest.approx(8.0, rel=1e-5)
    rank = min(m - 1, 8)  # every direction the draws span gets an equal share of the trace
    assert torch.allclose(spread[-rank:], torch.full((rank,), 8.0 / rank), rtol=1e-4)
    assert (spread[:-rank].abs() < 1e-5).all()
    with pytest.raises(ValueError, match=r"draws must be one of \('iid', 'balanced'\), got 'sobol'"):
        hyper.sample_z(m, draws="sobol")


def test_balanced_latents_estimate_a_variance_without_bias_and_with_less_spread():
    """The variance across M = 4 draws of a linear read-out of z (what EU is for a HyperNetwork linear in z), over
    2000 seeds: iid draws give chi-square / 3 (mean 1, relative spread 0.82), balanced ones the same mean and a
    spread of 0.58 (the share of the read-out in a random 3-D subspace); from 9 draws on, exactly 1."""
    readout = torch.randn(8, generator=torch.Generator().manual_seed(0))
    readout = readout / readout.norm()
    estimates = {}
    for m in (4, 9):
        draws = [torch.randn(m, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(2000)]
        estimates[m] = {name: torch.stack([(f(z) @ readout).var() for z in draws])
                        for name, f in (("iid", lambda z: z), ("balanced", balance_latents))}
    iid, balanced = estimates[4]["iid"], estimates[4]["balanced"]
    assert iid.mean() == pytest.approx(1.0, abs=0.06) and balanced.mean() == pytest.approx(1.0, abs=0.06)  # 3 s.e.
    assert balanced.std() / balanced.mean() < 0.8 * iid.std() / iid.mean()
    assert torch.allclose(estimates[9]["balanced"], torch.ones(2000), rtol=1e-4)
    assert estimates[9]["iid"].std() > 0.3
    single = torch.randn(1, 8)
    assert torch.equal(balance_latents(single), single)  # one draw has no spread to balance


def test_bad_latent_shape_is_a_clear_error():
    hyper = HyperNetwork(ConditionalMLP(hidden=8, depth=1), z_dim=4)
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        hyper(torch.zeros(2, 3))


def test_loop_and_vmap_agree_on_the_unet():
    backbone = small_unet()
    hyper = HyperNetwork(backbone, z_dim=4, hidden=16, rank=2)
    m, b = 3, 2
    with torch.no_grad():
        weights = hyper(hyper.sample_z(m))
        x = torch.randn(m, b, 1, 32, 32)
        cond = torch.randn(m, b, 1, 32, 32)
        t = torch.randint(0, 1000, (m, b))
        loop = apply_weight_sets(backbone, weights, x, t, cond, "loop")
        vmapped = apply_weight_sets(backbone, weights, x, t, cond, "vmap")
    assert loop.shape == (m, b, 1, 32, 32)
    assert (loop - vmapped).abs().max() < 1e-5
    # each weight set really is applied to its own inputs
    single = torch.func.functional_call(backbone, {k: v[1] for k, v in weights.items()}, (x[1], t[1], cond[1]))
    assert torch.allclose(single, loop[1], atol=1e-6)


def test_unknown_method_is_an_error():
    backbone = ConditionalMLP(hidden=8, depth=1)
    hyper = HyperNetwork(backbone, z_dim=2)
    w = hyper(hyper.sample_z(1))
    with pytest.raises(ValueError, match="loop"):
        apply_weight_sets(backbone, w, torch.zeros(1, 2, 1), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 1),
                          "jit")


def test_state_dict_round_trips_with_weights_only(tmp_path):
    hyper = HyperNetwork(ConditionalMLP(hidden=8, depth=1), z_dim=2)
    path = tmp_path / "h.pt"
    torch.save(hyper.state_dict(), path)
    other = HyperNetwork(ConditionalMLP(hidden=8, depth=1), z_dim=2)
    other.load_state_dict(torch.load(path, weights_only=True))
    z = torch.randn(2, 2)
    for k, v in hyper(z).items():
        assert torch.equal(v, other(z)[k])
    assert isinstance(other.target, nn.Module)


def test_unet_names_the_image_sizes_that_fit():
    unet = ConditionalUNet(channels=(8, 16, 16, 16), attention_levels=(False,) * 4, norm_num_groups=8,
                           num_head_channels=8)
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(36, 36\) does not divide by 8.*data#img_size.*e\.g\. 32 or 40"):
        unet(torch.zeros(1, 1, 36, 36), t, torch.zeros(1, 1, 36, 36))
    assert unet(torch.zeros(1, 1, 40, 40), t, torch.zeros(1, 1, 40, 40)).shape == (1, 1, 40, 40)


def test_noise_level_estimates_gaussian_noise_on_a_piecewise_constant_image():
    """The robust noise std of pure Gaussian noise is within 5% of the true std; with the edges of a disc phantom
    (about 8% of the pixels) within 15%, over noise levels that span 20x."""
    from hyper_dm.networks import noise_level

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    phantom = ((yy - 32) ** 2 + (xx - 28) ** 2 < 20**2).float() - 0.5 * ((yy - 40) ** 2 + (xx - 36) ** 2 < 6**2).float()
    sigma = torch.tensor([0.01, 0.05, 0.2])
    noise = sigma[:, None, None, None] * torch.randn(3, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    assert noise_level(noise).shape == (3, 2)
    torch.testing.assert_close(noise_level(noise), sigma[:, None].expand(3, 2), rtol=0.05, atol=0.0)
    torch.testing.assert_close(noise_level(phantom + noise), sigma[:, None].expand(3, 2), rtol=0.15, atol=0.0)


def test_noise_level_input_adds_one_plane_per_condition_channel_and_is_read():
    """With ``noise_level_input`` the first convolution takes x_t, cond and one noise-level plane; two conditions
    that differ only in a small noise change the output through that plane, not only through the pixels."""
    unet = ConditionalUNet(channels=(16, 32), attention_levels=(False, True), norm_num_groups=8, num_head_channels=16,
                           noise_level_input=True)
    first = next(p for p in unet.parameters() if p.ndim == 4)
    assert first.shape[1] == 3
    with torch.no_grad():
        for p in unet.parameters():  # MONAI zero-initialises the output convolution
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.zeros(1, 1, 32, 32), torch.tensor([10])
    cond = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    direct = unet(x, t, cond)
    unet.noise_level_input = False  # the same weights without the plane: x_t, cond and a zero third channel
    with torch.no_grad():
        without = unet.unet(torch.cat([x, cond, torch.zeros_like(cond)], 1), t)
    assert (direct - without).abs().max() > 1e-3


def test_a_deep_ensemble_hands_out_each_members_weight_sets_in_turn():
    from hyper_dm.config import ConfigError
    from hyper_dm.engines import HyperDiffusionTrainer, refuse_ensemble
    from hyper_dm.networks import DeepEnsemble, hyper_network

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # trained apart: other initial weights
        members.append(HyperNetwork(ConditionalMLP(hidden=16, depth=2), z_dim=4, hidden=8, rank=2))
    ensemble = DeepEnsemble(members)
    z = ensemble.sample_z(4, torch.Generator().manual_seed(3))
    weights = ensemble(z)
    own = [members[0](z[0::2]), members[1](z[1::2])]
    for name in weights:
        assert weights[name].shape[0] == 4
        torch.testing.assert_close(weights[name][0::2], own[0][name])  # sets 0, 2: member 0 from its own z
        torch.testing.assert_close(weights[name][1::2], own[1][name])
    assert ensemble.target is members[0].target
    # balanced latents are balanced per member: with M = K each member's one latent is its iid draw
    iid = ensemble.sample_z(4, torch.Generator().manual_seed(3))
    balanced = ensemble.sample_z(4, torch.Generator().manual_seed(3), draws="balanced")
    for member in (0, 1):
        torch.testing.assert_close(balanced[member::2], balance_latents(iid[member::2]))
    torch.testing.assert_close(ensemble.sample_z(2, torch.Generator().manual_seed(3), draws="balanced"),
                               ensemble.sample_z(2, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="M=3: a deep ensemble of 2 members needs M a multiple of 2"):
        ensemble(z[:3])
    with pytest.raises(ValueError, match="share one architecture"):
        DeepEnsemble([members[0], HyperNetwork(ConditionalMLP(hidden=8, depth=2), z_dim=4, hidden=8, rank=2)])
    with pytest.raises(ValueError, match="at least 2 members"):
        DeepEnsemble(members[:1])
    built = hyper_network(ConditionalMLP(hidden=16, depth=2), z_dim=4, hidden=8, rank=2, ensemble_members=3)
    assert isinstance(built, DeepEnsemble) and len(built.members) == 3
    assert built.members[1].target is not built.members[0].target  # each member loads its own template
    assert isinstance(hyper_network(ConditionalMLP(hidden=16, depth=2), z_dim=4), HyperNetwork)
    with pytest.raises(ConfigError, match="train each member"):  # members are trained apart, not through it
        HyperDiffusionTrainer("cpu", 1, [], ensemble, None, None, {"mode": "standard"})
    refuse_ensemble(members[0])  # one model trains
