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
