"""Step-size control: the controller formulas, Hairer's initial step, and the loop's accept/reject and
clipping logic checked with a stub stepper whose error ratios are scripted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuralode
from neuralode.controllers import AdaptiveController, ErrorNorm, initial_step, mixed_norm, rms_norm
from neuralode.integrate import integrate
from neuralode.problem import make_problem
from neuralode.solvers.base import Solver
from neuralode.solvers.runge_kutta import StepOutcome

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stiff_problems as sp  # noqa: E402

F64 = torch.float64


# --- formulas -------------------------------------------------------------------------------------

def test_integral_controller_formula():
    c = AdaptiveController()
    for ratio, accepted in ((0.5, True), (0.01, True), (2.0, False), (1e6, False)):
        expected = 0.1 * min(10.0, max(0.9 * ratio ** (-1 / 5), 1.0 if accepted else 0.2))
        assert c.next_step(0.1, ratio, 1.0, 4, accepted) == pytest.approx(expected, rel=1e-15)


def test_integral_controller_never_shrinks_after_accept_and_caps_growth():
    c = AdaptiveController()
    assert c.next_step(0.1, 0.99, 1.0, 4, True) == 0.1
    assert c.next_step(0.1, 1e-12, 1.0, 4, True) == pytest.approx(1.0)
    assert c.next_step(0.1, 0.0, 1.0, 4, True) == pytest.approx(1.0)
    assert c.next_step(0.1, 1e12, 1.0, 4, False) == pytest.approx(0.02)


def test_pi_controller_formula():
    c = AdaptiveController(kind="pi")
    h, r, prev, k = 0.1, 0.3, 0.6, 5
    expected = h * min(10.0, max(0.9 * r ** (-0.7 / k) * prev ** (0.4 / k), 1.0))
    assert c.next_step(h, r, prev, 4, True) == pytest.approx(expected, rel=1e-15)
    # after a rejection the PI controller falls back to the integral formula
    assert c.next_step(h, 4.0, prev, 4, False) == pytest.approx(h * max(0.9 * 4.0 ** (-1 / 5), 0.2))


def test_predictive_controller_formula():
    """Gustafsson's predictive controller (Hairer-Wanner IV.8 eq. 8.25, scipy's Radau): the integral factor times
    min(1, (h / h_acc) (r_acc / r)^(1/k)); it may shrink after an accepted step; no history: the integral factor."""
    c = AdaptiveController(kind="predictive")
    k = 4
    h, r, r_acc, h_acc = 0.1, 0.3, 0.05, 0.08
    prediction = min(1.0, h / h_acc * (r_acc / r) ** (1 / k))
    assert prediction < 1   # (the error grew since the last accepted step: the prediction cuts the growth)
    expected = h * min(10.0, max(0.9 * r ** (-1 / k) * prediction, 0.2))
    assert c.next_step(h, r, r_acc, 3, True, h_acc) == pytest.approx(expected, rel=1e-15)
    assert c.next_step(h, 0.99, 0.001, 3, True, 0.5) < h                     # shrinks after an accepted step
    assert c.next_step(h, r, 1.0, 3, True, 0.0) == pytest.approx(h * 0.9 * r ** (-1 / k), rel=1e-15)
    assert c.next_step(h, 4.0, r_acc, 3, False, h_acc) <= 0.9 * h             # a rejection: at most safety
    accepted, _, history = c.adapt(h, r, 3, c.initial_history)
    assert accepted and c.initial_history == (1.0, 0.0) and history == (r, h)   # remembers the ratio and h


def test_predictive_is_the_default_of_implicit_and_rosenbrock_methods_only():
    problem = sp.van_der_pol(1000.0)
    t = torch.tensor(problem.t_short, dtype=F64)
    for method in ("radau5", "kvaerno5", "rodas5p", "dopri5"):
        if method == "dopri5":
            problem, t = sp.van_der_pol(1.0), torch.tensor([0.0, 10.0], dtype=F64)
        default = neuralode.solve(problem.func, problem.y0, t, method=method, rtol=1e-4, atol=1e-4)
        expected = "integral" if method == "dopri5" else "predictive"
        chosen = neuralode.solve(problem.func, problem.y0, t, method=method, rtol=1e-4, atol=1e-4,
                                 options={"controller": expected})
        assert default.stats == chosen.stats and torch.equal(default.ys, chosen.ys), method


def test_predictive_controller_rejects_fewer_stiff_steps():
    """Van der Pol mu = 1000 at rtol 1e-4: radau5's estimate grows more slowly than h^4 on the stiff component,
    so the integral controller grows the step until it is rejected (177 of 472 steps); predictive: 51."""
    problem = sp.van_der_pol(1000.0)
    t = torch.tensor(problem.t_span, dtype=F64)
    reference = sp.scipy_reference(problem, [t[-1]])[0]
    stats = {}
    for controller in ("integral", "predictive"):
        sol = neuralode.solve(problem.func, problem.y0, t, method="radau5", rtol=1e-4, atol=1e-4,
                              options={"controller": controller})
        assert sp.mixed_error(sol.ys[-1].numpy(), reference, 1e-4, 1e-4) <= 1e-4
        stats[controller] = sol.stats
    assert stats["predictive"]["n_rejected"] < 0.5 * stats["integral"]["n_rejected"]
    assert stats["predictive"]["nfe"] < 0.9 * stats["integral"]["nfe"]


def test_norms():
    x = torch.tensor([3.0, 4.0], dtype=F64)
    assert float(rms_norm(x)) == pytest.approx(math.sqrt(12.5))
    assert float(rms_norm(torch.tensor([3j, 4.0], dtype=torch.complex128))) == pytest.approx(math.sqrt(12.5))
    assert float(mixed_norm((x, torch.tensor([10.0], dtype=F64)))) == pytest.approx(10.0)
    norm = ErrorNorm(1e-3, 1e-6)
    y0, y1 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([3.0, 1.0], dtype=F64)
    scale = norm.scale(y0, y1)
    assert torch.allclose(scale, torch.tensor([3e-3 + 1e-6, 2e-3 + 1e-6], dtype=F64))
    assert float(norm(torch.ones(2, dtype=F64), y0, y1)) == pytest.approx(float(rms_norm(1 / scale)))


def test_initial_step_is_hairers():
    """Hairer, Norsett, Wanner I, Sec. II.4 on y' = -y, y0 = 1, rtol = 1e-3, atol = 1e-6, order 4."""
    y0 = torch.ones(1, dtype=F64)
    f0 = -y0
    norm = ErrorNorm(1e-3, 1e-6)
    calls = []

    def f(t, y):
        calls.append(t)
        return -y

    h = initial_step(f, 0.0, y0, f0, 1, 4, norm)
    sc = 1e-6 + 1e-3
    d0 = d1 = 1 / sc
    h0 = 0.01 * d0 / d1
    d2 = abs(-(1 - h0) + 1) / sc / h0
    h1 = (0.01 / max(d1, d2)) ** (1 / 5)
    assert h == pytest.approx(min(100 * h0, h1), rel=1e-12)
    assert len(calls) == 1 and calls[0] == pytest.approx(h0)
    # backwards in time the probe evaluation is at t0 - h0
    calls.clear()
    assert initial_step(f, 0.0, y0, f0, -1, 4, norm) > 0 and calls[0] < 0


