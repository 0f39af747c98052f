"""MLP, ResNet, RK-Net and ODE-Net classifiers for vectors, sequences and images."""

import pytest
import torch
from torch import nn

from neuralode.models import (
    MLP,
    MODEL_NAMES,
    PAPER_PARAMETER_COUNTS,
    ODENet,
    ResNet,
    RKNet,
    build_model,
    count_parameters,
    image_classifier,
    sequence_classifier,
    vector_classifier,
)
from neuralode.nn import ConcatLinear, ODEBlock, TimeSequential

# Small variants of every model, so that the suite stays fast; the sizes are the only difference.
SMALL = {
    "mnist": dict(channels=8, image_size=12),
    "ecg": dict(channels=4, length=40),
    "vector": dict(in_features=2, num_classes=3, hidden=8, augment_dim=1),
}
INPUT_SHAPES = {"mnist": (3, 1, 12, 12), "ecg": (3, 1, 40), "vector": (3, 2)}
CLASSES = {"mnist": 10, "ecg": 5, "vector": 3}


def small(name: str) -> nn.Module:
    domain, kind = name.split("_")
    kwargs = dict(SMALL[domain])
    if kind == "mlp" and domain == "mnist":
        kwargs.pop("channels")
    elif kind == "mlp" and domain == "ecg":
        kwargs.pop("channels")
        kwargs["hidden_features"] = 8
    elif kind == "mlp":
        kwargs.pop("augment_dim")
    return build_model(name, **kwargs)


def test_mnist_parameter_counts_match_chen_et_al():
    counts = {name: count_parameters(build_model(name)) for name in PAPER_PARAMETER_COUNTS}
    # Exact values of this implementation (the layout of torchdiffeq's examples/odenet_mnist.py).
    assert counts == {"mnist_mlp": 238_510, "mnist_resnet": 576_778, "mnist_rknet": 208_266, "mnist_odenet": 208_266}
    # Table 1 of the paper: 0.24M, 0.60M, 0.22M, 0.22M. MLP and ResNet are within 5%. The ODE/RK nets
    # are the model of the paper's released code, which has 208,266 parameters (torchdiffeq issue #32,
    # "MNIST: ODEBlock possibly redundant?", counts that model as the one behind the 0.42% row), 5.3%
    # under the table's rounded 0.22M; no layer of that layout can be dropped or added to close the
    # gap, so the exact count above is the check that matters and those two are held to 6% here.
    for name, paper in PAPER_PARAMETER_COUNTS.items():
        tolerance = 0.06 if name in ("mnist_rknet", "mnist_odenet") else 0.05
        assert abs(counts[name] - paper) <= tolerance * paper, (name, counts[name], paper)


def test_ecg_parameter_counts_and_shapes_at_default_size():
    counts = {kind: count_parameters(sequence_classifier(kind)) for kind in ("mlp", "resnet", "rknet", "odenet")}
    assert counts == {"mlp": 24_709, "resnet": 53_061, "rknet": 22_213, "odenet": 22_213}
    model = sequence_classifier("resnet")
    assert model(torch.randn(2, 1, 187)).shape == (2, 5)
    assert model.stem(torch.randn(2, 1, 187)).shape == (2, 32, 46)


def test_mnist_models_downsample_to_7x7_and_give_10_logits():
    model = build_model("mnist_resnet")
    x = torch.randn(2, 1, 28, 28)
    assert model.stem(x).shape == (2, 64, 7, 7)
    assert model(x).shape == (2, 10)
    assert build_model("mnist_mlp")(x).shape == (2, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_dtypes_and_a_training_step(name, dtype):
    torch.manual_seed(0)
    domain = name.split("_")[0]
    model = small(name).to(dtype)
    x = torch.randn(INPUT_SHAPES[domain], dtype=dtype)
    labels = torch.randint(0, CLASSES[domain], (x.shape[0],))
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-2)
    logits = model(x)
    assert logits.shape == (x.shape[0], CLASSES[domain])
    assert logits.dtype == dtype
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all(), pname
    optimiser.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_an_empty_batch_gives_empty_logits(name):
    """(the MLPs' feature check indexed the first sample, an IndexError for a batch of 0)"""
    domain = name.split("_")[0]
    x = torch.randn((0, *INPUT_SHAPES[domain][1:]))
    assert small(name)(x).shape == (0, CLASSES[domain])


def test_gradient_strategies_of_each_family():
    rk = build_model("vector_rknet", in_features=2, num_classes=2)
    ode = build_model("vector_odenet", in_features=2, num_classes=2)
    assert rk.block.gradient == "direct" and rk.block.method == "rk4" and rk.block.options == {"step_size": 0.25}
    assert ode.block.gradient == "adjoint" and ode.block.method == "dopri5"
    x = torch.randn(4, 2)
    rk(x).sum().backward()
    assert rk.nfe_forward == 16 and rk.nfe_backward is None
    ode(x).sum().backward()
    assert ode.nfe_forward > 0 and ode.nfe_backward > 0


