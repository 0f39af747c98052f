"""Stiff test problems: torch vector fields, numpy twins with analytic Jacobians, reference values.

Every torch field works on one state of shape ``(n,)`` and on a batch of shape ``(batch, n)`` (it reads
components on the last axis), in any float dtype; the benchmark uses float64. Each problem is a
:class:`StiffProblem` record: ``func`` (torch), ``y0``, ``t_span`` (the span from the literature),
``t_short`` (a short span for tests and ``--quick``), ``f_numpy`` / ``jac_numpy`` (for scipy, on the
flattened state), the per-component absolute-tolerance scale, published reference values where there are
any, and (heat equation) the closed-form solution.

Sources (constants, initial values, spans and reference values):

[HW]  E. Hairer, G. Wanner, Solving Ordinary Differential Equations II, 2nd ed., Springer 1996,
      Sec. IV.1 (ROBER, OREGO, VDPOL) and IV.10 (the problems of the numerical comparisons).
[TS]  F. Mazzia, C. Magherini, Test Set for IVP Solvers, release 2.4, Univ. of Bari,
      https://archimede.uniba.it/~testset/ (problem descriptions hires.pdf, vdpol.pdf, orego.pdf,
      rober.pdf and their Fortran files, whose ``solut`` routines hold the reference values below,
      computed there with RADAU5 in quadruple-ish precision: rtol = atol = h0 = 1.1e-18).
[SR]  L. F. Shampine, M. W. Reichelt, The MATLAB ODE Suite, SIAM J. Sci. Comput. 18 (1997) 1-22:
      ``vdp1000``, mu = 1000 on [0, 3000].
[HWp] E. Hairer's stiff test set page (http://www.unige.ch/~hairer/testset/stiff/vdpol/res_exact_pic):
      VDPOL (eps = 1e-6) at t = 1, ..., 11.
[LS]  A. C. Hindmarsh, ODEPACK/LSODE demonstration program (Robertson with rtol 1e-4,
      atol = (1e-6, 1e-10, 1e-6)), also MATLAB's ``hb1ode``: the per-component atol scale used here.

Robertson at t = 40, (0.7158271, 9.185535e-6, 0.2841637): 7-digit values quoted widely (to our recollection
first as the output of Hindmarsh's LSODE demonstration program [LS]; the printed source was not at hand to
check). scipy Radau at rtol 1e-10 reproduces all 7 digits (tests/test_stiff_problems.py); they are too short
to serve as a benchmark reference, which uses scipy Radau at rtol 1e-12 on that span.

``scipy_reference(problem, t_eval)`` solves with ``solve_ivp(method="Radau")`` and the analytic Jacobian
(dense, or sparse for the heat equation) and caches the result in-process, keyed on the problem's
name (which encodes its parameters), the times and the tolerances.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = ["StiffProblem", "robertson", "robertson_batch", "sample_rate_constants", "van_der_pol", "vdpol",
           "hires", "oregonator", "heat", "problem_set", "scipy_reference", "mixed_error",
           "ROBERTSON_K", "ROBERTSON_T40", "ROBERTSON_T1E11"]


@dataclass(frozen=True, eq=False)
class StiffProblem:
    """One stiff initial value problem. Equal (and hashed) by ``name``, which encodes the parameters."""

    name: str
    func: torch.nn.Module                   # torch field f(t, y), y of shape (n,) or (batch, n)
    y0: torch.Tensor                        # float64
    t_span: tuple                           # the span from the literature
    t_short: tuple                          # a short span for tests / --quick
    f_numpy: Callable                       # f(t, y, xp=np) on the flattened state (xp: numpy or jax.numpy)
    jac_numpy: Callable | None              # analytic Jacobian of f_numpy (ndarray or scipy.sparse)
    atol_scale: np.ndarray                  # atol = rtol * atol_scale (per component, broadcasts to y0)
    source: str = ""
    # Published full-precision values {t: array of shape y0.shape} and where they come from.
    reference: dict = field(default_factory=dict)
    reference_source: str = ""
    exact: Callable | None = None           # closed-form solution, exact(t) -> ndarray of y0's shape
    sparse_jacobian: bool = False
    band: tuple | None = None               # (lower, upper) bandwidths of the Jacobian, if banded (LSODA)

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, StiffProblem) and other.name == self.name

    @property
    def n(self) -> int:
        return self.y0.shape[-1]

    def atol(self, rtol: float) -> np.ndarray:
        """Absolute tolerance for ``rtol``: ``rtol * atol_scale``, as an array broadcasting to y0."""
        return rtol * np.asarray(self.atol_scale, dtype=np.float64)

    def atol_tensor(self, rtol: float) -> torch.Tensor | float:
        a = self.atol(rtol)
        if a.ndim == 0 or np.all(a == a.flat[0]):
            return float(a.flat[0])
        return torch.as_tensor(a, dtype=self.y0.dtype)


def mixed_error(y, ref, rtol, atol) -> float:
    """The test set's mixed relative error max_i |y_i - ref_i| / (atol_i / rtol + |ref_i|) [TS].

    ``-log10`` of it is the test set's "mescd" (mixed error significant correct digits). A solve "meets its
    tolerance within 10x" when this is at most ``10 * rtol``, i.e. |y_i - ref_i| <= 10 (atol_i + rtol |ref_i|).
    """
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(atol, dtype=np.float64) / rtol, ref.shape) + np.abs(ref)
    return float(np.max(np.abs(y - ref) / scale))


# --------------------------------------------------------------------------------------------------
# Robertson chemical kinetics [HW IV.1 (1.4)], [TS rober]
# --------------------------------------------------------------------------------------------------

ROBERTSON_K = (0.04, 3.0e7, 1.0e4)  # k1, k2, k3 [HW IV.1 (1.3)]: A -> B (k1), 2B -> B + C (k2), B + C -> A + C (k3)
ROBERTSON_T40 = np.array([0.7158271, 9.185535e-6, 0.2841637])  # 7 digits (see the module docstring)
ROBERTSON_T1E11 = np.array([0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050])  # [TS rober]


class Robertson(torch.nn.Module):
    """y1' = -k1 y1 + k3 y2 y3,  y2' = k1 y1 - k3 y2 y3 - k2 y2^2,  y3' = k2 y2^2.

    ``k`` has shape (3,) (one set of constants) or (batch, 3) (one per sample, for a state of shape
    (batch, 3)); it broadcasts against the state's leading axes.
    """

    def __init__(self, k):
        super().__init__()
        self.register_buffer("k", torch.as_tensor(k, dtype=torch.float64))

    def forward(self, t, y):
        k = self.k.to(y.dtype)
        k1, k2, k3 = k[..., 0], k[..., 1], k[..., 2]
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        a = k1 * y1
        b = k3 * y2 * y3
        c = k2 * y2 * y2
        return torch.stack([b - a, a - b - c, c], dim=-1)


def _robertson_np(k):
    k1, k2, k3 = k

    def f(t, y, xp=np):
        y1, y2, y3 = y[0], y[1], y[2]
        return xp.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2])

    def jac(t, y):
        y1, y2, y3 = y
        return np.array([[-k1, k3 * y3, k3 * y2],
                         [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2],
                         [0.0, 2 * k2 * y2, 0.0]])

    return f, jac


ROBERTSON_ATOL_SCALE = np.array([1e-2, 1e-6, 1e-2])  # [LS]: atol (1e-6, 1e-10, 1e-6) at rtol 1e-4


def robertson(k=ROBERTSON_K, t_end=1e5) -> StiffProblem:
    """Robertson's reaction, y0 = (1, 0, 0); span [0, t_end] (default 1e5; [HW]/[TS] integrate to 1e11,
    whose reference values are :data:`ROBERTSON_T1E11`), short span [0, 40]."""
    k = tuple(float(x) for x in k)
    f_np, jac_np = _robertson_np(k)
    # (the 7-digit values at t = 40, ROBERTSON_T40, are too short for a reference: not listed here)
    reference = {1e11: ROBERTSON_T1E11} if k == ROBERTSON_K and t_end == 1e11 else {}
    suffix = "" if k == ROBERTSON_K else "(k=" + ",".join(f"{x:.6g}" for x in k) + ")"
    return StiffProblem(
        name=f"robertson{suffix}" + ("" if t_end == 1e5 else f"[0,{t_end:g}]"),
        func=Robertson(k), y0=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        t_span=(0.0, float(t_end)), t_short=(0.0, 40.0), f_numpy=f_np, jac_numpy=jac_np,
        atol_scale=ROBERTSON_ATOL_SCALE,
        source="Robertson (1966); k1=0.04, k2=3e7, k3=1e4 and y0 from [HW IV.1 (1.4)] / [TS rober]",
        reference=reference,
        reference_source="t=1e11: [TS rober] solut")


def sample_rate_constants(batch: int, factor: float = 10.0, seed: int = 0) -> torch.Tensor:
    """Rate constants drawn log-uniformly within ``factor`` of :data:`ROBERTSON_K`: shape (batch, 3)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, 3, generator=g, dtype=torch.float64) * 2 - 1  # U(-1, 1)
    return torch.tensor(ROBERTSON_K, dtype=torch.float64) * factor ** u


