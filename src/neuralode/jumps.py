"""Solves whose state jumps: events with an ``affect`` (SciML's ``ContinuousCallback`` with an ``affect!``).

The solve runs in stretches. Each is a whole solve (its own first step, the caller's gradient strategy) that stops
at the next occurrence of an event with an affect; the state then jumps to ``affect(t_e, y_e)`` and the next stretch
starts there, at the event time, with the output times still to come. The stretches are linked by the event time
(its implicit-function gradient, :func:`neuralode.events.reroute_event_gradient`) and by the start time and state of
the next solve (whose start time carries ``dL/dt0 = -<dL/dy0, f>``), so every gradient strategy differentiates
through the jumps, including their dependence on the event time.

At a restart, an event function element that occurred at the jump and that the affect left where it was (a ball's
height at a bounce) starts with the sign it takes just after the jump, along the new trajectory: leaving its root is
then no second occurrence, and a return through it within the first step (a short hop) is still one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.utils._pytree as pytree

from ._errors import MaxStepsError, NonFiniteError, Status, StepSizeUnderflowError
from .events import BooleanCondition
from .interpolation import PiecewiseDense
from .problem import below_time_resolution, takes_arguments


def solve_with_jumps(solve_stretch, func, y0, t, events, *, adaptive: bool, options: dict, controller, dense: bool,
                     throw: bool):
    """Solve over ``t`` with ``events`` of which some have an ``affect``.

    ``solve_stretch(y0, times, events, start_values, options, controller)`` solves one stretch and returns its
    :class:`~neuralode.solution.Solution` (with ``_simultaneous``: the events that occurred at its terminal event's
    time, ``(index, signs before)``). Returns the whole solve's Solution: outputs at every time of ``t`` reached
    (an output time equal to a jump's gets the state after it), every event record, summed statistics, and
    piecewise dense output.
    """
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.numel() < 2:
        raise ValueError("with events that have an affect, t must be a 1-D tensor of at least two times (the "
                         "solve runs from t[0] to t[-1], jumping at each occurrence)")
    direction = 1 if float(t[-1].detach()) > float(t[0].detach()) else -1
    if not adaptive:
        # A restart takes the state from the interpolant: the linear one's O(h^2) error would become the state's.
        options = {"interp": "cubic", **options}
    budget = controller.max_num_steps if controller is not None else options.get("max_num_steps", 100_000)
    counts = [0] * len(events)
    stretches, records, outputs, output_times = [], [], [], []
    t_start, y_start, start_values = t[:1], y0, None
    first_time, pending = t[:1], t[1:]   # an output time at the stretch's start (or none), the output times after it
    failure, last_fired = None, None
    while True:
        stretch_events = tuple(dataclasses.replace(e, terminal=1 if e.affect is not None else
                                                   (e.stop_after - counts[k] if e.stop_after else False))
                               for k, e in enumerate(events))
        left = max(budget - sum(s.stats["n_steps"] for s in stretches), 1)
        stretch_options = options if controller is not None else {**options, "max_num_steps": left}
        stretch_controller = None if controller is None else dataclasses.replace(controller, max_num_steps=left)
        times = torch.cat([t_start.reshape(1).to(t.dtype), pending])
        try:
            solution = solve_stretch(y_start, times, stretch_events, start_values, stretch_options,
                                     stretch_controller)
        except MaxStepsError as error:
            raise MaxStepsError(_budget_message(error, budget, len(stretches) + 1), t=error.t) from None
        if solution.status == Status.MAX_STEPS and stretches:
            solution = dataclasses.replace(solution, message=_budget_message(solution, budget, len(stretches) + 1))
        stretches.append(solution)
        for record in solution.events:
            counts[record.index] += 1
            records.append(record)
        group = solution._simultaneous if solution.status == Status.EVENT else []
        jumping = [k for k, _ in group if events[k].affect is not None]
        stops = any(events[k].stop_after is not None and counts[k] >= events[k].stop_after for k, _ in group)
        # Outputs of this stretch: those before its jump (an output time equal to the jump's gets the state after it).
        reached = solution.ts.shape[0] - 1   # output times reached after the stretch's start
        if jumping and not stops:
            reached = int(((pending[:reached].detach() - solution.event_t.detach()) * direction < 0).sum())
        outputs.append(pytree.tree_map(lambda ys: ys[1 - first_time.numel():1 + reached], solution.ys))
        output_times.append(torch.cat([first_time, pending[:reached]]))
        if not jumping or stops:
            break
        event_t = solution.event_t
        start, end = float(t_start.detach()), float(event_t.detach())
        crossed = _crossed_elements(events, group, event_t, solution.event_y)
        fired = tuple((k, tuple(mask.reshape(-1).tolist())) for k, (_, mask) in crossed.items())
        # A Zeno point: the same elements fire again within the time's resolution (different elements that fire a
        # rounding apart, two neurons with nearly equal drives, are two events, not an accumulation).
        repeated = fired == last_fired
        last_fired = fired
        if len(stretches) > 1 and repeated and below_time_resolution(abs(start), abs(end - start)):
            failure = StepSizeUnderflowError(
                f"the events with an affect accumulate at t={end}: {len(stretches) - 1} jumps, the last two closer "
                "than the time's resolution (a Zeno point, as a ball that bounces forever before coming to rest). Stop "
                "the solve there with a terminal event, or change the affect", t=end)
            break
        try:
            y_start = y_jumped = _apply_affects([(events[k], crossed[k][1]) for k in sorted(jumping)], event_t,
                                                solution.event_y)
        except NonFiniteError as error:
            failure = error
            break
        start_values = _start_values(events, group, crossed, func, event_t, y_jumped, direction)
        pending = pending[reached:]
        at_jump = bool(pending.numel()) and bool(pending[0].detach() == event_t.detach())
        first_time, pending = (pending[:1], pending[1:]) if at_jump else (pending[:0], pending)
        t_start = event_t
    if failure is not None:
        if throw:
            raise failure
        solution = dataclasses.replace(solution, status=_status_of(failure), message=str(failure), event_t=None,
                                       event_y=None)
    if len(stretches) == 1 and failure is None:   # (no jump: the plain solve's result as it is)
        return solution
    return dataclasses.replace(solution, ts=torch.cat(output_times),
                               ys=pytree.tree_map(lambda *parts: torch.cat(parts), *outputs),
                               stats=StretchStats(s.stats for s in stretches), events=records,
                               _dense=PiecewiseDense([s._dense for s in stretches]) if dense else None)


def _status_of(error) -> Status:
    return Status.NON_FINITE if isinstance(error, NonFiniteError) else Status.STEP_SIZE_UNDERFLOW


def _budget_message(failure, budget: int, n_stretches: int) -> str:
    """A stretch's step-budget failure, restated for the whole solve (the stretch had only what was left)."""
    t = getattr(failure, "t", None)
    where = f" at t={t}" if t is not None else ""
    return (f"reached the maximum number of steps (max_num_steps={budget}, counted over all {n_stretches} stretches "
            f"between the jumps){where}; raise it with options={{'max_num_steps': N}}, loosen rtol/atol, or check "
            "whether the jumps accumulate")


def _state_time(event_t, y):
    """The event time as the event functions and affects receive it: in the state's real dtype, as the loop
    passes every time to them (a float32 state sees float32 times)."""
    leaf = pytree.tree_leaves(y)[0]
    real = leaf.real.dtype if leaf.is_complex() else leaf.dtype
    return event_t.to(real)


def _apply_affects(affecting, event_t, event_y):
    """The state after the affects of ``affecting`` (``(event, fired)`` for the events that occurred at ``event_t``,
    in the order given, ``fired`` the mask of its function's elements that fired), each applied to the state the one
    before left; checked against the state's structure, shapes and dtype."""
    state = event_y
    for event, fired in affecting:
        state = _apply_affect(event, _state_time(event_t, state), state, float(event_t.detach()), fired)
    return state


def _apply_affect(event, t, state, t_float, fired):
    name = f" {event.name!r}" if event.name else ""
    # A copy: an affect that changes y in place (SciML's affect!) must not write into the solve's own tensors, which
    # the backward pass still needs; one that returns None has made its changes in place.
    given = pytree.tree_map(lambda x: x.clone(), state)
    # affect(t, y, fired) where it takes a third argument (SciML's affect!(integrator, idx)), else affect(t, y)
    new = event.affect(t, given, fired) if takes_arguments(event.affect, 3) else event.affect(t, given)
    new = given if new is None else new
    old_leaves, spec = pytree.tree_flatten(state)
    try:
        new_leaves = spec.flatten_up_to(new)
    except (ValueError, TypeError):
        new_leaves = None
    if new_leaves is None or not all(isinstance(x, torch.Tensor) for x in new_leaves):
        raise TypeError(f"the affect of event{name} returned {type(new).__name__}; it must return the new state in "
                        "the state's structure (a tensor for a tensor state), e.g. affect=lambda t, y: y * scale, or "
                        "change y in place and return None")
    for old, value in zip(old_leaves, new_leaves):
        if value.shape != old.shape or value.dtype != old.dtype:
            raise ValueError(f"the affect of event{name} returned a tensor of shape {tuple(value.shape)} and dtype "
                             f"{value.dtype} where the state has {tuple(old.shape)} and {old.dtype}; return a new "
                             "state of the state's shapes and dtype")
    if not all(bool(torch.isfinite(x.detach()).all()) for x in new_leaves):
        raise NonFiniteError(f"the affect of event{name} returned NaN or infinite values at t={t_float}; the state "
                             "after a jump must be finite", t=t_float)
    return pytree.tree_unflatten(list(new_leaves), spec)


def _crossed_elements(events, group, event_t, event_y) -> dict:
    """For each event that occurred at the jump, ``(its function's value there, the elements that crossed)``: those
    at zero, or of another sign than just before the firing step."""
    t = _state_time(event_t.detach(), event_y)
    y = pytree.tree_map(torch.detach, event_y)
    crossed = {}
    for k, signs_before in group:
        with torch.no_grad():
            value = torch.as_tensor(events[k].fn(t, y))
        mask = value == 0
        if signs_before is not None and signs_before.shape == value.shape:
            mask = mask | (torch.sign(value) != signs_before)
        crossed[k] = (value, mask)
    return crossed


def _start_values(events, group, crossed, func, event_t, after_jump, direction) -> list:
    """The next stretch's start value of each event function that occurred at the jump (``None`` for the others:
    evaluated afresh). An element that crossed there and that the jump left where it was, or put at exactly zero,
    starts with the sign it takes just after the jump: the sign of ``d g / dt`` along the new trajectory, or where
    that is 0 (a ball left at rest on the ground) the sign it had before it crossed. Leaving its root is then no new
    occurrence (a root located a rounding beyond zero would otherwise fire again at once), and a return through it
    within the first step, a short hop or a fall from rest, is one."""
    values = [None] * len(events)
    t = _state_time(event_t.detach(), after_jump)
    y_after = pytree.tree_map(torch.detach, after_jump)
    for k, signs_before in group:
        fn = events[k].fn
        if isinstance(fn, BooleanCondition):
            continue   # (a condition that still holds after the jump starts True: it occurs again when it turns True)
        before, crossed_here = crossed[k]   # (the value before the jump, evaluated once by _crossed_elements)
        with torch.no_grad():
            after = torch.as_tensor(fn(t, y_after))
        if after.shape != before.shape:
            continue
        at_root = crossed_here & ((after == before) | (after == 0))
        if not bool(at_root.any()):
            continue
        leaving = torch.sign(direction * _slope_along(fn, func, t, y_after, after)).to(after.dtype)
        if signs_before is not None and signs_before.shape == after.shape:
            leaving = torch.where(leaving == 0, signs_before.to(after.dtype), leaving)
        values[k] = torch.where(at_root, leaving, after)
    return values


def _slope_along(fn, func, t, y, value) -> torch.Tensor:
    """``d fn(t, y(t)) / dt`` at the start of the trajectory from ``y`` (``y' = func(t, y)``): by forward-mode AD,
    or, where ``fn`` does not support it, by a difference quotient (only its sign is used)."""
    with torch.no_grad():
        velocity = func(t, y)
    try:
        _, slope = torch.func.jvp(lambda s, x: torch.as_tensor(fn(s, x)), (t, y), (torch.ones_like(t), velocity))
        return slope.detach().reshape(value.shape)
    except Exception:  # noqa: BLE001 - an event function torch.func cannot run: difference quotient instead
        scale = max(1.0, abs(float(t)))
        dt = math.sqrt(torch.finfo(t.dtype).eps) * scale
        with torch.no_grad():
            moved = pytree.tree_map(lambda x, v: x + dt * v, y, velocity)
            return (torch.as_tensor(fn(t + dt, moved)) - value) / dt


class StretchStats(dict):
    """The statistics of a solve made of stretches: each count summed over them, read when asked, since the
    backward pass adds ``nfe_backward`` to each stretch's own dict after the solve. (The dict's own storage holds
    the forward sums, for code that reads it directly, as ``json`` does.)"""

    def __init__(self, parts):
        self._parts = list(parts)
        super().__init__(self._merged())

    def _merged(self) -> dict:
        merged = {}
        for part in self._parts:
            for key, value in part.items():
                merged[key] = merged[key] + value if key in merged else value
        return merged

    def __getitem__(self, key):
        return self._merged()[key]

    def get(self, key, default=None):
        return self._merged().get(key, default)

    def __contains__(self, key):
        return key in self._merged()

    def __iter__(self):
        return iter(self._merged())

    def __len__(self):
        return len(self._merged())

    def keys(self):
        return self._merged().keys()

    def items(self):
        return self._merged().items()

    def values(self):
        return self._merged().values()

    def __eq__(self, other):
        return self._merged() == other

    __hash__ = None

    def __repr__(self):
        return repr(self._merged())
