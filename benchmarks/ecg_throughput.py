"""Training throughput of the ECG ODE-Net: neuralode's adjoint vs torchdiffeq's odeint_adjoint.

    python benchmarks/ecg_throughput.py [--steps 6] [--batch 128] [--data ../shared/data/mitbih]

One network (``sequence_classifier("odenet")``, channels 32: three convolutions, one ODE block,
a linear layer), copied twice with identical weights. One copy solves its block with
``neuralode`` (dopri5, rtol = atol = 1e-3, adjoint); the other replaces the block by
``torchdiffeq.odeint_adjoint`` with the same method and tolerances. Both train with SGD (lr 0.1,
momentum 0.9) on the same batches of real MIT-BIH beats (the first ``steps`` batches of a fixed
permutation of a 2,048-beat stratified subset), steps interleaved (A, B, A, B, ...) so that both
see the same machine load; one thread. Reports samples per second (median step time) and NFE.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class TorchdiffeqBlock(nn.Module):
    def __init__(self, func, rtol, atol):
        super().__init__()
        self.func, self.rtol, self.atol = func, rtol, atol
        self.nfe = 0

    def forward(self, z):
        import torchdiffeq


        field = _Counted(self.func, self)
        t = torch.tensor([0.0, 1.0], dtype=z.dtype)
        return torchdiffeq.odeint_adjoint(field, z, t, rtol=self.rtol, atol=self.atol, method="dopri5")[-1]


class _Counted(nn.Module):
    def __init__(self, func, owner):
        super().__init__()
        self.func = func
        object.__setattr__(self, "owner", owner)

    def forward(self, t, y):
        self.owner.nfe += 1
        return self.func(t, y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--data", default="../shared/data/mitbih")
    args = p.parse_args()
    torch.set_num_threads(1)
    from neuralode.data import load_heartbeat
    from neuralode.experiments.ecg import stratified_subset
    from neuralode.models import sequence_classifier

    data = load_heartbeat(f"{args.data}/mitbih_train.csv.gz")
    data = data.subset(stratified_subset(data.y, 2048, seed=0))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = sequence_classifier("odenet", channels=32, rtol=1e-3, atol=1e-3)
    theirs = copy.deepcopy(ours)
    tdq = TorchdiffeqBlock(theirs.block.func, 1e-3, 1e-3)

    def forward_theirs(x):
        return theirs.head(tdq(theirs.stem(x)))

    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for k, m in (("neuralode", ours), ("torchdiffeq", theirs))}
    times = {"neuralode": [], "torchdiffeq": []}
    nfe = {"neuralode": [], "torchdiffeq": []}
    for step in range(args.steps):
        idx = order[step * args.batch:(step + 1) * args.batch]
        x, y = data.x[idx], data.y[idx]
        for name in ("neuralode", "torchdiffeq") if step % 2 == 0 else ("torchdiffeq", "neuralode"):
            t0 = time.perf_counter()
            tdq.nfe = 0
            logits = ours(x) if name == "neuralode" else forward_theirs(x)
            loss = F.cross_entropy(logits, y)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
            nfe[name].append(ours.nfe_forward + ours.nfe_backward if name == "neuralode" else tdq.nfe)
    print(f"ECG ODE-Net (channels 32, dopri5, rtol=atol=1e-3, adjoint), batch {args.batch}, {args.steps} steps, 1 thread")
    print(f"{'':12} {'samples/s':>10} {'median s/step':>14} {'NFE fwd+bwd per step':>22}")
    for name in times:
        med = statistics.median(times[name])
        print(f"{name:12} {args.batch / med:10.1f} {med:14.3f} {statistics.mean(nfe[name]):22.1f}")


if __name__ == "__main__":
    main()
