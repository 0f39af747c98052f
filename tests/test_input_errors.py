"""Every bad input raises at the boundary with a message that names the argument and the fix, and every
numerical failure carries its cause and time (non-finite values, step size underflow, max steps)."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
Y0 = torch.tensor([1.0, 2.0], dtype=F64)


def decay(t, y):
    return -y


def _solve(**kwargs):
    args = dict(func=decay, y0=Y0, t=T01)
    args.update(kwargs)
    func, y0, t = args.pop("func"), args.pop("y0"), args.pop("t")
    return neuralode.solve(func, y0, t, **args)


# --- times ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("t, exc, match", [
    (torch.zeros(2, 2, dtype=F64), ValueError, r"t must be 1-D, got shape \(2, 2\).*reshape\(-1\)"),
    (torch.tensor(0.0, dtype=F64), ValueError, r"t must be 1-D"),
    (torch.tensor([0.0, 1.0, 0.5], dtype=F64), ValueError, r"strictly increasing or strictly decreasing.*sort"),
    (torch.tensor([0.0, 1.0, 1.0], dtype=F64), ValueError, r"strictly increasing or strictly decreasing.*duplicates"),
    (torch.tensor([0.0, math.nan, 1.0], dtype=F64), ValueError, r"t contains NaN"),
    (torch.tensor([0.0, math.inf], dtype=F64), ValueError, r"t contains an infinite value"),
    (torch.tensor([0, 1]), TypeError, r"t has dtype torch.int64; times must be floating point"),
    ([0.0, 1.0], TypeError, r"t must be a 1-D torch.Tensor.*torch.tensor"),
    (torch.zeros(0, dtype=F64), ValueError, r"t is empty"),
])
def test_bad_times(t, exc, match):
    with pytest.raises(exc, match=match):
        _solve(t=t)


def test_bad_times_through_odeint():
    with pytest.raises(ValueError, match=r"t must be 1-D"):
        neuralode.odeint(decay, Y0, torch.zeros(2, 2, dtype=F64))


# --- state ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("y0, exc, match", [
    (torch.tensor([1, 2]), TypeError, r"y0 has dtype torch.int64; the state must be floating point or complex.*to\("),
    (torch.tensor([True]), TypeError, r"y0 has dtype torch.bool"),
    (1.0, TypeError, r"y0 must be a torch.Tensor, a tuple of tensors or a PyTree of tensors.*torch.tensor"),
    ((), TypeError, r"y0 is an empty tuple: the state needs at least one tensor"),
    ((torch.zeros(1, dtype=F64), torch.zeros(1, dtype=torch.int32)), TypeError, r"y0\[1\] has dtype torch.int32"),
    ((torch.zeros(1, dtype=F64), torch.zeros(1)), TypeError, r"share one dtype.*common dtype"),
    (torch.tensor([math.nan], dtype=F64), ValueError, r"y0 contains NaN or infinite values"),
])
def test_bad_state(y0, exc, match):
    with pytest.raises(exc, match=match):
        _solve(y0=y0, func=lambda t, y: y)


# --- vector field ---------------------------------------------------------------------------------

def test_func_not_callable():
    with pytest.raises(TypeError, match=r"func must be callable as func\(t, y\)"):
        _solve(func=3)


def test_func_wrong_shape():
    with pytest.raises(ValueError, match=r"func\(t, y\) returned shape \(3,\) but the state has shape \(2,\).*exactly"):
        _solve(func=lambda t, y: torch.zeros(3, dtype=F64))


def test_func_wrong_dtype():
    with pytest.raises(TypeError, match=r"returned dtype torch.float32 but the state has dtype torch.float64.*"
                                        r"model.to\(y0.dtype\)"):
        _solve(func=lambda t, y: y.float())


def test_func_not_a_tensor():
    with pytest.raises(TypeError, match=r"func\(t, y\) returned list"):
        _solve(func=lambda t, y: [0.0, 0.0])


def test_func_tuple_state_mismatches():
    y0 = (torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match=r"y0 is a tuple of 2 tensors; return a tuple"):
        _solve(y0=y0, func=lambda t, y: y[0])
    with pytest.raises(ValueError, match=r"func returned 1 tensors for a state of 2"):
        _solve(y0=y0, func=lambda t, y: (y[0],))
    with pytest.raises(ValueError, match=r"func\(t, y\)\[1\] returned shape \(2,\)"):
        _solve(y0=y0, func=lambda t, y: (y[0], y[0]))


def test_func_non_finite_at_start():
    with pytest.raises(NonFiniteError, match=r"non-finite values at t=0.0"):
        _solve(func=lambda t, y: y / 0.0)


# --- tolerances -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rtol=-1e-3), ValueError, r"rtol=-0.001 is invalid; tolerances must be finite and non-negative"),
    (dict(atol=-1.0), ValueError, r"atol=-1.0 is invalid"),
    (dict(rtol=math.nan), ValueError, r"rtol=nan is invalid"),
    (dict(atol=torch.tensor([1e-6, -1e-6], dtype=F64)), ValueError, r"atol must be finite and non-negative"),
    (dict(rtol=torch.ones(3, dtype=F64)), ValueError, r"rtol has shape \(3,\), which does not broadcast to the "
                                                      r"state shape \(2,\)"),
    (dict(rtol=torch.ones(4, 2, dtype=F64)), ValueError, r"rtol has shape \(4, 2\), which would change the state"),
    (dict(rtol="1e-3"), TypeError, r"rtol must be a float or a tensor, got str"),
    (dict(atol=True), TypeError, r"atol must be a float or a tensor, got bool"),
    (dict(atol=torch.ones(2, dtype=F64, requires_grad=True)), ValueError, r"atol must not require grad.*detach"),
])
def test_bad_tolerances(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _solve(**kwargs)


def test_bad_tolerance_for_tuple_state():
    y0 = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    f = lambda t, y: (-y[0], -y[1])  # noqa: E731
    with pytest.raises(ValueError, match=r"rtol has 3 entries but y0 has 2 tensors"):
        _solve(y0=y0, func=f, rtol=(1e-3, 1e-3, 1e-3))
    with pytest.raises(ValueError, match=r"atol\[1\]=-1.0 is invalid"):
        _solve(y0=y0, func=f, atol=(1e-3, -1.0))


# --- method and options ---------------------------------------------------------------------------

def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'dopri'. Did you mean 'dopri[58]'\? Choose one of"):
        _solve(method="dopri")
    with pytest.raises(ValueError, match=r"unknown method 'xyz'.*Choose one of"):
        neuralode.odeint(decay, Y0, T01, method="xyz")
    with pytest.raises(TypeError, match=r"method must be a name .*, a ButcherTableau or a neuralode.solvers.Solver instance, got NoneType"):
        _solve(method=None)


def test_unknown_option():
    with pytest.raises(ValueError, match=r"option 'frist_step' means nothing for method 'dopri5'. Did you mean "
                                         r"'first_step'\? It accepts: \["):
        _solve(method="dopri5", options={"frist_step": 0.1})


@pytest.mark.parametrize("method, option", [("rk4", "first_step"), ("rk4", "rtol"), ("dopri5", "step_size"),
                                            ("dopri5", "perturb"), ("euler", "max_order")])
def test_option_meaningless_for_method_lists_accepted_options(method, option):
    opts = {option: 0.1}
    if method in ("rk4", "euler"):
        opts["step_size"] = 0.1
    with pytest.raises(ValueError, match=rf"option '{option}' means nothing for method '{method}'.*It accepts"):
        _solve(method=method, options=opts)


def test_options_not_a_dict():
    with pytest.raises(TypeError, match=r"options must be a dict, got list"):
        _solve(options=[("first_step", 0.1)])


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "heun3"])
def test_fixed_method_without_step_size(method):
    with pytest.raises(ValueError, match=rf"method '{method}' takes fixed steps: give options=\{{'step_size': h\}}"
                                         r" or a 'grid_constructor'"):
        _solve(method=method)


@pytest.mark.parametrize("h", [0.0, -0.1, math.nan])
def test_step_size_not_positive(h):
    with pytest.raises(ValueError, match=r"option 'step_size'=.* is invalid; it must be > 0"):
        _solve(method="rk4", options={"step_size": h})


def test_step_size_infinite_or_not_a_number():
    with pytest.raises(ValueError, match=r"option 'step_size' must be finite"):
        _solve(method="rk4", options={"step_size": math.inf})
    with pytest.raises(TypeError, match=r"option 'step_size' must be a number, got str"):
        _solve(method="rk4", options={"step_size": "0.1"})


def test_step_size_and_grid_constructor_together():
    with pytest.raises(ValueError, match=r"either option 'step_size' or 'grid_constructor', not both"):
        _solve(method="rk4", options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t})


@pytest.mark.parametrize("grid, match", [
    (torch.tensor([0.0, 0.5], dtype=F64), r"must start at t\[0\]=0.0 and end at t\[-1\]=1.0"),
    (torch.tensor([1.0, 0.5, 0.0], dtype=F64), r"opposite direction"),
    (torch.tensor([0.0], dtype=F64), r"grid_constructor must return a 1-D tensor with at least two times"),
    ([0.0, 1.0], r"grid_constructor must return a 1-D tensor"),
])
def test_bad_grid_constructor(grid, match):
    with pytest.raises(ValueError, match=match):
        _solve(method="rk4", options={"grid_constructor": lambda f, y, t: grid})


def test_grid_constructor_not_callable():
    with pytest.raises(TypeError, match=r"option 'grid_constructor' must be callable"):
        _solve(method="rk4", options={"grid_constructor": 3})


@pytest.mark.parametrize("options, exc, match", [
    ({"controller": "pd"}, ValueError, r"option 'controller' must be 'integral', 'pi', 'pid' or 'predictive', got 'pd'"),
    ({"max_num_steps": 0}, ValueError, r"option 'max_num_steps' must be a positive integer \(such as 10_000\), got 0"),
    ({"max_num_steps": 10.5}, ValueError, r"option 'max_num_steps' must be a positive integer"),
    ({"safety": -0.9}, ValueError, r"option 'safety'=-0.9 is invalid; it must be > 0"),
    ({"ifactor": 0.5}, ValueError, r"ifactor >= 1 and dfactor <= 1"),
    ({"dfactor": 2.0}, ValueError, r"ifactor >= 1 and dfactor <= 1"),
    ({"min_step": 0.5, "max_step": 0.1}, ValueError, r"option 'min_step'=0.5 exceeds 'max_step'=0.1"),
    ({"min_step": -1.0}, ValueError, r"option 'min_step'=-1.0 is invalid; it must be >= 0"),
    ({"first_step": 0.0}, ValueError, r"option 'first_step'=0.0 is invalid; it must be > 0"),
    ({"first_step": torch.ones(2)}, ValueError, r"option 'first_step' must be a single number"),
    ({"dtype": torch.int32}, TypeError, r"option 'dtype' must be a floating torch.dtype"),
    ({"step_t": [0.5, math.nan]}, ValueError, r"option 'step_t' must contain finite times"),
])
def test_bad_adaptive_options(options, exc, match):
    with pytest.raises(exc, match=match):
        _solve(method="dopri5", options=options)


def test_bad_interp():
    with pytest.raises(ValueError, match=r"option 'interp' must be 'linear' or 'cubic', got 'quadratic'"):
        _solve(method="rk4", options={"step_size": 0.1, "interp": "quadratic"})


def test_bad_gradient_and_event_arguments():
    with pytest.raises(ValueError, match=r"unknown gradient strategy 'adjoin'. Did you mean 'adjoint'\?"):
        _solve(gradient="adjoin")
    with pytest.raises(TypeError,
                       match=r"gradient must be 'direct', 'adjoint', 'checkpoint', 'reversible' or a GradientStrategy"):
        _solve(gradient=3)
    with pytest.raises(ValueError, match=r"event_direction must be 0, 1 or -1, got 2"):
        _solve(event_fn=lambda t, y: y[0], event_direction=2)
    with pytest.raises(TypeError, match=r"event_fn must be callable"):
        _solve(event_fn=1.0)
    with pytest.raises(ValueError, match=r"with event_fn, t must hold two times \[t0, t1\]"):
        neuralode.odeint(decay, Y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), event_fn=lambda t, y: y[0] - 0.5)


# --- devices --------------------------------------------------------------------------------------

def test_t_and_y0_on_different_devices_meta():
    t = torch.tensor([0.0, 1.0], dtype=F64, device="meta")
    with pytest.raises(ValueError, match=r"t is on meta but y0 is on cpu; move them to the same device.*to\(y0.device\)"):
        _solve(t=t)


def test_tuple_state_on_different_devices_meta():
    y0 = (torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64, device="meta"))
    with pytest.raises(ValueError, match=r"tuple y0 are on different devices.*move them to one device"):
        _solve(y0=y0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_t_and_y0_on_different_devices_cuda():
    with pytest.raises(ValueError, match=r"t is on cuda:0 but y0 is on cpu"):
        _solve(t=T01.cuda())
    with pytest.raises(ValueError, match=r"t is on cpu but y0 is on cuda:0"):
        _solve(y0=Y0.cuda())


# --- numerical failures ---------------------------------------------------------------------------

def test_max_num_steps_default_is_finite():
    """The default cap is 100000 attempted steps (running 100000 steps would make the suite slow, so the
    default is read from the controller the solve builds; the cap itself is exercised below)."""
    import inspect

    from neuralode.controllers import AdaptiveController

    assert AdaptiveController().max_num_steps == 100_000
    assert "max_num_steps`` (default 100000)" in " ".join(inspect.getdoc(neuralode.solve).split())


def test_max_num_steps_small():
    with pytest.raises(MaxStepsError, match=r"reached the maximum number of steps \(max_num_steps=5\) at t=") as info:
        _solve(t=torch.tensor([0.0, 100.0], dtype=F64), options={"max_num_steps": 5})
    assert isinstance(info.value, SolverError)
    assert 0 < info.value.t < 100


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_blow_up_is_non_finite_not_underflow(method):
    """dy/dt = y**2, y(0) = 1 has y = 1 / (1 - t): the solution blows up at t = 1."""
    with pytest.raises(NonFiniteError) as info:
        neuralode.solve(lambda t, y: y ** 2, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                        method=method)
    assert not isinstance(info.value, StepSizeUnderflowError)
    assert abs(info.value.t - 1.0) < 1e-3
    assert "t=1.0" in str(info.value) or "t=0.999" in str(info.value)


def _nan_after_half(t, y):
    return -y * (math.nan if float(t) > 0.5 else 1.0)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "adaptive_heun"])
def test_nan_vector_field_reported_with_time_adaptive(method):
    with pytest.raises(NonFiniteError, match=r"non-finite values .* at t=0\.(5|4999)") as info:
        _solve(func=_nan_after_half, method=method)
    assert abs(info.value.t - 0.5) < 1e-9


def test_nan_vector_field_reported_with_time_fixed():
    t = torch.linspace(0, 1, 11, dtype=F64)
    with pytest.raises(NonFiniteError, match=r"NaN or infinite by t=0\.6.*reduce step_size") as info:
        _solve(func=_nan_after_half, method="rk4", t=t, options={"step_size": 0.05})
    assert abs(info.value.t - 0.6) < 1e-12


def _jump(t, y):
    # finite everywhere, but a jump of 1e30 at t = 0.5 that no step size can resolve
    return torch.ones_like(y) * (1e30 if float(t) >= 0.5 else 0.0)


def test_step_size_underflow_reported_with_time():
    with pytest.raises(StepSizeUnderflowError, match=r"step size underflow at t=0.49999") as info:
        _solve(func=_jump)
    assert abs(info.value.t - 0.5) < 1e-12


def test_throw_false_returns_failed_solution():
    t = torch.linspace(0, 2, 5, dtype=F64)
    sol = neuralode.solve(lambda t, y: y ** 2, torch.tensor([1.0], dtype=F64), t, throw=False)
    assert sol.success is False
    assert sol.status == "non_finite"
    assert "non-finite" in sol.message
    # the outputs reached before the failure are returned: a prefix of t through 0.5 (the solver may
    # step an ulp-scale distance past t = 1 before the step collapses, so t = 1 can be in it too)
    n = len(sol.ts)
    assert n in (2, 3) and torch.equal(sol.ts, t[:n])
    assert sol.ys.shape == (n, 1)
    assert torch.allclose(sol.ys[1], torch.tensor([2.0], dtype=F64), rtol=1e-5)


def test_throw_false_max_steps():
    sol = _solve(t=torch.tensor([0.0, 100.0], dtype=F64), options={"max_num_steps": 5}, throw=False)
    assert not sol.success and sol.status == "max_steps_reached" and "max_num_steps=5" in sol.message
    assert sol.ys.shape == (1, 2)


def test_throw_false_underflow():
    sol = _solve(func=_jump, throw=False)
    assert not sol.success and sol.status == "step_size_underflow" and "step size underflow" in sol.message


def test_success_status():
    sol = _solve()
    assert sol.success and sol.status == "success" and sol.message


def test_solution_evaluate_errors():
    sol = _solve()
    with pytest.raises(ValueError, match=r"no dense output; call solve\(..., dense=True\)"):
        sol.evaluate(0.5)
    with pytest.raises(ValueError, match=r"dense=True"):
        sol.step_times
    sol = _solve(dense=True)
    with pytest.raises(ValueError, match=r"t=1.5 lies outside the solved span \[0.0, 1.0\]"):
        sol.evaluate(1.5)


# --- options that were accepted but misbehaved ------------------------------------------------------

def test_zero_rtol_and_atol_is_a_clear_error():
    with pytest.raises(ValueError, match="rtol and atol are both zero"):
        neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                         rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="rtol and atol are both zero"):
        neuralode.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                         rtol=torch.tensor([1e-6, 0.0], dtype=F64), atol=0.0)
    # Fixed steps do not use tolerances, so zeros are fine there.
    neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                     method="rk4", options={"step_size": 0.5}, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("options, error, message", [
    ({"safety": 5.0}, ValueError, r"'safety'=5.0 must be in \(0, 1\]"),
    ({"norm": "seminorm"}, TypeError, "option 'norm' must be a function.*adjoint option"),
])
def test_adaptive_option_values_are_checked(options, error, message):
    with pytest.raises(error, match=message):
        neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                         options=options)


def test_perturb_must_be_a_bool():
    with pytest.raises(TypeError, match="'perturb' must be True or False"):
        neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                         method="rk4", options={"step_size": 0.1, "perturb": "no"})


@pytest.mark.parametrize("kwargs", [{"adjoint_rtol": -1.0}, {"adjoint_atol": float("nan")}])
def test_adjoint_tolerances_are_checked(kwargs):
    with pytest.raises(ValueError, match="adjoint (rtol|atol)=.* finite and non-negative"):
        neuralode.odeint_adjoint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                                 **kwargs)


@pytest.mark.parametrize("method, options", [("dopri5", {}), ("rk4", {"step_size": 0.5})])
def test_event_that_never_occurs_says_so(method, options):
    """In event mode the span is open-ended: running out of steps means event_fn never changed sign, and the
    error says that (not a stiffness hint), for adaptive and fixed-step methods alike."""
    never = r"the event did not occur within max_num_steps=200 .*check event_fn"
    with pytest.raises(MaxStepsError, match=never) as info:
        neuralode.odeint_event(lambda t, y: -y, torch.tensor([1.0], dtype=F64), torch.tensor(0.0, dtype=F64),
                               event_fn=lambda t, y: y[0] + 0.5, method=method,
                               options={"max_num_steps": 200, **options})
    assert "stiff" not in str(info.value)
    assert info.value.t > 0


def test_a_state_on_the_meta_device_is_a_clear_error():
    # torch said "Cannot copy out of meta tensor" (torchdiffeq fails the same way)
    with pytest.raises(ValueError, match=r"on the 'meta' device, whose tensors hold no values"):
        neuralode.solve(lambda t, y: -y, torch.ones(2, device="meta"), torch.tensor([0.0, 1.0], device="meta"))


def test_a_field_of_the_state_alone_is_named_with_the_wrapper_to_use():
    """torchdyn calls a field f(x); here it is f(t, y). A one-argument module or lambda raised torch's own
    'forward() takes 2 positional arguments but 3 were given' from deep inside."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()).double()
    for field in (module, lambda y: -y):
        with pytest.raises(TypeError, match=r"func is called as func\(t, y\).*neuralode.nn.Autonomous"):
            neuralode.solve(field, Y0, T01)
    # a TypeError from inside a two-argument field is the field's own, unchanged

    def broken(t, y):
        raise TypeError("a bug inside the field")

    with pytest.raises(TypeError, match="^a bug inside the field$"):
        neuralode.solve(broken, Y0, T01)


