"""Time-concatenating layers, TimeSequential and Autonomous."""

import pytest
import torch
from torch import nn

from neuralode.nn import Autonomous, ConcatConv1d, ConcatConv2d, ConcatLinear, TimeSequential

DTYPES = [torch.float32, torch.float64]

LAYERS = [
    (lambda: ConcatLinear(3, 5), (4, 3), (4, 5)),
    (lambda: ConcatLinear(3, 5), (2, 7, 3), (2, 7, 5)),
    (lambda: ConcatConv1d(3, 5, 3, padding=1), (4, 3, 11), (4, 5, 11)),
    (lambda: ConcatConv1d(3, 5, 4, stride=2, padding=1), (4, 3, 11), (4, 5, 5)),
    (lambda: ConcatConv2d(3, 5, 3, padding=1), (2, 3, 6, 7), (2, 5, 6, 7)),
    (lambda: ConcatConv2d(3, 5, 4, 2, 1), (2, 3, 8, 8), (2, 5, 4, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make, in_shape, out_shape", LAYERS)
def test_shapes_and_dtypes(make, in_shape, out_shape, dtype):
    layer = make().to(dtype)
    for t in (torch.tensor(0.3, dtype=dtype), 0.3, torch.tensor([0.3], dtype=torch.float64)):
        y = layer(t, torch.randn(in_shape, dtype=dtype))
        assert y.shape == out_shape
        assert y.dtype == dtype


@pytest.mark.parametrize("make, in_shape, out_shape", LAYERS)
def test_time_enters_as_a_constant_extra_input(make, in_shape, out_shape):
    # The layer equals the wrapped layer applied to [t, x] along the feature/channel dimension.
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(in_shape, dtype=torch.float64)
    t = 0.7
    inner = layer.linear if isinstance(layer, ConcatLinear) else layer.conv
    dim = -1 if isinstance(layer, ConcatLinear) else 1
    shape = list(x.shape)
    shape[dim] = 1
    expected = inner(torch.cat([torch.full(shape, t, dtype=x.dtype), x], dim=dim))
    torch.testing.assert_close(layer(torch.tensor(t, dtype=torch.float64), x), expected, rtol=0, atol=0)
    assert not torch.allclose(layer(0.0, x), layer(1.0, x))


def test_parameter_counts_have_one_extra_input():
    assert sum(p.numel() for p in ConcatLinear(4, 6).parameters()) == 5 * 6 + 6
    assert sum(p.numel() for p in ConcatConv1d(4, 6, 3).parameters()) == 5 * 6 * 3 + 6
    assert sum(p.numel() for p in ConcatConv2d(64, 64, 3).parameters()) == 65 * 64 * 9 + 64


def test_time_sequential_dispatches_time_and_autonomous_ignores_it():
    torch.manual_seed(0)
    f = TimeSequential(ConcatLinear(2, 8), nn.Tanh(), ConcatLinear(8, 2))
    x = torch.randn(3, 2)
    expected = f.layers[2](0.5, torch.tanh(f.layers[0](0.5, x)))
    torch.testing.assert_close(f(torch.tensor(0.5), x), expected)
    g = Autonomous(nn.Linear(2, 2))
    torch.testing.assert_close(g(0.0, x), g(3.0, x))
    torch.testing.assert_close(g(0.0, x), g.module(x))


def test_to_cpu_keeps_working():
    layer = ConcatConv2d(2, 3, 3, padding=1).to("cpu")
    assert layer(torch.tensor(0.0), torch.randn(1, 2, 4, 4)).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    for make, in_shape, out_shape in LAYERS:
        layer = make().to("cuda")
        y = layer(torch.tensor(0.5), torch.randn(in_shape, device="cuda"))  # a CPU time is moved
        assert y.device.type == "cuda" and y.shape == out_shape


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 3\)"):
        ConcatLinear(3, 2)(0.0, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\) with C=3"):
        ConcatConv2d(3, 2)(0.0, torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, L\) with C=3"):
        ConcatConv1d(3, 2)(0.0, torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        ConcatLinear(0, 2)
    with pytest.raises(TypeError, match="out_channels must be an int"):
        ConcatConv2d(3, 2.5)
    with pytest.raises(ValueError, match="t must be a scalar time"):
        ConcatLinear(3, 2)(torch.zeros(2), torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"layers\[1\] must be an nn.Module"):
        TimeSequential(ConcatLinear(2, 2), torch.tanh)
    with pytest.raises(ValueError, match="at least one layer"):
        TimeSequential()


def test_second_order_solves_the_oscillator_in_closed_form():
    # x'' = -w^2 x - 2 c x' from x(0) = 1, x'(0) = 0: the underdamped closed form, to the solver's tolerance
    import math

    import neuralode
    from neuralode.nn import SecondOrder

    w, c = 2.0, 0.3
    field = SecondOrder(lambda t, z: -w ** 2 * z[:, :1] - 2 * c * z[:, 1:])
    z0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    z = neuralode.odeint(field, z0, t, rtol=1e-10, atol=1e-12)
    wd = math.sqrt(w ** 2 - c ** 2)
    exact = torch.exp(-c * t) * (torch.cos(wd * t) + c / wd * torch.sin(wd * t))
    torch.testing.assert_close(z[:, 0, 0], exact, rtol=0, atol=1e-8)
    # the velocity half is the derivative of the position half
    velocity = -torch.exp(-c * t) * (w ** 2 / wd) * torch.sin(wd * t)
    torch.testing.assert_close(z[:, 0, 1], velocity, rtol=0, atol=1e-8)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_second_order_block_on_images_and_vectors(gradient):
    from neuralode.nn import AugmentedODEBlock, ODEBlock, SecondOrder

    torch.manual_seed(0)
    # channels: the module sees [x, v] (4 channels) and returns the acceleration (2 channels)
    conv = SecondOrder(TimeSequential(ConcatConv2d(4, 2, 3, padding=1)))
    z = torch.randn(3, 4, 5, 5, requires_grad=True)
    out = ODEBlock(conv, gradient=gradient)(z)
    assert out.shape == z.shape
    out.square().mean().backward()
    assert torch.isfinite(z.grad).all() and all(torch.isfinite(p.grad).all() for p in conv.parameters())
    # a learnt initial velocity is not needed: augmenting with D zeros starts from v0 = 0
    block = AugmentedODEBlock(SecondOrder(Autonomous(nn.Linear(6, 3))), augment_dim=3, rtol=1e-8, atol=1e-8)
    x = torch.randn(5, 3, dtype=torch.float64)
    block.double()
    with torch.no_grad():
        out = block(x)
        g = block.func.module.module
        # first step of the exact flow: x(h) ~ x + h^2/2 g(x, 0) for a short span
        block.t = (0.0, 1e-3)
        short = block(x)
    assert out.shape == (5, 6)
    # per-sample stepping: the module receives one time per sample, and each sample matches its solve alone
    vector = SecondOrder(TimeSequential(ConcatLinear(4, 8), nn.Tanh(), ConcatLinear(8, 2))).double()
    z0 = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        joint = ODEBlock(vector, per_sample=True, rtol=1e-9, atol=1e-9)(z0)
        alone = torch.cat([ODEBlock(vector, rtol=1e-9, atol=1e-9)(z0[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(joint, alone, rtol=0, atol=1e-8)
    expected = x + 0.5e-6 * g(torch.cat([x, torch.zeros_like(x)], 1))
    torch.testing.assert_close(short[:, :3], expected, rtol=0, atol=1e-10)


def test_second_order_errors_name_the_shapes():
    from neuralode.nn import SecondOrder

    with pytest.raises(TypeError, match="module must be a callable"):
        SecondOrder(3)
    with pytest.raises(TypeError, match="dim must be an int"):
        SecondOrder(lambda t, z: z, dim="1")
    with pytest.raises(ValueError, match=r"even size along dim=1, got shape \(2, 3\)"):
        SecondOrder(lambda t, z: z)(0.0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"must return the acceleration, of shape \(2, 2\).*got \(2, 4\)"):
        SecondOrder(lambda t, z: z)(0.0, torch.zeros(2, 4))
    assert "dim=1" in repr(SecondOrder(Autonomous(nn.Identity())))
