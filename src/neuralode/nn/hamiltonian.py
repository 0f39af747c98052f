"""Hamiltonian vector fields from learnt energies (Hamiltonian neural networks; torchdyn's ``HNN``).

The state is a pair ``(q, p)`` of tensors of shape ``(N, D)`` (a batch of ``N`` systems), and the dynamics

    dq/dt = dH/dp,    dp/dt = -dH/dq

conserve ``H``. The derivatives come from autograd inside the field; under grad mode they keep their graph
(``create_graph``), so every gradient strategy differentiates the field, parameters included. A separable energy
``H = T(p) + V(q)`` gives a separable field, which the symplectic methods (``method="leapfrog"``, ``"yoshida4"``, ...)
integrate with a bounded energy error and ``gradient="reversible"`` differentiates in constant memory.

References
----------
S. Greydanus, M. Dzamba, J. Yosinski, "Hamiltonian Neural Networks", NeurIPS 2019. https://arxiv.org/abs/1906.01563
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Hamiltonian", "SeparableHamiltonian"]


def _pair(y, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(y, (tuple, list)) or len(y) != 2 or not all(isinstance(x, Tensor) for x in y):
        raise TypeError(f"{name}: the state must be a pair (q, p) of tensors, got {type(y).__name__}; solve from "
                        "y0=(q0, p0)")
    return y[0], y[1]


def _leaf(x: Tensor, differentiable: bool) -> Tensor:
    """``x`` itself where its graph must be kept (grad mode, ``x`` on a graph), else a fresh leaf to differentiate."""
    return x if differentiable and x.requires_grad else x.detach().requires_grad_(True)


def _gradients(value: Tensor, inputs: tuple, differentiable: bool, name: str) -> tuple:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = f"a tensor of dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name}: the energy must be a real floating-point tensor (one value per sample, or their "
                        f"sum), got {got}")
    # (the sum: each sample's energy depends on its own state only, so the gradient of the sum is each one's)
    grads = torch.autograd.grad(value.sum(), inputs, create_graph=differentiable, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


class Hamiltonian(nn.Module):
    """The Hamiltonian field of an energy ``H(q, p)``: ``(dq/dt, dp/dt) = (dH/dp, -dH/dq)``.

    Parameters
    ----------
    energy : callable
        ``energy(q, p) -> H``: one value per sample, shape ``(N,)`` or ``(N, 1)`` (a module, e.g. an MLP of
        ``torch.cat([q, p], -1)``), or a scalar.

    Shape
    -----
    - state ``(q, p)``: two tensors of shape ``(N, D)``; output: the pair of their derivatives.

    A general ``H`` is not separable: integrate it with an ordinary method (``"tsit5"``, ``"dopri5"``); the
    symplectic splitting methods refuse it (their first step checks). For those, use :class:`SeparableHamiltonian`.
    """

    def __init__(self, energy) -> None:
        super().__init__()
        if not callable(energy):
            raise TypeError(f"Hamiltonian(energy): energy must be callable as energy(q, p), got "
                            f"{type(energy).__name__}")
        self.energy = energy

    def forward(self, t, y):
        q, p = _pair(y, "Hamiltonian")
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():
            q, p = _leaf(q, differentiable), _leaf(p, differentiable)
            dh_dq, dh_dp = _gradients(self.energy(q, p), (q, p), differentiable, "Hamiltonian")
        if not differentiable:
            dh_dq, dh_dp = dh_dq.detach(), dh_dp.detach()
        return dh_dp, -dh_dq

    def hamiltonian(self, q: Tensor, p: Tensor) -> Tensor:
        """``H(q, p)`` per sample, to watch its conservation along a solve (``sol.ys``: ``(T, N, D)`` each)."""
        return self.energy(q, p)


class SeparableHamiltonian(nn.Module):
    """The Hamiltonian field of a separable energy ``H = T(p) + V(q)``: ``(dT/dp, -dV/dq)``.

    Parameters
    ----------
    potential : callable
        ``V(q)``: one value per sample (shape ``(N,)`` or ``(N, 1)``) or a scalar.
    kinetic : callable, optional
        ``T(p)``, likewise; default ``|p|^2 / 2`` (unit mass: ``dq/dt = p`` with no autograd).

    The field is separable by construction, so the symplectic methods apply (``method="leapfrog"``, ``"yoshida4"``,
    ``"mclachlan4"``; their first step confirms it), and ``gradient="reversible"`` gives backpropagation's gradient
    in memory that does not grow with the steps.
    """

    def __init__(self, potential, kinetic=None) -> None:
        super().__init__()
        for label, value in (("potential", potential), ("kinetic", kinetic)):
            if value is not None and not callable(value):
                raise TypeError(f"SeparableHamiltonian({label}=...) must be callable, got {type(value).__name__}")
        if potential is None:
            raise TypeError("SeparableHamiltonian(potential): give the potential energy V(q)")
        self.potential, self.kinetic = potential, kinetic

    def forward(self, t, y):
        q, p = _pair(y, "SeparableHamiltonian")
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():
            q_leaf = _leaf(q, differentiable)
            (dv_dq,) = _gradients(self.potential(q_leaf), (q_leaf,), differentiable, "SeparableHamiltonian")
            if self.kinetic is None:
                dt_dp = p
            else:
                p_leaf = _leaf(p, differentiable)
                (dt_dp,) = _gradients(self.kinetic(p_leaf), (p_leaf,), differentiable, "SeparableHamiltonian")
        if not differentiable:
            dv_dq, dt_dp = dv_dq.detach(), dt_dp.detach()
        return dt_dp, -dv_dq

    def hamiltonian(self, q: Tensor, p: Tensor) -> Tensor:
        """``T(p) + V(q)`` per sample (``q``, ``p`` of shape ``(..., D)``)."""
        kinetic = (p * p).sum(-1) / 2 if self.kinetic is None else self.kinetic(p).reshape(p.shape[:-1])
        return kinetic + self.potential(q).reshape(q.shape[:-1])