def test_a_gradient_name_of_another_library_names_the_strategy_objects():
    from neuralode.nn import ODEBlock

    for call in (lambda: neuralode.solve(decay, Y0, T01, gradient="interpolated_adjoint"),
                 lambda: ODEBlock(decay, gradient="interpolated_adjoint")):
        with pytest.raises(ValueError, match=r"Adjoint\(interpolate=True\) \(torchdyn's 'interpolated_adjoint'\)"):
            call()


def test_tolerances_far_below_the_dtypes_resolution_are_warned_about_at_once():
    """float32 at rtol = atol = 1e-14 crawled for 100,000 steps before MaxStepsError said why."""
    y0 = torch.ones(2)
    t = torch.tensor([0.0, 1.0])
    with pytest.warns(UserWarning, match="ask for far more digits than float32 holds"):
        neuralode.solve(decay, y0, t, rtol=1e-14, atol=1e-14, options={"max_num_steps": 20}, throw=False)
    with pytest.warns(UserWarning, match="ask for far more digits than float32 holds"):     # per sample too
        neuralode.solve(decay, y0.reshape(2, 1), t, rtol=1e-14, atol=1e-14, options={"max_num_steps": 20},
                        throw=False, per_sample=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        neuralode.solve(decay, y0, t)                          # torchdiffeq's defaults, rtol 1e-7, in float32
        neuralode.solve(decay, y0, t, rtol=0.0, atol=1e-6)     # absolute control only
        neuralode.solve(decay, y0.double(), t.double(), rtol=1e-14, atol=1e-14)


def test_pytree_states_name_the_leaf_or_structure_at_fault():
    # diffrax's PyTrees are states here too (tests/test_pytree_states.py); what is not a tensor is named by its path.
    with pytest.raises(TypeError, match=r"y0\['v'\]\[1\] is a float, not a tensor; every leaf.*close over them"):
        neuralode.solve(lambda t, y: y, {"x": torch.ones(2), "v": (torch.ones(1), 0.5)}, T01)
    with pytest.raises(TypeError, match=r"y0 is an empty dict"):
        neuralode.solve(lambda t, y: y, {}, T01)
    with pytest.raises(TypeError, match=r"y0 must be a torch.Tensor, a tuple of tensors or a PyTree.*got set"):
        neuralode.solve(lambda t, y: y, {torch.ones(1)}, T01)
    y0 = {"x": torch.ones(2, dtype=F64), "v": torch.zeros(2, dtype=F64)}
    with pytest.raises(TypeError, match=r"func returned \{'x': \*, 'w': \*\} but y0 has the structure "
                                        r"\{'x': \*, 'v': \*\}; return the derivative in y0's structure"):
        neuralode.solve(lambda t, y: {"x": y["v"], "w": y["x"]}, y0, T01)
    with pytest.raises(ValueError, match=r"func\(t, y\)\['v'\] returned shape \(1,\) but the state has shape \(2,\)"):
        neuralode.solve(lambda t, y: {"x": y["v"], "v": y["x"][:1]}, y0, T01)
    with pytest.raises(TypeError, match=r"y0\['v'\] has dtype torch.int64"):
        neuralode.solve(lambda t, y: y, {"x": y0["x"], "v": torch.zeros(2, dtype=torch.long)}, T01)
    with pytest.raises(ValueError, match=r"rtol has the structure \{'x': \*\} but y0 has \{'x': \*, 'v': \*\}"):
        neuralode.solve(lambda t, y: y, y0, T01, rtol={"x": 1e-6})
    with pytest.raises(ValueError, match=r"atol\['v'\]=-1.0 is invalid"):
        neuralode.solve(lambda t, y: y, y0, T01, atol={"v": -1.0, "x": 1e-9})
    with pytest.raises(ValueError, match=r"per_sample=True, every tensor of y0 needs the batch dimension first"):
        neuralode.solve(lambda t, y: y, {"x": torch.zeros(2), "v": torch.zeros(3)}, T01, per_sample=True)


def test_vmap_over_solve_says_to_batch_instead():
    # jax.vmap over diffeqsolve is a diffrax habit; torch.func.vmap over solve failed deep inside torch.
    with pytest.raises(ValueError, match="batched by torch.func.vmap.*per_sample=True"):
        torch.func.vmap(lambda y0: neuralode.solve(decay, y0, T01).ys)(torch.ones(3, 2, dtype=F64))
    # torch.func.grad over solve works (no batching): the check does not get in its way
    grad = torch.func.grad(lambda y0: neuralode.odeint(decay, y0, T01)[-1].sum())(torch.ones(2, dtype=F64))
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_a_custom_backward_pass_under_torch_func_says_to_use_direct(gradient, per_sample):
    # torch.func.grad over an adjoint or checkpointed solve failed deep inside torch ("must override the
    # setup_context staticmethod"); it now names the strategy and what works. direct works under the transform.
    y0 = torch.ones(3, 2, dtype=F64)
    loss = lambda g: lambda z: neuralode.solve(decay, z, T01, gradient=g, per_sample=per_sample).ys.sum()  # noqa: E731
    with pytest.raises(ValueError, match=f"gradient='{gradient}' cannot run under a torch.func transform.*"
                                         "gradient='direct' inside the transform"):
        torch.func.grad(loss(gradient))(y0)
    torch.testing.assert_close(torch.func.grad(loss("direct"))(y0), torch.autograd.grad(
        neuralode.solve(decay, y0.requires_grad_(), T01, gradient=gradient, per_sample=per_sample).ys.sum(), y0)[0],
        rtol=1e-5, atol=1e-7)


def test_a_zero_length_per_sample_row_says_so():
    times = torch.tensor([[0.0, 0.5, 1.0], [2.0, 2.0, 2.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"row t\[1\] has zero length.*leave that sample out"):
        neuralode.solve(decay, torch.ones(2, 1, dtype=F64), times, per_sample=True)
    with pytest.raises(ValueError, match=r"row t\[1\] must be strictly increasing or strictly decreasing"):
        neuralode.solve(decay, torch.ones(2, 1, dtype=F64), torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 0.5]],
                                                                          dtype=F64), per_sample=True)


