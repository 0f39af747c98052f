"""``solve(..., compile=True)``: an explicit Runge-Kutta step compiled into one function by ``torch.compile``.

The eager step of a small field spends most of its time in the dispatch of many small operations
(every stage sum, the error norm, the time tensor, the module calls): measured on one CPU thread, a
dopri5 step of a 2-16-2 MLP takes about 200 us eagerly and about 40 us compiled. Compiling traces
the *same* step as the eager stepper (:meth:`ExplicitRungeKutta.step` with the field inlined and the
error norm included), so there is one definition of the method; only the executor changes.

Design:

- The stepper keeps the eager one's interface and delegates everything but ``step`` to it (dense
  output, checkpoint replay, statistics), so the loop and the gradient strategies see no difference.
- Times and step sizes enter as one float64 tensor, and float tolerances as tensors, inputs of the graph:
  a new step size or tolerance never recompiles (Python floats were tried: ``torch.compile`` specialises
  on them or traces them symbolically, and in torch 2.13 the symbolic path unified a step size with an
  equal-valued start time and returned wrong steps). Shapes, dtypes, devices, grad mode and what the
  trace read of the field are guarded by ``torch.compile`` itself.
- One compiled function per (method, field): functions are keyed by their code object (a lambda
  rebuilt on every call hits the same entry), modules and other callables by their type. Each entry has
  its own code object, so ``torch.compile``'s limit of 8 variants per function is shared only by the
  instances of one field class (or one function), never between unrelated fields. Past the limit the
  instance that hit it runs eagerly, with a warning that names the usual causes.
- If the field cannot be compiled (a graph break under ``fullgraph=True``, a missing C++ compiler, any
  error in tracing), the solve continues eagerly and one ``UserWarning`` says why; the eager step is
  the reference the compiled one is tested against (equal to a few ulps).
- Steps the loop takes with a wrapped field (one-sided limits for ``perturb`` and ``jump_t``) run eagerly.

The adjoint's backward steps are compiled the same way (role ``"adjoint"``: the augmented field with its
vector-Jacobian product, traced with dynamo's ``trace_autograd_ops``). Not compiled: implicit and Adams
methods (their Newton logic branches on the host), the interpolating adjoint's backward steps, and event
location.

The whole loop, for plain solves (:meth:`CompiledRungeKutta.run_loop`): where no graph is recorded (inference,
the adjoint's forward solve) and nothing stops the solve inside the span (no ``step_t``/``jump_t``, events,
callbacks or dense output), the steps, the controller's decision
(:meth:`~neuralode.controllers.AdaptiveController.adapt_on_device`) and the outputs' interpolation run as one
``torch.compile``d ``while_loop``: one call per solve instead of a kernel call, two host reads and the
loop's Python work per step. It takes the eager loop's steps (tested in float64: the same accepted and
rejected steps, evaluations and outputs) and stops before any step whose outcome the eager loop must
report (a step that collapses, the step budget), handing its state over. Where ``while_loop`` cannot trace
a field the solve takes the per-step kernels instead, silently (same results). On a CUDA device the loop's
condition would still be read by the host once per iteration (torch 2.13's ``while_loop``), and the loop is
untested there: it runs on the CPU only (``_LOOP_DEVICES``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import warnings

import torch
import torch.autograd.forward_ad as forward_ad

from ..problem import TIME_RESOLUTION_SPACINGS
from .auto import AutoSwitching
from .rosenbrock import Rosenbrock
from .runge_kutta import ExplicitRungeKutta, StepOutcome

_KERNELS: dict = {}

# The whole-loop kernel runs inside a C++ wrapper (see _CompiledStepper). The tests switch it off where they do not
# test the wrapper itself: it calls the same generated kernels, and its C++ build costs ~7 s per loop compiled.
LOOP_CPP_WRAPPER = True
# (key, instance) -> the reason a field could not be compiled (warned once per field). The verdict is per
# field object for modules and other callables (one instance of a class that cannot be compiled says nothing
# about the others) and per code object for plain functions (a lambda rebuilt per call would otherwise
# be traced, and fail, on every solve).
_BROKEN: dict = {}
# Keys whose field calls torch.autograd.grad (the adjoint's backward dynamics, the Frobenius regulariser):
# torch.compile traces those calls only with ``trace_autograd_ops`` (experimental, hence scoped to those
# kernels, switched on after a first trace says it is needed).
_NEEDS_AUTOGRAD: dict = {}
# Fields whose whole-loop kernel failed to trace (the reason): their solves take one compiled call per step
# instead, silently, since the results are the same.
_LOOP_BROKEN: dict = {}
# Fields warned that a solve under forward-mode AD or a torch.func transform ran eagerly (once per field).
_TRANSFORM_WARNED: set = set()
# Fields warned that one solve compiled the same kernel again and again (once per field).
_RECOMPILE_WARNED: set = set()
# Compilations of one kernel within one solve past which it is a field that changes between steps (a call counter
# self.nfe += 1 is guarded on as a constant): each step then compiles anew, seconds each, until torch.compile's limit
# of 8 variants, silently for a solve of fewer steps. A legitimate solve compiles a kernel at most twice (a first
# step from a y0 without grad aside, no mode or shape changes inside a solve).
_RECOMPILES_PER_SOLVE = 3
# The per-step kernels that inline the field, whose shapes do not change within a solve: the count above applies to
# them. (The per-sample output placement legitimately compiles again within a solve as the number of outputs a step
# passes changes, static then dynamic; counting it stopped every compiled per-sample solve with 200 outputs. The
# whole-loop kernel, static in the outputs still to come, fails quietly to the per-step kernels anyway.)
_FIELD_PARTS = ("step", "per_sample", "linearize")
# (Entering a dynamo setting around every call costs ~16 us a step measured inside a solve, so plain
# kernels run without one. The solver's own floats, times, step and tolerances, enter as tensors: they
# never recompile and are never traced as symbolic floats.) Made on first use: importing neuralode must not
# import torch._dynamo, which is slow and leaves thread-local Python state behind; with it, a gloo process
# group's teardown in a spawned DDP worker deadlocked on the GIL.
_SETTINGS_AUTOGRAD: list = []


def _autograd_settings():
    if not _SETTINGS_AUTOGRAD:
        import torch._dynamo
        _SETTINGS_AUTOGRAD.append(torch._dynamo.config.patch(trace_autograd_ops=True))
    return _SETTINGS_AUTOGRAD[0]


def _field_key(func):
    """Functions by their code (a lambda rebuilt per call is the same field), anything else by its type
    (a module rebuilt per call likewise), or by its own ``compile_key`` attribute where instances of one
    type differ in whether they can be compiled (the regularised dynamics of an ODE block);
    ``torch.compile``'s guards tell instances apart within an entry."""
    key = getattr(func, "compile_key", None)
    if key is not None:
        return key
    code = getattr(func, "__code__", None)
    return code if code is not None else type(func)