# --- loop logic with a stub stepper ---------------------------------------------------------------

class ScriptedStepper(Solver):
    """y1 = y0 + h (y' = 1 exactly) with error ratios taken from a script (then 0.5 forever)."""

    order = 4
    adaptive = True

    def __init__(self, ratios):
        self.ratios = list(ratios)
        self.attempts = []

    def step(self, func, t0, y0, f0, h, error_norm, state=None):
        self.attempts.append((t0, h))
        ratio = self.ratios.pop(0) if self.ratios else 0.5
        return StepOutcome(y0 + h, None, torch.tensor(ratio, dtype=F64), 4, None)

    def dense_coefficients(self, func, t0, y0, h, outcome, f1):
        return [y0, outcome.y1 - y0]


def _run(ratios, t=(0.0, 1.0), controller=None, options=None, throw=True):
    problem = make_problem(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64),
                           torch.tensor(t, dtype=F64), 1e-6, 1e-9)
    stepper = ScriptedStepper(ratios)
    control = controller or AdaptiveController(first_step=0.1)
    result = integrate(problem, stepper, control, options=options or {}, throw=throw)
    return result, stepper


def test_stub_accept_reject_sequence():
    result, stepper = _run([2.0, 0.5, 3.0])
    c = AdaptiveController()
    hs = [h for _, h in stepper.attempts]
    assert hs[0] == 0.1
    h1 = c.next_step(0.1, 2.0, 1.0, 4, False)            # rejected: shrink
    assert hs[1] == pytest.approx(h1) and stepper.attempts[1][0] == 0.0   # retried from the same time
    h2 = c.next_step(h1, 0.5, 1.0, 4, True)              # accepted: grow
    assert hs[2] == pytest.approx(h2) and stepper.attempts[2][0] == pytest.approx(h1)
    assert result.stats["n_rejected"] == 2 and result.stats["n_accepted"] == result.stats["n_steps"] - 2
    assert result.status == "success" and float(result.final_y) == pytest.approx(1.0)
    assert result.final_t == 1.0


