"""The method registry: name -> stepper factory, kind, and the options the method accepts."""

from __future__ import annotations

from dataclasses import dataclass

from .callbacks import NAMES as CALLBACK_NAMES
from .solvers.base import Solver
from .solvers.runge_kutta import ExplicitRungeKutta
from .tableaus import TABLEAUS, ButcherTableau

# max_num_steps bounds a fixed-step solve that runs until an event (torchdiffeq's would run forever).
FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "perturb", "interp", "max_num_steps"})
ADAPTIVE_OPTIONS = frozenset({"first_step", "max_num_steps", "min_step", "force_min_step", "max_step", "safety",
                              "ifactor", "dfactor", "step_t", "jump_t", "norm", "dtype", "controller", "pcoeff", "icoeff",
                              "dcoeff", "land_on_outputs", "dense_error_control"})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adaptive: bool
    make_stepper: object      # (options) -> stepper
    options: frozenset
    description: str
    # An outside solver that takes the whole span (scipy_solver): it calls the field without a graph
    # and calls no step callbacks.
    whole_span: bool = False
    # The step-size controller without options={"controller": ...}: torchdiffeq's integral controller for
    # the explicit methods, Gustafsson's predictive one for the implicit and Rosenbrock methods (RADAU5's,
    # RODAS's and scipy Radau's default: on the stiff set it took 2-22% fewer evaluations, see
    # controllers.py).
    default_controller: str = "integral"

    @property
    def callbacks(self) -> frozenset:
        """The step callbacks this method calls (torchdiffeq's ``valid_callbacks``)."""
        if self.whole_span:
            return frozenset()
        return frozenset(CALLBACK_NAMES) if self.adaptive else frozenset({"callback_step"})


def _rk(name):
    tableau = TABLEAUS[name]
    stepper = ExplicitRungeKutta(tableau)
    return MethodSpec(name, tableau.adaptive, lambda options, _s=stepper: _s,
                      ADAPTIVE_OPTIONS if tableau.adaptive else FIXED_OPTIONS,
                      tableau.reference)


def _explicit_adams(options):
    from .solvers.adams import ExplicitAdams
    return ExplicitAdams(max_order=options.get("max_order", 4))


def _adams(options):
    from .solvers.adams import VariableOrderAdams
    return VariableOrderAdams(max_order=options.get("max_order", 12), max_iters=options.get("max_iters", 4))


REGISTRY = {name: _rk(name) for name in TABLEAUS}
REGISTRY["explicit_adams"] = MethodSpec(
    "explicit_adams", False, _explicit_adams, FIXED_OPTIONS | {"max_order"},
    "Adams-Bashforth on a fixed grid, orders 1-4, started by Runge-Kutta steps")
def _implicit_adams(options):
    from .solvers.adams import ImplicitAdams
    return ImplicitAdams(max_order=options.get("max_order", 12), max_iters=options.get("max_iters", 4))


REGISTRY["implicit_adams"] = MethodSpec(
    "implicit_adams", False, _implicit_adams, FIXED_OPTIONS | {"max_order", "max_iters"},
    "torchdiffeq's Adams-Bashforth-Moulton on a fixed grid, orders up to 12, corrector iterated to rtol/atol")
REGISTRY["fixed_adams"] = MethodSpec(
    "fixed_adams", False, _implicit_adams, FIXED_OPTIONS | {"max_order", "max_iters"},
    "alias of implicit_adams (torchdiffeq's backward-compatible name)")
def _scipy_solver(options):
    from .solvers.scipy_wrapper import ScipySolver
    return ScipySolver(solver=options.get("solver", "LSODA"), min_step=float(options.get("min_step", 0.0)),
                       max_step=float(options.get("max_step", float("inf"))),
                       max_num_steps=options.get("max_num_steps", 100_000))


REGISTRY["scipy_solver"] = MethodSpec(
    "scipy_solver", True, _scipy_solver, frozenset({"solver", "min_step", "max_step", "norm", "max_num_steps"}),
    "scipy.integrate.solve_ivp over the whole span (option 'solver': LSODA, RK45, RK23, DOP853, Radau, BDF)",
    whole_span=True)
# --- implicit (stiff) methods: one stepper, Newton with Jacobians from autograd --------------------------
IMPLICIT_OPTIONS = frozenset({"jacobian", "jac", "max_iters", "preconditioner"})