def robertson_batch(k: torch.Tensor, t_end=1e5) -> StiffProblem:
    """A batch of Robertson problems with per-sample constants ``k`` of shape (batch, 3): y0 of shape
    (batch, 3), one torch field whose constants broadcast over the batch. ``f_numpy`` / ``jac_numpy`` act
    on the flattened (batch * 3,) state (block-diagonal sparse Jacobian), so scipy can solve the batch
    jointly too; :func:`robertson` ``(k[i])`` is sample ``i`` alone."""
    k = torch.as_tensor(k, dtype=torch.float64)
    batch = k.shape[0]
    ks = k.numpy()

    def f(t, y, xp=np):
        y = y.reshape(batch, 3)
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        a, b, c = ks[:, 0] * y1, ks[:, 2] * y2 * y3, ks[:, 1] * y2 * y2
        return xp.stack([b - a, a - b - c, c], axis=-1).reshape(-1)

    def jac(t, y):
        import scipy.sparse as sp
        y = y.reshape(batch, 3)
        blocks = [_robertson_np(tuple(ks[i]))[1](t, y[i]) for i in range(batch)]
        return sp.block_diag(blocks, format="csc")

    digest = f"{float(k.sum()):.17g}"  # a name per set of constants (the cache key)
    return StiffProblem(
        name=f"robertson_batch(b={batch},sum_k={digest})" + ("" if t_end == 1e5 else f"[0,{t_end:g}]"),
        func=Robertson(k), y0=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).repeat(batch, 1),
        t_span=(0.0, float(t_end)), t_short=(0.0, 40.0), f_numpy=f, jac_numpy=jac,
        atol_scale=ROBERTSON_ATOL_SCALE, source="Robertson with per-sample rate constants",
        sparse_jacobian=True)


