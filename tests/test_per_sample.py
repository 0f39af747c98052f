"""Per-sample stepping (solve(..., per_sample=True)): each batch element keeps its own steps.

The central property: a sample's result does not depend on the batch it is solved in (to 1e-12 in
float64), and a batch of one takes exactly the steps of a joint solve of that sample.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import neuralode
from neuralode import MaxStepsError, NonFiniteError, solve

f64 = torch.float64


class VanDerPol(torch.nn.Module):
    """Rows independent: sample b has its own mu[b]."""

    def __init__(self, mu):
        super().__init__()
        self.mu = mu   # a plain tensor: a test may differentiate with respect to it

    def forward(self, t, y):
        x, v = y[:, 0], y[:, 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], dim=1)


def single(mu_b):
    def field(t, y):
        return torch.stack([y[1], mu_b * (1 - y[0] * y[0]) * y[1] - y[0]])
    return field


def vdp_batch(batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu = 1 + 9 * torch.rand(batch, generator=generator, dtype=f64)
    y0 = torch.stack([2 + 0.5 * torch.rand(batch, generator=generator, dtype=f64), torch.zeros(batch, dtype=f64)], 1)
    return mu, y0


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2"])
def test_batch_of_one_takes_the_joint_solves_steps(method):
    # A mild oscillator: on stiff stretches rounding-level differences (below) can flip a decision at ratio ~ 1.
    _, y0 = vdp_batch(3)
    mu = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    t = torch.linspace(0, 4, 25, dtype=f64)
    batch = solve(VanDerPol(mu), y0, t, method=method, rtol=1e-6, atol=1e-6, per_sample=True)
    assert batch.success and batch.ys.shape == (25, 3, 2)
    for b in range(3):
        joint = solve(single(mu[b]), y0[b], t, method=method, rtol=1e-6, atol=1e-6)
        assert int(batch.stats["n_steps"][b]) == joint.stats["n_steps"]
        assert int(batch.stats["n_accepted"][b]) == joint.stats["n_accepted"]
        # Same steps, values equal up to rounding: a step size per sample multiplies the stages as a tensor
        # (two roundings) where the joint solve fuses y0 + (h w) k (one), and the error estimate's cancellation
        # turns that ulp into 1e-12 relative in h, which the oscillator's steep phases amplify (measured: up
        # to 2e-9). Far below the solve's own error (rtol 1e-6).
        torch.testing.assert_close(batch.ys[:, b], joint.ys, rtol=1e-7, atol=1e-8)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(2, 9), seed=st.integers(0, 10_000), shared_times=st.booleans(),
       method=st.sampled_from(["dopri5", "tsit5", "dopri8"]),
       controller=st.sampled_from(["integral", "pi", "pid", "predictive"]))
def test_a_samples_result_does_not_depend_on_its_batch(batch, seed, shared_times, method, controller):
    mu, y0 = vdp_batch(batch, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if shared_times:
        t = torch.linspace(0, 3, 9, dtype=f64)
    else:   # every sample its own span and output times
        starts = torch.rand(batch, 1, generator=generator, dtype=f64)
        t = starts + torch.cumsum(0.05 + torch.rand(batch, 9, generator=generator, dtype=f64) * 0.6, dim=1) - 0.05
    options = {"controller": controller}
    if controller == "pid":
        options.update(pcoeff=0.2, icoeff=0.4)
    whole = solve(VanDerPol(mu), y0, t, method=method, rtol=1e-7, atol=1e-8, options=options, per_sample=True)
    order = torch.randperm(batch, generator=generator)
    shuffled = solve(VanDerPol(mu[order]), y0[order], t if shared_times else t[order], method=method,
                     rtol=1e-7, atol=1e-8, options=options, per_sample=True)
    torch.testing.assert_close(shuffled.ys, whole.ys[:, order], rtol=0, atol=1e-12)
    b = int(order[0])
    alone = solve(VanDerPol(mu[b:b + 1]), y0[b:b + 1], t if shared_times else t[b:b + 1], method=method,
                  rtol=1e-7, atol=1e-8, options=options, per_sample=True)
    torch.testing.assert_close(alone.ys[:, 0], whole.ys[:, b], rtol=0, atol=1e-12)
    assert int(alone.stats["n_steps"][0]) == int(whole.stats["n_steps"][b])


def test_per_sample_output_times_against_the_closed_form():
    rates = torch.tensor([0.5, 1.0, 3.0, 7.0], dtype=f64)
    y0 = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=f64).unsqueeze(1)
    t = torch.stack([torch.linspace(0, 1 + b, 11, dtype=f64) for b in range(4)])   # (batch, n), own spans
    solution = solve(lambda t, y: -rates.unsqueeze(1) * y, y0, t, method="tsit5", rtol=1e-10, atol=1e-12,
                     per_sample=True)
    exact = y0 * torch.exp(-rates.unsqueeze(1) * t)          # (batch, n)
    torch.testing.assert_close(solution.ys[..., 0], exact.T, rtol=1e-8, atol=1e-11)
    assert solution.ts is t


def test_time_reaches_the_field_per_sample_and_backwards_in_time():
    # dy/dt = t: each sample sees its own t (shape (batch,)); integrating backwards from t0 to t1.
    seen = []

    def field(t, y):
        seen.append(t.shape)
        return t.unsqueeze(1).expand_as(y).clone()

    t = torch.tensor([[2.0, 1.0, 0.0], [3.0, 2.5, 1.0]], dtype=f64)
    y0 = torch.zeros(2, 1, dtype=f64)
    solution = solve(field, y0, t, method="dopri5", rtol=1e-10, atol=1e-10, per_sample=True)
    exact = (t ** 2 - t[:, :1] ** 2) / 2
    torch.testing.assert_close(solution.ys[..., 0], exact.T, rtol=0, atol=1e-10)
    assert set(seen) == {torch.Size([2])}


def test_a_heterogeneous_batch_takes_fewer_batched_steps_than_a_joint_solve():
    mu = torch.tensor([1.0, 1.0, 1.0, 20.0], dtype=f64)
    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=f64)
    t = torch.linspace(0, 10, 50, dtype=f64)
    per_sample = solve(VanDerPol(mu), y0, t, method="dopri5", rtol=1e-6, atol=1e-6, per_sample=True)
    joint = solve(VanDerPol(mu), y0, t, method="dopri5", rtol=1e-6, atol=1e-6)
    # The easy samples stop early, rejections of the stiff one no longer reject them.
    assert per_sample.stats["n_steps"][:3].max() < per_sample.stats["n_steps"][3]
    assert per_sample.stats["n_iterations"] < joint.stats["n_steps"]
    torch.testing.assert_close(per_sample.ys, joint.ys, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_fixed_step_per_sample_spans_match_joint_grids(interp):
    _, y0 = vdp_batch(3, seed=4)
    mu = torch.tensor([0.5, 1.0, 2.0], dtype=f64)    # (at mu ~ 10 a step of 0.1 is beyond rk4's stability)
    t = torch.stack([torch.linspace(0, 1.0 + 0.37 * b, 6, dtype=f64) for b in range(3)])
    batch = solve(VanDerPol(mu), y0, t, method="rk4", options={"step_size": 0.1, "interp": interp}, per_sample=True)
    for b in range(3):
        joint = solve(single(mu[b]), y0[b], t[b], method="rk4", options={"step_size": 0.1, "interp": interp})
        assert int(batch.stats["n_steps"][b]) == joint.stats["n_steps"]
        torch.testing.assert_close(batch.ys[:, b], joint.ys, rtol=0, atol=1e-12)


def test_gradients_match_finite_differences_and_joint_solves():
    mu, y0 = vdp_batch(3, seed=7)
    t = torch.linspace(0, 2, 5, dtype=f64)

    def loss_per_sample(mu_, y0_):
        return solve(VanDerPol(mu_), y0_, t, method="dopri5", rtol=1e-9, atol=1e-9, per_sample=True).ys.square().sum()

    mu_param = mu.clone().requires_grad_()
    y0_param = y0.clone().requires_grad_()
    loss_per_sample(mu_param, y0_param).backward()
    # Against joint solves of every sample (direct backpropagation through the same steps).
    for b in range(3):
        mu_b = mu[b].clone().requires_grad_()
        y0_b = y0[b].clone().requires_grad_()
        solve(single(mu_b), y0_b, t, method="dopri5", rtol=1e-9, atol=1e-9).ys.square().sum().backward()
        torch.testing.assert_close(mu_param.grad[b], mu_b.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(y0_param.grad[b], y0_b.grad, rtol=1e-9, atol=1e-9)
    # Against central differences of the loss in y0 (tolerance from the solve's own accuracy).
    eps = 1e-6
    for index in [(0, 0), (2, 1)]:
        bump = torch.zeros_like(y0)
        bump[index] = eps
        numeric = (loss_per_sample(mu, y0 + bump) - loss_per_sample(mu, y0 - bump)) / (2 * eps)
        assert abs(float(numeric) - float(y0_param.grad[index])) < 1e-5 * max(1.0, abs(float(numeric)))


def test_float32_keeps_its_dtype_and_accuracy():
    rates = torch.tensor([1.0, 2.0], dtype=torch.float32)
    y0 = torch.ones(2, 3, dtype=torch.float32)
    t = torch.linspace(0, 1, 4)
    solution = solve(lambda t, y: -rates.unsqueeze(1) * y, y0, t, method="dopri5", rtol=1e-5, atol=1e-6,
                     per_sample=True)
    assert solution.ys.dtype == torch.float32
    exact = torch.exp(-rates.unsqueeze(0) * t.unsqueeze(1)).unsqueeze(2).expand(4, 2, 3)
    torch.testing.assert_close(solution.ys, exact, rtol=1e-4, atol=1e-5)


def test_a_failing_sample_is_named_and_throw_false_keeps_the_others():
    # dy/dt = y^2 blows up at t = 1/y0: sample 1 (y0 = 2) at t = 0.5, inside the span; sample 0 never.
    y0 = torch.tensor([[0.1], [2.0], [0.2]], dtype=f64)
    t = torch.linspace(0, 1, 6, dtype=f64)
    with pytest.raises(neuralode.SolverError, match="sample 1"):
        solve(lambda t, y: y * y, y0, t, method="dopri5", per_sample=True)
    solution = solve(lambda t, y: y * y, y0, t, method="dopri5", per_sample=True, throw=False)
    assert not solution.success
    assert solution.status in ("non_finite", "step_size_underflow", "max_steps_reached")
    assert bool(torch.isnan(solution.ys[-1, 1]).all())        # never reached: NaN, not a made-up value
    torch.testing.assert_close(solution.ys[1:2, 0, 0], 0.1 / (1 - 0.1 * t[1:2]), rtol=1e-6, atol=0)


def test_a_failed_sample_stops_alone_and_each_sample_has_its_status():
    # Sample 1 fails at t = 0.5; sample 2 (y0 = 0.9, blow-up at 1.11) takes many more steps to reach t = 1, and
    # goes on after sample 1 has failed, as if solved alone. One status per sample says which to keep.
    y0 = torch.tensor([[0.1], [2.0], [0.9]], dtype=f64)
    t = torch.linspace(0, 1, 6, dtype=f64)
    solution = solve(lambda t, y: y * y, y0, t, method="dopri5", per_sample=True, throw=False, rtol=1e-9, atol=1e-9)
    assert not solution.success and solution.status == solution.sample_status[1] != "success"
    assert solution.sample_status[0] == solution.sample_status[2] == "success"
    assert solution.sample_success.tolist() == [True, False, True]
    exact = y0[:, 0] / (1 - y0[:, 0] * t.unsqueeze(1))
    torch.testing.assert_close(solution.ys[:, [0, 2], 0], exact[:, [0, 2]], rtol=1e-7, atol=0)
    assert bool(torch.isnan(solution.ys[-1, 1]).all())
    # two failures: the message counts them; fixed grids report every sample's status too
    two = solve(lambda t, y: y * y, torch.tensor([[2.0], [0.1], [3.0]], dtype=f64), t, per_sample=True, throw=False)
    assert "2 of 3 samples failed: 0, 2" in two.message and two.sample_success.tolist() == [False, True, False]
    rates = torch.tensor([[1.0], [100.0]], dtype=f64)
    fixed = solve(lambda t, y: -rates * y, torch.ones(2, 1, dtype=f64), torch.linspace(0, 40, 5, dtype=f64),
                  method="rk4", options={"step_size": 0.5}, per_sample=True, throw=False)
    assert fixed.sample_status == ("success", "non_finite")
    assert solve(lambda t, y: -y, torch.ones(2, 1, dtype=f64), t, per_sample=True).sample_status == ("success",) * 2
    with pytest.raises(ValueError, match="per_sample=True"):
        solve(lambda t, y: -y, torch.ones(2, 1, dtype=f64), t).sample_success


@pytest.mark.parametrize("method, options", [("dopri5", {}), ("rk4", {"step_size": 0.05})])
@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_gradients_after_a_sample_failed_match_backpropagation(gradient, method, options):
    # (and backpropagation itself is finite: the assertion on got covers both)
    # The loss reads every output that exists, the failed sample's early ones included: the adjoint solves that
    # sample back from its last reached output, the others from the end, and none of them is poisoned by the NaNs.
    def gradients(strategy):
        rate = torch.tensor(1.0, dtype=f64, requires_grad=True)
        y0 = torch.tensor([[0.1], [2.0 if method == "dopri5" else 0.3], [-1.0], [0.5]], dtype=f64, requires_grad=True)
        # dopri5: sample 1 blows up at t = 0.5. On rk4's fixed grid the discrete gradient near a blow-up is not the
        # adjoint's, so there sample 1's field turns NaN after t = 0.5 instead: backpropagation through the steps
        # then gave NaN for every gradient before the field was guarded (0 x NaN in the rejected steps' graphs).
        switch = torch.tensor([[0.0], [1.0], [0.0], [0.0]], dtype=f64) * (method == "rk4")

        def field(t, y):
            broken = (t.reshape(-1, 1) > 0.5) & (switch > 0)
            return rate * y * y + torch.where(broken, torch.full_like(y, math.nan), torch.zeros_like(y))

        solution = solve(field, y0, torch.linspace(0, 1, 6, dtype=f64), method=method, options=options,
                         per_sample=True, throw=False, gradient=strategy, adjoint_params=(rate,), rtol=1e-10,
                         atol=1e-10)
        assert solution.sample_success.tolist() == [True, False, True, True]
        finite = torch.isfinite(solution.ys)
        assert 1 < int(finite[:, 1].sum()) < 6                     # the failed sample reached some outputs
        (solution.ys[finite] ** 2).sum().backward()
        return y0.grad, rate.grad

    for got, want in zip(gradients(gradient), gradients("direct")):
        assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_an_unstable_fixed_step_is_reported_not_returned():
    y0 = torch.ones(2, 1, dtype=f64)
    rates = torch.tensor([1.0, 100.0], dtype=f64).unsqueeze(1)   # h = 0.5 is far beyond rk4's limit for 100
    t = torch.linspace(0, 40, 5, dtype=f64)
    with pytest.raises(NonFiniteError, match="sample 1"):
        solve(lambda t, y: -rates * y, y0, t, method="rk4", options={"step_size": 0.5}, per_sample=True)
    solution = solve(lambda t, y: -rates * y, y0, t, method="rk4", options={"step_size": 0.5}, per_sample=True,
                     throw=False)
    assert solution.status == "non_finite" and not solution.success
    assert bool(torch.isfinite(solution.ys[:, 0]).all()) and bool(torch.isnan(solution.ys[-1, 1]).all())


def test_max_num_steps_applies_per_sample():
    mu, y0 = vdp_batch(2)
    with pytest.raises(MaxStepsError, match="max_num_steps=5"):
        solve(VanDerPol(mu), y0, torch.linspace(0, 10, 3, dtype=f64), method="dopri5",
              options={"max_num_steps": 5}, per_sample=True)


def test_non_finite_field_values_are_reported_as_such():
    def field(t, y):
        return torch.where(t.unsqueeze(1) > 0.3, torch.full_like(y, math.nan), -y)
    with pytest.raises(NonFiniteError, match="sample 0"):
        solve(field, torch.ones(2, 1, dtype=f64), torch.tensor([0.0, 1.0], dtype=f64), method="dopri5",
              per_sample=True)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"y0": (torch.ones(2, 1), 3.0)}, TypeError, "or a tuple or PyTree of such tensors"),
    ({"y0": torch.ones(0, 2)}, ValueError, r"y0 holds no sample \(shape \(0, 2\)\).*per_sample=False"),
    ({"t": torch.zeros(3, 2)}, ValueError, r"shape \(n,\) or \(batch, n\)"),
    ({"t": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}, ValueError, "different directions"),
    ({"t": torch.tensor([[0.0, 1.0], [0.0, 0.0]])}, ValueError, r"row t\[1\] has zero length"),
    ({"gradient": neuralode.Adjoint(interpolate=True)}, ValueError, r"does not support Adjoint\(interpolate\)"),
    ({"gradient": "adjoint", "rtol": torch.tensor([1e-6])}, ValueError, "takes float tolerances"),
    ({"method": "kvaerno5"}, ValueError, "explicit Runge-Kutta"),
    ({"method": "adams"}, ValueError, "explicit Runge-Kutta"),
    ({"events": [neuralode.Event(lambda t, y: y)]}, ValueError, "does not support events"),
    ({"dense": True}, ValueError, "dense=True"),
    ({"options": {"step_t": [0.5]}}, ValueError, "step_t"),
    ({"method": "rk4"}, ValueError, "step_size"),
    ({"per_sample": 1}, TypeError, "per_sample must be True or False"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    arguments = {"y0": torch.ones(2, 1), "t": torch.tensor([0.0, 1.0]), "method": "dopri5", "per_sample": True}
    arguments.update(kwargs)
    func, y0, t = (lambda t, y: -y), arguments.pop("y0"), arguments.pop("t")
    with pytest.raises(error, match=match):
        solve(func, y0, t, **arguments)


def test_wrong_field_shape_is_reported_at_the_first_evaluation():
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        solve(lambda t, y: y.sum(1), torch.ones(2, 3), torch.tensor([0.0, 1.0]), per_sample=True)


def test_a_field_written_for_a_scalar_time_keeps_its_error_and_gets_a_note():
    """torch.cos(t) * y with t of shape (batch,) fails to broadcast inside the user's field: the user's own
    RuntimeError surfaces, with a note on the shape of t in per-sample mode."""
    with pytest.raises(RuntimeError, match="must match") as info:
        solve(lambda t, y: torch.cos(t) * y, torch.ones(4, 3), torch.tensor([0.0, 1.0]), per_sample=True)
    assert any("receives t of shape (4,)" in note for note in info.value.__notes__)


# --- the per-sample adjoint -----------------------------------------------------------------------------------


def _gradients(gradient, mu, y0, t, method="dopri5", tol=1e-10, options=None):
    mu = mu.clone().requires_grad_()
    y0 = y0.clone().requires_grad_()
    solution = solve(VanDerPol(mu), y0, t, method=method, rtol=tol, atol=tol, per_sample=True, gradient=gradient,
                     adjoint_params=[mu], options=options)
    (solution.ys.square().sum() + solution.ys[-1, :, 0].sum()).backward()
    return mu.grad, y0.grad, solution.stats


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_the_per_sample_adjoint_matches_backpropagation(method):
    mu, y0 = vdp_batch(4, seed=11)
    t = torch.stack([torch.linspace(0.1 * b, 2 + 0.3 * b, 6, dtype=f64) for b in range(4)])
    mu_direct, y0_direct, _ = _gradients("direct", mu, y0, t, method, tol=1e-12)
    mu_adjoint, y0_adjoint, stats = _gradients("adjoint", mu, y0, t, method, tol=1e-12)
    # Both converge to the continuous gradient with the tolerance (measured relative differences: 9e-4 at 1e-8,
    # 6e-6 at 1e-10, 2e-8 at 1e-12; y is recomputed backwards through the oscillators' contracting phases).
    torch.testing.assert_close(mu_adjoint, mu_direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y0_adjoint, y0_direct, rtol=1e-6, atol=1e-7)
    assert stats["nfe_backward"] > 0


def test_the_per_sample_adjoint_matches_finite_differences():
    mu, y0 = vdp_batch(3, seed=5)
    t = torch.linspace(0, 1.5, 4, dtype=f64)
    grad_mu, _, _ = _gradients("adjoint", mu, y0, t)

    def loss(mu_):
        ys = solve(VanDerPol(mu_), y0, t, rtol=1e-12, atol=1e-12, per_sample=True).ys
        return float(ys.square().sum() + ys[-1, :, 0].sum())

    eps = 1e-6
    for b in range(3):
        bump = torch.zeros_like(mu)
        bump[b] = eps
        numeric = (loss(mu + bump) - loss(mu - bump)) / (2 * eps)
        assert abs(numeric - float(grad_mu[b])) < 1e-6 * max(1.0, abs(numeric))


def test_per_sample_adjoint_gradients_do_not_depend_on_the_batch():
    mu, y0 = vdp_batch(5, seed=2)
    t = torch.linspace(0, 2, 5, dtype=f64)
    shared = torch.tensor(1.0, dtype=f64, requires_grad=True)     # one parameter all samples share

    def run(rows):
        shared.grad = None
        y = y0[rows].clone().requires_grad_()
        field = lambda t, z: shared * VanDerPol(mu[rows])(t, z)  # noqa: E731
        solve(field, y, t, rtol=1e-8, atol=1e-8, per_sample=True, gradient="adjoint",
              adjoint_params=[shared]).ys.square().sum().backward()
        return float(shared.grad), y.grad

    total, y_grads = run(list(range(5)))
    alone = [run([b]) for b in range(5)]
    # The shared parameter's gradient is the sum of the samples' own; each y0's gradient is its own.
    assert abs(total - sum(g for g, _ in alone)) < 1e-10 * max(1.0, abs(total))
    for b in range(5):
        torch.testing.assert_close(y_grads[b], alone[b][1][0], rtol=0, atol=1e-12)


def test_per_sample_adjoint_with_a_fixed_step_method():
    mu, y0 = vdp_batch(2, seed=3)
    mu = torch.tensor([0.5, 1.5], dtype=f64)
    t = torch.linspace(0, 1, 5, dtype=f64)
    mu_direct, y0_direct, _ = _gradients("direct", mu, y0, t, "rk4", options={"step_size": 0.01})
    mu_adjoint, y0_adjoint, _ = _gradients("adjoint", mu, y0, t, "rk4", options={"step_size": 0.01})
    # rk4 at h = 0.01: both gradients carry the method's O(h^4) error, differently.
    torch.testing.assert_close(mu_adjoint, mu_direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y0_adjoint, y0_direct, rtol=1e-6, atol=1e-7)


# --- checkpointing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", [("dopri5", None), ("tsit5", None), ("dopri8", None),
                                             ("rk4", {"step_size": 0.05}),
                                             ("rk4", {"step_size": 0.05, "interp": "cubic"})])
def test_checkpointing_gives_the_direct_gradient_exactly(method, options):
    mu, y0 = vdp_batch(4, seed=11)
    t = torch.stack([torch.linspace(0.1 * b, 2 + 0.3 * b, 6, dtype=f64) for b in range(4)])
    mu_direct, y0_direct, _ = _gradients("direct", mu, y0, t, method, tol=1e-6, options=options)
    mu_checkpoint, y0_checkpoint, stats = _gradients("checkpoint", mu, y0, t, method, tol=1e-6, options=options)
    # The same discrete steps replayed: equal to rounding in the order of the sums.
    torch.testing.assert_close(mu_checkpoint, mu_direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y0_checkpoint, y0_direct, rtol=1e-12, atol=1e-12)
    assert stats["nfe_backward"] > 0


def test_checkpointing_keeps_about_the_square_root_of_the_iterations():
    from neuralode.gradients.per_sample_checkpoint import PerSampleCheckpointRun

    run = PerSampleCheckpointRun(None, None, (), None, 1, False)
    run.start(torch.zeros(2, 1))
    n = 1000
    for i in range(n):
        run(None, None, None, None, None, torch.full((2, 1), float(i + 1)))
    assert len(run.schedule) == n
    assert len(run.kept) <= 2 * math.sqrt(2 * n) + 2             # 2 sqrt(2 N) + O(1) states, not N
    assert run.kept[0][0] == 0 and all(i % run.every == 0 for i, _ in run.kept)
    assert all(float(y[0, 0]) == i for i, y in run.kept)           # each kept state is the one after iteration i


def test_checkpointing_matches_direct_after_a_failure_with_throw_false():
    # Sample 1 blows up at t = 0.5 (dy/dt = y^2, y0 = 2): its later outputs are NaN; the others' gradients hold.
    def gradient(strategy):
        y0 = torch.tensor([[0.1], [2.0], [0.2]], dtype=f64, requires_grad=True)
        solution = solve(lambda t, y: y * y, y0, torch.linspace(0, 1, 6, dtype=f64), per_sample=True, throw=False,
                         gradient=strategy)
        assert not solution.success
        finite = torch.isfinite(solution.ys)
        solution.ys[finite].sum().backward()
        return y0.grad

    torch.testing.assert_close(gradient("checkpoint"), gradient("direct"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_only_the_start_time_gives_y0_and_its_identity_gradient(gradient):
    rate = torch.tensor(0.7, dtype=f64, requires_grad=True)
    y0 = torch.ones(3, 2, dtype=f64, requires_grad=True)
    solution = solve(lambda t, y: -rate * y, y0, torch.tensor([0.0], dtype=f64), per_sample=True, gradient=gradient,
                     adjoint_params=[rate])
    assert solution.ys.shape == (1, 3, 2)
    solution.ys.sum().backward()
    assert torch.equal(y0.grad, torch.ones_like(y0)) and (rate.grad is None or float(rate.grad) == 0.0)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 6), seed=st.integers(0, 10_000), shared_times=st.booleans(),
       method=st.sampled_from(["dopri5", "tsit5", "bosh3", "rk4"]))
def test_checkpointing_equals_backpropagation_on_random_batches(batch, seed, shared_times, method):
    mu, y0 = vdp_batch(batch, seed)
    mu = 0.5 + mu / 5                       # (mild oscillators: a fixed rk4 step of 0.05 stays stable)
    generator = torch.Generator().manual_seed(seed + 1)
    if shared_times:
        t = torch.linspace(0, 2, 5, dtype=f64)
    else:
        starts = torch.rand(batch, 1, generator=generator, dtype=f64)
        t = starts + torch.cumsum(0.05 + torch.rand(batch, 5, generator=generator, dtype=f64) * 0.5, dim=1) - 0.05
    options = {"step_size": 0.05} if method == "rk4" else None
    mu_direct, y0_direct, _ = _gradients("direct", mu, y0, t, method, tol=1e-6, options=options)
    mu_checkpoint, y0_checkpoint, _ = _gradients("checkpoint", mu, y0, t, method, tol=1e-6, options=options)
    torch.testing.assert_close(mu_checkpoint, mu_direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y0_checkpoint, y0_direct, rtol=1e-12, atol=1e-12)


def test_double_backward_errors_name_the_per_sample_strategy():
    y0 = torch.randn(3, 2, dtype=f64, requires_grad=True)
    for gradient in ("checkpoint", "adjoint"):
        ys = solve(lambda t, y: -y ** 3, y0, torch.linspace(0, 1, 3, dtype=f64), per_sample=True, gradient=gradient).ys
        with pytest.raises(RuntimeError, match=f"the per-sample {gradient} does not support double backward"):
            torch.autograd.grad(ys.sum(), y0, create_graph=True)


def test_per_sample_nan_just_past_the_state_is_a_non_finite_error():
    """The time-resolution rule of the joint loop holds per sample: a sample that meets NaN just past its state
    stops with a NonFiniteError naming it, not after crawling on by ulps."""
    def field(t, y):
        return torch.where(y < 0.6, torch.full_like(y, math.nan), -y)

    y0 = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(neuralode.NonFiniteError, match="sample 0"):
        neuralode.solve(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="tsit5", per_sample=True,
                        options={"max_num_steps": 3000})


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_a_trial_step_into_nan_leaves_the_gradients_finite(gradient):
    # y' = -k sqrt(y) reaches 0 at t = 2 sqrt(y0) / k; the long first step overshoots below 0 for sample 1 and its
    # trial step is NaN (rejected, the solve succeeds). Backpropagation through the steps used to return NaN for
    # that sample and for k: the rejected step's NaN partial derivatives times its zero cotangent.
    k = torch.tensor(1.0, dtype=f64, requires_grad=True)
    y0 = torch.tensor([[1.0], [0.5]], dtype=f64, requires_grad=True)
    end = 1.35
    solution = solve(lambda t, y: -k * torch.sqrt(y), y0, torch.tensor([0.0, end], dtype=f64), per_sample=True,
                     gradient=gradient, adjoint_params=(k,), rtol=1e-8, atol=1e-10, options={"first_step": 1.0})
    assert solution.success and int(solution.stats["n_rejected"][1]) > 0
    solution.ys[-1].sum().backward()
    root = y0.detach().sqrt() - end / 2                         # sqrt(y(end)), k = 1
    torch.testing.assert_close(y0.grad, root / y0.detach().sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(k.grad, (-end * root).sum(), rtol=1e-5, atol=0)


def test_a_failed_backward_solve_gives_nan_gradients_not_a_partial_sum():
    # With throw=False, a sample whose adjoint backward solve fails gets NaN gradients, and so does every shared
    # parameter: its quadrature would lack the rest of that sample's integral (a finite, wrong sum before).
    rate = torch.tensor(0.5, dtype=f64, requires_grad=True)
    backward = {"on": False}

    def field(t, y):
        broken = torch.tensor([[0.0], [1.0]], dtype=f64) * backward["on"] * (t.reshape(-1, 1) < 0.5)
        return -rate * y + torch.where(broken > 0, torch.full_like(y, math.nan), torch.zeros_like(y))

    y0 = torch.tensor([[1.0], [2.0]], dtype=f64, requires_grad=True)
    solution = solve(field, y0, torch.linspace(0, 1, 3, dtype=f64), per_sample=True, throw=False,
                     gradient="adjoint", adjoint_params=(rate,))
    assert solution.success
    backward["on"] = True
    solution.ys.sum().backward()
    assert bool(torch.isfinite(y0.grad[0]).all()) and bool(torch.isnan(y0.grad[1]).all())
    assert bool(torch.isnan(rate.grad))


def test_a_failed_sample_stays_stopped_while_the_others_run_on():
    # Sample 0's field is NaN after t = 0.5; sample 1 runs long after that. The failed sample was retired for one
    # iteration only and then stepped again, so its steps and status depended on the rest of its batch.
    def field(t, y):
        bad = (t.reshape(-1, 1) > 0.5) & (torch.arange(y.shape[0]).reshape(-1, 1) == 0)
        return torch.where(bad, torch.full_like(y, math.nan), -20 * y * torch.cos(40 * t.reshape(-1, 1)))

    y0, t = torch.ones(2, 1, dtype=f64), torch.tensor([0.0, 1.0, 5.0], dtype=f64)
    alone = solve(field, y0[:1], t, per_sample=True, throw=False, rtol=1e-7, atol=1e-7)
    both = solve(field, y0, t, per_sample=True, throw=False, rtol=1e-7, atol=1e-7)
    assert both.sample_status == (alone.sample_status[0], "success")
    assert int(both.stats["n_steps"][0]) == int(alone.stats["n_steps"][0])
    torch.testing.assert_close(both.ys[:, :1], alone.ys, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_a_sample_that_overflows_on_a_fixed_grid_leaves_the_gradients_finite(gradient):
    # y' = k y^2 from y0 = 1 on rk4's grid of 0.01: sample 0's last finite state is ~1e193, where k y^2 overflows.
    # Standing still there (h = 0) still met y + 0 * inf; finished and failed rows now stand at their first state.
    k = torch.tensor(1.0, dtype=f64, requires_grad=True)
    y0 = torch.tensor([[1.0], [0.1]], dtype=f64, requires_grad=True)
    solution = solve(lambda t, y: k * y * y, y0, torch.tensor([0.0, 0.5, 1.2], dtype=f64), method="rk4",
                     options={"step_size": 0.01}, per_sample=True, throw=False, gradient=gradient, adjoint_params=(k,))
    assert solution.sample_status == ("non_finite", "success")
    solution.ys[torch.isfinite(solution.ys)].sum().backward()
    # d/dy0 of y(0.5) = y0 / (1 - k y0 t): 1 / (1 - 0.5)^2 = 4 for sample 0, plus 1 from y(0) itself
    torch.testing.assert_close(y0.grad[0, 0], torch.tensor(5.0, dtype=f64), rtol=1e-6, atol=0)
    assert bool(torch.isfinite(k.grad))


def test_a_sample_the_loss_leaves_out_is_not_solved_back():
    # The documented pattern: the loss reads the samples that succeeded. Sample 1 is pushed through its pole at
    # min_step (an output of -5.9e6 before it fails); solving it back from there failed and made every parameter's
    # gradient NaN, though its gradients are all zero. The adjoint now starts each sample at its last needed output.
    def gradients(strategy):
        k = torch.tensor(1.0, dtype=f64, requires_grad=True)
        y0 = torch.tensor([[0.2], [2.0], [0.5]], dtype=f64, requires_grad=True)
        solution = solve(lambda t, y: k * y * y, y0, torch.linspace(0, 1, 5, dtype=f64), per_sample=True,
                         throw=False, gradient=strategy, adjoint_params=(k,), options={"min_step": 1e-3})
        assert solution.sample_status[1] != "success"
        solution.ys[:, solution.sample_success].square().mean().backward()
        return y0.grad, k.grad

    for got, want in zip(gradients("adjoint"), gradients("direct")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint"])
def test_a_step_that_ends_where_the_field_is_nan_leaves_the_gradients_finite(gradient):
    # y' = -s k sqrt(y) reaches 0 at t = 2 sqrt(y0) / k; dopri8 (not FSAL) accepts steps ending just below 0, where
    # sqrt is NaN: the next step's first evaluation and the dense output at that end read NaN. Those rows' results
    # are dropped, but their graph made the gradients of the failed samples and of the shared s NaN.
    def gradients(strategy):
        k = torch.tensor([[2.3041308281947974], [0.6090712073808531], [1.630683235084828], [1.6909365905757239]],
                         dtype=f64, requires_grad=True)
        s = torch.tensor(1.0, dtype=f64, requires_grad=True)
        y0 = torch.tensor([[0.1906627658920708], [0.6835002965777023], [0.33615966255433727], [0.7324529779122758]],
                          dtype=f64, requires_grad=True)
        t = torch.tensor([0.0, 0.7998015856061248, 0.8876436311057939, 0.9040570511317403, 0.9204824374101686,
                          1.023868889047556], dtype=f64)
        solution = solve(lambda tt, y: -s * k * torch.sqrt(y), y0, t, method="dopri8", rtol=1e-8, atol=1e-8,
                         per_sample=True, throw=False, gradient=strategy, adjoint_params=(k, s))
        assert solution.sample_success.tolist() == [False, True, False, False]
        solution.ys[torch.isfinite(solution.ys)].sum().backward()
        return y0.grad, k.grad, s.grad

    for got, want in zip(gradients(gradient), gradients("adjoint")):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_a_first_step_per_sample_is_each_samples_own(gradient):
    """options={'first_step': tensor (batch,)} (torchode's dt0): every sample starts with its own step, as if solved
    alone with that number; bad tensors are refused with the argument named."""
    mu, y0 = vdp_batch(3)
    mu = (0.2 * mu).requires_grad_()   # (mild enough for the adjoint's backward solve: Van der Pol repels backwards)
    t = torch.linspace(0.0, 2.0, 5, dtype=f64)
    first = torch.tensor([1e-3, 0.05, 0.3], dtype=f64)
    kwargs = dict(method="dopri5", rtol=1e-7, atol=1e-9, per_sample=True, gradient=gradient, adjoint_params=(mu,))

    def rows(index):   # (mu indexed inside the field: the adjoint differentiates the field with respect to mu)
        return lambda t, y: VanDerPol(mu[index])(t, y)

    batch = solve(rows(slice(None)), y0, t, options={"first_step": first}, **kwargs)
    grad_batch, = torch.autograd.grad(batch.ys.square().sum(), mu)
    for b in range(3):
        alone = solve(rows(slice(b, b + 1)), y0[b:b + 1], t, options={"first_step": float(first[b])}, **kwargs)
        assert int(alone.stats["n_steps"][0]) == int(batch.stats["n_steps"][b])
        torch.testing.assert_close(batch.ys[:, b], alone.ys[:, 0], rtol=1e-12, atol=1e-13)
        grad_alone, = torch.autograd.grad(alone.ys.square().sum(), mu)
        # (the adjoint's backward solve starts from Hairer's step in the batch and from the number alone: agreement
        # to its tolerance there)
        torch.testing.assert_close(grad_batch[b], grad_alone[b], rtol=1e-6 if gradient == "adjoint" else 1e-9,
                                   atol=1e-12)
    # A different first step changes the steps: the option is not ignored.
    with torch.no_grad():
        other = solve(rows(slice(None)), y0, t, options={"first_step": first.flip(0)}, **kwargs)
    assert not torch.equal(other.stats["n_steps"], batch.stats["n_steps"])
    for bad, error, match in ((first[:2], ValueError, r"shape \(batch,\) = \(3,\)"),
                              (torch.tensor([1e-3, 0.0, 0.1], dtype=f64), ValueError, "sample 1 has 0.0"),
                              (torch.tensor([1e-3, math.nan, 0.1]), ValueError, "sample 1 has nan")):
        with pytest.raises(error, match=match):
            solve(VanDerPol(mu), y0, t, options={"first_step": bad}, **kwargs)
    # beside a controller object, which holds one number (and the tensor is used: flipped, other steps)
    pid = neuralode.PIDController(pcoeff=0.2, icoeff=0.5)
    with torch.no_grad():
        with_pid = [solve(rows(slice(None)), y0, t, options={"first_step": steps}, controller=pid, **kwargs)
                    for steps in (first, first.flip(0))]
    assert with_pid[0].success and not torch.equal(with_pid[0].stats["n_steps"], with_pid[1].stats["n_steps"])
    with pytest.raises(ValueError, match="options=\\{'first_step': tensor\\} with per_sample=True"):
        neuralode.PIDController(first_step=first)
    with pytest.raises(ValueError, match="a first step per sample needs per_sample=True"):
        solve(rows(slice(None)), y0, t, method="dopri5", options={"first_step": first})
    with pytest.raises(ValueError, match="'first_step' means nothing for method 'rk4'"):
        solve(VanDerPol(mu), y0, t, method="rk4", per_sample=True, options={"first_step": first, "step_size": 0.1})


def test_tuple_and_pytree_states_step_per_sample_as_one_row_each():
    """A pair of (batch, 2) tensors, and a dict with a (batch, 2, 3) part: the same numbers and steps as the flat
    state (the loop sees one row per sample), ys in the user's structure, every gradient strategy."""
    batch = 4
    rate = torch.linspace(1, 4, batch, dtype=f64)
    t = torch.linspace(0, 3, 5, dtype=f64)
    q0, p0 = torch.ones(batch, 2, dtype=f64), torch.zeros(batch, 2, dtype=f64)
    pair = solve(lambda t, y: (y[1], -rate[:, None] * y[0]), (q0, p0), t, per_sample=True, rtol=1e-8, atol=1e-8)
    flat = solve(lambda t, y: torch.cat([y[:, 2:], -rate[:, None] * y[:, :2]], 1), torch.cat([q0, p0], 1), t,
                 per_sample=True, rtol=1e-8, atol=1e-8)
    assert pair.ys[0].shape == (5, batch, 2) and torch.equal(pair.ys[0], flat.ys[:, :, :2])
    assert torch.equal(pair.ys[1], flat.ys[:, :, 2:]) and torch.equal(pair.stats["n_steps"], flat.stats["n_steps"])
    tree = solve(lambda t, y: {"x": -y["x"], "m": [-2 * y["m"][0]]}, {"x": torch.ones(batch, 3, dtype=f64),
                 "m": [torch.ones(batch, 2, 3, dtype=f64)]}, t, per_sample=True, rtol=1e-10, atol=1e-10)
    assert tree.ys["m"][0].shape == (5, batch, 2, 3)
    assert torch.allclose(tree.ys["m"][0][-1], torch.full((batch, 2, 3), math.exp(-6.0), dtype=f64), atol=1e-8)
    weight = torch.tensor(1.3, dtype=f64, requires_grad=True)
    grads = {}
    for gradient in ("direct", "checkpoint", "adjoint"):
        x0 = q0.clone().requires_grad_(True)
        sol = solve(lambda t, y: [weight * y[1], -y[0]], (x0, p0), t, per_sample=True, gradient=gradient,
                    adjoint_params=(weight,), rtol=1e-9, atol=1e-9)
        grads[gradient] = torch.autograd.grad(sol.ys[0].pow(2).sum(), (x0, weight))
    for gradient, bound in (("checkpoint", 1e-12), ("adjoint", 1e-6)):
        for a, b in zip(grads["direct"], grads[gradient]):
            assert torch.allclose(a, b, rtol=bound, atol=bound), gradient
    with pytest.raises(TypeError, match="derivative in y0's structure"):
        solve(lambda t, y: y[0], (q0, p0), t, per_sample=True)
    with pytest.raises(ValueError, match="takes rtol as a number"):
        solve(lambda t, y: y, (q0, p0), t, per_sample=True, rtol=torch.full((batch, 2), 1e-6))
    with pytest.raises(ValueError, match="takes atol as a number"):
        solve(lambda t, y: y, (q0, p0), t, per_sample=True, atol=[1e-3, 1e-12])
    # (found by the QA round: a derivative of the right row width but another shape or dtype passed, silently)
    wide = torch.zeros(batch, 3, dtype=f64)
    with pytest.raises(ValueError,
                       match=r"tensor 0 \(in y0's order\), returned shape \(4, 3\) but the state has shape \(4, 2\)"):
        solve(lambda t, y: (-y[1], -y[0]), (q0, wide), t, per_sample=True)
    with pytest.raises(ValueError, match=r"tensor 0 \(in y0's order\), returned shape \(2,\)"):
        solve(lambda t, y: (-y[0][0], -y[1]), (q0, p0), t, per_sample=True)
    with pytest.raises(TypeError, match=r"tensor 1 \(in y0's order\), returned dtype torch.float32"):
        solve(lambda t, y: (-y[0], -y[1].float()), (q0, p0), t, per_sample=True)
    with pytest.raises(ValueError, match="holds no sample"):
        solve(lambda t, y: y, (q0[:0], p0[:0]), t, per_sample=True)