def test_stub_last_step_is_clipped_to_the_end():
    result, stepper = _run([], t=(0.0, 0.25))
    t_last, h_last = stepper.attempts[-1]
    assert t_last + h_last == 0.25
    assert all(t + h <= 0.25 for t, h in stepper.attempts)


def test_stub_min_step_accepts_whatever_the_error():
    control = AdaptiveController(first_step=0.1, min_step=0.1, max_step=0.1)
    result, stepper = _run([5.0] * 20, t=(0.0, 0.5), controller=control)
    assert result.stats["n_rejected"] == 0 and result.stats["n_accepted"] == 5


def test_stub_max_step_caps_growth():
    control = AdaptiveController(first_step=0.01, max_step=0.05)
    result, stepper = _run([1e-10] * 100, controller=control)
    # (a step is the time it advances, fl(t + h) - t: max_step up to rounding)
    assert max(h for _, h in stepper.attempts) <= 0.05 * (1 + 1e-14)


def test_stub_non_finite_ratio_is_rejected_and_shrinks_by_dfactor():
    result, stepper = _run([math.nan, 0.5])
    hs = [h for _, h in stepper.attempts]
    assert hs[1] == pytest.approx(0.1 * 0.2)
    assert result.stats["n_rejected"] == 1 and result.status == "success"


def test_stub_persistent_non_finite_is_a_non_finite_error():
    with pytest.raises(neuralode.NonFiniteError, match=r"t=0.0"):
        _run([math.nan] * 10_000)


def test_stub_max_num_steps_counts_attempts():
    control = AdaptiveController(first_step=0.1, max_num_steps=7)
    result, stepper = _run([2.0] * 100, controller=control, throw=False)
    assert result.status == "max_steps_reached" and len(stepper.attempts) == 7


def test_stub_step_t_and_jump_t_are_step_ends():
    result, stepper = _run([], options={"step_t": [0.33], "jump_t": [0.71]})
    ends = [t + h for t, h in stepper.attempts]
    assert 0.33 in ends and 0.71 in ends


# --- the PI controller end to end -----------------------------------------------------------------

def _van_der_pol(mu):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
    return f


@pytest.fixture(scope="module")
def vdp_reference():
    import scipy.integrate as scipy_integrate  # a test dependency
    mu = 5.0
    ref = scipy_integrate.solve_ivp(lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 8.0), [2.0, 0.0],
                                    method="DOP853", rtol=1e-13, atol=1e-13)
    return mu, torch.tensor(ref.y[:, -1], dtype=F64)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_pi_controller_meets_tolerance(method, vdp_reference):
    """On a mildly stiff Van der Pol oscillator (mu = 5) the PI controller solves to tolerance and takes a
    different step sequence from the integral controller."""
    mu, reference = vdp_reference
    t = torch.tensor([0.0, 8.0], dtype=F64)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    tol = 1e-7
    pi = neuralode.solve(_van_der_pol(mu), y0, t, method=method, rtol=tol, atol=tol, options={"controller": "pi"})
    integral = neuralode.solve(_van_der_pol(mu), y0, t, method=method, rtol=tol, atol=tol)
    assert pi.success
    assert (pi.ys[-1] - reference).abs().max() < 100 * tol * (1 + float(reference.abs().max()))
    assert pi.stats != integral.stats
    # PI damps accept/reject oscillation: never more rejections than the integral controller here
    assert pi.stats["n_rejected"] <= integral.stats["n_rejected"]


