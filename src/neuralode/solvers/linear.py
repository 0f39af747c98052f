"""Jacobians and the linear systems of implicit methods.

An implicit Runge-Kutta step with ``s`` coupled stages solves, inside Newton's iteration, systems with
the *iteration matrix*

    M = I - C (x) J,        C = h A_implicit  (s x s),      J = df/dy at (t, y),

where ``(x)`` is the Kronecker product over stages (``s = 1`` and ``C = h gamma`` for a diagonally
implicit stage). Three ways to hold ``J``, chosen by ``options={"jacobian": ...}``:

``"dense"``
    ``J`` of the flattened state, ``(n, n)``, from ``n`` vector-Jacobian products batched with
    ``vmap``; ``M`` is LU-factorised once and reused (Hairer and Wanner, Solving ODEs II, Sec. IV.8).
``"batched"``
    For a state ``(batch, ...)`` whose samples evolve independently: one ``(m, m)`` block per sample
    (``m`` = numel of one sample), from only ``m`` vector-Jacobian products whatever the batch size
    (the cotangent ``e_i`` is put in every sample at once), and a batched LU. Cost and memory grow
    linearly with the batch instead of quadratically.
``"krylov"``
    Matrix-free: ``M v`` from Jacobian-vector products (reverse mode twice over, see :class:`Linearization`) and
    GMRES (Saad and Schultz 1986), optionally right-preconditioned by the user. Nothing of size
    ``n^2`` is ever formed, so states of 10^5-10^6 unknowns fit in memory.

With ``s > 1`` coupled stages (Radau IIA, Gauss) the dense and batched modes do not factorise the
``(s n) x (s n)`` matrix ``M`` as it stands. ``C`` is diagonalised once, ``C = T diag(d) T^{-1}``, so that

    M = (T (x) I) (I - diag(d) (x) J) (T^{-1} (x) I),

and ``M x = r`` splits into ``s`` independent ``n x n`` systems ``(I - d_k J) w_k = [(T^{-1} (x) I) r]_k``
with ``x = (T (x) I) w`` (Hairer and Wanner, Solving ODEs II, Sec. IV.8, "Linear systems"; Butcher 1976).
For a real ``J`` and a complex-conjugate pair ``d_k, conj(d_k)`` the partner's solution is the
conjugate, so one complex LU serves the pair: the three-stage Radau IIA (one real eigenvalue, one pair)
needs one real and one complex ``n x n`` LU instead of one real ``3n x 3n`` LU, about 5x fewer
operations (a complex LU costs four real ones) and 3x less memory (see :class:`TransformedSystem`).
We transform by the eigenvalues of ``C = h A`` itself rather than of ``A^{-1}`` as RADAU5 does: the
blocks are the same up to the factor ``d_k``, and a singular ``A`` (an explicit first stage) needs no
special case. A stage matrix that is not diagonalisable, or only with an ill-conditioned ``T``, keeps
the coupled LU (:class:`DenseSystem`, :class:`BatchedSystem`), and so do small systems, where a dozen
more tensor operations per solve cost more than the smaller LUs save (``_TRANSFORM_MIN_WORK``).

``create_graph=True`` keeps the Jacobian differentiable (a Rosenbrock step backpropagates through it).
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

JACOBIAN_MODES = ("dense", "batched", "krylov")


# --- Jacobians ---------------------------------------------------------------------------------------

def _pullback_rows(fn: Callable, y: torch.Tensor, basis: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``basis[k] @ d fn / d y`` for every ``k``: one batched backward pass, or a loop if vmap fails.

    ``create_graph``: the rows stay differentiable (w.r.t. ``y`` when it requires grad, and the tensors
    ``fn`` captures): a Rosenbrock step backpropagates through its Jacobian. Otherwise they are detached.
    """
    # (inference mode lifted: a solve run under torch.inference_mode had every row zero, J = 0, and stiff
    # methods crawled: rodas5p took 1,719 steps for y' = -50 y instead of 39)
    lift = torch.inference_mode(False) if torch.is_inference_mode_enabled() or y.is_inference() else nullcontext()
    with lift, torch.enable_grad():
        if create_graph and y.requires_grad:
            y_in = y
        else:
            y_in = (y.clone() if y.is_inference() else y.detach()).requires_grad_(True)
        out = fn(y_in)
        rows = None
        if out.requires_grad:            # else f does not depend on y (e.g. f(t, y) = g(t))
            try:
                # (retain_graph: if vmap fails part-way, the per-row loop below needs the graph again)
                (rows,) = torch.autograd.grad(out, y_in, basis, create_graph=create_graph, is_grads_batched=True,
                                              retain_graph=True, allow_unused=True)
            except (RuntimeError, NotImplementedError):
                # vmap cannot run some user code (data-dependent control flow, .item()): one pass per row.
                parts = [torch.autograd.grad(out, y_in, b, retain_graph=True, create_graph=create_graph,
                                             allow_unused=True)[0] for b in basis]
                rows = None if parts[0] is None else torch.stack(parts)
    if rows is None:
        return torch.zeros((basis.shape[0],) + y.shape, dtype=y.dtype, device=y.device)
    if not create_graph:
        rows = rows.detach()
    # For complex states autograd's vector-Jacobian product is conj(e_i^T J) (PyTorch's convention for
    # holomorphic functions): conjugate back so the rows are those of J itself.
    return rows.conj() if rows.is_complex() else rows