def _graphs_compiled() -> int:
    """torch.compile's running count of graphs compiled in this process (a dict read)."""
    import torch._dynamo.utils
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _under_transform() -> bool:
    """Whether the caller runs under forward-mode AD (a dual level) or a ``torch.func`` transform. A compiled
    function cannot be called from either in eager mode: torch.compile refuses "functorch tracing" from outside
    a compiled region, and its autograd Function has no forward-mode rule. Two flag reads, no tensor work (both
    private to torch: read defensively, so a torch without them only loses this check)."""
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _new_kernel(name: str):
    """A fresh function object with its own code object (its own ``torch.compile`` cache)."""
    def kernel(stepper, field, error_norm, times, y0, f0, with_dense):
        t0, h = times.unbind()
        outcome = stepper.step(field.evaluate, t0, y0, f0, h, error_norm)
        if with_dense:
            outcome.coefficients = stepper.dense_coefficients(field.evaluate, t0, y0, h, outcome, outcome.f1)
        return outcome

    code = kernel.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, kernel.__globals__, name)


class _CompiledStepper:
    """What every compiled stepper shares: the eager stepper it stands for, its cached kernels, and the
    fallback to that eager stepper (with one warning per field) when a kernel cannot be traced.

    Parameters
    ----------
    stepper : Solver
        The eager stepper: the definition of the method, and the fallback.
    func : callable
        The user's field (for the cache key only; the step receives the loop's ``VectorField``).
    """

    def __init__(self, stepper, func, role: str, kernels: dict):
        self.eager = stepper
        self.key = (stepper.tableau.name, role, _field_key(func))
        plain_function = getattr(func, "__code__", None) is not None and getattr(func, "compile_key", None) is None
        # (an id is only compared while the object lives: the solve holds the field)
        self.verdict_key = self.key if plain_function else (self.key, id(func))
        self.kernels = {}
        for part, make in kernels.items():
            loop = part == "loop"
            cache_key = (self.key, part, LOOP_CPP_WRAPPER) if loop else (self.key, part)
            kernel = _KERNELS.get(cache_key)
            if kernel is None:
                # The whole-loop kernel: static shapes (with dynamic ones, torch.compile's choice after a second
                # shape, torch 2.13's while_loop fails to trace the field), and a C++ wrapper around the generated
                # kernels (inductor's Python wrapper costs ~30 us an iteration on a tiny field; P3 solve 1.15 ->
                # 0.80 ms; the wrapper's C++ compile adds ~10 s to the first solve with a field).
                # emulate_precision_casts: a float16/bfloat16 field rounds every intermediate to its dtype as eager
                # does (inductor keeps float32 otherwise: bfloat16 per-sample steps and error estimates differed from
                # eager's, gradients 5.8% off a float64 reference against 0.6%); no effect on float32/float64 code.
                options = {"emulate_precision_casts": True, **({"cpp_wrapper": LOOP_CPP_WRAPPER} if loop else {})}
                kernel = torch.compile(make(f"compiled_{stepper.tableau.name}_{part}"), fullgraph=True,
                                       dynamic=False if loop else None, options=options)
                _KERNELS[cache_key] = kernel
            self.kernels[part] = kernel
        self._norm_cache = None
        self._compilations = {}   # part -> kernels compiled during this solve (see _RECOMPILES_PER_SOLVE)
        # A compiled stepper serves one solve, which runs wholly inside a transform or wholly outside: read once
        # here, not at every step.
        self.under_transform = _under_transform()
        if self.under_transform and self.verdict_key not in _TRANSFORM_WARNED:
            _TRANSFORM_WARNED.add(self.verdict_key)
            warnings.warn("compile=True: this solve runs under forward-mode AD or a torch.func transform (jvp, vmap, "
                          "grad, jacrev, ...), which a compiled step cannot be called from; solving it eagerly (same "
                          "results, without the speed-up). Solves outside the transform still compile.", UserWarning,
                          stacklevel=4)

    @staticmethod
    def time_dtype(y0):
        return torch.float32 if y0.device.type == "mps" else torch.float64   # (MPS has no float64)

    def __getattr__(self, name):
        # tableau, order, adaptive, init, statistics, ...: the eager stepper's. (``eager`` itself is missing only
        # on a half-built instance, e.g. inside copy or pickle: no recursion then.)
        if name == "eager":
            raise AttributeError(name)
        return getattr(self.eager, name)

    def usable(self, func) -> bool:
        """Whether this step may run compiled: wrapped fields (one-sided limits, the interpolating adjoint)
        are not compilable, a field that failed to trace stays eager, and so does a solve under a transform."""
        if self.under_transform:   # (not the field's fault: it stays compilable for solves outside the transform)
            return False
        return getattr(func, "compilable", False) and self.verdict_key not in _BROKEN

    def run(self, part: str, arguments: tuple, quiet: bool = False):
        """``kernels[part](*arguments)``, or ``None`` after warning once if it cannot be compiled. ``quiet``: the
        whole-loop kernel, whose failure only means one compiled call per step instead (no warning, and the
        per-step kernels are still tried)."""
        try:
            try:
                return self._call(part, arguments)
            except Exception as error:  # noqa: BLE001
                if self.key in _NEEDS_AUTOGRAD or "trace_autograd_ops" not in str(error):
                    raise
                _NEEDS_AUTOGRAD[self.key] = True
                return self._call(part, arguments)
        except Exception as error:  # noqa: BLE001 - any failure to compile falls back to the eager step
            reason = _reason(error)
            if quiet:
                _LOOP_BROKEN[self.verdict_key] = reason
                return None
            _BROKEN[self.verdict_key] = reason
            warnings.warn(f"compile=True: the step of method {self.key[0]!r} with this vector field could not be "
                          f"compiled ({reason}); solving eagerly instead (same results, without the speed-up)",
                          UserWarning, stacklevel=5)
            return None

    def _call(self, part, arguments):
        graphs = _graphs_compiled()
        if self.key not in _NEEDS_AUTOGRAD:
            result = self.kernels[part](*arguments)
        else:
            with _autograd_settings():
                result = self.kernels[part](*arguments)
        if _graphs_compiled() != graphs:
            self._note_compilation(part)
        return result

    def _note_compilation(self, part):
        if part not in _FIELD_PARTS:
            return
        count = self._compilations[part] = self._compilations.get(part, 0) + 1
        if count < _RECOMPILES_PER_SOLVE:
            return
        # Stop compiling this field (the rest of this solve and later ones run eagerly, the same results): more
        # variants would cost seconds each until torch.compile's limit of 8.
        reason = (f"its {part!r} kernel was compiled {count} times in one solve: something the step reads changes "
                  "from step to step, usually a Python attribute of the field changed on every call (a call counter "
                  "such as self.nfe += 1: guard it with `if not torch.compiler.is_compiling()`, or read "
                  "sol.stats['nfe'])")
        _BROKEN[self.verdict_key] = reason
        if self.verdict_key not in _RECOMPILE_WARNED:
            _RECOMPILE_WARNED.add(self.verdict_key)
            warnings.warn(f"compile=True: the step of method {self.key[0]!r} with this vector field is solved eagerly "
                          f"from here (same results, without the speed-up): {reason}", UserWarning, stacklevel=6)

    def _tensor_tolerances(self, error_norm, y0):
        """The loop's error norm with float tolerances as tensors (inputs of the graph, not constants): a new
        rtol or atol must not recompile. Built once per solve."""
        if error_norm is None:
            return None
        # Shape (1,) rather than 0-dim where the state has a dimension to broadcast against: torch.compile reads a
        # 0-dim float64 CPU input as a symbolic Python float, specialises it late and then traces the whole step a
        # second time ("Restarting analysis due to _tensorify_python_scalars": a few seconds per compilation). A
        # 0-dim state keeps 0-dim tolerances (an in-place product with it cannot grow to (1,)), and that retrace.
        shape = (1,) if y0.dim() > 0 else ()
        cached = self._norm_cache
        if cached is not None and cached[0] is error_norm and cached[2] == shape:
            return cached[1]
        converted = copy.copy(error_norm)
        real = y0.real.dtype if y0.is_complex() else y0.dtype
        for name in ("rtol", "atol"):
            value = getattr(error_norm, name)
            if not isinstance(value, torch.Tensor):   # (tensor tolerances come expanded to the state's shape)
                setattr(converted, name, torch.full(shape, float(value), dtype=real, device=y0.device))
        self._norm_cache = (error_norm, converted, shape)
        return converted


