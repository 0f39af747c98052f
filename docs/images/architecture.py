"""Draws docs/images/architecture.png, the layer map of docs/architecture.md: ``python docs/images/architecture.py``.

Each box is a layer; a layer imports only from the layers below it (tests/test_architecture.py checks the
numerics core against the layers above it, and that no two modules import each other in a cycle).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

# (row from the bottom, column span, title, modules, colour)
BOXES = [
    (0, (0, 3), "inputs and results", "_errors.py (errors, Status)   problem.py (checks, Problem, VectorField)   "
                                      "solution.py", "#dfe9f5"),
    (1, (0, 1), "methods as data", "tableaus/", "#dfe9f5"),
    (1, (1, 3), "control and output", "controllers.py (norms; I / PI / PID; stepping state)\n"
                                      "interpolation.py  callbacks.py  events.py", "#dfe9f5"),
    (2, (0, 3), "steppers: one per family (Solver)", "solvers/: runge_kutta (every explicit RK tableau)  adams  implicit\n"
                                            "          rosenbrock  auto  compiled  scipy_wrapper  linear", "#dfe9f5"),
    (3, (0, 3), "the loops", "integrate.py (joint: step, adapt, save, events)   per_sample.py (one step size per "
                             "sample)", "#c9dcf0"),
    (4, (0, 3), "the boundary: strings become objects", "methods.py (name -> MethodSpec -> stepper)   options.py "
                                                        "(option dicts -> controller, grid)", "#c9dcf0"),
    (5, (0, 3), "gradient strategies", "gradients/: direct  checkpoint  adjoint (one backward solve, interpolating)",
     "#c9dcf0"),
    (6, (0, 3), "public API", "solve.py: solve -> Solution (names become objects)\n"
                              "compat.py: odeint, odeint_adjoint, odeint_event, odeint_dense", "#a9c7e8"),
    (7, (0, 2), "layers and models", "nn/ (ODEBlock, regularisers)  ->  models/", "#f3e3c9"),
    (7, (2, 3), "data", "data/ (loaders)", "#f3e3c9"),
    (8, (0, 3), "experiments and CLI", "experiments/ (configs, the one training loop, reports)  ->  cli.py",
     "#f3e3c9"),
]


def main():
    fig, ax = plt.subplots(figsize=(11, 7.2))
    width, height, gap = 3.0, 0.62, 0.2
    for row, (left, right), title, modules, colour in BOXES:
        x0 = left * width / 3 + 0.04
        w = (right - left) * width / 3 - 0.08
        y0 = row * (height + gap)
        ax.add_patch(FancyBboxPatch((x0, y0), w, height, boxstyle="round,pad=0.02", facecolor=colour,
                                    edgecolor="#34495e", linewidth=1.0))
        ax.text(x0 + 0.03, y0 + height - 0.17, title, fontsize=10, fontweight="bold", va="center")
        ax.text(x0 + 0.03, y0 + 0.2, modules, fontsize=7.6, va="center", family="monospace", wrap=True)
    top = 9 * (height + gap)
    ax.annotate("", xy=(width + 0.18, 0), xytext=(width + 0.18, top - gap),
                arrowprops=dict(arrowstyle="->", color="#34495e", linewidth=1.4))
    ax.text(width + 0.24, top / 2, "imports only downwards", rotation=270, va="center", fontsize=9)
    ax.text(-0.02, (6 * (height + gap) + height) / 2, "numerics core (no models, no experiments)", fontsize=8.5,
            rotation=90, va="center", ha="right", color="#1f4e79")
    ax.set_xlim(-0.2, width + 0.45)
    ax.set_ylim(-0.1, top)
    ax.axis("off")
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
