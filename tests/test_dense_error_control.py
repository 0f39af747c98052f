"""A stiff method's dense output is checked with its step where events or the dense solution read it
(``interpolation_error``, option ``dense_error_control``): a step whose interpolant misses the tolerance is
rejected like one whose end does."""

from __future__ import annotations

import math

import pytest
import torch

from neuralode import Event, solve
from neuralode.controllers import ErrorNorm
from neuralode.interpolation import INTERPOLATION_CHECK_THETA, interpolation_error

F64 = torch.float64
STIFF_METHODS = ["radau5", "rodas5p", "kvaerno3", "kvaerno5", "auto"]


def prothero_robinson(t, y):
    """y' = -1e5 (y - cos t) - sin t, y(0) = 1: y = cos t. The step-end estimate of a stiff method sees only the
    end, which the stiffness pins to cos t whatever the step: radau5 took a step of 7.7 at rtol 1e-4."""
    return -1e5 * (y - torch.cos(t)) - torch.sin(t)


Y0 = torch.tensor([1.0], dtype=F64)
SPAN = torch.tensor([0.0, 10.0], dtype=F64)
GRID = torch.linspace(0.0, 10.0, 401, dtype=F64)


def _dense_error(method, rtol, control):
    solution = solve(prothero_robinson, Y0, SPAN, method=method, rtol=rtol, atol=rtol, dense=True,
                     options={"dense_error_control": control})
    assert solution.success
    return float((solution.evaluate(GRID)[:, 0] - torch.cos(GRID)).abs().max()) / rtol


@pytest.mark.parametrize("method", STIFF_METHODS + ["kvaerno4"])
def test_the_dense_output_of_a_stiff_solve_meets_the_tolerance(method):
    # Measured at rtol 1e-4: 1.3e3-1.2e4 x rtol unchecked. Checked at theta = 0.25 (the first version), kvaerno3 and
    # kvaerno4 stayed up to 61x and 27x at some rtols (their Hermite is worst late in the step); at 0.75, from 1e-3
    # to 1e-8, every method within 3.7x.
    assert _dense_error(method, 1e-4, control=False) > 100
    for rtol in (1e-3, 1e-4, 1e-6):
        assert _dense_error(method, rtol, control=True) < 5


@pytest.mark.parametrize("method, rtol", [("rodas5p", 3e-7), ("kvaerno5", 3e-6), ("kvaerno3", 1e-6)])
def test_float32_rounding_is_not_taken_for_interpolation_error(method, rtol):
    # In float32 near rtol ~ eps the filtered defect is rounding (of f, of the interpolant and of t, which f sees in
    # float32): taken as error, it kept the steps from growing and these solves ran out of steps.
    solution = solve(prothero_robinson, Y0.float(), SPAN.float(), method=method, rtol=rtol, atol=rtol, dense=True,
                     options={"max_num_steps": 2000})
    assert solution.success
    grid = GRID.float()
    assert float((solution.evaluate(grid)[:, 0] - torch.cos(grid)).abs().max()) < 100 * rtol


def test_the_check_reuses_the_step_factorisation():
    # radau5 on a small system keeps the coupled LU; its RADAU5 error estimate factorises I - h gamma0 J, which the
    # check solves with too (a separate LU per step before: n_lu 128 -> 192 on HIRES).
    def run(control):
        return solve(lambda t, y: -y, torch.ones(3, dtype=F64), torch.tensor([0.0, 5.0], dtype=F64), method="radau5",
                     rtol=1e-6, atol=1e-9, dense=True, options={"dense_error_control": control}).stats

    checked, unchecked = run(True), run(False)
    assert checked["n_accepted"] == unchecked["n_accepted"]
    assert checked["n_lu"] == unchecked["n_lu"]
    assert checked["nfe"] == unchecked["nfe"] + checked["n_steps"]   # one evaluation of f per step


@pytest.mark.parametrize("method", STIFF_METHODS)
def test_events_of_a_stiff_solve_are_found_and_placed(method):
    solution = solve(prothero_robinson, Y0, SPAN, method=method, rtol=1e-4, atol=1e-4,
                     events=[Event(lambda t, y: y[0] - 0.3)])
    exact = [math.acos(0.3), 2 * math.pi - math.acos(0.3), 2 * math.pi + math.acos(0.3)]
    # Unchecked, radau5, rodas5p and kvaerno3 found one crossing of the three and kvaerno5 placed one 0.48 off.
    assert [float(r.t) for r in solution.events] == pytest.approx(exact, abs=1e-3)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_explicit_steps_are_not_checked(method):
    def run(control):
        return solve(prothero_robinson, Y0, torch.tensor([0.0, 1e-3], dtype=F64), method=method, rtol=1e-6,
                     dense=True, options={"dense_error_control": control}).stats

    checked, unchecked = run(True), run(False)
    assert (checked["n_steps"], checked["nfe"]) == (unchecked["n_steps"], unchecked["nfe"])


