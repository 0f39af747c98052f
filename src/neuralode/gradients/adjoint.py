"""The adjoint sensitivity method (Pontryagin; Chen, Rubanova, Bettencourt and Duvenaud 2018).

With a(t) = dL/dy(t), the backward pass solves, from the last output time to the first,

    dy/dt = f(t, y),   da/dt = -a^T df/dy,   da_theta/dt = -a^T df/dtheta,

with a(t_N) = dL/dy(t_N), a_theta(t_N) = 0. Each right-hand side costs one evaluation of f plus one
vector-Jacobian product. Between output times the state y is re-integrated backwards; at each
output time t_i it is reset to the forward value and dL/dy(t_i) is added to a. Then
dL/dy0 = a(t_0) and dL/dtheta = a_theta(t_0). Memory does not grow with the number of steps: the
forward pass keeps only the outputs, and neither pass records a graph across steps.
"""

from __future__ import annotations

import bisect
import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.utils._pytree as pytree

from .._numbers import real_number
from ..callbacks import Callbacks, warn_unsupported
from ..controllers import FixedGrid, rms_norm
from ..integrate import integrate
from ..interpolation import horner
from ..problem import Problem
from ..solvers.compiled import CompiledRungeKutta
from ..solvers.runge_kutta import ExplicitRungeKutta
from .base import (GradientStrategy, RunResult, collect_parameters, nan_gradients, names_the_backward_solve,
                   no_double_backward)
from .checkpoint import _Checkpoints


