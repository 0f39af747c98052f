"""Error at output times between steps (interpolated) against at the steps' own ends, per method.

    python benchmarks/dense_accuracy.py

Field: tanh(W y + b) * cos(t) with a seeded Linear(3, 3), batch 4, float64; 6 outputs on [0, 2]; rtol = atol =
tol. Errors are max |y - y_ref| over every output, with y_ref from dopri8 at 1e-13. "free" interpolates
(options={"land_on_outputs": False}), "landing" ends the steps on the outputs (land_on_outputs=True, the default of
the implicit and Rosenbrock methods). kvaerno3 interpolates with the cubic Hermite (third order), kvaerno5 with its
order-4 continuous extension, radau5 with its collocation polynomial.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_json  # noqa: E402

import neuralode  # noqa: E402

F64 = torch.float64


class TanhField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3).double()

    def forward(self, t, y):
        return torch.tanh(self.linear(y)) * torch.cos(t)


def main():
    torch.manual_seed(0)
    field = TanhField()
    y0 = torch.randn(4, 3, dtype=F64)
    t = torch.linspace(0, 2, 6, dtype=F64)
    rows = []
    with torch.no_grad():
        reference = neuralode.solve(field, y0, t, method="dopri8", rtol=1e-13, atol=1e-13).ys
        for method in ("dopri5", "tsit5", "kvaerno3", "kvaerno5", "radau5", "rodas5"):
            for tol in (1e-6, 1e-8):
                free = neuralode.solve(field, y0, t, method=method, rtol=tol, atol=tol,
                                       options={"land_on_outputs": False})
                landing = neuralode.solve(field, y0, t, method=method, rtol=tol, atol=tol,
                                          options={"land_on_outputs": True})
                rows.append({"method": method, "tol": tol, "steps": free.stats["n_accepted"],
                             "error": float((free.ys - reference).abs().max()),
                             "final_error": float((free.ys[-1] - reference[-1]).abs().max()),
                             "landing_steps": landing.stats["n_accepted"],
                             "landing_error": float((landing.ys - reference).abs().max())})
    print(markdown_table(rows, [("method", "method", "{}"), ("tol", "tol", "{:.0e}"), ("steps", "steps", "{}"),
                                ("error at outputs", "error", "{:.1e}"), ("error at t=2", "final_error", "{:.1e}"),
                                ("steps, landing", "landing_steps", "{}"),
                                ("error, landing", "landing_error", "{:.1e}")]))
    print(write_json("dense_accuracy.json", {"rows": rows}))


if __name__ == "__main__":
    main()
