"""PyTree states (dicts, nested tuples and lists, named tuples), as diffrax takes them.

A PyTree state is flattened into the loop's vector exactly as a flat tuple of its tensors is, so every test
compares it with the tuple solve of the same tensors: the same steps and the same numbers, in the user's structure.
"""

import math
from collections import namedtuple

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings, strategies as st

import neuralode

F64 = torch.float64
Phase = namedtuple("Phase", "position velocity")


def _oscillators(t, y):
    """Damped oscillators, returned with the dict's keys in another order than y0's (JAX sorts keys; any order)."""
    stiffness = torch.tensor([1.0, 4.0], dtype=F64)
    return {"v": -stiffness * y["x"] - 0.1 * y["v"] + 0.2 * torch.sin(t), "x": y["v"]}


def _oscillators_tuple(t, y):
    out = _oscillators(t, {"x": y[0], "v": y[1]})
    return out["x"], out["v"]


def _y0(requires_grad=False):
    return {"x": torch.tensor([1.0, 0.5], dtype=F64, requires_grad=requires_grad),
            "v": torch.tensor([0.0, -0.3], dtype=F64)}


def test_a_dict_state_takes_the_tuple_states_steps_and_comes_back_a_dict():
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    sol = neuralode.solve(_oscillators, _y0(), t, rtol=1e-9, atol=1e-9, dense=True)
    ref = neuralode.solve(_oscillators_tuple, (_y0()["x"], _y0()["v"]), t, rtol=1e-9, atol=1e-9, dense=True)
    assert list(sol.ys) == ["x", "v"] and sol.ys["x"].shape == (7, 2)
    assert sol.stats == ref.stats
    assert torch.equal(sol.ys["x"], ref.ys[0]) and torch.equal(sol.ys["v"], ref.ys[1])
    query = torch.tensor([[0.25, 1.5], [2.0, 2.9]], dtype=F64)
    dense = sol.evaluate(query)
    assert dense["v"].shape == (2, 2, 2) and torch.equal(dense["v"], ref.evaluate(query)[1])
    assert torch.equal(sol.derivative(query)["x"], ref.derivative(query)[0])


def test_nested_and_named_structures_are_rebuilt_in_every_result():
    """A named tuple holding a list: ys, dense output, the event state, the step callback and the norm all see it."""
    seen = {"callback": set(), "norm": set()}

    class Field(torch.nn.Module):
        def forward(self, t, y):
            return Phase(position=y.velocity[0], velocity=[-y.position, -0.5 * y.velocity[1]])

        def callback_step(self, t0, y0, dt):
            seen["callback"].add(type(y0))

    def norm(scaled):
        seen["norm"].add(type(scaled))
        return torch.cat([x.reshape(-1) for x in pytree.tree_leaves(scaled)]).abs().max()

    y0 = Phase(position=torch.tensor([1.0], dtype=F64),
               velocity=[torch.tensor([0.0], dtype=F64), torch.ones(2, 2, dtype=F64)])
    t = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    sol = neuralode.solve(Field(), y0, t, rtol=1e-10, atol=1e-10, dense=True, options={"norm": norm},
                          event_fn=lambda t, y: y.position[0] + 0.5, event_direction=-1)
    assert isinstance(sol.ys, Phase) and isinstance(sol.ys.velocity, list)
    assert sol.ys.velocity[1].shape == (len(sol.ts), 2, 2)
    assert seen == {"callback": {Phase}, "norm": {Phase}}
    # position'' = -position: position = cos t crosses -0.5 at t = 2 pi / 3
    assert sol.status == "event" and abs(float(sol.event_t) - 2 * math.pi / 3) < 1e-9
    assert isinstance(sol.event_y, Phase) and abs(float(sol.event_y.position[0]) + 0.5) < 1e-9
    torch.testing.assert_close(sol.event_y.velocity[1], torch.ones(2, 2, dtype=F64) * math.exp(-math.pi / 3))
    assert sol.evaluate(0.5).velocity[1].shape == (2, 2)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 2).double()

    def forward(self, t, y):
        return {"x": y["v"], "v": torch.tanh(self.linear(torch.cat([y["x"], y["v"]], -1)))}


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint", neuralode.Adjoint(interpolate=True)],
                         ids=["direct", "checkpoint", "adjoint", "interpolating"])