@dataclass(frozen=True)
class Adjoint(GradientStrategy):
    """Gradients by solving the adjoint ODE backwards in time; O(1) memory in the number of steps.

    Parameters
    ----------
    rtol, atol : float or Tensor, optional
        Tolerances of the backward solve (default: the forward ones).
    method : str, optional
        Method of the backward solve (default: the forward one).
    options : dict, optional
        Options of the backward solve (default: the forward ones). ``{"norm": "seminorm"}`` or
        ``{"norm": "full"}`` choose the norm like ``seminorm``; a callable norm receives, as in
        torchdiffeq, the scaled error of the augmented state as a tuple ``(t_adjoint, y, a,
        *a_params)`` shaped like the state and the parameters (``t_adjoint`` is a zero scalar: time
        gradients are not integrated in the backward solve here).
    seminorm : bool, optional
        Leave the parameter adjoint a_theta out of the backward error norm (Kidger, Chen and Lyons,
        "Hey, that's not an ODE", ICML 2021): a_theta is a quadrature that nothing else depends on, so
        its error need not reject steps. ``None`` (default): on for an explicit backward method (torchdiffeq's
        default is off), where it typically saves 30-50% of the backward evaluations while y and a stay under
        error control and the parameter gradient is integrated on the steps chosen for them; off for an implicit
        or Rosenbrock one, whose long stiff steps (as long as a's slow manifold allows) integrate a_theta
        badly: on a stiff two-state problem at rtol 1e-8, the interpolating adjoint's parameter gradient was
        16% off with rodas5p and 1% with radau5 under the seminorm, 2e-4 and 5e-4 under the full norm.
        ``seminorm=False`` gives torchdiffeq's mixed norm over (y, a, a_theta).

    interpolate : False, True or "checkpoint", default False
        Take y(t) in the backward pass from the forward solve's dense output instead of integrating it
        backwards (SciML's InterpolatingAdjoint). The backward state is then (a, a_theta) only. Needed
        for dissipative and stiff problems: re-integrating y' = -50 y backwards from y(1) ~ e^-50 gets y(0)
        wrong by orders of magnitude (measured: gradient errors of 1e-3 relative at rtol 1e-10 on a
        two-state problem with rates 50 and 2, for dopri5 and kvaerno5 alike; interpolated: 1e-9).
        ``True`` keeps the whole forward dense output (O(steps) states of memory, no graphs).
        ``"checkpoint"`` keeps only ~2 sqrt(2 N) states of the N forward steps (the online square-root
        thinning of :class:`~neuralode.gradients.Checkpoint`) and, as the backward solve reaches each
        segment between two of them, replays that segment's recorded steps without a graph to rebuild
        its dense output (at most three segments held at a time): O(sqrt(N)) memory for one extra
        forward solve (somewhat more when backward steps straddle segments already let go). The gradient
        equals the whole-dense-output one to rounding.

    The gradient is that of the continuous problem, accurate to the backward tolerances; it does not
    support double backward. When the dynamics are unstable backwards in time, use ``interpolate=True``
    or ``Checkpoint``.
    Backward cost is reported in ``Solution.stats["nfe_backward"]`` after ``backward()``.
    """

    rtol: object = None
    atol: object = None
    method: str | None = None
    options: dict | None = None
    seminorm: bool | None = None
    interpolate: bool | str = False
    params: tuple = field(default=(), repr=False)
    callbacks: object = field(default=None, repr=False)  # the field's *_adjoint step callbacks

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is None:
                continue
            # (a tuple: one per tensor of a tuple state; shapes are checked against the state by solve)
            for entry in (value if isinstance(value, (tuple, list)) else (value,)):
                number = real_number(entry)
                if number is None and not isinstance(entry, (torch.Tensor, np.ndarray)):
                    raise TypeError(f"adjoint {name} must be a float or a tensor (or a tuple of them for a tuple "
                                    f"state), got {type(entry).__name__}")
                tensor = torch.as_tensor(entry if number is None else number)
                if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
                    raise ValueError(f"adjoint {name}={value} is invalid; tolerances must be finite and non-negative")

    def bind(self, func, adjoint_params):
        return replace(self, params=collect_parameters(func, adjoint_params),
                       callbacks=Callbacks.of(func, adjoint=True))

    def check_forward_method(self, spec, method: str, options: dict) -> None:
        """Refuse a forward method and options whose dense output the interpolating adjoint cannot use (called by
        :meth:`run`, and by ODEBlock where it is built)."""
        if not self.interpolate:
            return
        options = options or {}
        stepper = spec.make_stepper(options)
        if getattr(stepper, "reversible", False) and (stepper.linear_dense or self.interpolate == "checkpoint"):
            why = ("cannot be replayed from a stored y (a step needs its companion as well)"
                   if self.interpolate == "checkpoint" else "has a piecewise-linear dense output to differentiate "
                   "along (a gradient 1.5e-2 off at rtol 1e-8 in a test)")
            raise ValueError(f"Adjoint(interpolate={self.interpolate!r}) with the reversible method {method!r}: it "
                             f"{why}; use gradient='reversible' (exact, O(1) memory), Adjoint() without interpolate, "
                             "or an ordinary method")
        if spec.whole_span:
            raise ValueError(f"Adjoint(interpolate={self.interpolate!r}) needs the forward solve's dense output, "
                             f"which method {method!r} does not keep step by step; use an adaptive method "
                             "such as 'dopri5' or 'kvaerno5', or Adjoint() without interpolate")
        if not spec.adaptive and "interp" not in spec.options:
            raise ValueError(f"Adjoint(interpolate={self.interpolate!r}) would differentiate along method {method!r}'s "
                             "dense output, which is linear between its steps (gradient errors of 1e-3 measured on "
                             "such); use Adjoint() without interpolate, or a method with a smooth dense output")
        if options.get("interp") == "linear" or (not spec.adaptive and "interp" not in options):
            raise ValueError(f"Adjoint(interpolate={self.interpolate!r}) would differentiate along a "
                             "piecewise-linear y(t) on a fixed grid with interp='linear' (gradient errors of 1e-3 "
                             "measured); pass options={'interp': 'cubic'} or use an adaptive method")

    def run(self, problem, stepper, control, **kwargs) -> RunResult:
        if self.interpolate not in (False, True, "checkpoint"):
            raise ValueError(f"Adjoint(interpolate=...) must be False, True or 'checkpoint', got {self.interpolate!r}")
        self.check_forward_method(problem.spec, problem.method, kwargs["options"])
        backward = problem.backward
        if getattr(backward.stepper, "needs_terms", False) and getattr(problem.field, "term", lambda _: None)(
                "explicit") is None:
            raise ValueError(f"Adjoint(method={backward.spec.name!r}) steps the backward solve on the terms of a "
                             "neuralode.SplitField, but func is a field given whole: pass a SplitField, or give an "
                             "implicit backward method (e.g. 'kvaerno4')")
        if self.interpolate == "checkpoint" and not stepper.replayable and not stepper.solves_whole_span:
            raise ValueError(f"Adjoint(interpolate='checkpoint') replays the forward steps of a Runge-Kutta method; "
                             f"method {problem.method!r} cannot be replayed from a checkpoint (multistep history or "
                             "method switching): use interpolate=True, which keeps the whole dense output")
        if self.callbacks is not None:
            spec = problem.backward.spec
            warn_unsupported(self.callbacks, spec.name, spec.callbacks, adjoint=True)
        box = []
        outputs = _AdjointSolve.apply(self, problem, stepper, control, kwargs, box, problem.y0, *self.params)
        return RunResult(outputs, box[0])


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, strategy, problem, stepper, control, kwargs, box, y0, *params):
        forward_problem = replace(problem, y0=y0.detach(),
                                  f0=None if problem.f0 is None else problem.f0.detach())
        checkpoints = None
        if strategy.interpolate == "checkpoint" and not kwargs.get("record_dense"):
            checkpoints = _Checkpoints(problem.direction * problem.times[0], forward_problem.y0)
            kwargs = dict(kwargs, on_accept=checkpoints, reads_interpolant=True)
        elif strategy.interpolate:
            kwargs = dict(kwargs, record_dense=True)
        with torch.no_grad():
            integration = integrate(forward_problem, stepper, control, **kwargs)
        ctx.forward_source = (integration.dense if checkpoints is None
                              else _ReplayedForward(problem, stepper, kwargs["options"], checkpoints))
        box.append(integration)
        outputs = torch.stack(integration.outputs)
        ctx.strategy, ctx.problem, ctx.kwargs, ctx.integration = strategy, problem, kwargs, integration
        ctx.compiled = isinstance(stepper, CompiledRungeKutta)
        ctx.save_for_backward(outputs)
        return outputs

    @staticmethod
    @names_the_backward_solve
    def backward(ctx, grad_outputs):
        if torch.is_grad_enabled():
            no_double_backward("adjoint")
        (outputs,) = ctx.saved_tensors
        strategy, problem, integration = ctx.strategy, ctx.problem, ctx.integration
        params = strategy.params
        times = integration.output_times
        state_shape = outputs.shape[1:]
        outputs = outputs.reshape(outputs.shape[0], state_shape.numel())
        grad_outputs = grad_outputs.reshape(outputs.shape)
        if not bool(torch.isfinite(grad_outputs).all()):
            return (None,) * 6 + nan_gradients(state_shape, outputs.dtype, outputs.device, params)
        n = outputs.shape[1]
        # (ctx keeps the forward source: a graph retained for a second backward needs it again, and ctx.integration
        # and ctx.kwargs hold the dense output and the checkpoints anyway)
        replayed_before = getattr(ctx.forward_source, "nfe", 0)
        if strategy.interpolate:
            dynamics = _InterpolatedAdjointDynamics(problem.field, params, state_shape, ctx.forward_source)
        else:
            dynamics = _AdjointDynamics(problem.field, params, state_shape)
        # The backward method, options and control were parsed at the boundary (neuralode.options.backward_settings).
        settings = problem.backward
        stepper, options, spec = settings.stepper, dict(settings.options), settings.spec
        if ctx.compiled and isinstance(stepper, ExplicitRungeKutta):
            # compile=True: the backward steps (the augmented field with its vector-Jacobian product inlined)
            # are compiled too, in an entry of their own.
            stepper = CompiledRungeKutta(stepper, problem.field.func, role="adjoint")
        rtol, atol = _backward_tolerances(strategy, problem, n, dynamics.n_params, dynamics.y_slots)
        user_norm = options.pop("norm", None)
        if callable(user_norm) and strategy.interpolate:
            raise ValueError("a callable adjoint norm is not supported with interpolate=True (the backward state "
                             "holds no y); use 'seminorm' or 'full'")
        if callable(user_norm):
            # torchdiffeq's convention: the norm receives the augmented state as a tuple
            # (t adjoint, y, a, *parameter adjoints). Time gradients are attached outside the backward
            # solve here, so the time adjoint is a zero scalar placeholder.
            time_slot = outputs.new_zeros(())
            options["norm"] = lambda flat: user_norm((time_slot, *dynamics.callback_view(flat)))
        elif spec.adaptive:
            seminorm = strategy.seminorm if user_norm is None else user_norm == "seminorm"
            if seminorm is None:   # (the default: see Adjoint.seminorm)
                seminorm = not stepper.implicit
            options["norm"] = _backward_norm(n, dynamics.n_params, seminorm, dynamics.y_slots)

        continuous = (spec.adaptive and not spec.whole_span and len(times) > 2
                      and all(a != b for a, b in zip(times, times[1:])))
        # (a fixed grid's drift is judged against the state's own size, not the tolerance: _Drift)
        drift = _Drift(problem, outputs, fixed_grid=not spec.adaptive) if not strategy.interpolate else None
        if continuous:
            state = _continuous_backward(problem, dynamics, stepper, spec, options, strategy, outputs, grad_outputs, times,
                                         rtol, atol, drift)
            if drift is not None:
                drift.check(state[:n], 0)
            a, a_params = dynamics.unpack(state)
            a = a + grad_outputs[0]
            times = ()  # done: the loop below is the restart-per-interval path
        else:
            a = grad_outputs[-1]
            a_params = outputs.new_zeros(dynamics.n_params)
        for i in range(len(times) - 1, 0, -1):
            state = dynamics.pack(outputs[i], a, a_params)
            if times[i] != times[i - 1]:
                span = torch.tensor([times[i], times[i - 1]], dtype=torch.float64)
                backward_problem = Problem(field=dynamics, y0=state, f0=None, t=span, times=[times[i], times[i - 1]],
                                           direction=1 if times[i - 1] > times[i] else -1, shapes=None, rtol=rtol,
                                           atol=atol)
                # A grid_constructor is called as torchdiffeq calls it here: with the augmented
                # dynamics, the augmented state and the interval [t_i, t_{i-1}].
                control = settings.control(options, backward_problem, dynamics.as_user_function, state)
                if not control.adaptive and control.grid is None:
                    control = FixedGrid((backward_problem.direction * times[i],
                                         backward_problem.direction * times[i - 1]))
                result = integrate(backward_problem, stepper, control, options=options,
                                   callbacks=strategy.callbacks)
                state = result.final_y
                if drift is not None:
                    drift.check(state[:n], i - 1)
            a, a_params = dynamics.unpack(state)
            a = a + grad_outputs[i - 1]
        if drift is not None:
            drift.warn(times=integration.output_times)
        stats = integration.stats
        replayed = getattr(ctx.forward_source, "nfe", 0) - replayed_before   # the checkpointed segments' replays
        stats["nfe_backward"] = stats.get("nfe_backward", 0) + dynamics.nfe + replayed
        grads, offset = [], 0
        for p in params:
            grad = a_params[offset:offset + p.numel()].view_as(p)
            if grad.is_complex() and not p.is_complex():
                grad = grad.real  # a complex state with real parameters: the cotangent's real part
            grads.append(grad.to(p.dtype))
            offset += p.numel()
        return (None, None, None, None, None, None, a.view(state_shape), *grads)


