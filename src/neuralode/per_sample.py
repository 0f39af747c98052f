"""Per-sample stepping: every batch element keeps its own step size, accept/reject decisions and output times.

torchode's central feature (Lienen and Günnemann, "torchode: A Parallel ODE Solver for PyTorch", 2022):
in a joint solve one stiff or fast sample forces small steps on the whole batch, and one rejected
sample rejects the step for all. Here the state ``y`` has shape ``(batch, *shape)`` and every quantity
the loop decides on is a tensor of shape ``(batch,)``: the current time, the step size, the error ratio
(the error norm is taken over each sample's own elements), the accept mask, the controller's history
and the index of the next output time. One step of the explicit Runge-Kutta stepper advances the whole
batch at once with a step size per sample (``h`` of shape ``(batch, 1, ..., 1)``); a rejected sample
stands still, and a sample that has reached its last output time steps with ``h = 0`` (its state no
longer changes) until every sample is done.

A sample's result therefore does not depend on the batch it is solved in, as long as the vector field
treats batch rows independently (no batch norm): the tests check it to 1e-12 in float64.

Outputs: every value interpolated at an output time is kept once (``values``) and a table ``(n, batch)``
of integers says which kept row is the output ``k`` of sample ``b``; one gather at the end
builds the ``(n, batch, *shape)`` result. That keeps autograd's graph to what was computed (no copy
of the whole output tensor per step) and needs no host synchronisation to place a value.

Host synchronisation: one read per step (how many outputs the step passed, how many samples are still
running, and the failure flags), the same count as the joint loop's one read of the error ratio.
"""

from __future__ import annotations

import math

import torch
import torch.utils._pytree as pytree

from ._errors import MaxStepsError, NonFiniteError, NonFiniteInputError, Status, StepSizeUnderflowError, add_note
from .controllers import ErrorNorm
from .integrate import min_step_failed_message, pinned_non_finite_message
from .problem import COMPUTE_DTYPE, TENSOR, VectorField, _check_tolerance, check_derivative, warn_below_resolution

# |y| grown this many times over while the step collapsed: a finite-time blow-up (as in the joint loop).
_DIVERGENCE_GROWTH = 1e8

__all__ = ["PerSampleField", "PerSampleNorm", "PerSampleTree", "integrate_per_sample", "check_per_sample_times"]


class PerSampleField(VectorField):
    """The user's ``func(t, y)`` called with ``t`` of shape ``(batch,)``: one time per sample (torchode's
    convention). The loop hands times as float64 tensors of shape ``(batch, 1, ..., 1)``, which a compiled step
    (``compile=True``) inlines as it does the joint field."""

    def time(self, t) -> torch.Tensor:
        return t.reshape(-1).to(self.time_dtype)


class PerSampleNorm(ErrorNorm):
    """Error ratio per sample: RMS over the sample's elements of ``err / (atol + rtol max(|y0|, |y1|))``.

    Returns shape ``(batch,)``. The joint solve's :class:`~neuralode.controllers.ErrorNorm` (the same scale),
    with its RMS taken row by row.
    """

    def __init__(self, rtol, atol):
        super().__init__(rtol, atol, norm=None)
        self.norm = self.rms

    @staticmethod
    def rms(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1)
        return torch.linalg.vector_norm(rows, dim=1) / math.sqrt(max(rows.shape[1], 1))