# --------------------------------------------------------------------------------------------------
# Van der Pol
# --------------------------------------------------------------------------------------------------

class VanDerPolMatlab(torch.nn.Module):
    """y1' = y2,  y2' = mu (1 - y1^2) y2 - y1   (the form of MATLAB's vdp1000 [SR])."""

    def __init__(self, mu):
        super().__init__()
        self.mu = float(mu)

    def forward(self, t, y):
        y1, y2 = y[..., 0], y[..., 1]
        return torch.stack([y2, self.mu * (1 - y1 * y1) * y2 - y1], dim=-1)


class VanDerPolScaled(torch.nn.Module):
    """y1' = y2,  y2' = mu ((1 - y1^2) y2 - y1)   ([HW IV.1 (1.5')], [TS vdpol] with mu = 1/eps)."""

    def __init__(self, mu):
        super().__init__()
        self.mu = float(mu)

    def forward(self, t, y):
        y1, y2 = y[..., 0], y[..., 1]
        return torch.stack([y2, self.mu * ((1 - y1 * y1) * y2 - y1)], dim=-1)


def van_der_pol(mu: float = 1000.0) -> StiffProblem:
    """Van der Pol, mu = 1000 on [0, 3000], y0 = (2, 0): MATLAB's ``vdp1000`` [SR].

    The span [0, 3000] (about two relaxation periods, T ~ (3 - 2 ln 2) mu ~ 1614) belongs to this form,
    y2' = mu (1 - y1^2) y2 - y1. The time-scaled form y2' = mu ((1 - y1^2) y2 - y1) has a period of about
    1.6 for every large mu, so on [0, 3000] it would run ~1900 periods: that form is :func:`vdpol`
    (the test set's, mu = 1/eps = 1e6 on [0, 2]). Short span [0, 100] (slow phase, before the first jump).
    """
    mu = float(mu)

    def f(t, y, xp=np):
        return xp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    def jac(t, y):
        return np.array([[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])

    return StiffProblem(
        name=f"van_der_pol(mu={mu:g})", func=VanDerPolMatlab(mu),
        y0=torch.tensor([2.0, 0.0], dtype=torch.float64), t_span=(0.0, 3000.0), t_short=(0.0, 100.0),
        f_numpy=f, jac_numpy=jac, atol_scale=np.array([1.0, 1.0]),
        source="MATLAB vdp1000 [SR]: y2' = mu (1 - y1^2) y2 - y1, mu = 1000, [0, 3000], y0 = (2, 0)")


VDPOL_REFERENCE = {  # eps = 1e-6 (mu = 1e6), y0 = (2, 0)
    1.0: np.array([-0.1863646254808130e+01, 0.7535430865435460e+00]),  # [HWp]
    2.0: np.array([0.1706167732170483e+01, -0.8928097010247975e+00]),  # [TS vdpol] solut
}


def vdpol(mu: float = 1e6) -> StiffProblem:
    """The test set's VDPOL [TS], [HW IV.10]: y1' = y2, y2' = mu ((1 - y1^2) y2 - y1), mu = 1/eps = 1e6,
    y0 = (2, 0), span [0, 2], short span [0, 1]."""
    mu = float(mu)

    def f(t, y, xp=np):
        return xp.stack([y[1], mu * ((1 - y[0] ** 2) * y[1] - y[0])])

    def jac(t, y):
        return np.array([[0.0, 1.0], [mu * (-2 * y[0] * y[1] - 1), mu * (1 - y[0] ** 2)]])

    return StiffProblem(
        name=f"vdpol(mu={mu:g})", func=VanDerPolScaled(mu),
        y0=torch.tensor([2.0, 0.0], dtype=torch.float64), t_span=(0.0, 2.0), t_short=(0.0, 1.0),
        f_numpy=f, jac_numpy=jac, atol_scale=np.array([1.0, 1.0]),
        source="[TS vdpol] / [HW IV.10 VDPOL]: eps = 1e-6, y0 = (2, 0), [0, 2]",
        reference=VDPOL_REFERENCE if mu == 1e6 else {},
        reference_source="t=1: Hairer's page [HWp]; t=2: [TS vdpol] solut")


# --------------------------------------------------------------------------------------------------
# HIRES [HW IV.10], [TS hires]
# --------------------------------------------------------------------------------------------------

HIRES_REFERENCE = np.array([0.7371312573325668e-3, 0.1442485726316185e-3, 0.5888729740967575e-4,
                            0.1175651343283149e-2, 0.2386356198831331e-2, 0.6238968252742796e-2,
                            0.2849998395185769e-2, 0.2850001604814231e-2])  # [TS hires] at 321.8122


class Hires(torch.nn.Module):
    """The 8 "high irradiance responses" of photomorphogenesis (Schäfer 1975) [TS hires]."""

    def forward(self, t, y):
        y1, y2, y3, y4, y5, y6, y7, y8 = (y[..., i] for i in range(8))
        r = 280.0 * y6 * y8
        return torch.stack([
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ], dim=-1)


def _hires_np(t, y, xp=np):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    r = 280.0 * y6 * y8
    return xp.stack([-1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007, 1.71 * y1 - 8.75 * y2,
                     -10.03 * y3 + 0.43 * y4 + 0.035 * y5, 8.32 * y2 + 1.71 * y3 - 1.12 * y4,
                     -1.745 * y5 + 0.43 * y6 + 0.43 * y7, -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
                     r - 1.81 * y7, -r + 1.81 * y7])


def _hires_jac(t, y):
    y6, y8 = y[5], y[7]
    J = np.zeros((8, 8))
    J[0, 0], J[0, 1], J[0, 2] = -1.71, 0.43, 8.32
    J[1, 0], J[1, 1] = 1.71, -8.75
    J[2, 2], J[2, 3], J[2, 4] = -10.03, 0.43, 0.035
    J[3, 1], J[3, 2], J[3, 3] = 8.32, 1.71, -1.12
    J[4, 4], J[4, 5], J[4, 6] = -1.745, 0.43, 0.43
    J[5, 3], J[5, 4], J[5, 5], J[5, 6], J[5, 7] = 0.69, 1.71, -0.43 - 280.0 * y8, 0.69, -280.0 * y6
    J[6, 5], J[6, 6], J[6, 7] = 280.0 * y8, -1.81, 280.0 * y6
    J[7, 5], J[7, 6], J[7, 7] = -280.0 * y8, 1.81, -280.0 * y6
    return J


def hires() -> StiffProblem:
    """HIRES, y0 = (1, 0, 0, 0, 0, 0, 0, 0.0057), span [0, 321.8122] [TS hires]; short span [0, 5]."""
    return StiffProblem(
        name="hires", func=Hires(),
        y0=torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0.0057], dtype=torch.float64),
        t_span=(0.0, 321.8122), t_short=(0.0, 5.0), f_numpy=_hires_np, jac_numpy=_hires_jac,
        # The solution lives at 1e-4..1e-2 (y1 starts at 1): atol = 1e-4 rtol keeps every component
        # controlled relatively (with atol = rtol, the [TS] setting, y3 ~ 6e-5 would be barely controlled).
        atol_scale=np.full(8, 1e-4),
        source="[TS hires] / [HW IV.10 HIRES]",
        reference={321.8122: HIRES_REFERENCE}, reference_source="[TS hires] solut (RADAU5, rtol = atol = 1.1e-18)")


