"""Forward and backward evaluations of the adjoint, torchdiffeq and neuralode side by side, on one ODE block.

    python benchmarks/adjoint_nfe_torchdiffeq.py

The block of ``neuralode run tolerance``'s kind: dh/dt = ConcatLinear(tanh(ConcatLinear(t, h))), width 32, random
weights scaled by 3 (livelier dynamics, more steps), batch 256, float64, t in [0, 1], loss mean(h(1)^2);
``odeint_adjoint`` of each library at rtol = atol = 1e-3, 1e-5, 1e-7, with the full norm and with the seminorm.
Prints (forward NFE, backward NFE) per case (Chen et al. 2018, Fig. 3, saw backward about half of forward).
"""

from __future__ import annotations

import torch
import torchdiffeq

import neuralode


class Field(torch.nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.l1 = torch.nn.Linear(width + 1, width)
        self.l2 = torch.nn.Linear(width + 1, width)
        self.nfe = 0

    def forward(self, t, h):
        self.nfe += 1
        tt = torch.ones_like(h[:, :1]) * t
        return self.l2(torch.cat([tt, torch.tanh(self.l1(torch.cat([tt, h], 1)))], 1))


def counts(field, library, x, t, tol, **kwargs):
    field.nfe = 0
    h0 = x.clone().requires_grad_(True)
    out = library.odeint_adjoint(field, h0, t, rtol=tol, atol=tol, **kwargs)[-1]
    forward, field.nfe = field.nfe, 0
    out.pow(2).mean().backward()
    return forward, field.nfe


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    field = Field().double()
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(3.0)
    x = torch.randn(256, 32, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for tol in (1e-3, 1e-5, 1e-7):
        # torchdiffeq's default is the full norm (it knows the string "seminorm" only); neuralode's the seminorm
        options = {(torchdiffeq, "seminorm"): {"norm": "seminorm"}, (torchdiffeq, "full"): {},
                   (neuralode, "seminorm"): {}, (neuralode, "full"): {"norm": "full"}}
        row = {f"{library.__name__} {norm}":
               counts(field, library, x, t, tol, adjoint_options=dict(options[library, norm]))
               for library in (torchdiffeq, neuralode) for norm in ("seminorm", "full")}
        print(f"tol {tol:.0e}: " + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