def positive_scale(scale: torch.Tensor, all_zero: float) -> torch.Tensor:
    """``scale`` (the error norm's ``atol + rtol |y|``) with its zeros raised to its smallest positive entry.

    With ``atol = 0`` a component at exactly 0 has no scale: weighed like the most demanding other component, it
    neither divides by zero nor is neglected. Every entry zero (a state at rest at 0): ``all_zero`` everywhere
    (Newton: ``tiny``, so that only rounding passes; GMRES, whose test is relative: 1, i.e. unscaled).
    """
    if bool((scale > 0).all()):
        return scale
    positive = scale[scale > 0]
    return scale.clamp_min(float(positive.min()) if positive.numel() else all_zero)


def is_holomorphic(func: Callable, t: float, y: torch.Tensor) -> bool:
    """Whether ``func(t, .)`` is complex-differentiable at a complex ``y``: one evaluation, two pullbacks.

    A field that uses ``conj(y)``, ``|y|``, ``.real`` or ``.imag`` is ``f = A dy + B conj(dy)`` to first order
    with ``B != 0``; it has no complex Jacobian, and the ``J`` built from pullbacks is wrong for it. Autograd's
    pullback is ``v -> A^H v + B^T conj(v)``, complex-linear in ``v`` exactly when ``B = 0``, so pulling back
    ``v`` and ``i v`` tells them apart (up to rounding for a holomorphic ``f``; by O(|B|) otherwise).
    """
    n = y.numel()
    k = torch.arange(n, dtype=torch.float64)
    # A fixed, generic cotangent (no draw from the global generator, which the caller's training owns).
    v = torch.complex(torch.cos(k + 1.0), torch.sin(2.0 * k + 1.0)).to(dtype=y.dtype, device=y.device)
    v = v.reshape(y.shape)
    with torch.enable_grad():
        y_in = y.detach().requires_grad_(True)
        out = func(t, y_in)
        if not out.requires_grad:
            return True
        pulled = [torch.autograd.grad(out, y_in, w, retain_graph=True, allow_unused=True)[0] for w in (v, 1j * v)]
    if pulled[0] is None:
        return True
    eps = torch.finfo(y.real.dtype).eps
    size = pulled[0].abs() + pulled[1].abs()
    # Componentwise, against the rounding of that component's own pullbacks (16 eps; plus eps of the mean for
    # components whose pullback is ~0): a total over all components let a stiff complex-differentiable term
    # (i c Lap(y) of a Schroedinger equation) hide an O(1) |y|^2 y in complex64. A conj term below ~1e2 eps of
    # the stiff part is missed, and weighs about as much as rounding does.
    bound = 16 * eps * size + eps * size.mean()
    return bool(((pulled[1] - 1j * pulled[0]).abs() <= bound).all())