def test_without_dense_output_or_events_nothing_is_checked():
    # The outputs are landed on by default: the interpolant is not read, and the steps are those of an unchecked solve.
    t = torch.linspace(0.0, 10.0, 11, dtype=F64)
    plain = solve(prothero_robinson, Y0, t, method="radau5", rtol=1e-4, atol=1e-4).stats
    unchecked = solve(prothero_robinson, Y0, t, method="radau5", rtol=1e-4, atol=1e-4,
                      options={"dense_error_control": False}).stats
    assert (plain["n_steps"], plain["nfe"]) == (unchecked["n_steps"], unchecked["nfe"])


def test_a_bad_flag_is_refused():
    with pytest.raises(TypeError, match="option 'dense_error_control' must be True or False"):
        solve(prothero_robinson, Y0, SPAN, method="radau5", options={"dense_error_control": "yes"})


# --- the estimate itself ------------------------------------------------------------------------------------


def _cubic_through(y0, f0, y1, f1, h):
    delta = y1 - y0
    return [y0, h * f0, 3 * delta - h * (2 * f0 + f1), -2 * delta + h * (f0 + f1)]


def test_an_exact_interpolant_has_no_error():
    # y' = 3 t^2: y = t^3 is a cubic, which the Hermite cubic reproduces; its defect is zero.
    def field(t, y):
        return 3 * t ** 2 * torch.ones_like(y)

    h, y0, y1 = 0.7, torch.zeros(1, dtype=F64), torch.full((1,), 0.7 ** 3, dtype=F64)
    coefficients = _cubic_through(y0, field(0.0, y0), y1, field(h, y1), h)
    norm = ErrorNorm(1e-6, 1e-9)
    ratio = interpolation_error(field, 0.0, h, coefficients, (0.25, lambda v: v), norm, y0, y1)
    assert float(ratio) < 1e-6


@pytest.mark.parametrize("stiffness", [1e4, 1e6, 1e8])
def test_the_filtered_defect_measures_the_distance_from_a_stiff_solution(stiffness):
    # y' = -L (y - cos t) - sin t; an interpolant offset from y = cos t by a constant 1e-3: its defect is L times
    # the offset, the filter (1 + h gamma L)^-1 brings that back to the offset (to 1 / (h gamma L)).
    def field(t, y):
        return -stiffness * (y - torch.cos(torch.as_tensor(t, dtype=F64))) - torch.sin(torch.as_tensor(t, dtype=F64))

    h, gamma, offset = 2.0, 0.25, 1e-3
    theta = torch.tensor(INTERPOLATION_CHECK_THETA * h, dtype=F64)
    # cos t to third order about the check point (value and slope exact there), plus the offset.
    expansion = [torch.cos(theta), -torch.sin(theta), -torch.cos(theta) / 2, torch.sin(theta) / 6]
    shifted = []   # the same polynomial in theta = t / h, expanded about 0
    for m in range(4):
        shifted.append(sum(expansion[k] * math.comb(k, m) * (-theta) ** (k - m) for k in range(m, 4)) * h ** m)
    coefficients = [(c + (offset if m == 0 else 0.0)).reshape(1) for m, c in enumerate(shifted)]
    norm = ErrorNorm(1.0, 1.0)     # the ratio is then |e| / (1 + |y|), y ~ 1 here
    ratio = interpolation_error(field, 0.0, h, coefficients, (gamma, lambda v: v / (1 + h * gamma * stiffness)),
                                norm, coefficients[0], coefficients[0])
    scale = 1 + abs(float(coefficients[0]))
    assert float(ratio) * scale == pytest.approx(offset, rel=10 / (h * gamma * stiffness) + 1e-6)


def test_a_compiled_rosenbrock_step_is_checked_as_the_eager_one():
    def run(compile):
        solution = solve(prothero_robinson, Y0, SPAN, method="rodas5p", rtol=1e-4, atol=1e-4, dense=True,
                         compile=compile)
        return solution.stats["n_accepted"], float((solution.evaluate(GRID)[:, 0] - torch.cos(GRID)).abs().max())

    (eager_steps, eager_error), (compiled_steps, compiled_error) = run(False), run(True)
    assert compiled_steps == eager_steps
    assert compiled_error == pytest.approx(eager_error, rel=1e-6) and compiled_error < 1e-3


def test_numpy_bools_are_accepted_for_the_flags():
    import numpy as np
    solution = solve(prothero_robinson, Y0, SPAN, method="radau5", rtol=1e-4, atol=1e-4, dense=True,
                     options={"dense_error_control": np.bool_(False), "land_on_outputs": np.bool_(True)})
    assert solution.success
