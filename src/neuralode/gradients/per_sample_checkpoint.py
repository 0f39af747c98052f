"""Checkpointing for per-sample stepping (``solve(..., per_sample=True, gradient="checkpoint")``).

The exact gradient of the per-sample discrete solve (the one ``gradient="direct"`` gives) in O(sqrt(steps))
memory, as :class:`~neuralode.gradients.Checkpoint` does for a joint solve. The forward loop runs without a
graph and records, for every batched iteration, what decides it: each sample's start time and signed step
size, which samples' steps were accepted, and which output times the step passed (``(batch,)`` and
``(batch, J)`` tensors: no states). It keeps the state at the start of some iterations, thinned online so
that about ``2 sqrt(2 N)`` of ``N`` remain (the same square-root thinning as the joint strategy). Backward,
segment by segment from the last, the recorded iterations are replayed with a graph from the kept state: the
same steps, the same accept masks, the same interpolated outputs, so the same numbers; one backward pass
through the segment takes the outputs' cotangents and the one flowing in from the next segment to the
segment's start state and the parameters.
"""

from __future__ import annotations

import torch

from ..per_sample import integrate_per_sample, interpolate_outputs, standing_still


class PerSampleCheckpointRun:
    """The forward recorder and the backward replay (built by :func:`neuralode.solve.solve`)."""

    strategy_name = "checkpoint"

    def __init__(self, field, stepper, params, taus, direction, linear):
        self.field, self.stepper, self.params = field, stepper, tuple(params)
        self.taus, self.direction, self.linear = taus, direction, linear
        self.schedule = []            # per iteration: (t0, h, accepted, writes)
        self.every = 1
        self.kept = []                # (iteration index, state at its start)
        self.stats = None
        self.replay_norm = None

    def start(self, y0):
        self.kept = [(0, y0.detach())]

    def __call__(self, t0, h, tau1, accepted, writes, y):
        """The loop's ``record`` hook: keep what replays the iteration, and every ``every``-th state."""
        self.schedule.append((t0, h, tau1, accepted, writes))
        count = len(self.schedule)
        if count % self.every == 0:
            self.kept.append((count, y.detach()))
            if len(self.kept) > 2 * self.every + 1:
                self.every *= 2
                self.kept = [k for k in self.kept if k[0] % self.every == 0]

    def forward(self, y0, f0, control, norm, step_size, throw, first_step=None):
        self.start(y0)
        # (a compiled stepper replays with the norm: see CompiledRungeKutta.replay_with_norm)
        self.replay_norm = norm if getattr(self.stepper, "replay_with_norm", False) else None
        with torch.no_grad():
            return integrate_per_sample(self.field, self.stepper, control, y0, f0, self.taus, self.direction, norm,
                                        step_size=step_size, linear=self.linear, throw=throw, record=self,
                                        first_step=first_step)

    def backward(self, outputs: torch.Tensor, grad_outputs: torch.Tensor):
        """``dL/dy0`` and ``dL/dtheta`` of the discrete solve from ``dL/d outputs`` ``(n, batch, *shape)``."""
        n, batch = outputs.shape[:2]
        samples = torch.arange(batch, device=outputs.device)
        nfe = self.field.nfe
        carry = torch.zeros_like(grad_outputs[0])
        param_grads = [torch.zeros_like(p) for p in self.params]
        bounds = self.kept + ([(len(self.schedule), None)] if self.kept[-1][0] != len(self.schedule) else [])
        for (i0, y_start), (i1, _) in reversed(list(zip(bounds, bounds[1:]))):
            with torch.enable_grad():
                start = y_start.detach().requires_grad_(True)
                values, cotangents, y_end = self._replay(i0, i1, start, grad_outputs, samples, n)
                grads = torch.autograd.grad(values + [y_end], (start,) + self.params, cotangents + [carry],
                                            allow_unused=True)
            carry = torch.zeros_like(carry) if grads[0] is None else grads[0]
            for total, grad in zip(param_grads, grads[1:]):
                if grad is not None:
                    total.add_(grad)
        self.stats["nfe_backward"] = self.stats.get("nfe_backward", 0) + self.field.nfe - nfe
        self.field.nfe = nfe
        return carry + grad_outputs[0], param_grads

    def _replay(self, i0, i1, y, grad_outputs, samples, n):
        """Iterations ``i0 .. i1 - 1`` again, with a graph: the written outputs with their cotangents, and the
        state at the end of the segment."""
        field, stepper, direction = self.field, self.stepper, self.direction
        view = (y.shape[0],) + (1,) * (y.ndim - 1)
        values, cotangents = [], []
        f = None
        t_first, y_first = direction * self.taus[:, 0].to(y.device), self.kept[0][1]
        for t0, h, tau1, accepted, writes in self.schedule[i0:i1]:
            if f is None:   # (rows whose step is dropped are evaluated where they started: see below)
                # A FSAL method carries f to the next step, so only the finished and failed rows (h = 0) may take
                # it from elsewhere; a method that evaluates f afresh at every step needs it only for accepted rows.
                still = (h == 0) if stepper.fsal else ~accepted
                t_a, y_a, _ = standing_still(still, t_first, y_first, t0, y, None, view)
                f = field(t_a.view(view), y_a)
            # A rejected or finished row's result is not used, so it stands still (h = 0) at its first time and
            # state, where the field is finite: its trial step may have met NaN, or its state be where the field
            # overflows, and NaN partial derivatives times its zero cotangent would make every gradient NaN (see
            # the forward loop).
            t_in, y_in, f_in = standing_still(~accepted, t_first, y_first, t0, y, f, view)
            still = torch.where(accepted, h, torch.zeros_like(h))
            outcome = stepper.step(field, t_in.view(view), y_in, f_in, still.view(view), self.replay_norm)
            if writes is not None:
                column, wanted = writes
                values.append(interpolate_outputs(stepper, field, direction, self.taus, direction * t0, tau1,
                                                  direction * h, y, outcome, column, wanted, self.linear,
                                                  (direction * t_first, y_first)))
                block = wanted.view(*wanted.shape, *([1] * (y.ndim - 1)))
                cotangent = grad_outputs[column.clamp_max(n - 1), samples.unsqueeze(1)]
                cotangents.append(torch.where(block, cotangent, torch.zeros_like(cotangent)))
            keep = accepted.view(view)
            y = torch.where(keep, outcome.y1, y)
            f = torch.where(keep, outcome.f1, f) if outcome.f1 is not None else None
        return values, cotangents, y