def check_per_sample_times(t, y0) -> torch.Tensor:
    """Validate ``t`` for a per-sample solve; returns the output times as float64, shape ``(batch, n)``.

    ``t`` has shape ``(n,)`` (every sample reports at the same times) or ``(batch, n)`` (its own times per
    sample); each row strictly monotone, all rows in the same direction.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor of times, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"t has dtype {t.dtype}; times must be floating point, e.g. t.double()")
    if t.requires_grad:
        raise ValueError("with per_sample=True, t must not require grad (gradients with respect to the output "
                         "times are not supported in per-sample mode); pass t.detach()")
    batch = y0.shape[0]
    if t.ndim == 1:
        t = t.unsqueeze(0).expand(batch, -1)
    elif t.ndim != 2 or t.shape[0] != batch:
        raise ValueError(f"with per_sample=True, t must have shape (n,) or (batch, n) = ({batch}, n), got "
                         f"{tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError("t is empty; give at least the start time")
    if t.device != y0.device:
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}; move them to the same device")
    times = t.detach().to(torch.float64)
    if not bool(torch.isfinite(times).all()):
        raise ValueError("t contains NaN or infinite values; every output time must be finite")
    if times.shape[1] > 1:
        steps = times.diff(dim=1)
        increasing, decreasing = bool((steps > 0).all()), bool((steps < 0).all())
        if not (increasing or decreasing):
            rows = ((steps > 0).all(dim=1) | (steps < 0).all(dim=1))
            if bool(rows.all()):
                raise ValueError("the rows of t run in different directions; with per_sample=True every sample must "
                                 "integrate forward in time, or every sample backward")
            bad = int((~rows).nonzero()[0, 0])
            if bool((steps[bad] == 0).all()):
                raise ValueError(f"row t[{bad}] has zero length (all its times are {float(times[bad, 0])}): a "
                                 "per-sample row must span an interval; leave that sample out of the solve (its "
                                 "result is its y0)")
            raise ValueError(f"row t[{bad}] must be strictly increasing or strictly decreasing (no repeats); sort it "
                             "and remove duplicates")
    return times


class PerSampleTree(torch.nn.Module):
    """A tuple or PyTree state of tensors ``(batch, *shape_i)`` as one ``(batch, n)`` state for per-sample stepping:
    ``func`` sees and returns the user's structure, the loop a flat row per sample. An ``nn.Module``, so a module
    ``func`` keeps its parameters (the adjoint's)."""

    def __init__(self, func, y0):
        super().__init__()
        leaves, self.spec = pytree.tree_flatten(y0)
        if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise TypeError(f"with per_sample=True, y0 must be a tensor of shape (batch, ...) or a tuple or PyTree of "
                            f"such tensors, got {type(y0).__name__} with leaves "
                            f"{[type(leaf).__name__ for leaf in leaves]}")
        if any(leaf.ndim < 1 for leaf in leaves) or len({leaf.shape[0] for leaf in leaves}) != 1:
            raise ValueError(f"with per_sample=True, every tensor of y0 needs the batch dimension first, of one size: "
                             f"got shapes {[tuple(leaf.shape) for leaf in leaves]}")
        if len({leaf.dtype for leaf in leaves}) != 1:
            raise TypeError(f"the tensors of y0 must share one dtype, got {sorted({str(l.dtype) for l in leaves})}")
        if leaves[0].shape[0] == 0:
            raise ValueError(f"with per_sample=True, y0 holds no sample (batch size 0, shapes "
                             f"{[tuple(leaf.shape) for leaf in leaves]}): there is nothing to step; skip the solve "
                             "for an empty batch, or solve jointly (per_sample=False)")
        self.func = func
        self.batch = leaves[0].shape[0]
        self.shapes = [tuple(leaf.shape[1:]) for leaf in leaves]
        self.sizes = [math.prod(shape) for shape in self.shapes]

    @staticmethod
    def _rows(leaves) -> torch.Tensor:
        return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)

    def flatten(self, tree) -> torch.Tensor:
        """The user's structure of ``(batch, *shape_i)`` tensors -> ``(batch, n)``."""
        return self._rows(pytree.tree_leaves(tree))

    def unflatten(self, flat: torch.Tensor):
        """``(..., batch, n) -> the structure, (..., batch, *shape_i)`` (the state, or a trajectory)."""
        parts = torch.split(flat, self.sizes, dim=-1)
        return pytree.tree_unflatten([part.reshape(*part.shape[:-1], *shape)
                                      for part, shape in zip(parts, self.shapes)], self.spec)

    def forward(self, t, y):
        out = self.func(t, self.unflatten(y))
        if isinstance(out, list) and self.spec.type is tuple:
            out = tuple(out)   # (a list for a tuple state, as the joint solve takes it)
        try:
            leaves = self.spec.flatten_up_to(out)
        except (ValueError, TypeError):   # (torch's message names neither structure)
            raise TypeError(f"func must return the derivative in y0's structure ({pytree.treespec_pprint(self.spec)}), "
                            "one tensor (batch, ...) per state tensor") from None
        # Each tensor as its state tensor (shapes are known without reading the device): a (batch, 3) derivative for a
        # (batch, 3) tensor is of the right width for another's row too, and torch.cat promotes a float32 one. (Under
        # torch.autocast a field's float16 result is converted, as in the joint solve: check_derivative.)
        batch = y.shape[0]
        leaves = list(leaves)
        for index, (leaf, shape) in enumerate(zip(leaves, self.shapes)):
            if check_derivative(f"func(t, y), for the state's tensor {index} (in y0's order),", leaf,
                                torch.Size((batch, *shape)), y.dtype):
                leaves[index] = leaf.to(y.dtype)
        return self._rows(leaves)