def _continuous_backward(forward_problem, dynamics, stepper, spec, options, strategy, outputs, grad_outputs, times,
                         rtol, atol, drift=None):
    """One backward solve from t_N to t_0 that steps onto every output time t_i instead of restarting there.

    At t_i the state jumps: y is reset to its forward value and dL/dy(t_i) is added to the adjoint a.
    The step size and the controller carry across, so no interval pays for a starting-step search and
    a small first step; multistep methods restart their history there (the state changed). Returns
    the augmented state at t_0 (before dL/dy(t_0) is added).
    """
    direction = 1 if times[0] > times[-1] else -1
    jumps = {}
    for i in range(1, len(times) - 1):
        def jump(state, i=i):
            if drift is not None:
                drift.check(state[:outputs.shape[1]], i)
            a, a_params = dynamics.unpack(state)
            return dynamics.pack(outputs[i], a + grad_outputs[i], a_params)
        jumps[direction * times[i]] = jump
    state = dynamics.pack(outputs[-1], grad_outputs[-1], outputs.new_zeros(dynamics.n_params))
    span = torch.tensor([times[-1], times[0]], dtype=torch.float64)
    problem = Problem(field=dynamics, y0=state, f0=None, t=span, times=[times[-1], times[0]], direction=direction,
                      shapes=None, rtol=rtol, atol=atol)
    control = forward_problem.backward.control(options, problem, dynamics.as_user_function, state)
    result = integrate(problem, stepper, control, options=options, callbacks=strategy.callbacks, state_jumps=jumps)
    return result.final_y


