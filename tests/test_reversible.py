"""Reversible methods (reversible Heun, the asynchronous leapfrog, reversible Runge-Kutta) and the gradient strategy
that undoes their steps (``gradient="reversible"``).

The strategy's gradient is that of the computed numbers, the same as backpropagation through the steps
(``gradient="direct"``): every test of it compares the two, in float64 to rounding, and one against finite differences.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import neuralode
from neuralode.solvers import AsynchronousLeapfrog, ReversibleHeun, ReversibleRungeKutta

F64 = torch.float64

# (method, options): every reversible method, adaptive and on a fixed grid.
METHODS = {
    "reversible_heun": ("reversible_heun", {}),
    "alf": ("alf", {"step_size": 0.05}),
    "reversible_tsit5": (ReversibleRungeKutta("tsit5"), {}),
    "reversible_dopri5_coupling_0.9": (ReversibleRungeKutta("dopri5", coupling=0.9), {}),
    "reversible_rk4": (ReversibleRungeKutta("rk4"), {"step_size": 0.05}),
}


class _Field(torch.nn.Module):
    """A small MLP field, time-dependent, in float64."""

    def __init__(self, dim=3, hidden=12, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(dim, hidden, generator=generator, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(hidden, dim, generator=generator, dtype=F64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=generator, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + self.b) @ self.w2 * torch.cos(t)


def _gradients(method, options, gradient, t, y0, field, structure="tensor"):
    func, state = field, y0
    if structure == "tuple":
        def func(t, y):
            return field(t, y[0]), field(t, y[1]) * 0.5
        state = (y0, y0 * 2)
    # (reversible Heun's estimate is of order 1: it takes many steps at tight tolerances)
    sol = neuralode.solve(func, state, t, method=method, rtol=1e-5, atol=1e-7, options=dict(options), gradient=gradient,
                          adjoint_params=tuple(field.parameters()))
    ys = sol.ys if structure == "tensor" else sol.ys[0] + sol.ys[1] ** 2
    loss = (ys ** 2).sum() + ys[len(ys) // 2].sum()
    inputs = [y0, *field.parameters()] + ([t] if t.requires_grad else [])
    return sol, torch.autograd.grad(loss, inputs)


def _relative_difference(a, b):
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-300)) for x, y in zip(a, b))


# --- the forward solve ------------------------------------------------------------------------------

def _order(method, options_for, steps):
    """Empirical order on y' = A y (a slowly decaying rotation) over [0, 2], by log-log regression."""
    a = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    exact = torch.linalg.matrix_exp(2 * a) @ y0
    hs, errors = [], []
    for n in steps:
        sol = neuralode.solve(lambda t, y: a @ y, y0, torch.tensor([0.0, 2.0], dtype=F64), method=method,
                              options=options_for(2 / n))
        assert sol.stats["n_accepted"] == n and sol.stats["n_rejected"] == 0
        hs.append(2 / n)
        errors.append(float((sol.ys[-1] - exact).norm()))
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


@pytest.mark.parametrize("method, order", [("alf", 2), (ReversibleRungeKutta("rk4"), 4),
                                           (ReversibleRungeKutta("euler"), 1)])
def test_fixed_step_order_of_convergence(method, order):
    assert abs(_order(method, lambda h: {"step_size": h}, [16, 32, 64, 128]) - order) < 0.25


@pytest.mark.parametrize("method, base", [("reversible_heun", "heun2"), (ReversibleRungeKutta("tsit5"), "tsit5"),
                                          (ReversibleRungeKutta("bosh3"), "bosh3")], ids=["heun", "tsit5", "bosh3"])