def implicit_settings(options) -> dict:
    """The implicit methods' options, checked: jacobian mode, Newton iteration cap, preconditioner."""
    from .solvers.linear import JACOBIAN_MODES
    mode = options.get("jacobian", "dense")
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"option 'jacobian' must be one of {list(JACOBIAN_MODES)}, got {mode!r}: 'dense' for "
                         "small states, 'batched' for a batch of independent samples, 'krylov' for large states")
    max_iters = options.get("max_iters")
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"option 'max_iters' must be a positive integer, got {max_iters!r}")
    preconditioner = options.get("preconditioner")
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError("option 'preconditioner' must be callable as preconditioner(v, c) ~ (I - c J)^{-1} v")
    if preconditioner is not None and mode != "krylov":
        raise ValueError("option 'preconditioner' applies to jacobian='krylov' only")
    jac = options.get("jac")
    if jac is not None and not callable(jac):
        raise TypeError(f"option 'jac' must be callable as jac(t, y) -> the Jacobian df/dy, got {type(jac).__name__}")
    if jac is not None and mode == "krylov":
        raise ValueError("option 'jac' gives the Jacobian as a matrix, which jacobian='krylov' never forms: use "
                         "jacobian='dense' (or 'batched'), or leave 'jac' out (Krylov takes Jacobian-vector "
                         "products by autograd)")
    return {"jacobian": mode, "max_iters": max_iters, "preconditioner": preconditioner}


def _implicit(name, adaptive, description, radau_error=False, tableau_name=None):
    from .tableaus.implicit import IMPLICIT_TABLEAUS
    tableau = IMPLICIT_TABLEAUS[tableau_name or name]

    def make(options):
        from .solvers.implicit import ImplicitRungeKutta
        settings = implicit_settings(options)
        # Adaptive steps shrink when Newton is slow (Hairer's 7-10 iterations); a fixed grid cannot, so it
        # iterates as long as torchdiffeq's implicit methods do (max_iters=100) before reporting failure.
        max_iters = settings.pop("max_iters") or (10 if adaptive else 100)
        return ImplicitRungeKutta(tableau, max_iters=max_iters, radau_error=radau_error, **settings)

    options = (ADAPTIVE_OPTIONS if adaptive else FIXED_OPTIONS) | IMPLICIT_OPTIONS
    return MethodSpec(name, adaptive, make, options, f"{description} ({tableau.reference})",
                      default_controller="predictive")


for _name, _description in (
        ("kvaerno3", "L-stable ESDIRK 3(2), 4 stages, stiffly accurate"),
        ("kvaerno4", "L-stable ESDIRK 4(3), 5 stages, stiffly accurate"),
        ("kvaerno5", "L-stable ESDIRK 5(4), 7 stages, stiffly accurate")):
    REGISTRY[_name] = _implicit(_name, True, _description)
REGISTRY["adaptive_implicit_euler"] = _implicit(
    "adaptive_implicit_euler", True, "backward Euler with step-size control (L-stable, order 1; the trapezoidal rule "
    "as its error estimate, diffrax's ImplicitEuler with a PIDController)")
REGISTRY["radau5"] = _implicit("radau5", True, "Radau IIA of order 5 (3 stages, L-stable) with Hairer's RADAU5 "
                               "error estimate", radau_error=True, tableau_name="radauIIA5")
for _name, _description in (
        ("implicit_euler", "backward Euler on a fixed grid"),
        ("implicit_midpoint", "implicit midpoint rule on a fixed grid"),
        ("trapezoid", "trapezoidal rule (Crank-Nicolson) on a fixed grid"),
        ("radauIIA3", "Radau IIA of order 3 on a fixed grid"),
        ("radauIIA5", "Radau IIA of order 5 on a fixed grid"),
        ("gl4", "Gauss-Legendre of order 4 on a fixed grid"),
        ("gl6", "Gauss-Legendre of order 6 on a fixed grid"),
        ("sdirk2", "L-stable SDIRK of order 2 on a fixed grid"),
        ("trbdf2", "TR-BDF2 on a fixed grid")):
    REGISTRY[_name] = _implicit(_name, False, _description)


# --- IMEX (additive) Runge-Kutta methods for a SplitField f = f_E + f_I: the explicit term by an ERK tableau, the
# implicit term by an ESDIRK one on the same stages (Newton sees the implicit term's Jacobian only) ----------------
def _imex(name):
    def make(options):
        from .solvers.imex import AdditiveRungeKutta
        settings = implicit_settings(options)
        settings["max_iters"] = settings["max_iters"] or 10
        return AdditiveRungeKutta(name, **settings)
    return make