# Devices the compiled loop runs on: the CPU only, the one it is tested and measured on (no GPU was available; on
# CUDA torch 2.13's while_loop reads its condition on the host every iteration, so it would not remove the
# per-step synchronisation there anyway). Elsewhere solves take the per-step kernels.
_LOOP_DEVICES = ("cpu",)
# The compiled loop interpolates every output time at every attempt (masked): outputs x state elements above this
# would cost more than the loop's saved per-step work, so such solves take one compiled call per step instead.
_LOOP_OUTPUT_BUDGET = 1 << 20


class CompiledRungeKutta(_CompiledStepper):
    """An :class:`ExplicitRungeKutta` whose ``step`` runs as one ``torch.compile``d function."""

    def __init__(self, stepper: ExplicitRungeKutta, func, role: str = "forward"):
        # ("per_sample": the same step with one time and step size per batch element, an entry of its own so that
        # its shapes never count against the joint step's variants)
        super().__init__(stepper, func, role, {"step": _new_kernel, "per_sample": _new_kernel,
                                               "judge": _kernel_of("judge_adaptive_step"),
                                               "place": _kernel_of("place_outputs"),
                                               "loop": _new_loop_kernel})
        self.role = role
        self.evaluations = len(stepper._rows)   # field evaluations per step (FSAL: f0 comes in)
        tableau = stepper.tableau
        # The dense output of an FSAL method without extra stages costs no evaluation: the compiled step
        # builds it too (a few fused operations) instead of the loop's eager stack, matrix product and
        # unbind whenever an output time falls inside the step.
        self.with_dense = bool(tableau.fsal and tableau.adaptive and not tableau.extra_c)

    def step(self, func, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float, error_norm, state=None):
        if not self.usable(func):
            return self.eager.step(func, t0, y0, f0, h, error_norm, state)
        if isinstance(t0, torch.Tensor) and t0.ndim > 0:
            # Per-sample stepping (neuralode.per_sample): t0 and h of shape (batch, 1, ..., 1), already tensors.
            part, times = "per_sample", torch.stack((t0, h))
        else:
            # Time and step size as one float64 tensor: inputs of the graph, never constants in it (a Python
            # float would be specialised on, or traced symbolically, which torch.compile does unreliably).
            part, times = "step", torch.tensor((t0, h), dtype=self.time_dtype(y0), device=y0.device)
        if self.with_dense:
            self.eager._dense_matrix(y0.dtype, y0.device)   # its cache filled outside the traced code
        if not torch.is_grad_enabled():
            # requires_grad is guarded on: a derivative evaluated with a graph (the first evaluation of a solve that
            # then steps without one, the checkpoint strategy's recording pass) would compile a variant of its own.
            y0, f0 = y0.detach(), f0.detach()
        elif f0.requires_grad and not y0.requires_grad:
            # The first step of a graph-recording solve from a y0 without grad (parameters with it): every later
            # state requires grad, and requires_grad is part of torch.compile's guards, so this step would be a
            # graph of its own, forward and backward (~6 s of compile on P2). A detached copy that requires grad
            # takes the later steps' graph; its gradient goes nowhere. (No forward-mode tangent to lose: see usable.)
            y0 = y0.detach().requires_grad_()
        outcome = self.run(part, (self.eager, func, self._tensor_tolerances(error_norm, y0), times, y0, f0,
                                  self.with_dense))
        if outcome is None:
            return self.eager.step(func, t0, y0, f0, h, error_norm, state)
        func.nfe += self.evaluations
        return outcome

    def judge_per_sample(self, *arguments):
        """:func:`neuralode.per_sample.judge_adaptive_step` as one compiled function (about 40 small operations of
        the per-sample loop's bookkeeping between a step and its host read)."""
        from ..per_sample import judge_adaptive_step
        with torch.no_grad():   # (decisions only, never differentiated: one variant whatever the grad mode)
            return self._pure("judge", judge_adaptive_step, arguments)

    def place_outputs_per_sample(self, *arguments):
        """:func:`neuralode.per_sample.place_outputs` (the dense output at a step's output times, per sample) as one
        compiled function."""
        from ..per_sample import place_outputs
        return self._pure("place", place_outputs, arguments)

    def _pure(self, part, function, arguments):
        """``function(*arguments)`` through its compiled kernel; eagerly where the step is eager."""
        if self.under_transform or self.verdict_key in _BROKEN:
            return function(*arguments)
        result = self.run(part, arguments)
        return function(*arguments) if result is None else result

    # A replay (the per-sample checkpoint strategy) passes the error norm it does not need, so that its steps take
    # the recording solve's compiled graph instead of compiling one without the error estimate.
    replay_with_norm = True

    def run_loop(self, field, stepping, error_norm, tau: float, y0: torch.Tensor, f0: torch.Tensor, out_taus: list,
                 attempts_left: int, direction: int):
        """Integrate from ``tau`` (internal time) to the end of the span in one compiled call (see
        :func:`_new_loop_kernel`); ``None`` when this solve does not qualify (the eager loop runs it).

        Qualifies: an adaptive FSAL method with its own dense output, a compilable field, no graph to record
        (inference and the adjoint's forward solve), a real floating-point state on the CPU,
        and ``out_taus`` (the output times still to come) strictly increasing. Returns ``(tau, y, f, outputs,
        attempts, accepted)`` with ``outputs`` the values at the ``out_taus`` reached, and leaves ``stepping``
        (step size, error history, the last rejection's cause) where the loop stopped.
        """
        if (self.role != "forward" or not self.with_dense or not self.usable(field)
                or self.verdict_key in _LOOP_BROKEN or y0.requires_grad or f0.requires_grad
                or not y0.is_floating_point() or y0.numel() == 0 or y0.device.type not in _LOOP_DEVICES
                or attempts_left < 1 or not out_taus or any(b <= a for a, b in zip(out_taus, out_taus[1:]))
                or len(out_taus) * y0.numel() > _LOOP_OUTPUT_BUDGET):
            return None
        device = y0.device
        self.eager._dense_matrix(y0.dtype, device)   # its cache filled outside the traced code
        clock = torch.tensor((tau, stepping.h) + stepping.history + (out_taus[-1], float(direction)),
                             dtype=torch.float64, device=device)
        taus = torch.tensor(out_taus, dtype=torch.float64, device=device)
        outputs = y0.new_zeros((len(out_taus),) + tuple(y0.shape))
        limit = torch.tensor(attempts_left, dtype=torch.int64, device=device)
        # (inductor assumes the loop's inputs 16-byte aligned: a state sliced out of a larger tensor is copied)
        y0, f0 = (x.clone() if x.storage_offset() else x for x in (y0, f0))
        carry = self.run("loop", (self.eager, field, self._tensor_tolerances(error_norm, y0),
                                  _tensor_settings(stepping.controller, device), clock, y0, f0, taus, outputs,
                                  limit), quiet=True)
        if carry is None:
            return None
        tau, h, previous, older, non_finite, y, f, outputs, attempts, accepted = carry
        tau, h, previous, older, non_finite, attempts, accepted = torch.stack(
            [tau, h, previous, older, non_finite.double(), attempts.double(), accepted.double()]).tolist()
        stepping.h, stepping.history, stepping.non_finite = h, (previous, older), bool(non_finite)
        field.nfe += self.evaluations * int(attempts)
        reached = sum(1 for x in out_taus if x <= tau)
        return tau, y, f, list(outputs[:reached].unbind(0)), int(attempts), int(accepted)

    def dense_coefficients(self, func, t0: float, y0: torch.Tensor, h: float, outcome, f1: torch.Tensor) -> list:
        if outcome.coefficients is not None:
            return outcome.coefficients
        return self.eager.dense_coefficients(func, t0, y0, h, outcome, f1)