def test_gradients_of_a_dict_state_match_finite_differences(gradient):
    net = _Net()
    t = torch.tensor([0.0, 0.5, 1.5], dtype=F64)
    v0 = torch.tensor([[0.2, -0.1]], dtype=F64)

    def loss(x0, gradient=gradient):
        sol = neuralode.solve(net, {"x": x0, "v": v0}, t, rtol=1e-10, atol=1e-10, gradient=gradient)
        return (sol.ys["x"] ** 2).sum() + sol.ys["v"][-1].sum()

    x0 = torch.tensor([[1.0, 0.5]], dtype=F64, requires_grad=True)
    grads = torch.autograd.grad(loss(x0), (x0, net.linear.weight))
    with torch.no_grad():
        eps = 1e-6
        bump = torch.tensor([[eps, 0.0]], dtype=F64)
        finite = (loss(x0 + bump, "direct") - loss(x0 - bump, "direct")) / (2 * eps)
    assert abs(float(grads[0][0, 0]) - float(finite)) < 1e-6 * max(1.0, abs(float(finite)))
    direct = torch.autograd.grad(loss(x0, "direct"), (x0, net.linear.weight))
    for got, want in zip(grads, direct):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_the_event_time_of_a_dict_state_is_differentiable_and_odeint_event_keeps_the_structure():
    x0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    y0 = {"x": x0, "v": torch.zeros(2, dtype=F64)}
    field = lambda t, y: {"x": y["v"], "v": -y["x"]}  # noqa: E731
    event = lambda t, y: y["x"][0] - 0.5  # noqa: E731    x = x0 cos t: t_e = acos(0.5 / x0)
    sol = neuralode.solve(field, y0, torch.tensor([0.0, 5.0], dtype=F64), rtol=1e-11, atol=1e-11, event_fn=event)
    (dt_dx0,) = torch.autograd.grad(sol.event_t, x0)
    exact = 0.5 / (1.0 * math.sqrt(1.0 - 0.25))   # d/dx0 acos(0.5 / x0) at x0 = 1
    assert abs(float(dt_dx0[0]) - exact) < 1e-7 and float(dt_dx0[1]) == 0.0
    event_t, ys = neuralode.odeint_event(field, y0, torch.tensor([0.0, 5.0], dtype=F64), event_fn=event,
                                         rtol=1e-11, atol=1e-11)
    assert set(ys) == {"x", "v"} and ys["x"].shape == (2, 2)
    assert abs(float(event_t.detach()) - math.acos(0.5)) < 1e-9 and abs(float(ys["x"][-1, 0].detach()) - 0.5) < 1e-9
    records = neuralode.solve(field, y0, torch.tensor([0.0, 6.0], dtype=F64),   # crossings at pi / 3, 5 pi / 3
                              events=[neuralode.Event(event, name="half")]).events
    assert [r.name for r in records] == ["half", "half"] and set(records[0].y) == {"x", "v"}


def test_tolerances_in_the_states_structure_and_the_torchdiffeq_entry_points():
    t = torch.linspace(0.0, 2.0, 3, dtype=F64)
    y0 = _y0()
    flat = (y0["x"], y0["v"])
    # a tolerance per tensor, in y0's structure (keys in any order), is the tuple state's per-tensor tolerance
    sol = neuralode.solve(_oscillators, y0, t, rtol={"v": 1e-5, "x": 1e-9}, atol=1e-9)
    ref = neuralode.solve(_oscillators_tuple, flat, t, rtol=(1e-9, 1e-5), atol=1e-9)
    assert sol.stats == ref.stats and torch.equal(sol.ys["v"], ref.ys[1])
    ys = neuralode.odeint(_oscillators, y0, t, method="dopri5")
    assert torch.equal(ys["x"], neuralode.odeint(_oscillators_tuple, flat, t, method="dopri5")[0])
    x0 = y0["x"].clone().requires_grad_(True)
    ys = neuralode.odeint_adjoint(_oscillators, {"x": x0, "v": y0["v"]}, t, adjoint_params=())
    (grad,) = torch.autograd.grad(ys["x"].sum(), x0)
    x0_tuple = x0.detach().clone().requires_grad_(True)
    (grad_tuple,) = torch.autograd.grad(neuralode.odeint(_oscillators_tuple, (x0_tuple, y0["v"]), t)[0].sum(),
                                        x0_tuple)
    torch.testing.assert_close(grad, grad_tuple, rtol=1e-6, atol=1e-8)


# Random PyTrees of dicts, tuples and lists with tensor leaves of random shapes.
_leaf_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
_trees = st.recursive(_leaf_shapes,
                      lambda children: st.one_of(st.lists(children, min_size=1, max_size=3),
                                                 st.lists(children, min_size=1, max_size=3).map(tuple),
                                                 st.dictionaries(st.sampled_from("abcd"), children, min_size=1,
                                                                 max_size=3)),
                      max_leaves=5)


@settings(max_examples=15, deadline=None)
@given(shapes=_trees, method=st.sampled_from(["tsit5", "dopri5", "bosh3", "rk4"]))
def test_any_pytree_solves_as_the_tuple_of_its_leaves(shapes, method):
    if isinstance(shapes, tuple) and all(isinstance(s, int) for s in shapes):
        shapes = [shapes]   # a bare shape is a tensor state, covered elsewhere
    generator = torch.Generator().manual_seed(len(str(shapes)))
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(s, int) for s in x)  # noqa: E731
    y0 = pytree.tree_map(lambda shape: torch.randn(shape, generator=generator, dtype=F64), shapes,
                         is_leaf=is_shape)
    leaves, spec = pytree.tree_flatten(y0)
    rates = [0.5 + i for i in range(len(leaves))]

    def tree_field(t, y):
        parts, structure = pytree.tree_flatten(y)   # (a flat list y0 reaches func as a tuple: torchdiffeq's rule)
        return pytree.tree_unflatten([-r * x + torch.cos(t) for r, x in zip(rates, parts)], structure)

    def tuple_field(t, y):
        return tuple(-r * x + torch.cos(t) for r, x in zip(rates, y))

    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    options = {"step_size": 0.1} if method == "rk4" else None
    sol = neuralode.solve(tree_field, y0, t, method=method, rtol=1e-6, atol=1e-8, options=options)
    ref = neuralode.solve(tuple_field, tuple(leaves), t, method=method, rtol=1e-6, atol=1e-8, options=options)
    flat_list = type(y0) is list and all(isinstance(x, torch.Tensor) for x in y0)   # taken as a tuple, as before
    assert pytree.tree_structure(sol.ys) == (pytree.tree_structure(tuple(leaves)) if flat_list else spec)
    assert sol.stats == ref.stats
    for got, want in zip(pytree.tree_leaves(sol.ys), ref.ys):
        assert torch.equal(got, want)