for _name, _description in (
        ("kencarp3", "IMEX ARK3(2)4L[2]SA for a SplitField(explicit, implicit): the explicit term by an ERK, the "
                     "implicit term by an L-stable ESDIRK, 4 stages, order 3"),
        ("kencarp4", "IMEX ARK4(3)6L[2]SA for a SplitField(explicit, implicit): 6 stages, order 4, dense output of "
                     "order 3"),
        ("kencarp5", "IMEX ARK5(4)8L[2]SA for a SplitField(explicit, implicit): 8 stages, order 5, dense output of "
                     "order 3")):
    REGISTRY[_name] = MethodSpec(_name, True, _imex(_name), ADAPTIVE_OPTIONS | IMPLICIT_OPTIONS,
                                 f"{_description} (Kennedy and Carpenter, Appl. Numer. Math. 44 (2003) 139-181)",
                                 default_controller="predictive")


def _rosenbrock(name):
    def make(options):
        from .solvers.rosenbrock import Rosenbrock
        from .tableaus.rosenbrock import ROSENBROCK_TABLEAUS
        settings = implicit_settings(options)
        if settings["max_iters"] is not None:
            raise ValueError(f"option 'max_iters' means nothing for {name!r}: a Rosenbrock method solves linear "
                             "systems, no Newton iteration")
        return Rosenbrock(ROSENBROCK_TABLEAUS[name], jacobian=settings["jacobian"],
                          preconditioner=settings["preconditioner"])
    return make


REGISTRY["rodas5"] = MethodSpec(
    "rodas5", True, _rosenbrock("rodas5"), ADAPTIVE_OPTIONS | {"jacobian", "jac", "preconditioner"},
    "Rosenbrock method of order 5(4), L-stable, stiffly accurate, with a 4th-order dense output "
    "(Di Marzo 1993; Hairer-Wanner IV.7): one Jacobian and one LU per step, no Newton iteration",
    default_controller="predictive")
REGISTRY["rodas5p"] = MethodSpec(
    "rodas5p", True, _rosenbrock("rodas5p"), ADAPTIVE_OPTIONS | {"jacobian", "jac", "preconditioner"},
    "Rosenbrock method of order 5(4) like rodas5, with Steinebach's coefficients (2023) that keep their order on "
    "very stiff problems (Prothero-Robinson) where rodas5's drops: the better choice for stiff problems",
    default_controller="predictive")


def _auto(options):
    from .solvers.auto import AutoSwitching
    from .solvers.implicit import ImplicitRungeKutta
    from .tableaus.implicit import IMPLICIT_TABLEAUS
    # rodas5p by default (SciML's AutoTsit5(Rodas5P())): on the stiff set at rtol 1e-6 it took 0.45-0.73x
    # kvaerno5's time within auto, with err/tol 0.26-2.1 where kvaerno5's reached 10 (Oregonator).
    stiff_method = options.get("stiff_method", "rodas5p")
    choices = ("kvaerno3", "kvaerno4", "kvaerno5", "radau5", "rodas5", "rodas5p")
    if stiff_method not in choices:
        raise ValueError(f"option 'stiff_method' must be one of {list(choices)}, got {stiff_method!r}")
    if stiff_method.startswith("rodas"):
        return AutoSwitching(stiff=_rosenbrock(stiff_method)(options))
    settings = implicit_settings(options)
    settings["max_iters"] = settings["max_iters"] or 10
    tableau = IMPLICIT_TABLEAUS["radauIIA5" if stiff_method == "radau5" else stiff_method]
    return AutoSwitching(stiff=ImplicitRungeKutta(tableau, radau_error=stiff_method == "radau5", **settings))


REGISTRY["auto"] = MethodSpec(
    "auto", True, _auto, ADAPTIVE_OPTIONS | IMPLICIT_OPTIONS | {"stiff_method"},
    "tsit5 while the problem is not stiff, an implicit method (option 'stiff_method', default rodas5p) while "
    "it is: Hairer's stiffness test switches both ways")

# --- reversible methods: a step can be undone exactly (gradient="reversible": exact gradients, O(1) states) -----
# Their dense output is linear whatever 'interp' says, and a perturbed step would start each one afresh (no longer
# reversible): neither option applies.
REVERSIBLE_FIXED_OPTIONS = FIXED_OPTIONS - {"perturb", "interp"}


def _reversible_heun(options):
    from .solvers.reversible import ReversibleHeun
    return ReversibleHeun()


def _asynchronous_leapfrog(options):
    from .solvers.reversible import AsynchronousLeapfrog
    return AsynchronousLeapfrog()


