"""THE loop: step -> adapt -> save/interpolate -> events. Every method and controller goes through it.

The loop works in internal time ``tau = direction * t``, which always increases, and hands the
stepper real times and signed step sizes. Output times never change the steps taken: values there
come from the step's dense output (or are the step value itself when a step ends exactly on one).
Stops that *do* shape the steps are the end of the span, ``step_t`` (step exactly to these times) and
``jump_t`` (discontinuities of ``func``: step to them and restart from the right-hand limit, never
reusing an evaluation from the left).

Host synchronisation: adaptive methods read the error ratio once per step (the accept/reject
decision needs it on the host); fixed grids never synchronise inside the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field

import torch

from ._errors import ConvergenceError, MaxStepsError, NonFiniteError, Status, StepSizeUnderflowError
from .callbacks import Callbacks, call as call_back
from .controllers import ErrorNorm, initial_step
from .interpolation import DenseSolution, horner, linear_coefficients
from .problem import next_after
from .solvers.linear import spectral_radius


@dataclass
class EventSpec:
    """An event: a zero crossing of ``fn(t, y)``, recorded, and terminal after ``terminal`` occurrences.

    ``fn`` returns a tensor of any shape; an occurrence is the first crossing of *any* element within a
    step. ``direction``: +1 only crossings from negative to positive, -1 only from positive to negative,
    0 both. ``fn`` is called as ``fn(t, y)`` with the user's time tensor and state structure.
    ``terminal``: the solve stops at this occurrence count (1: the first, torchdiffeq's only kind); ``None``:
    never (the occurrences are recorded only).
    """

    fn: object
    direction: int = 0
    terminal: int | None = 1


@dataclass
class Integration:
    """Raw result of the loop (internal; :class:`~neuralode.solution.Solution` is the public view)."""

    outputs: list
    output_times: list
    stats: dict
    status: Status = Status.SUCCESS
    message: str = "The solver reached the end of the interval."
    error: Exception | None = None
    dense: DenseSolution | None = None
    event_t: float | None = None
    event_y: torch.Tensor | None = None
    final_t: float | None = None
    final_y: torch.Tensor | None = None
    accepted_times: list = dataclass_field(default_factory=list)
    # Every event occurrence in time order: (t, y (detached), index into the events, direction +1/-1).
    event_records: list = dataclass_field(default_factory=list)
    event_index: int | None = None   # which event stopped the solve


def _crossed(g0: torch.Tensor, g1: torch.Tensor, direction: int) -> torch.Tensor:
    """Elementwise: did the event function cross zero going from g0 to g1 (in the wanted direction)?"""
    rising = (g0 < 0) & (g1 >= 0)
    falling = (g0 > 0) & (g1 <= 0)
    if direction > 0:
        return rising
    if direction < 0:
        return falling
    return rising | falling


def integrate(problem, stepper, control, *, options: dict, events: list | tuple = (),
              record_dense: bool = False, until_event: bool = False, throw: bool = True,
              on_accept=None, callbacks: Callbacks | None = None, state_jumps: dict | None = None) -> Integration:
    """Integrate ``problem`` with ``stepper`` under ``control`` (an adaptive controller or a fixed grid).

    ``options`` may hold ``step_t``, ``jump_t`` (lists of floats, real time), ``norm``, ``interp``
    (``"linear"`` or ``"cubic"`` for fixed grids) and ``perturb`` (bool). ``until_event`` ignores the
    end of ``t`` and integrates until a terminal event fires (torchdiffeq's event mode). ``events``: the
    :class:`EventSpec` s to watch; every occurrence goes to ``event_records``, and when a terminal one
    fires its state is appended to ``outputs`` (and its time to ``output_times``). ``on_accept(tau1,
    y1, state)`` is called after every accepted step (the checkpointing strategy keeps states there).
    ``callbacks``: the user's step callbacks (:mod:`neuralode.callbacks`), or ``None``.
    ``state_jumps``: ``{tau: jump}`` (internal time): steps land on each ``tau`` (as on ``step_t``) and
    the state there is replaced by ``jump(y)``; the step size carries on across it, unlike a restart
    (the adjoint's one backward solve adds dL/dy(t_i) to the adjoint this way).
    """
    if stepper.solves_whole_span:
        # scipy_solver: scipy runs its own loop over the whole span (see solvers/scipy_wrapper.py).
        if events or until_event:
            raise ValueError("method 'scipy_solver' does not support events (neither does torchdiffeq's); "
                             "use an adaptive method such as 'dopri5' with event_fn")
        span = stepper.solve_span(problem, record_dense=record_dense)
        result = Integration(span.outputs, span.output_times, span.stats, dense=span.dense,
                             final_t=span.output_times[-1], final_y=span.outputs[-1])
        if span.failure is not None:
            raise_or_record(result, span.failure, throw)
        return result
    field, direction = problem.field, problem.direction
    taus = [direction * t for t in problem.times]
    tau = taus[0]
    tau_end = math.inf if until_event else taus[-1]
    y, f = problem.y0, problem.f0
    outputs = [y]
    output_times = [problem.times[0]]
    next_output = 1
    stats = {"nfe": 0, "n_steps": 0, "n_accepted": 0, "n_rejected": 0}
    result = Integration(outputs, output_times, stats)
    dense = DenseSolution(direction) if record_dense else None
    result.dense = dense
    unflatten = field.unflatten if problem.shapes is not None else None
    error_norm = ErrorNorm(problem.rtol, problem.atol, options.get("norm"), unflatten)
    linear = options.get("interp", "cubic") == "linear"
    perturb = bool(options.get("perturb", False))
    adaptive = control.adaptive
    jumps = sorted(direction * t for t in options.get("jump_t", ()))
    state_jumps = state_jumps or {}
    stops = sorted(set(direction * t for t in options.get("step_t", ())) | set(jumps) | set(state_jumps))
    stops = [s for s in stops if tau < s < tau_end] + [tau_end]
    jump_set = set(jumps)
    # Restart from the right-hand limit after a jump (or everywhere, for a perturbed fixed grid). ``f`` is
    # only reused where it was evaluated (``f_time``), and never evaluated at a time the user excluded.
    restart_from_right = tau in jump_set
    if f is None:
        t_first = problem.times[0]
        if perturb or restart_from_right:
            t_first = next_after(t_first, t_first + direction, field.time_dtype)
        f, f_time = field(t_first, y), t_first
    else:
        f_time = problem.f0_time if problem.f0_time is not None else problem.times[0]
    stop_index = 0
    grid = control.grid if not adaptive else None
    grid_index = 0
    event_values = [_event_value(event, field, problem.times[0], y) for event in events]
    event_counts = [0] * len(events)
    state = stepper.init(field, problem.times[0], y, f)

    if adaptive:
        h = control.first_step
        if h is None:
            h = initial_step(field, direction * tau, y, f, direction, stepper.initial_step_order, error_norm)
        h = abs(float(h))
    previous_ratio = older_ratio = 1.0   # error ratios of the last two accepted steps (PI, PID)
    read_together = y.device.type != "cpu"
    last_failure_non_finite = False
    last_newton_failure = None   # why the last rejected step of an implicit method could not be solved

    while next_output < len(taus) or until_event:
        # --- choose the step -------------------------------------------------------------------
        if adaptive:
            h = min(max(h, control.min_step), control.max_step)
            h_proposed = h
            # A step held at min_step is accepted whatever its error, also when clipping to a stop
            # below makes it an ulp longer or shorter.
            pinned = h <= control.min_step
            stop = stops[stop_index]
            if tau + h >= stop:
                tau1, h = stop, stop - tau
            else:
                tau1 = tau + h
            if tau1 <= tau or h <= 0:
                magnitude = float(y.detach().abs().max()) if y.numel() else 0.0
                # A step that collapses while |y| has grown by orders of magnitude is a finite-time
                # blow-up: the solution diverges to infinity, which we report as such (not as a step-size
                # problem); at moderate magnitudes the collapse points to stiffness instead.
                initial_magnitude = float(problem.y0.detach().abs().max()) if y.numel() else 0.0
                diverging = magnitude > _DIVERGENCE_GROWTH * max(1.0, initial_magnitude)
                failure = NonFiniteError if (last_failure_non_finite or diverging) else StepSizeUnderflowError
                message = _underflow_message(direction * tau, h, last_failure_non_finite, magnitude, diverging)
                if not (last_failure_non_finite or diverging):
                    message += _stiffness_hint(stepper, field, direction * tau, y, h_proposed)
                if last_newton_failure is not None and not diverging:
                    failure, message = ConvergenceError, _newton_message(direction * tau, h, last_newton_failure)
                raise_or_record(result, failure(message, t=direction * tau), throw)
                break
        else:
            if grid_index + 1 < len(grid):
                tau1 = grid[grid_index + 1]
            else:
                # Event mode runs past the end of t: keep stepping with the fixed step size.
                tau1 = tau + control.step
            h = tau1 - tau
        t0, t1 = direction * tau, direction * tau1
        ends_on_jump = tau1 in jump_set
        step_field = field
        if perturb or ends_on_jump:
            step_field = _perturbed(field, t0, t1, left=perturb, right=perturb or ends_on_jump)
        if restart_from_right or perturb:
            t_right = next_after(t0, t1, field.time_dtype)
            if f is None or f_time != t_right:
                f, f_time = field(t_right, y), t_right
            restart_from_right = False
        elif f is None:
            f, f_time = field(t0, y), t0

        # --- attempt it ------------------------------------------------------------------------
        if callbacks is not None and callbacks.step is not None:
            call_back(callbacks.step, field, t0, y, h)
        outcome = stepper.step(step_field, t0, y, f, direction * h, error_norm, state)
        stats["n_steps"] += 1
        accepted = True
        if outcome.failure is not None:
            # An implicit method could not solve its stage equations: shrink the step, unless it cannot.
            if not adaptive or pinned:
                where = "on the fixed grid" if not adaptive else f"at min_step={control.min_step:.3g}"
                raise_or_record(result, ConvergenceError(_newton_message(t0, h, outcome.failure, where), t=t0), throw)
                break
            accepted, last_newton_failure = False, outcome.failure
            h_next = h * (outcome.step_factor or control.dfactor)
        elif adaptive:
            # A step is accepted only if its result is finite: the weighted norm cannot see an infinite
            # y1 (its scale becomes infinite too) and a user's norm may hide NaN, so the sum of y1 (not
            # finite iff some element is not) is read with the ratio: on a device in the same host read,
            # on the CPU as a second float (measured: 3 us a step; torch.where(isfinite(y1).all(), ...)
            # cost 23 us).
            total = outcome.y1.detach().sum()  # (no graph: a check, not part of the solution)
            if total.is_complex():
                total = total.real + total.imag
            if read_together:  # one synchronisation with the device for both numbers
                ratio, total = torch.stack([outcome.error_ratio.to(total.dtype), total]).tolist()
            else:              # on the CPU two reads are cheaper than a stack (3 us against 7 us)
                ratio, total = float(outcome.error_ratio), float(total)
            if not math.isfinite(total):
                ratio = math.nan
            if not math.isfinite(ratio):
                accepted, last_failure_non_finite = False, True
                h_next = h * control.dfactor
            else:
                accepted = ratio <= 1.0 or pinned
                last_failure_non_finite = False
                last_newton_failure = None
                h_next = control.next_step(h, ratio, previous_ratio, outcome.error_order, accepted, older_ratio)
                if accepted and outcome.step_factor is not None:
                    h_next = h * outcome.step_factor
                if accepted:
                    previous_ratio, older_ratio = ratio, previous_ratio
        if callbacks is not None and adaptive:
            chosen = callbacks.accept if accepted else callbacks.reject
            if chosen is not None:
                call_back(chosen, field, t0, y, h)
        if not accepted:
            stats["n_rejected"] += 1
            h = h_next
            if stats["n_steps"] >= control.max_num_steps:
                raise_or_record(result, MaxStepsError(_max_steps_message(control.max_num_steps, t0)
                                                     + _stiffness_hint(stepper, field, t0, y, h), t=t0), throw)
                break
            continue

        # --- accept ----------------------------------------------------------------------------
        stats["n_accepted"] += 1
        y1 = outcome.y1
        f1 = outcome.f1
        if ends_on_jump:
            f1, restart_from_right = None, True
        coefficients = None

        def dense_coefficients():
            nonlocal f1
            if linear:
                return linear_coefficients(y, y1)
            if f1 is None:
                f1 = step_field(t1, y1)
            return stepper.dense_coefficients(step_field, t0, y, direction * h, outcome, f1)

        # Events first: outputs past the event time are not part of the solution.
        fired = False
        tau_reached = tau1
        if events:
            occurrences = []
            for k, event in enumerate(events):
                new_value = _event_value(event, field, t1, y1)
                if bool(_crossed(event_values[k], new_value, event.direction).any()):
                    if coefficients is None:
                        coefficients = dense_coefficients()
                    theta = _locate_event(event, field, tau, h, direction, coefficients, event_values[k])
                    occurrences.append((theta, k, event_values[k]))
                event_values[k] = new_value
            for theta, k, value0 in sorted(occurrences, key=lambda o: (o[0], o[1])):
                t_event = direction * (tau + theta * h)
                y_event = y1 if theta == 1.0 else horner(coefficients, theta)
                value = _event_value(events[k], field, t_event, y_event)
                rising = bool(((value0 < 0) & (value >= 0)).any())
                result.event_records.append((t_event, y_event.detach(), k, 1 if rising else -1))
                event_counts[k] += 1
                if events[k].terminal is not None and event_counts[k] >= events[k].terminal:
                    fired, tau_reached = True, tau + theta * h
                    result.event_t, result.event_y, result.event_index = t_event, y_event, k
                    result.final_t, result.final_y = result.event_t, result.event_y
                    result.status, result.message = Status.EVENT, "A terminal event occurred."
                    break
        while next_output < len(taus) and taus[next_output] <= tau_reached:
            if taus[next_output] == tau1:
                outputs.append(y1)
            else:
                if coefficients is None:
                    coefficients = dense_coefficients()
                outputs.append(horner(coefficients, (taus[next_output] - tau) / h))
            output_times.append(problem.times[next_output])
            next_output += 1
        if dense is not None:
            if coefficients is None:
                coefficients = dense_coefficients()
            dense.append(tau, h, coefficients)
            dense.end_value = y1
            result.accepted_times.append(t1)
        if fired:
            if dense is not None:
                # The solution ends at the event: dense output must not reach past it.
                dense.end_tau, dense.end_value = tau_reached, result.event_y
                result.accepted_times[-1] = result.event_t
            if on_accept is not None:
                on_accept(tau1, y1, outcome.state)  # the checkpointing replay must cover this step too
            outputs.append(result.event_y)
            output_times.append(result.event_t)
            break
        if tau1 in state_jumps:
            # The state changes here: f must be evaluated afresh, and the step size the controller
            # proposed before landing on tau1 (not the clipped one) carries on.
            y1, f1 = state_jumps[tau1](y1), None
            if adaptive:
                h_next = max(h_next, h_proposed)
        tau, y, f = tau1, y1, (None if ends_on_jump else f1)
        f_time = None if (perturb or ends_on_jump) else t1  # a perturbed f1 is the left-hand limit
        state = outcome.state
        if on_accept is not None:
            on_accept(tau1, y1, state)
        if adaptive:
            h = h_next
            if tau1 == stops[stop_index] and stop_index < len(stops) - 1:
                stop_index += 1
            if stats["n_steps"] >= control.max_num_steps and (next_output < len(taus) or until_event):
                raise_or_record(result, MaxStepsError(_max_steps_message(control.max_num_steps, t1)
                                                     + _stiffness_hint(stepper, field, t1, y, h), t=t1), throw)
                break
        else:
            grid_index += 1
            if until_event and grid_index >= len(grid) - 1 and stats["n_steps"] >= control.max_num_steps:
                # Past the grid, a fixed-step event solve runs until the event: capped like adaptive ones.
                raise_or_record(result, MaxStepsError(
                    f"the event did not occur within max_num_steps={control.max_num_steps} fixed steps (t={t1}); "
                    "check event_fn, or raise the cap with options={'max_num_steps': N}", t=t1), throw)
                break

    if result.final_t is None:
        result.final_t, result.final_y = direction * tau, y
    if not adaptive and result.status == Status.SUCCESS:
        _check_finite_outputs(result, problem, throw)
    stats["nfe"] = field.nfe
    stats.update(stepper.statistics(state))
    return result


def raise_or_record(result: Integration, error: Exception, throw: bool) -> None:
    if throw:
        raise error
    result.status, result.message, result.error = error.status, str(error), error


def _check_finite_outputs(result, problem, throw):
    """Fixed grids do not synchronise per step, so non-finite values are found once, at the end."""
    if not result.outputs:
        return
    finite = torch.stack([torch.isfinite(o).all() for o in result.outputs]).cpu().tolist()
    if all(finite):
        return
    first = finite.index(False)
    t_bad = result.output_times[first]
    error = NonFiniteError(f"the solution became NaN or infinite by t={t_bad} (first non-finite output); the "
                           "vector field blew up or the fixed step is too large for this problem: reduce "
                           "step_size or use an adaptive method", t=t_bad)
    raise_or_record(result, error, throw)
    # With throw=False the solution ends where it was last finite, as an adaptive solve's does.
    del result.outputs[first:], result.output_times[first:]
    result.final_t, result.final_y = result.output_times[-1], result.outputs[-1]


def _perturbed(field, t0: float, t1: float, left: bool, right: bool):
    """Evaluate at the one-sided limits at the step ends (torchdiffeq's ``perturb``)."""
    t0_inside = next_after(t0, t1, field.time_dtype) if left else t0
    t1_inside = next_after(t1, t0, field.time_dtype) if right else t1
    d = 1.0 if t1 > t0 else -1.0

    def evaluate(t, y):
        # Stage times are t0 + c h, and t0 + (t1 - t0) can land a rounding error beyond t1: compare by
        # side, not equality, so a stage at c = 1 never crosses the discontinuity.
        if left and d * t <= d * t0:
            t = t0_inside
        elif right and d * t >= d * t1:
            t = t1_inside
        return field(t, y)

    return evaluate


def _event_value(event: EventSpec, field, t: float, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        value = event.fn(field.time(t), field.unflatten(y))
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    return value.detach()


def _locate_event(event, field, tau0, h, direction, coefficients, value0) -> float:
    """Bisection on the step's dense output for the first theta in (0, 1] where any element crosses.

    Runs until the bracket cannot shrink in floating point (at most ~60 evaluations of the event
    function, which is cheap next to the solve); returns the right end of the final bracket, so the
    event state is on the far side of the crossing, like a step that lands just past it.
    """
    lo, hi = 0.0, 1.0
    with torch.no_grad():
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi) or (tau0 + mid * h) in (tau0 + lo * h, tau0 + hi * h):
                break
            value = _event_value(event, field, direction * (tau0 + mid * h), horner(coefficients, mid))
            if bool(_crossed(value0, value, event.direction).any()):
                hi = mid
            else:
                lo = mid
    return hi


_DIVERGENCE_GROWTH = 1e8


def _underflow_message(t: float, h: float, non_finite: bool, magnitude: float, diverging: bool = False) -> str:
    if diverging and not non_finite:
        return (f"the solution diverges to infinity near t={t}: |y| reached {magnitude:.3g} (over "
                f"{_DIVERGENCE_GROWTH:.0e} times its initial size) while the step shrank to {h:.3g}. The ODE "
                "has a finite-time blow-up (non-finite solution) here; check the vector field and its parameters")
    if non_finite:
        return (f"non-finite values (NaN or inf) appeared in the vector field evaluations at t={t}; "
                f"shrinking the step to {h:.3g} did not avoid them. The vector field likely blows up "
                "near this time: check it (and its parameters) there")
    return (f"step size underflow at t={t}: the step shrank to {h:.3g}, below the resolution of the time "
            f"variable (largest |y| there: {magnitude:.3g}). The solution may blow up here (a singularity), or "
            "the problem is stiff; loosen rtol/atol, set min_step, or check the vector field")


def _newton_message(t: float, h: float, reason: str, where: str = "") -> str:
    where = f" {where}" if where else f" (the step shrank to {h:.3g})"
    if "singular" in reason:
        # A singular I - h gamma J: more iterations cannot help (and Rosenbrock methods have none).
        advice = ("Try another step size (first_step or max_step; step_size on a fixed grid) or check df/dy of "
                  "the vector field near this time")
    else:
        advice = ("Try a smaller step (step_size on a fixed grid, a smaller min_step), more Newton iterations "
                  "with options={'max_iters': N}, or check the vector field for a singularity near this time")
    return f"the implicit method could not solve its stage equations at t={t}{where}: {reason}. {advice}"


def _stiffness_hint(stepper, field, t: float, y: torch.Tensor, h: float) -> str:
    """For an explicit method that stalled: say so when the step is at an explicit method's stability
    limit, ``h |lambda| >~ 1`` with ``lambda`` the dominant eigenvalue of ``df/dy`` (power iteration
    with a dozen Jacobian-vector products, paid only on this failure path)."""
    if stepper.implicit or y.numel() == 0:
        return ""
    try:
        rho = spectral_radius(field.evaluate, t, y)
    except (RuntimeError, TypeError, ValueError):   # a field forward-mode AD and differences cannot probe
        return ""
    if abs(h) * rho <= 1.0:
        return ""
    return (f". The problem looks stiff here: the step {abs(h):.3g} times the dominant eigenvalue |lambda| ~ "
            f"{rho:.3g} of df/dy is {abs(h) * rho:.2g}, at the stability limit of an explicit method; try "
            "method='kvaerno5', 'radau5' or 'auto'")


def _max_steps_message(max_num_steps, t: float) -> str:
    return (f"reached the maximum number of steps (max_num_steps={max_num_steps}) at t={t}; raise it with "
            "options={'max_num_steps': N}, loosen rtol/atol, or check whether the problem is stiff")


__all__ = ["integrate", "EventSpec", "Integration"]