def make_per_sample_field(func, y0, rtol, atol):
    """Check ``y0`` and the tolerances; returns ``(field, y0 in the compute dtype, norm)``."""
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"with per_sample=True, y0 must be a tensor of shape (batch, ...), or a tuple or PyTree of "
                        f"such tensors, got {type(y0).__name__}")
    if not (y0.is_floating_point() or y0.is_complex()) or y0.dtype == torch.complex32:
        raise TypeError(f"y0 has dtype {y0.dtype}; the state must be floating point or complex (not complex32)")
    if y0.ndim < 1:
        raise ValueError(f"with per_sample=True, y0 must have a batch dimension first, shape (batch, ...), got "
                         f"{tuple(y0.shape)}")
    if y0.shape[0] == 0:
        raise ValueError(f"with per_sample=True, y0 holds no sample (shape {tuple(y0.shape)}): there is nothing to "
                         "step; skip the solve for an empty batch, or solve jointly (per_sample=False), which "
                         "returns an empty trajectory")
    real_dtype = y0.real.dtype if y0.is_complex() else y0.dtype
    compute_dtype = COMPUTE_DTYPE.get(y0.dtype, y0.dtype)
    compute_real = COMPUTE_DTYPE.get(real_dtype, real_dtype)
    rtol = _check_tolerance("rtol", rtol, (y0,), TENSOR, compute_real, y0.device)
    atol = _check_tolerance("atol", atol, (y0,), TENSOR, compute_real, y0.device)
    if compute_dtype != y0.dtype:
        floor = torch.finfo(y0.dtype).eps
        rtol = max(rtol, floor) if isinstance(rtol, float) else rtol.clamp_min(floor)
    state = y0.to(compute_dtype)
    if not bool(torch.isfinite(state).all()):
        raise NonFiniteInputError("y0 contains NaN or infinite values; the initial state must be finite")
    warn_below_resolution(rtol, atol, state, compute_real)
    field = PerSampleField(func, None, None, real_dtype, y0.device, y0.dtype, compute_dtype)
    return field, state, PerSampleNorm(rtol, atol)


def per_sample_first_steps(options: dict, y0: torch.Tensor):
    """Option ``first_step`` given as a tensor of shape ``(batch,)``: one starting step per sample (torchode's
    ``dt0``). Returns ``(options without it, the steps as float64)``; ``(options, None)`` for anything else (a
    number is every sample's, checked with the other options). The adjoint's backward solve takes Hairer's
    starting step per sample (with a number, it starts from that number too)."""
    given = options.get("first_step")
    if not isinstance(given, torch.Tensor) or given.numel() == 1:
        return options, None
    batch = y0.shape[0]   # (a fixed-step method was refused the option with the others it does not take)
    if given.shape != (batch,):
        raise ValueError(f"option 'first_step' as a tensor must have shape (batch,) = ({batch},), one starting step "
                         f"per sample, got {tuple(given.shape)}")
    if given.is_complex() or given.dtype == torch.bool:
        raise TypeError(f"option 'first_step' must hold real step sizes, got dtype {given.dtype}")
    steps = given.detach().to(device=y0.device, dtype=torch.float64)
    if not bool((torch.isfinite(steps) & (steps > 0)).all()):
        bad = int((~(torch.isfinite(steps) & (steps > 0))).nonzero()[0, 0])
        raise ValueError(f"option 'first_step' must be finite and > 0 for every sample; sample {bad} has "
                         f"{float(steps[bad])}")
    return {k: v for k, v in options.items() if k != "first_step"}, steps


def _first_evaluation(field, y0, times):
    """``func`` at the start times, checked like the joint solve's first evaluation."""
    t0 = times.reshape(-1).to(field.time_dtype)
    try:
        out = field.func(t0, y0.to(field.user_dtype) if field.cast else y0)
    except RuntimeError as error:
        # Most often a field written for a scalar t (torch.cos(t) * y): keep the user's error, say why t differs.
        add_note(error, f"neuralode: in per-sample mode func(t, y) receives t of shape {tuple(t0.shape)}, one time "
                        "per sample; broadcast it against the state, e.g. t.view(-1, *[1] * (y.dim() - 1))")
        raise
    field.nfe += 1
    if check_derivative("func(t, y)", out, y0.shape, field.user_dtype, " (t has shape (batch,) in per-sample mode)"):
        field.cast_output = True
    out = out.to(field.compute_dtype) if field.cast_output else out
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError("func(t, y0) returned non-finite values at the initial state", t=None)
    return out


def _initial_step(field, tau0, y0, f0, direction, order, norm, view):
    """Hairer's starting step (Hairer, Nørsett, Wanner I, Sec. II.4) for every sample at once: the joint
    solve's :func:`~neuralode.controllers.initial_step`, elementwise. One extra evaluation of ``func``."""
    with torch.no_grad():
        scale = norm.scale(y0)
        d0 = norm.rms(y0 / scale).double()
        d1 = norm.rms(f0 / scale).double()
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = torch.where(torch.isfinite(h0) & (h0 > 0), h0, torch.full_like(h0, 1e-6))
        step = (direction * h0).view(view)
        f1 = field(direction * tau0.view(view) + step, y0 + step.to(y0.real.dtype if y0.is_complex() else y0.dtype) * f0)
        d2 = norm.rms((f1 - f0) / scale).double() / h0
        largest = torch.maximum(d1, d2)
        h1 = torch.where(largest <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                         (0.01 / largest) ** (1.0 / (order + 1)))
        h = torch.minimum(100 * h0, h1)
        return torch.where(torch.isfinite(d2), h, h0 * 1e-3)


