"""Symplectic splitting methods (method="leapfrog", "semi_implicit_euler", "yoshida4", "mclachlan4", "yoshida6";
neuralode.solvers.Symplectic) and the leapfrog/midpoint two-step method (method="leapfrog_midpoint").

Orders are measured by regression against scipy's DOP853 on a forced pendulum whose two parts both depend on time;
the energy of a Hamiltonian system must stay bounded (the property that makes these methods worth their cost);
gradients through the steps, undone by gradient="reversible", equal backpropagation's to rounding.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers import LeapfrogMidpoint, Symplectic
from neuralode.tableaus.splitting import SPLITTING_METHODS, SplittingMethod

F64 = torch.float64
SPLITTING = sorted(SPLITTING_METHODS)


def forced_pendulum(t, y):
    """q' = p (1 + 0.3 cos t), p' = -sin q + 0.5 sin 2t: separable, both parts time-dependent."""
    q, p = y
    return p * (1 + 0.3 * torch.cos(t)), -torch.sin(q) + 0.5 * torch.sin(2 * t)


def _pendulum_reference(t_end, q0=1.0, p0=0.3):
    from scipy.integrate import solve_ivp
    def rhs(t, y):
        return [y[1] * (1 + 0.3 * math.cos(t)), -math.sin(y[0]) + 0.5 * math.sin(2 * t)]
    return solve_ivp(rhs, (0.0, t_end), [q0, p0], method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]


def _pair(q0=1.0, p0=0.3):
    return torch.tensor([q0], dtype=F64), torch.tensor([p0], dtype=F64)


# Step sizes whose errors stay far above rounding (order 6 at h = 0.1: 1.7e-9).
STEPS = {1: (0.1, 0.05, 0.025), 2: (0.1, 0.05, 0.025), 4: (0.2, 0.1, 0.05), 6: (0.4, 0.2, 0.1)}


@pytest.mark.parametrize("method", SPLITTING)
def test_order_on_a_time_dependent_field(method):
    """Log-log regression of the end error over three step sizes gives the claimed order (within 0.2): each part's
    derivative is read at the time the other part has reached. (Reading both at t0, as diffrax's semi-implicit Euler
    does, was measured to drop the leapfrog and the fourth-order methods to order 1 here.)"""
    order = SPLITTING_METHODS[method].order
    exact = _pendulum_reference(2.0)
    errors = []
    for h in STEPS[order]:
        sol = neuralode.solve(forced_pendulum, _pair(), torch.tensor([0.0, 2.0], dtype=F64), method=method,
                              options={"step_size": h})
        assert sol.status == "success"
        errors.append(max(abs(sol.ys[0][-1, 0].item() - exact[0]), abs(sol.ys[1][-1, 0].item() - exact[1])))
    slope = np.polyfit(np.log(STEPS[order]), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.2, (method, errors, slope)


def _energy_errors(method, h, t_end):
    """|H(t) - H(0)| on the step grid for the pendulum H = p^2/2 - cos q."""
    t = torch.arange(0.0, t_end + h / 2, h, dtype=F64)
    sol = neuralode.solve(lambda t, y: (y[1], -torch.sin(y[0])), _pair(1.0, 0.0), t, method=method,
                          options={"step_size": h})
    energy = sol.ys[1][:, 0] ** 2 / 2 - torch.cos(sol.ys[0][:, 0])
    return (energy - energy[0]).abs()


def test_energy_error_stays_bounded_where_runge_kutta_drifts():
    """The symplectic methods' energy error oscillates without growing: as large in the second half of a long run as
    in the first. rk4 loses energy steadily; with the evaluations of yoshida4 (h = 0.2 against 0.3, 4 evaluations a
    step against 6) it ends above it. Measured on [0, 300]: leapfrog (h = 0.1) 1.06e-3 in both halves, yoshida4
    3.20e-4 in both, rk4 2.6e-4 then 5.1e-4."""
    for method, h in (("leapfrog", 0.1), ("yoshida4", 0.3)):
        errors = _energy_errors(method, h, 300.0)
        half = len(errors) // 2
        assert errors[half:].max() <= 1.01 * errors[:half].max(), method
    rk4 = _energy_errors("rk4", 0.2, 300.0)
    half = len(rk4) // 2
    assert rk4[half:].max() >= 1.8 * rk4[:half].max()       # (the control: this property can fail)
    assert errors.max() < rk4[-1]


def test_stage_times():
    """The times at which a mock field is evaluated: the fresh start (t0), the three separability probes (inside the
    first step, at t0 + 0.382 h), then the kick-drift-kick leapfrog's drift at t0 + h/2 and kick at t0 + h per step
    (its first kick reuses the previous step's last evaluation); semi-implicit Euler drifts at t0 (q from the old p)
    and kicks at t0 + h."""
    probes = [0.0382] * 3
    for method, expected in (("leapfrog", [0.0, *probes, 0.05, 0.1, 0.15, 0.2]),
                             ("semi_implicit_euler", [0.0, *probes, 0.1, 0.1, 0.2])):
        times = []

        def field(t, y):
            times.append(t.item())
            return y[1], -y[0]
        neuralode.solve(field, _pair(), torch.tensor([0.0, 0.2], dtype=F64), method=method, options={"step_size": 0.1})
        assert np.allclose(times, expected, atol=1e-15), (method, times)


@pytest.mark.parametrize("method", SPLITTING)
def test_evaluations_per_step(method):
    """nfe = 1 (the start) + 3 (the separability probes, for a field not seen before) + steps x evaluations a step,
    less one where the first step's first substep reads the start's evaluation instead of one carried over. The same
    field object is not probed again (a training loop's module, a checkpoint replay)."""
    n_steps = 7
    field = lambda t, y: forced_pendulum(t, y)   # noqa: E731 (a field not seen before)
    spec = SPLITTING_METHODS[method]
    steps = n_steps * spec.evaluations_per_step - (not spec.reuses_last_evaluation)
    for probes in (3, 0):
        sol = neuralode.solve(field, _pair(), torch.tensor([0.0, 0.7], dtype=F64), method=method,
                              options={"step_size": 0.1})
        assert sol.stats["n_steps"] == n_steps
        assert sol.stats["nfe"] == 1 + probes + steps
    assert SPLITTING_METHODS["leapfrog"].evaluations_per_step == 2


class _Separable(torch.nn.Module):
    """q' = exp(s) p (1 + 0.2 cos t), p' = tanh(q W1 + b) W2 + 0.1 sin t: a learnable separable field, float64."""

    def __init__(self, dim=3, hidden=8, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(dim, hidden, generator=generator, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(hidden, dim, generator=generator, dtype=F64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=generator, dtype=F64))
        self.s = torch.nn.Parameter(torch.tensor(0.2, dtype=F64))

    def forward(self, t, y):
        q, p = y
        return (torch.exp(self.s) * p * (1 + 0.2 * torch.cos(t)),
                torch.tanh(q @ self.w1 + self.b) @ self.w2 + 0.1 * torch.sin(t))


def _gradients(method, gradient, field, q0, p0, t, tree=False):
    state = ({"q": q0}, [p0]) if tree else (q0, p0)
    func = field
    if tree:
        def func(t, y):
            dq, dp = field(t, (y[0]["q"], y[1][0]))
            return {"q": dq}, [dp]
    sol = neuralode.solve(func, state, t, method=method, options={"step_size": 0.05}, gradient=gradient,
                          adjoint_params=tuple(field.parameters()))
    q, p = (sol.ys[0]["q"], sol.ys[1][0]) if tree else sol.ys
    loss = (q ** 2).sum() + (p * q).sum() + q[len(q) // 2].sum()
    return sol, torch.autograd.grad(loss, [q0, p0, *field.parameters()])


@pytest.mark.parametrize("method", SPLITTING)
def test_reversible_and_checkpoint_gradients_equal_backpropagation(method):
    """gradient="reversible" undoes the steps (one evaluation and product a substep) and "checkpoint" replays them:
    both give backpropagation's gradient to rounding, with outputs between grid points (a linear interpolation, whose
    cotangent is split between the step ends) and on them."""
    field = _Separable()
    q0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    p0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    t = torch.tensor([0.0, 0.3, 0.62, 1.03], dtype=F64)
    _, direct = _gradients(method, "direct", field, q0, p0, t)
    for gradient in ("reversible", "checkpoint"):
        sol, other = _gradients(method, gradient, field, q0, p0, t)
        for a, b in zip(direct, other):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (method, gradient, (a - b).abs().max())
    assert sol.stats["n_steps"] == 21


def test_reversible_gradient_with_pytree_parts_and_backwards_time():
    field = _Separable(dim=2)
    q0 = torch.tensor([[0.3, -0.2]], dtype=F64, requires_grad=True)
    p0 = torch.tensor([[0.1, 0.4]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, -0.5, -1.0], dtype=F64)
    _, direct = _gradients("yoshida4", "direct", field, q0, p0, t, tree=True)
    sol, reversible = _gradients("yoshida4", "reversible", field, q0, p0, t, tree=True)
    for a, b in zip(direct, reversible):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert sol.stats["reversible_drift"] < 1.0
    # one evaluation and one vector-Jacobian product a substep: yoshida4 has 7
    assert sol.stats["nfe_backward"] == 7 * sol.stats["n_steps"]


def test_reversible_gradient_against_finite_differences():
    def func(t, y, args):
        return args * y[1], -torch.sin(y[0])
    args = torch.tensor(1.3, dtype=F64, requires_grad=True)
    q0 = torch.tensor([0.5], dtype=F64, requires_grad=True)

    def end(q0, args):
        sol = neuralode.solve(func, (q0, torch.tensor([0.2], dtype=F64)), torch.tensor([0.0, 0.7], dtype=F64),
                              method="leapfrog", options={"step_size": 0.1}, args=args, gradient="reversible")
        return sol.ys[0][-1]
    assert torch.autograd.gradcheck(end, (q0, args))


def test_adjoint_uses_an_ordinary_method_backwards():
    """The adjoint's augmented state is no (q, p) pair: its default backward method is an ordinary one of the same
    order on the same grid (yoshida4: rk4), and its gradient is the continuous one's approximation."""
    field = _Separable()
    q0 = torch.full((1, 3), 0.2, dtype=F64, requires_grad=True)
    p0 = torch.full((1, 3), -0.1, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    _, direct = _gradients("yoshida4", "direct", field, q0, p0, t)
    _, adjoint = _gradients("yoshida4", "adjoint", field, q0, p0, t)
    for a, b in zip(direct, adjoint):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert Symplectic("yoshida4").ordinary_counterpart == "rk4"
    with pytest.raises(ValueError, match="piecewise-linear"):
        neuralode.solve(field, (q0, p0), t, method="leapfrog", options={"step_size": 0.1},
                        gradient=neuralode.Adjoint(interpolate=True))


def test_float32_and_the_method_object():
    sol = neuralode.solve(lambda t, y: (y[1], -y[0]), (torch.ones(2), torch.zeros(2)), torch.linspace(0, 1, 3),
                          method=Symplectic("mclachlan4"), options={"step_size": 0.05})
    assert sol.ys[0].dtype == torch.float32
    assert abs(sol.ys[0][-1, 0].item() - math.cos(1.0)) < 1e-6
    custom = SplittingMethod("my_verlet", drift=(0.5, 0.5), kick=(1.0, 0.0), order=2)   # position Verlet
    sol = neuralode.solve(lambda t, y: (y[1], -y[0]), _pair(1.0, 0.0), torch.tensor([0.0, 1.0], dtype=F64),
                          method=Symplectic(custom), options={"step_size": 0.01})
    assert abs(sol.ys[0][-1, 0].item() - math.cos(1.0)) < 1e-5


def test_event_with_a_bounce_restarts_the_method():
    """A ball under gravity (q' = p, p' = -1) bounces at q = 0 (p -> -p): the method starts afresh from the new state
    and the leapfrog, exact for a constant force, brings it back to its starting height."""
    def bounce(t, y, fired):
        return y[0], -y[1]
    event = neuralode.Event(lambda t, y: y[0][0], terminal=False, affect=bounce, direction=-1)
    sol = neuralode.solve(lambda t, y: (y[1], -torch.ones_like(y[0])), _pair(1.0, 0.0),
                          torch.tensor([0.0, 2 * math.sqrt(2.0)], dtype=F64), method="leapfrog",
                          options={"step_size": 0.01}, events=[event])
    assert sol.status == "success"
    assert abs(sol.ys[0][-1, 0].item() - 1.0) < 1e-3 and abs(sol.ys[1][-1, 0].item()) < 1e-2


def test_a_non_finite_field_is_never_success():
    def field(t, y):
        bad = torch.where(t > 0.55, torch.tensor(float("nan"), dtype=F64), torch.tensor(1.0, dtype=F64))
        return y[1], -y[0] * bad
    sol = neuralode.solve(field, _pair(), torch.linspace(0, 1, 5, dtype=F64), method="yoshida4",
                          options={"step_size": 0.1}, throw=False)
    assert sol.status != "success"
    assert bool(torch.isfinite(sol.ys[0]).all()) and len(sol.ys[0]) < 5


@pytest.mark.parametrize("y0, match", [
    (torch.ones(2, dtype=F64), "got one tensor"),
    ((torch.ones(1), torch.ones(1), torch.ones(1)), "a tuple of 3 tensors"),
    ({"q": torch.ones(1), "p": torch.ones(1)}, "got the structure"),
])
def test_a_state_that_is_not_a_pair_is_refused(y0, match):
    with pytest.raises(ValueError, match=f"integrates a separable system.*{match}"):
        neuralode.solve(lambda t, y: y, y0, torch.tensor([0.0, 1.0]), method="leapfrog", options={"step_size": 0.1})


@pytest.mark.parametrize("field, y0, part", [
    (lambda t, y: (y[1] + 0.1 * y[0], -y[0]), _pair(), "dq/dt changed"),
    (lambda t, y: (y[1], -y[0] - 0.2 * y[1]), _pair(), "dp/dt changed"),
    # a coupling that vanishes at t0 (found by the QA round: order 1 with status success when probed at t0)
    (lambda t, y: (y[1], -y[0] - 2 * torch.sin(t) * y[1]), _pair(), "dp/dt changed"),
    # friction on momenta relative to their mean: blind to a move of every element by the same amount
    (lambda t, y: (y[1], -y[0] - (y[1] - y[1].mean())), (torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)),
     "dp/dt changed"),
    # undefined at the larger probe (q + 0.1 (|q| + 1) > 1): probed with a smaller move
    (lambda t, y: (y[1] + torch.sqrt(1 - y[0]), -y[0]), _pair(0.95, 0.0), "dq/dt changed"),
])
def test_a_field_that_is_not_separable_is_refused(field, y0, part):
    """A damped oscillator (dp/dt reads p) or a swapped pair would be integrated to order 1, silently."""
    with pytest.raises(ValueError, match=f"needs a separable field, but {part}"):
        neuralode.solve(field, y0, torch.tensor([0.0, 0.2], dtype=F64), method="yoshida4",
                        options={"step_size": 0.1})


def test_a_hamiltonian_field_differentiated_inside_and_a_named_tuple_pair():
    """A Hamiltonian network's field takes autograd.grad of H inside; the probes run under the caller's grad mode (a
    probe under no_grad failed with 'element 0 of tensors does not require grad')."""
    class Hamiltonian(torch.nn.Module):
        def forward(self, t, y):
            q = y[0] if y[0].requires_grad else y[0].detach().requires_grad_()
            p = y[1] if y[1].requires_grad else y[1].detach().requires_grad_()
            energy = (p ** 2).sum() / 2 + (1 - torch.cos(q)).sum()
            dq, dp = torch.autograd.grad(energy, (q, p), create_graph=True)
            return dp, -dq
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    sol = neuralode.solve(Hamiltonian(), (torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)), t,
                          method="leapfrog", options={"step_size": 0.1})
    assert sol.status == "success"
    # the output times' gradients evaluate the field in backward, where grad mode is off: dL/dt_i = sum(p(t_i))
    sol.ys[0].sum().backward()
    assert torch.allclose(t.grad[1:], sol.ys[1].detach().sum(1)[1:], atol=1e-12)
    from collections import namedtuple
    Pair = namedtuple("Pair", "q p")
    sol = neuralode.solve(lambda t, y: Pair(y.p, -y.q), Pair(*_pair(1.0, 0.0)), torch.tensor([0.0, 1.0], dtype=F64),
                          method="leapfrog", options={"step_size": 0.01})
    assert abs(sol.ys.q[-1, 0].item() - math.cos(1.0)) < 1e-5


def test_a_derivative_whose_shape_changes_along_the_solve_is_an_error():
    """The first evaluation's shapes are checked where the problem is built; the stepper adds each derivative tensor to
    its part, where a shape that changed later would broadcast (found by the QA round: wrong numbers, status success)."""
    def field(t, y):
        q, p = y
        return (p[:1] if float(t) > 0.3 else p), -q
    with pytest.raises(ValueError, match=r"returned \(1,\) for the state's tensor 0 .* shape \(2,\)"):
        neuralode.solve(field, (torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)), torch.tensor([0.0, 1.0],
                        dtype=F64), method="leapfrog", options={"step_size": 0.1})


def test_splitting_method_validates_its_coefficients():
    with pytest.raises(ValueError, match="drift coefficients sum to"):
        SplittingMethod("x", drift=(0.5, 0.4), kick=(0.5, 0.5), order=1)
    with pytest.raises(ValueError, match="same number"):
        SplittingMethod("x", drift=(1.0,), kick=(0.5, 0.5), order=1)
    with pytest.raises(ValueError, match="is of order 1"):
        SplittingMethod("x", drift=(1.0,), kick=(1.0,), order=2)
    with pytest.raises(ValueError, match="finite"):
        SplittingMethod("x", drift=(float("nan"),), kick=(1.0,), order=1)
    with pytest.raises(ValueError, match="must name a splitting method"):
        Symplectic("verlet")
    with pytest.raises(TypeError, match="SplittingMethod"):
        Symplectic(3)
    with pytest.raises(TypeError, match="drift must be a tuple of real numbers"):
        SplittingMethod("x", drift=1.0, kick=(1.0,), order=1)
    with pytest.raises(ValueError, match="order must be a positive integer"):
        SplittingMethod("x", drift=(1.0,), kick=(1.0,), order=True)
    with pytest.raises(ValueError, match="backward state .* is no \\(q, p\\) pair"):
        neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=F64, requires_grad=True), torch.tensor([0.0, 1.0]),
                        method="rk4", options={"step_size": 0.1}, gradient=neuralode.Adjoint(method="yoshida4"))
    with pytest.raises(ValueError, match="option 'first_step' means nothing"):
        neuralode.solve(lambda t, y: (y[1], -y[0]), _pair(), torch.tensor([0.0, 1.0], dtype=F64), method="leapfrog",
                        options={"step_size": 0.1, "first_step": 0.1})