def test_adaptive_method_at_pinned_steps_has_its_order(method, base):
    """At steps pinned by min_step = max_step, the order of the Heun method or of the base method (tsit5 shows 5.2-5.7
    here before its asymptotic 5, and so does its reversible form)."""
    pinned = lambda h: {"first_step": h, "min_step": h, "max_step": h}   # noqa: E731 (accepted whatever its error)
    steps = [8, 16, 32, 64]
    measured = _order(method, pinned, steps)
    reference = _order(base, pinned if neuralode.methods.REGISTRY[base].adaptive else (lambda h: {"step_size": h}),
                       steps)
    assert abs(measured - reference) < 0.3 and measured > round(reference) - 0.3, (measured, reference)


@pytest.mark.parametrize("method", ["reversible_heun", ReversibleRungeKutta("tsit5"), ReversibleRungeKutta("dopri8")],
                         ids=["heun", "tsit5", "dopri8"])
def test_adaptive_solve_meets_its_tolerance_at_the_outputs(method):
    """Reversible Heun lands on the outputs (its dense output is linear); ReversibleRungeKutta interpolates with the
    base step's continuous extension, within the tolerance too (dense=True as well)."""
    t = torch.linspace(0.0, 6.0, 25, dtype=F64)
    sol = neuralode.solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0], dtype=F64), t,
                          method=method, rtol=1e-7, atol=1e-9, dense=True)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], 1)
    assert sol.status == "success"
    assert (sol.ys - exact).abs().max() < 30 * 1e-7
    between = torch.linspace(0.1, 5.9, 37, dtype=F64)
    assert (sol.evaluate(between) - torch.stack([torch.cos(between), -torch.sin(between)], 1)).abs().max() < 30e-7
    if method != "reversible_heun":
        # interpolating: the outputs do not change the steps
        alone = neuralode.solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0], dtype=F64),
                                t[[0, -1]], method=method, rtol=1e-7, atol=1e-9)
        assert sol.stats["n_steps"] == alone.stats["n_steps"]


def test_reversible_heun_takes_one_evaluation_per_step():
    sol = neuralode.solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0], dtype=F64),
                          torch.tensor([0.0, 3.0], dtype=F64), method="reversible_heun", rtol=1e-5, atol=1e-7)
    # one evaluation per attempted step, one at t0 and one for the initial step size
    assert sol.stats["nfe"] == sol.stats["n_steps"] + 2


def test_the_gap_between_the_coupled_solutions_is_under_error_control():
    """y' = -y + sin t decays: with coupling 0.999 the gap y - z grows by about 0.999 exp(h) a step unless h is
    tiny. With the base method's estimate alone (diffrax's UReversible) Van der Pol ended 0.7 off with status
    success; the gap in the error ratio keeps the answer within the tolerance, at the cost of steps."""
    t = torch.tensor([0.0, 3.0], dtype=F64)
    exact = (math.exp(-3.0) * 1.5 + (math.sin(3.0) - math.cos(3.0)) / 2)
    for coupling in (0.999, 0.9):
        sol = neuralode.solve(lambda t, y: -y + torch.sin(t), torch.tensor([1.0], dtype=F64), t,
                              method=ReversibleRungeKutta("tsit5", coupling), rtol=1e-6, atol=1e-8)
        assert abs(sol.ys[-1].item() - exact) < 2e-6, coupling


def test_jump_t_restarts_the_companion():
    """A field that switches at t = 1: the step lands there and the method starts afresh from the right-hand limit
    (its companion carries the left-hand field otherwise)."""
    field = lambda t, y: torch.where(t < 1, torch.ones_like(y), -2 * torch.ones_like(y))   # noqa: E731
    for method in ("reversible_heun", ReversibleRungeKutta("tsit5")):
        sol = neuralode.solve(field, torch.zeros(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method=method,
                              rtol=1e-8, atol=1e-10, options={"jump_t": [1.0]})
        assert abs(sol.ys[-1].item() - (1.0 - 2.0)) < 1e-8


def test_decaying_dynamics_stall_reversible_heun_with_a_message_that_says_why():
    with pytest.raises(neuralode.MaxStepsError, match="stable only on oscillating dynamics"):
        neuralode.solve(lambda t, y: -5 * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 5.0], dtype=F64),
                        method="reversible_heun", rtol=1e-6, atol=1e-8, options={"max_num_steps": 3000})


