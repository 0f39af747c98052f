"""ODEBlock against the real public solver (``neuralode.solve``)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import neuralode
from neuralode.nn import ConcatConv2d, ConcatLinear, ODEBlock, TimeSequential

A = np.array([[-0.5, 1.0], [-1.0, -0.3]])


class Linear(nn.Module):
    """f(t, z) = z A^T: closed-form flow z(t) = expm(t A) z0."""

    def __init__(self, a: np.ndarray) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a))

    def forward(self, t, z):
        return z @ self.a.to(z.dtype).T


def small_field(dim: int = 3) -> TimeSequential:
    return TimeSequential(ConcatLinear(dim, 16), nn.Tanh(), ConcatLinear(16, dim))


def exact(z0: np.ndarray, times) -> np.ndarray:
    return np.stack([z0 @ scipy.linalg.expm((s - times[0]) * A).T for s in times])


@pytest.mark.parametrize("t", [(0.0, 1.0), (0.0, 0.3, 0.6, 1.2), (1.0, 0.0)])
def test_final_state_and_trajectory_match_the_exact_flow(t):
    z0 = torch.randn(5, 2, dtype=torch.float64)
    kw = dict(method="dopri5", rtol=1e-10, atol=1e-12, gradient="direct")
    final = ODEBlock(Linear(A), t, **kw)(z0)
    traj = ODEBlock(Linear(A), t, return_trajectory=True, **kw)(z0)
    assert final.shape == (5, 2)
    assert traj.shape == (len(t), 5, 2)
    expected = torch.as_tensor(exact(z0.numpy(), t))
    torch.testing.assert_close(traj, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(final, traj[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(traj[0], z0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_dtype_and_shape_are_kept(dtype, gradient):
    block = ODEBlock(ConcatConv2d(2, 2, 3, padding=1), gradient=gradient).to(dtype)
    x = torch.randn(3, 2, 5, 5, dtype=dtype, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.square().sum().backward()
    assert x.grad.dtype == dtype
    for p in block.parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()


def test_fixed_step_method_takes_the_expected_number_of_evaluations():
    block = ODEBlock(small_field(), method="rk4", options={"step_size": 0.25}, gradient="direct")
    block(torch.randn(4, 3))
    assert block.nfe_forward == 16  # 4 steps x 4 stages


def test_nfe_forward_and_backward_are_reported():
    block = ODEBlock(small_field(), gradient="adjoint")
    assert block.nfe_forward is None and block.nfe_backward is None
    x = torch.randn(8, 3)
    y = block(x)
    assert isinstance(block.nfe_forward, int) and block.nfe_forward > 0
    assert block.nfe_backward is None  # no backward yet
    y.sum().backward()
    assert isinstance(block.nfe_backward, int) and block.nfe_backward > 0
    block(x)  # a new call forgets the old backward count
    assert block.nfe_backward is None


def test_adjoint_gradients_match_direct_gradients():
    torch.manual_seed(0)
    field = small_field().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    target = torch.randn(6, 3, dtype=torch.float64)

    def grads(gradient):
        field.zero_grad()
        xx = x.clone().requires_grad_(True)
        block = ODEBlock(field, (0.0, 1.5), method="dopri5", rtol=1e-10, atol=1e-12, gradient=gradient)
        loss = (block(xx) - target).square().sum()
        loss.backward()
        return [xx.grad.clone()] + [p.grad.clone() for p in field.parameters()]

    for g_adj, g_dir in zip(grads("adjoint"), grads("direct")):
        torch.testing.assert_close(g_adj, g_dir, rtol=1e-6, atol=1e-8)


def test_gradient_strategy_objects_are_passed_to_the_solver():
    import neuralode

    block = ODEBlock(small_field(), gradient=neuralode.Adjoint(rtol=1e-5, atol=1e-6, seminorm=True))
    block(torch.randn(4, 3)).sum().backward()
    assert block.nfe_backward > 0
    block = ODEBlock(small_field(), gradient=neuralode.Direct())
    block(torch.randn(4, 3)).sum().backward()
    assert block.nfe_backward is None


def test_plain_callable_with_explicit_adjoint_params():
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    block = ODEBlock(lambda t, z: torch.tanh(z @ w), adjoint_params=[w], rtol=1e-9, atol=1e-9)
    block(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert list(block.parameters()) == []


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_one_tensor_as_adjoint_params_is_one_parameter(gradient):
    """adjoint_params=W (not [W]) trains W, as solve does; it used to be split into row views, W's gradient 0."""
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for params in (w, [w]):
        w.grad = None
        ODEBlock(lambda t, z: torch.tanh(z @ w), gradient=gradient, adjoint_params=params, rtol=1e-9,
                 atol=1e-9)(x).pow(2).sum().backward()
        grads.append(w.grad.clone())
    assert float(grads[1].abs().sum()) > 0.1
    torch.testing.assert_close(grads[0], grads[1], rtol=0.0, atol=0.0)


