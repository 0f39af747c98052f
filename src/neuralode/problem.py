"""Checks and normalises the inputs of a solve: every bad-input error is raised here.

After :func:`make_problem` the rest of the package can rely on: a 1-D strictly monotone float
tensor of times without NaN, a floating or complex state (tuple and PyTree states flattened into one vector),
tolerances that are non-negative and broadcastable to the state, and a vector field whose first
evaluation has the state's shape and dtype.

Time: the loop keeps times as Python floats (float64). The vector field receives ``t`` as a 0-dim
tensor in the *state's* real dtype on the state's device, so a float32 model never sees a float64
tensor that would silently promote its activations.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils._pytree as pytree

from ._errors import NonFiniteError, NonFiniteInputError, add_note
from ._numbers import real_number

_NUMBER = (int, float)


# A step a rejection shrank below this many spacings of the float64 time has collapsed (scipy's solve_ivp:
# "Required step size is less than spacing between numbers", at 10 spacings, after a rejection). Without it a solve
# that meets NaN just past its state (f = log(y - c) as y reaches c) crawled on by one or two ulps a step: kvaerno5
# took its 100,000 steps (110 s) to a MaxStepsError where the other methods stopped with a NonFiniteError at once.
# (The compiled loop hands such a step to the eager loop; the per-sample loop, explicit methods only, has no rule.)
TIME_RESOLUTION_SPACINGS = 10


def below_time_resolution(tau: float, h: float) -> bool:
    """Is the (unclipped) step ``h`` from internal time ``tau`` too short for float64 time to resolve?"""
    return h < TIME_RESOLUTION_SPACINGS * (math.nextafter(tau, math.inf) - tau)


def next_after(t: float, towards: float, dtype: torch.dtype) -> float:
    """The neighbour of ``t`` towards ``towards`` *in the dtype the vector field sees its time in*.

    A one-sided limit (``perturb``, ``jump_t``) taken in float64 and then rounded to a float32 (or
    half) time tensor lands back on ``t`` itself, so the nudge is computed in that dtype. ``t`` is first
    rounded to the dtype, so the result is strictly on the ``towards`` side of what ``t`` looks like
    to the field.
    """
    here = torch.tensor(t, dtype=dtype)
    return float(torch.nextafter(here, torch.tensor(towards, dtype=dtype)))


# The dtype policy. Half-precision states are integrated in float32 arithmetic: the loop's state,
# stage sums and error estimates are float32, while the user's field is called with y (and t) in the
# user's dtype and its result is converted to float32. Rounding the state to float16 or bfloat16 after
# every step would stall it (an increment below 2**-11 or 2**-8 of |y| vanishes: bfloat16 y' = -y
# stayed at 0.789 from t = 0.5 on) and drown the error estimate in rounding noise. Outputs are
# returned in the user's dtype, and rtol is raised to at least that dtype's machine epsilon, the
# best relative accuracy its outputs can carry.
COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


class StateStructure:
    """How the user's state maps onto the loop's flat vector, and back.

    Three kinds: ``"tensor"`` (the state is one tensor), ``"tuple"`` (a flat tuple or list of tensors,
    torchdiffeq's tuple states, given back as a tuple) and ``"tree"`` (any PyTree of tensors that
    ``torch.utils._pytree`` flattens: dicts, nested tuples and lists, named tuples; diffrax's PyTree states).
    ``leaves`` takes a value of the user's structure (``func``'s result) to its tensors in ``y0``'s order; ``build``
    the reverse. A tree is flattened *up to* ``y0``'s structure, so a dict returned with its keys in another order
    still lines up (JAX sorts dict keys; torch keeps their order).
    """

    def __init__(self, kind: str, spec=None, labels=()):
        self.kind = kind
        self.spec = spec          # the TreeSpec of a "tree" state
        self.labels = labels      # each tensor's place in the structure, as "[0]" or "['x'][1]"

    def leaves(self, value) -> tuple:
        if self.kind == "tensor":
            return (value,)
        if self.kind == "tuple":
            return value
        try:
            return self.spec.flatten_up_to(value)
        except (ValueError, TypeError):   # (torch's message names neither structure)
            raise TypeError(f"func returned {_describe_value(value)} but y0 has the structure {self.describe()}; "
                            "return the derivative in y0's structure at every call (the same containers and keys, "
                            "one tensor per state tensor)") from None

    def build(self, parts):
        if self.kind == "tensor":
            return parts[0]
        if self.kind == "tuple":
            return tuple(parts)
        return pytree.tree_unflatten(list(parts), self.spec)

    def describe(self) -> str:
        """The structure as ``{'x': *, 'v': (*, *)}``, each ``*`` a tensor."""
        return "a tensor" if self.kind == "tensor" else pytree.treespec_pprint(self.spec)


TENSOR = StateStructure("tensor")
TUPLE = StateStructure("tuple")


def _describe_value(value) -> str:
    """A returned value's structure, for an error that compares it with y0's."""
    try:
        return pytree.treespec_pprint(pytree.tree_structure(value))
    except Exception:  # noqa: BLE001 - a description only; an object torch cannot flatten is named by its type
        return type(value).__name__


class FieldWithArgs(torch.nn.Module):
    """``func(t, y, args)`` (diffrax's and torchode's signature) as the ``func(t, y)`` the solvers call.

    An ``nn.Module``, so that a module ``func`` keeps its parameters (the gradient strategies' default); its step
    callbacks (``callback_step``, ...) are looked up on ``func``. ``args`` is any object, passed as it is; tensors in
    it that require grad get gradients under every strategy (:func:`neuralode.solve` adds them to the adjoint's
    parameters).
    """

    def __init__(self, func, args):
        super().__init__()
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y, args), got {type(func).__name__}")
        if not takes_arguments(func, 3):
            raise TypeError("args= was given, so func is called as func(t, y, args), but it does not take three "
                            "arguments; add the third (def func(t, y, args)), or leave args out and close over "
                            "what func needs")
        from .split_field import SplitField
        if isinstance(func, SplitField):   # (its forward takes any arguments: its terms are what is called)
            for label, term in (("explicit", func.explicit), ("implicit", func.implicit)):
                if not takes_arguments(term, 3):
                    raise TypeError(f"args= was given, so the SplitField's {label} term is called as {label}(t, y, "
                                    "args), but it does not take three arguments; add the third to every term, or "
                                    "leave args out and close over what the terms need")
        self.func = func
        self.args = args
        # one compiled-kernel cache entry per wrapped field (solvers/compiled.py keys fields by type otherwise)
        self.compile_key = ("with args", getattr(func, "compile_key", None) or getattr(func, "__code__", None)
                            or type(func))

    def forward(self, t, y):
        return self.func(t, y, self.args)

    def __getattr__(self, name):
        if name.startswith("callback_"):   # step callbacks are the user's func's
            return getattr(self.__dict__.get("func") or self._modules["func"], name)
        return super().__getattr__(name)


class VectorField:
    """``func(t, y)`` adapted to the loop: float time in, flat state in and out, NFE counted.

    ``user_dtype`` is the dtype ``func`` sees and returns; ``compute_dtype`` that of the loop's state
    (they differ only for half precision, see :data:`COMPUTE_DTYPE`).
    """

    def __init__(self, func, shapes, numels, time_dtype, device, user_dtype=None, compute_dtype=None,
                 structure=None):
        self.func = func
        self.shapes = shapes
        self.structure = structure if structure is not None else (TUPLE if shapes is not None else TENSOR)
        self.numels = numels
        self.time_dtype = time_dtype
        self.device = device
        self.user_dtype = user_dtype
        self.compute_dtype = compute_dtype
        self.cast = user_dtype is not None and compute_dtype is not None and user_dtype != compute_dtype
        # Whether func's result is converted to the loop's dtype: for half-precision states, and for a field
        # under torch.autocast, which returns the autocast dtype for a float32 state (see check_derivative).
        self.cast_output = self.cast
        self.nfe = 0

    compilable = True   # ``evaluate`` accepts a tensor time: a compiled step may inline it (solvers/compiled.py)
    jac = None          # the user's Jacobian, options={"jac": fn} (read by solvers/linear.py and the compiled step)
    jac_checked = False   # compared once with the field's own derivative (check_user_jacobian)

    def user_jacobian(self, t, y: torch.Tensor, mode: str) -> torch.Tensor:
        """``jac(t, y)`` as the implicit and Rosenbrock steppers hold J: ``(n, n)`` over the flat state (``"dense"``)
        or ``(batch, m, m)`` per sample (``"batched"``), in the loop's dtype. A dense J may also come shaped
        ``(*y.shape, *y.shape)`` (row-major, as the flat state)."""
        value = self.jac(self.time(t), self.callback_view(y))
        n = y.numel()
        if mode == "dense":
            shapes = {(n, n), tuple(y.shape) * 2} if self.shapes is None else {(n, n)}
            expected = f"({n}, {n})"
        else:
            m = y[0].numel() if y.ndim else 1
            shapes, expected = {(y.shape[0], m, m)} if y.ndim else set(), f"(batch, {m}, {m})"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"option 'jac' returned {type(value).__name__}; it must return the Jacobian df/dy as a "
                            f"tensor of shape {expected}")
        if tuple(value.shape) not in shapes:
            structured = " over the flattened state (the tensors of y0 in order)" if self.shapes is not None else ""
            raise ValueError(f"option 'jac' returned shape {tuple(value.shape)}; with jacobian={mode!r} it must be "
                             f"{expected}{structured}, J[i, j] = d f_i / d y_j")
        value = value.reshape((n, n) if mode == "dense" else value.shape).to(y.dtype)
        if not self.jac_checked:
            self.jac_checked = True
            check_user_jacobian(self, t, y, value, mode)
        return value

    def time(self, t) -> torch.Tensor:
        if isinstance(t, torch.Tensor):  # a stage time computed in float64 inside a compiled step
            return t.to(self.time_dtype)
        return torch.scalar_tensor(t, dtype=self.time_dtype, device=self.device)

    def unflatten(self, y: torch.Tensor):
        if self.shapes is None:
            return y
        if self._one_dimensional and not torch.compiler.is_compiling():
            # Vectors only: one split gives the parts in their shapes, with no view each (about 3 us apiece on the CPU):
            # an evaluation of a pair of 3-vectors' field took 17.5 us against 26.3 us with slices and views.
            return self.structure.build(torch.split(y, self.numels))
        # (slices rather than torch.split: dynamo fails on split inside the compiled loop's while_loop body)
        offsets = itertools.accumulate(self.numels, initial=0)
        return self.structure.build(tuple(y[start:start + numel].view(shape)
                                          for start, numel, shape in zip(offsets, self.numels, self.shapes)))

    @functools.cached_property
    def _one_dimensional(self) -> bool:
        return all(len(shape) == 1 for shape in self.shapes)

    def callback_view(self, y: torch.Tensor):
        """The state as step callbacks receive it: the user's shapes and dtype."""
        return self.unflatten(y.to(self.user_dtype) if self.cast else y)

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.evaluate(t, y)

    def evaluate_leaves(self, t: float, leaves) -> list:
        """``func`` at a state given as its tensors (``y0``'s order and shapes, the loop's dtype), returning the
        derivative's tensors the same way; counted. For a stepper that keeps the parts of a tuple state apart (the
        symplectic methods): no concatenation into the flat state and split out of it at each evaluation."""
        self.nfe += 1
        if self.cast:
            leaves = [x.to(self.user_dtype) for x in leaves]
        out = self.structure.leaves(self.func(self.time(t), self.structure.build(tuple(leaves))))
        for index, (value, shape) in enumerate(zip(out, self.shapes)):
            # (the stepper adds each tensor to its part: a shape that changed along the solve would broadcast there)
            if not isinstance(value, torch.Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"func(t, y) returned {got} for the state's tensor {index} (in y0's order) at "
                                 f"t={float(t)!r}, which has shape {tuple(shape)}: return dy/dt of each tensor in its "
                                 "shape, at every call")
        return [o.to(self.compute_dtype) for o in out] if self.cast_output else list(out)

    def evaluate(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """Like calling, but not counted (gradient strategies count their own evaluations)."""
        if self.cast:
            y = y.to(self.user_dtype)
        if self.shapes is None:
            out = self.func(self.time(t), y)
        else:
            leaves = self.structure.leaves(self.func(self.time(t), self.unflatten(y)))
            # (vectors are concatenated as they are: a reshape costs about 2 us a tensor)
            out = torch.cat(leaves if self._one_dimensional else [o.reshape(-1) for o in leaves])
        return out.to(self.compute_dtype) if self.cast_output else out

    def term(self, name: str):
        """One term, ``"explicit"`` or ``"implicit"``, of a :class:`~neuralode.SplitField` ``func`` as a field of its
        own (the same conversions; each call counted in this field's ``nfe`` and the term's own), or ``None`` when
        ``func`` is no SplitField. The user's ``jac`` (``options={"jac": ...}``) is the implicit term's Jacobian here:
        the IMEX methods' Newton iteration reads that term's alone."""
        terms = self.__dict__.get("_terms")
        if terms is None:
            from .split_field import split_terms
            split, args = split_terms(self.func)
            terms = {}
            for label in (("explicit", "implicit") if split is not None else ()):
                view = object.__new__(TermField)
                view.__dict__.update(self.__dict__)
                part = getattr(split, label)
                view.func = part if args is None else FieldWithArgs(part, args)
                view.whole, view.label, view.nfe = self, label, 0
                view.jac = self.jac if label == "implicit" else None
                terms[label] = view
            self._terms = terms
        return terms.get(name)


class TermField(VectorField):
    """A term of a :class:`~neuralode.SplitField` as the loop's field (:meth:`VectorField.term`)."""

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.whole.nfe += 1
        self.nfe += 1
        return self.evaluate(t, y)

    def term(self, name: str):
        return None


@dataclass(frozen=True, eq=False, kw_only=True)
class Problem:
    """A normalised initial value problem (internal), immutable and built by keyword; a changed copy is made
    with :func:`dataclasses.replace`."""

    field: VectorField
    y0: torch.Tensor                 # flat if the user's state is a tuple or a PyTree
    f0: torch.Tensor | None          # func(t[0], y0), already checked (None: the loop evaluates it)
    t: torch.Tensor                  # the user's output times (1-D)
    times: list                      # the same, as Python floats
    direction: int                   # +1 forward, -1 backward in time
    shapes: list | None              # per-tensor shapes of a tuple or PyTree state
    rtol: float | torch.Tensor
    atol: float | torch.Tensor
    method: str = ""                 # set by solve(); gradient strategies reuse it
    spec: object = None              # the method's MethodSpec (set by solve(); the adjoint's default backward method)
    controller: object = None        # the controller object given to solve(), if any (the adjoint's default)
    backward: object = None          # the adjoint's parsed backward settings (options.BackwardSettings)
    f0_time: float | None = None     # where f0 was evaluated: times[0], or just after it (one-sided limit)

    def unflatten_trajectory(self, ys: torch.Tensor):
        """(T, n) flat trajectory -> (T, *shape) or a tuple of those, in the user's dtype."""
        if self.field.cast:
            ys = ys.to(self.field.user_dtype)
        if self.shapes is None:
            return ys
        parts = torch.split(ys, self.field.numels, dim=1)
        return self.field.structure.build(tuple(p.reshape(ys.shape[0], *s) for p, s in zip(parts, self.shapes)))


def _check_state(y0):
    """The state's tensors and its :class:`StateStructure`; raises TypeError for anything else."""
    if isinstance(y0, torch.Tensor):
        parts, structure = (y0,), TENSOR
    elif type(y0) in (tuple, list) and len(y0) > 0 and all(isinstance(p, torch.Tensor) for p in y0):
        parts = tuple(y0)
        structure = StateStructure("tuple", pytree.tree_structure(parts), tuple(f"[{i}]" for i in range(len(parts))))
    else:
        try:
            with_paths, spec = pytree.tree_flatten_with_path(y0)
        except Exception:  # noqa: BLE001 - any failure to flatten means y0 is no PyTree torch knows
            with_paths, spec = [], None
        if spec is None or spec.is_leaf():
            raise TypeError(f"y0 must be a torch.Tensor, a tuple of tensors or a PyTree of tensors (dicts, nested "
                            f"tuples and lists), got {type(y0).__name__}; wrap numbers with "
                            "torch.tensor(..., dtype=torch.float64)")
        if not with_paths:
            raise TypeError(f"y0 is an empty {type(y0).__name__}: the state needs at least one tensor")
        for path, leaf in with_paths:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"y0{pytree.keystr(path)} is a {type(leaf).__name__}, not a tensor; every leaf of "
                                "a PyTree state must be a tensor (wrap numbers with torch.tensor(..., "
                                "dtype=torch.float64), and keep constants out of y0: close over them in func)")
        parts = tuple(leaf for _, leaf in with_paths)
        structure = StateStructure("tree", spec, tuple(pytree.keystr(path) for path, _ in with_paths))
    is_tuple = structure is not TENSOR
    for p, label in zip(parts, structure.labels or ("",)):
        name = f"y0{label}"
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"{name} has dtype {p.dtype}; the state must be floating point or complex. "
                            f"Convert it, e.g. {name}.to(torch.float32)")
        if p.dtype == torch.complex32:
            raise TypeError(f"{name} has dtype complex32, which the solvers do not support (PyTorch has "
                            f"few complex32 kernels); convert it, e.g. {name}.to(torch.complex64)")
    if is_tuple:
        kind = "tuple" if structure.kind == "tuple" else "PyTree"
        dtypes = {p.dtype for p in parts}
        devices = {p.device for p in parts}
        if len(dtypes) > 1:
            raise TypeError(f"the tensors of a {kind} y0 must share one dtype, got {sorted(map(str, dtypes))}; "
                            "convert them to a common dtype")
        if len(devices) > 1:
            raise ValueError(f"the tensors of a {kind} y0 are on different devices {sorted(map(str, devices))}; "
                             "move them to one device")
    return parts, structure


