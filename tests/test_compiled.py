"""solve(..., compile=True): the compiled explicit Runge-Kutta and Rosenbrock steps against the eager ones
(issue 13, item 4; issue 12, the small-problem overhead of rodas5).

Each test compiles (seconds on a CPU), so the cases are few and chosen to cover the paths: an FSAL method
with a 5th-order estimate, DOP853's two estimates, a fixed grid, direct gradients, a float32 state, steps
that must stay eager (one-sided limits at ``jump_t``), a field that cannot be compiled, and the ODE block.

Compilation is most of this file's time, and on a fresh machine most of that is the C++ compiler building
inductor's kernels (about 2 s a kernel). The kernels are cached by their code, which depends on the method,
the field, the state's shape and dtype and whether a graph is recorded, not on the field's class or values: so
the tests share one state shape (``_y0()``, float64 (4, 3)) and one method (dopri5) wherever the path they test
allows, and a later test's compilation then reuses an earlier one's kernels. The whole-loop kernel's C++ wrapper
(what users' solves build, ~7 s of C++ per loop) is built only by the tests marked ``cpp_wrapper``; the others call
the same generated kernels through inductor's Python wrapper.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo.utils

import neuralode
from neuralode.nn import ODEBlock


class _Field(torch.nn.Module):
    """A time-dependent MLP field, so that the stage times (tensors inside the compiled step) matter."""

    def __init__(self, dim=3, hidden=16, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, dim)).to(dtype)

    def forward(self, t, y):
        return self.net(y) * torch.cos(t) - 0.1 * y


class _Coupled(torch.nn.Module):
    """A time-dependent field with parameters and no matrix product: its steps fuse into a few kernels, where each
    matrix product of the MLP splits them (an adjoint test with the MLP built 17 kernels, 23 s of C++ builds on
    a fresh machine). For the tests whose subject is what surrounds the field: the adjoint, the regularisers, the
    ODE block."""

    def __init__(self, dim=3, dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.gain = torch.nn.Parameter(torch.rand(dim, dtype=dtype, generator=generator) + 0.5)
        self.decay = torch.nn.Parameter(0.1 * torch.rand(dim, dtype=dtype, generator=generator))

    def forward(self, t, y):
        return self.gain * torch.tanh(y.roll(1, -1)) * torch.cos(t) - self.decay * y


def Field(**kwargs):
    """A field of a class of its own: compiled steps are cached per (method, field type), and
    torch.compile stops compiling a function after 8 variants (running it eagerly), so fields shared
    between tests could make a later test compare eager with eager."""
    return type("Field", (_Field,), {})(**kwargs)


def Coupled(**kwargs):
    """:class:`_Coupled`, of a class of its own (see :func:`Field`)."""
    return type("Coupled", (_Coupled,), {})(**kwargs)


def _assert_compiled(record):
    """A fallback to eager would hide what is tested (torch.compile's own warnings are allowed)."""
    fallbacks = [str(w.message) for w in record if "could not be compiled" in str(w.message)
                 or "solved eagerly from here" in str(w.message)]
    assert not fallbacks, fallbacks


@pytest.fixture(autouse=True)
def _python_wrapped_loops(request, monkeypatch):
    if request.node.get_closest_marker("cpp_wrapper") is None:
        from neuralode.solvers import compiled
        monkeypatch.setattr(compiled, "LOOP_CPP_WRAPPER", False)


def _y0(requires_grad=False):
    """The state most tests share (see the module's docstring)."""
    return torch.randn(4, 3, dtype=torch.float64, requires_grad=requires_grad)


def _pair(field, y0, t, **kwargs):
    eager = neuralode.solve(field, y0, t, **kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = neuralode.solve(field, y0, t, compile=True, **kwargs)
    _assert_compiled(record)
    return eager, compiled


@pytest.mark.parametrize("method, options", [("dopri5", None), ("dopri8", None), ("rk4", {"step_size": 0.05})])
def test_compiled_step_matches_eager_in_float64(method, options):
    field = Field()
    y0 = _y0()
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    eager, compiled = _pair(field, y0, t, method=method, rtol=1e-9, atol=1e-10, options=options)
    # The same steps (counts and evaluations) and the same values to rounding: fused multiply-adds and
    # reordered sums in the generated code differ from the eager kernels by a few ulps per step.
    for key in ("n_steps", "n_accepted", "n_rejected", "nfe"):
        assert compiled.stats[key] == eager.stats[key], key
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-13)
    assert compiled.success


@pytest.fixture
def restarts(monkeypatch):
    """How many times torch.compile restarted its analysis of a function (traced it again from the start)."""
    import torch._dynamo.exc

    count, original = [0], torch._dynamo.exc.RestartAnalysis.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch._dynamo.exc.RestartAnalysis, "__init__", counting)
    return count


