"""The result of :func:`neuralode.solve`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from ._errors import Status


@dataclass
class Solution:
    """Values, dense output, statistics and status of one solve.

    Attributes
    ----------
    ts : Tensor, shape (T,)
        The output times reached (all of ``t`` unless an event stopped the solve or it failed with
        ``throw=False``).
    ys : Tensor, shape (T, *y0.shape), or y0's tuple or PyTree of such tensors
        The solution at ``ts``.
    stats : dict
        ``nfe`` (vector-field evaluations), ``n_steps`` (attempted), ``n_accepted``, ``n_rejected``;
        gradient strategies add ``nfe_backward`` (evaluations of the backward pass) during ``backward()``:
        the dict is updated in place, so read it after the backward pass.
    status : Status
        How the solve ended, a ``str`` enum (:class:`~neuralode.Status`): ``"success"``, ``"event"``,
        ``"max_steps_reached"``, ``"step_size_underflow"``, ``"non_finite"``, ``"convergence_failure"``
        or ``"failed"``.
    message : str
    event_t, event_y :
        Time and state of a terminal event, if one occurred (``None`` otherwise).
    events : list of EventRecord
        Every occurrence of the ``events`` given to :func:`~neuralode.solve`, in time order (with
        ``event_fn``: its one terminal occurrence).
    sample_status : tuple of Status, or None
        ``per_sample=True``: each sample's own status (a failed sample stops alone; the others go on), so that
        a loss can leave the failed ones out (``sample_success``). ``None`` for a joint solve.
    """

    ts: torch.Tensor
    ys: object
    stats: dict
    status: Status = Status.SUCCESS
    message: str = ""
    event_t: torch.Tensor | None = None
    event_y: object = None
    events: list = field(default_factory=list)
    sample_status: tuple | None = None
    _dense: object = field(default=None, repr=False)
    _unflatten: object = field(default=None, repr=False)
    _dtype: torch.dtype | None = field(default=None, repr=False)  # the user's dtype, if the loop's differs
    # the events that occurred at the terminal event's time, (index, their signs before), the terminal one first
    _simultaneous: list = field(default_factory=list, repr=False)

    @property
    def success(self) -> bool:
        return self.status in (Status.SUCCESS, Status.EVENT)

    @property
    def sample_success(self) -> torch.Tensor:
        """``per_sample=True``: a bool tensor ``(batch,)``, True where the sample reached all its output times."""
        if self.sample_status is None:
            raise ValueError("sample_success is for per_sample=True solves; a joint solve has one status, "
                             "Solution.success")
        device = (self.ys[0] if isinstance(self.ys, tuple) else self.ys).device
        return torch.tensor([s == Status.SUCCESS for s in self.sample_status], dtype=torch.bool, device=device)

    def evaluate(self, t) -> object:
        """Dense output at ``t`` (a float, or a tensor of any shape) anywhere in the solved span.

        Returns shape ``(*t.shape, *y0.shape)`` (in y0's structure for tuple and PyTree states). Needs
        ``solve(..., dense=True)``.
        At a step boundary the stored step value is returned exactly. A ``t`` that requires grad gets the
        gradient ``dL/dy . dy/dt`` with ``dy/dt`` the interpolant's slope (:meth:`derivative`); the solution's
        own gradients (to ``y0`` and the parameters) flow as for any output.
        """
        values, t_tensor = self._at_times(t, self._dense.evaluate_one if self._dense is not None else None)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            # value + (t - t.detach()) dy/dt: the same value, and d/dt = dy/dt (the interpolant's slope)
            slopes, _ = self._at_times(t, self._dense.derivative_one)
            shift = (t - t.detach()).reshape(-1)
            values = [v + shift[i].to(v.dtype) * s.detach() for i, (v, s) in enumerate(zip(values, slopes))]
        return self._shaped(values, t_tensor)

    def derivative(self, t) -> object:
        """``dy/dt`` of the dense output at ``t`` (a float, or a tensor of any shape): the slope of the step's
        interpolant, which approximates ``func(t, y(t))`` to the interpolant's order. At a step boundary, the
        slope of the step that starts there. Shape as :meth:`evaluate`; needs ``solve(..., dense=True)``."""
        values, t_tensor = self._at_times(t, self._dense.derivative_one if self._dense is not None else None)
        return self._shaped(values, t_tensor)

    def _at_times(self, t, evaluate_one) -> tuple:
        """``evaluate_one`` at every time of ``t`` (checked), in the user's dtype, and ``t`` as a float64 tensor."""
        if evaluate_one is None:
            raise ValueError("this solution has no dense output; call solve(..., dense=True)")
        not_times = TypeError(f"t must be a real time or a real tensor of times, got {type(t).__name__} ({t!r}); "
                              "e.g. sol.evaluate(0.5) or sol.evaluate(torch.linspace(0, 1, 11))")
        # (a complex time would lose its imaginary part in the conversion, a string fail inside torch)
        if isinstance(t, (str, bytes, complex)) or (isinstance(t, torch.Tensor)
                                                    and (t.is_complex() or t.dtype == torch.bool)):
            raise not_times
        try:
            t_tensor = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise not_times from error
        if t_tensor.numel() == 0:
            raise ValueError("t is empty; give at least one time to evaluate the dense output at")
        values = [evaluate_one(x) for x in t_tensor.detach().reshape(-1).tolist()]
        if self._dtype is not None:
            values = [v.to(self._dtype) for v in values]
        return values, t_tensor

    def _shaped(self, values: list, t_tensor: torch.Tensor) -> object:
        if self._unflatten is None:
            return torch.stack(values).reshape(*t_tensor.shape, *values[0].shape)
        # Tuple and PyTree states are stored flat: split each value into its tensors, then stack per tensor.
        trees = [self._unflatten(v) for v in values]
        leaves, spec = pytree.tree_flatten(trees[0])
        per_value = [leaves] + [pytree.tree_leaves(tree) for tree in trees[1:]]
        return pytree.tree_unflatten([torch.stack([v[i] for v in per_value]).reshape(*t_tensor.shape, *leaf.shape)
                                      for i, leaf in enumerate(leaves)], spec)

    @property
    def step_times(self) -> torch.Tensor:
        """Ends of the accepted steps (with ``dense=True``), shape (n_accepted,)."""
        if self._dense is None:
            raise ValueError("step times are recorded with solve(..., dense=True)")
        return torch.tensor([self._dense.direction * e for e in self._dense.step_ends()], dtype=torch.float64)
