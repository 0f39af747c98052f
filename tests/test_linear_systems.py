"""The iteration systems of fully implicit methods: the eigen-transformed solve against the coupled LU.

``I - C (x) J`` with ``C = h A`` of Radau IIA (2 and 3 stages) and Gauss (2 and 3 stages) is solved through
the eigenbasis of ``C`` (:class:`TransformedSystem`) and must give the coupled LU's answer to rounding, for
dense and per-sample Jacobians, real and complex; singular and non-finite matrices are reported as before;
a defective stage matrix keeps the coupled LU; solves of radau5 take the same steps either way.
"""

import dataclasses

import numpy as np
import pytest
import torch

import neuralode
import neuralode.methods
from neuralode.controllers import AdaptiveController
from neuralode.solvers import linear
from neuralode.solvers.linear import (BatchedSystem, DenseSystem, SingularMatrixError, TransformedSystem,
                                      build_system, stage_eigenbasis)
from neuralode.tableaus.implicit import IMPLICIT_TABLEAUS

F64, C128 = torch.float64, torch.complex128
FULL = ("radauIIA3", "radauIIA5", "gl4", "gl6")


def _A(name):
    return np.asarray(IMPLICIT_TABLEAUS[name].a, dtype=np.float64)


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=F64))
    return x.to(dtype)


def _coupled(mode, C, J):
    return (DenseSystem if mode == "dense" else BatchedSystem).build(C, J)


@pytest.mark.parametrize("dtype", (F64, C128), ids=("real", "complex"))
@pytest.mark.parametrize("mode", ("dense", "batched"))
@pytest.mark.parametrize("name", FULL)
def test_transformed_solve_equals_the_coupled_lu(name, mode, dtype):
    A = _A(name)
    s = A.shape[0]
    for seed, h in enumerate((0.05, 0.3, 2.0)):
        C = h * A
        J = _random((6, 6) if mode == "dense" else (4, 5, 5), dtype, seed)
        rhs = _random((s, 6) if mode == "dense" else (s, 4, 5), dtype, seed + 10)
        system = TransformedSystem.build(stage_eigenbasis(C), J)
        x, want = system.solve(rhs), _coupled(mode, C, J).solve(rhs)
        assert x.dtype == dtype and x.shape == rhs.shape
        assert float((x - want).abs().max()) <= 1e-12 * float(want.abs().max())
        # and it solves the system: the residual of the Kronecker form
        M = torch.eye(s * 6, dtype=dtype) - torch.kron(torch.as_tensor(C, dtype=dtype), J) if mode == "dense" else None
        if M is not None:
            assert float((M @ x.reshape(-1) - rhs.reshape(-1)).abs().max()) <= 1e-12 * float(rhs.abs().max())


@pytest.mark.parametrize("name", FULL)
def test_a_real_jacobian_uses_one_complex_lu_per_conjugate_pair(name):
    A = _A(name)
    s = A.shape[0]
    system = TransformedSystem.build(stage_eigenbasis(0.1 * A), _random((5, 5), F64, 0))
    real = 0 if system.real_lu is None else system.real_lu.shape[0]
    pairs = 0 if system.complex_lu is None else system.complex_lu.shape[0]
    assert real + 2 * pairs == s and system.conjugate and system.complex_lu.dtype == C128
    assert (real, pairs) == ((1, 1) if s == 3 else (0, 1))          # Radau IIA and Gauss: a pair (and 1 real)
    # a complex J: one complex LU per eigenvalue, no conjugate symmetry
    system = TransformedSystem.build(stage_eigenbasis(0.1 * A), _random((5, 5), C128, 0))
    assert system.real_lu is None and system.complex_lu.shape[0] == s and not system.conjugate