def test_compiled_direct_gradient_matches_eager(restarts):
    field = Field()
    y0 = _y0(requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    eager, compiled = _pair(field, y0, t, method="dopri5", rtol=1e-8, atol=1e-9)
    # Each step kernel is traced once: the tolerances used to be read as Python numbers and specialised late,
    # and every compilation then traced the step a second time.
    assert restarts == [0]
    inputs = (y0, *field.parameters())
    grads_eager = torch.autograd.grad(eager.ys.pow(2).sum(), inputs)
    grads_compiled = torch.autograd.grad(compiled.ys.pow(2).sum(), inputs)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    # From a y0 without grad (the parameters with it) the first step takes the same graph as every later step:
    # requires_grad is guarded on, and that first step used to compile a graph of its own, forward and backward.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    y0_plain = y0.detach()
    eager, compiled = _pair(field, y0_plain, t, method="dopri5", rtol=1e-8, atol=1e-9)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not y0_plain.requires_grad and y0_plain.grad is None   # the user's tensor is left as it was
    parameters = tuple(field.parameters())
    grads_eager = torch.autograd.grad(eager.ys.pow(2).sum(), parameters)
    grads_compiled = torch.autograd.grad(compiled.ys.pow(2).sum(), parameters)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_new_step_sizes_and_tolerances_do_not_recompile(restarts, loop_runs):
    field = Field()
    y0 = _y0()
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    with torch.no_grad():
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        neuralode.solve(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-8, compile=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs > before   # it did compile
        for rtol in (1e-4, 1e-8, 1e-10):   # other step sizes, other tolerances, another start
            neuralode.solve(field, y0, t + 0.5, method="dopri5", rtol=rtol, atol=rtol * 1e-2, compile=True)
        # and other controller settings (inputs of the compiled loop too)
        neuralode.solve(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-8, compile=True,
                        options={"safety": 0.8, "ifactor": 5.0, "max_step": 0.3})
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert loop_runs == [True] * 5   # every solve ran the compiled loop (none fell back to the per-step path)
    assert restarts == [0]   # the loop kernel was traced once (its controller settings as with the tolerances)


def test_a_solve_under_a_transform_runs_eagerly_and_the_field_stays_compiled(loop_runs):
    """torch.func.jvp or a forward-mode dual level around a compiled solve: torch.compile cannot be called from
    either, so the solve runs eagerly with one warning, and the field is not marked as one that cannot be
    compiled (it was, and every later solve of it ran eagerly without a word)."""
    import torch.autograd.forward_ad as forward_ad

    field = Field()
    y0, tangent = _y0(), torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)

    def solve(y, compile):
        return neuralode.solve(field, y, t, method="dopri5", rtol=1e-8, atol=1e-9, compile=compile).ys

    with pytest.warns(UserWarning, match="torch.func transform") as record:
        _, compiled = torch.func.jvp(lambda y: solve(y, True), (y0,), (tangent,))
        with forward_ad.dual_level():
            dual_compiled = forward_ad.unpack_dual(solve(forward_ad.make_dual(y0, tangent), True)).tangent
    assert sum("torch.func transform" in str(w.message) for w in record) == 1   # once per field
    assert not [str(w.message) for w in record if "could not be compiled" in str(w.message)]
    _, eager = torch.func.jvp(lambda y: solve(y, False), (y0,), (tangent,))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(dual_compiled, eager, rtol=0, atol=0)
    assert loop_runs == [False, False]
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        solve(y0, True)
    _assert_compiled(record)
    assert loop_runs[-1] is True


def test_float32_state_stays_within_tolerance_of_eager():
    field = Coupled(dtype=torch.float32)
    y0 = torch.randn(5, 3)   # (the ODE block's test below compiles the same loop: its kernels are reused)
    t = torch.tensor([0.0, 3.0])
    with torch.no_grad():
        eager, compiled = _pair(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-7)
    assert compiled.stats["n_steps"] > 5
    # In float32 the error estimate sits near rounding level, so a few ulps can move one step; the
    # solutions still agree to the tolerance.
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-5, atol=1e-6)
    assert abs(compiled.stats["n_steps"] - eager.stats["n_steps"]) <= 2