@functools.lru_cache(maxsize=64)
def _tensor_settings(control, device):
    """``control`` (a frozen dataclass: hashed by its settings) with tensor settings, made once per distinct
    controller and device rather than once per solve."""
    return control.with_tensor_settings(device)


def _kernel_of(function_name: str):
    """A maker of fresh compiled entries (see :func:`_new_kernel`) for a pure tensor function of
    :mod:`neuralode.per_sample` (imported when first made: that module sits above this one)."""
    def make(name: str):
        from .. import per_sample
        function = getattr(per_sample, function_name)

        def kernel(*arguments):
            return function(*arguments)

        code = kernel.__code__.replace(co_name=name, co_qualname=name)
        return types.FunctionType(code, kernel.__globals__, name, closure=kernel.__closure__)
    return make


def _new_loop_kernel(name: str):
    """The whole adaptive loop of an explicit FSAL Runge-Kutta method as one ``while_loop``: propose (clipped to
    the end of the span and to min_step/max_step), step, judge on the device
    (:meth:`~neuralode.controllers.AdaptiveController.adapt_on_device`), and write the output times that the
    accepted step covers from its dense output, all without a host read inside the loop.

    ``clock``: float64 ``[tau, h, previous ratio, older ratio, tau_end, direction]`` (internal time ``tau``);
    ``out_taus``: ``(n,)`` internal output times, strictly increasing; ``outputs``: ``(n, *y0.shape)``, filled
    where an accepted step covers the time; ``limit``: attempts allowed. The loop also stops before a step that
    would collapse (``tau1 <= tau``, ``h <= 0``, or a step below the time's resolution): the caller's eager loop
    takes over from the returned state and reports it exactly as it always does.
    """
    def kernel(stepper, field, error_norm, control, clock, y0, f0, out_taus, outputs, limit):
        from torch._higher_order_ops.while_loop import while_loop

        # (clones: the loop's inputs must not be views of one another)
        tau, h, previous, older, tau_end, direction = (x.clone() for x in clock.unbind())
        control = control.with_scalar_settings()
        order = stepper.tableau.error_order or stepper.tableau.order
        out_shape = (-1,) + (1,) * y0.ndim
        not_a_number = float("nan")   # (a name looked up inside the loop's body must not be a global: dynamo)
        resolution = TIME_RESOLUTION_SPACINGS

        def propose(tau, h):
            h = h.clamp(min=control.min_step, max=control.max_step)
            pinned = h <= control.min_step
            clipped = tau + h >= tau_end
            tau1 = torch.where(clipped, tau_end, tau + h)
            return tau1, tau1 - tau, pinned   # (the time advanced, as the eager loop's Proposal)

        def unfinished(tau, h, previous, older, non_finite, y, f, outputs, attempts, accepted_count):
            tau1, h_step, pinned = propose(tau, h)
            # A step below the time's resolution goes to the eager loop, which takes it or, after a rejection, names
            # the collapse (below_time_resolution): handing over is not a failure, so the results stay the eager ones.
            resolved = h.clamp(min=control.min_step, max=control.max_step) >= resolution * (
                torch.nextafter(tau, tau + 1) - tau)
            # So does a step at min_step after a non-finite attempt: it cannot shrink, and the eager loop names it.
            stuck = non_finite & pinned
            return (tau < tau_end) & (attempts < limit) & (tau1 > tau) & (h_step > 0) & resolved & ~stuck

        def attempt(tau, h, previous, older, non_finite, y, f, outputs, attempts, accepted_count):
            tau1, h_step, pinned = propose(tau, h)
            t0, h_signed = direction * tau, direction * h_step
            outcome = stepper.step(field.evaluate, t0, y, f, h_signed, error_norm)
            coefficients = stepper.dense_coefficients(field.evaluate, t0, y, h_signed, outcome, outcome.f1,
                                                      stacked=False)
            # A step counts only if its result is finite (as the eager loop's judge reads it).
            ratio = torch.where(torch.isfinite(outcome.y1.sum()), outcome.error_ratio.to(torch.float64), not_a_number)
            accepted, h_next, previous, older = control.adapt_on_device(h_step, ratio, order, previous, older, pinned)
            covered = (accepted & (out_taus > tau) & (out_taus <= tau1)).reshape(out_shape)
            theta = ((out_taus - tau) / h_step).to(y.dtype).reshape(out_shape)
            dense = coefficients[-1]
            for c in reversed(coefficients[:-1]):
                dense = c + theta * dense
            at_end = (out_taus == tau1).reshape(out_shape)
            outputs = torch.where(covered, torch.where(at_end, outcome.y1, dense), outputs)
            return (torch.where(accepted, tau1, tau), h_next, previous, older, ~torch.isfinite(ratio),
                    torch.where(accepted, outcome.y1, y), torch.where(accepted, outcome.f1, f), outputs,
                    attempts + 1, accepted_count + accepted.to(accepted_count.dtype))

        zero = torch.zeros((), dtype=torch.int64, device=y0.device)
        return while_loop(unfinished, attempt, (tau, h, previous, older,
                                                torch.zeros((), dtype=torch.bool, device=y0.device),
                                                y0, f0, outputs, zero, zero.clone()))

    code = kernel.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, kernel.__globals__, name)


