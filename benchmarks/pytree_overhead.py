"""What a PyTree state costs against the same state as a flat tuple (docs/solvers.md, "Tuple and PyTree states").

Damped oscillators (diffrax.md's PyTree example: a dict of two 3-vectors), tsit5, rtol = atol = 1e-6, float64, one
thread. Both forms take the same steps; the dict is flattened per evaluation of the field in Python. Interleaved
runs, medians. Run pinned to one core: ``taskset -c 1 python benchmarks/pytree_overhead.py``.
"""

import statistics
import time

import torch

import neuralode


def main(rounds: int = 15) -> None:
    torch.set_num_threads(1)
    k = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    as_dict = lambda t, y: {"x": y["v"], "v": -k * y["x"] - 0.1 * y["v"]}  # noqa: E731
    as_tuple = lambda t, y: (y[1], -k * y[0] - 0.1 * y[1])  # noqa: E731
    y0 = {"x": torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64), "v": torch.zeros(3, dtype=torch.float64)}
    t = torch.linspace(0.0, 10.0, 5, dtype=torch.float64)

    def timed(field, state):
        start = time.perf_counter()
        solution = neuralode.solve(field, state, t, rtol=1e-6, atol=1e-6)
        return time.perf_counter() - start, solution.stats["nfe"]

    cases = {"dict": (as_dict, y0), "tuple": (as_tuple, (y0["x"], y0["v"]))}
    for _ in range(3):
        for field, state in cases.values():
            timed(field, state)
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (field, state) in cases.items():
            times[name].append(timed(field, state))
    nfe = times["dict"][0][1]
    medians = {name: statistics.median(x for x, _ in runs) for name, runs in times.items()}
    extra = (medians["dict"] - medians["tuple"]) / nfe
    print(f"dict {medians['dict'] * 1e3:.2f} ms, tuple {medians['tuple'] * 1e3:.2f} ms, {nfe} evaluations: "
          f"{extra * 1e6:.1f} us more per evaluation ({medians['dict'] / medians['tuple']:.3f}x)")


if __name__ == "__main__":
    main()