# --- PID (Söderlind; diffrax's PIDController parametrisation) -------------------------------------

def test_pid_formula_and_clipping():
    c = AdaptiveController(kind="pid", pcoeff=0.2, icoeff=0.4, dcoeff=0.1)
    h, r, r1, r2, k = 0.1, 0.3, 0.5, 2.0, 5
    b1, b2, b3 = (0.2 + 0.4 + 0.1) / k, -(0.2 + 0.2) / k, 0.1 / k
    expected = h * min(10.0, max(1.0, 0.9 * r ** -b1 * r1 ** -b2 * r2 ** -b3))
    assert c.next_step(h, r, r1, 4, True, r2) == pytest.approx(expected, rel=1e-15)
    # A rejected step shrinks by the same formula, capped at safety (diffrax's rule), floored at dfactor.
    rejected = c.next_step(h, 3.0, r1, 4, False, r2)
    assert h * 0.2 <= rejected <= h * 0.9
    # Zero or infinite past errors count as 1.
    assert c.next_step(h, r, 0.0, 4, True, math.inf) == c.next_step(h, r, 1.0, 4, True, 1.0)


def test_pid_defaults_are_the_integral_controller_and_pi_coefficients_match_pi():
    import neuralode

    f = lambda t, y: torch.stack([y[1], 10 * (1 - y[0] ** 2) * y[1] - y[0]])
    y0, t = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64)
    integral = neuralode.solve(f, y0, t, rtol=1e-6, atol=1e-6)
    pid = neuralode.solve(f, y0, t, rtol=1e-6, atol=1e-6, options={"controller": "pid"})
    assert pid.stats == integral.stats and torch.equal(pid.ys, integral.ys)
    c = AdaptiveController(kind="pid", pcoeff=0.4, icoeff=0.3)
    pi = AdaptiveController(kind="pi")
    assert c.next_step(0.1, 0.3, 0.6, 4, True) == pytest.approx(pi.next_step(0.1, 0.3, 0.6, 4, True), rel=1e-14)


@pytest.mark.parametrize("options,match", [
    ({"pcoeff": 0.4}, "controller': 'pid'"),
    ({"controller": "pid", "icoeff": 0.0}, "pcoeff \\+ icoeff \\+ dcoeff must be > 0"),
    ({"controller": "pid", "dcoeff": "a"}, "must be a number"),
    ({"controller": "pd"}, "'integral', 'pi', 'pid' or 'predictive'"),
])
def test_pid_option_errors(options, match):
    import neuralode

    with pytest.raises((ValueError, TypeError), match=match):
        neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
                        torch.tensor([0.0, 1.0], dtype=torch.float64), options=options)


def test_adapt_is_the_decision_as_a_pure_function():
    pid = AdaptiveController(kind="pid", pcoeff=0.4, icoeff=0.3)
    accepted, h_next, history = pid.adapt(0.1, 0.5, 4, (1.0, 1.0))
    assert accepted and history == (0.5, 1.0)
    assert h_next == pytest.approx(pid.next_step(0.1, 0.5, 1.0, 4, True, 1.0))
    accepted, h_rejected, kept = pid.adapt(0.1, 4.0, 4, history)
    assert not accepted and kept == history and h_rejected < 0.1      # a rejection leaves the history alone
    assert pid.adapt(0.1, float("nan"), 4, history) == (False, 0.1 * pid.dfactor, history)
    assert pid.adapt(0.1, 50.0, 4, history, pinned=True)[0]          # held at min_step: accepted anyway


_RATIOS = st.one_of(st.floats(0.0, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, math.inf, math.nan]))
_HISTORY = st.one_of(st.floats(0.0, 1e6), st.just(1.0))   # accepted ratios (finite), or the initial 1.0


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["integral", "pi", "pid", "predictive"]), h=st.floats(1e-9, 1e3),
       ratio=_RATIOS,
       previous=_HISTORY, older=_HISTORY, order=st.integers(1, 8), pinned=st.booleans())