def _horner(coefficients, theta):
    """``sum_m c_m theta**m`` with one ``theta`` per sample (shape ``(batch, 1, ..., 1)``)."""
    result = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = c + result * theta
    return result


def interpolate_outputs(stepper, field, direction, taus, tau, tau1, h_step, y, outcome, column, wanted, linear,
                        first=None):
    """The states at the output times ``taus[b, column[b, j]]`` inside one step of every sample, shape
    ``(batch, J, *shape)`` (entries not ``wanted`` are meaningless): the step's dense output there, or the step's
    own value where the step ends exactly on the output time, as in the joint loop. (The per-sample checkpoint
    strategy replays this exactly.) ``first = (tau_first, y_first)``, for a solve that keeps its graph: the rows
    with no wanted output are interpolated at their first time and state with h = 0 (their values are dropped,
    and the field at their own step end may be NaN, whose partial derivatives would make every gradient NaN)."""
    batch, n = taus.shape
    view = (batch,) + (1,) * (y.ndim - 1)
    y1 = outcome.y1
    if first is not None:
        idle = ~wanted.any(dim=1)
        tau_first, y_first = first
        rows = idle.view(view)
        y, y1 = torch.where(rows, y_first, y), torch.where(rows, y_first, y1)
        tau, tau1 = torch.where(idle, tau_first, tau), torch.where(idle, tau_first, tau1)
        h_step = torch.where(idle, torch.zeros_like(h_step), h_step)
    if linear:
        coefficients = [y, y1 - y]
    else:
        f1 = outcome.f1 if outcome.f1 is not None else field((direction * tau1).view(view), y1)
        coefficients = stepper.dense_coefficients(field, (direction * tau).view(view), y,
                                                  (direction * h_step).view(view), outcome, f1)
    place = getattr(stepper, "place_outputs_per_sample", place_outputs)
    return place(coefficients, taus, tau, tau1, h_step, column, wanted, y1)


def place_outputs(coefficients, taus, tau, tau1, h_step, column, wanted, y1):
    """The dense output ``sum_m c_m theta**m`` of every sample's step at its output times ``taus[b, column[b, j]]``,
    or the step's end ``y1`` where the output time is that end exactly; shape ``(batch, J, *shape)``. Pure tensor
    code: ``compile=True`` runs it as one compiled function (solvers/compiled.py)."""
    batch, n = taus.shape
    safe_h = torch.where(h_step > 0, h_step, torch.ones_like(h_step))
    t_out = taus.gather(1, column.clamp_max(n - 1))
    theta = torch.where(wanted, (t_out - tau.unsqueeze(1)) / safe_h.unsqueeze(1), torch.zeros_like(t_out))
    real = y1.real.dtype if y1.is_complex() else y1.dtype
    block = (batch, column.shape[1]) + (1,) * (y1.ndim - 1)
    value = _horner([c.unsqueeze(1) for c in coefficients], theta.to(real).view(block))
    return torch.where((t_out == tau1.unsqueeze(1)).view(block), y1.unsqueeze(1), value)


def _fixed_step_counts(tau0, tau_end, step):
    """Steps per sample on a fixed grid: the joint grid's rule (no sliver step when the span is a whole
    number of steps up to rounding, see :func:`neuralode.options._fixed_grid`)."""
    n = (tau_end - tau0) / step
    nearest = torch.round(n)
    whole = (n - nearest).abs() <= 1e-9 * torch.clamp(n, min=1.0)
    return torch.where(whole, nearest, torch.ceil(n)).clamp_min(1)


def _sample_failure(sample, underflow, t_fail, y, y0, non_finite_last, max_num_steps, stuck_at=None):
    """The SolverError of one sample whose step shrank to nothing (``underflow``), that met NaN at ``min_step``
    (``stuck_at``: the min_step), or that ran out of steps."""
    if stuck_at is not None and non_finite_last:
        return NonFiniteError(pinned_non_finite_message(t_fail, stuck_at, sample), t=t_fail)
    if stuck_at is not None:   # (force_min_step=False)
        return StepSizeUnderflowError(min_step_failed_message(t_fail, stuck_at, sample), t=t_fail)
    magnitude, initial = float(y.detach().abs().max()), float(y0.detach().abs().max())
    if underflow and magnitude > _DIVERGENCE_GROWTH * max(1.0, initial):
        return NonFiniteError(
            f"the solution of sample {sample} diverges to infinity near t={t_fail}: |y| reached {magnitude:.3g} "
            f"(over {_DIVERGENCE_GROWTH:.0e} times its initial size) while its step shrank to nothing. The ODE has a "
            "finite-time blow-up there; check the vector field and its parameters", t=t_fail)
    if underflow and non_finite_last:
        return NonFiniteError(
            f"non-finite values (NaN or inf) appeared in the vector field evaluations of sample {sample} at "
            f"t={t_fail}; shrinking its step did not avoid them. The vector field likely blows up near this time: "
            "check it (and its parameters) there", t=t_fail)
    if underflow:
        return StepSizeUnderflowError(
            f"step size underflow in sample {sample} at t={t_fail}: its step shrank below the resolution of the "
            "time variable. The solution may blow up there, or the problem is stiff; loosen rtol/atol, set "
            "min_step, or check the vector field", t=t_fail)
    return MaxStepsError(
        f"sample {sample} reached the maximum number of steps (max_num_steps={max_num_steps}) at t={t_fail}; raise "
        "it with options={'max_num_steps': N}, loosen rtol/atol, or check whether the problem is stiff", t=t_fail)


