"""RNNVAE: Rubanova et al.'s (2019) RNN-VAE baseline on union-grid batches."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from neuralode.models import DECODER_GRIDS, RNNVAE, RNNVAEOutput, count_parameters


def _batch(batch=3, times=6, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(times, generator=g)).values
    values = torch.randn(batch, times, dim, generator=g)
    mask = torch.rand(batch, times, dim, generator=g) < 0.5
    mask[0, 1] = False  # sample 0 has no observation at the second time
    mask[1, :, 0] = True
    return t, values, mask


@pytest.mark.parametrize("grid", DECODER_GRIDS)
def test_shapes_and_elbo(grid):
    torch.manual_seed(0)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid=grid)
    t, values, mask = _batch()
    out = model(t, values, mask)
    assert isinstance(out, RNNVAEOutput)
    assert out.pred.shape == (3, 6, 4)
    for z in (out.z0, out.qz0_mean, out.qz0_logvar):
        assert z.shape == (3, 3)
    assert out.log_likelihood.shape == out.kl.shape == out.elbo.shape == (3,)
    assert torch.equal(out.elbo, out.log_likelihood - out.kl)
    assert out.n_observed.tolist() == mask.sum((1, 2)).tolist()
    assert out.loss(0.25).item() == pytest.approx(-(out.log_likelihood - 0.25 * out.kl).mean().item())


def test_parameter_count_is_their_rnn_vae():
    # lib/rnn_baselines.py RNN_VAE with concat_mask: GRUCell(2D + 1, rec_dims), z0_net Linear(rec, units) -
    # tanh - Linear(units, 2K), GRUCell(2D + 1, K), decoder Linear(K, units) - tanh - Linear(units, D).
    def gru(inputs, hidden):
        return 3 * hidden * (inputs + hidden) + 6 * hidden

    for d, k, rec, units in ((41, 20, 40, 50), (37, 20, 40, 50), (3, 2, 4, 5)):
        want = (gru(2 * d + 1, rec) + rec * units + units + units * 2 * k + 2 * k + gru(2 * d + 1, k)
                + k * units + units + units * d + d)
        assert count_parameters(RNNVAE(d, k, rec, units)) == want
    assert count_parameters(RNNVAE(41)) == 28_531  # their PhysioNet sizes (41 variables)


def test_kl_is_the_closed_form_against_the_standard_normal():
    torch.manual_seed(1)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6)
    out = model(*_batch())
    std = torch.exp(0.5 * out.qz0_logvar)
    want = kl_divergence(Normal(out.qz0_mean, std), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(out.kl, want, rtol=1e-5, atol=1e-6)
    assert (out.kl >= 0).all()


@pytest.mark.parametrize("grid", DECODER_GRIDS)
def test_unobserved_values_change_nothing(grid):
    torch.manual_seed(2)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid=grid)
    t, values, mask = _batch()
    eps = torch.randn(3, 3)
    out = model(t, values, mask, eps=eps)
    garbage = torch.where(mask, values, torch.full_like(values, 1e3))
    again = model(t, garbage, mask, eps=eps)
    torch.testing.assert_close(again.pred, out.pred, rtol=0, atol=0)
    torch.testing.assert_close(again.log_likelihood, out.log_likelihood, rtol=0, atol=0)


def test_own_grid_steps_only_through_a_samples_own_times_and_ignores_its_batch():
    torch.manual_seed(3)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid="own")
    t, values, mask = _batch()
    eps = torch.zeros(3, 3)
    out = model(t, values, mask, eps=eps)
    assert (out.pred[0, 1] == 0).all()  # not one of sample 0's times
    assert (out.pred[1].abs().sum(-1) > 0).all()  # sample 1 has every time
    # Alone, on its own times only, sample 0 gets the same predictions.
    own = mask[0].any(-1)
    alone = model(t[own], values[:1, own], mask[:1, own], eps=eps[:1])
    torch.testing.assert_close(alone.pred[0], out.pred[0, own], rtol=1e-5, atol=1e-6)


def test_union_grid_steps_through_every_time_as_their_code_does():
    torch.manual_seed(4)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid="union")
    t, values, mask = _batch()
    out = model(t, values, mask, eps=torch.zeros(3, 3))
    assert (out.pred.abs().sum(-1) > 0).all()  # every sample predicts at every union time
    # Prediction without targets visits every time under both grids, and the grids then agree.
    own = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid="own")
    own.load_state_dict(model.state_dict())
    z0 = torch.randn(3, 3)
    torch.testing.assert_close(own.decode(z0, t), model.decode(z0, t), rtol=0, atol=0)


def test_posterior_mean_is_deterministic_and_samples_are_not():
    torch.manual_seed(5)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6).eval()
    t, values, mask = _batch()
    zeros = torch.zeros(3, 3)
    a, b = model(t, values, mask, eps=zeros), model(t, values, mask, eps=zeros)
    torch.testing.assert_close(a.z0, a.qz0_mean, rtol=0, atol=0)
    torch.testing.assert_close(a.pred, b.pred, rtol=0, atol=0)
    c, d = model(t, values, mask), model(t, values, mask)
    assert not torch.equal(c.z0, d.z0)


def test_gradients_reach_every_parameter_and_match_finite_differences():
    torch.manual_seed(6)
    model = RNNVAE(2, latent_dim=2, encoder_hidden=3, units=3, decoder_grid="own").double()
    t, values, mask = _batch(batch=2, times=4, dim=2)
    values = values.double()
    eps = torch.randn(2, 2, dtype=torch.float64)
    model(t.double(), values, mask, eps=eps).loss(0.5).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    observed = values.clone().requires_grad_(True)

    def elbo(x):
        return model(t.double(), x, mask, eps=eps).elbo

    assert torch.autograd.gradcheck(elbo, (observed,), eps=1e-6, atol=1e-5)


def test_targets_at_other_times():
    torch.manual_seed(7)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6)
    t, values, mask = _batch()
    targets = torch.tensor([0.0, 0.25, 2.0])
    out = model(t, values, mask, target_times=targets)
    assert out.pred.shape == (3, 3, 4) and out.log_likelihood is None
    with pytest.raises(ValueError, match="no targets"):
        out.loss()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="decoder_grid"):
        RNNVAE(4, decoder_grid="batch")
    for name, kwargs in (("latent_dim", {"latent_dim": 0}), ("encoder_hidden", {"encoder_hidden": -1}),
                         ("units", {"units": 0}), ("obs_std", {"obs_std": 0.0})):
        with pytest.raises((ValueError, TypeError), match=name):
            RNNVAE(4, **kwargs)
    with pytest.raises(TypeError, match="t0"):
        RNNVAE(4, t0=float("nan"))
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, t0=0.5)
    t, values, mask = _batch()
    with pytest.raises(ValueError, match="t0"):
        model(t - 1.0, values, mask)
    with pytest.raises(ValueError, match="z0"):
        model.decode(torch.zeros(3, 2), t + 1.0)
    with pytest.raises(ValueError, match="target_mask"):
        model(t + 1.0, values, mask, target_times=t + 1.0, target_values=values)
    with pytest.raises(ValueError, match="eps"):
        model(t + 1.0, values, mask, eps=torch.zeros(3, 5))


def test_reverse_batch_decodes_each_sample_from_its_mirror_as_their_code_does():
    # lib/rnn_baselines.py RNN_VAE.get_reconstruction: utils.reverse(data) flips dimension 0 of the
    # (n_traj, n_tp, n_dims) data, so row b is decoded from the encoding of row B - 1 - b.
    torch.manual_seed(8)
    model = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid="union")
    mirrored = RNNVAE(4, latent_dim=3, encoder_hidden=5, units=6, decoder_grid="union", reverse_batch=True)
    mirrored.load_state_dict(model.state_dict())
    t, values, mask = _batch()
    zeros = torch.zeros(3, 3)
    right, wrong = model(t, values, mask, eps=zeros), mirrored(t, values, mask, eps=zeros)
    torch.testing.assert_close(wrong.qz0_mean, right.qz0_mean.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(wrong.pred, right.pred.flip(0))  # union grid: the same steps for all rows
    torch.testing.assert_close(wrong.kl.sum(), right.kl.sum())
    with pytest.raises(TypeError, match="reverse_batch"):
        RNNVAE(4, reverse_batch=1)