def _new_linearize_kernel(name: str):
    """``(J, df/dt)`` at ``(t0, y0)`` by forward-mode AD: ``J`` dense ``(n, n)`` or per sample ``(batch, m, m)``."""
    def kernel(field, times, y0, batched, with_time):
        t0 = times[0]
        f = lambda y: field.evaluate(t0, y)  # noqa: E731
        if getattr(field, "jac", None) is not None:   # the user's Jacobian (options={"jac": fn}), inlined
            jacobian = field.user_jacobian(t0, y0, "batched" if batched else "dense")
        elif batched:
            # Tangent e_j in every sample at once gives column j of every block (samples are independent).
            m = y0[0].numel()
            # (a contiguous basis in the state's shape: a reshaped view of an expanded tensor inside vmap
            # failed to trace for states of more than two dimensions)
            basis = torch.eye(m, dtype=y0.dtype, device=y0.device)[:, None, :].repeat(1, y0.shape[0], 1)
            basis = basis.reshape((m,) + tuple(y0.shape))
            columns = torch.func.vmap(lambda v: torch.func.jvp(f, (y0,), (v,))[1])(basis)
            jacobian = columns.reshape(m, y0.shape[0], m).permute(1, 2, 0)
        else:
            jacobian = torch.func.jacfwd(f)(y0).reshape(y0.numel(), y0.numel())
        time_derivative = None
        if with_time:
            time_derivative = torch.func.jvp(lambda t: field.evaluate(t, y0), (t0,), (torch.ones_like(t0),))[1]
        return jacobian, time_derivative

    code = kernel.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, kernel.__globals__, name)


