"""Adjoint gradients under DistributedDataParallel (two CPU processes, gloo backend).

The typical setup: an ``nn.Module`` holds the vector field and calls ``neuralode.solve(...,
gradient="adjoint")`` in ``forward``; the whole model is wrapped in DDP. Each rank gets different
data; DDP averages the gradients, which must equal the gradient of the mean loss over the
concatenated batch computed in one process with ``gradient="direct"``.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import neuralode

DTYPE = torch.float64
WORLD = 2


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def forward(self, t, y):
        return self.net(y)


class Model(torch.nn.Module):
    def __init__(self, gradient):
        super().__init__()
        torch.manual_seed(0)
        self.field = Field()
        self.head = torch.nn.Linear(2, 1)
        self.gradient = gradient
        self.to(DTYPE)

    def forward(self, x):
        t = torch.tensor([0.0, 1.0], dtype=DTYPE)
        ys = neuralode.solve(self.field, x, t, rtol=1e-10, atol=1e-10, gradient=self.gradient).ys
        return self.head(ys[-1])


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * 3, 2, generator=generator, dtype=DTYPE)
    target = torch.randn(WORLD * 3, 1, generator=generator, dtype=DTYPE)
    return x, target


def _rank(rank, store, out):
    torch.set_num_threads(1)
    # A file store, not a TCP port: a free port looked up here and bound later could be taken meanwhile by
    # another test's processes (pytest -n 2 runs the torchrun test beside this one), and ranks of two jobs
    # meeting at one port hang until gloo's 30-minute timeout. The timeout makes any hang an error.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = torch.nn.parallel.DistributedDataParallel(Model("adjoint"))
        x, target = data()
        x, target = x.chunk(WORLD)[rank], target.chunk(WORLD)[rank]
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_adjoint_gradient_equals_single_process_direct(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = Model("direct")
    x, target = data()
    ((model(x) - target) ** 2).mean().backward()
    for name, p in model.named_parameters():
        for grads in ranks:
            assert grads[name] is not None
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)
    # the ranks saw different data, yet hold one averaged gradient
    torch.testing.assert_close(ranks[0]["field.net.0.weight"], ranks[1]["field.net.0.weight"], rtol=0, atol=0)