def test_one_sided_limits_at_jump_times_stay_exact():
    field = Field()
    y0 = _y0()
    t = torch.linspace(0.0, 2.0, 3, dtype=torch.float64)
    eager, compiled = _pair(field, y0, t, method="dopri5", rtol=1e-9, atol=1e-10, options={"jump_t": [0.7, 1.3]})
    assert compiled.stats["n_steps"] == eager.stats["n_steps"]
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-13)


def test_dense_output_built_inside_the_compiled_step_matches_eager():
    # (before any float32 test with a per-step kernel: the stepper's cache of dense-output matrices per dtype is read
    # inside the traced step, and a second entry there changes the graph's cache key, so a later test would build
    # the same kernels again)
    field = Field()
    y0 = _y0()
    t = torch.tensor([0.0, 1.5], dtype=torch.float64)
    eager, compiled = _pair(field, y0, t, method="dopri5", rtol=1e-9, atol=1e-10, dense=True)
    assert compiled.stats["n_steps"] == eager.stats["n_steps"] > 3
    probe = torch.linspace(0.0, 1.5, 37, dtype=torch.float64)
    torch.testing.assert_close(compiled.evaluate(probe), eager.evaluate(probe), rtol=1e-12, atol=1e-13)


def test_a_field_that_cannot_be_compiled_is_solved_eagerly_with_one_warning():
    def field(t, y):
        if y.sum() > 0:   # data-dependent Python control flow: a graph break, which fullgraph compilation refuses
            return -y
        return y

    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="could not be compiled") as record:
        first = neuralode.solve(field, y0, t, compile=True)
        second = neuralode.solve(field, y0, t, compile=True)
    assert sum("could not be compiled" in str(w.message) for w in record) == 1
    eager = neuralode.solve(field, y0, t)
    torch.testing.assert_close(first.ys, eager.ys, rtol=0, atol=0)
    torch.testing.assert_close(second.ys, eager.ys, rtol=0, atol=0)
    torch.testing.assert_close(eager.ys[-1], y0 * torch.exp(torch.tensor(-1.0, dtype=torch.float64)))


@pytest.mark.parametrize("method", ["kvaerno5", "adams", "implicit_adams"])
def test_compile_refuses_methods_it_cannot_compile(method):
    options = {"step_size": 0.1} if method == "implicit_adams" else None
    with pytest.raises(ValueError, match="compile=True supports the explicit Runge-Kutta methods"):
        neuralode.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method=method, options=options,
                        compile=True)


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile must be True or False"):
        neuralode.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), compile="yes")
    with pytest.raises(TypeError, match="compile must be True or False"):
        ODEBlock(Field(), compile=1)