class _Drift:
    """How far the backsolve adjoint's backward solve, which integrates y(t) backwards alongside the adjoint, strays
    from the forward solution at the output times, where it is known: in units of the forward tolerance
    (``atol + rtol |y|``). Dynamics that are unstable backwards in time (Van der Pol, chaotic or dissipative systems)
    make it grow without bound, and the gradients then mean nothing (about 1e15 on Van der Pol with mu = 100,
    status success): warned, naming the remedies. One host read per output time, in the backward pass only."""

    LIMIT = 1e4   # tolerance units: measured 2.6 (an MLP), 23 (Van der Pol, mu = 1), 50 (the spiral), 1.2e3 (a stiff
    #              linear system in tests/test_rosenbrock.py, gradients right); 1e6 to 6e10 where backsolve fails

    def __init__(self, problem, outputs, fixed_grid: bool = False):
        self.problem, self.outputs = problem, outputs
        self.worst, self.where = 0.0, None
        # A fixed grid's backward steps are as far off as their length makes them, whatever the tolerance: there the
        # unit is the state's own size, and only a drift beyond it is warned of (implicit Euler stepping a decay of
        # rate 500 backwards on h = 1e-3 rebuilt y 1e80 off, and the gradient came out 1.5e80, silently).
        self.fixed_grid = fixed_grid

    def check(self, y_rebuilt, index: int) -> None:
        forward = self.outputs[index]
        if not forward.numel():   # (an empty state rebuilds exactly)
            return
        if self.fixed_grid:
            scale = forward.abs().max() * self.LIMIT + self.problem.atol
        else:
            scale = self.problem.atol + self.problem.rtol * forward.abs()
        ratio = float(((y_rebuilt.detach() - forward).abs() / scale).max()) if forward.numel() else 0.0
        if not ratio <= self.worst:   # (NaN counts as the worst)
            self.worst, self.where = ratio, index

    def warn(self, times) -> None:
        if self.worst <= self.LIMIT:
            return
        t = times[self.where] if self.where is not None and self.where < len(times) else None
        size = "the state's size" if self.fixed_grid else "the tolerance"
        if self.fixed_grid:   # (in units of LIMIT x the state's size: said in units of the size)
            self.worst *= self.LIMIT
        warnings.warn(f"the adjoint's backward solve rebuilt y(t) {self.worst:.3g} times {size} away from the "
                      f"forward solution (at t={t}): the dynamics are unstable backwards in time, and the backsolve "
                      "adjoint's gradients can be far off (unless the loss hardly depends on the state there). Use "
                      "Adjoint(interpolate=True) (y from the forward dense output) or gradient='checkpoint' (exact "
                      "gradients of the steps taken)", UserWarning, stacklevel=3)