def test_a_complex_right_hand_side_with_a_real_jacobian():
    C, J = 0.2 * _A("radauIIA5"), _random((5, 5), F64, 1)
    rhs = _random((3, 5), C128, 2)
    x = TransformedSystem.build(stage_eigenbasis(C), J).solve(rhs)
    want = DenseSystem.build(C, J.to(C128)).solve(rhs)
    assert float((x - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_float32_solves_in_complex64_to_single_precision():
    C = 0.2 * _A("radauIIA5")
    J, rhs = _random((3, 40, 40), F64, 3) / 4, _random((3, 3, 40), F64, 4)
    system = TransformedSystem.build(stage_eigenbasis(C), J.float())
    assert system.complex_lu.dtype == torch.complex64
    x = system.solve(rhs.float())
    want = BatchedSystem.build(C, J).solve(rhs)
    assert x.dtype == torch.float32
    assert float((x.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("mode", ("dense", "batched"))
def test_singular_blocks_are_reported(mode):
    """I - C (x) J is singular iff I - d J is for an eigenvalue d of C. C's eigenvalues 1/4 and +-i/2 and J's
    4 and +-2i make a zero pivot exactly, in the real block and in the complex pair's (as LAPACK reports
    singularity only for a zero pivot, like the coupled LU, a nearly singular block is not an error)."""
    C = np.array([[0.0, -0.5, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.25]])
    basis = stage_eigenbasis(C)
    assert basis.real_values.tolist() == [0.25] and basis.pair_values.tolist() == [0.5j]
    for J in (4 * torch.eye(2, dtype=F64), torch.tensor([[0.0, 2.0], [-2.0, 0.0]], dtype=F64)):
        J = J if mode == "dense" else torch.stack([torch.eye(2, dtype=F64), J])
        with pytest.raises(SingularMatrixError) as info:
            TransformedSystem.build(basis, J)
        assert not info.value.non_finite
        with pytest.raises(SingularMatrixError):
            _coupled(mode, C, J)
    TransformedSystem.build(basis, 3 * torch.eye(2, dtype=F64))     # not singular


@pytest.mark.parametrize("mode", ("dense", "batched"))
def test_non_finite_jacobian_is_reported_as_such(mode):
    J = torch.eye(4, dtype=F64) if mode == "dense" else torch.eye(4, dtype=F64).repeat(2, 1, 1)
    J[..., 1, 2] = float("nan")
    with pytest.raises(SingularMatrixError) as info:
        TransformedSystem.build(stage_eigenbasis(0.1 * _A("gl6")), J)
    assert info.value.non_finite


def test_defective_stage_matrix_keeps_the_coupled_lu():
    """TR-BDF2's stage matrix has a double eigenvalue with one eigenvector: no eigenbasis; the trapezoid's is
    singular but diagonalisable: transformed (its zero eigenvalue's block is the identity)."""
    assert stage_eigenbasis(0.1 * _A("trbdf2")) is None
    J = _random((80, 80), F64, 5)
    assert isinstance(build_system("dense", 0.1 * _A("trbdf2"), J), DenseSystem)
    C = 0.1 * _A("trapezoid")
    assert stage_eigenbasis(C) is not None
    rhs = _random((2, 80), F64, 6)
    x = build_system("dense", C, J).solve(rhs)
    want = DenseSystem.build(C, J).solve(rhs)
    assert float((x - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_small_systems_and_graphs_keep_the_coupled_lu():
    C = 0.1 * _A("radauIIA5")
    assert isinstance(build_system("dense", C, _random((8, 8), F64, 0)), DenseSystem)            # HIRES' size
    assert isinstance(build_system("dense", C, _random((80, 80), F64, 0)), TransformedSystem)
    assert isinstance(build_system("batched", C, _random((4, 3, 3), F64, 0)), BatchedSystem)
    assert isinstance(build_system("batched", C, _random((1024, 3, 3), F64, 0)), TransformedSystem)
    J = _random((80, 80), F64, 0).requires_grad_(True)            # differentiable: the coupled LU's autograd
    assert isinstance(build_system("dense", C, J), DenseSystem)
    assert isinstance(build_system("dense", np.array([[0.1]]), _random((200, 200), F64, 0)), DenseSystem)


@pytest.mark.parametrize("dtype", (F64, C128), ids=("real", "complex"))
@pytest.mark.parametrize("mode", ("dense", "batched"))
def test_real_eigenvalue_block_is_the_lu_of_i_minus_h_gamma_j(mode, dtype):
    """RADAU5's error estimate solves with I - h gamma0 J: the real block of the transformed system."""
    C = 0.3 * _A("radauIIA5")
    J = _random((6, 6) if mode == "dense" else (3, 6, 6), dtype, 7)
    system = TransformedSystem.build(stage_eigenbasis(C), J)
    d = float(stage_eigenbasis(C).real_values[0])
    rhs = _random((1, 6) if mode == "dense" else (1, 3, 6), dtype, 8)
    want = _coupled(mode, np.array([[d]]), J).solve(rhs)
    x = system.block(d).solve(rhs)
    assert float((x - want).abs().max()) <= 1e-13 * float(want.abs().max())
    assert system.block(0.5 * d) is None


def test_eigenbasis_is_computed_once_per_method():
    linear._unit_eigenbasis.cache_clear()
    A = _A("radauIIA5")
    for h in (0.5, 0.25, 1.0, 2.0):          # powers of two: C / max|C| is the same matrix to the bit
        basis = stage_eigenbasis(h * A)
        np.testing.assert_allclose(basis.real_values, h * np.linalg.eigvals(A).real.max(), rtol=1e-14)
    assert linear._unit_eigenbasis.cache_info().misses == 1


# --- whole solves -----------------------------------------------------------------------------------------

def _laplacian(n, dtype=F64):
    L = (torch.diag(torch.full((n,), -2.0, dtype=F64)) + torch.diag(torch.ones(n - 1, dtype=F64), 1)
         + torch.diag(torch.ones(n - 1, dtype=F64), -1)) * (n + 1) ** 2
    return L.to(dtype)


def _solve(L, y0, monkeypatch, transformed, method="radau5", **options):
    monkeypatch.setattr(linear, "_TRANSFORM_MIN_WORK", {"dense": 0.0, "batched": 0.0} if transformed else
                        {"dense": float("inf"), "batched": float("inf")})
    field = (lambda t, y: y @ L.T) if y0.ndim == 2 else (lambda t, y: L @ y)
    return neuralode.solve(field, y0, torch.tensor([0.0, 0.1], dtype=F64), method=method, rtol=1e-8, atol=1e-10,
                           options=options)


@pytest.mark.parametrize("dtype", (F64, C128), ids=("real", "complex"))
@pytest.mark.parametrize("mode", ("dense", "batched"))
def test_radau5_takes_the_same_steps_with_either_linear_algebra(mode, dtype, monkeypatch):
    n = 20
    L = _laplacian(n, dtype) * (1.0 if dtype == F64 else complex(1.0, 0.5))
    x = torch.linspace(0, 1, n + 2, dtype=F64)[1:-1]
    y0 = (torch.sin(torch.pi * x) + 0.3 * torch.sin(5 * torch.pi * x)).to(dtype)
    y0 = y0 if mode == "dense" else torch.stack([y0, 2 * y0.flip(0)])
    kwargs = {"jacobian": mode}
    new = _solve(L, y0, monkeypatch, True, **kwargs)
    old = _solve(L, y0, monkeypatch, False, **kwargs)
    # The same steps; Newton's iterations may differ by one where rounding meets its stopping test. The error
    # estimate's I - h gamma0 J is the transformed system's real block: one build per factorisation, not two.
    for key in ("n_steps", "n_rejected", "n_jacobians"):
        assert new.stats[key] == old.stats[key]
    assert abs(new.stats["nfe"] - old.stats["nfe"]) <= 0.01 * old.stats["nfe"]
    assert 2 * new.stats["n_lu"] == old.stats["n_lu"]
    assert float((new.ys[-1] - old.ys[-1]).abs().max()) <= 1e-10
    exact = torch.linalg.matrix_exp(0.1 * L) @ (y0 if y0.ndim == 1 else y0.T)
    assert float((new.ys[-1] - (exact if y0.ndim == 1 else exact.T)).abs().max()) <= 1e-7


@pytest.mark.parametrize("method", ("radauIIA5", "gl6"))
def test_fixed_grid_methods_with_either_linear_algebra(method, monkeypatch):
    L, y0 = _laplacian(16), torch.linspace(0, 1, 16, dtype=F64) ** 2
    new = _solve(L, y0, monkeypatch, True, method=method, step_size=0.01)
    old = _solve(L, y0, monkeypatch, False, method=method, step_size=0.01)
    assert float((new.ys[-1] - old.ys[-1]).abs().max()) <= 1e-12


def test_gradients_through_a_transformed_solve(monkeypatch):
    """Newton's systems carry no graph; the implicit-function gradient is the same either way."""
    L = _laplacian(12)
    grads = []
    for transformed in (True, False):
        theta = torch.tensor(0.7, dtype=F64, requires_grad=True)
        y0 = torch.linspace(0, 1, 12, dtype=F64) * theta
        sol = _solve(L, y0, monkeypatch, transformed)
        (grad,) = torch.autograd.grad(sol.ys[-1].square().sum(), theta)
        grads.append(float(grad))
    assert grads[0] == pytest.approx(grads[1], rel=1e-10)


# --- RADAU5's step-size freeze ----------------------------------------------------------------------------

def test_keep_step_reuses_the_lu_on_a_linear_problem():
    """A linear field keeps its Jacobian: with the freeze most steps reuse the LU, without it every step
    whose length changed refactorises."""
    L, y0 = _laplacian(30), torch.sin(torch.linspace(0, 3, 30, dtype=F64))
    stepper = neuralode.methods.REGISTRY["radau5"].make_stepper({})
    assert stepper.keep_step == (1.0, 1.2)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    kept = neuralode.solve(lambda t, y: L @ y, y0, t, method=stepper, rtol=1e-6, atol=1e-8)
    plain = neuralode.solve(lambda t, y: L @ y, y0, t, method=dataclasses.replace(stepper, keep_step=None),
                            rtol=1e-6, atol=1e-8)
    assert plain.stats["n_lu"] >= plain.stats["n_steps"]              # (the error estimate's LU is counted too)
    assert kept.stats["n_lu"] <= 0.5 * plain.stats["n_lu"]
    assert kept.stats["nfe"] <= 1.1 * plain.stats["nfe"]
    exact = torch.linalg.matrix_exp(0.5 * L) @ y0
    assert float((kept.ys[-1] - exact).abs().max()) <= 1e-6


def test_keep_step_is_honoured_only_in_its_range_and_after_acceptance():
    from neuralode.solvers.runge_kutta import StepOutcome
    control = AdaptiveController()
    stepping = control.start([1.0], lambda: 0.1)
    y = torch.zeros(1, dtype=F64)

    def judged(ratio, keep=(1.0, 1.2)):
        stepping.h, stepping.history = 0.1, (1.0, 1.0)
        proposal = stepping.propose(0.0)
        accepted = stepping.judge(proposal, StepOutcome(y, None, torch.tensor(ratio, dtype=F64), 4, keep_step=keep))
        return accepted, stepping.h

    # the controller's factor is 1.03 at ratio 0.5 (kept), 2.3 at 0.01 (not kept), < 1 at 1.8 (rejected)
    grow = control.next_step(0.1, 0.5, 1.0, 4, True)
    assert 0.1 < grow < 0.12
    assert judged(0.5) == (True, 0.1)
    assert judged(0.5, keep=None) == (True, pytest.approx(grow))
    assert judged(0.01) == (True, pytest.approx(control.next_step(0.1, 0.01, 1.0, 4, True)))
    assert judged(1.8) == (False, pytest.approx(control.next_step(0.1, 1.8, 1.0, 4, False)))


@pytest.mark.parametrize("keep", ((1.2, 1.0), (0.0, 1.2), (1.0,)))
def test_keep_step_must_be_a_range(keep):
    stepper = neuralode.methods.REGISTRY["radau5"].make_stepper({})
    with pytest.raises(ValueError, match="keep_step must be None or a range"):
        dataclasses.replace(stepper, keep_step=keep)


# --- GMRES that cannot reach its tolerance ----------------------------------------------------------------

def test_gmres_reports_what_it_did_not_solve():
    """With fail=True a solve short of its tolerance, or one that met NaN, raises KrylovFailure; a useless
    (zero) preconditioner is found after one restart cycle, not after max_iters products."""
    A = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    x, _ = linear.gmres(lambda v: A @ v, b, rtol=1e-12, fail=True)
    torch.testing.assert_close(A @ x, b, rtol=1e-10, atol=0)
    with pytest.raises(linear.KrylovFailure, match="did not reach its tolerance") as info:
        linear.gmres(lambda v: A @ v, b, precondition=torch.zeros_like, rtol=1e-8, fail=True)
    assert not info.value.non_finite
    with pytest.raises(linear.KrylovFailure, match="non-finite") as info:
        linear.gmres(lambda v: A @ v, b, precondition=lambda v: v * float("nan"), rtol=1e-8, fail=True)
    assert info.value.non_finite
    x, iterations = linear.gmres(lambda v: A @ v, b, precondition=torch.zeros_like, rtol=1e-8)   # the best iterate
    assert iterations <= 2 and torch.equal(x, torch.zeros_like(b))


@pytest.mark.parametrize("method", ["kvaerno5", "rodas5p", "sdirk2"])
def test_a_preconditioner_that_does_not_precondition_is_no_success(method):
    """A zero preconditioner made GMRES return x = 0: Newton took the zero increment for convergence and
    Rosenbrock's zero stages for a zero error, and the solve reported success 1e4 off. Now the steps fail."""
    A = torch.diag(torch.tensor([-1e4, -1.0, -0.5], dtype=torch.float64))
    y0, t = torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = {"jacobian": "krylov", "preconditioner": lambda v, c: torch.zeros_like(v), "max_num_steps": 300}
    if method == "sdirk2":
        options["step_size"] = 0.01
        del options["max_num_steps"]
    solution = neuralode.solve(lambda t, y: y @ A, y0, t, method=method, rtol=1e-6, atol=1e-8, options=options,
                               throw=False)
    assert solution.status != "success"
    options["preconditioner"] = lambda v, c: v.reshape(-1)[:2]
    with pytest.raises(ValueError, match=r"option 'preconditioner' returned \(2,\) for a vector of shape \(3,\)"):
        neuralode.solve(lambda t, y: y @ A, y0, t, method=method, rtol=1e-6, atol=1e-8, options=options)


def test_gmres_refuses_a_non_finite_right_hand_side():
    # rtol * inf made the residual test pass at once and a zero iterate came back as the solution.
    from neuralode.solvers.linear import KrylovFailure

    b = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    with pytest.raises(KrylovFailure, match="non-finite"):
        linear.gmres(lambda v: v, b, fail=True)
    assert torch.isnan(linear.gmres(lambda v: v, b)[0]).all()


# --- the Krylov mode's Jacobian-vector products ---------------------------------------------------------------

class _OnceDifferentiableSquare(torch.autograd.Function):
    """y^2 with a backward that autograd cannot differentiate again (the reverse-mode product must step aside)."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return y * y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return 2 * y * grad


def _fields():
    W = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return {
        "mlp": lambda t, y: torch.tanh(y @ W.T) * (1 + t) - y ** 3,
        "linear": lambda t, y: y @ W.T,
        "constant": lambda t, y: torch.ones_like(y),                       # J = 0, the value carries no graph
        "once_differentiable": lambda t, y: _OnceDifferentiableSquare.apply(y) - y,
    }


@pytest.mark.parametrize("name", ["mlp", "linear", "constant", "once_differentiable"])
@pytest.mark.parametrize("inference", [False, True])
def test_krylov_products_equal_the_dense_jacobian_times_the_vector(name, inference):
    """J v from the recorded double backward, or its fallbacks, equals the dense Jacobian's product to rounding, under
    torch.inference_mode too, and every product is counted in n_jvp."""
    from neuralode.solvers.linear import dense_jacobian, jacobian
    func = _fields()[name]
    y = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vectors = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J = dense_jacobian(func, 0.3, y)
    counters = {"n_jvp": 0}
    context = torch.inference_mode() if inference else torch.no_grad()
    with context:
        linearization = jacobian("krylov", func, 0.3, y.clone(), counters)
        products = [linearization(v) for v in vectors.clone()]
    tolerance = 1e-6 if name == "once_differentiable" else 1e-12
    for v, product in zip(vectors, products):
        torch.testing.assert_close(product.reshape(-1), J @ v.reshape(-1), rtol=tolerance, atol=tolerance)
    assert counters["n_jvp"] == 4
    # (y^2 through a once-differentiable function has no forward-mode rule either: a one-sided difference, whose
    # error is sqrt(eps))
    expected = {"mlp": "reverse", "linear": "reverse", "constant": "forward", "once_differentiable": "difference"}
    assert linearization._how == expected[name]


def test_krylov_solves_count_products_apart_from_evaluations():
    """A product calls no f: nfe counts evaluations only, n_jvp the products, for the Newton and Rosenbrock methods."""
    W = torch.tensor([[-50.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
    calls = []

    def field(t, y):
        calls.append(1)
        return y @ W.T + torch.sin(t)

    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for method in ("kvaerno5", "radau5", "rodas5p"):
        calls.clear()
        sol = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-9, options={"jacobian": "krylov"})
        assert sol.stats["nfe"] == len(calls) and sol.stats["n_jvp"] > 0
        dense = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-9)
        assert sol.status == "success" and dense.stats["n_jvp"] == 0
        torch.testing.assert_close(sol.ys, dense.ys, rtol=1e-5, atol=1e-8)


class _ScaleOnceDifferentiable(torch.autograd.Function):
    """k x with a backward autograd cannot differentiate again."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return k * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad * ctx.k, None


def test_a_dropped_term_beside_a_much_stiffer_component_is_caught():
    """The check compares component by component: a term of rate -2 that the double backward drops, beside a
    component of rate -1e9, passed a check on the largest component, and rodas5 ended 1,360 times its tolerance
    off with status success. Now the record is refused and the answer is the dense one's."""
    from neuralode.solvers.linear import jacobian

    def field(t, y):
        return torch.cat([-1e9 * y[:1], _ScaleOnceDifferentiable.apply(y[1:], -2.0) + torch.cos(t)])

    y0 = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        linearization = jacobian("krylov", field, torch.tensor(0.0, dtype=torch.float64), y0)
        product = linearization(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert linearization._how != "reverse"
    torch.testing.assert_close(product, torch.tensor([0.0, -2.0, 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    t = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    for method in ("rodas5", "kvaerno4"):
        dense = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-9)
        krylov = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-9, options={"jacobian": "krylov"})
        assert krylov.status == "success"
        torch.testing.assert_close(krylov.ys[:, 1:], dense.ys[:, 1:], rtol=1e-5, atol=1e-8)


def test_the_check_does_not_leave_the_fields_domain():
    """A field that refuses a negative concentration: the check of the record (torch.func.jvp, which evaluates f at
    y only) does not call it at y - delta, as a central difference did (ValueError from the check)."""
    def field(t, y):
        if bool(y[2] < 0):
            raise ValueError(f"negative concentration {float(y[2])}")
        return torch.stack([-50 * y[0] + y[1], -y[1], y[2] * y[0]])

    y0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for method in ("kvaerno4", "radau5", "rodas5p"):
        sol = neuralode.solve(field, y0, t, method=method, options={"jacobian": "krylov"})
        assert sol.status == "success" and float(sol.ys[-1, 2]) == 0.0


def test_a_complex_state_is_refused_by_the_krylov_mode_with_what_to_do():
    y0 = torch.tensor([1.0 + 1.0j, 0.5j], dtype=torch.complex128)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for method in ("kvaerno4", "rodas5p"):
        with pytest.raises(ValueError, match="jacobian='krylov' supports real states only.*view_as_real"):
            neuralode.solve(lambda t, y: -50 * y, y0, t, method=method, options={"jacobian": "krylov"})


@pytest.mark.parametrize("mode", ["dense", "batched"])
def test_a_jacobian_under_inference_mode_is_not_zero(mode):
    """Under torch.inference_mode the dense and batched Jacobians were zero, and rodas5p took 1,719 steps for
    y' = -50 y instead of 39."""
    from neuralode.solvers.linear import jacobian
    field = lambda t, y: -50.0 * y  # noqa: E731
    with torch.inference_mode():
        J = jacobian(mode, field, 0.0, torch.ones(2, 3, dtype=torch.float64))
    assert float(J.abs().max()) == 50.0
    y0 = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    normal = neuralode.solve(field, y0, t, method="rodas5p", rtol=1e-6, atol=1e-9, options={"jacobian": mode})
    with torch.inference_mode():
        inference = neuralode.solve(field, y0, t, method="rodas5p", rtol=1e-6, atol=1e-9, options={"jacobian": mode})
    assert inference.stats["n_steps"] == normal.stats["n_steps"]