def test_ode_block_compile_switch():
    field = Coupled(dtype=torch.float32)
    block = ODEBlock(field, compile=True, gradient="adjoint")
    eager_block = ODEBlock(field, gradient="adjoint")
    x = torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = block(x)
        out.pow(2).sum().backward()
    _assert_compiled(record)
    grads = [p.grad.clone() for p in field.parameters()]
    field.zero_grad()
    eager_block(x).pow(2).sum().backward()
    torch.testing.assert_close(out, eager_block(x), rtol=1e-5, atol=1e-6)
    for a, p in zip(grads, field.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert "compile=True" in repr(block)
    assert callable(block.compile)   # nn.Module.compile is not shadowed by the option


@pytest.mark.parametrize("continuous", [True, False])
def test_adjoint_backward_steps_are_compiled_and_match_eager(continuous):
    from neuralode.solvers import compiled

    field = Coupled()
    params = tuple(field.parameters())
    y0 = _y0(requires_grad=True)
    # Several output times: one backward solve with jumps; two: a single interval.
    t = torch.linspace(0.0, 1.0, 5 if continuous else 2, dtype=torch.float64)
    kwargs = dict(method="dopri5", rtol=1e-9, atol=1e-10, gradient="adjoint", adjoint_params=params)
    eager = neuralode.solve(field, y0, t, **kwargs)
    grads_eager = torch.autograd.grad(eager.ys.pow(2).sum(), (y0, *params))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled_solution = neuralode.solve(field, y0, t, compile=True, **kwargs)
        grads_compiled = torch.autograd.grad(compiled_solution.ys.pow(2).sum(), (y0, *params))
    _assert_compiled(record)
    assert (("dopri5", "adjoint", type(field)), "step") in compiled._KERNELS
    assert compiled_solution.stats["nfe_backward"] == eager.stats["nfe_backward"]
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_frobenius_regulariser_compiles_with_its_vector_jacobian_product(gradient):
    field = Coupled()
    torch.manual_seed(1)
    x = _y0()
    results = []
    for compile_ in (False, True):
        # (bosh3: four stages, about half of dopri5's kernels to build; the regularisers do not depend on the method)
        block = ODEBlock(field, method="bosh3", gradient=gradient, kinetic=True, frobenius=True, rtol=1e-8, atol=1e-9,
                         compile=compile_)
        torch.manual_seed(2)   # the same Hutchinson probe in both solves
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = block(x)
            loss = out.pow(2).sum() + block.kinetic_energy.sum() + block.jacobian_frobenius.sum()
            grads = torch.autograd.grad(loss, tuple(field.parameters()))
        if compile_:
            _assert_compiled(record)
        results.append((out, grads))
    (out_eager, grads_eager), (out_compiled, grads_compiled) = results
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-11, atol=1e-12)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_a_zero_dim_state_keeps_its_dtype():
    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rate = torch.nn.Parameter(torch.tensor(0.5))
            self.seen = set()

        def forward(self, t, y):
            self.seen.add(y.dtype)
            return -self.rate * y

    field = type("Decay", (Decay,), {})()
    t = torch.linspace(0.0, 1.0, 3)
    eager = neuralode.solve(field, torch.tensor(1.0), t, method="dopri5")
    compiled = neuralode.solve(field, torch.tensor(1.0), t, method="dopri5", compile=True)
    assert compiled.ys.dtype == torch.float32 and field.seen == {torch.float32}
    assert compiled.stats["nfe"] == eager.stats["nfe"]
    torch.testing.assert_close(compiled.ys, eager.ys)
    z = neuralode.solve(lambda t, y: -1j * y, torch.tensor(1 + 0j, dtype=torch.complex64), t, method="rk4",
                        options={"step_size": 0.1}, compile=True)
    assert z.ys.dtype == torch.complex64


def test_one_field_that_cannot_be_compiled_does_not_switch_off_its_siblings():
    class Guarded(torch.nn.Module):
        def __init__(self, check):
            super().__init__()
            self.check = check

        def forward(self, t, y):
            if self.check and bool((y.abs() > 1e6).any()):   # a host read of data: cannot be traced
                raise RuntimeError("blew up")
            return -y

    cls = type("Guarded", (Guarded,), {})
    y0, t = torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="could not be compiled"):
        neuralode.solve(cls(True), y0, t, compile=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        neuralode.solve(cls(False), y0, t, compile=True)
    _assert_compiled(record)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before


def test_compile_with_perturb_says_it_has_no_effect():
    with pytest.warns(UserWarning, match="no effect with options=\\{'perturb': True\\}"):
        neuralode.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4",
                        options={"step_size": 0.1, "perturb": True}, compile=True)


# --- Rosenbrock (rodas5) -------------------------------------------------------------------------------

class _Robertson(torch.nn.Module):
    """Robertson's kinetics, one rate triple per sample (state (batch, 3)): stiff, and independent samples."""

    def __init__(self, batch=3):
        super().__init__()
        scale = torch.logspace(-0.5, 0.5, batch, dtype=torch.float64)[:, None]
        self.register_buffer("k", torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64) * scale)

    def forward(self, t, y):
        k1, k2, k3 = self.k.unbind(-1)
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 ** 2, k2 * y2 ** 2], -1)


def _robertson_y0(batch=3):
    return torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).repeat(batch, 1)


