"""neuralode's kencarp3/4/5 against diffrax's KenCarp3/4/5, float64, in one process.

1. Fixed steps (diffrax: ConstantStepSize with a root finder at 1e-12; neuralode: min_step = max_step = h, forced)
   on a split problem whose terms are both nonlinear and time-dependent: the two libraries should take the same
   steps to Newton's tolerance, and both should be as far from scipy's DOP853 reference.
2. Adaptive steps (PIDController(rtol=1e-6, atol=1e-8) against rtol=1e-6, atol=1e-8) on the same problem and on a
   stiff one, y' = cos t - 0.05 sin y (explicit) - 1e4 (y - sin t) (implicit): steps, and the error against scipy's
   Radau at 1e-12.

Needs jax and diffrax (``pip install jax diffrax``). ``taskset -c 1 python benchmarks/imex_diffrax.py``
"""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import torch
from scipy.integrate import solve_ivp

import neuralode

jax.config.update("jax_enable_x64", True)
torch.set_num_threads(1)
D = torch.float64
T_END = 2.0


def explicit_torch(t, y):
    return torch.stack([-y[1] + 0.1 * torch.sin(t), 0.5 * y[0] * torch.cos(y[1])])


def implicit_torch(t, y):
    return torch.stack([-2.0 * y[0] + 0.25 * y[1] ** 2, -y[1] + t])


def explicit_jax(t, y, args):
    return jnp.stack([-y[1] + 0.1 * jnp.sin(t), 0.5 * y[0] * jnp.cos(y[1])])


def implicit_jax(t, y, args):
    return jnp.stack([-2.0 * y[0] + 0.25 * y[1] ** 2, -y[1] + t])


def stiff_explicit_torch(t, y):
    return torch.cos(t) - 0.05 * torch.sin(y)


def stiff_implicit_torch(t, y):
    return -1e4 * (y - torch.sin(t))


def stiff_explicit_jax(t, y, args):
    return jnp.cos(t) - 0.05 * jnp.sin(y)


def stiff_implicit_jax(t, y, args):
    return -1e4 * (y - jnp.sin(t))


def reference(explicit, implicit, y0, method):
    def f(t, y):
        tt, yy = torch.tensor(t, dtype=D), torch.tensor(y, dtype=D)
        return (explicit(tt, yy) + implicit(tt, yy)).numpy()
    return solve_ivp(f, (0.0, T_END), y0, method=method, rtol=1e-12, atol=1e-14).y[:, -1]


Y0 = np.array([1.0, 0.5])
exact = reference(explicit_torch, implicit_torch, Y0, "DOP853")
solvers = {"kencarp3": diffrax.KenCarp3, "kencarp4": diffrax.KenCarp4, "kencarp5": diffrax.KenCarp5}
terms = diffrax.MultiTerm(diffrax.ODETerm(explicit_jax), diffrax.ODETerm(implicit_jax))
field = neuralode.SplitField(explicit_torch, implicit_torch)
t = torch.tensor([0.0, T_END], dtype=D)

print(f"diffrax {diffrax.__version__}, jax {jax.__version__}, torch {torch.__version__}")
print("1. fixed steps h = 1/8 (16 steps), the split problem")
for name, solver_class in solvers.items():
    h = 0.125
    solver = solver_class(root_finder=diffrax.VeryChord(rtol=1e-12, atol=1e-12, norm=optx.max_norm))
    sol = diffrax.diffeqsolve(terms, solver, 0.0, T_END, h, jnp.array(Y0), throw=False)
    theirs = np.asarray(sol.ys[-1])
    ours = neuralode.solve(field, torch.tensor(Y0, dtype=D), t, method=name, rtol=1e-12, atol=1e-12,
                           options={"first_step": h, "max_step": h, "min_step": h, "force_min_step": True})
    mine = ours.ys[-1].numpy()
    print(f"  {name}: diffrax {sol.result}; apart {np.abs(theirs - mine).max():.1e}; error against DOP853: diffrax "
          f"{np.abs(theirs - exact).max():.2e}, neuralode {np.abs(mine - exact).max():.2e}")

print("2. adaptive, rtol 1e-6, atol 1e-8")
stiff_y0 = np.array([0.0, 0.3])
stiff_exact = reference(stiff_explicit_torch, stiff_implicit_torch, stiff_y0, "Radau")
stiff_terms = diffrax.MultiTerm(diffrax.ODETerm(stiff_explicit_jax), diffrax.ODETerm(stiff_implicit_jax))
stiff_field = neuralode.SplitField(stiff_explicit_torch, stiff_implicit_torch)
for label, their_terms, our_field, y0, truth in (("split", terms, field, Y0, exact),
                                                 ("stiff", stiff_terms, stiff_field, stiff_y0, stiff_exact)):
    for name, solver_class in solvers.items():
        sol = diffrax.diffeqsolve(their_terms, solver_class(), 0.0, T_END, None, jnp.array(y0), throw=False,
                                  stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), max_steps=20000)
        theirs = f"{int(sol.stats['num_accepted_steps'])} accepted, {int(sol.stats['num_rejected_steps'])} rejected"
        if sol.result == diffrax.RESULTS.successful:
            theirs += f", error {np.abs(np.asarray(sol.ys[-1]) - truth).max():.2e}"
        else:
            theirs += f", {sol.result}"
        ours = neuralode.solve(our_field, torch.tensor(y0, dtype=D), t, method=name, rtol=1e-6, atol=1e-8)
        mine = (f"{ours.stats['n_accepted']} accepted, {ours.stats['n_rejected']} rejected, error "
                f"{np.abs(ours.ys[-1].numpy() - truth).max():.2e}")
        print(f"  {label} {name}: diffrax {theirs}; neuralode {mine}")
