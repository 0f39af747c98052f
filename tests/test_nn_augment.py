"""Augmentation with zero dimensions (Dupont et al. 2019)."""

import pytest
import torch

from neuralode.nn import Augment, AugmentedODEBlock, Autonomous, ConcatConv2d, ConcatLinear, TimeSequential, augment


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 10), (4, 3, 5, 6)])
def test_adds_zero_channels(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    y = Augment(2)(x)
    assert y.shape == (shape[0], shape[1] + 2, *shape[2:])
    assert y.dtype == dtype
    torch.testing.assert_close(y[:, :3], x, rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 3:]) == 0


def test_zero_augmentation_and_other_dims():
    x = torch.randn(2, 3)
    assert augment(x, 0) is x
    assert augment(x, 2, dim=-1).shape == (2, 5)
    assert augment(torch.randn(2, 3, 4), 1, dim=2).shape == (2, 3, 5)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_augmented_ode_block_output_shape(gradient):
    torch.manual_seed(0)
    block = AugmentedODEBlock(
        TimeSequential(ConcatLinear(5, 8), torch.nn.Tanh(), ConcatLinear(8, 5)), augment_dim=3, gradient=gradient
    )
    x = torch.randn(4, 2, requires_grad=True)
    y = block(x)
    assert y.shape == (4, 5)
    y.sum().backward()
    assert x.grad.shape == (4, 2) and torch.isfinite(x.grad).all()

    conv = AugmentedODEBlock(ConcatConv2d(3, 3, 3, padding=1), augment_dim=2, return_trajectory=True, t=[0, 0.5, 1])
    assert conv(torch.randn(2, 1, 4, 4)).shape == (3, 2, 3, 4, 4)


def test_errors():
    with pytest.raises(ValueError, match="augment_dim must be a non-negative integer, got -1"):
        Augment(-1)
    with pytest.raises(TypeError, match="augment_dim must be an int"):
        Augment(1.5)
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        Augment(1, dim=3)(torch.randn(2, 3))
    for bad in (True, "1", 1.0):
        for build in (lambda d: Augment(1, dim=d), lambda d: AugmentedODEBlock(lambda t, z: -z, 1, dim=d)):
            with pytest.raises(TypeError, match="dim must be an int"):
                build(bad)


def test_a_field_of_the_input_width_is_told_the_augmented_width():
    # The usual mistake: a field of the input's width D where it sees D + augment_dim. torch's error names matrix
    # sizes only; the notes name the first evaluation, the state's shape and the augmented width.
    for field, error in ((torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)),
                          "shapes cannot be multiplied"),
                         (TimeSequential(ConcatLinear(2, 8), torch.nn.Tanh(), ConcatLinear(8, 2)),
                          r"x must have shape \(\*, 2\)")):
        block = AugmentedODEBlock(field if isinstance(field, TimeSequential) else Autonomous(field), augment_dim=3)
        with pytest.raises((RuntimeError, ValueError), match=error) as info:
            block(torch.randn(4, 2))
        notes = "\n".join(getattr(info.value, "__notes__", [str(info.value)]))
        assert "first evaluation func(t0, y0), with y0 of shape (4, 5)" in notes
        assert "2 + augment_dim=3 = 5 along dim 1" in notes
    # an error later in the solve, or of another kind, is passed on without the block's note
    calls = []

    def fails_later(t, z):
        calls.append(t)
        if len(calls) > 3:
            raise RuntimeError("the field's own failure")
        return -z

    with pytest.raises(RuntimeError, match="the field's own failure") as info:
        AugmentedODEBlock(fails_later, augment_dim=1)(torch.randn(4, 2))
    assert not getattr(info.value, "__notes__", [])