def test_compiled_rosenbrock_matches_eager():
    # (the batched Jacobian: test_compiled_rosenbrock_batched_jacobian_of_a_state_with_more_dimensions)
    field = type("Robertson", (_Robertson,), {})()
    t = torch.tensor([0.0, 0.1, 40.0], dtype=torch.float64)
    eager, compiled = _pair(field, _robertson_y0(), t, method="rodas5", rtol=1e-7, atol=1e-10,
                            options={"jacobian": "dense"})
    # The same steps, Jacobians, factorisations and evaluations; values to rounding (J by forward-mode AD in
    # the compiled step, by reverse mode in the eager one: equal here, but fused sums differ by ulps).
    for key in ("n_steps", "n_accepted", "n_rejected", "nfe", "n_jacobians", "n_lu", "n_singular"):
        assert compiled.stats[key] == eager.stats[key], key
    assert compiled.stats["n_rejected"] > 0        # a rejected step reused J (n_jacobians < n_steps)
    assert compiled.stats["n_jacobians"] < compiled.stats["n_steps"]
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-11, atol=1e-14)
    assert compiled.success

    def exact_jacobian(t, y):   # options={"jac": ...}: inlined in the compiled linearisation
        k1, k2, k3 = field.k.unbind(-1)
        y1, y2, y3 = y.unbind(-1)
        zero = torch.zeros_like(y1)
        rows = [torch.stack([-k1 + zero, k3 * y3, k3 * y2], -1),
                torch.stack([k1 + zero, -k3 * y3 - 2 * k2 * y2, -k3 * y2], -1),
                torch.stack([zero, 2 * k2 * y2, zero], -1)]
        return torch.block_diag(*torch.stack(rows, -2).unbind(0))   # (9, 9): the samples do not couple

    given = _pair(field, _robertson_y0(), t, method="rodas5", rtol=1e-7, atol=1e-10,
                  options={"jacobian": "dense", "jac": exact_jacobian})
    for solution in given:
        assert solution.stats["n_steps"] == eager.stats["n_steps"]
        torch.testing.assert_close(solution.ys, eager.ys, rtol=1e-11, atol=1e-14)


def test_compiled_rosenbrock_time_derivative_and_singular_matrix():
    from neuralode.tableaus.rosenbrock import RODAS5

    # A forcing read as a tensor: df/dt by forward mode inside the compiled linearisation, every step.
    def forced(t, y):
        return -50.0 * (y - torch.cos(t))

    y0 = torch.tensor([0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    eager, compiled = _pair(forced, y0, t, method="rodas5", rtol=1e-8, atol=1e-10)
    assert compiled.stats["n_time_derivatives"] == compiled.stats["n_jacobians"] == eager.stats["n_jacobians"] > 0
    assert compiled.stats["nfe"] == eager.stats["nfe"]
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-14)

    # A rate that makes I - h gamma J exactly singular at h = 1: the compiled step reports it (the LU's info),
    # the step is halved and the solve goes on, as eagerly.
    lam = 1 / RODAS5.gamma
    while 1.0 - RODAS5.gamma * lam != 0.0:
        lam = float(np.nextafter(lam, np.inf if RODAS5.gamma * lam < 1 else -np.inf))
    eager, compiled = _pair(lambda t, y: lam * y, torch.tensor([1.0], dtype=torch.float64),
                            torch.tensor([0.0, 1.0], dtype=torch.float64), method="rodas5", rtol=1e-8, atol=1e-10,
                            options={"first_step": 1.0})
    assert compiled.stats["n_singular"] == eager.stats["n_singular"] == 1
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=0)


def test_compiled_rosenbrock_steps_that_need_a_graph_run_eagerly():
    # Direct backpropagation differentiates the step (its J with a graph): that step is the eager one, so the
    # gradient is the eager gradient exactly; the adjoint's forward solve has no graph and runs compiled.
    class Coupled(torch.nn.Module):
        """Stiff enough (rates 1 and 200) and stable backwards in time for the adjoint's reconstruction."""

        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor([[1.0], [200.0]], dtype=torch.float64))

        def forward(self, t, y):
            return -self.k * y + 0.5 * torch.tanh(y.roll(1, -1))

    field = Coupled()
    y0 = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.2, -1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    grads = {}
    for gradient in ("direct", "adjoint"):
        for compile_ in (False, True):
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                # (rtol 1e-7: the adjoint's stiff backward solve took 13,358 evaluations and 9 s at rtol 1e-9, 1,218
                # and 1 s here, for the same verdicts)
                sol = neuralode.solve(field, y0, t, method="rodas5", rtol=1e-7, atol=1e-10, gradient=gradient,
                                      compile=compile_)
                (grads[gradient, compile_],) = torch.autograd.grad(sol.ys.pow(2).sum(), field.k)
            _assert_compiled(record)
    assert torch.equal(grads["direct", True], grads["direct", False])
    # (atol: the second rate's gradient is ~5e-33, e^-200 of the first, where rounding is relative to the first)
    scale = float(grads["adjoint", False].abs().max())
    torch.testing.assert_close(grads["adjoint", True], grads["adjoint", False], rtol=1e-9, atol=1e-15 * scale)
    torch.testing.assert_close(grads["adjoint", False], grads["direct", False], rtol=1e-5, atol=1e-12)