def dense_jacobian(func: Callable, t: float, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``J[i, j] = d f_i / d y_j`` over the flattened state: shape ``(n, n)``."""
    n = y.numel()
    basis = torch.eye(n, dtype=y.dtype, device=y.device).reshape((n,) + y.shape)
    return _pullback_rows(lambda x: func(t, x), y, basis, create_graph).reshape(n, n)


def batched_jacobian(func: Callable, t: float, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Per-sample blocks ``J[b, i, j] = d f[b, i] / d y[b, j]``: shape ``(batch, m, m)``.

    Valid when sample ``b`` of ``f`` depends on sample ``b`` of ``y`` only (no batch norm, no
    attention across the batch); then a cotangent that is ``e_i`` in *every* sample returns row ``i``
    of every block in one pass, so ``m`` passes suffice for any batch size.
    """
    if y.ndim < 1:
        raise ValueError("jacobian='batched' needs a state of shape (batch, ...); got a 0-dim state: use "
                         "jacobian='dense'")
    batch, m = y.shape[0], y[0].numel()
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    basis = eye[:, None, :].expand(m, batch, m).reshape((m,) + y.shape)
    rows = _pullback_rows(lambda x: func(t, x), y, basis, create_graph)        # (m, batch, ...)
    return rows.reshape(m, batch, m).permute(1, 0, 2)


# What automatic differentiation raises where it cannot run a field (no forward-mode rule, no double backward, a
# value that is not a tensor shaped like the state): the Krylov product then takes its next route.
_AD_FAILURES = (RuntimeError, NotImplementedError, TypeError)


@dataclass
class Linearization:
    """``J v`` at a fixed ``(t, y)`` for the Krylov mode (nothing of size n^2 is stored).

    A real state takes its products from reverse mode twice over (the double-backward identity that
    ``torch.autograd.functional.jvp`` documents): at the first product, one evaluation of ``f`` with its graph and
    the vector-Jacobian product ``u -> J^T u`` recorded with ``create_graph``; every product is then the gradient
    of ``<J^T u, v>`` with respect to ``u``, one backward pass through that record with no call of ``f``. Measured
    by ``benchmarks/krylov_products.py`` (one CPU thread): 204 us a product on a batch of 4 Robertson problems,
    against 2,084 us for ``torch.func.jvp``, which traces ``f`` again at every product (``f`` alone: 49 us). A
    field that cannot be differentiated twice takes ``torch.func.jvp``; one without forward-mode AD then a one-sided
    difference.
    Each record is checked once, component by component, against ``torch.func.jvp`` (or, without forward-mode
    rules, a central difference), since autograd drops, without an error, the term of a function whose backward it
    cannot differentiate. (Complex states are refused by :func:`jacobian`: this GMRES is real.)
    ``counters["n_jvp"]`` (the solver's statistics, when given) counts the products.
    """

    func: Callable
    t: float
    y: torch.Tensor
    counters: dict | None = None
    _how: str = field(default="", init=False, repr=False)     # "reverse", "forward" or "difference"
    _record: tuple | None = field(default=None, init=False, repr=False)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.counters is not None:
            self.counters["n_jvp"] = self.counters.get("n_jvp", 0) + 1
        if not self._how:
            self._how = "reverse" if self.y.dtype.is_floating_point else "forward"
        if self._how == "reverse":
            try:
                return self._reverse_product(v)
            except _AD_FAILURES:
                self._how, self._record = "forward", None
        if self._how == "forward":
            try:
                return self._forward_product(v)
            except _AD_FAILURES:
                self._how = "difference"
        # Forward-mode AD is not implemented for every operation: a one-sided difference with
        # the usual step sqrt(eps) (1 + |y|) / |v| (Knoll and Keyes, J. Comput. Phys. 193, 2004).
        eps = torch.finfo(self.y.dtype).eps
        v_norm = float(v.norm())
        if v_norm == 0.0:
            return torch.zeros_like(v)
        delta = math.sqrt(eps) * (1.0 + float(self.y.norm())) / v_norm
        return (self.func(self.t, self.y + delta * v) - self.func(self.t, self.y)) / delta

    def _reverse_product(self, v: torch.Tensor) -> torch.Tensor:
        if self._record is None:
            # (inference mode off as well: a solve run under torch.inference_mode has an inference tensor y,
            # which autograd cannot record)
            with torch.inference_mode(False), torch.enable_grad():
                y = self.y.clone().requires_grad_(True)
                out = self.func(self.t, y)
                if not (isinstance(out, torch.Tensor) and out.shape == y.shape):
                    raise TypeError("the field's value is not a tensor shaped like the state")
                cotangent = torch.zeros_like(out, requires_grad=True)
                if out.requires_grad:
                    pullback = torch.autograd.grad(out, y, cotangent, create_graph=True, allow_unused=True)[0]
                else:
                    pullback = None
            # f independent of y (pullback None), or a pullback that autograd recorded without a path back to the
            # cotangent (a custom function's backward it cannot differentiate): no linear function of u to
            # differentiate, so the forward-mode product takes over.
            if pullback is None or not pullback.requires_grad:
                raise RuntimeError("no recorded pullback")
            self._record = (cotangent, pullback)
            if not self._record_checks_out():
                raise RuntimeError("the recorded pullback is not J^T u")
        return self._recorded_product(v)

    def _forward_product(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` by forward-mode AD (traces ``f`` again at every call)."""
        return torch.func.jvp(lambda x: self.func(self.t, x), (self.y,), (v,))[1]

    def _recorded_product(self, v: torch.Tensor) -> torch.Tensor:
        cotangent, pullback = self._record
        with torch.inference_mode(False), torch.enable_grad():
            product = torch.autograd.grad(pullback, cotangent, v.clone() if v.is_inference() else v,
                                          retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(v) if product is None else product

    def _record_checks_out(self) -> bool:
        """One recorded product against an independent one along a fixed direction, component by component.

        A custom ``autograd.Function`` whose backward autograd cannot differentiate (``once_differentiable``, a
        backward in numpy) drops its term from the double backward without an error: ``y^2`` through such a
        function, minus ``y``, gave ``-v`` for ``J v``. The independent product is ``torch.func.jvp`` where the
        field has forward-mode rules (it evaluates ``f`` at ``y`` only), else a central difference (two calls of
        ``f`` near ``y``; a call that fails there fails the check). Each component is compared on its own scale:
        compared by the largest component, a dropped term of size 2 beside a component of rate 1e9 passed, and
        rodas5 ended 1,360 times its tolerance off with status success. A false alarm only costs speed.
        """
        generator = torch.Generator(device="cpu").manual_seed(0)
        unit = torch.randn(self.y.shape, generator=generator, dtype=self.y.dtype).to(self.y.device)
        probe = unit * (1.0 + self.y.abs())        # each component moved on its own scale
        recorded = self._recorded_product(probe)
        eps = torch.finfo(self.y.dtype).eps
        try:
            exact = self._forward_product(probe)
        except _AD_FAILURES:
            exact = None
        if exact is not None:
            if exact.shape != recorded.shape:
                return False
            allowed = math.sqrt(eps) * (recorded.abs() + exact.abs()) + eps * float(exact.abs().max())
            return bool(((recorded - exact).abs() <= allowed).all())
        cube_root_eps = eps ** (1.0 / 3.0)
        try:
            with torch.no_grad():
                ahead = self.func(self.t, self.y + cube_root_eps * probe)
                behind = self.func(self.t, self.y - cube_root_eps * probe)
        except Exception:   # noqa: BLE001 - (a field that checks its domain: y - delta is not a point of the solve)
            return False
        difference = (ahead - behind) / (2.0 * cube_root_eps)
        # the difference's own error: truncation, relative eps^(2/3), and rounding, eps |f| / delta per component
        rounding = 8.0 * eps * (ahead.abs() + behind.abs()) / (2.0 * cube_root_eps)
        allowed = cube_root_eps * (recorded.abs() + difference.abs()) + rounding
        return bool(torch.isfinite(difference).all() and ((recorded - difference).abs() <= allowed).all())


def leading_unknowns(func, y: torch.Tensor) -> int | None:
    """How many leading components an implicit backward step solves for, or ``None``: all. A field declares its
    components from ``quadrature_from`` on quadratures (the adjoint's parameter cotangents), which no derivative reads;
    they are left out of the linear algebra where they outnumber the rest (with few of them the split's extra
    evaluations or products cost more than their rows: ``rodas5p`` took twice the time on Robertson's 3 rate
    constants), and only without a graph (a graph-carrying stage keeps the implicit function theorem's full
    system)."""
    leading = getattr(func, "quadrature_from", None)
    if leading is None or torch.is_grad_enabled() or not 0 < leading < y.numel() or y.numel() - leading <= leading:
        return None
    return int(leading)


class Leading:
    """``f(t, (u, q))[:m]`` as a field of the leading components ``u`` alone, the trailing ones ``q`` held: the
    Jacobian of a field whose trailing components are quadratures (``quadrature_from``: the adjoint's parameter
    cotangents, which no component's derivative reads), over the components the implicit steps solve for."""

    def __init__(self, func, trailing: torch.Tensor):
        self.func, self.trailing = func, trailing

    def __call__(self, t, u):
        return self.func(t, torch.cat((u, self.trailing.to(u.dtype))))[:u.numel()]


def jacobian(mode: str, func: Callable, t: float, y: torch.Tensor, counters: dict | None = None):
    """The Jacobian of ``func(t, .)`` at ``y`` in the representation ``mode`` uses (no graph); ``counters``: the
    solver's statistics, where the Krylov mode counts its Jacobian-vector products (``n_jvp``). A field with the
    user's Jacobian (``options={"jac": fn}``) gives it instead."""
    if getattr(func, "jac", None) is not None and mode in ("dense", "batched"):
        return func.user_jacobian(t, y, mode)
    if mode == "dense":
        return dense_jacobian(func, t, y)
    if mode == "batched":
        return batched_jacobian(func, t, y)
    if y.is_complex():
        # (GMRES's Arnoldi coefficients are real here: a complex state crashed it with "value cannot be converted
        # to type double")
        raise ValueError("jacobian='krylov' supports real states only; for a complex state use jacobian='dense' "
                         "(or 'batched'), or solve the real form, torch.view_as_real(y0)")
    return Linearization(func, t, y.detach(), counters)


def spectral_radius(func: Callable, t: float, y: torch.Tensor, iterations: int = 12,
                    start: torch.Tensor | None = None) -> float:
    """Power iteration with Jacobian-vector products: an estimate of ``max |lambda(df/dy)|`` at ``(t, y)``.

    Used to tell a user whose explicit solve stalled whether stiffness is the cause; a handful of
    products gives the order of magnitude, which is all that message needs. ``start``: a first vector
    already near the dominant direction (fewer iterations then suffice); default random.
    """
    with torch.no_grad():
        J = Linearization(func, t, y.detach())
        if start is not None:
            v = start.detach().clone()
        else:
            generator = torch.Generator(device="cpu").manual_seed(0)
            v = torch.randn(y.shape, generator=generator, dtype=y.real.dtype if y.is_complex() else y.dtype).to(y)
        estimate = 0.0
        for _ in range(iterations):
            norm = float(v.norm())
            if norm == 0.0 or not math.isfinite(norm):
                break
            v = v / norm
            v = J(v)
            estimate = float(v.norm())
    return estimate if math.isfinite(estimate) else 0.0


# --- iteration matrices ------------------------------------------------------------------------------

class SingularMatrixError(ArithmeticError):
    """The iteration matrix ``I - C (x) J`` is singular (to working precision), or not finite
    (``non_finite``: the Jacobian holds NaN or inf, a failure of the vector field rather than of h)."""

    def __init__(self, non_finite: bool = False):
        super().__init__("non-finite iteration matrix" if non_finite else "singular iteration matrix")
        self.non_finite = non_finite


class KrylovFailure(SingularMatrixError):
    """GMRES did not reach its tolerance (a preconditioner that does not approximate the inverse, or values
    that are not finite): the step that needed the solve is rejected, as for a singular matrix."""

    def __init__(self, reason: str, non_finite: bool = False):
        ArithmeticError.__init__(self, reason)
        self.reason, self.non_finite = reason, non_finite


@dataclass
class DenseSystem:
    """LU of ``I - C (x) J`` for a dense ``J`` (n, n); right-hand sides are ``(s, *state_shape)``."""

    lu: torch.Tensor
    pivots: torch.Tensor

    @classmethod
    def build(cls, C: np.ndarray, J: torch.Tensor) -> "DenseSystem":
        s, n = C.shape[0], J.shape[0]
        C_t = torch.as_tensor(C, dtype=J.dtype, device=J.device)
        matrix = torch.eye(s * n, dtype=J.dtype, device=J.device) - torch.kron(C_t, J)
        if not bool(torch.isfinite(J).all()):
            raise SingularMatrixError(non_finite=True)
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        if int(info) != 0 or not bool(torch.isfinite(lu).all()):
            raise SingularMatrixError
        return cls(lu, pivots)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        x = torch.linalg.lu_solve(self.lu, self.pivots, rhs.reshape(-1, 1))
        return x.reshape(rhs.shape)


@dataclass
class BatchedSystem:
    """Batched LU of ``I - C (x) J_b`` per sample; right-hand sides ``(s, batch, ...)``."""

    lu: torch.Tensor
    pivots: torch.Tensor

    @classmethod
    def build(cls, C: np.ndarray, J: torch.Tensor) -> "BatchedSystem":
        s = C.shape[0]
        batch, m, _ = J.shape
        C_t = torch.as_tensor(C, dtype=J.dtype, device=J.device)
        # M[b, (i, p), (j, q)] = delta - C[i, j] J[b, p, q]: stage-major, like torch.kron.
        kron = (C_t[None, :, None, :, None] * J[:, None, :, None, :]).reshape(batch, s * m, s * m)
        matrix = torch.eye(s * m, dtype=J.dtype, device=J.device) - kron
        if not bool(torch.isfinite(J).all()):
            raise SingularMatrixError(non_finite=True)
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        if bool((info != 0).any()) or not bool(torch.isfinite(lu).all()):
            raise SingularMatrixError
        return cls(lu, pivots)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        s, batch = rhs.shape[0], rhs.shape[1]
        flat = rhs.reshape(s, batch, -1).permute(1, 0, 2).reshape(batch, -1, 1)
        x = torch.linalg.lu_solve(self.lu, self.pivots, flat)
        return x.reshape(batch, s, -1).permute(1, 0, 2).reshape(rhs.shape)


@dataclass
class KrylovSystem:
    """``I - C (x) J`` applied matrix-free and solved by GMRES.

    ``preconditioner(v, c) -> approximately (I - c J)^{-1} v`` (the user's, for one stage of a
    diagonally implicit method: ``s == 1``); ``None`` runs GMRES unpreconditioned. ``rtol`` is the
    relative residual (in the error norm's scaled variables) at which GMRES stops.
    """

    C: np.ndarray
    linearization: Linearization
    preconditioner: Callable | None = None
    # Measured on 4 Robertson problems, kvaerno5 at rtol 1e-7: a GMRES residual of 1e-3 left the solve 150x
    # its tolerance (the same steps as the dense solve, which is 5x); 1e-6 matched the dense solve at 24%
    # more evaluations. Newton's step-size stopping test does not see the linear solves' inexactness.
    rtol: float = 1e-6
    max_iters: int = 200
    iterations: int = 0
    # The error norm's scale (atol + rtol |y|) when the caller has one: GMRES then works in scaled
    # variables, so its Euclidean stopping test does not neglect small components (Robertson's y2 ~ 1e-5
    # next to y1 ~ 1 was solved to 200x its tolerance without it).
    scale: torch.Tensor | None = None
    # An absolute bound as well, on the RMS of the scaled residual: GMRES also stops once the residual is below
    # it, however large the right-hand side. The Newton methods set it to 0.05 times Newton's own tolerance
    # (CVODE's linear tolerance factor, eplifac = 0.05): a residual that small moves the iterate by a twentieth
    # of what Newton's stopping test allows, and the relative test alone made early iterations, whose
    # right-hand side is large, solve far past that (the unpreconditioned heat equation, n = 400: 727 products
    # per step).
    residual_rms: float = 0.0

    @classmethod
    def build(cls, C: np.ndarray, J: Linearization, preconditioner=None) -> "KrylovSystem":
        return cls(np.asarray(C, dtype=np.float64), J, preconditioner if C.shape[0] == 1 else None)

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        jv = torch.stack([self.linearization(v_i) for v_i in v])
        return v - torch.einsum("ij,j...->i...", torch.as_tensor(self.C, dtype=v.dtype, device=v.device), jv)

    def solve(self, rhs: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
        scale = self.scale if self.scale is not None else torch.ones((), dtype=rhs.dtype, device=rhs.device)
        if self.scale is not None:
            scale = positive_scale(scale, 1.0)
        precondition = None
        if self.preconditioner is not None:
            c = float(self.C[0, 0])

            def precondition(v):
                out = self.preconditioner(v[0] * scale, c)
                if not isinstance(out, torch.Tensor) or out.shape != v[0].shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"option 'preconditioner' returned {got} for a vector of shape "
                                     f"{tuple(v[0].shape)}; it must return P v ~ (I - c J)^-1 v, shaped like v")
                return out[None] / scale
        x, iterations = gmres(lambda v: self._apply(v * scale) / scale, rhs / scale, precondition=precondition,
                              rtol=self.rtol if rtol is None else rtol, atol=self.residual_rms * math.sqrt(rhs.numel()),
                              max_iters=self.max_iters, fail=True)
        self.iterations += iterations
        return x * scale


# --- the stage transformation of fully implicit methods --------------------------------------------------

# Above this condition number of T the transformation is refused: it amplifies the rounding error of the
# transformed right-hand side and of the back-transformation by up to cond(T) (Radau IIA: 3.2 and 9.0,
# Gauss: 3.7 and 12.8; a defective stage matrix, such as TR-BDF2's with its double eigenvalue, gives 1e16).
# 1e3 keeps the linear solves within three digits of the coupled LU's in the worst case.
_MAX_TRANSFORM_CONDITION = 1e3


# The transformation costs a dozen more small tensor operations per solve (about 40 us on one CPU thread)
# and its builds two LUs instead of one: it pays once the coupled LU's work, batch (s m)^3, is larger than
# this. Measured for radau5 with torch 2.13 on one CPU thread (one build and three solves): dense even at
# n = 64 ((s n)^3 = 7e6), 1.25x faster at n = 80; batched even at 1.8e6 (batch 16, m = 16), 1.3x faster at
# 7.5e5 (batch 1024, m = 3), 1.6x slower at 2e5 (batch 256, m = 3). A batched LU of small blocks runs at a
# fraction of the dense LU's rate, hence the lower bound there. HIRES (n = 8) and the Oregonator (n = 3)
# keep the coupled LU: the transformation made them 30-60% slower.
_TRANSFORM_MIN_WORK = {"dense": 1e7, "batched": 5e5}


@dataclass(frozen=True)
class StageEigenbasis:
    """``C = T diag(d) T^{-1}`` for a real ``(s, s)`` stage matrix, eigenvalues grouped for real Jacobians.

    The columns of ``T`` are ordered ``[real eigenvalues, one of each complex pair (positive imaginary
    part), their conjugates]``, and a conjugate's eigenvector is the conjugate of its partner's, so that
    for real ``r`` the transformed components of a pair are conjugate too. ``condition`` is cond(T).
    """

    real_values: np.ndarray        # (r,) float64
    pair_values: np.ndarray        # (q,) complex128, imaginary parts > 0
    T: np.ndarray                  # (s, s) complex128, s = r + 2 q
    T_inv: np.ndarray              # (s, s) complex128
    condition: float

    def scaled(self, factor: float) -> "StageEigenbasis":
        """The eigenbasis of ``factor * C``: the same ``T``, eigenvalues times ``factor``."""
        return StageEigenbasis(self.real_values * factor, self.pair_values * factor, self.T, self.T_inv,
                               self.condition)


def stage_eigenbasis(C: np.ndarray) -> StageEigenbasis | None:
    """The eigenbasis of a real stage matrix ``C``, or ``None`` where it should not be used.

    ``None``: ``C`` is not diagonalisable to working precision (cond(T) above ``_MAX_TRANSFORM_CONDITION``),
    not finite, or zero. ``C = h A`` changes with ``h`` only by a factor, so the decomposition is that of
    ``C / max|C|``, cached, and scaled: once per method rather than once per step size.
    """
    C = np.asarray(C, dtype=np.float64)
    scale = float(np.abs(C).max()) if C.size else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return None
    basis = _unit_eigenbasis((C / scale).tobytes(), C.shape[0])
    return None if basis is None else basis.scaled(scale)


@functools.lru_cache(maxsize=64)
def _unit_eigenbasis(data: bytes, s: int) -> StageEigenbasis | None:
    C = np.frombuffer(data, dtype=np.float64).reshape(s, s)
    values, vectors = np.linalg.eig(C)
    # A real matrix's real eigenvalues come out with zero imaginary part (LAPACK's real Schur form); the
    # tolerance only guards against a pair that is real to rounding, which is then defective (cond(T) large).
    tol = 1e-13 * max(1.0, float(np.abs(values).max()))
    real = np.abs(values.imag) <= tol
    upper = values.imag > tol
    if int(upper.sum()) != int((values.imag < -tol).sum()):
        return None
    T = np.concatenate([vectors[:, real].real, vectors[:, upper], vectors[:, upper].conj()], axis=1)
    condition = float(np.linalg.cond(T))
    if not math.isfinite(condition) or condition > _MAX_TRANSFORM_CONDITION:
        return None
    return StageEigenbasis(values[real].real.copy(), values[upper].copy(), T.astype(np.complex128),
                           np.linalg.inv(T).astype(np.complex128), condition)


def _factor(values: np.ndarray, J: torch.Tensor, dtype: torch.dtype):
    """LU of ``I - d J`` for every ``d`` in ``values``: shape ``(len(values), *J.shape)``."""
    d = torch.as_tensor(values, dtype=dtype, device=J.device).reshape((-1,) + (1,) * J.ndim)
    matrix = torch.eye(J.shape[-1], dtype=dtype, device=J.device) - d * J.to(dtype)
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    if bool((info != 0).any()) or not bool(torch.isfinite(lu).all()):
        raise SingularMatrixError
    return lu, pivots


@dataclass
class TransformedSystem:
    """``I - C (x) J`` for ``s > 1`` stages, solved through the eigenbasis of ``C`` (module docstring).

    ``J`` is dense ``(n, n)`` (right-hand sides ``(s, *state_shape)``) or per-sample ``(batch, m, m)``
    (right-hand sides ``(s, batch, ...)``): the same interface as :class:`DenseSystem` and
    :class:`BatchedSystem`. For a real ``J`` each real eigenvalue of ``C`` gets a real LU and each
    complex pair one complex LU (``complex64`` for ``float32``); the solution is real. For a complex ``J``
    (a complex state) the conjugate symmetry is lost and every eigenvalue gets its own complex LU.

    Not differentiable by design: ``build_system`` keeps the coupled LU for a ``J`` that carries a graph
    (the implicit stepper's Jacobian never does; its gradients solve transposed systems of their own).
    """

    real_lu: torch.Tensor | None        # (r, *J.shape): LU of I - d J for the real eigenvalues d
    real_pivots: torch.Tensor | None
    complex_lu: torch.Tensor | None     # (q, *J.shape): the pairs (real J) or every eigenvalue (complex J)
    complex_pivots: torch.Tensor | None
    into_real: torch.Tensor | None      # (r, s): rows of T^{-1}
    into_complex: torch.Tensor | None   # (q, s)
    out_real: torch.Tensor | None       # (s, r): columns of T
    out_complex: torch.Tensor | None    # (s, q): columns of T, doubled where a conjugate partner is folded in
    conjugate: bool                     # real J: the result is out_real w + Re(out_complex w)
    real_values: tuple
    complex_values: tuple
    vector_shape: tuple                 # J.shape[:-1]: (n,) dense, (batch, m) batched

    @classmethod
    def build(cls, basis: StageEigenbasis, J: torch.Tensor) -> "TransformedSystem":
        if not bool(torch.isfinite(J).all()):
            raise SingularMatrixError(non_finite=True)
        device = J.device
        complex_dtype = J.dtype if J.is_complex() else J.dtype.to_complex()
        r = len(basis.real_values)
        if J.is_complex():
            # No conjugate symmetry: all s eigenvalues, complex, T and T^{-1} as they are.
            real_values, complex_values = np.zeros(0), np.concatenate(
                [basis.real_values.astype(np.complex128), basis.pair_values, basis.pair_values.conj()])
            out_complex, into_complex = basis.T, basis.T_inv
        else:
            q = len(basis.pair_values)
            real_values, complex_values = basis.real_values, basis.pair_values
            out_complex, into_complex = 2 * basis.T[:, r:r + q], basis.T_inv[r:r + q]
        real_lu = real_pivots = complex_lu = complex_pivots = None
        into_real = out_real = None
        if len(real_values):
            real_lu, real_pivots = _factor(real_values, J, J.dtype)
            into_real = torch.as_tensor(basis.T_inv[:r].real, dtype=J.dtype, device=device)
            out_real = torch.as_tensor(basis.T[:, :r].real, dtype=J.dtype, device=device)
        if len(complex_values):
            complex_lu, complex_pivots = _factor(complex_values, J, complex_dtype)
            into_complex = torch.as_tensor(into_complex, dtype=complex_dtype, device=device)
            out_complex = torch.as_tensor(out_complex, dtype=complex_dtype, device=device)
        else:
            into_complex = out_complex = None
        return cls(real_lu, real_pivots, complex_lu, complex_pivots, into_real, into_complex, out_real,
                   out_complex, not J.is_complex(), tuple(float(d) for d in real_values),
                   tuple(complex(d) for d in complex_values), tuple(J.shape[:-1]))

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.conjugate and rhs.is_complex():
            # A real J with a complex right-hand side: the conjugate symmetry holds for each part.
            return torch.complex(self.solve(rhs.real), self.solve(rhs.imag))
        flat = rhs.reshape(rhs.shape[0], -1)                 # (s, N): N = n, or batch * m
        x = None
        if self.real_lu is not None:
            v = (self.into_real @ flat).reshape((-1,) + self.vector_shape + (1,))
            w = torch.linalg.lu_solve(self.real_lu, self.real_pivots, v)
            x = self.out_real @ w.reshape(w.shape[0], -1)
        if self.complex_lu is not None:
            v = (self.into_complex @ flat.to(self.into_complex.dtype)).reshape((-1,) + self.vector_shape + (1,))
            w = torch.linalg.lu_solve(self.complex_lu, self.complex_pivots, v)
            part = self.out_complex @ w.reshape(w.shape[0], -1)
            part = part.real if self.conjugate else part
            x = part if x is None else x + part
        return x.reshape(rhs.shape)

    def block(self, coefficient: float):
        """The factorised ``I - coefficient J`` when ``coefficient`` is a real eigenvalue of ``C``, else
        ``None``: a :class:`DenseSystem` or :class:`BatchedSystem` for right-hand sides ``(1, ...)``.

        RADAU5's error estimate solves with ``I - h gamma0 J``, ``1 / gamma0`` the real eigenvalue of
        ``A^{-1}``: this is the real block of the three-stage Radau IIA system, so it costs no LU.
        """
        kind = DenseSystem if len(self.vector_shape) == 1 else BatchedSystem
        tolerance = 1e-12 * abs(coefficient)
        for k, d in enumerate(self.real_values):
            if abs(d - coefficient) <= tolerance:
                return kind(self.real_lu[k], self.real_pivots[k])
        for k, d in enumerate(self.complex_values):
            if abs(d - coefficient) <= tolerance:     # a complex J: its real eigenvalues are here
                return kind(self.complex_lu[k], self.complex_pivots[k])
        return None


def build_system(mode: str, C: np.ndarray, J, preconditioner=None):
    """Factorise (or prepare) ``I - C (x) J`` for ``mode``. Raises :class:`SingularMatrixError`.

    Coupled stages (``s > 1``) in the dense and batched modes are solved through the eigenbasis of ``C``
    (:class:`TransformedSystem`) unless the system is too small for that to pay (``_TRANSFORM_MIN_WORK``),
    ``C`` is not safely diagonalisable, or ``J`` carries a graph; then, and for ``s = 1``, by one LU of the
    whole matrix.
    """
    if mode == "krylov":
        return KrylovSystem.build(C, J, preconditioner)
    s = C.shape[0]
    batch, m = (1, J.shape[0]) if mode == "dense" else (J.shape[0], J.shape[1])
    if s > 1 and not J.requires_grad and batch * (s * m) ** 3 >= _TRANSFORM_MIN_WORK[mode]:
        basis = stage_eigenbasis(C)
        if basis is not None:
            return TransformedSystem.build(basis, J)
    if mode == "dense":
        return DenseSystem.build(C, J)
    return BatchedSystem.build(C, J)


# --- GMRES -------------------------------------------------------------------------------------------

def gmres(apply: Callable, b: torch.Tensor, precondition: Callable | None = None, rtol: float = 1e-6,
          atol: float = 0.0, restart: int = 40, max_iters: int = 400, fail: bool = False) -> tuple:
    """Solve ``A x = b`` with restarted, right-preconditioned GMRES; returns ``(x, iterations)``.

    ``apply(v)`` computes ``A v`` for tensors shaped like ``b``; ``precondition(v)`` approximates
    ``A^{-1} v``. Stops when ``|b - A x| <= max(rtol |b|, atol)``, after ``max_iters`` products, or at a
    value that is not finite. Short of the tolerance it raises :class:`KrylovFailure` with ``fail=True``
    (Newton's iteration: a zero increment from a useless preconditioner looked converged), and otherwise
    returns the best iterate.
    The Arnoldi basis uses modified Gram-Schmidt; the small least-squares problem is solved with
    Givens rotations on the host (its size is at most ``restart``).
    """
    shape = b.shape
    b_flat = b.reshape(-1)
    x = torch.zeros_like(b_flat)
    b_norm = float(b_flat.norm())
    if b_norm == 0.0:
        return x.reshape(shape), 0
    if not math.isfinite(b_norm):
        # (the residual test against rtol * inf passed at once, and a zero iterate came back as the solution: a
        # Rosenbrock step with zero stages has a zero error estimate and was accepted)
        if fail:
            raise KrylovFailure("GMRES was given a non-finite right-hand side", non_finite=True)
        return torch.full_like(b, math.nan), 0
    target = max(rtol * b_norm, atol)
    M = precondition if precondition is not None else (lambda v: v)
    iterations = 0
    residual = b_flat.clone()
    beta = b_norm
    while iterations < max_iters:
        beta = float(residual.norm())
        if beta <= target or not math.isfinite(beta):
            break
        basis = [residual / beta]
        preconditioned = []
        H = np.zeros((restart + 1, restart))
        cs, sn = np.zeros(restart), np.zeros(restart)
        g = np.zeros(restart + 1)
        g[0] = beta
        k_used = 0
        for k in range(restart):
            z = M(basis[k].reshape(shape)).reshape(-1)
            preconditioned.append(z)
            w = apply(z.reshape(shape)).reshape(-1)
            iterations += 1
            for i in range(k + 1):
                H[i, k] = float(torch.dot(w, basis[i]))
                w = w - H[i, k] * basis[i]
            below = float(w.norm())   # kept: the rotation below zeroes H[k + 1, k]
            H[k + 1, k] = below
            if not np.isfinite(H[:k + 2, k]).all():
                beta = math.nan   # (a preconditioner or product gave NaN or inf: x keeps the last finite iterate)
                break
            for i in range(k):   # apply the previous rotations to the new column
                H[i, k], H[i + 1, k] = cs[i] * H[i, k] + sn[i] * H[i + 1, k], -sn[i] * H[i, k] + cs[i] * H[i + 1, k]
            r = math.hypot(H[k, k], H[k + 1, k])
            cs[k], sn[k] = (1.0, 0.0) if r == 0.0 else (H[k, k] / r, H[k + 1, k] / r)
            H[k, k], H[k + 1, k] = r, 0.0
            g[k], g[k + 1] = cs[k] * g[k], -sn[k] * g[k]
            k_used = k + 1
            if abs(g[k + 1]) <= target or H[k, k] == 0.0 or iterations >= max_iters or below == 0.0:
                break
            basis.append(w / below)
        if k_used == 0 or not math.isfinite(beta):
            break
        coefficients = np.linalg.lstsq(np.triu(H[:k_used, :k_used]), g[:k_used], rcond=None)[0]
        for coefficient, z in zip(coefficients, preconditioned):
            x = x + float(coefficient) * z
        residual = b_flat - apply(x.reshape(shape)).reshape(-1)
        previous, beta = beta, float(residual.norm())
        if not beta < previous:
            break   # a restart cycle that gained nothing (e.g. a zero preconditioner) gains nothing the next time
    if fail and not beta <= target:
        non_finite = not math.isfinite(beta)
        raise KrylovFailure("GMRES produced non-finite values" if non_finite else
                            f"GMRES did not reach its tolerance in {iterations} iterations (residual {beta / b_norm:.2g} "
                            f"of the right-hand side against {target / b_norm:.2g}); a preconditioner should "
                            "approximate (I - c J)^{-1} v", non_finite=non_finite)
    return x.reshape(shape), iterations


__all__ = ["JACOBIAN_MODES", "jacobian", "is_holomorphic", "positive_scale", "spectral_radius", "dense_jacobian",
           "batched_jacobian", "Linearization",
           "build_system", "DenseSystem", "BatchedSystem", "TransformedSystem", "StageEigenbasis", "stage_eigenbasis",
           "KrylovSystem", "SingularMatrixError", "KrylovFailure", "gmres"]
