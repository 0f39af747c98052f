"""Dtypes and devices: float32/float64/complex states, time handed to func in the state's real dtype
(never silently mixed), outputs in the state's dtype; CUDA tests skip cleanly without CUDA."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

import neuralode

F64 = torch.float64
REAL_OF = {torch.float32: torch.float32, torch.float64: torch.float64, torch.complex64: torch.float32,
           torch.complex128: torch.float64, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


def checked(f, dtype, device="cpu"):
    """Wrap f so that every call asserts the dtypes and devices it receives."""
    seen = []

    def g(t, y):
        assert isinstance(t, torch.Tensor) and t.ndim == 0
        assert t.dtype == REAL_OF[dtype], t.dtype
        assert y.dtype == dtype, y.dtype
        assert t.device.type == y.device.type == torch.device(device).type
        seen.append(float(t))
        return f(t, y)

    g.seen = seen
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_real_dtypes(dtype, t_dtype, method):
    y0 = torch.tensor([1.0, 2.0], dtype=dtype)
    t = torch.linspace(0, 1, 5, dtype=t_dtype)
    f = checked(lambda t, y: -y * (1 + t), dtype)
    options = {"step_size": 0.01, "interp": "cubic"} if method == "rk4" else None
    rtol = 1e-5 if dtype == torch.float32 else 1e-9
    sol = neuralode.solve(f, y0, t, method=method, rtol=rtol, atol=rtol * 1e-2, options=options)
    assert sol.ys.dtype == dtype and sol.ts.dtype == t_dtype and torch.equal(sol.ts, t)
    exact = torch.exp(-(t.double() + t.double() ** 2 / 2))[:, None] * y0.double()
    tol = 1e-4 if dtype == torch.float32 else 1e-7
    assert (sol.ys.double() - exact).abs().max() < tol
    assert f.seen


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "rk4"])
def test_complex_states(dtype, method):
    """dy/dt = i y, y(0) = 1: y = exp(i t)."""
    y0 = torch.ones(3, dtype=dtype)
    t = torch.linspace(0, 2 * math.pi, 5, dtype=F64)
    f = checked(lambda t, y: 1j * y, dtype)
    options = {"step_size": 0.01, "interp": "cubic"} if method == "rk4" else None
    rtol = 1e-5 if dtype == torch.complex64 else 1e-9
    sol = neuralode.solve(f, y0, t, method=method, rtol=rtol, atol=rtol * 1e-2, options=options)
    assert sol.ys.dtype == dtype
    exact = torch.tensor([cmath.exp(1j * s) for s in t.tolist()], dtype=torch.complex128)
    tol = 2e-4 if dtype == torch.complex64 else 1e-7  # global error over a period: ~10-20 x rtol
    assert (sol.ys.to(torch.complex128) - exact[:, None]).abs().max() < tol


def test_complex_tolerance_uses_modulus():
    """A purely imaginary error is controlled as well as a real one: i y and -i y take the same steps."""
    t = torch.tensor([0.0, 3.0], dtype=F64)
    y0 = torch.ones(2, dtype=torch.complex128)
    a = neuralode.solve(lambda t, y: 1j * y, y0, t)
    b = neuralode.solve(lambda t, y: -1j * y, y0, t)
    assert a.stats["n_steps"] == b.stats["n_steps"]
    assert torch.allclose(a.ys, b.ys.conj(), atol=1e-12)


def test_tuple_state_time_dtype():
    y0 = (torch.ones(2), torch.ones(1))
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return (-y[0], -y[1])

    sol = neuralode.solve(f, y0, torch.tensor([0.0, 1.0], dtype=F64))
    assert set(seen) == {torch.float32}
    assert sol.ys[0].dtype == torch.float32


def test_float32_time_precision_is_kept_internally():
    """Times stay float64 inside the loop: a float32 state started at t0 = 1e5 (where float32 spacing is
    ~0.008) still lands on the output times exactly and integrates the right span."""
    t = torch.tensor([1e5, 1e5 + 0.5], dtype=F64)
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(1), t, dense=True)
    assert float(sol.ys[-1]) == pytest.approx(0.5, rel=1e-6)
    assert sol.step_times.dtype == F64 and float(sol.step_times[-1]) == 1e5 + 0.5


def test_event_time_dtype_follows_t():
    sol = neuralode.solve(lambda t, y: -torch.ones_like(y), torch.ones(1), torch.tensor([0.0, 3.0], dtype=F64),
                          event_fn=lambda t, y: y[0])
    assert sol.event_t.dtype == F64 and float(sol.event_t) == pytest.approx(1.0, abs=1e-6)


def test_gradients_keep_dtype():
    y0 = torch.ones(2, requires_grad=True)
    ys = neuralode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]))
    ys[-1].sum().backward()
    assert y0.grad.dtype == torch.float32
    assert torch.allclose(y0.grad, torch.full((2,), math.exp(-1.0)), rtol=1e-5)


class _TanhLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, t, y):
        return torch.tanh(self.linear(y))


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_autocast_field_keeps_a_full_precision_state(gradient, per_sample):
    """Under torch.autocast the field returns bfloat16 for a float32 state (mixed-precision training): the solve
    accepts it, keeps the state float32, and its values and gradients match the float32 solve to bfloat16's
    precision. Outside autocast the same dtype mismatch stays an error (test_input_errors)."""
    torch.manual_seed(0)
    field, y0, t = _TanhLinear(), torch.randn(8, 4), torch.tensor([0.0, 1.0])
    kwargs = dict(gradient=gradient, per_sample=per_sample, rtol=1e-3, atol=1e-3)
    full = neuralode.solve(field, y0, t, **kwargs).ys[-1]
    full.sum().backward()
    full_grad, field.linear.weight.grad = field.linear.weight.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = neuralode.solve(field, y0, t, **kwargs).ys[-1]
    assert mixed.dtype == torch.float32
    mixed.sum().backward()
    assert field.linear.weight.grad.dtype == torch.float32
    bf16_eps = torch.finfo(torch.bfloat16).eps
    assert (mixed - full).abs().max() < 4 * bf16_eps
    assert (field.linear.weight.grad - full_grad).norm() < 4 * bf16_eps * full_grad.norm()
    assert (mixed - full).abs().max() > 0   # the field did run in bfloat16


def test_autocast_with_a_dtype_other_than_its_own_is_still_an_error():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="returned dtype torch.float16"):
        neuralode.solve(lambda t, y: (-y).half(), torch.ones(3), torch.tensor([0.0, 1.0]))


def test_meta_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"t is on meta but y0 is on cpu"):
        neuralode.solve(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0], device="meta"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_cuda_solve_matches_cpu(dtype, method):
    y0 = torch.tensor([1.0, 2.0], dtype=dtype)
    t = torch.linspace(0, 1, 5, dtype=F64)
    options = {"step_size": 0.05} if method == "rk4" else None
    cpu = neuralode.solve(lambda t, y: -y * (1 + t), y0, t, method=method, options=options)
    f = checked(lambda t, y: -y * (1 + t), dtype, device="cuda")
    gpu = neuralode.solve(f, y0.cuda(), t.cuda(), method=method, options=options)
    assert gpu.ys.device.type == "cuda" and gpu.ys.dtype == dtype
    assert gpu.stats["n_steps"] == cpu.stats["n_steps"]
    assert torch.allclose(gpu.ys.cpu(), cpu.ys, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_events_and_dense_output():
    y0 = torch.tensor([10.0, 0.0], dtype=F64, device="cuda")
    f = lambda t, y: torch.stack([y[1], torch.full_like(y[1], -9.81)])  # noqa: E731
    sol = neuralode.solve(f, y0, torch.tensor([0.0, 10.0], dtype=F64, device="cuda"), event_fn=lambda t, y: y[0],
                          dense=True)
    assert float(sol.event_t) == pytest.approx(math.sqrt(20 / 9.81), abs=1e-9)
    assert sol.evaluate(0.5).device.type == "cuda"