def test_compiled_rosenbrock_refuses_the_krylov_mode_and_runs_a_float_time_field_eagerly():
    with pytest.raises(ValueError, match="'jacobian': 'dense'"):
        neuralode.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rodas5",
                        options={"jacobian": "krylov"}, compile=True)

    # float(t) hides t from forward-mode AD: df/dt is a difference quotient, which only the eager step takes.
    def float_time(t, y):
        return -50.0 * (y - math.cos(float(t)))

    y0, t = torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    eager, compiled = _pair(float_time, y0, t, method="rodas5", rtol=1e-8, atol=1e-10)
    assert torch.equal(compiled.ys, eager.ys) and compiled.stats == eager.stats


def test_compiled_rosenbrock_batched_jacobian_of_a_state_with_more_dimensions():
    class Blocks(torch.nn.Module):
        """Samples of shape (2, 2), coupled within a sample only: per-sample blocks of 4 x 4."""

        def forward(self, t, y):
            rates = 30.0 * torch.arange(1, 5, dtype=y.dtype).reshape(1, 2, 2)
            return -rates * y + y.roll(1, 1) ** 2

    y0 = torch.ones(3, 2, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    eager, compiled = _pair(Blocks(), y0, t, method="rodas5", rtol=1e-8, atol=1e-10, options={"jacobian": "batched"})
    for key in ("n_steps", "n_accepted", "n_rejected", "nfe", "n_jacobians", "n_lu", "n_singular"):
        assert compiled.stats[key] == eager.stats[key], key
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-15)


def test_auto_compiles_both_phases_and_matches_eager():
    from neuralode.solvers import compiled

    field = type("Robertson", (_Robertson,), {})(batch=1)
    t = torch.tensor([0.0, 1.0, 40.0], dtype=torch.float64)
    eager, compiled_solution = _pair(field, _robertson_y0(1), t, method="auto", rtol=1e-6, atol=1e-10)
    assert eager.stats["n_switches"] >= 1
    assert eager.stats["n_steps_explicit"] > 0 and eager.stats["n_steps_implicit"] > 0
    for key in ("n_steps", "nfe", "n_switches", "n_steps_explicit", "n_steps_implicit", "n_jacobians"):
        assert compiled_solution.stats[key] == eager.stats[key], key
    torch.testing.assert_close(compiled_solution.ys, eager.ys, rtol=1e-10, atol=1e-14)
    assert (("tsit5", "forward", type(field)), "step") in compiled._KERNELS
    assert (("rodas5p", "forward", type(field)), "step") in compiled._KERNELS


# --- the whole adaptive loop as one compiled call (CompiledRungeKutta.run_loop) ------------------------------

@pytest.fixture
def loop_runs(monkeypatch):
    """What each ``run_loop`` call of the solves in a test did: True where the compiled loop ran (False: the
    solve did not qualify, or the loop could not be traced, and the per-step path ran)."""
    from neuralode.solvers.compiled import CompiledRungeKutta

    runs, original = [], CompiledRungeKutta.run_loop

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        runs.append(result is not None)
        return result

    monkeypatch.setattr(CompiledRungeKutta, "run_loop", spy)
    return runs


def _same_steps(eager, compiled):
    for key in ("n_steps", "n_accepted", "n_rejected", "nfe"):
        assert compiled.stats[key] == eager.stats[key], key
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-11, atol=1e-12)
    assert compiled.ts.tolist() == eager.ts.tolist()


@pytest.mark.parametrize("method", ["dopri5", pytest.param("tsit5", marks=pytest.mark.cpp_wrapper), "bosh3"])
def test_compiled_loop_takes_the_eager_steps(method, loop_runs):
    """The same accepted and rejected steps, evaluations and outputs as the eager loop (float64), forwards and
    backwards in time."""
    field = Field()
    y0 = _y0()
    # (as many outputs backwards as forwards: the loop is compiled for static shapes, so both take one graph)
    for t in (torch.linspace(0.0, 2.0, 6, dtype=torch.float64), torch.linspace(1.5, -0.25, 6, dtype=torch.float64)):
        with torch.no_grad():
            # A loose first step forces rejections, so the rejection branch of the decision is exercised too.
            eager, compiled = _pair(field, y0, t, method=method, rtol=1e-8, atol=1e-9, options={"first_step": 0.5})
        _same_steps(eager, compiled)
        assert eager.stats["n_rejected"] > 0
    assert loop_runs == [True, True]


