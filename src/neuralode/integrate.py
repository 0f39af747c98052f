"""THE loop: step -> adapt -> save/interpolate -> events. Every method and controller goes through it.

The loop works in internal time ``tau = direction * t``, which always increases, and hands the
stepper real times and signed step sizes. Output times never change the steps of the explicit methods: values
there come from the step's dense output (or are the step value itself when a step ends exactly on one). The
implicit, Rosenbrock and auto methods end their steps on them (``land_on_outputs``), or, interpolating, accept a
step only when its interpolant meets the tolerance too (``dense_error_control``).
Stops that *do* shape the steps are the end of the span, ``step_t`` (step exactly to these times) and
``jump_t`` (discontinuities of ``func``: step to them and restart from the right-hand limit, never
reusing an evaluation from the left).

Host synchronisation: adaptive methods read the error ratio once per step (the accept/reject
decision needs it on the host); fixed grids never synchronise inside the loop. With ``compile=True`` a
plain solve (no stops inside the span, events, callbacks or graph to record) runs as one compiled call
that decides on the device (:meth:`~neuralode.solvers.compiled.CompiledRungeKutta.run_loop`); this loop
takes over from where it stopped when a step needs its judgement (a collapsing step, the step budget).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field as dataclass_field, replace

import torch

from ._errors import ConvergenceError, MaxStepsError, NonFiniteError, SolverError, Status, StepSizeUnderflowError
from ._numbers import real_number
from .callbacks import Callbacks, call as call_back
from .controllers import AdaptiveController, AdaptiveStepping, ErrorNorm, FixedStepping, initial_step
from .interpolation import DenseSolution, horner, interpolation_error, linear_coefficients
from .problem import below_time_resolution, next_after
from .solvers.linear import SingularMatrixError, spectral_radius


@dataclass
class EventSpec:
    """An event: a zero crossing of ``fn(t, y)``, recorded, and terminal after ``terminal`` occurrences.

    ``fn`` returns a tensor of any shape; an occurrence is the first crossing of *any* element between two
    points checked: the step's ends and ``samples`` evenly spaced points of its dense output between them.
    ``direction``: +1 only crossings from negative to positive, -1 only from positive to negative,
    0 both. ``fn`` is called as ``fn(t, y)`` with the user's time tensor and state structure.
    ``terminal``: the solve stops at this occurrence count (1: the first, torchdiffeq's only kind); ``None``:
    never (the occurrences are recorded only).
    """

    fn: object
    direction: int = 0
    terminal: int | None = 1
    tol: float | None = None       # root tolerance in time (None: bisect to rounding)
    samples: int = 4               # sign checks inside each step (Event.samples)
    # The value to start from instead of fn(t0, y0): a restart after a jump (jumps.py) gives the elements that the
    # jump left at their root the sign they take just after it.
    start_value: torch.Tensor | None = None


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
    event_signs: torch.Tensor | None = None   # its values' signs at the start of the firing step
    # Every event that occurred at the terminal event's very time, the terminal one first: (index, signs before)
    simultaneous: list = dataclass_field(default_factory=list)


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
              on_accept=None, callbacks: Callbacks | None = None, state_jumps: dict | None = None,
              reads_interpolant: bool = False) -> Integration:
    """Integrate ``problem`` with ``stepper`` under ``control`` (an adaptive controller or a fixed grid).

    ``options`` may hold ``step_t``, ``jump_t`` (lists of floats, real time), ``land_on_outputs`` (steps end on
    the output times; default ``stepper.lands_on_outputs``, adaptive control only), ``norm``, ``interp``
    (``"linear"`` or ``"cubic"`` for fixed grids), ``perturb`` (bool) and ``dense_error_control`` (bool, default
    True: where events, the dense solution or outputs between the steps read a stiff method's interpolant, a step is
    accepted only when its interpolant meets the tolerance too, :func:`~neuralode.interpolation.interpolation_error`;
    adaptive control only). ``until_event`` ignores the
    end of ``t`` and integrates until a terminal event fires (torchdiffeq's event mode). ``events``: the
    :class:`EventSpec` s to watch; every occurrence goes to ``event_records``, and when a terminal one
    fires its state is appended to ``outputs`` (and its time to ``output_times``). ``on_accept(tau1,
    y1, state)`` is called after every accepted step (the checkpointing strategy keeps states there).
    ``callbacks``: the user's step callbacks (:mod:`neuralode.callbacks`), or ``None``.
    ``state_jumps``: ``{tau: jump}`` (internal time): steps land on each ``tau`` (as on ``step_t``) and
    the state there is replaced by ``jump(y)``; the step size carries on across it, unlike a restart
    (the adjoint's one backward solve adds dL/dy(t_i) to the adjoint this way). ``reads_interpolant``: the caller
    reads the steps' dense output later without ``record_dense`` (the interpolating adjoint replays the steps
    from checkpoints), so it is checked as for events and the dense solution.
    """
    if stepper.solves_whole_span:
        return _whole_span(problem, stepper, bool(events) or until_event, record_dense, throw)
    field, direction = problem.field, problem.direction
    taus = [direction * t for t in problem.times]
    tau, y = taus[0], problem.y0
    tau_end = math.inf if until_event else taus[-1]
    stats = {"nfe": 0, "n_steps": 0, "n_accepted": 0, "n_rejected": 0}
    result = Integration([y], [problem.times[0]], stats,
                         dense=DenseSolution(direction, tau, y) if record_dense else None)
    error_norm = ErrorNorm(problem.rtol, problem.atol, options.get("norm"),
                           field.unflatten if problem.shapes is not None else None)
    state_jumps = state_jumps or {}
    derivative = _Derivative(problem, options, tau, stepper.reads_derivative)
    outputs = _Outputs(result, taus, problem.times, options.get("interp", "cubic") == "linear")
    watch = _Events(events, field, problem.times[0], y, result)
    state = stepper.init(field, problem.times[0], y, derivative.f)
    stops = set(direction * t for t in options.get("step_t", ())) | derivative.jumps | set(state_jumps)
    landings = set()
    if (isinstance(control, AdaptiveController) and not until_event
            and options.get("land_on_outputs", stepper.lands_on_outputs)):
        landings = _output_landings(taus) - stops   # the steps end on the output times (Solver.lands_on_outputs)
    stops = sorted(stops | landings)
    stepping = control.start([s for s in stops if tau < s < tau_end] + [tau_end], lambda: initial_step(
        field, direction * tau, y, derivative.f, direction, stepper.initial_step_order, error_norm),
        read_together=y.device.type != "cpu")

    # Events, the dense solution and outputs between the steps read the interpolant: a stiff method's is checked with
    # its step (the explicit methods' steps are short enough for theirs).
    interpolated_outputs = bool(set(taus[1:-1]) - set(stops))
    check_interpolant = (isinstance(stepping, AdaptiveStepping) and stepper.implicit   # (only these have a filter)
                         and (bool(events) or until_event or record_dense or reads_interpolant or interpolated_outputs)
                         and options.get("dense_error_control", True))
    rejected = False   # the last attempt was rejected (fixed grids accept every step)
    if (getattr(stepper, "run_loop", None) is not None and isinstance(stepping, AdaptiveStepping)
            and not (events or until_event or record_dense or on_accept or callbacks or state_jumps)
            and (stepping.controller.force_min_step or not stepping.controller.min_step)):
        steps_before = stats["n_steps"]
        tau, y = _compiled_loop(stepper, stepping, derivative, outputs, error_norm, stats, tau, y, tau_end, direction)
        # The compiled loop's integral controller shrinks a step only on a rejection: a step it hands over below the
        # time's resolution after an attempt of its own follows one (and is judged as the eager loop judges it).
        rejected = stats["n_steps"] > steps_before and below_time_resolution(tau, stepping.h)

    while outputs.pending or until_event:
        proposal = stepping.propose(tau)
        t0, t1, h = direction * tau, direction * proposal.tau1, proposal.h
        # The resolution rule judges a step that a rejection shrank (scipy's): a first step, a max_step or the step
        # after a clipped one may be that short and fine; with a min_step the user has set the floor.
        collapsed = (rejected and not proposal.pinned and not stepping.controller.min_step
                     and below_time_resolution(tau, proposal.unclipped))
        if proposal.tau1 <= tau or h <= 0 or collapsed:
            raise_or_record(result, _collapse_error(stepping, proposal, stepper, problem, t0, y), throw)
            break
        step_field, f = derivative.for_step(t0, t1, proposal.tau1, y)
        if callbacks is not None and callbacks.step is not None:
            call_back(callbacks.step, field, t0, y, h)
        outcome = stepper.step(step_field, t0, y, f, direction * h, error_norm, state)
        stats["n_steps"] += 1
        reason = stepping.cannot_shrink(proposal) if outcome.failure is not None else None
        if reason is not None:
            raise_or_record(result, ConvergenceError(_newton_message(t0, h, outcome.failure, reason), t=t0), throw)
            break
        step = None
        if check_interpolant and outcome.failure is None and outcome.error_ratio is not None:
            step = _AcceptedStep(stepper, step_field, tau, proposal.tau1, h, direction, y, outcome,
                                 derivative.ends_on_jump, outputs.linear)
            outcome = _with_interpolation_error(stepper, step, error_norm)
        accepted = stepping.judge(proposal, outcome)
        if callbacks is not None and stepping.verdict_callbacks:
            chosen = callbacks.accept if accepted else callbacks.reject
            if chosen is not None:
                call_back(chosen, field, t0, y, h)
        rejected = not accepted
        if not accepted:
            stats["n_rejected"] += 1
            if proposal.at_floor and stepping.non_finite:
                # A step at min_step cannot shrink: retrying it would give the same NaN until max_num_steps.
                raise_or_record(result, NonFiniteError(pinned_non_finite_message(t0, stepping.controller.min_step),
                                                       t=t0), throw)
                break
            if proposal.at_floor:   # (force_min_step=False: a step at min_step was judged, and failed)
                switching = getattr(stepper, "stiff", None) is not None   # (auto: tsit5 until stiffness shows)
                hint = (". Method 'auto' takes explicit steps until a few of them show stiffness, so a min_step "
                        "above an explicit method's stable step fails before it switches: lower min_step, or "
                        "solve with the stiff method itself" if switching
                        else _stiffness_hint(stepper, field, t0, y, h))
                raise_or_record(result, StepSizeUnderflowError(min_step_failed_message(
                    t0, stepping.controller.min_step) + hint, t=t0), throw)
                break
            if stepping.over_budget(stats["n_steps"], until_event):
                raise_or_record(result, _budget_error(stepping, stepper, field, t0, y, until_event, error_norm,
                                                      len(landings)), throw)
                break
            continue

        stats["n_accepted"] += 1
        if step is None:
            step = _AcceptedStep(stepper, step_field, tau, proposal.tau1, h, direction, y, outcome,
                                 derivative.ends_on_jump, outputs.linear)
        fired = watch.check(step)        # events first: outputs past a terminal event are not part of the solution
        outputs.save(step, watch.reached)
        if result.dense is not None:
            result.dense.append(tau, h, step.coefficients())
            result.dense.end_value = step.y1
            result.accepted_times.append(t1)
        if fired:
            if result.dense is not None:   # the solution ends at the event: dense output must not reach past it
                result.dense.end_tau, result.dense.end_value = watch.reached, result.event_y
                result.accepted_times[-1] = result.event_t
            if on_accept is not None:
                on_accept(proposal.tau1, step.y1, outcome.state)  # the checkpointing replay must cover this step too
            result.outputs.append(result.event_y)
            result.output_times.append(result.event_t)
            break
        y1, f1 = step.y1, step.f1
        jumped = proposal.tau1 in state_jumps
        if jumped:
            y1, f1 = state_jumps[proposal.tau1](y1), None   # the state changes here: f is evaluated afresh
        # After a state jump, or an output landed on for its value alone, the step size carries on.
        stepping.advance(proposal, jumped or proposal.tau1 in landings)
        tau, y, state = proposal.tau1, y1, outcome.state
        derivative.after_step(t1, f1, restart=jumped)
        if on_accept is not None:
            on_accept(tau, y, state)
        if stepping.over_budget(stats["n_steps"], until_event) and (outputs.pending or until_event):
            raise_or_record(result, _budget_error(stepping, stepper, field, t1, y, until_event, error_norm,
                                                  len(landings)), throw)
            break

    if result.final_t is None:
        result.final_t, result.final_y = direction * tau, y
    if result.status == Status.SUCCESS:
        # Fixed grids do not synchronise per step; adaptive steps check their ends, not the outputs interpolated
        # between them, which can read the field where it is not finite (dopri8's extra stages, f(y1) of a Hermite).
        _check_finite_outputs(result, problem, throw, fixed=not stepping.checks_each_step)
    if result.status in (Status.SUCCESS, Status.EVENT) and stats["n_accepted"]:
        # (after a terminal event too: a spurious one can be the symptom, y and state being the firing step's start)
        wrong = stepper.final_check(field, direction * tau, y, state, error_norm)
        if wrong is not None:
            raise_or_record(result, SolverError(wrong, t=result.final_t), throw)
    stats["nfe"] = field.nfe
    stats.update(stepper.statistics(state))
    return result


def _with_interpolation_error(stepper, step: "_AcceptedStep", error_norm):
    """The step's outcome with its error ratio raised to its interpolant's where the stepper is stiff (one more
    evaluation of ``f`` and one solve with the step's LU), so that a step whose dense output misses the tolerance is
    rejected like one whose end does; unchanged for explicit steppers (``Solver.stiff_filter``)."""
    outcome, h = step.outcome, step.direction * step.h
    stiff_filter = stepper.stiff_filter(outcome, h)
    if stiff_filter is None:
        return outcome
    try:
        ratio = interpolation_error(step.step_field, step.direction * step.tau, h, step.coefficients(), stiff_filter,
                                    error_norm, step.y0, outcome.y1)
    except SingularMatrixError:      # (GMRES short of its tolerance: the step's own estimate decides)
        return outcome
    return replace(outcome, error_ratio=torch.maximum(outcome.error_ratio, ratio.to(outcome.error_ratio.dtype)))


def _output_landings(taus: list) -> set:
    """The output times (internal) the steps end on when a method lands on its outputs: all but the first, less
    those within float64 rounding of the time before them (16 eps of the span's magnitude), where a step that
    short would divide by a subnormal h; the interpolant is exact there to rounding."""
    scale = 16 * sys.float_info.epsilon * max(abs(taus[0]), abs(taus[-1]), abs(taus[-1] - taus[0]))
    landings, previous = set(), taus[0]
    for tau in taus[1:]:
        if tau - previous > scale:
            landings.add(tau)
            previous = tau
    return landings - {taus[-1]}   # (the end is a stop anyway)


def _compiled_loop(stepper, stepping, derivative, outputs, error_norm, stats, tau, y, tau_end, direction):
    """Run the steps to the end of the span in the compiled stepper's one-call loop, where it applies (no stops
    but the end, no one-sided limits, the controller's own step rule): the same steps, decisions and outputs as
    the loop below, without its host read and Python work per step. Returns ``(tau, y)`` where it stopped: the
    end, or before a step the loop below must take itself (a collapsing step, the step budget), which it then
    does from exactly this state."""
    control = stepping.controller
    if (stepping.stops != [tau_end] or derivative.perturb or derivative.jumps
            or type(control).adapt is not AdaptiveController.adapt
            or type(control).next_step is not AdaptiveController.next_step):
        return tau, y
    _, f = derivative.for_step(direction * tau, direction * tau_end, tau_end, y)
    done = stepper.run_loop(derivative.field, stepping, error_norm, tau, y, f, outputs.taus[outputs.next:],
                            control.max_num_steps - 1 - stats["n_steps"], direction)
    if done is None:
        return tau, y
    tau, y, f, values, attempts, accepted = done
    stats["n_steps"] += attempts
    stats["n_accepted"] += accepted
    stats["n_rejected"] += attempts - accepted
    outputs.extend(values)
    derivative.after_step(direction * tau, f)
    return tau, y


def _whole_span(problem, stepper, wants_events, record_dense, throw) -> Integration:
    """scipy_solver: scipy runs its own loop over the whole span (see solvers/scipy_wrapper.py)."""
    if wants_events:
        raise ValueError("method 'scipy_solver' does not support events (neither does torchdiffeq's); "
                         "use an adaptive method such as 'dopri5' with event_fn")
    span = stepper.solve_span(problem, record_dense=record_dense)
    result = Integration(span.outputs, span.output_times, span.stats, dense=span.dense,
                         final_t=span.output_times[-1], final_y=span.outputs[-1])
    if span.failure is not None:
        raise_or_record(result, span.failure, throw)
    return result


class _Derivative:
    """``f`` at the start of the next step, with the one-sided limits that ``perturb`` and ``jump_t`` ask for.

    After a jump (or everywhere, for a perturbed solve) a step restarts from the right-hand limit: ``f`` is
    only reused where it was evaluated (``f_time``), and never evaluated at a time the user excluded.
    """

    def __init__(self, problem, options, tau0, reads_derivative=True):
        self.field, direction = problem.field, problem.direction
        # A stepper that does not read f(t0, y0) (Solver.reads_derivative) gets it only where it starts afresh.
        self.reads, self.restart = reads_derivative, False
        self.perturb = bool(options.get("perturb", False))
        self.jumps = set(direction * t for t in options.get("jump_t", ()))
        self.restart_from_right = tau0 in self.jumps
        self.f = problem.f0
        if self.f is None:
            t_first = problem.times[0]
            if self.perturb or self.restart_from_right:
                t_first = next_after(t_first, t_first + direction, self.field.time_dtype)
            self.f, self.f_time = self.field(t_first, problem.y0), t_first
        else:
            self.f_time = problem.f0_time if problem.f0_time is not None else problem.times[0]
        self._ends_on_jump = False

    def for_step(self, t0, t1, tau1, y):
        """The field the step evaluates (one-sided at its ends where needed) and ``f(t0, y)``."""
        self._ends_on_jump = tau1 in self.jumps
        step_field = self.field
        if self.perturb or self._ends_on_jump:
            step_field = _perturbed(self.field, t0, t1, left=self.perturb, right=self.perturb or self._ends_on_jump)
        if self.restart_from_right or self.perturb:
            t_right = next_after(t0, t1, self.field.time_dtype)
            if self.f is None or self.f_time != t_right:
                self.f, self.f_time = self.field(t_right, y), t_right
            self.restart_from_right = False
        elif self.f is None and (self.reads or self.restart):
            self.f, self.f_time = self.field(t0, y), t0
        return step_field, self.f

    @property
    def ends_on_jump(self) -> bool:
        """Does the step being taken end on a ``jump_t``?"""
        return self._ends_on_jump

    def after_step(self, t1, f1, restart=False):
        """The accepted step ended at ``t1`` with derivative ``f1`` there (``None``: evaluate afresh where the stepper
        reads it). ``restart``: the state changed there, so even a stepper that carries its own evaluations starts
        afresh."""
        self.restart = restart
        if self._ends_on_jump:
            self.f, self.restart_from_right = None, True
        else:
            self.f = f1
        self.f_time = None if (self.perturb or self._ends_on_jump) else t1  # a perturbed f1 is the left limit


class _AcceptedStep:
    """An accepted step from ``tau`` to ``tau1`` (internal time), ``h = tau1 - tau``, with its dense output
    built on first use (by events, outputs or the dense solution, whichever asks first)."""

    __slots__ = ("stepper", "step_field", "direction", "tau", "tau1", "h", "y0", "y1", "outcome", "linear", "f1",
                 "_coefficients")

    def __init__(self, stepper, step_field, tau, tau1, h, direction, y0, outcome, ends_on_jump, linear):
        self.stepper, self.step_field, self.direction = stepper, step_field, direction
        self.tau, self.tau1, self.h = tau, tau1, h
        self.y0, self.y1, self.outcome, self.linear = y0, outcome.y1, outcome, linear
        self.f1 = None if ends_on_jump else outcome.f1   # a derivative from the left of a jump is not reused
        self._coefficients = None

    def coefficients(self) -> list:
        if self._coefficients is None:
            if self.linear:
                self._coefficients = linear_coefficients(self.y0, self.y1)
            else:
                if self.f1 is None and self.stepper.reads_derivative:
                    self.f1 = self.step_field(self.direction * self.tau1, self.y1)
                self._coefficients = self.stepper.dense_coefficients(self.step_field, self.direction * self.tau, self.y0,
                                                                     self.direction * self.h, self.outcome, self.f1)
        return self._coefficients


class _Outputs:
    """Values at the requested output times, from each accepted step's dense output (never changing steps)."""

    def __init__(self, result, taus, times, linear):
        self.result, self.taus, self.times, self.linear = result, taus, times, linear
        self.next = 1
        self.pending = len(taus) > 1   # output times not reached yet

    def save(self, step: _AcceptedStep, tau_reached: float) -> None:
        taus = self.taus
        if not self.pending or taus[self.next] > tau_reached:
            return   # (the common case: no output time inside this step)
        while self.next < len(taus) and taus[self.next] <= tau_reached:
            if taus[self.next] == step.tau1:
                self.result.outputs.append(step.y1)
            else:
                self.result.outputs.append(horner(step.coefficients(), (taus[self.next] - step.tau) / step.h))
            self.result.output_times.append(self.times[self.next])
            self.next += 1
        self.pending = self.next < len(taus)

    def extend(self, values: list) -> None:
        """The values at the next ``len(values)`` output times (from the compiled loop)."""
        for value in values:
            self.result.outputs.append(value)
            self.result.output_times.append(self.times[self.next])
            self.next += 1
        self.pending = self.next < len(self.taus)


class _Events:
    """The events watched in one solve: their last values, occurrence counts, and where the solution ends."""

    def __init__(self, events, field, t0, y0, result):
        self.events, self.field, self.result = events, field, result
        self.values = [_event_value(event, field, t0, y0) for event in events]
        self.values = [value if event.start_value is None else event.start_value
                       for event, value in zip(events, self.values)]
        for event, value in zip(events, self.values):
            if not bool(torch.isfinite(value).all()):
                raise _non_finite_event(event, t0, value)
        self.counts = [0] * len(events)
        self.reached = None   # internal time up to which the last accepted step is part of the solution
        self.powers = {}      # (thetas, degree, dtype, device) -> the powers of theta the samples interpolate with

    def _signs(self, event, step, thetas, value0) -> tuple:
        """``(thetas, values, crossed, finite)``: the event function at the step's start (``value0``), at
        ``thetas`` on its dense output (less those where that is not finite) and at its end; whether it crossed
        between each pair of those points, and whether all were finite, read from the device together (a NaN
        never compares, so a NaN event function would silently never fire). dopri8's dense output costs its 3
        evaluations of ``f`` on every step then: a cubic Hermite through the step's ends, which costs none, missed
        the crossings 0.2 apart that tests/test_events_multiple.py places inside one step."""
        direction, field = step.direction, self.field
        values = [value0]
        if thetas:
            states = self._interpolate_many(step.coefficients(), thetas)
            values += [_event_value(event, field, direction * (step.tau + theta * step.h), state, like=value0)
                       for theta, state in zip(thetas, states.unbind(0))]
        values.append(_event_value(event, field, direction * step.tau1, step.y1, like=value0))
        stacked = torch.stack(values)
        checks = _crossed(stacked[:-1], stacked[1:], event.direction).reshape(len(values) - 1, -1).any(1)
        flags = [checks, torch.isfinite(stacked[1:]).all().reshape(1)]
        if thetas:
            flags.append(torch.isfinite(states).reshape(len(thetas), -1).all(1))
        flags = torch.cat(flags).tolist()
        crossed, finite, states_finite = flags[:len(checks)], flags[len(checks)], flags[len(checks) + 1:]
        if not all(states_finite):
            # The interpolant overflowed (a blow-up whose step ends are still finite): its samples tell nothing about
            # the event function, which must not be blamed for them; the step's ends decide, and the loop reports the
            # solution's own failure.
            return self._signs(event, step, [theta for theta, ok in zip(thetas, states_finite) if ok], value0)
        return thetas, values, crossed, finite

    def _interpolate_many(self, coefficients: list, thetas: list) -> torch.Tensor:
        """The step's interpolant at several thetas in one product: shape ``(len(thetas), *y.shape)``; the powers
        of theta are built once per solve (per sample set, degree, dtype and device), not per step."""
        stacked = torch.stack([c.detach() for c in coefficients])
        key = (tuple(thetas), len(coefficients), stacked.dtype, stacked.device)
        powers = self.powers.get(key)
        if powers is None:
            real = stacked.real.dtype if stacked.is_complex() else stacked.dtype
            powers = torch.tensor([[theta ** m for m in range(len(coefficients))] for theta in thetas], dtype=real,
                                  device=stacked.device).to(stacked.dtype)
            self.powers[key] = powers
        return torch.tensordot(powers, stacked, dims=1)

    def check(self, step: _AcceptedStep) -> bool:
        """Record every occurrence inside ``step`` in time order; True if a terminal one fired."""
        self.reached = step.tau1
        if not self.events:
            return False
        direction, field = step.direction, self.field
        occurrences = []
        for k, event in enumerate(self.events):
            # The sign at the step's end and at `samples` points between (two crossings within a step, out and
            # back, leave the ends with one sign).
            thetas = [j / (event.samples + 1) for j in range(1, event.samples + 1)]
            thetas, values, crossed, finite = self._signs(event, step, thetas, self.values[k])
            bounds = [0.0] + thetas + [1.0]
            if not finite:
                j = next(j for j, v in enumerate(values) if not bool(torch.isfinite(v).all()))
                raise _non_finite_event(event, direction * (step.tau + bounds[j] * step.h), values[j])
            for j in (j for j, c in enumerate(crossed) if c):
                theta = _locate_event(event, field, step.tau, step.h, direction, step.coefficients(), values[j],
                                      bounds[j], bounds[j + 1])
                occurrences.append((theta, k, values[j]))
            self.values[k] = values[-1]
        stop_at, seen = None, []
        for theta, k, value0 in sorted(occurrences, key=lambda o: (o[0], o[1])):
            if stop_at is not None and theta != stop_at:
                break   # (occurrences at the terminal one's very time are recorded with it: they are not after it)
            t_event = direction * (step.tau + theta * step.h)
            y_event = step.y1 if theta == 1.0 else horner(step.coefficients(), theta)
            value = _event_value(self.events[k], field, t_event, y_event)
            rising = bool(((value0 < 0) & (value >= 0)).any())
            self.result.event_records.append((t_event, y_event.detach(), k, 1 if rising else -1))
            self.counts[k] += 1
            seen.append((theta, k, torch.sign(value0)))
            if stop_at is None and self.events[k].terminal is not None and self.counts[k] >= self.events[k].terminal:
                stop_at = theta
                result = self.result
                self.reached = step.tau + theta * step.h
                result.event_t, result.event_y, result.event_index = t_event, y_event, k
                result.event_signs = torch.sign(value0)
                result.final_t, result.final_y = t_event, y_event
                result.status, result.message = Status.EVENT, "A terminal event occurred."
        if stop_at is not None:
            # every event that occurred at the terminal one's time, the terminal one first
            here = [(k, signs) for theta, k, signs in seen if theta == stop_at]
            self.result.simultaneous = sorted(here, key=lambda entry: entry[0] != self.result.event_index)
        return stop_at is not None


def _collapse_error(stepping, proposal, stepper, problem, t, y) -> Exception:
    """Why the step collapsed to nothing: a blow-up, non-finite values, a Newton failure, or stiffness."""
    h = proposal.h
    magnitude = float(y.detach().abs().max()) if y.numel() else 0.0
    # A step that collapses while |y| has grown by orders of magnitude is a finite-time blow-up: the solution
    # diverges to infinity, which we report as such (not as a step-size problem); at moderate magnitudes the
    # collapse points to stiffness instead.
    initial_magnitude = float(problem.y0.detach().abs().max()) if y.numel() else 0.0
    diverging = magnitude > _DIVERGENCE_GROWTH * max(1.0, initial_magnitude)
    non_finite = stepping.non_finite
    if stepping.newton_failure is not None and not diverging:
        return ConvergenceError(_newton_message(t, h, stepping.newton_failure), t=t)
    message = _underflow_message(t, h, non_finite, magnitude, diverging)
    if non_finite or diverging:
        return NonFiniteError(message, t=t)
    return StepSizeUnderflowError(message + _stiffness_hint(stepper, problem.field, t, y, proposal.unclipped), t=t)


def _budget_error(stepping, stepper, field, t, y, until_event: bool, error_norm=None, landings: int = 0) -> Exception:
    max_num_steps = stepping.controller.max_num_steps
    if until_event:
        # In event mode the span has no end: running out of steps nearly always means the event function never
        # changes sign, so say that first; a stiffness hint would send the user after the wrong cause.
        kind = "fixed steps" if isinstance(stepping, FixedStepping) else "steps"
        return MaxStepsError(
            f"the event did not occur within max_num_steps={max_num_steps} {kind} (t={t}): event_fn kept the "
            "sign it had at the start; check event_fn, or raise the cap with options={'max_num_steps': N}", t=t)
    landing_hint = ""
    if landings:
        landing_hint = (f". The steps end on each of the {landings} output times (land_on_outputs, the default of "
                        "the implicit, Rosenbrock, auto and reversible methods): give max_num_steps above that, or "
                        "options={'land_on_outputs': False} to interpolate between fewer steps")
    return MaxStepsError(_max_steps_message(max_num_steps, t) + landing_hint + _resolution_hint(error_norm, y)
                         + _zero_atol_hint(error_norm, y) + _stiffness_hint(stepper, field, t, y, stepping.h), t=t)


def _zero_atol_hint(error_norm, y) -> str:
    """Why the steps ran out, when atol = 0 asks for pure relative accuracy of a component at (or near) 0."""
    if error_norm is None or not error_norm.scale_can_vanish or y.numel() == 0:
        return ""
    smallest = float(y.detach().abs().min())
    return (f". Note: atol=0 asks every component for relative accuracy, and |y| is down to {smallest:.3g} here: a "
            "component that starts at or passes through 0 (a system starting from rest) can need steps without "
            "end, as a low-order start cannot meet a relative test at 0; give a small positive atol")


def _resolution_hint(error_norm, y) -> str:
    """Why the steps ran out, when rtol asks for more digits than the state's dtype holds."""
    if error_norm is None:
        return ""
    rtol = error_norm.rtol
    smallest = float(rtol.min()) if isinstance(rtol, torch.Tensor) else float(rtol)
    dtype = y.real.dtype if y.is_complex() else y.dtype
    eps = torch.finfo(dtype).eps
    if smallest >= eps:
        return ""
    return (f". Note: rtol={smallest:.3g} is below the resolution of {str(dtype).replace('torch.', '')} "
            f"(eps {eps:.3g}), where rounding alone can fail the error test: loosen rtol, or solve in float64")


def raise_or_record(result: Integration, error: Exception, throw: bool) -> None:
    if throw:
        raise error
    result.status, result.message, result.error = error.status, str(error), error


def _check_finite_outputs(result, problem, throw, fixed: bool = True):
    """Every output finite, read once at the end (one host read per solve): a solve succeeds only then."""
    if not result.outputs:
        return
    if sum(o.numel() for o in result.outputs) <= 1 << 20 and bool(torch.isfinite(torch.stack(result.outputs)).all()):
        return   # (small states: one stacked check, 25 us for 10 outputs against 174 us one output at a time)
    finite = torch.stack([torch.isfinite(o).all() for o in result.outputs]).cpu().tolist()
    if all(finite):
        return
    first = finite.index(False)
    t_bad = result.output_times[first]
    if fixed:
        error = NonFiniteError(f"the solution became NaN or infinite by t={t_bad} (first non-finite output); the "
                               "vector field blew up or the fixed step is too large for this problem: reduce "
                               "step_size or use an adaptive method", t=t_bad)
    else:
        error = NonFiniteError(f"the output at t={t_bad} is NaN or infinite although the steps' ends are finite: "
                               "the interpolant between them read the vector field where it is not finite (its extra "
                               "stages, or f at the step's end). Tighten rtol/atol, or end the steps on the output "
                               "times (options={'step_t': t})", t=t_bad)
    raise_or_record(result, error, throw)
    # With throw=False the solution ends where it was last finite, as an adaptive solve's does; so does its
    # dense output, at the start of its first step with a non-finite polynomial.
    del result.outputs[first:], result.output_times[first:]
    result.final_t, result.final_y = result.output_times[-1], result.outputs[-1]
    dense = result.dense
    if dense is not None and dense.coefficients:
        steps_finite = torch.stack([torch.stack([torch.isfinite(c).all() for c in step]).all()
                                    for step in dense.coefficients]).cpu().tolist()
        if not all(steps_finite):
            count = steps_finite.index(False)
            dense.truncate(count)
            del result.accepted_times[count:]


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

    evaluate.quadrature_from = getattr(field, "quadrature_from", None)   # (see ImplicitRungeKutta._unknowns)
    # (an IMEX method evaluates a SplitField's terms apart: each at the same one-sided limits)
    evaluate.term = lambda name: (None if getattr(field, "term", None) is None or field.term(name) is None
                                  else _perturbed(field.term(name), t0, t1, left, right))
    return evaluate


def _non_finite_event(event: EventSpec, t: float, value: torch.Tensor) -> ValueError:
    bad = value.flatten()[~torch.isfinite(value.flatten())][0].item()
    return ValueError(f"the event function returned {bad} at t={t}; it must be finite along the solution, or "
                      "its zero crossings cannot be found")


def _broadcasts_to(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _event_value(event: EventSpec, field, t: float, y: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``event_fn(t, y)``, checked; ``like``: an earlier value, whose shape this one must have (its elements are
    compared one to one)."""
    with torch.no_grad():
        value = event.fn(field.time(t), field.unflatten(y))
    if not isinstance(value, torch.Tensor):
        number = real_number(value)
        if number is None:
            raise TypeError(f"event_fn must return a tensor (or a number) whose zero crossings are the events, got "
                            f"{type(value).__name__}; e.g. event_fn=lambda t, y: y[..., 0] - 1.0")
        value = torch.as_tensor(number)
    # dtype and size are known without reading the device
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"event_fn must return real values (their sign changes are the events), or booleans from the "
                        f"start of the solve (a condition: the events are its turns to True), got dtype {value.dtype} "
                        f"at t={float(t)!r}; for a complex state return e.g. y[..., 0].real")
    if value.numel() == 0:
        raise ValueError(f"event_fn returned no values (shape {tuple(value.shape)}), so no event could ever occur; "
                         "return at least one value whose zero crossing is the event")
    if like is not None and value.shape != like.shape:
        # Each element's sign is compared with its own earlier sign (a reshape failed inside torch). One value, or
        # values that broadcast to the earlier shape, stand for every element, as torchdiffeq's min(c * signs)
        # broadcasts them: its learn_physics example returns zeros_like(t), shape (), after a time limit, where
        # its event value before was (1,).
        if value.numel() == 1:
            value = value.reshape(()).expand(like.shape)
        elif _broadcasts_to(value.shape, like.shape):
            value = value.expand(like.shape)
        else:
            raise ValueError(f"event_fn returned shape {tuple(value.shape)} at t={float(t)!r} but "
                             f"{tuple(like.shape)} before; it must return the same number of values at every time "
                             "(or one value, or values that broadcast to that shape)")
    return value.detach()


def _locate_event(event, field, tau0, h, direction, coefficients, value0, lo: float = 0.0, hi: float = 1.0) -> float:
    """Bisection on the step's dense output for the first theta in (lo, hi] where any element crosses (``value0``
    the event function's value at ``lo``).

    Runs until the bracket cannot shrink in floating point (at most ~60 evaluations of the event
    function, which is cheap next to the solve), or until it is at most ``event.tol`` long in time;
    returns the right end of the final bracket, so the event state is on the far side of the crossing,
    like a step that lands just past it.
    """
    width = None if event.tol is None else event.tol / abs(h)   # the root tolerance as a fraction of the step
    with torch.no_grad():
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi) or (tau0 + mid * h) in (tau0 + lo * h, tau0 + hi * h):
                break
            if width is not None and hi - lo <= width:
                break
            value = _event_value(event, field, direction * (tau0 + mid * h), horner(coefficients, mid), like=value0)
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
            f"variable (largest |y| there: {magnitude:.3g}). The solution may blow up here (a singularity), "
            "the vector field may jump here (give the time in options={'jump_t': [...]}), or the problem is stiff; "
            "loosen rtol/atol, set min_step, or check the vector field")


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
    if stepper.stall_hint:
        return ". " + stepper.stall_hint
    try:
        rho = spectral_radius(field.evaluate, t, y)
    except (RuntimeError, TypeError, ValueError):   # a field forward-mode AD and differences cannot probe
        return ""
    if abs(h) * rho <= 1.0:
        return ""
    return (f". The problem looks stiff here: the step {abs(h):.3g} times the dominant eigenvalue |lambda| ~ "
            f"{rho:.3g} of df/dy is {abs(h) * rho:.2g}, at the stability limit of an explicit method; try "
            "method='kvaerno5', 'radau5' or 'auto'")


def min_step_failed_message(t: float, min_step: float, sample: int | None = None) -> str:
    who = "a step" if sample is None else f"a step of sample {sample}"
    return (f"{who} at min_step={min_step:.3g} missed the tolerance at t={t} (force_min_step=False: such a step fails "
            "rather than being accepted); lower min_step, loosen rtol/atol, or set force_min_step=True to accept "
            "steps at min_step whatever their error")


def pinned_non_finite_message(t: float, min_step: float, sample: int | None = None) -> str:
    who = "the step" if sample is None else f"the step of sample {sample}"
    return (f"{who} at min_step={min_step:.3g} gave NaN or infinite values at t={t}, and a step held at min_step "
            "cannot shrink: lower min_step (or remove it), or check the vector field there")


def _max_steps_message(max_num_steps, t: float) -> str:
    return (f"reached the maximum number of steps (max_num_steps={max_num_steps}) at t={t}; raise it with "
            "options={'max_num_steps': N}, loosen rtol/atol, or check whether the problem is stiff")


__all__ = ["integrate", "EventSpec", "Integration"]