def _new_rosenbrock_kernel(name: str):
    """One Rosenbrock step given the linearisation: the LU of ``I - h gamma J``, the stages, ``y1`` and the
    error ratio, and whether the factorisation was usable (``info == 0`` and finite)."""
    def kernel(stepper, field, error_norm, times, y0, f0, jacobian, time_derivative):
        t0, h = times.unbind()
        coefficient = (h * stepper.tableau.gamma).to(jacobian.dtype)
        size = jacobian.shape[-1]
        matrix = torch.eye(size, dtype=jacobian.dtype, device=jacobian.device) - coefficient * jacobian
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        usable = (info == 0).all() & torch.isfinite(lu).all()
        solve_lu = _small_lu_solver(lu, pivots) if size <= _UNROLLED_SIZE else _lu_solver(lu, pivots)

        def solve(rhs):
            return solve_lu(coefficient * rhs)

        us = stepper.increments(field.evaluate, t0, y0, f0, h, solve, time_derivative)
        y1, ratio = stepper.combine(y0, us, error_norm)
        return y1, ratio, us, usable

    code = kernel.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, kernel.__globals__, name)


# Systems of at most this many unknowns (per sample) are solved with the triangular substitutions written out
# as scalar operations, which inductor fuses with the stage around them; larger ones call LAPACK's getrs. Each
# lu_solve is a call of its own (about 8 us on a 3 x 3 system, one thread), eight of them a step: writing
# them out took a compiled rodas5p step on a 3-component problem from 155 to 87 us in a micro-benchmark.
_UNROLLED_SIZE = 8