def test_adapt_on_device_is_adapt_with_tensors(kind, h, ratio, previous, older, order, pinned):
    """The compiled loop's decision (tensors, no host read) against the reference one (Python floats)."""
    coefficients = {"pid": dict(pcoeff=0.4, icoeff=0.3, dcoeff=0.1), "pi": {}, "integral": {}, "predictive": {}}
    control = AdaptiveController(kind=kind, **coefficients[kind])
    accepted, h_next, (new_previous, new_older) = control.adapt(h, ratio, order, (previous, older), pinned)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    in_the_loop = control.with_tensor_settings(torch.device("cpu")).with_scalar_settings()
    for decider in (control, in_the_loop):   # floats, and tensors as in the compiled loop
        on_device = decider.adapt_on_device(as_tensor(h), as_tensor(ratio), order, as_tensor(previous),
                                             as_tensor(older), torch.tensor(pinned))
        assert bool(on_device[0]) == accepted
        # (the same formula; pow may differ from Python's in the last ulp)
        assert float(on_device[1]) == pytest.approx(h_next, rel=1e-14, abs=0.0)
        for got, want in zip(on_device[2:], (new_previous, new_older)):
            assert float(got) == want or (math.isnan(want) and math.isnan(float(got)))


@pytest.mark.parametrize("method", ["dopri5", "adams", "kvaerno5", "radau5", "rodas5p", "auto"])
def test_atol_zero_with_a_component_at_zero(method):
    # The scale atol + rtol |y| of a component at 0 is 0 with atol = 0: its error must count as 0/0 = 0 (a component
    # that stays 0), and Newton must not divide by it (a velocity starting at 0). Both used to raise NonFiniteError
    # blaming the vector field.
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    y0, t = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    rotating = neuralode.solve(lambda t, y: y @ A.T, y0, t, method=method, rtol=1e-8, atol=0.0)
    exact = torch.linalg.matrix_exp(A) @ y0
    assert torch.allclose(rotating.ys[-1], exact, rtol=1e-6, atol=1e-7)
    for jacobian in (("dense", "krylov") if method in ("kvaerno5", "rodas5p") else ("dense",)):
        options = {"jacobian": jacobian} if method in ("kvaerno5", "rodas5p") else {}
        idle = neuralode.solve(lambda t, y: torch.stack([-y[0], torch.zeros_like(y[1])]), y0, t, method=method,
                               rtol=1e-8, atol=0.0, options=options)
        assert float(idle.ys[-1, 1]) == 0.0 and abs(float(idle.ys[-1, 0]) - math.exp(-1.0)) < 1e-6
    # The starting step: f0 / scale is infinite in the component at 0, which made Hairer's estimate 0 (a step
    # size underflow at t = 0) unless the trial evaluation happened to be infinite too (the rotation above).
    oscillator = neuralode.solve(lambda t, y: torch.stack([y[1], -y[0]]), y0, t, method=method, rtol=1e-8, atol=0.0)
    assert torch.allclose(oscillator.ys[-1], torch.tensor([math.cos(1.0), -math.sin(1.0)], dtype=torch.float64),
                          rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,jacobian", [("dopri5", None), ("kvaerno5", "dense"), ("kvaerno5", "krylov"),
                                             ("radau5", "dense"), ("rodas5p", "dense"), ("rodas5p", "krylov")])
def test_atol_zero_from_rest(method, jacobian):
    # x' = v, v' = 1 - x from (0, 0): at t0 both components have a zero scale, x even after an Euler predictor.
    # Newton's corrections there were infinite (kvaerno5/radau5 ran out of steps); GMRES divided by the zero
    # scale, got an infinite right-hand side and returned zero stages, which rodas5p accepted: x(1) was 0.
    options = {"max_num_steps": 2000} | ({"jacobian": jacobian} if jacobian else {})
    sol = neuralode.solve(lambda t, y: torch.stack([y[1], 1.0 - y[0]]), torch.zeros(2, dtype=torch.float64),
                          torch.tensor([0.0, 1.0], dtype=torch.float64), method=method, rtol=1e-8, atol=0.0,
                          options=options)
    assert abs(float(sol.ys[-1, 0]) - (1 - math.cos(1.0))) < 1e-7