# --- leapfrog/midpoint ---------------------------------------------------------------------------------------------

def test_leapfrog_midpoint_is_the_two_step_recurrence_and_of_order_two():
    """y1 = y0 + h f(t0, y0) (Euler), then y_{n+1} = y_{n-1} + 2 h f(t_n, y_n): the recurrence, written out here, to
    rounding; the end error on y'' = -y halves twice per halving of h."""
    def field(t, y):
        return torch.stack([y[1], -y[0]])
    h, n = 0.05, 40
    y_prev, y = torch.tensor([1.0, 0.0], dtype=F64), None
    y = y_prev + h * field(0.0, y_prev)
    for k in range(1, n):
        y_prev, y = y, y_prev + 2 * h * field(k * h, y)
    sol = neuralode.solve(field, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, n * h], dtype=F64),
                          method="leapfrog_midpoint", options={"step_size": h})
    assert torch.allclose(sol.ys[-1], y, rtol=1e-13, atol=1e-14)
    errors = []
    for step in (0.05, 0.025, 0.0125):
        end = neuralode.solve(field, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                              method=LeapfrogMidpoint(), options={"step_size": step}).ys[-1, 0]
        errors.append(abs(end.item() - math.cos(2.0)))
    slope = np.polyfit(np.log([0.05, 0.025, 0.0125]), np.log(errors), 1)[0]
    assert abs(slope - 2) < 0.2