# --- the reversible gradient ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("structure", ["tensor", "tuple"])
@pytest.mark.parametrize("times", [(0.0, 0.3, 0.7, 1.5), (1.0, 0.4, -0.2)], ids=["forward", "backward"])
def test_reversible_gradient_equals_backpropagation(name, structure, times):
    method, options = METHODS[name]
    field = _Field()
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t = torch.tensor(times, dtype=F64, requires_grad=True)
    sol, direct = _gradients(method, options, "direct", t, y0, field, structure)
    sol_reversible, reversible = _gradients(method, options, "reversible", t, y0, field, structure)
    assert torch.equal(sol.ys if structure == "tensor" else sol.ys[0], sol_reversible.ys if structure == "tensor"
                       else sol_reversible.ys[0])
    assert _relative_difference(reversible, direct) < 1e-10
    assert sol_reversible.stats["reversible_drift"] < 1e-3


def test_outputs_between_steps_get_their_share_of_the_gradient():
    """Interpolated outputs: linear in the two step ends around them (reversible Heun with land_on_outputs=False, the
    leapfrog and fixed grids with interp='linear', the default), their cotangent split between the two; or on
    ReversibleRungeKutta's continuous extension, pulled back through the base step's stages."""
    field = _Field()
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    t = torch.tensor([0.0, 0.33, 0.71, 1.0], dtype=F64)
    for method, options in (("reversible_heun", {"land_on_outputs": False}), ("alf", {"step_size": 0.1}),
                            (ReversibleRungeKutta("tsit5"), {}), (ReversibleRungeKutta("dopri8"), {}),
                            (ReversibleRungeKutta("rk4"), {"step_size": 0.1}),
                            (ReversibleRungeKutta("rk4"), {"step_size": 0.1, "interp": "cubic"})):
        _, direct = _gradients(method, options, "direct", t, y0, field)
        _, reversible = _gradients(method, options, "reversible", t, y0, field)
        assert _relative_difference(reversible, direct) < 1e-10


def test_reversible_gradient_against_finite_differences():
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)

    def loss(y0, w):
        sol = neuralode.solve(lambda t, y: torch.tanh(y @ w), y0, t, method=ReversibleRungeKutta("rk4"),
                              options={"step_size": 0.05}, gradient="reversible", adjoint_params=(w,))
        return (sol.ys ** 2).sum()

    y0 = torch.tensor([[0.5, -0.3]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (y0, w))


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(sorted(METHODS)), batch=st.integers(1, 3), dim=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]), n_out=st.integers(1, 4), seed=st.integers(0, 100))
def test_property_reversible_equals_direct_over_shapes_and_dtypes(method, batch, dim, dtype, n_out, seed):
    method, options = METHODS[method]
    generator = torch.Generator().manual_seed(seed)
    w = (0.5 * torch.randn(dim, dim, generator=generator)).to(dtype).requires_grad_()
    y0 = torch.randn(batch, dim, generator=generator).to(dtype).requires_grad_()
    t = torch.linspace(0.0, 1.0, n_out + 1, dtype=dtype)
    results = []
    for gradient in ("direct", "reversible"):
        sol = neuralode.solve(lambda t, y: torch.sin(y @ w), y0, t, method=method, rtol=1e-5, atol=1e-7,
                              options=dict(options), gradient=gradient, adjoint_params=(w,))
        results.append(torch.autograd.grad(sol.ys.pow(2).sum(), (y0, w)))
    tolerance = 1e-9 if dtype == torch.float64 else 2e-3
    assert _relative_difference(results[1], results[0]) < tolerance