def _lu_solver(lu, pivots):
    """``b -> M^{-1} b`` from ``lu_factor``'s output; ``b`` shaped like the state (``(n,)`` flattened, or
    ``(batch, ...)`` for per-sample ``(batch, m, m)`` factors)."""
    shape = (lu.shape[0], lu.shape[-1], 1) if lu.ndim == 3 else (lu.shape[-1], 1)

    def solve(b):
        return torch.linalg.lu_solve(lu, pivots, b.reshape(shape)).reshape(b.shape)
    return solve


def _small_lu_solver(lu, pivots):
    """As :func:`_lu_solver`, with the permutation and both triangular substitutions written out (traced code
    for small systems: ``n**2`` scalar operations a solve, fused by inductor)."""
    size = lu.shape[-1]
    permutation, lower, upper = torch.lu_unpack(lu, pivots)    # M = P L U

    def solve(b):
        flat = b.reshape(lu.shape[0], size) if lu.ndim == 3 else b.reshape(size)
        entries = [flat[..., j] for j in range(size)]
        # P^T b, then L y = P^T b (unit diagonal), then U x = y.
        z = [sum(permutation[..., j, i] * entries[j] for j in range(size)) for i in range(size)]
        y = []
        for i in range(size):
            value = z[i]
            for j in range(i):
                value = value - lower[..., i, j] * y[j]
            y.append(value)
        x = [None] * size
        for i in reversed(range(size)):
            value = y[i]
            for j in range(i + 1, size):
                value = value - upper[..., i, j] * x[j]
            x[i] = value / upper[..., i, i]
        return torch.stack(x, -1).reshape(b.shape)
    return solve


