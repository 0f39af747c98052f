"""How long the first ``solve(..., compile=True)`` takes (tracing and compiling), on a cold inductor cache.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_time.py

Three cases, one thread, dopri5:

- P3 forward: MLP 2-16-2 (tanh), float32, batch 1, 10 outputs on [0, 10], rtol 1e-6, atol 1e-7, no grad (the
  compiled whole-loop kernel, with its C++ wrapper).
- P3 float64 direct gradient: the P3 field in float64, a forward solve with a graph and its backward pass (the
  per-step kernels: in float64 the tolerances are float64 tensors, which torch.compile read as Python numbers
  and traced twice before 2026-11-29).
- P2 direct gradient: MLP 64-256-256-64 (tanh), float32, batch 512, 10 outputs on [0, 1], rtol 1e-5, atol 1e-6; a
  forward solve with a graph and its backward pass (the per-step kernels, forward and backward).

Run it in a fresh process with an empty ``TORCHINDUCTOR_CACHE_DIR``, or the on-disk cache skips the C++ builds.
To compare two versions of the code, run each in its own process with ``PYTHONPATH=<checkout>/src``,
alternating them: one process cannot hold two versions of the package. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MLP  # noqa: E402

import neuralode  # noqa: E402


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    seconds = {}
    with torch.no_grad():
        field, y0, t = MLP(2, 16, layers=1, seed=2), torch.tensor([[1.0, -0.5]]), torch.linspace(0.0, 10.0, 10)
        start = time.perf_counter()
        neuralode.solve(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-7, compile=True)
        seconds["P3 forward"] = time.perf_counter() - start
    field = MLP(2, 16, layers=1, seed=2, dtype=torch.float64)
    y0, t = torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.linspace(0.0, 10.0, 10, dtype=torch.float64)
    start = time.perf_counter()
    solution = neuralode.solve(field, y0, t, method="dopri5", rtol=1e-6, atol=1e-7, compile=True)
    solution.ys.pow(2).mean().backward()
    seconds["P3 float64 direct gradient"] = time.perf_counter() - start
    field, y0, t = MLP(64, 256, layers=2, seed=0), torch.randn(512, 64), torch.linspace(0.0, 1.0, 10)
    start = time.perf_counter()
    solution = neuralode.solve(field, y0, t, method="dopri5", rtol=1e-5, atol=1e-6, compile=True)
    solution.ys.pow(2).mean().backward()
    seconds["P2 direct gradient"] = time.perf_counter() - start
    print(json.dumps({"neuralode": str(Path(neuralode.__file__).parent),
                      **{name: round(value, 1) for name, value in seconds.items()}}))


if __name__ == "__main__":
    main()