# --------------------------------------------------------------------------------------------------
# Oregonator [HW IV.1 (1.6)], [TS orego]
# --------------------------------------------------------------------------------------------------

# [TS orego] at t = 360
OREGO_REFERENCE = np.array([0.1000814870318523e+01, 0.1228178521549917e+04, 0.1320554942846706e+03])


class Oregonator(torch.nn.Module):
    """Field-Körös-Noyes Belousov-Zhabotinskii model (Field & Noyes 1974) as in [HW IV.1 (1.6)]:
    y1' = 77.27 (y2 + y1 (1 - 8.375e-6 y1 - y2)), y2' = (y3 - (1 + y1) y2) / 77.27, y3' = 0.161 (y1 - y3)."""

    def forward(self, t, y):
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        return torch.stack([77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
                            (y3 - (1 + y1) * y2) / 77.27,
                            0.161 * (y1 - y3)], dim=-1)


def _orego_np(t, y, xp=np):
    y1, y2, y3 = y[0], y[1], y[2]
    return xp.stack([77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)), (y3 - (1 + y1) * y2) / 77.27,
                     0.161 * (y1 - y3)])


def _orego_jac(t, y):
    y1, y2, y3 = y
    return np.array([[77.27 * (1 - 2 * 8.375e-6 * y1 - y2), 77.27 * (1 - y1), 0.0],
                     [-y2 / 77.27, -(1 + y1) / 77.27, 1 / 77.27],
                     [0.161, 0.0, -0.161]])


