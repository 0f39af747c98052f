"""A tiny experiment with no ODE solve, to test the loop itself (never registered in
the package; tests register it). It exercises everything resume has to restore: a
stateful optimiser (Adam), dropout (torch RNG), numpy and Python RNG draws in the loss,
an epoch-shuffled data order and experiment state."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from neuralode.experiments import Experiment, RunConfig, epoch_permutation
from neuralode.experiments.runner import figure


@dataclasses.dataclass
class ToyConfig(RunConfig):
    steps: int = 60
    batch_size: int = 8
    n: int = 50
    lr: float = 0.01
    sizes: tuple[int, ...] = (3, 16, 1)
    dropout: float = 0.1
    log_every: int = 1
    eval_every: int = 20
    checkpoint_every: int = 10


class Toy(Experiment):
    name = "toy"
    description = "linear regression with dropout (test only)"
    Config = ToyConfig

    @property
    def num_steps(self):
        return self.config.steps

    @property
    def steps_per_epoch(self):
        return self.config.n // self.config.batch_size

    def setup(self):
        g = torch.Generator().manual_seed(self.config.seed)
        self.x = torch.randn(self.config.n, self.config.sizes[0], generator=g)
        self.y = self.x.sum(1, keepdim=True)
        self.evals = 0

    def build_model(self):
        a, h, b = self.config.sizes
        return torch.nn.Sequential(torch.nn.Linear(a, h), torch.nn.Tanh(),
                                   torch.nn.Dropout(self.config.dropout), torch.nn.Linear(h, b))

    def build_optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def batch(self, position):
        order = epoch_permutation(self.config.seed, position.epoch, self.config.n)
        bs = self.config.batch_size
        return order[position.index * bs:(position.index + 1) * bs]

    def loss(self, model, batch, position):
        # Draw from the global numpy and Python RNGs so resume must restore them.
        scale = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        pred = model(self.x[batch])
        return scale * ((pred - self.y[batch]) ** 2).mean(), {"scale": scale}

    def evaluate(self, model, position, run):
        self.evals += 1
        with torch.no_grad():
            return {"mse": ((model(self.x) - self.y) ** 2).mean()}

    def finish(self, model, run):
        fig = figure(figsize=(3, 3))
        ax = fig.subplots()
        with torch.no_grad():
            ax.scatter(self.y.numpy(), model(self.x).numpy(), s=5)
        run.save_figure(fig, "fit")
        with torch.no_grad():
            return {"mse": ((model(self.x) - self.y) ** 2).mean(), "evals": self.evals}

    def state_dict(self):
        return {"evals": self.evals}

    def load_state_dict(self, state):
        self.evals = state["evals"]
