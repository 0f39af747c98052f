"""The package's layering (docs/architecture.md), checked on the source: no import cycles, a numerics core
that knows nothing of models or experiments, a root ``__init__`` that only re-exports."""

import ast
import pathlib

import pytest
import torch

import neuralode
from neuralode import MaxStepsError, NonFiniteError, Solution, Status, StepSizeUnderflowError, solve

SOURCE = pathlib.Path(neuralode.__file__).parent
ABOVE_THE_CORE = ("neuralode.nn", "neuralode.models", "neuralode.experiments", "neuralode.data", "neuralode.cli",
                  "neuralode.__main__")


def _modules() -> dict:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = ("neuralode",) + path.relative_to(SOURCE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: pathlib.Path, modules: dict, *, module_level_only: bool) -> set:
    """Modules of the package that ``name`` imports (``TYPE_CHECKING`` blocks excluded)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                continue
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue   # an import inside a function runs when called, after every module is loaded
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    full = f"{target}.{alias.name}"
                    found.add(full if full in modules else target)
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return components


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules, module_level_only=True) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_numerics_core_imports_nothing_above_it():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith(ABOVE_THE_CORE) or name == "neuralode":
            continue
        above = {m for m in _imports(name, path, modules, module_level_only=False) if m.startswith(ABOVE_THE_CORE)}
        assert not above, f"{name} (numerics core) imports {sorted(above)}"


def test_layers_and_models_import_solve_from_its_module_not_the_package_root():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith(("neuralode.nn", "neuralode.models")):
            assert "neuralode" not in _imports(name, path, modules, module_level_only=False), name


def test_the_package_root_only_re_exports():
    tree = ast.parse((SOURCE / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Import", "Assign"}, kinds


def test_status_is_an_enum_that_still_compares_as_a_string():
    solution = solve(lambda t, y: -y, torch.ones(2, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64))
    assert solution.status is Status.SUCCESS and solution.status == "success" and str(solution.status) == "success"
    assert f"{solution.status}" == "success"
    assert {NonFiniteError.status, StepSizeUnderflowError.status, MaxStepsError.status} == {
        Status.NON_FINITE, Status.STEP_SIZE_UNDERFLOW, Status.MAX_STEPS}
    failed = solve(lambda t, y: -y, torch.ones(2, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64), options={"max_num_steps": 1},
                   throw=False)
    assert failed.status is Status.MAX_STEPS and not failed.success


@pytest.mark.parametrize("status, success", [(Status.SUCCESS, True), (Status.EVENT, True),
                                             (Status.NON_FINITE, False), (Status.FAILED, False)])
def test_success_follows_the_status(status, success):
    assert Solution(ts=None, ys=None, stats={}, status=status).success is success



def _steppers():
    from neuralode.methods import REGISTRY
    for name, spec in REGISTRY.items():
        if spec.whole_span:
            pytest.importorskip("scipy")
        yield name, spec.make_stepper({})


def test_every_method_is_a_solver_with_consistent_flags():
    from neuralode.solvers.base import Solver
    from neuralode.solvers.runge_kutta import ExplicitRungeKutta

    for name, stepper in _steppers():
        assert isinstance(stepper, Solver), name
        if stepper.solves_whole_span:
            assert not stepper.replayable, name
            continue
        assert isinstance(stepper.order, int) and stepper.order >= 1, name
        assert 1 <= stepper.initial_step_order <= stepper.order, name
        assert stepper.multistep == (name.endswith("adams") or name == "leapfrog_midpoint"), name
        if stepper.multistep:
            assert not stepper.replayable and not stepper.implicit, name
        if isinstance(stepper, ExplicitRungeKutta):
            assert stepper.replayable and not stepper.implicit and stepper.fsal == stepper.tableau.fsal, name
    assert not dict(_steppers())["auto"].replayable     # it switches methods along the solve


@pytest.mark.parametrize("method", ["adams", "explicit_adams", "auto"])
def test_methods_that_cannot_be_replayed_are_refused_by_checkpointing(method):
    options = {"step_size": 0.1} if method == "explicit_adams" else None
    with pytest.raises(ValueError, match="gradient='checkpoint' supports the Runge-Kutta methods"):
        solve(lambda t, y: -y, torch.ones(2, dtype=torch.float64, requires_grad=True),
              torch.linspace(0, 1, 3, dtype=torch.float64), method=method, options=options, gradient="checkpoint")


def test_gradient_strategies_hold_objects_and_parse_no_options():
    # Method names and option dicts become objects at the boundary (solve.py, options.py); the strategies
    # receive a Problem that carries its MethodSpec, controller and the adjoint's parsed backward settings.
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("neuralode.gradients"):
            imported = _imports(name, path, modules, module_level_only=False)
            assert not imported & {"neuralode.options", "neuralode.methods"}, (name, sorted(imported))


def test_bad_adjoint_options_fail_at_the_solve_not_in_backward():
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint option 'norm' must be 'seminorm', 'full' or a callable"):
        solve(lambda t, y: -y, y0, torch.linspace(0, 1, 3, dtype=torch.float64),
              gradient=neuralode.Adjoint(options={"norm": "max"}))