def test_compiled_loop_decides_as_every_controller_does(loop_runs):
    """The PID and predictive controllers (the two that carry an older step's ratio or length from step to step)
    and a step cap, one field and method: the same steps. The integral controller is every other compiled loop
    test's; the PI controller's arithmetic on tensors is checked against its reference in test_controllers.py
    (each controller here is a graph of its own to compile); the step cap rides on the PID controller."""
    field = Field()
    y0 = _y0()
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    for controller in (neuralode.PIDController(pcoeff=0.3, icoeff=0.4, dcoeff=0.1, max_step=0.07),
                       neuralode.PredictiveController()):
        with torch.no_grad():
            _same_steps(*_pair(field, y0, t, method="dopri5", rtol=1e-8, atol=1e-9, controller=controller))
    assert loop_runs == [True, True]


def test_compiled_loop_hands_failures_to_the_eager_loop(loop_runs):
    """The loop stops before a step the eager loop must judge itself (a collapsing step, the step budget), which
    then reports exactly what an eager solve reports: same error, same partial solution with throw=False."""
    # (all under no_grad: grad mode is guarded by torch.compile, and a second mode would compile each loop again)
    with torch.no_grad():
        blow_up = lambda t, y: y ** 2  # noqa: E731 - y' = y^2, y(0) = 1: infinite at t = 1
        y0 = torch.ones(1, dtype=torch.float64)
        t = torch.tensor([0.0, 0.5, 0.9, 2.0], dtype=torch.float64)
        eager, compiled = _pair(blow_up, y0, t, throw=False)
        assert compiled.status == eager.status == "non_finite"
        assert compiled.stats == eager.stats
        assert compiled.ts.tolist() == eager.ts.tolist() == [0.0, 0.5, 0.9]
        torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=0.0)
        for compile_ in (False, True):
            with pytest.raises(neuralode.NonFiniteError, match="diverges to infinity near t=1.0000001"):
                neuralode.solve(blow_up, y0, t, compile=compile_)
        decay = lambda t, y: -y  # noqa: E731
        t = torch.linspace(0.0, 100.0, 5, dtype=torch.float64)
        budget = dict(rtol=1e-10, atol=1e-10, options={"max_num_steps": 50})
        for compile_ in (False, True):
            with pytest.raises(neuralode.MaxStepsError, match=r"max_num_steps=50\) at t=2\.848524"):
                neuralode.solve(decay, y0, t, compile=compile_, **budget)
        eager, compiled = _pair(decay, y0, t, throw=False, **budget)
        assert compiled.stats == eager.stats and compiled.stats["n_steps"] == 50
    assert loop_runs == [True] * 4


def test_compiled_loop_runs_only_where_it_gives_the_same_answer(loop_runs):
    """Solves the compiled loop does not cover take the per-step path with identical results: a graph to record
    (direct backpropagation), stops inside the span (step_t), events, dense output; PyTree states do run it."""
    # (a field whose steps fuse into few kernels: these per-step kernels are used nowhere else in this file, and
    # the MLP's would cost 14 kernels each to build)
    field = Coupled()
    y0 = _y0(requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    kwargs = dict(method="dopri5", rtol=1e-8, atol=1e-9)
    _pair(field, y0, t, **kwargs)                                            # a graph: per step
    assert loop_runs == [False]
    with torch.no_grad():
        for extra in (dict(options={"step_t": [0.4]}), dict(dense=True),
                      dict(event_fn=lambda t, y: y[0, 0] - 10.0)):
            eager, compiled = _pair(field, y0, t, **kwargs, **extra)
            torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-11, atol=1e-12)
        assert loop_runs == [False]                                          # (never asked: not a plain solve)
        # a PyTree state (a dict holding a tuple), its derivative returned with the keys in another order
        tree = lambda t, y: {"v": (y["x"] - 0.5 * y["v"][0],), "x": -y["x"] * torch.cos(t)}  # noqa: E731
        eager, compiled = _pair(tree, {"x": y0[0], "v": (y0[1],)}, t, **kwargs)
        torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-11, atol=1e-12)
    assert loop_runs == [False, True]