def test_leapfrog_midpoint_adjoint_steps_back_with_the_midpoint_method():
    """Run backwards, growing dynamics decay, where the two-step method's spurious mode would take over: the adjoint's
    default backward method is its one-step counterpart (it failed with 'spurious mode grew to 3e9' before)."""
    rate = torch.tensor(1.0, dtype=F64, requires_grad=True)
    y0 = torch.ones(1, dtype=F64, requires_grad=True)
    sol = neuralode.solve(lambda t, y: rate * y, y0, torch.tensor([0.0, 10.0], dtype=F64), method="leapfrog_midpoint",
                          options={"step_size": 0.05}, gradient="adjoint", adjoint_params=(rate,))
    grad_y0, grad_rate = torch.autograd.grad(sol.ys[-1].sum(), (y0, rate))
    assert abs(grad_y0.item() / math.exp(10) - 1) < 1e-2 and abs(grad_rate.item() / (10 * math.exp(10)) - 1) < 1e-2
    assert LeapfrogMidpoint().ordinary_counterpart == "midpoint"
    with pytest.raises(ValueError, match="linear between its steps"):
        neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), method="leapfrog_midpoint",
                        options={"step_size": 0.1}, gradient=neuralode.Adjoint(interpolate=True))


def test_leapfrog_midpoint_fails_where_its_spurious_mode_takes_over():
    """On y' = -y the second root of the method grows by about 1 + h a step: by t = 20 it has swamped the solution.
    The solve fails there instead of returning it (status success with y = 3e5, before the check)."""
    with pytest.raises(neuralode.SolverError, match="spurious mode"):
        neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 20.0], dtype=F64),
                        method="leapfrog_midpoint", options={"step_size": 0.05})
    short = neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                            method="leapfrog_midpoint", options={"step_size": 0.05})
    assert short.status == "success" and abs(short.ys[-1].item() - math.exp(-2.0)) < 1e-2
    # a mode that took over while the dynamics decayed and then shrank against a growing solution: the largest ratio
    # over the steps counts (the end alone passed it: status success with y(10) = 13.7 against 4.5e-5)
    with pytest.raises(neuralode.SolverError, match="spurious mode"):
        neuralode.solve(lambda t, y: torch.where(t < 10, -y, y), torch.ones(1, dtype=F64),
                        torch.tensor([0.0, 10.0, 20.0], dtype=F64), method="leapfrog_midpoint",
                        options={"step_size": 0.05})


