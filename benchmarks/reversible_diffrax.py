"""neuralode's reversible_heun against diffrax's ReversibleHeun (PIDController = integral control, dt0 = first_step =
0.01): Van der Pol (mu = 1) at rtol = atol = 1e-4 and a harmonic oscillator at 1e-6, t in [0, 10], float64.

Needs jax and diffrax (``pip install jax diffrax``). ``taskset -c 1 python benchmarks/reversible_diffrax.py``
"""
import diffrax
import jax
import jax.numpy as jnp
import torch

import neuralode

jax.config.update("jax_enable_x64", True)
torch.set_num_threads(1)
problems = {
    "van der pol, rtol 1e-4": (lambda t, y, args: jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]]),
                               lambda t, y: torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]]), [2.0, 0.0], 1e-4),
    "oscillator, rtol 1e-6": (lambda t, y, args: jnp.stack([y[1], -y[0]]),
                              lambda t, y: torch.stack([y[1], -y[0]]), [1.0, 0.0], 1e-6)}
for name, (jax_field, torch_field, y0, rtol) in problems.items():
    sol = diffrax.diffeqsolve(diffrax.ODETerm(jax_field), diffrax.ReversibleHeun(), 0.0, 10.0, 0.01, jnp.array(y0),
                              stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol), max_steps=10**6,
                              saveat=diffrax.SaveAt(t1=True))
    ours = neuralode.solve(torch_field, torch.tensor(y0, dtype=torch.float64),
                           torch.tensor([0.0, 10.0], dtype=torch.float64), method="reversible_heun", rtol=rtol,
                           atol=rtol, options={"first_step": 0.01})
    print(f"{name}: diffrax accepted/rejected {int(sol.stats['num_accepted_steps'])}/"
          f"{int(sol.stats['num_rejected_steps'])}, neuralode {ours.stats['n_accepted']}/{ours.stats['n_rejected']}, "
          f"end values {float(abs(torch.tensor(jax.device_get(sol.ys[-1])) - ours.ys[-1]).max()):.1e} apart")