def test_builders_return_the_right_family():
    families = {"mlp": MLP, "resnet": ResNet, "rknet": RKNet, "odenet": ODENet}
    for kind, cls in families.items():
        assert type(vector_classifier(kind, in_features=2, num_classes=2)) is cls
        assert type(sequence_classifier(kind, channels=4)) is cls
        assert type(image_classifier(kind, channels=8)) is cls
    augmented = vector_classifier("odenet", in_features=2, num_classes=2, augment_dim=3)
    assert augmented.stem(torch.randn(4, 2)).shape == (4, 5)


def test_rknet_and_odenet_share_the_vector_field_layout():
    rk, ode = build_model("ecg_rknet"), build_model("ecg_odenet")
    assert [tuple(p.shape) for p in rk.parameters()] == [tuple(p.shape) for p in ode.parameters()]
    ode.load_state_dict(rk.state_dict())  # same names too


def test_solver_settings_reach_the_block():
    model = image_classifier("odenet", channels=8, rtol=1e-4, atol=1e-5, method="bosh3", gradient="checkpoint")
    assert (model.block.rtol, model.block.atol, model.block.method, model.block.gradient) == (
        1e-4, 1e-5, "bosh3", "checkpoint"
    )
    model = sequence_classifier("rknet", channels=4, method="midpoint", step_size=0.5, t=(0.0, 2.0))
    assert model.block.options == {"step_size": 0.5} and model.block.times == (0.0, 2.0)


def test_generic_families_compose():
    field = TimeSequential(ConcatLinear(3, 8), nn.Tanh(), ConcatLinear(8, 3))
    model = ODENet(nn.Identity(), field, nn.Linear(3, 2), kinetic=True)
    assert isinstance(model.block, ODEBlock)
    model(torch.randn(5, 3))
    assert model.block.kinetic_energy.shape == (5,)
    resnet = ResNet(nn.Identity(), [nn.Linear(3, 3), nn.Linear(3, 3)], nn.Linear(3, 2))
    x = torch.randn(5, 3)
    z = x + resnet.blocks[0].f(x)
    torch.testing.assert_close(resnet(x), resnet.head(z + resnet.blocks[1].f(z)))
    assert MLP(6, (4, 4), 2)(torch.randn(5, 2, 3)).shape == (5, 2)


def test_device_move_to_cpu():
    model = small("ecg_odenet").to("cpu")
    assert model(torch.randn(2, 1, 40)).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda(name):
    domain = name.split("_")[0]
    model = small(name).to("cuda")
    logits = model(torch.randn(INPUT_SHAPES[domain], device="cuda"))
    assert logits.device.type == "cuda"
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters())


def test_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match=r"name must be one of \[.*'mnist_odenet'.*\], got 'mnist_odnet'"):
        build_model("mnist_odnet")
    with pytest.raises(ValueError, match=r"kind must be one of \['mlp', 'resnet', 'rknet', 'odenet'\]"):
        image_classifier("vgg")
    with pytest.raises(TypeError, match=r"\['rtol'\] are solver arguments, which kind='resnet' does not take"):
        sequence_classifier("resnet", rtol=1e-3)
    with pytest.raises(ValueError, match="method must be a fixed-step Runge-Kutta method.*got 'dopri5'; use ODENet"):
        build_model("ecg_rknet", method="dopri5")
    with pytest.raises(TypeError, match="gradient is not an RKNet argument"):
        build_model("ecg_rknet", gradient="adjoint")
    with pytest.raises(ValueError, match="step_size must be a finite positive float, got 0.0"):
        build_model("ecg_rknet", step_size=0.0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        sequence_classifier("odenet", kernel_size=4)
    with pytest.raises(ValueError, match="channels must be a positive integer, got 0"):
        image_classifier("resnet", channels=0)
    with pytest.raises(TypeError, match=r"hidden_features must be a sequence of ints such as \(300,\)"):
        MLP(4, 300, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, \*\) with 4 features per sample"):
        MLP(4, (3,), 2)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="vector_classifier.*in_features|missing.*in_features"):
        build_model("vector_odenet")
    with pytest.raises(ValueError, match="residual_fns must contain at least one"):
        ResNet(nn.Identity(), [], nn.Identity())
    with pytest.raises(TypeError, match="return_trajectory is not an ODENet argument"):
        ODENet(nn.Identity(), nn.Identity(), nn.Identity(), return_trajectory=True)
