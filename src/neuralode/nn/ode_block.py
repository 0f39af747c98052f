"""``ODEBlock``: a neural ODE as a layer, ``x -> z(t1)`` with ``dz/dt = f(t, z)``, ``z(t0) = x``.

The block holds a learnable vector field and a solve configuration, and calls the public
:func:`neuralode.solve` at every forward pass. It never touches solver internals.

References
----------
.. [1] R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud, "Neural Ordinary Differential
   Equations", NeurIPS 2018. https://arxiv.org/abs/1806.07366
.. [2] E. Dupont, A. Doucet, Y. W. Teh, "Augmented Neural ODEs", NeurIPS 2019.
.. [3] C. Finlay, J.-H. Jacobsen, L. Nurbekyan, A. M. Oberman, "How to train your neural ODE",
   ICML 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neuralode.gradients import STRATEGY_HINT, Adjoint, GradientStrategy, ReversibleAdjoint
from neuralode.options import check_fixed_step_given, check_method, check_options
from neuralode.solve import solve
from neuralode.solvers import Solver
from neuralode.tableaus import ButcherTableau
from neuralode.nn._checks import one_of, time_points, tolerance
from neuralode.nn.augment import augment
from neuralode.nn.regularisers import PROBES, RegularisedDynamics, sample_probe

__all__ = ["GRADIENTS", "ODEBlock", "AugmentedODEBlock"]

GRADIENTS = ("direct", "adjoint", "checkpoint", "reversible")


class ODEBlock(nn.Module):
    """Neural ODE layer: solve ``dz/dt = func(t, z)`` from ``z(t0) = x``.

    Parameters
    ----------
    func : callable
        The vector field, called as ``func(t, z)`` with ``t`` a 0-dim tensor and ``z`` of the
        shape of the input; returns ``dz/dt`` of the same shape. Usually an ``nn.Module`` (then
        its parameters are registered as the block's); a plain callable works too, in which case
        pass ``adjoint_params`` for the adjoint strategy.
    t : pair of floats or 1-D sequence/tensor, default (0.0, 1.0)
        The integration interval ``(t0, t1)``, or output times ``(t0, t1, ..., tn)``, strictly
        increasing or strictly decreasing. The first entry is the start time. Times are kept as
        Python floats and passed to the solver as a float64 tensor on the input's device.
    method : str, ButcherTableau or Solver, default "dopri5"
        A method of :func:`neuralode.solve`. Dormand-Prince 5(4) as in Chen et al. (2018).
    rtol, atol : float, default 1e-3
        Tolerances of adaptive methods. Classifiers need far looser tolerances than the solver's
        defaults (``1e-7``/``1e-9``); ``1e-3`` is the value of the ``torchdiffeq`` MNIST example.
    options : dict, optional
        Solver options, e.g. ``{"step_size": 0.25}`` for a fixed-step method.
    gradient : {"adjoint", "direct", "checkpoint", "reversible"} or strategy object, default "adjoint"
        How :func:`neuralode.solve` differentiates: the adjoint method (memory constant in the
        number of steps; Chen et al. 2018), backpropagation through every step (exact gradient of
        the discretisation; memory grows with the steps), checkpointing, or undoing the steps of a
        reversible method (exact, memory constant; e.g. ``method="reversible_heun"``). A gradient strategy
        object of the solver (e.g. an adjoint with its own backward tolerances) is passed through
        unchanged.
    return_trajectory : bool, default False
        Return the states at all times of ``t`` (shape ``(T, *x.shape)``) instead of the final
        state (shape ``x.shape``).
    adjoint_params : sequence of Tensor, optional
        Tensors to differentiate by the adjoint and checkpoint strategies. Default: the parameters
        of ``func`` (when ``func`` is a module).
    kinetic : bool, default False
        Accumulate the kinetic energy ``int ||f||^2 dt`` of each sample during the solve
        (Finlay et al. 2020); read it from :attr:`kinetic_energy` after the call.
    frobenius : bool, default False
        Accumulate a Hutchinson estimate of ``int ||df/dz||_F^2 dt`` of each sample; read it from
        :attr:`jacobian_frobenius`.
    probe : {"gaussian", "rademacher"}, default "gaussian"
        Distribution of the Hutchinson probe, drawn once per forward pass.
    compile : bool, default False
        Compile each solver step with ``torch.compile`` (``solve(..., compile=True)``; explicit
        Runge-Kutta and Rosenbrock methods; at inference on the CPU the whole adaptive loop). The first
        call compiles (seconds); later calls reuse it.
    per_sample : bool, default False
        Step every sample of the batch on its own (``solve(..., per_sample=True)``): its own step sizes,
        so one hard input no longer sets the steps (and the cost) of the whole batch, and a sample's
        output does not depend on its batch. ``func`` then receives ``t`` of shape ``(N,)``; the
        time-concatenating layers of :mod:`neuralode.nn` accept it. Explicit Runge-Kutta methods, every
        gradient strategy, ``compile=True``, no regularisers.

    Attributes
    ----------
    nfe_forward : int or None
        Vector-field evaluations of the last forward solve (``Solution.stats["nfe"]``).
    nfe_backward : int or None
        Evaluations of the backward solve of the last call (``Solution.stats["nfe_backward"]``),
        available once ``backward()`` has run through an adjoint solve; ``None`` before that, and
        for strategies that do not report it.
    kinetic_energy, jacobian_frobenius : Tensor of shape (N,) or None
        Regulariser values of the last call, integrated from ``t[0]`` to ``t[-1]``, connected to
        the graph; combine them into a loss with :func:`neuralode.nn.regularisation_loss`.
    last_stats : dict or None
        The ``Solution.stats`` dict of the last call (updated in place by an adjoint backward).

    Shape
    -----
    - input: ``(N, *)``, any floating dtype.
    - output: ``(N, *)``, or ``(T, N, *)`` with ``return_trajectory=True``.

    Notes
    -----
    The regularisers make the solved state the tuple ``(z, kinetic, frobenius)``; the solver's
    error control then also sees the two integrals, which is what Finlay et al. do too.
    Regularisers need the input to have a batch dimension first (values are per sample).
    """

    def __init__(
        self,
        func: Callable[[Tensor, Tensor], Tensor],
        t: Sequence[float] | Tensor = (0.0, 1.0),
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        options: Mapping[str, Any] | None = None,
        gradient: str | Any = "adjoint",
        return_trajectory: bool = False,
        adjoint_params: Sequence[Tensor] | None = None,
        kinetic: bool = False,
        frobenius: bool = False,
        probe: str = "gaussian",
        compile: bool = False,
        per_sample: bool = False,
    ) -> None:
        super().__init__()
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}.")
        self.func = func  # registered as a submodule when it is an nn.Module
        self.times = time_points("t", t)
        if not isinstance(method, (str, ButcherTableau, Solver)):
            raise TypeError(f"method must be a str such as 'dopri5' or 'rk4', a ButcherTableau or a "
                            "neuralode.solvers.Solver (e.g. ReversibleRungeKutta('tsit5')), got "
                            f"{type(method).__name__}.")
        self.method = method
        self.rtol = tolerance("rtol", rtol)
        self.atol = tolerance("atol", atol)
        if self.rtol == 0.0 and self.atol == 0.0:
            raise ValueError("rtol and atol are both zero: no step could meet that tolerance; give a positive one.")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict such as {{'step_size': 0.1}}, got {type(options).__name__}.")
        self.options = dict(options) if options is not None else None
        # An unknown method or an option it does not take fails here, where the block is built, rather than at
        # the first forward pass (possibly after data loading, inside a training loop).
        spec = check_method(method)
        check_options(spec, self.options)
        check_fixed_step_given(spec, self.options, "the block's times")
        if isinstance(gradient, str):
            if gradient not in GRADIENTS:
                raise ValueError(f"gradient must be one of {list(GRADIENTS)}, got {gradient!r}; {STRATEGY_HINT}")
        elif not isinstance(gradient, GradientStrategy):
            raise TypeError(
                f"gradient must be one of {list(GRADIENTS)} or a gradient strategy object such as "
                f"neuralode.Adjoint(rtol=1e-4), got {type(gradient).__name__}."
            )
        elif isinstance(gradient, Adjoint):
            gradient.check_forward_method(spec, method, self.options)   # here, not at the first forward pass
        if (gradient == "reversible" or isinstance(gradient, ReversibleAdjoint)) and not getattr(
                spec.make_stepper(self.options or {}), "reversible", False):
            raise ValueError(f"gradient='reversible' needs a reversible method ('reversible_heun', 'alf' or "
                             f"neuralode.solvers.ReversibleRungeKutta('tsit5')), got method {spec.name!r}")
        self.gradient = gradient
        self.return_trajectory = bool(return_trajectory)
        if isinstance(adjoint_params, Tensor):
            # (as in solve: one tensor is one parameter; tuple() would split it into row views the field never
            # uses, whose gradient is zero, so the tensor would train with a zero gradient)
            adjoint_params = (adjoint_params,)
        elif adjoint_params is not None:
            adjoint_params = tuple(adjoint_params)
            for i, p in enumerate(adjoint_params):
                if not isinstance(p, Tensor):
                    raise TypeError(f"adjoint_params[{i}] must be a Tensor, got {type(p).__name__}.")
        self._adjoint_params = adjoint_params
        self.kinetic = bool(kinetic)
        self.frobenius = bool(frobenius)
        self.probe = one_of("probe", probe, PROBES)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {type(compile).__name__}.")
        # (not ``self.compile``: that would hide nn.Module.compile)
        self.compile_step = compile
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be True or False, got {type(per_sample).__name__}.")
        if (kinetic or frobenius) and getattr(spec.make_stepper(self.options or {}), "needs_terms", False):
            raise ValueError(f"the regularisers (kinetic, frobenius) wrap the field to accumulate their integrals, and "
                             f"method {spec.name!r} (IMEX) needs the SplitField itself: drop the regularisers, or use "
                             "another method (e.g. 'kvaerno5' on the same SplitField, which any method solves whole)")
        if per_sample and (kinetic or frobenius):
            raise ValueError("per_sample=True does not combine with the regularisers (kinetic, frobenius); drop one "
                             "of them.")
        self.per_sample = per_sample
        self.last_stats: dict[str, Any] | None = None
        self.kinetic_energy: Tensor | None = None
        self.jacobian_frobenius: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The regulariser values of the last call are graph tensors, which deepcopy and pickle
        # reject; a copy starts without them (as after construction).
        state = super().__getstate__()
        state = dict(state)
        state["kinetic_energy"] = None
        state["jacobian_frobenius"] = None
        return state

    # ------------------------------------------------------------------ counters
    @property
    def nfe_forward(self) -> int | None:
        """Vector-field evaluations of the last forward solve, or ``None`` before the first call."""
        return None if self.last_stats is None else int(self.last_stats["nfe"])

    @property
    def nfe_backward(self) -> int | None:
        """Vector-field evaluations of the last backward solve (adjoint), or ``None``."""
        if self.last_stats is None or "nfe_backward" not in self.last_stats:
            return None
        return int(self.last_stats["nfe_backward"])

    @property
    def regularised(self) -> bool:
        """Whether the block accumulates a regulariser during the solve."""
        return self.kinetic or self.frobenius

    # ------------------------------------------------------------------ solve
    def _solve_adjoint_params(self) -> tuple[Tensor, ...] | None:
        # Explicit, because the regularised dynamics wrap ``func`` in a plain callable.
        if self._adjoint_params is not None:
            return self._adjoint_params
        if isinstance(self.func, nn.Module):
            return tuple(self.func.parameters())
        return None

    @property
    def t(self) -> tuple:
        """The integration times, as given (``(t0, t1)`` or the output times); assignable, and checked as at
        construction (torchdyn users set ``model.t_span``: an attribute that nothing read was ignored)."""
        return self.times

    @t.setter
    def t(self, value) -> None:
        self.times = time_points("t", value)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor of shape (N, *), got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}; cast it with x.float().")
        if self.regularised and x.dim() < 2:
            raise ValueError(
                f"x must have a batch dimension first and features after it, shape (N, D, ...), for the regularisers; "
                f"got {tuple(x.shape)}."
            )
        # Times in float64 (the solver hands func the time in the state's dtype); MPS has no float64.
        time_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        t = torch.tensor(self.times, dtype=time_dtype, device=x.device)
        if self.regularised:
            probe = sample_probe(x, self.probe) if self.frobenius else None
            func = RegularisedDynamics(self.func, probe, kinetic=self.kinetic, frobenius=self.frobenius)
            zeros = x.new_zeros(x.shape[0])
            y0: Tensor | tuple[Tensor, ...] = (x, zeros, zeros.clone())
        else:
            func = self.func
            y0 = x
        solution = solve(
            func,
            y0,
            t,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            options=self.options,
            gradient=self.gradient,
            adjoint_params=self._solve_adjoint_params(),
            compile=getattr(self, "compile_step", False),  # (modules pickled before the option: False)
            per_sample=getattr(self, "per_sample", False),
        )
        # Keep the dict itself: an adjoint backward updates it in place with "nfe_backward".
        self.last_stats = solution.stats
        ys = solution.ys
        if self.regularised:
            ys, kinetic, frob = ys
            # The solve accumulates the integrals from t0 to t1: negative when time runs backwards, and a
            # regulariser is a size (Finlay et al. integrate over |dt|), so the sign of the span is divided out.
            sign = 1.0 if self.times[-1] > self.times[0] else -1.0
            self.kinetic_energy = sign * kinetic[-1] if self.kinetic else None
            self.jacobian_frobenius = sign * frob[-1] if self.frobenius else None
        return ys if self.return_trajectory else ys[-1]

    def extra_repr(self) -> str:
        parts = [
            f"t={self.times}",
            f"method={self.method!r}",
            f"rtol={self.rtol:g}",
            f"atol={self.atol:g}",
            f"gradient={self.gradient!r}",
        ]
        if self.options:
            parts.append(f"options={self.options}")
        if self.return_trajectory:
            parts.append("return_trajectory=True")
        if self.compile_step:
            parts.append("compile=True")
        if getattr(self, "per_sample", False):
            parts.append("per_sample=True")
        if self.regularised:
            parts.append(f"kinetic={self.kinetic}, frobenius={self.frobenius}, probe={self.probe!r}")
        return ", ".join(parts)


class AugmentedODEBlock(ODEBlock):
    """ODE block that first appends ``augment_dim`` zeros to its input (Dupont et al., 2019).

    Equivalent to ``nn.Sequential(Augment(augment_dim, dim), ODEBlock(func, ...))``; ``func``
    must act on the augmented state. The output keeps the augmented dimensions, as in the paper
    (the classifier head reads all of them).

    Parameters
    ----------
    func : callable
        Vector field on the augmented state, e.g. ``ConcatLinear(d + augment_dim, ...)``.
    augment_dim : int
        Number of zero features (vectors) or channels (images, sequences) to append.
    dim : int, default 1
        Dimension to augment: features of ``(N, D)`` or channels of ``(N, C, *)``.
    **kwargs
        The other arguments of :class:`ODEBlock`.

    Shape
    -----
    - input: ``(N, D)`` or ``(N, C, *)``.
    - output: ``(N, D + augment_dim)`` or ``(N, C + augment_dim, *)`` (with a leading ``T`` for
      ``return_trajectory=True``).
    """

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], augment_dim: int, *, dim: int = 1, **kwargs: Any) -> None:
        super().__init__(func, **kwargs)
        from neuralode.nn._checks import axis, positive_int

        self.augment_dim = positive_int("augment_dim", augment_dim, allow_zero=True)
        self.augment_axis = axis("dim", dim)   # (int() took True and "1")

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor of shape (N, *), got {type(x).__name__}.")
        augmented = augment(x, self.augment_dim, self.augment_axis)
        try:
            return super().forward(augmented)
        except (RuntimeError, ValueError) as error:
            from neuralode._errors import add_note
            from neuralode.problem import FIRST_EVALUATION_NOTE

            notes = [*getattr(error, "__notes__", ()), str(error)]
            if any(FIRST_EVALUATION_NOTE in note for note in notes):
                # the usual mistake: a field built for the input's width, not the augmented one
                width = x.shape[self.augment_axis]   # augment() has checked the axis
                add_note(error, f"AugmentedODEBlock: func acts on the augmented state, {width} + augment_dim="
                                f"{self.augment_dim} = {augmented.shape[self.augment_axis]} along dim "
                                f"{self.augment_axis} (input {tuple(x.shape)}, state {tuple(augmented.shape)})")
            raise

    def extra_repr(self) -> str:
        return f"augment_dim={self.augment_dim}, dim={self.augment_axis}, " + super().extra_repr()