def _fail(failures: dict, sample: int, throw: bool, error) -> None:
    """Record ``sample``'s failure (with ``throw``, raise it: the solve stops at its first failure)."""
    failures[sample] = error
    if throw:
        raise error


def _first_failure(failures: dict, batch: int):
    """The error a solve with failed samples reports: the first failure, naming how many failed, with every
    sample's status in ``sample_status`` (``None`` when every sample succeeded)."""
    if not failures:
        return None
    first = next(iter(failures.values()))
    if len(failures) > 1:
        listed = sorted(failures)
        shown = ", ".join(map(str, listed[:10])) + (", ..." if len(listed) > 10 else "")
        first = type(first)(f"{first} ({len(failures)} of {batch} samples failed: {shown}; "
                            "Solution.sample_status has each one's status)", t=first.t)
    first.sample_status = tuple(failures[b].status if b in failures else Status.SUCCESS for b in range(batch))
    return first


def standing_still(still, t_first, y_first, t, y, f, view):
    """Step inputs with the rows ``still`` (bool ``(batch,)``) at their first time and state and a zero derivative:
    with ``h = 0`` their stages are that state, where the field was finite, so their (dropped) part of a kept graph
    holds no NaN. ``f`` may be ``None`` (evaluated afresh by the caller)."""
    rows = still.view(view)
    return (torch.where(still, t_first, t), torch.where(rows, y_first, y),
            None if f is None else torch.where(rows, torch.zeros_like(f), f))


def _finite_rows(y: torch.Tensor) -> torch.Tensor:
    """Whether each sample's row of ``y`` is finite (one sum per row: NaN and inf propagate)."""
    total = y.reshape(y.shape[0], -1).sum(dim=1)
    return torch.isfinite(total.real + total.imag if total.is_complex() else total)


def _outputs_passed(taus, tau1, next_out, accepted) -> torch.Tensor:
    """How many output times each sample's accepted step reached (0 for the others)."""
    passed = torch.searchsorted(taus, tau1.unsqueeze(1), right=True).squeeze(1)
    return torch.where(accepted, (passed - next_out).clamp_min(0), torch.zeros_like(passed))


def _summary(new_outputs, done_next, underflow, over_budget, non_finite) -> torch.Tensor:
    """The five numbers of the loop's one host read per step: the most outputs a sample passed, how many samples
    still run, collapsed, ran out of steps, met non-finite values."""
    return torch.stack([new_outputs.max(), (~done_next).sum(), underflow.sum(), over_budget.sum(), non_finite.sum()])


def judge_adaptive_step(control, y1, error_ratio, error_order, h, at_floor, previous, older, active, underflow, tau,
                        tau1, taus, next_out, tau_end, retired, n_steps, max_num_steps):
    """The verdict on one adaptive per-sample step, every quantity of shape ``(batch,)``: accept or reject (a step
    whose result is not finite is rejected whatever the norm says, as in the joint loop), the next step size and
    controller history (:meth:`~neuralode.controllers.AdaptiveController.adapt_on_device`), the outputs passed,
    who is done, out of budget or stuck, and ``summary``, the five numbers of the loop's one host read. Pure tensor
    code without a host read: ``compile=True`` runs it as one compiled function (solvers/compiled.py).

    ``n_steps`` counts the steps before this one; ``underflow``: the samples whose step collapsed before it was
    taken; ``at_floor``: whose step is at ``min_step`` (accepted whatever its error, or with ``force_min_step=False``
    judged, and the sample fails if it is rejected). Returns ``(finite, non_finite, stuck, accept, accepted, h_next,
    previous, older, tau_next, new_outputs, done_next, over_budget, underflow, summary)``.
    """
    ratio = error_ratio.to(torch.float64)
    ratio = torch.where(_finite_rows(y1), ratio, torch.full_like(ratio, math.nan))
    finite = torch.isfinite(ratio)
    non_finite = active & ~finite
    stuck = non_finite & at_floor      # at min_step: it cannot shrink, and retrying gives the same NaN
    pinned = at_floor if control.force_min_step else torch.zeros_like(at_floor)
    # (the history is updated by the loop, for the active samples only)
    accept, h_next, remembered, remembered_older = control.adapt_on_device(h, ratio, error_order, previous, older,
                                                                           pinned)
    if not control.force_min_step:
        stuck = stuck | (active & at_floor & ~accept)   # judged at min_step and rejected: the sample fails
    accepted = active & accept
    tau_next = torch.where(accepted, tau1, tau)
    new_outputs = _outputs_passed(taus, tau1, next_out, accepted)
    done_next = (tau_next >= tau_end) | retired
    over_budget = ~done_next & ~stuck & (n_steps + active >= max_num_steps)
    underflow = underflow | stuck
    summary = _summary(new_outputs, done_next, underflow, over_budget, non_finite)
    return (finite, non_finite, stuck, accept, accepted, h_next, remembered, remembered_older, tau_next,
            new_outputs, done_next, over_budget, underflow, summary)