def oregonator() -> StiffProblem:
    """OREGO, y0 = (1, 2, 3), span [0, 360] [HW IV.10], [TS orego]; short span [0, 30]."""
    return StiffProblem(
        name="oregonator", func=Oregonator(), y0=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        t_span=(0.0, 360.0), t_short=(0.0, 30.0), f_numpy=_orego_np, jac_numpy=_orego_jac,
        # components swing over 1..1e5 (y1), 1e-4..1e3 (y2), 1..1e4 (y3); scale 1e-2 keeps the small
        # values of y2 relatively controlled without asking the impossible of the large ones
        atol_scale=np.full(3, 1e-2),
        source="[HW IV.1 (1.6)] / [TS orego]", reference={360.0: OREGO_REFERENCE},
        reference_source="[TS orego] solut (RADAU, rtol = h0 = 1.1e-18)")


# --------------------------------------------------------------------------------------------------
# Heat equation by the method of lines
# --------------------------------------------------------------------------------------------------

class Heat1D(torch.nn.Module):
    """y_j' = (y_{j-1} - 2 y_j + y_{j+1}) / dx^2 on the last axis, y_0 = y_{n+1} = 0, dx = 1 / (n + 1).

    Matrix-free (padding and slicing): O(n) time and memory, so n = 10^5 is cheap.
    """

    def __init__(self, n):
        super().__init__()
        self.n = int(n)
        self.inv_dx2 = float((n + 1) ** 2)

    def forward(self, t, y):
        p = torch.nn.functional.pad(y, (1, 1))
        return (p[..., :-2] - 2 * y + p[..., 2:]) * self.inv_dx2