def check_times(t, y_device, name="t") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of times, got {type(t).__name__}; "
                        f"use torch.tensor([...], dtype=torch.float64)")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; times must be floating point, e.g. {name}.double()")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}; pass the output times as a flat "
                         f"tensor, e.g. {name}.reshape(-1)")
    if t.numel() < 1:
        raise ValueError(f"{name} is empty; give at least the start time")
    if t.device != y_device:
        raise ValueError(f"{name} is on {t.device} but y0 is on {y_device}; move them to the same device, "
                         f"e.g. {name}.to(y0.device)")
    return t


def check_monotone(times: list, name="t") -> int:
    if any(math.isnan(x) for x in times):
        raise ValueError(f"{name} contains NaN; every output time must be a finite number")
    if any(math.isinf(x) for x in times):
        raise ValueError(f"{name} contains an infinite value; every output time must be finite")
    if len(times) < 2:
        return 1
    diffs = [b - a for a, b in zip(times, times[1:])]
    if all(d > 0 for d in diffs):
        return 1
    if all(d < 0 for d in diffs):
        return -1
    raise ValueError(f"{name} must be strictly increasing or strictly decreasing (no repeats); "
                     f"sort it and remove duplicates, e.g. torch.unique({name})")


def _check_tolerance(name, tol, parts, structure, real_dtype, device):
    def one(value, shape, label):
        # (numpy scalars, arrays and lists of numbers too, as torchdiffeq takes them: an array or a list is one
        # tolerance per element of the state, like a tensor)
        if isinstance(value, (np.ndarray, list, tuple)):
            try:
                value = torch.as_tensor(value, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{label} must be a float or a tensor, got a {type(value).__name__} that is not "
                                "numbers") from None
        elif not isinstance(value, torch.Tensor):
            number = real_number(value)
            value = value if number is None else number
        if isinstance(value, bool) or not isinstance(value, (*_NUMBER, torch.Tensor)):
            raise TypeError(f"{label} must be a float or a tensor, got {type(value).__name__}")
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                raise ValueError(f"{label} must not require grad; pass {label}.detach()")
            try:
                torch.broadcast_shapes(value.shape, shape)
            except RuntimeError:
                raise ValueError(f"{label} has shape {tuple(value.shape)}, which does not broadcast to the state "
                                 f"shape {tuple(shape)}; give a float or a tensor of the state's shape") from None
            if torch.broadcast_shapes(value.shape, shape) != shape:
                raise ValueError(f"{label} has shape {tuple(value.shape)}, which would change the state shape "
                                 f"{tuple(shape)}; give a float or a tensor of the state's shape")
            if not torch.isfinite(value).all() or (value < 0).any():
                raise ValueError(f"{label} must be finite and non-negative everywhere")
            return value.to(dtype=real_dtype, device=device).expand(shape)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{label}={value} is invalid; tolerances must be finite and non-negative")
        return float(value)

    if structure.kind == "tuple":
        values = tol if isinstance(tol, (tuple, list)) else (tol,) * len(parts)
        if len(values) != len(parts):
            raise ValueError(f"{name} has {len(values)} entries but y0 has {len(parts)} tensors; give one per tensor "
                             "or a single float")
    elif structure.kind == "tree" and isinstance(tol, (tuple, list, dict)):
        # one tolerance per tensor, in y0's structure (a dict's keys in any order)
        try:
            values = structure.spec.flatten_up_to(tol)
        except (ValueError, TypeError):
            raise ValueError(f"{name} has the structure {_describe_value(tol)} but y0 has {structure.describe()}; "
                             f"give a single float, or one tolerance per tensor in y0's structure") from None
    elif structure.kind == "tree":
        values = (tol,) * len(parts)
    if structure.kind != "tensor":
        checked = [one(v, p.shape, f"{name}{label}") for v, p, label in zip(values, parts, structure.labels)]
        if all(isinstance(c, float) for c in checked) and len(set(checked)) == 1:
            return checked[0]
        return torch.cat([(torch.full(p.shape, c, dtype=real_dtype, device=device) if isinstance(c, float)
                           else c).reshape(-1) for c, p in zip(checked, parts)])
    return one(tol, parts[0].shape, name)