def test_the_adjoint_forward_solve_runs_the_compiled_loop(loop_runs):
    field = Coupled()
    params = tuple(field.parameters())
    y0 = _y0(requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    kwargs = dict(method="dopri5", rtol=1e-9, atol=1e-10, gradient="adjoint", adjoint_params=params)
    eager, compiled = _pair(field, y0, t, **kwargs)
    grads_eager = torch.autograd.grad(eager.ys.pow(2).sum(), (y0, *params))
    grads_compiled = torch.autograd.grad(compiled.ys.pow(2).sum(), (y0, *params))
    assert loop_runs == [True]   # the forward solve (the backward solve lands on every output time: per step)
    for key in ("n_steps", "nfe", "nfe_backward"):
        assert compiled.stats[key] == eager.stats[key], key
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


class _PerSampleCoupled(_Coupled):
    """:class:`_Coupled` for per-sample solves, where ``t`` has one time per sample, shape ``(batch,)``."""

    def forward(self, t, y):
        return super().forward(t.unsqueeze(-1), y)


def test_per_sample_steps_compile_and_match_eager(monkeypatch):
    """compile=True with per_sample=True: every batched step runs compiled (one time and step size per sample), and
    so do the step's verdict and the placement of its outputs; the solve takes the eager solve's steps, for the
    forward solve and the three gradient strategies (the adjoint's backward steps stay eager)."""
    from neuralode.solvers.compiled import CompiledRungeKutta

    parts, original = [], CompiledRungeKutta.run

    def spy(self, part, *args, **kwargs):
        outcome = original(self, part, *args, **kwargs)
        parts.append((part, outcome is not None))
        return outcome

    monkeypatch.setattr(CompiledRungeKutta, "run", spy)
    field = type("PerSampleCoupled", (_PerSampleCoupled,), {})()
    y0 = _y0()
    # (enough output times that a step passes one, two or more of them: the placement's shapes change within a
    # solve, which must not count as a field that changes between steps)
    t = torch.stack([torch.linspace(0.0, 2.0, 41, dtype=torch.float64) * (1 + 0.25 * b) for b in range(4)])
    kwargs = dict(method="dopri5", rtol=1e-8, atol=1e-9, per_sample=True)
    with torch.no_grad():
        eager, compiled = _pair(field, y0, t, **kwargs)
    compiled_parts = {("per_sample", True), ("judge", True), ("place", True)}   # step, verdict, output placement
    assert set(parts) == compiled_parts
    for key in ("n_steps", "n_accepted", "n_rejected"):
        assert torch.equal(compiled.stats[key], eager.stats[key]), key
    assert compiled.stats["nfe"] == eager.stats["nfe"]
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-11, atol=1e-12)
    inputs = (field.gain, field.decay)
    direct = None
    for gradient in ("direct", "checkpoint", "adjoint"):
        eager, compiled = _pair(field, y0, t, gradient=gradient, **kwargs)
        grads = [torch.autograd.grad(s.ys.pow(2).sum(), inputs) for s in (eager, compiled)]
        direct = grads[0] if direct is None else direct
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads[1], direct):   # (the adjoint to its tolerance)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert set(parts) == compiled_parts
    # A bfloat16 state: the compiled field rounds its intermediates to bfloat16 as eager does (inductor kept them in
    # float32, and the steps and error estimates differed from eager's: 3 against 4 steps for a sample).
    half = type("PerSampleCoupled", (_PerSampleCoupled,), {})(dtype=torch.bfloat16)
    with torch.no_grad():
        eager, compiled = _pair(half, y0.to(torch.bfloat16), t, method="dopri5", rtol=1e-3, atol=1e-4, per_sample=True)
    assert torch.equal(compiled.stats["n_steps"], eager.stats["n_steps"])
    # (the same step counts; two of 492 interpolated outputs differ by one bfloat16 ulp)
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=2 ** -7, atol=1e-4)


def test_a_field_that_changes_every_step_stops_compiling_with_a_warning():
    """A call counter (self.nfe += 1) is guarded on as a constant, so every step compiled anew: seconds each until
    torch.compile's limit of 8 variants, and silently for a solve of fewer steps (a QA round: 7 graphs, 11 s).
    The third compilation of one kernel within a solve now switches the field to eager steps, with a warning that
    names the cause; the results are eager's."""
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, t, y):
            self.calls += 1
            return -0.5 * y + torch.cos(t)

    y0 = torch.ones(3, dtype=torch.float64)
    t = torch.linspace(0.0, 4.0, 3, dtype=torch.float64)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad(), pytest.warns(UserWarning, match=r"solved eagerly from here.*compiled 3 times in one solve"
                                                          r".*self.nfe \+= 1"):
        compiled = neuralode.solve(Counting(), y0, t, compile=True, options={"max_step": 0.5})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3
    with torch.no_grad():
        eager = neuralode.solve(Counting(), y0, t, options={"max_step": 0.5})
    assert compiled.stats["n_steps"] == eager.stats["n_steps"]
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-13)