@pytest.mark.parametrize("per_sample", [False, True])
def test_times_far_from_zero_rounded_to_a_float32_state_are_warned_about(per_sample):
    # func receives t in the state's dtype: float64 times near 1e4 reach a float32 field rounded by 1e-3, which cost
    # y' = cos t three digits at rtol 1e-6 (torchode passes float64 times). Only where the offset dominates the span.
    field = lambda t, y: torch.cos(t).reshape(-1, 1).expand_as(y)  # noqa: E731
    y0 = torch.zeros(1, 1)
    with pytest.warns(UserWarning, match=r"func receives t in float32.*spacing near \|t\| = 1e\+04"):
        neuralode.solve(field, y0, torch.tensor([1e4, 1e4 + 10], dtype=F64), rtol=1e-6, atol=1e-6,
                        per_sample=per_sample)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        neuralode.solve(field, y0, torch.tensor([0.0, 10.0], dtype=F64), per_sample=per_sample)       # from 0
        neuralode.solve(field, y0, torch.tensor([1e4, 1e4 + 10]), per_sample=per_sample, throw=False,  # float32 t
                        options={"max_num_steps": 50})
        neuralode.solve(field, y0.double(), torch.tensor([1e4, 1e4 + 10], dtype=F64), per_sample=per_sample)