def test_args_reach_the_field_and_their_tensors_get_gradients_under_every_strategy():
    """diffrax's ``args`` (torchode's ``with_args``): ``func(t, y, args)``; a tensor in args that requires grad is
    differentiated by every strategy without being named in adjoint_params."""
    def damped(t, y, args):
        return {"x": y["v"], "v": -args["k"] * y["x"] - args["c"] * y["v"]}

    k = torch.tensor(4.0, dtype=F64, requires_grad=True)
    y0 = {"x": torch.tensor([1.0], dtype=F64), "v": torch.tensor([0.0], dtype=F64)}
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    with torch.no_grad():
        eps = 1e-6
        ends = [neuralode.solve(damped, y0, t, args={"k": k + s, "c": 0.1}, rtol=1e-12, atol=1e-12).ys["x"][-1, 0]
                for s in (eps, -eps)]
        finite = float(ends[0] - ends[1]) / (2 * eps)
    for gradient in ("direct", "checkpoint", "adjoint", neuralode.Adjoint(interpolate=True)):
        sol = neuralode.solve(damped, y0, t, args={"k": k, "c": 0.1}, rtol=1e-10, atol=1e-10, gradient=gradient)
        (grad,) = torch.autograd.grad(sol.ys["x"][-1, 0], k)
        assert abs(float(grad) - finite) < 1e-6, gradient


def test_args_with_a_module_keep_its_parameters_and_callbacks():
    calls = []

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2).double()

        def forward(self, t, y, scale):
            return scale * torch.tanh(self.linear(y))

        def callback_step(self, t0, y0, dt):
            calls.append(float(dt))

    field = Scaled()
    y0 = torch.tensor([[1.0, -0.5]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = neuralode.solve(field, y0, t, args=0.5, gradient="adjoint")
    sol.ys.sum().backward()
    assert field.linear.weight.grad is not None and len(calls) == sol.stats["n_steps"]
    plain = neuralode.solve(lambda t, y: 0.5 * torch.tanh(field.linear(y)), y0, t)
    assert torch.equal(sol.ys, plain.ys.detach())
    with pytest.raises(TypeError, match=r"args= was given, so func is called as func\(t, y, args\), but it does not "
                                        r"take three arguments"):
        neuralode.solve(lambda t, y: -y, y0, t, args=1.0)


def test_args_in_a_plain_object_get_gradients_and_structured_states_refuse_what_they_cannot_do():
    import types

    rate = torch.tensor(2.0, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for gradient in ("adjoint", "checkpoint"):   # (a namespace is no PyTree: its tensors are found by attribute)
        sol = neuralode.solve(lambda t, y, a: -a.rate * y, torch.ones(1, dtype=F64), t, gradient=gradient,
                              args=types.SimpleNamespace(rate=rate), rtol=1e-10, atol=1e-10)
        (grad,) = torch.autograd.grad(sol.ys[-1].sum(), rate)
        assert abs(float(grad) + math.exp(-2.0)) < 1e-8, gradient
    with pytest.raises(TypeError, match=r"func takes three arguments, as diffrax's f\(t, y, args\), but solve was "
                                        r"given no args"):
        neuralode.solve(lambda t, y, args: -y, torch.ones(1, dtype=F64), t)
    calls = []

    def grows(t, y):   # a key more from the second call on
        calls.append(1)
        return {"x": -y["x"]} if len(calls) == 1 else {"x": -y["x"], "extra": y["x"]}

    with pytest.raises(TypeError, match=r"func returned \{'x': \*, 'extra': \*\} but y0 has the structure "
                                        r"\{'x': \*\}; return the derivative in y0's structure at every call"):
        neuralode.solve(grows, {"x": torch.ones(1, dtype=F64)}, t)
    tree = {"x": torch.ones(4, 1, dtype=F64), "v": torch.zeros(4, 1, dtype=F64)}
    with pytest.raises(ValueError, match=r"'jacobian': 'batched' needs one tensor state of shape \(batch, \.\.\.\)"):
        neuralode.solve(lambda t, y: {"x": y["v"], "v": -y["x"]}, tree, t, method="rodas5p",
                        options={"jacobian": "batched"})
