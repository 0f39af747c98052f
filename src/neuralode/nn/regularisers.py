"""Kinetic-energy and Jacobian-Frobenius regularisers accumulated during the solve.

Finlay et al. (2020) regularise a neural ODE ``dz/dt = f(t, z)`` on ``[t0, t1]`` with

.. math::

    K = \\int_{t_0}^{t_1} \\lVert f(t, z(t)) \\rVert_2^2 \\, dt, \\qquad
    B = \\int_{t_0}^{t_1} \\lVert \\nabla_z f(t, z(t)) \\rVert_F^2 \\, dt,

which favour straight trajectories travelled at constant speed, and so cheap solves. Both
integrals are computed by the same solve as ``z``: the state is augmented to the tuple
``(z, kinetic, frobenius)`` with

.. math::

    \\frac{d\\,\\mathrm{kinetic}}{dt} = \\lVert f \\rVert^2, \\qquad
    \\frac{d\\,\\mathrm{frobenius}}{dt} = \\lVert \\varepsilon^\\top \\nabla_z f \\rVert^2 ,

where ``eps`` is a Hutchinson probe with ``E[eps eps^T] = I`` drawn once per solve, so that
``E[||eps^T J||^2] = tr(J J^T) = ||J||_F^2``: one vector-Jacobian product per evaluation instead
of ``dim(z)`` of them. The estimate is per sample: the Jacobian of a batched vector field whose
samples do not interact is block diagonal, so one batched probe gives one independent estimate
per sample.

Both quantities are sums over all non-batch dimensions (not means), as in the paper.

References
----------
.. [1] C. Finlay, J.-H. Jacobsen, L. Nurbekyan, A. M. Oberman, "How to train your neural ODE:
   the world of Jacobian and kinetic regularization", ICML 2020. https://arxiv.org/abs/2002.02798
.. [2] M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
   Laplacian smoothing splines", Communications in Statistics - Simulation and Computation, 1990.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from neuralode.nn._checks import one_of

__all__ = ["PROBES", "RegularisedDynamics", "sample_probe", "regularisation_loss"]

PROBES = ("gaussian", "rademacher")


def sample_probe(like: Tensor, kind: str = "gaussian") -> Tensor:
    """Draw a Hutchinson probe with ``E[eps eps^T] = I`` and the shape, dtype, device of ``like``.

    Parameters
    ----------
    like : Tensor
        The state ``z`` of shape ``(N, *)``.
    kind : {"gaussian", "rademacher"}
        Standard normal entries, or entries ``+-1`` with equal probability (smaller variance of
        the trace estimate; Hutchinson's original choice).
    """
    one_of("probe", kind, PROBES)
    if kind == "gaussian":
        return torch.randn_like(like)
    return torch.randint_like(like, 0, 2).mul_(2).sub_(1)


class RegularisedDynamics:
    """Vector field of the augmented state ``(z, kinetic, frobenius)``.

    Not a module: it holds no parameters of its own, only the user's vector field and the probe
    fixed for one solve. Pass the parameters of ``func`` as ``adjoint_params`` when solving with
    ``gradient="adjoint"`` (:class:`~neuralode.nn.ODEBlock` does).

    Parameters
    ----------
    func : callable
        The vector field ``func(t, z) -> dz/dt`` with ``z`` of shape ``(N, *)``.
    probe : Tensor or None
        Hutchinson probe of the shape of ``z``; needed when ``frobenius`` is True.
    kinetic : bool
        Accumulate ``||f||^2`` (otherwise its derivative is zero).
    frobenius : bool
        Accumulate ``||eps^T df/dz||^2`` (otherwise its derivative is zero and no
        vector-Jacobian product is computed).

    Notes
    -----
    The vector-Jacobian product uses ``torch.autograd.grad(..., create_graph=True)`` so that the
    regulariser can itself be differentiated (by the direct strategy or by the adjoint). Gradients
    are enabled inside the call even when the solver runs the forward pass under
    ``torch.no_grad()`` (the adjoint strategy does), since the product needs a graph.
    """

    def __init__(
        self,
        func: Callable[[Tensor, Tensor], Tensor],
        probe: Tensor | None,
        *,
        kinetic: bool = True,
        frobenius: bool = True,
    ) -> None:
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}.")
        if frobenius and probe is None:
            raise ValueError("probe must be a tensor shaped like z when frobenius=True; use sample_probe(z).")
        self.func = func
        self.probe = probe
        # solve(..., compile=True) groups fields by this key: the Frobenius term's autograd.grad cannot be
        # compiled, the kinetic one can, so the two kinds must not share one verdict.
        self.compile_key = (type(self), type(func), kinetic, frobenius)
        self.kinetic = bool(kinetic)
        self.frobenius = bool(frobenius)

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        z = state[0]
        if not self.frobenius:
            f = self.func(t, z)
            dk = f.pow(2).flatten(1).sum(1) if self.kinetic else torch.zeros_like(state[1])
            return f, dk, torch.zeros_like(state[2])
        outer_grad, inference = torch.is_grad_enabled(), in_inference_mode()
        with vjp_mode(inference):
            t, z = graph_inputs(t, z, outer_grad, inference)   # the vjp needs z in a graph
            f = self.func(t, z)
            probe = self.probe.clone() if inference and self.probe.is_inference() else self.probe   # (graph_inputs)
            (eps_jac,) = torch.autograd.grad(f, z, probe, create_graph=True)
            dk = f.pow(2).flatten(1).sum(1) if self.kinetic else torch.zeros_like(state[1])
            dfrob = eps_jac.pow(2).flatten(1).sum(1)
        return f, dk, dfrob


def in_inference_mode() -> bool:
    """Whether ``torch.inference_mode()`` is on (read before :func:`vjp_mode` lifts it; False while torch.compile
    traces, which cannot trace the query and never runs under inference mode)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def vjp_mode(inference: bool):
    """``enable_grad``, which also lifts ``torch.inference_mode()`` when ``inference`` (:func:`in_inference_mode`):
    ``enable_grad`` alone does not, and a vector-Jacobian product inside the field raised "element 0 of tensors does
    not require grad". Otherwise it is ``enable_grad`` itself, which torch.compile traces."""
    return _lifted_inference_mode() if inference else torch.enable_grad()


@contextlib.contextmanager
def _lifted_inference_mode():
    with torch.inference_mode(False), torch.enable_grad():
        yield


def graph_inputs(t: Tensor, z: Tensor, outer_grad: bool, inference: bool) -> tuple[Tensor, Tensor]:
    """``(t, z)`` made usable by ``autograd.grad`` inside a field; call it under :func:`vjp_mode`.

    Without outer gradients (the adjoint's forward pass, evaluation under ``no_grad`` or ``inference_mode``)
    or without a graph on ``z``, nothing outside differentiates through ``z``, so a fresh leaf cuts nothing (and
    a view made under ``no_grad`` may report ``requires_grad=True`` and still not be usable by ``autograd.grad``).
    Tensors made under ``torch.inference_mode()`` (``inference``) can be neither a leaf that requires grad nor saved
    for backward: they are cloned (a clone made outside inference mode is an ordinary tensor).
    """
    if inference:
        if t.is_inference():
            t = t.clone()
        if z.is_inference():
            return t, z.clone().requires_grad_(True)
    if not (outer_grad and z.requires_grad):
        z = z.detach().requires_grad_(True)
    return t, z


def regularisation_loss(model: nn.Module, *, kinetic: float = 0.0, frobenius: float = 0.0) -> Tensor:
    """Weighted regulariser ``kinetic * mean(K) + frobenius * mean(B)`` of a model's last call.

    Sums over every :class:`~neuralode.nn.ODEBlock` inside ``model`` (``model`` itself included)
    the batch means of the values it accumulated during its last forward pass.

    Parameters
    ----------
    model : nn.Module
        A model that contains ODE blocks built with ``kinetic=True`` and/or ``frobenius=True``,
        and whose forward pass has just been run.
    kinetic, frobenius : float, default 0.0
        The weights ``lambda_K`` and ``lambda_J`` of Finlay et al. (2020).

    Returns
    -------
    Tensor
        A 0-dim tensor connected to the graph of the last forward pass.

    Raises
    ------
    ValueError
        If a weight is negative, if no block accumulates a regulariser whose weight is positive,
        or if a block has not been called yet.
    """
    from neuralode.nn.ode_block import ODEBlock  # local: ode_block imports this module

    for name, weight in (("kinetic", kinetic), ("frobenius", frobenius)):
        if not float(weight) >= 0.0:
            raise ValueError(f"{name} must be a non-negative weight, got {weight}.")
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
    total: Tensor | None = None
    for name, weight in (("kinetic", kinetic), ("frobenius", frobenius)):
        if weight == 0.0:
            continue
        enabled = [b for b in blocks if getattr(b, name)]
        if not enabled:
            raise ValueError(
                f"{name}={weight} but no ODEBlock in the model accumulates the {name} regulariser; "
                f"build the block with ODEBlock(..., {name}=True)."
            )
        for block in enabled:
            value = block.kinetic_energy if name == "kinetic" else block.jacobian_frobenius
            if value is None:
                raise ValueError(
                    f"the ODEBlock has no {name} value yet: call the model on a batch before "
                    "regularisation_loss(model, ...)."
                )
            term = weight * value.mean()
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), dtype=param.dtype if param is not None else torch.get_default_dtype(),
                           device=param.device if param is not None else None)
    return total
