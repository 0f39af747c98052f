"""``solve``: the public boundary of the numerics (names and options become objects here), returning a
:class:`Solution`. torchdiffeq's ``odeint`` family is in :mod:`neuralode.compat`."""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings

import torch
import torch.utils._pytree as pytree

from ._errors import Status
from .callbacks import Callbacks, warn_unsupported
from .controllers import AdaptiveController, FixedGrid
from .gradients import Adjoint, Checkpoint, Direct, GradientStrategy, ImplicitAdjoint, resolve_gradient
from .gradients.implicit import time_without_gradient
from .gradients.per_sample_adjoint import PerSampleAdjointFunction, PerSampleAdjointRun
from .gradients.per_sample_checkpoint import PerSampleCheckpointRun
from .events import BooleanCondition, Event, EventRecord, reroute_event_gradient, with_real_conditions
from .integrate import EventSpec
from .options import (CONTROLLER_OPTIONS, FIXED_DEFAULT_INTERP, backward_settings, check_fixed_step_given,
                      check_method, check_options,
                      check_tolerances_usable, make_control, time_list)
from .jumps import solve_with_jumps
from .problem import FieldWithArgs, check_other_tolerance, make_problem, warn_time_rounding
from .solution import Solution
from .per_sample import _first_evaluation as _per_sample_first_evaluation
from .per_sample import (PerSampleTree, check_per_sample_times, integrate_per_sample, make_per_sample_field,
                         per_sample_first_steps)
from .solvers.compiled import _under_transform, compiled_stepper
from .solvers.runge_kutta import ExplicitRungeKutta


