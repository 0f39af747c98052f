"""neuralode's semi_implicit_euler and leapfrog_midpoint against diffrax's SemiImplicitEuler and LeapfrogMidpoint
with ConstantStepSize, float64: the pendulum q' = p, p' = -sin q (an autonomous field, where the two libraries'
time conventions for semi-implicit Euler coincide), h = 0.1, outputs at every step on [0, 10].

Needs jax and diffrax (``pip install jax diffrax``). ``taskset -c 1 python benchmarks/symplectic_diffrax.py``
"""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import torch

import neuralode

jax.config.update("jax_enable_x64", True)
torch.set_num_threads(1)
h, t_end = 0.1, 10.0
ts = np.linspace(0.0, t_end, 101)
saveat = diffrax.SaveAt(ts=jnp.array(ts))
t = torch.tensor(ts, dtype=torch.float64)
grid = {"grid_constructor": lambda f, y0, t: t}

# semi-implicit Euler: diffrax takes the two parts as two terms, q' = f(p) first, then p' = g(q) from the new q
terms = (diffrax.ODETerm(lambda t, p, args: p), diffrax.ODETerm(lambda t, q, args: -jnp.sin(q)))
sol = diffrax.diffeqsolve(terms, diffrax.SemiImplicitEuler(), 0.0, t_end, h, (jnp.array([1.0]), jnp.array([0.3])),
                          saveat=saveat)
ours = neuralode.solve(lambda t, y: (y[1], -torch.sin(y[0])), (torch.tensor([1.0], dtype=torch.float64),
                       torch.tensor([0.3], dtype=torch.float64)), t, method="semi_implicit_euler", options=grid)
apart = max(np.abs(np.asarray(jax.device_get(a)) - b.numpy()).max() for a, b in zip(sol.ys, ours.ys))
print(f"semi_implicit_euler vs SemiImplicitEuler: 100 steps, largest difference over the outputs {apart:.1e}")

# leapfrog/midpoint on the pendulum as one vector
sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, args: jnp.stack([y[1], -jnp.sin(y[0])])),
                          diffrax.LeapfrogMidpoint(), 0.0, t_end, h, jnp.array([1.0, 0.3]), saveat=saveat)
ours = neuralode.solve(lambda t, y: torch.stack([y[1], -torch.sin(y[0])]),
                       torch.tensor([1.0, 0.3], dtype=torch.float64),
                       t, method="leapfrog_midpoint", options=grid)
apart = np.abs(np.asarray(jax.device_get(sol.ys)) - ours.ys.numpy()).max()
print(f"leapfrog_midpoint vs LeapfrogMidpoint: 100 steps, largest difference over the outputs {apart:.1e}")