def test_atol_zero_from_rest_with_a_low_order_start_says_why():
    # adams starts at order 1: its first steps cannot meet a relative test on x ~ h^2 / 2 at any h.
    with pytest.raises(neuralode.MaxStepsError, match="atol=0 asks every component for relative accuracy"):
        neuralode.solve(lambda t, y: torch.stack([y[1], 1.0 - y[0]]), torch.zeros(2, dtype=torch.float64),
                        torch.tensor([0.0, 1.0], dtype=torch.float64), method="adams", rtol=1e-8, atol=0.0,
                        options={"max_num_steps": 300})


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_non_finite_step_at_min_step_fails_at_once(per_sample):
    # y' = -1000 (y - cos t) with min_step = 0.01: dopri5's steps at min_step are unstable and overflow. A step
    # held at min_step cannot shrink, so retrying it gave the same inf until max_num_steps (69 s jointly, 221 s per
    # sample with the default cap of 100,000). It is now a NonFiniteError naming min_step.
    stiff = lambda t, y: -1000 * (y - torch.cos(t).reshape(-1, 1))  # noqa: E731
    y0, t = torch.zeros(2, 1, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64)
    options = {"min_step": 0.01, "max_num_steps": 3000}
    solution = neuralode.solve(stiff, y0, t, method="dopri5", rtol=1e-6, atol=1e-6, throw=False, per_sample=per_sample,
                               options=options)
    assert solution.status == "non_finite" and "at min_step=0.01" in solution.message
    assert int(torch.as_tensor(solution.stats["n_steps"]).max()) < 300
    with pytest.raises(neuralode.NonFiniteError, match="cannot shrink: lower min_step"):
        neuralode.solve(stiff, y0, t, method="dopri5", rtol=1e-6, atol=1e-6, per_sample=per_sample, options=options)


@pytest.mark.parametrize("per_sample", [False, True])
def test_force_min_step_false_fails_where_a_step_at_min_step_misses_the_tolerance(per_sample):
    """diffrax's force_dtmin=False (SciML's dtmin): a step at min_step is judged like any other, and its rejection
    fails the solve, where the default accepts it whatever its error."""
    def vdp(t, y, mu=1000.0):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    kwargs = dict(rtol=1e-6, atol=1e-6, per_sample=per_sample)
    forced = neuralode.solve(vdp, y0, t, options={"min_step": 1e-3}, **kwargs)
    assert forced.success     # (the default: the steps at min_step were accepted, over the tolerance)
    options = {"min_step": 1e-3, "force_min_step": False}
    who = "a step of sample 0" if per_sample else "a step"
    with pytest.raises(neuralode.StepSizeUnderflowError, match=rf"{who} at min_step=0.001 missed the tolerance at "
                                                               r"t=0.0 \(force_min_step=False"):
        neuralode.solve(vdp, y0, t, options=options, **kwargs)
    failed = neuralode.solve(vdp, y0, t, options=options, throw=False, **kwargs)
    assert failed.status == "step_size_underflow"
    # a min_step the steps never reach changes nothing; the same setting on a controller object
    gentle = lambda t, y: vdp(t, y, mu=1.0)  # noqa: E731
    free = neuralode.solve(gentle, y0, t, **kwargs)
    floored = neuralode.solve(gentle, y0, t, options={"min_step": 1e-6, "force_min_step": False}, **kwargs)
    assert torch.equal(floored.ys, free.ys)
    if not per_sample:
        assert floored.stats == free.stats
        controller = neuralode.IntegralController(min_step=1e-6, force_min_step=False)
        assert neuralode.solve(gentle, y0, t, controller=controller, rtol=1e-6, atol=1e-6).stats == free.stats
    with pytest.raises(TypeError, match=r"'force_min_step' must be True or False, got 'no'"):
        neuralode.solve(gentle, y0, t, options={"force_min_step": "no"})


def test_force_min_step_false_says_why_auto_and_explicit_methods_fail_on_a_stiff_start():
    stiff = lambda t, y: -1e4 * (y - torch.cos(t))  # noqa: E731
    y0, t = torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    options = {"min_step": 1e-3, "force_min_step": False}
    with pytest.raises(neuralode.StepSizeUnderflowError, match=r"Method 'auto' takes explicit steps until a few of "
                                                               r"them show stiffness"):
        neuralode.solve(stiff, y0, t, method="auto", options=options)
    with pytest.raises(neuralode.StepSizeUnderflowError, match=r"The problem looks stiff here"):
        neuralode.solve(stiff, y0, t, method="tsit5", options=options)
    assert neuralode.solve(stiff, y0, t, method="rodas5p", options=options).success