def solve(func, y0, t, *, method: str = "tsit5", rtol=1e-7, atol=1e-9, options: dict | None = None,
          gradient: str | GradientStrategy = "direct", adjoint_params=None, event_fn=None,
          event_direction: int = 0, events=(), dense: bool = False, throw: bool = True,
          compile: bool = False, per_sample: bool = False, controller: AdaptiveController | None = None,
          args=None) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0``, and report values at every time in ``t``.

    Parameters
    ----------
    func : callable
        ``func(t, y) -> dy/dt``; ``t`` is a 0-dim tensor (the state's real dtype), ``y`` has the shape of
        ``y0`` (its structure for tuple and PyTree states). An ``nn.Module`` or any function. With ``args``,
        ``func(t, y, args)``.
    y0 : Tensor of any shape, tuple of Tensors, or a PyTree of Tensors (dicts, nested tuples and lists)
        Floating point or complex initial state; the tensors of a tuple or PyTree share one dtype.
    t : Tensor, shape (T,)
        Output times, strictly increasing or strictly decreasing; ``t[0]`` is the initial time.
        Output times never change the steps of the explicit methods; the implicit, Rosenbrock and ``auto``
        methods end their steps on them (option ``land_on_outputs``) or check their interpolant there.
    method : str, ButcherTableau or Solver
        One of :data:`neuralode.METHODS`, or a method as an object: a
        :class:`~neuralode.tableaus.ButcherTableau` of your own (run by the one explicit Runge-Kutta stepper;
        its order conditions are checked when it is built) or a :class:`~neuralode.solvers.Solver` instance.
        Fixed-step methods need ``options={"step_size": h}`` or a ``grid_constructor``.
    rtol, atol : float or Tensor
        Relative and absolute tolerance; tensors broadcast to the state (per-element tolerances), or one
        per tensor of a tuple or PyTree state, in its structure.
    options : dict
        Method options, with torchdiffeq's names: fixed grid ``step_size``, ``grid_constructor``,
        ``perturb``, ``interp``; adaptive ``first_step``, ``max_num_steps`` (default 100000),
        ``min_step``, ``max_step``, ``safety``, ``ifactor``, ``dfactor``, ``step_t``, ``jump_t``,
        ``norm``, ``dtype``, and ``controller`` (``"integral"``, the default of explicit methods, ``"pi"``,
        ``"pid"`` with ``pcoeff``, ``icoeff``, ``dcoeff``, or ``"predictive"``, the default of the implicit and
        Rosenbrock methods), ``land_on_outputs`` (end steps on the output times instead of interpolating: the
        default of the implicit, Rosenbrock and ``auto`` methods, whose dense output between long stiff steps
        can be far less accurate than the steps; ``False`` interpolates, with fewer steps), ``dense_error_control``
        (default ``True``: where a stiff method's interpolant is read, by events, ``dense=True`` or outputs between
        the steps, a step is accepted only if its interpolant meets the tolerance too); Adams
        ``max_order``, ``max_iters``. An option the method does not use is an error.
    gradient : {"direct", "adjoint", "checkpoint"} or a strategy object
        How ``backward()`` differentiates the solve (see :mod:`neuralode.gradients`).
    adjoint_params : iterable of Tensors, optional
        Parameters to differentiate for the adjoint and checkpoint strategies. Defaults to the
        parameters of ``func`` when it is an ``nn.Module``.
    event_fn : callable, optional
        ``event_fn(t, y) -> Tensor``; the solve stops at the first zero crossing of any element.
    event_direction : {0, 1, -1}
        Only crossings upwards (1), downwards (-1) or both (0).
    events : sequence of :class:`~neuralode.Event`
        Several events in one solve, terminal or not (``Event(fn, direction, terminal, name)``); every
        occurrence is recorded in ``Solution.events``. Not together with ``event_fn``.
    dense : bool
        Record the dense output for :meth:`Solution.evaluate`.
    throw : bool
        Raise on numerical failure (default). With ``False`` a failed solve returns a Solution whose
        ``status``/``message`` say what happened and whose ``ts``/``ys`` stop where it stopped.
    compile : bool
        Run each step of an explicit Runge-Kutta or Rosenbrock method as one ``torch.compile``d function
        (field, stage sums and error norm together; :mod:`neuralode.solvers.compiled`); a plain adaptive
        solve on the CPU without a graph to record (inference, the adjoint's forward solve) runs its whole
        loop, accept/reject and outputs included, as one compiled call. The first solve with a field
        compiles (seconds); later solves with the same field reuse it. Results equal the eager ones to a
        few ulps; a field that cannot be compiled is solved eagerly with one warning.
    controller : AdaptiveController, optional
        Step-size control as an object, validated when built: :class:`~neuralode.IntegralController`,
        :class:`~neuralode.PIController`, :class:`~neuralode.PIDController` or
        :class:`~neuralode.PredictiveController` (``safety``, ``ifactor``,
        ``dfactor``, ``min_step``, ``max_step``, ``first_step``, ``max_num_steps``, PID coefficients). The same
        settings as the options of those names, which must then not be given; the adjoint's backward solve
        uses it too unless the adjoint has options of its own.
    per_sample : bool
        Step every batch element on its own (torchode's per-sample stepping; :mod:`neuralode.per_sample`):
        ``y0`` has shape ``(batch, ...)``, each sample keeps its own step size and accept/reject decisions,
        ``t`` may have shape ``(batch, n)`` (output times per sample), and ``func(t, y)`` receives ``t`` of
        shape ``(batch,)``. ``ys`` has shape ``(n, batch, ...)``; ``stats`` holds per-sample counts
        (tensors of shape ``(batch,)``). A sample's result does not depend on the rest of its batch when
        ``func`` treats rows independently. Explicit Runge-Kutta methods; every gradient strategy:
        ``"direct"``, ``"adjoint"`` (per-sample backward solves, :mod:`neuralode.gradients.per_sample_adjoint`)
        and ``"checkpoint"`` (:mod:`neuralode.gradients.per_sample_checkpoint`). With ``compile=True`` each
        batched step runs compiled (the adjoint's backward steps stay eager).
    args : any, optional
        Passed to the field as ``func(t, y, args)`` (diffrax's ``args``, torchode's ``with_args``): constants or
        parameters kept out of a closure. Tensors in it that require grad are differentiated by every strategy
        (added to the default ``adjoint_params``).

    Returns
    -------
    Solution
    """
    _refuse_vmap(y0)
    spec = check_method(method)
    options = check_options(spec, options)
    strategy = resolve_gradient(gradient, adjoint_params=adjoint_params, func=func)
    if args is not None:
        strategy = _differentiate_args(strategy, args, adjoint_params)
        func = FieldWithArgs(func, args)
    _refuse_transform(strategy)
    if event_direction not in (0, 1, -1):
        raise ValueError(f"event_direction must be 0, 1 or -1, got {event_direction!r}")
    if event_fn is not None and not callable(event_fn):
        raise TypeError("event_fn must be callable as event_fn(t, y)")
    if isinstance(events, Event) or not isinstance(events, (list, tuple)):
        raise TypeError(f"events must be a list of neuralode.Event, got {type(events).__name__}; wrap one event "
                        "in a list: events=[Event(fn)]")
    for i, event in enumerate(events):
        if not isinstance(event, Event):
            raise TypeError(f"events[{i}] must be a neuralode.Event(fn, direction=0, terminal=False), "
                            f"got {type(event).__name__}")
    if events and event_fn is not None:
        raise ValueError("give either event_fn (one terminal event, torchdiffeq's form) or events=[Event(...)], "
                         "not both; Event(event_fn, terminal=True) is the same as event_fn")
    if events and _checkable(t, y0):
        events = with_real_conditions(events, t.reshape(-1)[0], y0)   # (boolean conditions: events.BooleanCondition)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {type(compile).__name__}")
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be True or False, got {type(per_sample).__name__}")
    if controller is not None:
        if not isinstance(controller, AdaptiveController):
            raise TypeError(f"controller must be an IntegralController, PIController, PIDController or "
                            f"PredictiveController, got "
                            f"{type(controller).__name__}")
        if not spec.adaptive:
            raise ValueError(f"method {spec.name!r} takes fixed steps: a step-size controller does not apply")
        clashing = set(options) & CONTROLLER_OPTIONS
        first = options.get("first_step")
        if per_sample and isinstance(first, torch.Tensor) and first.numel() > 1:
            clashing.discard("first_step")   # (one per sample: a controller object holds one number)
        clashing = sorted(clashing)
        if clashing:
            raise ValueError(f"option(s) {clashing} configure step-size control, which the controller object does: "
                             "set them on the controller instead, e.g. PIDController(pcoeff=0.4, max_step=0.1)")
    if per_sample:
        unsupported = [name for name, used in (("event_fn", event_fn is not None), ("events", bool(events)),
                                               ("dense=True", dense)) if used]
        if unsupported:
            raise ValueError(f"per_sample=True does not support {', '.join(unsupported)} yet; solve jointly "
                             "(per_sample=False) for these")
        return _solve_per_sample(func, y0, t, spec, rtol, atol, options, strategy, throw, controller, compile)
    if any(event.affect is not None for event in events):
        if isinstance(strategy, ImplicitAdjoint):
            raise ValueError("gradient=neuralode.ImplicitAdjoint() differentiates the steady state one solve ends at; "
                             "events with an affect split the solve at every jump of the state. Use "
                             "gradient='direct', 'adjoint' or 'checkpoint' with affects")
        def solve_stretch(y_start, times, stretch_events, start_values, stretch_options, stretch_controller):
            return _solve(func, y_start, times, spec, rtol, atol, stretch_options, strategy, None, 0, dense, throw,
                          until_event=False, compile=compile, events=stretch_events, controller=stretch_controller,
                          start_values=start_values)
        return solve_with_jumps(solve_stretch, func, y0, t, tuple(events), adaptive=spec.adaptive, options=options,
                                controller=controller, dense=dense, throw=throw)
    return _solve(func, y0, t, spec, rtol, atol, options, strategy, event_fn, event_direction, dense, throw,
                  until_event=False, compile=compile, events=tuple(events), controller=controller)


def _solve(func, y0, t, spec, rtol, atol, options, strategy, event_fn, event_direction, dense, throw, until_event,
           compile=False, events=(), controller=None, grid_is_t=False, start_values=None):
    """The solve behind every entry point. ``grid_is_t``: a fixed-step method without ``step_size`` steps between
    the output times (torchdiffeq's ``odeint`` rule; ``solve`` asks for a step size instead)."""
    # scipy_solver under direct calls the field without a graph: nothing of its result is differentiable (as in
    # torchdiffeq), and a gradient through the output times alone would be a partial, wrong one.
    graphless = spec.whole_span and isinstance(strategy, Direct)
    t_wants_grad = isinstance(t, torch.Tensor) and t.requires_grad
    t_requires_grad = t_wants_grad and not graphless
    precise_state = any(x.dtype in (torch.float64, torch.complex128) for x in _state_tensors(y0))
    for name in ("step_t", "jump_t"):
        options[name] = time_list(options, name, precise_state)
    # With perturb, or a discontinuity at t[0], func must not be called at t[0] itself.
    problem = make_problem(func, y0, t.detach() if t_requires_grad else t, rtol, atol,
                           right_limit_at=options["jump_t"] if options.get("perturb") is not True else None)
    if problem.shapes is not None and options.get("jacobian") == "batched":
        raise ValueError("option 'jacobian': 'batched' needs one tensor state of shape (batch, ...): a tuple or PyTree "
                         "state is flattened into one vector, which has no batch axis (its per-sample blocks would be "
                         "single elements). Use 'dense' or 'krylov', or give the state as one tensor (batch, ...)")
    if not grid_is_t:
        check_fixed_step_given(spec, options)
    if not spec.adaptive:
        options.setdefault("interp", FIXED_DEFAULT_INTERP)
        if options["interp"] not in ("linear", "cubic"):
            raise ValueError(f"option 'interp' must be 'linear' or 'cubic', got {options['interp']!r}")
    stepper = spec.make_stepper(options)
    if options.get("jac") is not None:
        problem.field.jac = options["jac"]
        # checked once, here, against the field's own derivative (also where compile=True inlines it later); an IMEX
        # method's is the implicit term's Jacobian, checked against that term
        checked = problem.field.term("implicit") if getattr(stepper, "needs_terms", False) else None
        (checked or problem.field).user_jacobian(problem.times[0], problem.y0.detach(),
                                                 options.get("jacobian", "dense"))
    if compile:
        stepper = compiled_stepper(stepper, func, spec.name, options)
    if controller is not None:
        check_tolerances_usable(problem)
        control = controller
    else:
        control = make_control(spec, options, problem, func, y0)
    if control.adaptive is False and control.grid is None:
        control = FixedGrid(tuple(problem.direction * x for x in problem.times))
    if event_fn is not None:
        events = with_real_conditions((Event(event_fn, event_direction, terminal=True),), t[0], y0)
    start_values = start_values or [None] * len(events)
    specs = [EventSpec(e.fn, e.direction, e.stop_after, e.tol, e.samples, start)
             for e, start in zip(events, start_values)]
    callbacks = Callbacks.of(func)
    warn_unsupported(callbacks, spec.name, spec.callbacks)
    if graphless and torch.is_grad_enabled() and (_wants_gradient(func, y0) or t_wants_grad):
        warnings.warn("method 'scipy_solver' calls the vector field without a graph, so under gradient='direct' "
                      "its result carries no gradient (as in torchdiffeq); use odeint_adjoint or "
                      "gradient='adjoint' to differentiate it", UserWarning, stacklevel=3)
    if dense and not isinstance(strategy, Direct) and torch.is_grad_enabled() and _wants_gradient(func, y0):
        # ys are differentiated by the strategy; the interpolants are recorded without a graph.
        name = type(strategy).__name__.lower().replace("reversibleadjoint", "reversible")
        warnings.warn(f"with gradient={name!r} the dense output carries no gradient: "
                      "Solution.evaluate returns values detached from y0 and the parameters (ys are differentiable "
                      "as usual); use gradient='direct' to differentiate dense output", UserWarning, stacklevel=3)

    problem = dataclasses.replace(problem, method=spec.name, spec=spec, controller=controller)
    if isinstance(strategy, Adjoint):
        # The backward tolerances are checked here, against the state, as the forward ones are: a tensor that
        # does not broadcast to the state would otherwise fail deep inside backward().
        strategy = dataclasses.replace(strategy, **{
            name: check_other_tolerance(f"adjoint_{name}", getattr(strategy, name), y0, problem)
            for name in ("rtol", "atol") if getattr(strategy, name) is not None})
        problem = dataclasses.replace(problem, backward=backward_settings(strategy, spec, options, controller))
    t_in = problem.t
    y0_given = problem.y0
    if t_requires_grad:
        # dL/dt0 = -<dL/dy0, f(t0, y0)>: the start time enters as a shift of the initial state, so every
        # strategy carries it (see _StartTime).
        # (f0 is re-evaluated from the shifted state, so the first stage is part of that path.)
        problem = dataclasses.replace(problem, y0=_StartTime.apply(t[0], problem.y0, problem.f0.detach()), f0=None)

    run = strategy.run(problem, stepper, control, options=options, events=specs, record_dense=dense,
                       until_event=until_event, throw=throw, callbacks=callbacks)
    outputs, integration = run.outputs, run.integration
    fired = integration.event_t is not None
    event_state = outputs[-1] if fired else None
    if fired:
        outputs = outputs[:-1]
    n_out = outputs.shape[0]
    if t_requires_grad:
        # y(t_0) is y0 itself, whatever t_0 is; later outputs move with their times as dy/dt = f.
        outputs = torch.cat([y0_given.unsqueeze(0), outputs[1:]])
        if n_out > 1:
            outputs = torch.cat([outputs[:1], _OutputTimes.apply(t[1:n_out], outputs[1:], problem.field,
                                                                 tuple(problem.times[1:n_out]))])
    integration.stats["nfe"] = problem.field.nfe
    if graphless:
        outputs = outputs.detach()
    ys = problem.unflatten_trajectory(outputs)
    ts = t_in[:n_out]
    event_t = event_y = None
    if fired:
        event_t = torch.tensor(integration.event_t, dtype=t_in.dtype, device=t_in.device)
        pair = problem.unflatten_trajectory(torch.stack([outputs[0], event_state]))
        fired_event = events[integration.event_index]
        # (a boolean has no derivative; under ImplicitAdjoint the end state is a steady state, whose time is no
        # smooth function of the parameters)
        if not until_event and not isinstance(fired_event.fn, BooleanCondition) and not isinstance(strategy,
                                                                                                ImplicitAdjoint):
            # solve() links the event time to its causes; odeint keeps torchdiffeq's semantics, where
            # only odeint_event does. The element of a vector event function that fired is picked by the
            # signs at the start of the firing step (right for an N-th occurrence too).
            event_t, pair = reroute_event_gradient(func, fired_event.fn, t_in[0], event_t, pair,
                                                   signs=integration.event_signs)
        elif isinstance(strategy, ImplicitAdjoint):
            # (the theorem gives the steady state's gradient; the time it was reached has none: said where a loss
            # differentiates it, not left silently at zero)
            event_t = time_without_gradient(event_t, event_state)
        event_y = pytree.tree_map(lambda part: part[-1], pair)
    return Solution(ts=ts, ys=ys, stats=integration.stats, status=integration.status, message=integration.message,
                    event_t=event_t, event_y=event_y, events=_records(integration, events, problem, t_in),
                    _dense=integration.dense,
                    _unflatten=problem.field.unflatten if problem.shapes is not None else None,
                    _dtype=problem.field.user_dtype if problem.field.cast else None,
                    _simultaneous=integration.simultaneous)


def _checkable(t, y0) -> bool:
    """Whether ``t`` and ``y0`` are tensors an event function can be called with before they are checked (otherwise
    their own checks speak first, and a boolean condition is found where the solve evaluates it)."""
    leaves = pytree.tree_leaves(y0)
    return (isinstance(t, torch.Tensor) and t.numel() >= 1 and bool(leaves)
            and all(isinstance(leaf, torch.Tensor) for leaf in leaves))


def _refuse_vmap(y0) -> None:
    """``torch.func.vmap(lambda y0: solve(f, y0, t))`` (a diffrax user's habit: ``jax.vmap`` over diffeqsolve) fails
    deep inside torch at the first value the loop reads; say why and what to do instead. (A flag read of torch's
    private functorch API, read defensively: a torch without it only loses this message.)"""
    is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    if is_batched is not None and any(is_batched(p) for p in _state_tensors(y0)):
        raise ValueError("y0 is batched by torch.func.vmap, which neuralode.solve does not run under: its adaptive "
                         "loop decides on values (accept or reject, the next step). Give the batch as y0's leading "
                         "dimension instead: one solve for the batch, or per_sample=True for a step size per sample "
                         "(what vmap over diffrax's diffeqsolve gives)")


def _refuse_transform(strategy) -> None:
    """``torch.func.grad`` (or jvp, jacrev, forward-mode AD) around a solve whose gradient is a custom backward pass
    (the adjoint, checkpointing) failed deep inside torch ("must override the setup_context staticmethod"): those
    passes have no rule for the transforms. Say so and name what works."""
    if isinstance(strategy, Direct) or not _under_transform():
        return
    name = ("'adjoint'" if isinstance(strategy, Adjoint) else "'checkpoint'" if isinstance(strategy, Checkpoint)
            else "neuralode.ImplicitAdjoint()" if isinstance(strategy, ImplicitAdjoint) else "'reversible'")
    raise ValueError(f"gradient={name} cannot run under a torch.func transform (grad, jvp, jacrev, hessian, ...) or "
                     "forward-mode AD: its backward pass is a custom autograd Function with no rule for them. Use "
                     "gradient='direct' inside the transform (it backpropagates through the steps), or keep "
                     f"gradient={name} and take the gradient with loss.backward() or torch.autograd.grad")


# Options a per-sample solve understands (the rest shape a joint solve's steps or norm).
_PER_SAMPLE_OPTIONS = {"step_size", "interp", "first_step", "max_num_steps", "min_step", "force_min_step", "max_step",
                       "safety", "ifactor", "dfactor", "controller", "pcoeff", "icoeff", "dcoeff", "dtype"}


def _solve_per_sample(func, y0, t, spec, rtol, atol, options, strategy, throw, controller=None,
                      compile=False) -> Solution:
    """The boundary of per-sample stepping: checks, options to objects, then the per-sample loop."""
    if not isinstance(strategy, (Direct, Adjoint, Checkpoint)):
        raise ValueError(f"per_sample=True supports gradient='direct', 'adjoint' and 'checkpoint', got "
                         f"{type(strategy).__name__}")
    if callable(func) and Callbacks.of(func) is not None:
        raise ValueError("per_sample=True does not call step callbacks (callback_step/accept_step/reject_step); "
                         "remove them or solve jointly")
    stepper = spec.make_stepper(options)
    if not isinstance(stepper, ExplicitRungeKutta):
        raise ValueError(f"per_sample=True needs an explicit Runge-Kutta method (e.g. 'tsit5', 'dopri5', 'rk4'); "
                         f"{spec.name!r} is not one")
    tree = None
    if not isinstance(y0, torch.Tensor) and callable(func):
        # A tuple or PyTree of (batch, ...) tensors: one (batch, n) state for the loop, the structure for func and ys.
        for label, tol in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(tol, numbers.Real) or (isinstance(tol, torch.Tensor) and tol.numel() == 1)):
                raise ValueError(f"per_sample=True with a tuple or PyTree state takes {label} as a number (one for "
                                 f"every element), got {type(tol).__name__}; give a float")
        tree = PerSampleTree(func, y0)
        func, y0 = tree, tree.flatten(y0)
    unknown = sorted(set(options) - _PER_SAMPLE_OPTIONS)
    if unknown:
        raise ValueError(f"option(s) {unknown} are not supported with per_sample=True; it accepts "
                         f"{sorted(_PER_SAMPLE_OPTIONS & spec.options)}")
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    # compile=True: each batched step runs as one compiled function; the per-sample adjoint's backward steps (an
    # augmented field, stepped from a stepper of their own) stay eager.
    eager_stepper = stepper
    if compile:
        stepper = compiled_stepper(stepper, func, spec.name, options)
    field, state, norm = make_per_sample_field(func, y0, rtol, atol)
    times = check_per_sample_times(t, y0)
    options, first_steps = per_sample_first_steps(options, state)
    warn_time_rounding(norm.rtol, t.dtype, field.time_dtype, float(times.abs().max()),
                       float((times[:, -1] - times[:, 0]).abs().min()), stacklevel=4)
    direction = -1 if times.shape[1] > 1 and bool(times[0, 1] < times[0, 0]) else 1
    taus = direction * times
    f0 = _per_sample_first_evaluation(field, state, times[:, 0])
    if spec.adaptive:
        tolerances = _Tolerances(norm.rtol, norm.atol)
        if controller is not None:
            check_tolerances_usable(tolerances)
        control = controller if controller is not None else make_control(spec, options, tolerances, func, y0)
        step_size, linear = None, False
    else:
        step = options.get("step_size")
        if step is None:
            raise ValueError(f"method {spec.name!r} takes fixed steps: give options={{'step_size': h}} (per-sample "
                             "stepping has no grid_constructor)")
        control = None
        step_size = make_control(spec, {"step_size": step}, _Tolerances(norm.rtol, norm.atol, times[0].tolist(),
                                                                        direction), func, y0).step
        interp = options.get("interp", FIXED_DEFAULT_INTERP)
        if interp not in ("linear", "cubic"):
            raise ValueError(f"option 'interp' must be 'linear' or 'cubic', got {interp!r}")
        linear = interp == "linear"
    run = None
    if isinstance(strategy, Checkpoint):
        # Exact discrete gradients in O(sqrt(steps)) memory: the loop records its iterations, backward replays them.
        run = PerSampleCheckpointRun(field, stepper, strategy.params, taus, direction, linear)
        outputs, stats, error = run.forward(state, f0, control, norm, step_size, throw, first_steps)
    else:
        if isinstance(strategy, Adjoint):
            run = _per_sample_adjoint(strategy, func, eager_stepper, control, step_size, taus, direction, norm,
                                      throw)
        with torch.no_grad() if run is not None else contextlib.nullcontext():
            outputs, stats, error = integrate_per_sample(field, stepper, control, state, f0, taus, direction, norm,
                                                         step_size=step_size, linear=linear, throw=throw,
                                                         first_step=first_steps)
    if run is not None:
        run.stats = stats
        outputs = PerSampleAdjointFunction.apply(run, outputs, state, *strategy.params)
    if field.cast:
        outputs = outputs.to(field.user_dtype)
    if tree is not None:
        outputs = tree.unflatten(outputs)
    status, message = Status.SUCCESS, "Every sample reached the end of its interval."
    sample_status = (Status.SUCCESS,) * state.shape[0]
    if error is not None:
        status, message, sample_status = error.status, str(error), error.sample_status
    return Solution(ts=t, ys=outputs, stats=stats, status=status, message=message, sample_status=sample_status)


def _per_sample_adjoint(strategy, func, stepper, control, step_size, taus, direction, norm, throw):
    """The backward settings of the per-sample adjoint: the forward method and control unless the Adjoint
    names its own method and tolerances."""
    refused = [name for name, used in (("options", strategy.options is not None), ("seminorm=False",
               strategy.seminorm is False), ("interpolate", bool(strategy.interpolate))) if used]
    if refused:
        raise ValueError(f"per_sample=True with the adjoint does not support Adjoint({', '.join(refused)}): its "
                         "backward solve controls the error of (y, a) per sample and integrates the parameter "
                         "gradient by the method's quadrature (see neuralode.gradients.per_sample_adjoint)")
    rtol = norm.rtol if strategy.rtol is None else strategy.rtol
    atol = norm.atol if strategy.atol is None else strategy.atol
    if isinstance(rtol, torch.Tensor) or isinstance(atol, torch.Tensor):
        raise ValueError("per_sample=True with the adjoint takes float tolerances (the backward state (y, a) has "
                         "twice the elements of y); give rtol and atol as floats")
    if strategy.method is not None:
        spec = check_method(strategy.method)
        stepper = spec.make_stepper({})
        if not isinstance(stepper, ExplicitRungeKutta) or not spec.adaptive:
            raise ValueError(f"the adjoint's method {spec.name!r} must be an adaptive explicit Runge-Kutta method "
                             "with per_sample=True")
        if control is None:
            control = make_control(spec, {}, _Tolerances(rtol, atol), func, None)
        step_size = None
    return PerSampleAdjointRun(func, strategy.params, stepper, control, step_size, taus, direction, float(rtol),
                               float(atol), None, throw)


class _Tolerances:
    """What :func:`make_control` reads of a problem (tolerances; times and direction for a fixed grid)."""

    def __init__(self, rtol, atol, times=(0.0, 1.0), direction=1):
        self.rtol, self.atol, self.times, self.direction, self.t = rtol, atol, list(times), direction, None


def _records(integration, events, problem, t_in) -> list:
    """The loop's event occurrences as EventRecords in the user's time dtype and state structure."""
    records = []
    for t_event, y_event, index, direction in integration.event_records:
        y_user = problem.unflatten_trajectory(y_event.unsqueeze(0))
        y_user = pytree.tree_map(lambda part: part[0], y_user)
        records.append(EventRecord(torch.tensor(t_event, dtype=t_in.dtype, device=t_in.device), y_user, index,
                                   events[index].name, direction))
    return records


def _differentiate_args(strategy, args, adjoint_params):
    """The adjoint's and checkpoint's default parameters, plus the tensors in ``args`` that require grad (as
    diffrax differentiates its ``args``); explicit ``adjoint_params`` are kept as given."""
    if adjoint_params is not None or not hasattr(strategy, "params"):
        return strategy
    known = {id(p) for p in strategy.params}
    extra = [x for x in _tensors_in(args) if x.requires_grad and id(x) not in known and not known.add(id(x))]
    return dataclasses.replace(strategy, params=(*strategy.params, *extra)) if extra else strategy


def _tensors_in(value, depth: int = 4, seen=None) -> list:
    """The tensors held by ``value``: a tensor, a PyTree (dicts, tuples, lists), a module's parameters and buffers, or
    the attributes of a plain object or dataclass (``types.SimpleNamespace``, a config class), ``depth`` levels
    down."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth < 0:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module):
        return [*value.parameters(), *value.buffers()]
    if isinstance(value, (dict, list, tuple)):
        items = value.values() if isinstance(value, dict) else value
        return [x for item in items for x in _tensors_in(item, depth - 1, seen)]
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(value, type):
        return [x for item in attributes.values() for x in _tensors_in(item, depth - 1, seen)]
    return []


def _state_tensors(y0) -> list:
    """The tensors of a state of any structure (tensor, tuple, PyTree), before it is checked."""
    return [x for x in pytree.tree_leaves(y0) if isinstance(x, torch.Tensor)]


def _wants_gradient(func, y0) -> bool:
    if any(p.requires_grad for p in _state_tensors(y0)):
        return True
    return isinstance(func, torch.nn.Module) and any(p.requires_grad for p in func.parameters())


def _inner(a: torch.Tensor, b: torch.Tensor, dims) -> torch.Tensor:
    """Real inner product <a, b> over ``dims`` (for complex states, Re sum(conj(a) b))."""
    product = a.conj() * b if a.is_complex() else a * b
    product = product.real if product.is_complex() else product
    if dims is not None and len(dims) == 0:
        return product  # a 0-d state: nothing to sum (sum(dim=()) would sum over everything)
    return product.sum(dim=dims)


_SECOND_ORDER_TIME = ("second derivatives through the times t are not supported: the time gradient is the "
                      "first-order rule dy(t_i)/dt_i = f(t_i, y(t_i)). Pass t.detach() when computing higher "
                      "derivatives (e.g. a Laplacian with respect to y0)")


class _StartTime(torch.autograd.Function):
    """Identity on y0 whose backward adds dL/dt0 = -<dL/dy0, f(t0, y0)> (the flow's dependence on t0)."""

    @staticmethod
    def forward(ctx, t0, y0, f0):
        ctx.save_for_backward(f0)
        ctx.t_dtype = t0.dtype
        return y0.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(_SECOND_ORDER_TIME)
        (f0,) = ctx.saved_tensors
        return -_inner(grad, f0, None).to(ctx.t_dtype), grad, None


class _OutputTimes(torch.autograd.Function):
    """Identity on the outputs whose backward gives dL/dt_i = <dL/dy(t_i), f(t_i, y(t_i))>.

    ``f`` is evaluated at the outputs in the backward pass, and only when a time's gradient is asked for (as
    torchdiffeq does): evaluated in the forward pass, a solve whose ``t`` requires grad cost one evaluation per
    output time more, 150 against torchdiffeq's 50 for 100 outputs of ``y' = -y``, backward or not.
    """

    @staticmethod
    def forward(ctx, times, outputs, field, output_times):
        ctx.save_for_backward(outputs)
        ctx.field, ctx.output_times, ctx.t_dtype = field, output_times, times.dtype
        return outputs.clone()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(_SECOND_ORDER_TIME)
        grad_times = None
        if ctx.needs_input_grad[0]:
            (outputs,) = ctx.saved_tensors
            # (detached states under grad mode: a field that differentiates inside, a Hamiltonian network taking
            # autograd.grad of its H, works here as in the solve; the saved outputs claimed requires_grad without a
            # graph, and in backward grad mode is off)
            with torch.enable_grad():
                slopes = torch.stack([ctx.field(t, y.detach()).detach() for t, y in zip(ctx.output_times, outputs)])
            grad_times = _inner(grad, slopes, tuple(range(1, grad.ndim))).to(ctx.t_dtype)
        return grad_times, grad, None, None


def __getattr__(name):
    # torchdiffeq's odeint family lives in neuralode.compat; ``from neuralode.solve import odeint`` keeps working
    # (loaded on first use: compat imports this module).
    if name in ("odeint", "odeint_adjoint", "odeint_event", "odeint_dense"):
        from . import compat
        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