class CompiledRosenbrock(_CompiledStepper):
    """A :class:`~neuralode.solvers.rosenbrock.Rosenbrock` method (``jacobian="dense"`` or ``"batched"``) whose
    step runs as two compiled functions: the linearisation (``J`` by ``torch.func.jacfwd``, ``df/dt`` by a
    forward-mode product in ``t``) and the rest of the step (LU, stages, error ratio). A rejected step reuses
    ``J`` and runs only the second, as the eager stepper does.

    The compiled step is used when no graph is recorded (inference, ``torch.no_grad``, the adjoint's forward
    solve) for real floating-point states; a step that must be differentiated (direct backpropagation,
    checkpoint replay), a complex state, and a field whose ``df/dt`` forward-mode AD cannot see (it reads the
    time as a Python number) run the eager step, which is the definition the compiled one is tested against.
    """

    def __init__(self, stepper, func):
        super().__init__(stepper, func, "forward", {"linearize": _new_linearize_kernel,
                                                     "step": _new_rosenbrock_kernel})
        self.evaluations = stepper.tableau.stages - 1     # f0 comes in

    def step(self, func, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float, error_norm, state):
        graph = torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad or state.has_parameters)
        if (graph or not self.usable(func) or y0.numel() == 0 or y0.is_complex() or not y0.is_floating_point()
                or not (state.autonomous or state.forward_time)):
            return self.eager.step(func, t0, y0, f0, h, error_norm, state)
        times = torch.tensor((t0, h), dtype=self.time_dtype(y0), device=y0.device)
        if state.point is not y0 or state.point_t != t0 or state.point_graph:
            linearization = self.run("linearize", (func, times, y0, self.eager.jacobian == "batched",
                                                   not state.autonomous))
            if linearization is None:
                return self.eager.step(func, t0, y0, f0, h, error_norm, state)
            state.jacobian, state.time_derivative = linearization
            state.graph_point = None
            state.point, state.point_t, state.point_graph = y0, t0, False
            state.counters["n_jacobians"] += 1
            func.nfe += 1                   # one (vectorised) evaluation, as the eager Jacobian counts it
            if not state.autonomous:
                state.counters["n_time_derivatives"] += 1
                func.nfe += 1
        result = self.run("step", (self.eager, func, self._tensor_tolerances(error_norm, y0), times, y0, f0,
                                   state.jacobian, state.time_derivative))
        if result is None:
            return self.eager.step(func, t0, y0, f0, h, error_norm, state)
        y1, ratio, us, usable = result
        if not bool(usable):
            return self.eager.singular(y0, h, state)
        state.counters["n_lu"] += 1
        state.system = None       # (the kernel's LU stays inside it)
        func.nfe += self.evaluations
        return StepOutcome(y1, None, ratio, self.eager.error_order, stages=(f0, list(us)), state=state)


def _reason(error: Exception) -> str:
    """A one-line account of why tracing failed, with the likely cause when torch.compile's own words are
    not about the user's code."""
    text = " ".join(str(error).split())
    name = type(error).__name__
    if "RecompileLimit" in name or "recompile_limit" in text or "Hard failure due to fullgraph" in text:
        return (f"{name}: torch.compile reached its limit of variants for this step; the usual causes are a "
                "Python attribute the field changes on every call (a call counter such as self.nfe += 1), many "
                "instances of one field class that differ in Python attributes, or ever-changing shapes")
    return f"{name}: {text[:400]}"


def compiled_stepper(stepper, func, method: str, options=None):
    """The stepper for ``compile=True``: explicit Runge-Kutta methods, Rosenbrock methods with a dense or
    batched Jacobian, and ``auto`` (its phases that can be); a clear error otherwise."""
    if options and options.get("perturb"):
        warnings.warn("compile=True has no effect with options={'perturb': True}: every step evaluates the field "
                      "at one-sided limits through a wrapper, which runs eagerly", UserWarning, stacklevel=3)
    if isinstance(stepper, AutoSwitching):
        # Both phases compiled where they can be: tsit5, and a Rosenbrock stiff method (dense or batched); an
        # ESDIRK or Radau stiff phase (Newton iterates on the host) stays eager.
        stiff = stepper.stiff
        if isinstance(stiff, Rosenbrock) and stiff.jacobian != "krylov":
            stiff = CompiledRosenbrock(stiff, func)
        return dataclasses.replace(stepper, nonstiff=CompiledRungeKutta(stepper.nonstiff, func), stiff=stiff)
    if isinstance(stepper, Rosenbrock):
        if stepper.jacobian == "krylov":
            raise ValueError(f"compile=True supports method {method!r} with options={{'jacobian': 'dense'}} or "
                             "'batched'; the Krylov mode's GMRES iterates on the host: drop compile=True")
        return CompiledRosenbrock(stepper, func)
    if not isinstance(stepper, ExplicitRungeKutta):
        raise ValueError(f"compile=True supports the explicit Runge-Kutta methods (e.g. 'dopri5', 'tsit5', 'rk4'), "
                         f"the Rosenbrock methods ('rodas5', 'rodas5p') and 'auto'; method {method!r} is not one of "
                         "them: drop compile=True or pick such a method")
    return CompiledRungeKutta(stepper, func)


__all__ = ["CompiledRungeKutta", "CompiledRosenbrock", "compiled_stepper"]
