"""Latent ODE and RNN baseline: batch independence, ELBO terms, shapes, a training step."""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode.models.latent_ode import (
    LatentODE,
    RNNBaseline,
    gather_observations,
    gaussian_log_likelihood,
    normal_kl,
)

D64 = torch.float64


def _series(times, seed=0, dim=2, drop=0.3):
    """One sample: its own times, values and a mask with some entries missing (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    times = torch.tensor(times, dtype=D64)
    values = torch.randn(len(times), dim, generator=g, dtype=D64)
    mask = torch.rand(len(times), dim, generator=g) > drop
    mask[:, 0] |= ~mask.any(1)
    return times, values, mask


def _union(samples):
    """Collate samples onto their union grid, as collate_physionet(grid="union") does."""
    times = torch.unique(torch.cat([s[0] for s in samples]))
    values = torch.zeros(len(samples), len(times), samples[0][1].shape[1], dtype=D64)
    mask = torch.zeros(values.shape, dtype=torch.bool)
    for b, (t, v, m) in enumerate(samples):
        cols = torch.searchsorted(times, t)
        values[b, cols], mask[b, cols] = v, m
    return times, values, mask


A = ([0.05, 0.3, 0.35, 0.9, 1.25], 0)
OTHERS = [([0.1, 0.2, 0.33, 0.6, 0.61, 0.7, 1.9], 1), ([0.3, 1.0], 2), ([0.02, 2.45], 3)]


def test_output_times_never_change_the_steps():
    # The claim the union-grid decoder relies on, for an adaptive and a fixed-step method.
    f = lambda t, y: torch.stack([y[1], -torch.sin(y[0]) + 0.3 * torch.cos(t)])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=D64)
    few = torch.tensor([0.0, 0.7, 2.0], dtype=D64)
    many = torch.unique(torch.cat([few, torch.rand(40, dtype=D64, generator=torch.Generator().manual_seed(0)) * 2]))
    where = torch.searchsorted(many, few)
    for method, options in (("dopri5", None), ("rk4", {"step_size": 0.1, "interp": "cubic"})):
        a = neuralode.solve(f, y0, few, method=method, rtol=1e-6, atol=1e-8, options=options)
        b = neuralode.solve(f, y0, many, method=method, rtol=1e-6, atol=1e-8, options=options)
        assert a.stats["n_steps"] == b.stats["n_steps"] and a.stats["n_accepted"] == b.stats["n_accepted"]
        if method == "dopri5":  # (the fixed grid's cubic interpolant may cost one more evaluation)
            assert a.stats["nfe"] == b.stats["nfe"]
        assert torch.equal(a.ys, b.ys[where])


def test_gather_observations_keeps_each_samples_own_times():
    times, values, mask = _union([_series(*A), _series(*OTHERS[1]), _series(*OTHERS[2])])
    mask[2] = False  # a sample without observations
    obs = gather_observations(times, values, mask, t0=0.0)
    assert obs.lengths.tolist() == [5, 2, 0]
    assert torch.equal(obs.times[0], torch.tensor(A[0], dtype=D64))
    assert torch.equal(obs.times[1, :2], torch.tensor(OTHERS[1][0], dtype=D64))
    assert torch.all(obs.times[1, 2:] == 1.0) and torch.all(obs.times[2] == 0.0)  # zero padded gaps
    assert torch.equal(obs.values[0][obs.mask[0]], _series(*A)[1][_series(*A)[2]])
    assert not obs.mask[~obs.valid].any()


@pytest.mark.parametrize("encoder", ["odernn", "rnn"])
@pytest.mark.parametrize("decoder_hidden", [None, 8])
def test_a_samples_result_does_not_depend_on_its_batch(encoder, decoder_hidden):
    torch.manual_seed(0)
    model = LatentODE(2, 3, encoder=encoder, encoder_hidden=6, dynamics_hidden=8, decoder_hidden=decoder_hidden,
                      learn_obs_std=True).double()
    samples = [_series(*A)] + [_series(*o) for o in OTHERS]
    eps = torch.randn(len(samples), 3, dtype=D64)
    alone = model(*_union(samples[:1]), eps=eps[:1])
    times, values, mask = _union(samples)
    batch = model(times, values, mask, eps=eps)
    own = torch.searchsorted(times, samples[0][0])
    tight = dict(rtol=1e-10, atol=1e-12)
    for name in ("qz0_mean", "qz0_logvar", "z0", "kl", "log_likelihood", "elbo", "n_observed"):
        torch.testing.assert_close(getattr(batch, name)[:1], getattr(alone, name), **tight, msg=name)
    torch.testing.assert_close(batch.pred[0, own], alone.pred[0], **tight)
    torch.testing.assert_close(batch.z[0, own], alone.z[0], **tight)
    # ... and the other samples did change the union grid and the decoder's solve.
    assert len(times) > len(samples[0][0]) and batch.stats["n_steps"] > alone.stats["n_steps"]


def test_adaptive_decoder_shares_steps_so_independence_holds_to_tolerance():
    torch.manual_seed(1)
    model = LatentODE(2, 3, encoder_hidden=6, dynamics_hidden=8, method="dopri5", step_size=None,
                      rtol=1e-9, atol=1e-10).double()
    samples = [_series(*A)] + [_series(*o) for o in OTHERS]
    eps = torch.randn(len(samples), 3, dtype=D64)
    alone = model(*_union(samples[:1]), eps=eps[:1])
    batch = model(*_union(samples), eps=eps)
    torch.testing.assert_close(batch.elbo[:1], alone.elbo, rtol=1e-6, atol=1e-6)


def test_rnn_baseline_sample_does_not_depend_on_its_batch():
    torch.manual_seed(2)
    model = RNNBaseline(2, 7).double()
    samples = [_series(*A)] + [_series(*o) for o in OTHERS]
    alone = model(*_union(samples[:1]))
    times, values, mask = _union(samples)
    batch = model(times, values, mask)
    own = torch.searchsorted(times, samples[0][0])
    torch.testing.assert_close(batch.pred[0, own], alone.pred[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batch.log_likelihood[:1], alone.log_likelihood, rtol=1e-10, atol=1e-12)
    assert batch.pred.shape == values.shape and torch.isfinite(batch.loss())


def test_rnn_roll_all_steps_through_every_time_and_scores_observed_entries_only():
    torch.manual_seed(5)
    model = RNNBaseline(2, 6).double()
    times, values, mask = _union([_series(*A)] + [_series(*o) for o in OTHERS])
    own = model(times, values, mask)
    every = model(times, values, mask, roll="all")
    # Every time of the grid gets a prediction; "own" leaves the sample's unobserved times at 0.
    unobserved = ~mask.any(-1)
    assert unobserved.any() and torch.all(every.pred.abs().sum(-1) > 0)
    assert torch.all(own.pred[unobserved] == 0)
    # The likelihood counts the observed entries only: changing the values elsewhere changes nothing.
    noisy = torch.where(mask, values, torch.full_like(values, 1e3))
    torch.testing.assert_close(model(times, noisy, mask, roll="all").log_likelihood, every.log_likelihood)
    expected = torch.distributions.Normal(every.pred, model.noise()).log_prob(values)
    torch.testing.assert_close(every.log_likelihood, expected.where(mask, torch.zeros((), dtype=D64)).sum((1, 2)))
    assert every.n_observed.tolist() == mask.sum((1, 2)).tolist()
    # Extra steps between a sample's observations change its predictions at them (why the option exists).
    first = mask[0].any(-1)
    assert not torch.allclose(every.pred[0, first], own.pred[0, first])


def test_rnn_roll_all_equals_own_when_every_time_is_observed():
    torch.manual_seed(6)
    model = RNNBaseline(2, 6).double()
    times = torch.tensor([0.1, 0.4, 0.5, 1.2], dtype=D64)
    values, full = torch.randn(3, 4, 2, dtype=D64), torch.ones(3, 4, 2, dtype=torch.bool)
    own, every = model(times, values, full), model(times, values, full, roll="all")
    assert torch.equal(own.pred, every.pred) and torch.equal(own.log_likelihood, every.log_likelihood)
    # Prediction without targets rolls over every target time either way.
    future = torch.tensor([0.2, 0.7, 1.5], dtype=D64)
    torch.testing.assert_close(model(times, values, full, target_times=future).pred,
                               model(times, values, full, target_times=future, roll="all").pred)
    with pytest.raises(ValueError, match="roll"):
        model(times, values, full, roll="grid")


def test_shapes_and_finite_elbo_terms_with_extrapolation_targets():
    torch.manual_seed(3)
    model = LatentODE(3, 4, encoder_hidden=5, dynamics_hidden=6)
    times = torch.tensor([0.0, 0.2, 0.5, 0.55])
    values, mask = torch.randn(5, 4, 3), torch.rand(5, 4, 3) > 0.5
    out = model(times, values, mask)
    assert out.pred.shape == (5, 4, 3) and out.z.shape == (5, 4, 4)
    assert out.z0.shape == out.qz0_mean.shape == out.qz0_logvar.shape == (5, 4)
    for term in (out.log_likelihood, out.kl, out.elbo):
        assert term.shape == (5,) and torch.isfinite(term).all()
    assert torch.all(out.kl >= 0)
    assert out.n_observed.tolist() == mask.sum((1, 2)).tolist()
    future = torch.tensor([0.6, 1.0, 1.7])
    ext = model(times, values, mask, target_times=future, target_values=torch.randn(5, 3, 3),
                target_mask=torch.ones(5, 3, 3, dtype=torch.bool))
    assert ext.pred.shape == (5, 3, 3) and torch.isfinite(ext.elbo).all()
    only = model(times, values, mask, target_times=future)
    assert only.elbo is None and only.pred.shape == (5, 3, 3)
    assert model.sample_prior(future, 2).shape == (2, 3, 3)


def test_kl_is_zero_when_the_posterior_equals_the_prior():
    assert torch.equal(normal_kl(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))
    model = LatentODE(2, 3, encoder_hidden=4, dynamics_hidden=4)
    with torch.no_grad():
        model.encoder.out.weight.zero_()
        model.encoder.out.bias.zero_()
    out = model(*[x.float() if x.is_floating_point() else x for x in _union([_series(*A), _series(*OTHERS[0])])])
    assert torch.equal(out.kl, torch.zeros(2))
    # And the KL of a shifted posterior is the closed form 0.5 * (mu^2 + s^2 - 1 - log s^2).
    torch.testing.assert_close(normal_kl(torch.tensor([[1.0]]), torch.tensor([[0.5]])),
                               torch.tensor([0.5 * (1 + torch.e ** 0.5 - 1.5)]))


def test_gaussian_log_likelihood_counts_observed_entries_only():
    x, mean = torch.randn(2, 3, 4, dtype=D64), torch.randn(2, 3, 4, dtype=D64)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=D64)
    mask = torch.rand(2, 3, 4) > 0.4
    expected = torch.distributions.Normal(mean, std).log_prob(x).where(mask, torch.zeros((), dtype=D64)).sum((1, 2))
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, std, mask), expected)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_one_training_step_has_finite_gradients(gradient):
    torch.manual_seed(4)
    model = LatentODE(2, 3, encoder_hidden=6, dynamics_hidden=8, learn_obs_std=True, gradient=gradient)
    batch = [x.float() if x.is_floating_point() else x for x in _union([_series(*A)] + [_series(*o) for o in OTHERS])]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = model(*batch).loss(kl_weight=0.5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.dynamics.module[0].weight.grad.abs().max() > 0
    optimiser.step()
    eps = torch.zeros(4, 3)
    assert torch.isfinite(model(*batch, eps=eps).loss())


def test_errors_name_the_argument():
    model = LatentODE(2, 3, t0=0.0)
    times, values, mask = torch.tensor([0.1, 0.3]), torch.zeros(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="strictly increasing"):
        model(torch.tensor([0.3, 0.1]), values, mask)
    with pytest.raises(ValueError, match="mask must have the shape"):
        model(times, values, mask[:, :1])
    with pytest.raises(ValueError, match="before the model's t0"):
        model(torch.tensor([-1.0, 0.3]), values, mask)
    with pytest.raises(ValueError, match="eps must be"):
        model(times, values, mask, eps=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="encoder|kind"):
        LatentODE(2, encoder="lstm")
    with pytest.raises(ValueError, match="step_size"):
        LatentODE(2, step_size=-0.1)
    # A method that does not match step_size is refused where the model is built (the first forward pass used
    # to blame an option the user never gave: "option 'interp' means nothing for method 'dopri5'").
    with pytest.raises(ValueError, match="pass step_size=None with method='dopri5'"):
        LatentODE(2, method="dopri5")
    with pytest.raises(ValueError, match="'rk4' takes fixed steps: give step_size"):
        LatentODE(2, method="rk4", step_size=None)
    with pytest.raises(ValueError, match="unknown method 'dopri'"):
        LatentODE(2, method="dopri")


def test_size_matched_rnn_width_picks_the_closest_parameter_count():
    from neuralode.models import count_parameters, size_matched_rnn_width

    def count(width):
        return count_parameters(RNNBaseline(2, width))

    target = count_parameters(LatentODE(2, 4, encoder="rnn", encoder_hidden=25, dynamics_hidden=20, decoder_hidden=20))
    width = size_matched_rnn_width(2, target)
    assert width == 19
    assert all(abs(count(width) - target) <= abs(count(w) - target) for w in range(1, 40))
    assert size_matched_rnn_width(37, count_parameters(RNNBaseline(37, 32))) == 32  # an exact count: its own width
    assert size_matched_rnn_width(2, 1) == 1
    with pytest.raises(ValueError, match="parameters"):
        size_matched_rnn_width(2, 0)


def test_layer_counts_of_the_dynamics_and_the_encoder_ode():
    default = LatentODE(2, 3, encoder_hidden=6, dynamics_hidden=8)
    linear = lambda module: [m for m in module.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert [m.out_features for m in linear(default.dynamics)] == [8, 8, 3]  # two hidden layers by default
    assert [m.out_features for m in linear(default.encoder.ode_func)] == [12, 6]  # one of 2 * encoder_hidden
    # Rubanova et al.'s PhysioNet sizes: four tanh layers of 50 units in both ODE functions.
    rub = LatentODE(37, 20, encoder_hidden=40, dynamics_hidden=50, dynamics_layers=4, encoder_ode_hidden=50,
                    encoder_ode_layers=4)
    assert [(m.in_features, m.out_features) for m in linear(rub.dynamics)] == [(20, 50), *[(50, 50)] * 3, (50, 20)]
    assert [(m.in_features, m.out_features) for m in linear(rub.encoder.ode_func)] == \
        [(40, 50), *[(50, 50)] * 3, (50, 40)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in rub.dynamics.modules()) == 4
    out = rub(torch.tensor([0.1, 0.5]), torch.randn(2, 2, 37), torch.rand(2, 2, 37) < 0.5)
    assert out.pred.shape == (2, 2, 37)
    with pytest.raises(ValueError, match="dynamics_layers"):
        LatentODE(2, dynamics_layers=0)
    with pytest.raises(ValueError, match="ode_layers"):
        LatentODE(2, encoder_ode_layers=0)


def test_an_empty_batch_gives_empty_outputs():
    """A batch of 0 samples (the tail of a filtered data set) passes through every sequence model (it raised from
    ``lengths.max()`` of an empty tensor)."""
    from neuralode.models import RNNVAE

    times, values, mask = torch.tensor([0.1, 0.4, 0.5]), torch.randn(0, 3, 2), torch.zeros(0, 3, 2, dtype=torch.bool)
    for model in (LatentODE(2, 3), RNNBaseline(2, 5), RNNVAE(2)):
        out = model(times, values, mask)
        assert out.pred.shape[0] == 0 and out.pred.shape[-1] == 2, type(model).__name__