def test_pytree_state_and_args_get_gradients():
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def func(t, y, args):
        return {"x": y["v"], "v": -args["k"] * y["x"]}

    y0 = {"x": torch.tensor([1.0, 0.2], dtype=F64, requires_grad=True), "v": torch.zeros(2, dtype=F64)}
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    grads = []
    for gradient in ("direct", "reversible"):
        sol = neuralode.solve(func, y0, t, method="reversible_heun", args={"k": scale}, gradient=gradient,
                              rtol=1e-6, atol=1e-8)
        grads.append(torch.autograd.grad(sol.ys["x"].pow(2).sum(), (y0["x"], scale)))
    assert _relative_difference(grads[1], grads[0]) < 1e-10


def test_memory_does_not_grow_with_the_number_of_steps():
    """What autograd keeps for the backward pass: backpropagation's grows with the steps, the reversible
    strategy's is the outputs alone."""
    field = _Field()
    y0 = torch.randn(8, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def saved_bytes(gradient, step_size):
        sizes = []

        def pack(x):
            sizes.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            neuralode.solve(field, y0, t, method="alf", options={"step_size": step_size}, gradient=gradient)
        return sum(sizes)

    assert saved_bytes("reversible", 0.1) == saved_bytes("reversible", 0.001)
    assert saved_bytes("direct", 0.001) > 50 * saved_bytes("direct", 0.1) / 10


def test_backward_evaluations_match_the_forward_steps():
    field = _Field()
    y0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    sol = neuralode.solve(field, y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), method="reversible_heun",
                          gradient="reversible", rtol=1e-5, atol=1e-7)
    sol.ys.sum().backward()
    # one evaluation per accepted step, and one to rebuild the last step's companion with a graph
    assert sol.stats["nfe_backward"] == sol.stats["n_accepted"] + 1


def test_drift_is_warned_where_undoing_the_steps_amplifies_rounding():
    """A coupling of 0.5 damps the companion's mode forwards, so undoing 100 steps amplifies rounding by ~2^100."""
    mu = torch.tensor(1.0, dtype=F64, requires_grad=True)
    field = lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])   # noqa: E731
    sol = neuralode.solve(field, torch.tensor([2.0, 0.0], dtype=F64), torch.linspace(0, 10, 3, dtype=F64),
                          method=ReversibleRungeKutta("tsit5", coupling=0.5), rtol=1e-6, atol=1e-8,
                          gradient="reversible", adjoint_params=(mu,))
    with pytest.warns(UserWarning, match="rebuilt y"):
        sol.ys.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        field_module = _Field()
        sol = neuralode.solve(field_module, torch.ones(2, 3, dtype=F64, requires_grad=True),
                              torch.tensor([0.0, 1.0], dtype=F64), method="reversible_heun", gradient="reversible")
        sol.ys.sum().backward()


def test_a_non_finite_incoming_gradient_gives_nan_gradients():
    field = _Field()
    y0 = torch.ones(1, 3, dtype=F64, requires_grad=True)
    sol = neuralode.solve(field, y0, torch.tensor([0.0, 1.0], dtype=F64), method="alf", options={"step_size": 0.1},
                          gradient="reversible")
    (sol.ys.sum() * float("inf")).backward()
    assert torch.isnan(y0.grad).all() and all(torch.isnan(p.grad).all() for p in field.parameters())


def test_the_adjoints_backward_solve_uses_the_ordinary_counterpart():
    """Reversibility buys nothing backwards: dopri8 itself took 261 backward evaluations where its reversible form took
    8,593 (two base steps a step, the gap control)."""
    field = _Field()
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    evaluations = {}
    for name, method in (("reversible", ReversibleRungeKutta("dopri8")), ("ordinary", "dopri8")):
        sol = neuralode.solve(field, y0, t, method=method, rtol=1e-8, atol=1e-10, gradient="adjoint")
        sol.ys.sum().backward()
        evaluations[name] = sol.stats["nfe_backward"]
    assert evaluations["reversible"] == evaluations["ordinary"]