class _AdjointDynamics:
    """The augmented right-hand side [f, -a^T df/dy, -a^T df/dtheta] on a flat state [y, a, a_theta]."""

    def __init__(self, field, params, state_shape):
        self.field, self.params, self.state_shape = field, params, state_shape
        self.n = state_shape.numel()
        self.n_params = sum(p.numel() for p in params)
        self.nfe = 0

    y_slots = 1   # the backward state carries y

    @property
    def quadrature_from(self) -> int:
        """Where the parameter cotangents begin: their derivative, ``-a^T df/dtheta``, depends on ``y`` and ``a``
        only, so an implicit backward step solves for the components before them (ImplicitRungeKutta._unknowns)."""
        return (self.y_slots + 1) * self.n

    def pack(self, y, a, a_params):
        return torch.cat([y, a, a_params])

    def unpack(self, state):
        return state[self.n:2 * self.n], state[2 * self.n:]

    def time(self, t):
        return self.field.time(t)

    @property
    def time_dtype(self):
        return self.field.time_dtype

    def callback_view(self, state):
        """The augmented state as the ``*_adjoint`` callbacks receive it: ``(y, a, *a_params)`` shaped
        like the state and the parameters, with ``y`` and ``a`` split into their components for tuple
        states (torchdiffeq's tuple also leads with dL/dt)."""
        n = self.n
        if self.field.shapes is not None:  # a tuple or PyTree state: its tensors, as torchdiffeq passes a tuple's
            parts = [*pytree.tree_leaves(self.field.unflatten(state[:n])),
                     *pytree.tree_leaves(self.field.unflatten(state[n:2 * n]))]
        else:
            parts = [state[:n].view(self.state_shape), state[n:2 * n].view(self.state_shape)]
        offset = 2 * n
        for p in self.params:
            parts.append(state[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return tuple(parts)

    def as_user_function(self, t, state):
        """``func(t, y)`` with a tensor time, for a user's ``grid_constructor`` (not counted in the NFE)."""
        nfe = self.nfe
        try:
            return self(float(t), state)
        finally:
            self.nfe = nfe

    def unflatten(self, y):
        return y

    # A compiled backward step (solve(..., compile=True)) may inline ``evaluate``: it takes a tensor time.
    compilable = True

    whole = None   # (a term's view: the dynamics whose evaluations it adds to)

    def __call__(self, t: float, state: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        if self.whole is not None:
            self.whole.nfe += 1
        return self.evaluate(t, state)

    def term(self, name: str):
        """For a :class:`~neuralode.SplitField`, the augmented field of one of its terms, ``[f_E, -a^T df_E/dy,
        -a^T df_E/dtheta]`` or the implicit term's (they sum to the whole augmented field), so that an IMEX method steps
        the backward solve as it stepped the forward one; ``None`` for a field given whole."""
        if self.whole is not None:
            return None
        terms = self.__dict__.get("_terms")
        if terms is None:
            terms = {}
            term_of = getattr(self.field, "term", None)
            for label in ("explicit", "implicit"):
                field = term_of(label) if term_of is not None else None
                if field is None:
                    break
                view = copy.copy(self)
                view.field, view.whole, view.nfe = field, self, 0
                terms[label] = view
            self._terms = terms
        return terms.get(name)

    def evaluate(self, t, state: torch.Tensor) -> torch.Tensor:
        n = self.n
        # Called with grad mode on only by an implicit method forming the Jacobian of this augmented field
        # (the backward pass itself runs without a graph): then the result must depend differentiably on
        # the state, so y is not detached and the vector-Jacobian product keeps its graph (second
        # derivatives of f). Otherwise a detached y keeps each evaluation's graph to one f.
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():
            y = state[:n].view(self.state_shape)
            if not differentiable or not y.requires_grad:
                y = y.detach().requires_grad_(True)
            f = self.field.evaluate(t, y)
            if f.requires_grad:
                grads = torch.autograd.grad(f, (y,) + self.params, create_graph=differentiable,
                                            grad_outputs=-state[n:2 * n].view(self.state_shape), allow_unused=True)
            else:
                # f depends on neither y nor the parameters (e.g. f = g(t)): every product is zero.
                grads = (None,) * (1 + len(self.params))
        if not differentiable:
            f = f.detach()
        parts = [f.reshape(-1)] + [torch.zeros_like(x).reshape(-1) if g is None else g.reshape(-1)
                                   for g, x in zip(grads, (y,) + self.params)]
        return torch.cat([p.to(state.dtype) for p in parts])


class _InterpolatedAdjointDynamics(_AdjointDynamics):
    """[-a^T df/dy, -a^T df/dtheta] on the state [a, a_theta], with y(t) from the forward dense output."""

    y_slots = 0
    compilable = False   # y(t) comes from a lookup in Python floats (bisect), not from traceable tensor code

    def __init__(self, field, params, state_shape, source):
        super().__init__(field, params, state_shape)
        # A DenseSolution (the whole forward dense output) or a _ReplayedForward (checkpointed segments):
        # both answer ``dense_at(tau)`` with the dense output that covers tau.
        self.source = source

    def pack(self, y, a, a_params):
        return torch.cat([a, a_params])

    def unpack(self, state):
        return state[:self.n], state[self.n:]

    def callback_view(self, state):
        n = self.n
        parts = [state[:n].view(self.state_shape)]
        offset = n
        for p in self.params:
            parts.append(state[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return tuple(parts)

    def forward_state(self, t: float) -> torch.Tensor:
        """y(t) from the dense output; a stage slightly outside the span (kvaerno5's c = 1.23) extrapolates
        the nearest step's polynomial."""
        tau = self.source.direction * t
        dense = self.source.dense_at(tau) if isinstance(self.source, _ReplayedForward) else self.source
        i = min(max(bisect.bisect_right(dense.starts, tau) - 1, 0), len(dense.starts) - 1)
        theta = (tau - dense.starts[i]) / dense.lengths[i]
        if theta == 1.0 and i == len(dense.starts) - 1:
            return dense.end_value
        return horner(dense.coefficients[i], theta)

    def evaluate(self, t: float, state: torch.Tensor) -> torch.Tensor:
        n = self.n
        differentiable = torch.is_grad_enabled()   # see _AdjointDynamics.evaluate
        a = state[:n].view(self.state_shape)
        if not differentiable:
            a = a.detach()
        with torch.enable_grad():
            y = self.forward_state(t).detach().view(self.state_shape).requires_grad_(True)
            f = self.field.evaluate(t, y)
            if f.requires_grad:
                grads = torch.autograd.grad(f, (y,) + self.params, grad_outputs=-a, create_graph=differentiable,
                                            allow_unused=True)
            else:
                grads = (None,) * (1 + len(self.params))
        parts = [torch.zeros_like(x).reshape(-1) if g is None else g.reshape(-1)
                 for g, x in zip(grads, (y,) + self.params)]
        return torch.cat([p.to(state.dtype) for p in parts])


class _ReplayedForward:
    """The forward solve's dense output rebuilt segment by segment from square-root checkpoints.

    ``dense_at(tau)`` returns the dense output of the segment that holds internal time ``tau`` (the
    nearest one outside the span), replaying that segment's recorded steps as a fixed grid without a
    graph when it is not held; the three most recently used segments are kept, enough for a backward
    step that straddles a segment boundary. ``nfe`` counts the replays' evaluations (reported as part
    of the backward cost); the field's own counter is left as the forward solve set it.
    """

    def __init__(self, problem, stepper, options, checkpoints: _Checkpoints, keep: int = 3):
        self.problem, self.stepper, self.keep = problem, stepper, keep
        self.options = dict(options)   # (jump_t: the replayed steps take the forward's one-sided limits)
        self.direction = problem.direction
        steps = checkpoints.step_ends
        bounds = list(checkpoints.saved)
        if bounds[-1][0] != len(steps):
            bounds.append((len(steps), steps[-1], None))
        self.segments = list(zip(bounds, bounds[1:])) or [(bounds[0], bounds[0])]
        self.starts = [start[1] for start, _ in self.segments]
        self.step_ends = steps
        self.held: OrderedDict = OrderedDict()
        self.nfe = 0

    def dense_at(self, tau: float):
        i = min(max(bisect.bisect_right(self.starts, tau) - 1, 0), len(self.segments) - 1)
        dense = self.held.get(i)
        if dense is None:
            dense = self.held[i] = self._replay(i)
            while len(self.held) > self.keep:
                self.held.popitem(last=False)
        else:
            self.held.move_to_end(i)
        return dense

    def _replay(self, i: int):
        (k0, tau0, y_start), (k1, tau1, _) = self.segments[i]
        problem, direction = self.problem, self.direction
        field = problem.field
        nfe = field.nfe
        grid = (tau0,) + tuple(self.step_ends[k0:k1])
        segment = Problem(field=field, y0=y_start, f0=None, t=None, times=[direction * tau0, direction * grid[-1]],
                          direction=direction, shapes=problem.shapes, rtol=problem.rtol, atol=problem.atol,
                          method=problem.method)
        with torch.no_grad():
            replay = integrate(segment, self.stepper, FixedGrid(grid), options=self.options, record_dense=True)
        self.nfe += field.nfe - nfe
        field.nfe = nfe
        return replay.dense


def _backward_tolerances(strategy, problem, n, n_params, y_slots=1):
    def expand(tol):
        if not isinstance(tol, torch.Tensor):
            return float(tol)
        flat = tol.reshape(-1)
        return torch.cat([flat] * (1 + y_slots) + [flat.min().expand(n_params)])

    rtol = problem.rtol if strategy.rtol is None else strategy.rtol
    atol = problem.atol if strategy.atol is None else strategy.atol
    return expand(rtol), expand(atol)


def _backward_norm(n, n_params, seminorm, y_slots=1):
    """Mixed norm over (y, a, a_theta), as torchdiffeq's default; the seminorm drops a_theta. Without y
    (the interpolated adjoint) the state is (a, a_theta)."""
    if y_slots == 0:
        if seminorm or n_params == 0:
            return lambda x: rms_norm(x[:n])
        return lambda x: torch.maximum(rms_norm(x[:n]), rms_norm(x[n:]))
    if seminorm or n_params == 0:
        return lambda x: torch.maximum(rms_norm(x[:n]), rms_norm(x[n:2 * n]))
    return lambda x: torch.maximum(torch.maximum(rms_norm(x[:n]), rms_norm(x[n:2 * n])), rms_norm(x[2 * n:]))
