"""The public API: torchdiffeq compatibility of odeint, options, output times that never change the
steps, stage times (mock vector field), step_t/jump_t, per-element tolerances and user norms."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

import neuralode
from neuralode.methods import REGISTRY
from neuralode.tableaus import TABLEAUS

F64 = torch.float64
RK_METHODS = sorted(TABLEAUS)
FIXED = [m for m in RK_METHODS if not TABLEAUS[m].adaptive]
ADAPTIVE = [m for m in RK_METHODS if TABLEAUS[m].adaptive]
A_SPIRAL = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)


class Recorder:
    """A vector field that records the times it is called at."""

    def __init__(self, f):
        self.f, self.times = f, []

    def __call__(self, t, y):
        self.times.append(float(t))
        return self.f(t, y)


def spiral(t, y):
    return (y ** 3) @ A_SPIRAL


# --- signatures and shapes ------------------------------------------------------------------------

def test_odeint_signature_matches_torchdiffeq():
    import torchdiffeq  # a test dependency (pip install -e ".[test]")
    for ours, theirs in ((neuralode.odeint, torchdiffeq.odeint),
                         (neuralode.odeint_adjoint, torchdiffeq.odeint_adjoint),
                         (neuralode.odeint_event, torchdiffeq.odeint_event)):
        p_ours = inspect.signature(ours).parameters
        p_theirs = inspect.signature(theirs).parameters
        for name, param in p_theirs.items():
            assert name in p_ours, (ours.__name__, name)
            assert p_ours[name].kind == param.kind, (ours.__name__, name)
            if name not in ("method", "odeint_interface"):  # the interface defaults to each library's odeint
                assert p_ours[name].default == param.default, (ours.__name__, name)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (1, 2, 2)])
def test_odeint_output_shape(shape):
    y0 = torch.ones(shape, dtype=F64)
    t = torch.linspace(0, 1, 7, dtype=F64)
    ys = neuralode.odeint(lambda t, y: -y, y0, t)
    assert ys.shape == (7, *shape)
    assert torch.allclose(ys[-1], y0 * math.exp(-1), rtol=1e-6)
    assert torch.equal(ys[0], y0)


def test_tuple_state_returns_tuple():
    y0 = (torch.tensor([1.0], dtype=F64), torch.zeros(2, 2, dtype=F64))
    t = torch.linspace(0, 1, 5, dtype=F64)

    def f(t, y):
        x, m = y
        return (-x, torch.ones_like(m) * x)

    out = neuralode.odeint(f, y0, t)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (5, 1) and out[1].shape == (5, 2, 2)
    # x = e^{-t}, m = 1 - e^{-t}
    assert torch.allclose(out[0][:, 0], torch.exp(-t), atol=1e-7)
    assert torch.allclose(out[1][:, 1, 1], 1 - torch.exp(-t), atol=1e-7)
    sol = neuralode.solve(f, y0, t, method="dopri5")
    assert isinstance(sol.ys, tuple) and torch.equal(sol.ys[1], out[1])


def test_default_method_of_odeint_is_dopri5():
    t = torch.linspace(0, 1, 3, dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    assert torch.equal(neuralode.odeint(spiral, y0, t), neuralode.odeint(spiral, y0, t, method="dopri5"))
    assert torch.equal(neuralode.odeint(spiral, y0, t), neuralode.solve(spiral, y0, t, method="dopri5").ys)


@pytest.mark.parametrize("method", FIXED)
def test_odeint_fixed_method_without_step_size_steps_on_t(method):
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.7], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    rec = Recorder(spiral)
    ys = neuralode.odeint(rec, y0, t, method=method)
    stages = TABLEAUS[method].stages
    assert len(rec.times) == stages * (len(t) - 1)  # s stages per step, f(t_end) never needed
    # every step starts at an output time
    starts = set(rec.times[0::stages]) if stages > 1 else set(rec.times)
    assert starts >= set(t[:-1].tolist())
    same = neuralode.solve(spiral, y0, t, method=method,
                           options={"grid_constructor": lambda f, y0, t: t}).ys
    assert torch.equal(ys, same)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_odeint_fixed_matches_torchdiffeq(method):
    import torchdiffeq  # a test dependency (pip install -e ".[test]")
    t = torch.linspace(0, 2, 21, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    for options in (None, {"step_size": 0.01}, {"step_size": 0.03}):
        ours = neuralode.odeint(spiral, y0, t, method=method, options=options)
        theirs = torchdiffeq.odeint(spiral, y0, t, method=method, options=options)
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), options


@pytest.fixture(scope="module")
def p1_spiral():
    """The P1 spiral problem solved by both libraries with dopri5 at rtol 1e-7 (1000 output times)."""
    import torchdiffeq  # a test dependency (pip install -e ".[test]")
    t = torch.linspace(0, 25, 1000, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    ours, theirs = Recorder(spiral), Recorder(spiral)
    ys = neuralode.odeint(ours, y0, t, rtol=1e-7, atol=1e-9, method="dopri5")
    ref = torchdiffeq.odeint(theirs, y0, t, rtol=1e-7, atol=1e-9, method="dopri5")
    return ys, ref, ours.times, theirs.times


def test_p1_spiral_values_match_torchdiffeq(p1_spiral):
    ys, ref, _, _ = p1_spiral
    assert ys.shape == ref.shape == (1000, 1, 2)
    # Same method, estimate, controller and starting step: the results agree far below the tolerance
    # (measured 4.4e-9; the remaining difference is floating-point order of operations).
    assert (ys - ref).abs().max() < 1e-7


def test_p1_spiral_steps_match_torchdiffeq(p1_spiral):
    """Same embedded estimate (Shampine's), initial-step rule and controller as torchdiffeq's dopri5:
    the vector field is evaluated exactly as often, at the same times to rounding. Rounding in the
    error ratio can flip one late accept/reject decision near the end (measured: the sequences agree
    for the first 2444 of 2450 evaluations), so the times are compared over the first 95%."""
    _, _, ours, theirs = p1_spiral
    assert len(ours) == len(theirs)
    agree = int(0.95 * len(theirs))
    for a, b in zip(ours[:agree], theirs[:agree]):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_odeint_adjoint_forward_equals_odeint():
    t = torch.linspace(0, 2, 5, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    assert torch.equal(neuralode.odeint_adjoint(spiral, y0, t), neuralode.odeint(spiral, y0, t))


# --- options --------------------------------------------------------------------------------------

def _grid(func, y0, t):
    return torch.linspace(float(t[0]), float(t[-1]), 11, dtype=t.dtype)


FIXED_OPTIONS = [{"step_size": 0.1}, {"grid_constructor": _grid}, {"step_size": 0.1, "perturb": True},
                 {"step_size": 0.1, "interp": "linear"}, {"step_size": 0.1, "interp": "cubic"}]
ADAPTIVE_OPTIONS = [{"first_step": 0.01}, {"max_num_steps": 1000}, {"min_step": 1e-6}, {"max_step": 0.05},
                    {"safety": 0.8}, {"ifactor": 5.0}, {"dfactor": 0.3}, {"step_t": [0.33]}, {"jump_t": [0.5]},
                    {"norm": lambda x: x.abs().max()}, {"dtype": torch.float64}, {"controller": "pi"},
                    {"step_t": torch.tensor([0.25, 0.75])}]


@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("options", FIXED_OPTIONS, ids=lambda o: "+".join(o))
def test_fixed_methods_accept_torchdiffeq_options(method, options):
    t = torch.linspace(0, 1, 4, dtype=F64)
    y0 = torch.tensor([1.0, -1.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, y0, t, method=method, options=dict(options))
    assert sol.success
    # the coarsest method (Euler, h = 0.1) is within 0.05 of e^{-t}
    assert torch.allclose(sol.ys, torch.exp(-t)[:, None] * y0, atol=0.05)


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("options", ADAPTIVE_OPTIONS, ids=lambda o: "+".join(o))
def test_adaptive_methods_accept_torchdiffeq_options(method, options):
    t = torch.linspace(0, 1, 4, dtype=F64)
    y0 = torch.tensor([1.0, -1.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, y0, t, method=method, rtol=1e-5, atol=1e-7, options=dict(options))
    assert sol.success
    assert torch.allclose(sol.ys, torch.exp(-t)[:, None] * y0, atol=1e-3)


def test_max_step_and_first_step_are_obeyed():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    rec = Recorder(lambda t, y: -y)
    sol = neuralode.solve(rec, torch.ones(1, dtype=F64), t, method="dopri5", dense=True,
                          options={"first_step": 0.01, "max_step": 0.1})
    steps = torch.diff(torch.cat([t[:1], sol.step_times]))
    assert steps[0] == pytest.approx(0.01, rel=1e-12)
    assert steps.max() <= 0.1 + 1e-15
    assert rec.times[1] == pytest.approx(0.01 * 0.2)  # first stage of the first step: c_2 = 1/5


ADAMS_CASES = [("explicit_adams", {"step_size": 0.01}), ("explicit_adams", {"step_size": 0.01, "max_order": 2}),
               ("adams", {}), ("adams", {"max_order": 5, "max_iters": 3}), ("adams", {"first_step": 0.01})]


@pytest.mark.parametrize("method, options", ADAMS_CASES)
def test_adams_methods_through_public_api(method, options):
    t = torch.linspace(0, 2, 5, dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    a = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    ys = neuralode.odeint(lambda t, y: a @ y, y0, t, method=method, options=options, rtol=1e-7, atol=1e-9)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], dim=1)
    assert ys.shape == (5, 2)
    assert (ys - exact).abs().max() < 1e-4
    with pytest.raises(ValueError, match=rf"option 'bogus' means nothing for method '{method}'.*It accepts"):
        neuralode.odeint(lambda t, y: a @ y, y0, t, method=method, options={**options, "bogus": 1})


def test_every_method_is_listed():
    assert set(neuralode.METHODS) == set(REGISTRY) >= set(TABLEAUS) | {"adams", "explicit_adams"}


# --- output times never change the steps ----------------------------------------------------------

@pytest.mark.parametrize("method, options", [("dopri5", None), ("tsit5", {"controller": "pi"}), ("bosh3", None),
                                             ("dopri8", None), ("rk4", {"step_size": 0.0625}),
                                             ("euler", {"step_size": 0.015625})])
def test_output_times_do_not_change_steps(method, options):
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    t2 = torch.tensor([0.0, 5.0], dtype=F64)
    t200 = torch.linspace(0.0, 5.0, 200, dtype=F64)
    assert t200[-1] == 5.0
    coarse = neuralode.solve(spiral, y0, t2, method=method, options=options)
    fine = neuralode.solve(spiral, y0, t200, method=method, options=options)
    for key in ("n_steps", "n_accepted", "n_rejected"):
        assert coarse.stats[key] == fine.stats[key], key
    assert torch.equal(coarse.ys[-1], fine.ys[-1])
    assert torch.equal(coarse.ys[0], fine.ys[0])


# --- stage times (mock vector field) --------------------------------------------------------------

@pytest.mark.parametrize("method", RK_METHODS)
def test_stage_times_of_one_step(method):
    """One step of size h from t0 evaluates f at exactly t0 + c_i h (f(t0) once, before the step)."""
    tab = TABLEAUS[method]
    t0, h = 0.25, 0.25  # dyadic: t0 + h is exactly the end of the span
    t = torch.tensor([t0, t0 + h], dtype=F64)
    rec = Recorder(lambda t, y: torch.cos(t) * y)
    options = ({"first_step": h, "min_step": h, "max_step": h} if tab.adaptive else {"step_size": h})
    sol = neuralode.solve(rec, torch.ones(3, dtype=F64), t, method=method, options=options)
    assert sol.stats["n_steps"] == 1
    expected = [t0] + [t0 + c * h for c in tab.c[1:]]
    assert rec.times == pytest.approx(expected, rel=0, abs=1e-15)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_step_pinned_by_min_step_is_accepted_when_clipped_to_the_end(method):
    """first_step = min_step = max_step = h with t1 - t0 equal to h up to rounding (0.3 + 0.25 != 0.55 in
    binary): the step clipped to the end of the span must still count as a min_step step and be
    accepted, not be rejected again and again until max_num_steps."""
    t = torch.tensor([0.3, 0.55], dtype=F64)
    h = 0.25
    sol = neuralode.solve(lambda t, y: torch.cos(t) * y, torch.ones(3, dtype=F64), t, method=method,
                          options={"first_step": h, "min_step": h, "max_step": h, "max_num_steps": 20})
    assert sol.success and sol.stats["n_rejected"] == 0


def test_rk4_stage_times_backwards_and_grid():
    """rk4 (3/8 rule, c = 0, 1/3, 2/3, 1) over a two-step grid, backwards in time."""
    rec = Recorder(lambda t, y: -y)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    neuralode.odeint(rec, torch.ones(1, dtype=F64), t, method="rk4")
    h = -0.5
    expected = [1.0]
    for t0 in (1.0, 0.5):
        expected += [t0 + c * h for c in (1 / 3, 2 / 3, 1.0)] + ([t0 + h] if t0 == 1.0 else [])
    assert rec.times == pytest.approx(expected, abs=1e-15)


# --- step_t and jump_t ----------------------------------------------------------------------------

def _piecewise(t, y):
    # dy/dt = y before t = 1.3, dy/dt = -2 y after: a jump in the vector field
    return y if float(t) < 1.3 else -2 * y


def _piecewise_exact(t):
    return math.exp(t) if t < 1.3 else math.exp(1.3) * math.exp(-2 * (t - 1.3))


def test_jump_t_is_accurate_and_cheaper():
    t = torch.tensor([0.0, 3.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    exact = _piecewise_exact(3.0)
    plain = neuralode.solve(_piecewise, y0, t, method="dopri5", rtol=1e-8, atol=1e-10)
    jump = neuralode.solve(_piecewise, y0, t, method="dopri5", rtol=1e-8, atol=1e-10, dense=True,
                           options={"jump_t": [1.3]})
    err_jump = abs(float(jump.ys[-1]) - exact)
    assert err_jump < 1e-7 * exact
    assert err_jump <= abs(float(plain.ys[-1]) - exact)
    assert jump.stats["n_rejected"] < plain.stats["n_rejected"]
    assert 1.3 in jump.step_times.tolist()


def test_jump_t_never_evaluates_the_left_side_after_the_jump():
    """After stepping to a jump, the next step starts from the right-hand limit: no evaluation at
    t >= 1.3 may see the left-hand branch, and no evaluation at t < 1.3 the right-hand one."""
    seen = []

    def f(t, y):
        seen.append(float(t))
        return _piecewise(t, y)

    neuralode.solve(f, torch.ones(1, dtype=F64), torch.tensor([0.0, 3.0], dtype=F64), method="tsit5",
                    options={"jump_t": [1.3]})
    # the evaluations split at the jump: all before the first one at t >= 1.3 lie left of it, all
    # from it on lie right of it (no step straddles the jump, none goes back across it) ...
    first = next(i for i, t in enumerate(seen) if t >= 1.3)
    assert all(t < 1.3 for t in seen[:first]) and all(t >= 1.3 for t in seen[first:])
    # ... the step that ends on the jump evaluates its last stage at the left limit, and the next
    # step starts with a fresh evaluation at the right limit (not the left value reused as FSAL)
    assert 1.3 - seen[first - 1] < 1e-12 and seen[first] - 1.3 < 1e-12


def test_step_t_lands_steps_exactly():
    t = torch.tensor([0.0, 2.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=F64), t, dense=True,
                          options={"step_t": [0.3, 1.1, 1.7]})
    steps = sol.step_times.tolist()
    for s in (0.3, 1.1, 1.7, 2.0):
        assert s in steps


def test_step_t_and_jump_t_backwards():
    t = torch.tensor([3.0, 0.0], dtype=F64)
    y3 = torch.tensor([_piecewise_exact(3.0)], dtype=F64)
    sol = neuralode.solve(_piecewise, y3, t, rtol=1e-9, atol=1e-12, dense=True,
                          options={"jump_t": [1.3], "step_t": [2.0]})
    assert abs(float(sol.ys[-1]) - 1.0) < 1e-7
    assert {1.3, 2.0} <= set(sol.step_times.tolist())


# --- tolerances and norms -------------------------------------------------------------------------

def test_tensor_tolerance_equal_to_scalar_gives_identical_steps():
    t = torch.linspace(0, 5, 3, dtype=F64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    scalar = neuralode.solve(spiral, y0, t, rtol=1e-6, atol=1e-8)
    tensor = neuralode.solve(spiral, y0, t, rtol=torch.full((1, 2), 1e-6, dtype=F64),
                             atol=torch.full((1, 2), 1e-8, dtype=F64))
    assert scalar.stats == tensor.stats and torch.equal(scalar.ys, tensor.ys)


def test_per_element_tolerances():
    """Two decoupled components: loosening only the second one's tolerance saves steps and leaves the
    first one accurate to its own (tight) tolerance."""
    a = torch.tensor([[0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, -3.0, 0.0]],
                     dtype=F64)
    y0 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    exact = torch.linalg.matrix_exp(a * 5.0) @ y0
    tight = neuralode.solve(lambda t, y: a @ y, y0, t, rtol=1e-9, atol=1e-9)
    mixed_tol = torch.tensor([1e-9, 1e-9, 1e-4, 1e-4], dtype=F64)
    mixed = neuralode.solve(lambda t, y: a @ y, y0, t, rtol=mixed_tol, atol=mixed_tol)
    assert mixed.stats["n_steps"] < tight.stats["n_steps"]
    assert (mixed.ys[-1] - exact)[:2].abs().max() < 1e-6
    assert (mixed.ys[-1] - exact)[2:].abs().max() < 1e-2


def test_user_norm_is_used():
    calls = []

    def max_norm(x):
        calls.append(tuple(x.shape))
        return x.abs().max()

    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    rms = neuralode.solve(spiral, y0, t, rtol=1e-6, atol=1e-8)
    sup = neuralode.solve(spiral, y0, t, rtol=1e-6, atol=1e-8, options={"norm": max_norm})
    assert calls and all(shape == (1, 2) for shape in calls)
    # the max norm is never smaller than the RMS norm: never fewer steps
    assert sup.stats["n_steps"] >= rms.stats["n_steps"]
    assert (sup.ys - rms.ys).abs().max() < 1e-4


def test_user_norm_receives_tuples_for_tuple_states():
    calls = []

    def norm(x):
        calls.append(type(x))
        return torch.stack([p.abs().max() for p in x]).max()

    y0 = (torch.ones(2, dtype=F64), torch.ones(3, dtype=F64))
    neuralode.solve(lambda t, y: (-y[0], -2 * y[1]), y0, torch.tensor([0.0, 1.0], dtype=F64),
                    options={"norm": norm})
    assert calls and all(c is tuple for c in calls)


@pytest.mark.parametrize("compile", [False, True])
def test_user_norm_that_does_not_reduce_is_a_clear_error(compile):
    """A norm returning the element-wise error (forgetting the reduction) is a ValueError naming the option,
    not torch's 'only one element tensors can be converted to Python scalars'."""
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"option 'norm' must return a scalar .*shape \(1, 2\)"):
        neuralode.solve(spiral, y0, torch.tensor([0.0, 1.0], dtype=F64), compile=compile,
                        options={"norm": lambda x: x.abs()})


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("norm, error, message", [
    (lambda x: 0, TypeError, r"real floating-point number, got dtype torch.int64"),
    (lambda x: x.abs().max() > 1, TypeError, r"real floating-point number, got dtype torch.bool"),
    (lambda x: -x.abs().max(), ValueError, r"returned NaN or a negative number"),
    (lambda x: x.abs().max() * math.nan, ValueError, r"returned NaN or a negative number"),
    # misbehaving only on large errors, i.e. only after some steps: the compiled loop hands over and the
    # eager loop names it
    (lambda x: torch.where(x.abs().max() > 0.5, -x.abs().max(), x.abs().max()), ValueError, r"negative"),
], ids=["int", "bool", "negative", "nan", "negative-later"])
def test_user_norm_returning_no_size_is_a_clear_error(compile, norm, error, message):
    # It raised deep inside ('>' between float and complex, int64 overflow), blamed the vector field for the
    # norm's NaN, or (a bool) solved with a wrong result and status success.
    f = lambda t, y: torch.stack([y[1], -100 * y[0]])  # noqa: E731
    with pytest.raises(error, match=message):
        neuralode.solve(f, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                        options={"norm": norm}, rtol=1e-8, atol=1e-8, compile=compile)


def test_float32_jump_times_for_a_float64_state_warn():
    """torch.tensor([1.2345]) is float32 by default: the solve restarted at 1.23450005, past the field's jump at
    1.2345, and the straddling step cost 1.6e-7 of error and 14x the evaluations, silently (SciML-user QA round)."""
    y0 = torch.ones(1, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'jump_t' is a torch.float32 tensor .* \(1.2345 is 1.2345000505"):
        neuralode.solve(lambda t, y: -y, y0, t, options={"jump_t": torch.tensor([1.2345])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # exact float32 times, float64 tensors and lists, and float32 states are all fine
        neuralode.solve(lambda t, y: -y, y0, t, options={"jump_t": torch.tensor([0.5, 1.25])})
        neuralode.solve(lambda t, y: -y, y0, t, options={"step_t": torch.tensor([1.2345], dtype=torch.float64)})
        neuralode.solve(lambda t, y: -y, y0, t, options={"jump_t": [1.2345]})
        neuralode.solve(lambda t, y: -y, y0.float(), t.float(), options={"jump_t": torch.tensor([1.2345])})