def test_the_adjoint_and_backpropagation_also_run_reversible_methods():
    field = _Field()
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    method = ReversibleRungeKutta("tsit5")
    _, direct = _gradients(method, {}, "direct", t, y0, field)
    _, adjoint = _gradients(method, {}, neuralode.Adjoint(rtol=1e-9, atol=1e-11), t, y0, field)
    # the adjoint differentiates the ODE, backpropagation the steps: they agree to the solves' accuracy
    assert _relative_difference(adjoint, direct) < 1e-4


# --- what is refused --------------------------------------------------------------------------------------------

def _solve(**kwargs):
    arguments = dict(func=lambda t, y: -y, y0=torch.ones(2, dtype=F64), t=torch.tensor([0.0, 1.0], dtype=F64),
                     method="reversible_heun", gradient="reversible")
    arguments.update(kwargs)
    return neuralode.solve(**arguments)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "tsit5"}, "needs a reversible method"),
    ({"events": [neuralode.Event(lambda t, y: y[0] - 0.5)]}, "does not support events"),
    ({"event_fn": lambda t, y: y[0] - 0.5}, "does not support events"),
    ({"options": {"jump_t": [0.5]}}, "jump_t"),
    ({"per_sample": True, "y0": torch.ones(2, 1, dtype=F64)}, "per_sample=True"),
    ({"compile": True}, "compile=True"),
    ({"method": "alf", "options": {"step_size": 0.1, "interp": "cubic"}}, "interp"),
    ({"method": ReversibleRungeKutta("rk4"), "options": {"step_size": 0.1, "perturb": True}}, "perturb"),
    ({"method": "alf", "options": {"step_size": 0.1, "perturb": True}}, "perturb"),
    ({"gradient": "checkpoint"}, "gradient='reversible'"),
])
def test_refused_with_a_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _solve(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"base": "radau5"}, ValueError, "explicit Runge-Kutta"),
    ({"base": 3}, TypeError, "method name or a ButcherTableau"),
    ({"coupling": 0.0}, ValueError, r"\(0, 1\]"),
    ({"coupling": 1.5}, ValueError, r"\(0, 1\]"),
    ({"coupling": True}, ValueError, r"\(0, 1\]"),
])
def test_reversible_runge_kutta_checks_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReversibleRungeKutta(**kwargs)


def test_method_objects_are_exported_and_named():
    assert ReversibleRungeKutta("dopri5").name == "reversible_dopri5"
    assert ReversibleHeun().order == 2 and AsynchronousLeapfrog().order == 2 and not AsynchronousLeapfrog().adaptive
    assert {"reversible_heun", "alf"} <= set(neuralode.METHODS)
    assert neuralode.ReversibleAdjoint is neuralode.gradients.ReversibleAdjoint


def test_dense_output_is_recorded_without_a_graph():
    field = _Field()
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.warns(UserWarning, match="dense output carries no gradient"):
        sol = neuralode.solve(field, y0, t, method="reversible_tsit5", gradient="reversible", dense=True)
    reference = neuralode.solve(field, y0, t, method="reversible_tsit5", dense=True)
    assert torch.equal(sol.evaluate(0.37), reference.evaluate(0.37).detach())
    (grad,) = torch.autograd.grad(sol.ys.sum(), y0)
    (expected,) = torch.autograd.grad(reference.ys.sum(), y0)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=0)


def test_events_are_located_on_the_continuous_extension():
    """On a linear interpolant the event time was 7e-3 off at rtol 1e-8 with dopri8 as the base (its steps are long)."""
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=F64)
    y0 = torch.tensor([[0.5, -0.3]], dtype=F64)
    times = {}
    for name, method in (("reference", "dopri8"), ("dopri8", ReversibleRungeKutta("dopri8")),
                         ("tsit5", ReversibleRungeKutta("tsit5"))):
        tolerance = 1e-12 if name == "reference" else 1e-8
        sol = neuralode.solve(lambda t, y: torch.tanh(y @ w), y0, torch.tensor([0.0, 3.0], dtype=F64), method=method,
                              event_fn=lambda t, y: y[..., 0] - 0.2, rtol=tolerance, atol=tolerance)
        times[name] = sol.event_t.item()
    assert abs(times["dopri8"] - times["reference"]) < 1e-7 and abs(times["tsit5"] - times["reference"]) < 1e-7