def check_other_tolerance(name: str, tol, y0, problem: Problem):
    """A second tolerance for the state ``y0`` of ``problem`` (the adjoint's backward ``rtol``/``atol``),
    checked and normalised as :func:`make_problem` checks ``rtol`` and ``atol``: broadcast to the state (one
    per tensor of a tuple state), finite and non-negative. Returns a float or a tensor of the state's size."""
    parts, structure = _check_state(y0)
    real_dtype = problem.y0.real.dtype if problem.y0.is_complex() else problem.y0.dtype
    return _check_tolerance(name, tol, parts, structure, real_dtype, problem.y0.device)


def make_problem(func, y0, t, rtol, atol, *, right_limit_at=()) -> Problem:
    """Validate and normalise ``(func, y0, t, rtol, atol)``; evaluates ``func`` once at ``t[0]``.

    ``right_limit_at``: discontinuities of ``func`` (``jump_t``), or ``None`` for "everywhere"
    (``perturb=True``). If ``t[0]`` is one, ``func`` is evaluated at the one-sided limit just after
    ``t[0]`` (in the direction of integration) instead, so that it is never called at a time the user
    asked to avoid. ``Problem.f0_time`` records where it was evaluated.
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    parts, structure = _check_state(y0)
    device = parts[0].device
    t = check_times(t, device)   # (also: t and y0 on one device)
    if device.type == "meta":
        raise ValueError("y0 and t are on the 'meta' device, whose tensors hold no values, so there is nothing to "
                         "solve (the steps depend on the values); give y0 and t on 'cpu' or 'cuda'")
    times = t.detach().double().cpu().tolist()
    direction = check_monotone(times)
    real_dtype = parts[0].real.dtype if parts[0].is_complex() else parts[0].dtype
    user_dtype = parts[0].dtype
    compute_dtype = COMPUTE_DTYPE.get(user_dtype, user_dtype)
    compute_real_dtype = COMPUTE_DTYPE.get(real_dtype, real_dtype)
    rtol = _check_tolerance("rtol", rtol, parts, structure, compute_real_dtype, device)
    atol = _check_tolerance("atol", atol, parts, structure, compute_real_dtype, device)
    if compute_dtype != user_dtype:
        floor = torch.finfo(user_dtype).eps
        rtol = max(rtol, floor) if isinstance(rtol, float) else rtol.clamp_min(floor)
    if structure is not TENSOR:
        shapes = [p.shape for p in parts]
        numels = [p.numel() for p in parts]
        flat_y0 = torch.cat([p.reshape(-1) for p in parts])
    else:
        shapes, numels, flat_y0 = None, None, parts[0]
    flat_y0 = flat_y0.to(compute_dtype)
    if not bool(torch.isfinite(flat_y0).all()):
        raise NonFiniteInputError("y0 contains NaN or infinite values; the initial state must be finite")
    warn_below_resolution(rtol, atol, flat_y0, compute_real_dtype)
    warn_time_rounding(rtol, t.dtype, real_dtype, max(abs(times[0]), abs(times[-1])), abs(times[-1] - times[0]))
    field = VectorField(func, shapes, numels, real_dtype, device, user_dtype, compute_dtype, structure)
    right_limit = right_limit_at is None or times[0] in right_limit_at
    f0_time = next_after(times[0], times[0] + direction, real_dtype) if right_limit else times[0]
    f0 = _first_evaluation(func, field, flat_y0, parts, structure, f0_time)
    return Problem(field=field, y0=flat_y0, f0=f0, t=t, times=times, direction=direction, shapes=shapes, rtol=rtol,
                   atol=atol, f0_time=f0_time)


def warn_time_rounding(rtol, times_dtype: torch.dtype, field_time_dtype: torch.dtype, largest: float,
                       span: float, stacklevel: int = 5) -> None:
    """Warn when ``func`` sees the times rounded far more coarsely than the tolerance: it receives ``t`` in the
    state's dtype, so float64 times far from 0 with a float32 state lose digits that the user gave (y' = cos t on
    [1e4, 1e4 + 10] in float32: an error of 1.3e-3 at rtol 1e-6; torchode passes float64 times and got 1.7e-6).
    Only where the offset dominates the span (|t| > 100 x span) and only if this conversion narrows the times, so
    the usual t in [0, T] stays quiet; float tolerances only."""
    if not isinstance(rtol, float) or not (span > 0) or largest <= 100 * span:
        return
    if not (times_dtype.is_floating_point and field_time_dtype.is_floating_point):
        return
    eps = torch.finfo(field_time_dtype).eps
    if eps <= torch.finfo(times_dtype).eps or largest * eps <= rtol * span:
        return
    warnings.warn(f"func receives t in {str(field_time_dtype).replace('torch.', '')} (the state's dtype), whose "
                  f"spacing near |t| = {largest:.3g} is {largest * eps:.3g}: coarse for a span of {span:.3g} at "
                  f"rtol={rtol:.3g}, so the field sees rounded times. Shift time to start at 0 (solve on [0, "
                  f"{span:.3g}] and add the offset inside func in float64), or solve in float64", UserWarning,
                  stacklevel=stacklevel)


def warn_below_resolution(rtol, atol, y0: torch.Tensor, dtype: torch.dtype) -> None:
    """Warn when ``rtol`` and ``atol`` ask for far more digits than ``dtype`` holds at ``y0``'s scale: rounding alone
    then fails the error test, and an adaptive solve crawls to its step budget (a float32 MLP at rtol = atol =
    1e-14 took 100,000 steps and a minute before its MaxStepsError said so). The line is eps / 100: a float32 MLP
    field (2-32-2) took 5, 8, 24, 161 and 1,624 dopri5 steps on [0, 1] at rtol = atol = 1e-7 ... 1e-11, so
    torchdiffeq's default rtol = 1e-7, just under float32's eps, is fine. Float tolerances only (tensor ones
    would cost a read of the device); ``y0`` is read only when rtol is that small."""
    if not (isinstance(rtol, float) and isinstance(atol, float)):
        return
    line = torch.finfo(dtype).eps / 100
    if rtol >= line or y0.numel() == 0:
        return
    scale = float(y0.detach().abs().max())   # (a y0 that requires grad: no warning from torch about the read)
    if atol < line * scale:
        warnings.warn(f"rtol={rtol:.3g} and atol={atol:.3g} ask for far more digits than "
                      f"{str(dtype).replace('torch.', '')} holds (eps {torch.finfo(dtype).eps:.3g}; the state's scale "
                      f"{scale:.3g}): rounding alone can fail the error test, and an adaptive solve may then take tiny "
                      "steps until it runs out of them. Loosen rtol and atol, or solve in float64", UserWarning,
                      stacklevel=5)


def check_derivative(label: str, value, shape, dtype, shape_hint: str = "") -> bool:
    """``func``'s first result must be a tensor of the state's shape and dtype; the error names what differs.

    One exception: under ``torch.autocast`` a floating-point field returns the autocast dtype (float16 or
    bfloat16) for a float32 state. That is accepted, and True is returned: the caller converts every result to
    the state's dtype, so the state, stage sums and error estimate stay in full precision, as mixed-precision
    training keeps its accumulations (torchdiffeq's arithmetic promotes the same way).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{label} returned {type(value).__name__}; it must return a tensor shaped like the state")
    if value.shape != shape:
        raise ValueError(f"{label} returned shape {tuple(value.shape)} but the state has shape {tuple(shape)}; "
                         f"dy/dt must have exactly the state's shape{shape_hint}")
    if value.dtype == dtype:
        return False
    if value.is_floating_point() and dtype.is_floating_point and value.dtype == _autocast_dtype(value.device.type):
        return True
    raise TypeError(f"{label} returned dtype {value.dtype} but the state has dtype {dtype}; make the "
                    "vector field compute in the state's dtype (e.g. model.to(y0.dtype))")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast computes in on this device type now, or None (autocast off, or a device type
    autocast does not know, such as meta)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def takes_arguments(func, count: int) -> bool:
    """Whether ``func`` can be called with ``count`` positional arguments (a module: its ``forward``); True where the
    signature cannot be read (a builtin: the call will tell)."""
    target = func.forward if isinstance(func, torch.nn.Module) else func
    try:
        inspect.signature(target).bind(*([None] * count))
    except TypeError:
        return False
    except ValueError:
        return True
    return True


FIRST_EVALUATION_NOTE = "neuralode: raised by the first evaluation"


def _first_evaluation(func, field, flat_y0, parts, structure, t0):
    """Evaluate ``func`` once and check what it returns, so a wrong shape fails here and clearly."""
    try:
        out = func(field.time(t0), structure.build(parts))
    except TypeError as error:
        if takes_arguments(func, 2):
            raise
        if takes_arguments(func, 3):
            raise TypeError("func takes three arguments, as diffrax's f(t, y, args), but solve was given no args: pass "
                            "solve(..., args=...) (args=None means no args), or drop the third argument") from error
        # torchdyn calls a field of the state alone (f(x)); here a field is always called f(t, y)
        name = type(func).__name__ if isinstance(func, torch.nn.Module) else getattr(func, "__name__", "func")
        raise TypeError(f"func is called as func(t, y), but {name} does not take two arguments ({error}); for a "
                        "field of the state alone wrap it: neuralode.nn.Autonomous(module), or "
                        "lambda t, y: f(y)") from error
    except (RuntimeError, ValueError) as error:
        # torch's shape errors name matrix sizes, not the state: say which call and which state it was
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        add_note(error, f"{FIRST_EVALUATION_NOTE} func(t0, y0), with y0 of shape {shapes} ({parts[0].dtype}): "
                        "the field must accept the state's shape and return a derivative of the same shape")
        raise
    field.nfe += 1
    got = _derivative_leaves(out, parts, structure)
    for g, e, label in zip(got, parts, structure.labels or ("",)):
        if check_derivative(f"func(t, y){label}", g, e.shape, e.dtype):
            field.cast_output = True
    f0 = torch.cat([g.reshape(-1).to(field.compute_dtype) for g in got]) if structure is not TENSOR else got[0]
    f0 = f0.to(field.compute_dtype) if field.cast_output else f0
    if not bool(torch.isfinite(f0).all()):
        raise NonFiniteError(f"func(t, y0) returned non-finite values at t={t0}: the vector field is NaN or "
                             "infinite at the initial state", t=t0)
    return f0


def _derivative_leaves(out, parts, structure) -> tuple:
    """``func``'s first result as one tensor per state tensor, or an error that compares its structure with y0's."""
    if structure.kind == "tensor":
        return (out,)
    if structure.kind == "tuple":
        if not isinstance(out, (tuple, list)):
            raise TypeError(f"func returned a {type(out).__name__} but y0 is a tuple of {len(parts)} tensors; "
                            "return a tuple with one derivative per state tensor")
        if len(out) != len(parts):
            raise ValueError(f"func returned {len(out)} tensors for a state of {len(parts)}; return one "
                             "derivative per state tensor")
        return tuple(out)
    try:
        return tuple(structure.leaves(out))
    except (ValueError, TypeError):
        raise TypeError(f"func returned {_describe_value(out)} but y0 has the structure {structure.describe()}; "
                        "return the derivative in y0's structure (the same containers and keys, one tensor per "
                        "state tensor)") from None


def check_user_jacobian(field, t, y: torch.Tensor, jacobian: torch.Tensor, mode: str) -> None:
    """Compare the user's Jacobian once with the field's own derivative along one direction: ``J v`` against a
    Jacobian-vector product (forward-mode AD, or a central difference where the field has no forward-mode rules).
    A wrong J is never silent: Newton's methods would only converge slower, but a Rosenbrock step is wrong by it
    (rodas5 ended 130x its tolerance with 5% of a term left out, with status success)."""
    y = y.detach()
    generator = torch.Generator(device="cpu").manual_seed(0)
    real = y.real.dtype if y.is_complex() else y.dtype
    direction = torch.randn(y.shape, generator=generator, dtype=real).to(device=y.device, dtype=y.dtype)
    direction = direction * (y.abs() + y.abs().max().clamp_min(1.0) * 1e-3)   # scaled like the state
    if mode == "dense":
        given = (jacobian.detach() @ direction.reshape(-1)).reshape(y.shape)
    else:
        given = (jacobian.detach() @ direction.reshape(y.shape[0], -1, 1)).reshape(y.shape)
    eps = torch.finfo(real).eps
    with torch.no_grad():
        try:
            _, exact = torch.func.jvp(lambda x: field.evaluate(t, x), (y,), (direction,))
            allowed = 1e-6 if eps < 1e-10 else 1e-3
        except Exception:  # noqa: BLE001 - a field without forward-mode rules: a central difference instead
            step = eps ** (1 / 3)
            exact = (field.evaluate(t, y + step * direction) - field.evaluate(t, y - step * direction)) / (2 * step)
            allowed = 1e-4 if eps < 1e-10 else 1e-2
    scale = float(exact.abs().max()) + float(given.abs().max())
    error = float((given - exact).abs().max())
    if not (error <= allowed * max(scale, 1e-300)):
        raise ValueError(f"option 'jac' disagrees with the vector field's derivative at t={float(t):.6g}: along a "
                         f"random direction v, |J v - df/dy v| = {error:.3g} against |df/dy v| ~ {scale / 2:.3g}. "
                         "Check the "
                         "Jacobian (J[i, j] = d f_i / d y_j over the flattened state); an inexact J makes a Rosenbrock "
                         "step wrong (not only slower), so it is refused")