def test_to_cpu_and_state_dict_round_trip():
    block = ODEBlock(small_field()).to("cpu")
    other = ODEBlock(small_field())
    other.load_state_dict(block.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(block(x), other(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_cuda(gradient):
    block = ODEBlock(small_field(), gradient=gradient, kinetic=True, frobenius=True).to("cuda")
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    y = block(x)
    assert y.device.type == "cuda" and block.kinetic_energy.device.type == "cuda"
    (y.sum() + block.jacobian_frobenius.sum()).backward()
    assert x.grad.device.type == "cuda"


def test_errors_name_the_argument_and_the_fix():
    f = small_field()
    with pytest.raises(ValueError, match=r"t needs at least two times.*\(0.0, 1.0\)"):
        ODEBlock(f, t=(0.0,))
    with pytest.raises(ValueError, match="t must be strictly increasing or strictly decreasing"):
        ODEBlock(f, t=(0.0, 1.0, 0.5))
    # a learnable end time would silently get no gradient (the block keeps its times as numbers)
    with pytest.raises(ValueError, match=r"t requires grad.*neuralode.solve"):
        ODEBlock(f, t=torch.nn.Parameter(torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match=r"t holds a tensor that requires grad"):
        ODEBlock(f, t=(0.0, torch.tensor(1.0, requires_grad=True)))
    # a fixed-step method without a step is refused where the block is built, not at its first call
    with pytest.raises(ValueError, match=r"method 'rk4' takes fixed steps: give options=\{'step_size': h\}"):
        ODEBlock(f, method="rk4")
    # the regularisers sum over the features of each sample: a 1-D input has none (was an IndexError)
    with pytest.raises(ValueError, match=r"batch dimension first and features after it"):
        ODEBlock(lambda t, z: -z, kinetic=True)(torch.randn(3))
    with pytest.raises(TypeError, match="t must be a pair"):
        ODEBlock(f, t=1.0)
    with pytest.raises(TypeError, match=r"t must hold real times, got a complex tensor.*t\.real"):
        ODEBlock(f, t=torch.tensor([0.0, 1.0 + 1j]))
    # a NumPy array of times is a 1-D sequence of times (it was refused)
    import numpy as np
    assert ODEBlock(f, t=np.array([0.0, 0.5, 1.0]), return_trajectory=True)(torch.randn(2, 3)).shape == (3, 2, 3)
    with pytest.raises(ValueError,
                       match=r"gradient must be one of \['direct', 'adjoint', 'checkpoint', 'reversible'\], got 'adj'"):
        ODEBlock(f, gradient="adj")
    with pytest.raises(TypeError, match=r"gradient must be one of .* or a gradient strategy object .*got int"):
        ODEBlock(f, gradient=3)
    with pytest.raises(ValueError, match="rtol must be a finite non-negative float, got -0.001"):
        ODEBlock(f, rtol=-1e-3)
    with pytest.raises(ValueError, match="rtol and atol are both zero"):
        ODEBlock(f, rtol=0.0, atol=0.0)
    ODEBlock(f, rtol=1e-6, atol=0.0)  # a zero atol is legal, as in neuralode.solve
    with pytest.raises(TypeError, match="method must be a str"):
        ODEBlock(f, method=5)
    with pytest.raises(TypeError, match="func must be callable"):
        ODEBlock(3)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ODEBlock(f)(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probe must be one of \['gaussian', 'rademacher'\]"):
        ODEBlock(f, probe="uniform")


# --- per-sample stepping -------------------------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return neuralode.nn.TimeSequential(neuralode.nn.ConcatLinear(3, 16), torch.nn.Tanh(),
                                       neuralode.nn.ConcatLinear(16, 3)).double()


@pytest.mark.parametrize("gradient", ["adjoint", "direct"])
def test_per_sample_block_outputs_do_not_depend_on_the_batch(gradient):
    func = _mlp()
    block = neuralode.nn.ODEBlock(func, rtol=1e-8, atol=1e-8, per_sample=True, gradient=gradient)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [[0.1], [1.0], [3.0], [0.5], [2.0]], dtype=torch.float64)
    out = block(x)
    for b in range(5):
        torch.testing.assert_close(block(x[b:b + 1])[0], out[b], rtol=0, atol=1e-12)
    # The time-concatenating layers got one time per sample; the gradient reaches the weights.
    out.square().sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in func.parameters())
    assert "per_sample=True" in repr(block)


def test_per_sample_block_gradients_match_between_strategies():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for gradient in ("direct", "adjoint", "checkpoint"):
        func = _mlp(seed=3)
        neuralode.nn.ODEBlock(func, rtol=1e-10, atol=1e-10, per_sample=True, gradient=gradient)(x).square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in func.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-12, atol=1e-12)   # checkpointing: the same steps


@pytest.mark.parametrize("kwargs", [{"kinetic": True}, {"frobenius": True}])
def test_per_sample_block_refuses_what_it_cannot_do(kwargs):
    with pytest.raises(ValueError, match="per_sample=True does not combine"):
        neuralode.nn.ODEBlock(_mlp(), per_sample=True, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="rk5"), "unknown method 'rk5'. Did you mean 'rk4'"),
    (dict(method="dopri5", options={"step_size": 0.1}), "option 'step_size' means nothing for method 'dopri5'"),
])
def test_unknown_method_or_option_fails_when_the_block_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ODEBlock(lambda t, z: -z, **kwargs)