def test_ode_block_takes_a_reversible_method_and_gradient():
    from neuralode.nn import ODEBlock
    field = _Field()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    grads = []
    for gradient in ("direct", "reversible"):
        block = ODEBlock(field, method=ReversibleRungeKutta("tsit5"), gradient=gradient, rtol=1e-6, atol=1e-8)
        grads.append(torch.autograd.grad(block(x).pow(2).sum(), tuple(field.parameters())))
    assert _relative_difference(grads[1], grads[0]) < 1e-10
    with pytest.raises(ValueError, match="needs a reversible method"):
        ODEBlock(field, method="dopri5", gradient="reversible")
    with pytest.raises(ValueError, match="needs a reversible method"):
        ODEBlock(field, method="tsit5", gradient=neuralode.ReversibleAdjoint())


def test_float32_below_its_resolution_does_not_stall_on_the_gap():
    """At rtol 1e-7 (the default, below float32's resolution) rounding alone keeps the coupled solutions' gap at
    ~1e3 tolerances: that level is allowed (it failed every step until max_num_steps before)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    sol = neuralode.solve(lambda t, y: net(y), torch.randn(16, 2), torch.linspace(0, 1, 5),
                          method=ReversibleRungeKutta("tsit5"))
    assert sol.status == "success" and sol.stats["n_steps"] < 30


# --- found by the QA round: each once silently wrong, or a crash ------------------------------------------------

@pytest.mark.parametrize("name", ["reversible_heun", "reversible_tsit5", "alf"])
def test_a_failed_solve_with_throw_false_differentiates_what_it_returned(name):
    """y' = y^2 blows up at t = 1: the backward pass starts from the step that reached the last returned output, not
    from the last (non-finite or huge) state (the gradient was NaN, with a misleading drift warning)."""
    method, options = METHODS[name]
    t = torch.tensor([0.0, 0.5, 0.9, 1.5], dtype=F64)
    grads = []
    for gradient in ("direct", "reversible"):
        y0 = torch.ones(1, dtype=F64, requires_grad=True)
        sol = neuralode.solve(lambda t, y: y ** 2, y0, t, method=method, options=dict(options), gradient=gradient,
                              throw=False, rtol=1e-5, atol=1e-7)
        assert sol.status != "success"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol.ys.sum().backward()
        grads.append(y0.grad)
    assert torch.isfinite(grads[1]).all() and _relative_difference([grads[1]], [grads[0]]) < 1e-10


@pytest.mark.parametrize("method, options", [
    (ReversibleRungeKutta("rk4"), {"step_size": 0.05}),
    (ReversibleRungeKutta("tsit5"), {"first_step": 0.05, "min_step": 0.05}),
    ("alf", {"step_size": 0.05}),
], ids=["fixed", "pinned", "alf"])
def test_an_unstable_fixed_step_solve_fails_instead_of_succeeding(method, options):
    """Without error control the coupled solutions' gap (ReversibleRungeKutta) or the leapfrog's spurious mode grows
    on decaying dynamics: y' = -y + sin t ended 0.67 (reversible rk4), 0.13 (pinned tsit5) and 380 (alf) off at
    t = 20 with status success."""
    field = lambda t, y: -y + torch.sin(t)   # noqa: E731
    sol = neuralode.solve(field, torch.ones(1, dtype=F64), torch.tensor([0.0, 20.0], dtype=F64),
                          method=method, options=options, throw=False)
    assert sol.status == "failed" and ("came apart" in sol.message or "left f(t, y) behind" in sol.message)
    # ... also behind a larger oscillating component (the decaying one ended 0.13 off, 5.6e-9 exact), and where the
    # spurious mode fires a terminal event (y never reaches 2)
    mixed = neuralode.solve(lambda t, y: torch.stack([-y[0], y[2], -y[1]]), torch.tensor([1.0, 1.0, 0.0], dtype=F64),
                            torch.tensor([0.0, 19.0], dtype=F64), method=method, options=options, throw=False)
    assert mixed.status == "failed"
    event = neuralode.solve(field, torch.ones(1, dtype=F64), torch.tensor([0.0, 40.0], dtype=F64), method=method,
                            options=options, event_fn=lambda t, y: y[0] - 2.0, throw=False)
    assert event.status == "failed"
    # at a span where they are still accurate, they succeed
    sol = neuralode.solve(lambda t, y: -y + torch.sin(t), torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                          method=method, options=options)
    exact = math.exp(-2.0) * 1.5 + (math.sin(2.0) - math.cos(2.0)) / 2
    assert sol.status == "success" and abs(sol.ys[-1].item() - exact) < 1e-3


def test_restart_after_jump_t_reads_the_field_from_the_right():
    """A field equal to its left value at the jump (t <= 1): the backward base step's last stage lands on the jump
    itself, and read the left value there (13,737 evaluations; now as many as without the jump's ambiguity)."""
    field = lambda t, y: torch.where(t <= 1, torch.ones_like(y), -2 * torch.ones_like(y))   # noqa: E731
    for t in ([0.0, 2.0], [2.0, 0.0]):
        sol = neuralode.solve(field, torch.zeros(1, dtype=F64), torch.tensor(t, dtype=F64),
                              method=ReversibleRungeKutta("tsit5"), rtol=1e-8, atol=1e-10, options={"jump_t": [1.0]})
        assert sol.stats["nfe"] < 200
        assert abs(sol.ys[-1].item() - (-1.0 if t[0] == 0 else 1.0)) < 1e-9


def test_interpolating_adjoint_is_refused_along_a_linear_dense_output():
    """It was 1.5e-2 off along ReversibleRungeKutta's former linear dense output; now that one interpolates with the
    base step's extension and is accepted, while reversible Heun's and the leapfrog's (linear) are refused, and a
    replay from checkpoints (which lacks the companion) for all."""
    with pytest.raises(ValueError, match="piecewise-linear dense output"):
        _solve(method="reversible_heun", gradient=neuralode.Adjoint(interpolate=True))
    with pytest.raises(ValueError, match="cannot be replayed"):
        _solve(method=ReversibleRungeKutta("tsit5"), gradient=neuralode.Adjoint(interpolate="checkpoint"))
    field = _Field()
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    _, direct = _gradients(ReversibleRungeKutta("dopri8"), {}, "direct", t, y0, field)
    _, adjoint = _gradients(ReversibleRungeKutta("dopri8"), {}, neuralode.Adjoint(interpolate=True, rtol=1e-10,
                                                                                   atol=1e-12), t, y0, field)
    assert _relative_difference(adjoint, direct) < 1e-4
    from neuralode.nn import ODEBlock
    with pytest.raises(ValueError, match="piecewise-linear dense output"):
        ODEBlock(lambda t, y: -y, method="reversible_heun", gradient=neuralode.Adjoint(interpolate=True),
                 adjoint_params=())
    # (options=None crashed with an AttributeError here, for every method)
    ODEBlock(lambda t, y: -y, method="tsit5", gradient=neuralode.Adjoint(interpolate=True), adjoint_params=())


def test_reversible_method_names_and_numeric_couplings():
    sol = neuralode.solve(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                          method="reversible_dopri5", gradient="reversible")
    reference = neuralode.solve(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                                method=ReversibleRungeKutta("dopri5"))
    assert torch.equal(sol.ys, reference.ys)
    assert ReversibleRungeKutta(coupling=np.float32(0.9)).coupling == pytest.approx(0.9)
    assert ReversibleRungeKutta(coupling=torch.tensor(0.9)).coupling == pytest.approx(0.9)
    with pytest.raises(ValueError, match="reversible_' \\+ an explicit Runge-Kutta"):
        _solve(method="reversible_foo")