def heat(n: int = 1000, t_end: float = 0.5) -> StiffProblem:
    """Stiff 1-D heat equation u_t = u_xx on (0, 1), u = 0 at both ends, by central differences on the
    ``n`` interior points x_j = j dx, dx = 1 / (n + 1). y0_j = sin(pi x_j), an eigenvector of the
    difference operator, so the semi-discrete solution is exactly

        y_j(t) = exp(lambda_1 t) sin(pi x_j),   lambda_1 = -(4 / dx^2) sin^2(pi dx / 2)

    (-> -pi^2 as dx -> 0). The stiffness ratio is about lambda_n / lambda_1 ~ 4 / (pi dx)^2 (4e9 at
    n = 1e5). Span [0, t_end] (default 0.5), short span [0, 0.05].
    """
    n = int(n)
    dx = 1.0 / (n + 1)
    lam1 = -(4.0 / dx ** 2) * math.sin(math.pi * dx / 2) ** 2
    x = np.arange(1, n + 1) * dx
    mode = np.sin(np.pi * x)
    inv_dx2 = (n + 1) ** 2

    def f(t, y, xp=np):
        zero = xp.zeros(1, dtype=y.dtype)
        p = xp.concatenate([zero, y, zero])
        return (p[:-2] - 2.0 * y + p[2:]) * inv_dx2

    def jac(t, y):
        import scipy.sparse as sp
        return sp.diags([np.full(n - 1, inv_dx2), np.full(n, -2.0 * inv_dx2), np.full(n - 1, inv_dx2)],
                        [-1, 0, 1], format="csc")

    def exact(t):
        return math.exp(lam1 * float(t)) * mode

    return StiffProblem(
        name=f"heat(n={n})" + ("" if t_end == 0.5 else f"[0,{t_end:g}]"), func=Heat1D(n),
        y0=torch.from_numpy(mode.copy()), t_span=(0.0, float(t_end)), t_short=(0.0, 0.05),
        f_numpy=f, jac_numpy=jac,
        # the solution decays to exp(-pi^2 t_end) ~ 7e-3 at t = 0.5: scale 1e-3 keeps it controlled
        atol_scale=np.array(1e-3), source="method of lines, second-order central differences",
        exact=exact, sparse_jacobian=True, band=(1, 1))


def heat_lambda1(n: int) -> float:
    dx = 1.0 / (n + 1)
    return -(4.0 / dx ** 2) * math.sin(math.pi * dx / 2) ** 2


# --------------------------------------------------------------------------------------------------
# The set, and the scipy reference
# --------------------------------------------------------------------------------------------------

def problem_set(heat_n: int = 1000) -> dict:
    """The benchmark's problems by short key: robertson, vdp1000, vdpol, hires, oregonator, heat."""
    return {"robertson": robertson(), "vdp1000": van_der_pol(1000.0), "vdpol": vdpol(1e6), "hires": hires(),
            "oregonator": oregonator(), "heat": heat(heat_n)}


def scipy_reference(problem: StiffProblem, t_eval, rtol: float = 1e-10, atol=None) -> np.ndarray:
    """``solve_ivp(method="Radau")`` with the problem's analytic Jacobian, from ``t_span[0]`` to the last of
    ``t_eval``; returns an array of shape ``(len(t_eval), *y0.shape)`` (read-only: it is cached).

    ``atol`` defaults to ``problem.atol(rtol)``. Cached in-process on (problem name, times, rtol, atol).
    """
    times = tuple(float(x) for x in np.atleast_1d(np.asarray(t_eval, dtype=np.float64)))
    if atol is None:
        atol = problem.atol(rtol)
    atol_key = tuple(np.atleast_1d(np.asarray(atol, dtype=np.float64)).tolist())
    return _reference(problem, times, float(rtol), atol_key)


@functools.lru_cache(maxsize=64)
def _reference(problem, times, rtol, atol_key):
    from scipy.integrate import solve_ivp
    shape = tuple(problem.y0.shape)
    y0 = problem.y0.detach().double().reshape(-1).numpy().copy()
    atol = np.broadcast_to(np.asarray(atol_key), shape).reshape(-1) if len(atol_key) > 1 else atol_key[0]
    t0 = problem.t_span[0]
    out = np.empty((len(times), y0.size))
    inside = [i for i, t in enumerate(times) if t != t0]
    for i, t in enumerate(times):
        if t == t0:
            out[i] = y0
    if inside:
        sol = solve_ivp(problem.f_numpy, (t0, max(times[i] for i in inside)), y0, method="Radau",
                        t_eval=[times[i] for i in inside], rtol=rtol, atol=atol, jac=problem.jac_numpy)
        if not sol.success:
            raise RuntimeError(f"scipy reference for {problem.name} failed: {sol.message}")
        out[inside] = sol.y.T
    out = out.reshape(len(times), *shape)
    out.flags.writeable = False
    return out