def integrate_per_sample(field, stepper, control, y0, f0, taus, direction, norm, *, step_size=None,
                         linear=False, throw=True, on_step=None, jump=None, record=None, start=None,
                         first_step=None):
    """Integrate every sample of ``y0`` (shape ``(batch, *shape)``) over its own output times.

    ``taus``: internal times ``direction * t``, float64 of shape ``(batch, n)``, increasing rows.
    ``control``: an :class:`~neuralode.controllers.AdaptiveController`, or ``None`` for a fixed step
    ``step_size``. ``linear``: linear interpolation between the steps of a fixed grid (else the method's
    dense output). ``on_step(t0, h, y0, outcome, accepted)`` is called after every attempted step with the
    real start times and signed step sizes (shape ``(batch, 1, ...)``), the start state, the stepper's outcome
    and the accepted mask ``(batch,)`` (the per-sample adjoint accumulates its parameter gradients there).
    ``jump(y, columns, landed)`` (adaptive only): every sample's steps land on each of its output times, and
    there the state of the samples that ``landed`` (mask ``(batch,)``) is replaced by ``jump``'s result
    (``columns``: the index of the output time each sample landed on); the output keeps the value before the
    jump, and the step size carries on across it (the per-sample adjoint's one backward solve).
    ``record(t0, h, tau1, accepted, writes, y)`` is called at the end of every completed iteration with its real
    start times and signed step sizes ``(batch,)``, the internal end times ``tau1`` (exactly, as the output
    placement compared them), the accepted mask, the output writes ``(column, wanted)``
    of shape ``(batch, J)`` (or ``None``) and the state after it: enough to replay the iteration exactly (the
    per-sample checkpoint strategy).
    ``start`` (LongTensor ``(batch,)``, default all 0): the output column each sample starts from, with ``y0``
    its state there; the earlier columns stay NaN (the per-sample adjoint starts a sample that failed forward at
    the last output it reached). ``first_step`` (float64 ``(batch,)``, adaptive only): each sample's first step,
    instead of the controller's ``first_step`` or Hairer's choice.
    Returns ``(outputs (n, batch, *shape), stats, error)``; outputs a sample never reached (after a failure
    with ``throw=False``) are NaN. ``error`` is the first sample's failure, with ``error.sample_status`` the
    status of every sample.
    """
    batch, n = taus.shape
    device = y0.device
    view = (batch,) + (1,) * (y0.ndim - 1)
    samples = torch.arange(batch, device=device)
    # The step's verdict, all samples at once: a compiled stepper brings a compiled one (the same function).
    judge = getattr(stepper, "judge_per_sample", judge_adaptive_step)
    taus = taus.to(device)
    first = torch.zeros(batch, dtype=torch.long, device=device) if start is None else start.to(device)
    tau = taus.gather(1, first.unsqueeze(1)).squeeze(1)
    tau0, tau_end = tau.clone(), taus[:, -1]
    adaptive = control is not None
    max_num_steps = control.max_num_steps if adaptive else math.inf   # a fixed grid is finite
    y, f = y0, f0
    # Every state interpolated at an output time, as rows of (batch * J, *shape) blocks; ``table[k, b]`` is
    # the row that holds output k of sample b (-1: not reached). Row n of the table takes the writes that
    # are not wanted (a sample with fewer outputs in this step than another), so no two writes collide.
    values = [y0]
    n_rows = batch
    table = torch.full((n + 1, batch), -1, dtype=torch.long, device=device)
    table[first, samples] = samples                        # the first output of every sample is y0 (rows 0..batch-1)
    next_out = first + 1
    counts = {name: torch.zeros(batch, dtype=torch.long, device=device)
              for name in ("n_steps", "n_accepted", "n_rejected")}
    done = tau >= tau_end
    if adaptive:
        if first_step is not None:
            h = first_step.to(tau.device)
        elif control.first_step is not None:
            h = torch.full_like(tau, control.first_step)
        else:
            h = _initial_step(field, tau, y, f, direction, stepper.initial_step_order, norm, view)
        previous = torch.full_like(tau, control.initial_history[0])
        older = torch.full_like(tau, control.initial_history[1])
    else:
        n_fixed = _fixed_step_counts(tau0, tau_end, step_size)
        step_index = torch.zeros_like(tau)
        broke_at = torch.full_like(tau, math.nan)   # where a sample's fixed step first went non-finite
    failures = {}   # sample -> its SolverError, in the order they happened
    retired = torch.zeros_like(done)   # samples that failed (throw=False): done for good, whatever their time
    iterations = 0
    non_finite_last = torch.zeros_like(done)   # was a sample's last rejection caused by NaN or inf?
    running = int((~done).sum())
    # A solve that keeps its graph (gradient="direct") must not keep a step whose values are not finite: see below.
    keeps_graph = torch.is_grad_enabled()
    t_first, y_first = direction * tau0, y0.detach()  # where each sample started: the field is finite there

    def step(still, t_start, y, f, h_signed):
        """The step from ``(t_start, y, f)``; the rows ``still`` (if any) stand at their first state."""
        t_in, y_in, f_in = (t_start, y, f) if still is None else standing_still(still, t_first, y_first, t_start,
                                                                                y, f, view)
        if f_in is None:   # (not FSAL: evaluated afresh at the start of every step)
            f_in = field(t_in.view(view), y_in)
        return stepper.step(field, t_in.view(view), y_in, f_in, h_signed.view(view), norm if adaptive else None)

    while running:
        iterations += 1
        active = ~done
        if adaptive:
            h = h.clamp(min=control.min_step, max=control.max_step)
            at_floor = h <= control.min_step
            stop = tau_end if jump is None else taus.gather(1, next_out.clamp_max(n - 1).unsqueeze(1)).squeeze(1)
            reaches_stop = tau + h >= stop
            tau1 = torch.where(reaches_stop, stop, tau + h)
            h_unclipped = h
            h = torch.where(reaches_stop, stop - tau, h)
            underflow = active & ((tau1 <= tau) | (h <= 0))
        else:
            tau1 = torch.where(step_index + 1 >= n_fixed, tau_end, tau0 + (step_index + 1) * step_size)
        tau1 = torch.where(active, tau1, tau)
        h_step = tau1 - tau                                 # 0 for samples that are done
        t_start = direction * tau
        # In a solve that keeps its graph the rows that are done (h = 0, results dropped) keep their part of the
        # graph: a failed sample's state may be where the field overflows, and NaN partial derivatives there times
        # their zero cotangent made every gradient NaN. They stand still at their first state instead.
        outcome = step(~active if keeps_graph and running < batch else None, t_start, y, f, direction * h_step)
        y1 = outcome.y1
        if adaptive:
            (finite, non_finite, stuck, accept, accepted, h_next, remembered, remembered_older, tau_next,
             new_outputs, done_next, over_budget, underflow, summary) = judge(
                control, y1.detach(), outcome.error_ratio, outcome.error_order, h, at_floor, previous, older, active,
                underflow, tau, tau1, taus, next_out, tau_end, retired, counts["n_steps"], max_num_steps)
        else:
            # A fixed grid accepts every finite step. A sample whose step is not finite stops there (it counts as
            # done, its state stays finite): stepping on through NaN would poison every gradient that flows back
            # through its later steps, which backpropagation multiplies by zero only to get NaN.
            accept = _finite_rows(y1.detach())
            non_finite = active & ~accept
            broke_at = torch.where(non_finite & torch.isnan(broke_at), tau, broke_at)
            accepted = active & accept
            tau_next = torch.where(accepted, tau1, tau)
            new_outputs = _outputs_passed(taus, tau1, next_out, accepted)
            done_next = (tau_next >= tau_end) | retired | ~torch.isnan(broke_at)
            over_budget = torch.zeros_like(active)   # (a fixed grid is finite)
            underflow = torch.zeros_like(active)
            summary = _summary(new_outputs, done_next, underflow, over_budget, non_finite)
        if on_step is not None:
            on_step((direction * tau).view(view), (direction * h_step).view(view), y, outcome, accepted)
        counts["n_steps"] += active
        counts["n_accepted"] += accepted
        counts["n_rejected"] += active & ~accept
        # The one host read of the step.
        most_outputs, running, n_underflow, n_over, n_non_finite = summary.tolist()
        if keeps_graph and n_non_finite:
            # The rows this step rejects hold NaN or inf, and so do the partial derivatives in their part of the
            # graph: backpropagation multiplies those by the rows' zero cotangents and gets NaN, in every gradient
            # (a successful solve whose trial step overshot into sqrt of a negative number returned NaN gradients).
            # Taken again with those rows standing still (h = 0 at their first state, where the field is finite;
            # f afresh for a method that is not FSAL), the step keeps the other rows' values and a finite graph.
            # Rare: only steps that met non-finite values.
            h_still = torch.where(non_finite, torch.zeros_like(h_step), h_step)
            outcome = step(~active | non_finite, t_start, y, f, direction * h_still)
            y1 = outcome.y1

        writes = None
        if most_outputs > 0:
            # All outputs this step passed, at once: J = the most any sample passed.
            offsets = torch.arange(most_outputs, device=device)
            column = next_out.unsqueeze(1) + offsets                              # (batch, J)
            wanted = offsets < new_outputs.unsqueeze(1)
            column = torch.where(wanted, column, torch.full_like(column, n))
            value = interpolate_outputs(stepper, field, direction, taus, tau, tau1, h_step, y, outcome, column,
                                        wanted, linear, (tau0, y_first) if keeps_graph else None)
            writes = (column, wanted)
            values.append(value.reshape(batch * most_outputs, *y.shape[1:]))
            rows = n_rows + torch.arange(batch * most_outputs, device=device).view(batch, most_outputs)
            table[column, samples.unsqueeze(1).expand_as(column)] = rows
            n_rows += batch * most_outputs
            columns = next_out
            next_out = next_out + new_outputs

        if record is not None:   # (also for a step that fails below: its outputs were written)
            record(t_start, direction * h_step, tau1, accepted, writes, torch.where(accepted.view(view), y1, y))
        if n_underflow or n_over:
            # One sample's failure is its own: with throw=False it is retired (its later outputs stay NaN) and
            # the others go on, as if each were solved alone.
            for sample in (underflow | over_budget).nonzero()[:, 0].tolist():
                _fail(failures, sample, throw, _sample_failure(
                    sample, bool(underflow[sample]), direction * float(tau[sample]), y[sample], y0[sample],
                    # (a sample stuck at min_step: whether this attempt, not the one before, was not finite)
                    bool((non_finite if adaptive and stuck[sample] else non_finite_last)[sample]), max_num_steps,
                    control.min_step if adaptive and stuck[sample] else None))
            retired = retired | underflow | over_budget
            done_next = done_next | retired
            running = int((~done_next).sum())
        # Advance the samples whose step was accepted; the others keep their state and try again.
        y = torch.where(accepted.view(view), y1, y)
        if outcome.f1 is not None:
            f = torch.where(accepted.view(view), outcome.f1, f)
        else:
            f = None  # not FSAL: evaluated afresh at the start of the next step
        landed = None
        if jump is not None and most_outputs > 0:
            landed = new_outputs > 0
            y = torch.where(landed.view(view), jump(y, columns, landed), y)
            if f is not None:   # the jumped samples' derivative is evaluated afresh
                f = torch.where(landed.view(view), field((direction * tau_next).view(view), y), f)
        tau, done = tau_next, done_next
        if adaptive:
            non_finite_last = torch.where(active, ~finite, non_finite_last)
            h = torch.where(active, h_next, h)
            if landed is not None:   # as in the joint loop: the length proposed before landing carries on
                h = torch.where(landed, torch.maximum(h, h_unclipped), h)
            previous = torch.where(accepted, remembered, previous)
            older = torch.where(accepted, remembered_older, older)
        else:
            step_index = step_index + active

    table = table[:n]
    outputs = torch.cat(values)[table.clamp_min(0)]                                  # (n, batch, *shape)
    if not adaptive:
        broken = ~torch.isnan(broke_at)
        for sample in broken.nonzero()[:, 0].tolist():
            t_bad = direction * float(broke_at[sample])
            _fail(failures, sample, throw, NonFiniteError(
                f"the solution of sample {sample} became NaN or infinite in its fixed step from t={t_bad}; the vector "
                "field blew up or the fixed step is too large for this problem: reduce step_size or use an adaptive "
                "method", t=t_bad))
    # Every output finite (one host read): an output interpolated between finite step ends can still read the field
    # where it is not finite (dopri8's extra stages, or f at a step's end for a Hermite).
    finite = torch.isfinite(outputs.detach().reshape(n, batch, -1)).all(dim=2) | (table < 0)        # (n, batch)
    if not bool(finite.all()):
        for sample in (~finite.all(dim=0)).nonzero()[:, 0].tolist():
            column = int((~finite[:, sample]).int().argmax())
            t_bad = direction * float(taus[sample, column])
            if sample not in failures:
                _fail(failures, sample, throw, NonFiniteError(
                    f"the output of sample {sample} at t={t_bad} is NaN or infinite although its steps' ends are "
                    "finite: the interpolant between them read the vector field where it is not finite. Tighten "
                    "rtol/atol, or give the sample output times its steps can end on", t=t_bad))
            table[column:, sample] = -1                  # its solution ends where it was last finite
    error = _first_failure(failures, batch)
    if error is not None or start is not None:
        missing = (table < 0).view(n, *view)
        outputs = torch.where(missing, torch.full_like(outputs, math.nan), outputs)
    stats = {"nfe": field.nfe, "n_iterations": iterations, **counts}
    return outputs, stats, error