REGISTRY["reversible_heun"] = MethodSpec(
    "reversible_heun", True, _reversible_heun, ADAPTIVE_OPTIONS,
    "Reversible Heun: order 2, one evaluation per step, algebraically reversible (Kidger, Foster, Li and Lyons, "
    "NeurIPS 2021; diffrax's ReversibleHeun); exact O(1)-memory gradients with gradient='reversible'")
REGISTRY["alf"] = MethodSpec(
    "alf", False, _asynchronous_leapfrog, REVERSIBLE_FIXED_OPTIONS,
    "Asynchronous leapfrog on a fixed grid: order 2, one evaluation per step, algebraically reversible (MALI: "
    "Zhuang, Dvornek, Tatikonda and Duncan, ICLR 2021; torchdyn's 'alf'); exact O(1)-memory gradients with "
    "gradient='reversible'")

# --- symplectic splitting methods for separable systems y = (q, p), q' = f(t, p), p' = g(t, q) ---------------------
# Fixed steps (a controller would break the symplectic structure); dense output linear, as the reversible methods'.
def _symplectic(name):
    def make(options):
        from .solvers.symplectic import Symplectic
        return Symplectic(name)
    return make


def _leapfrog_midpoint(options):
    from .solvers.symplectic import LeapfrogMidpoint
    return LeapfrogMidpoint()


for _name, _description in (
        ("semi_implicit_euler", "Symplectic (semi-implicit) Euler for separable y0=(q, p): order 1, two evaluations "
                                "a step (diffrax's SemiImplicitEuler)"),
        ("leapfrog", "Stoermer-Verlet kick-drift-kick leapfrog for separable y0=(q, p): symplectic, order 2, two "
                     "evaluations a step, reversible (gradient='reversible')"),
        ("yoshida4", "Forest-Ruth/Yoshida triple-jump composition of leapfrogs for separable y0=(q, p): symplectic, "
                     "order 4, six evaluations a step, reversible"),
        ("mclachlan4", "McLachlan's 6-stage symmetric splitting for separable y0=(q, p): symplectic, order 4 with "
                       "small error constants, ten evaluations a step, reversible"),
        ("yoshida6", "Yoshida's seven-leapfrog composition for separable y0=(q, p): symplectic, order 6, fourteen "
                     "evaluations a step, reversible")):
    REGISTRY[_name] = MethodSpec(_name, False, _symplectic(_name), REVERSIBLE_FIXED_OPTIONS, _description)
REGISTRY["leapfrog_midpoint"] = MethodSpec(
    "leapfrog_midpoint", False, _leapfrog_midpoint, REVERSIBLE_FIXED_OPTIONS,
    "The leapfrog/midpoint two-step method y_{n+1} = y_{n-1} + 2h f(t_n, y_n), started by Euler: order 2, one "
    "evaluation a step (diffrax's LeapfrogMidpoint; weakly unstable on decaying dynamics)")

REGISTRY["adams"] = MethodSpec(
    "adams", True, _adams, ADAPTIVE_OPTIONS | {"max_order", "max_iters"},
    "Variable-step, variable-order Adams-Bashforth-Moulton predictor-corrector with error control")

METHODS = tuple(REGISTRY)


def spec_for_object(method) -> MethodSpec:
    """A :class:`MethodSpec` for a method given as an object: a :class:`~neuralode.tableaus.ButcherTableau`
    (run by the one explicit Runge-Kutta stepper) or any :class:`~neuralode.solvers.base.Solver` instance.
    It accepts the options of its kind (adaptive or fixed-step)."""
    if isinstance(method, ButcherTableau):
        method = ExplicitRungeKutta(method)
    if not isinstance(method, Solver):
        raise TypeError(f"method must be a name (one of {list(REGISTRY)}), a ButcherTableau or a "
                        f"neuralode.solvers.Solver instance, got {type(method).__name__}")
    if method.solves_whole_span:
        raise TypeError("a whole-span solver cannot be passed as an object; use method='scipy_solver'")
    name = method.tableau.name if isinstance(method, ExplicitRungeKutta) else getattr(method, "name",
                                                                                     type(method).__name__)
    description = getattr(getattr(method, "tableau", None), "reference", "") or f"user solver {name}"
    fixed = FIXED_OPTIONS
    if method.reversible:
        # (one with its own dense output, ReversibleRungeKutta, may interpolate with it: 'interp')
        fixed = REVERSIBLE_FIXED_OPTIONS if method.linear_dense else FIXED_OPTIONS - {"perturb"}
    return MethodSpec(name, method.adaptive, lambda options, _solver=method: _solver,
                      ADAPTIVE_OPTIONS if method.adaptive else fixed, description)