def test_the_times_can_be_read_and_set_as_t():
    """torchdyn users set model.t_span; block.t = ... was an attribute nothing read."""
    block = ODEBlock(lambda t, z: -z, gradient="direct")
    x = torch.ones(2, dtype=torch.float64)
    assert block.t == (0.0, 1.0)
    block.t = (0.0, 2.0)
    assert block.times == (0.0, 2.0)
    torch.testing.assert_close(block(x), x * np.exp(-2.0), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="t must be strictly increasing or strictly decreasing"):
        block.t = (1.0, 1.0)


def test_an_interpolating_adjoint_the_method_cannot_serve_is_refused_where_the_block_is_built():
    """It raised at the first forward pass, after the block had been built into a model."""
    with pytest.raises(ValueError, match=r"Adjoint\(interpolate=True\) would differentiate along a piecewise-linear"):
        ODEBlock(lambda t, z: -z, method="rk4", options={"step_size": 0.1},
                 gradient=neuralode.Adjoint(interpolate=True))
    ODEBlock(lambda t, z: -z, method="rk4", options={"step_size": 0.1, "interp": "cubic"},
             gradient=neuralode.Adjoint(interpolate=True))


def test_times_on_the_meta_device_are_named():
    """They raised torch's 'Cannot copy out of meta tensor; no data!'."""
    with pytest.raises(ValueError, match="t is on the 'meta' device"):
        ODEBlock(lambda t, z: -z, t=torch.tensor([0.0, 1.0], device="meta"))