def test_float32_reversal_over_many_steps_is_not_warned_about():
    """Leapfrog steps in float32: rounding alone moves the rebuilt states by about eps a step, which against an rtol
    below float32's eps read as thousands of tolerances and was warned about, the gradient being right (the QA round:
    10^4 steps at the default rtol, 3.6e4 tolerances, the gradient 4e-6 from the checkpoint strategy's). The drift's
    relative scale is now at least steps x eps. (1,000 steps at rtol 2e-9: 7e4 tolerances before.)"""
    generator = torch.Generator().manual_seed(0)
    q0, p0 = torch.randn(4, 2, generator=generator), torch.randn(4, 2, generator=generator)
    grads = {}
    for gradient in ("reversible", "checkpoint"):
        y0 = q0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = neuralode.solve(lambda t, y: (y[1], -torch.sin(y[0])), (y0, p0), torch.linspace(0, 100, 3),
                                  method="leapfrog", options={"step_size": 0.1}, gradient=gradient, rtol=2e-9,
                                  atol=1e-9)
            sol.ys[0].sum().backward()
        grads[gradient] = y0.grad
    assert sol.stats["n_steps"] == 1_000
    scale = grads["checkpoint"].abs().max()
    assert (grads["reversible"] - grads["checkpoint"]).abs().max() <= 1e-3 * scale
