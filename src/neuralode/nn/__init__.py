"""Neural-network building blocks for neural ODEs.

- time-dependent layers for vector fields: :class:`ConcatLinear`, :class:`ConcatConv1d`,
  :class:`ConcatConv2d`, :class:`TimeSequential`, :class:`Autonomous`,
  :class:`SecondOrder` (second-order dynamics);
- :class:`ODEBlock`, a neural ODE as a layer, and :class:`AugmentedODEBlock` / :class:`Augment`
  (augmented neural ODEs, Dupont et al. 2019);
- Hamiltonian fields from learnt energies (Greydanus et al. 2019): :class:`Hamiltonian`,
  :class:`SeparableHamiltonian` (for the symplectic methods);
- kinetic-energy and Jacobian-Frobenius regularisers accumulated during the solve (Finlay et al.
  2020): :class:`RegularisedDynamics`, :func:`regularisation_loss`.

Everything here uses only the public solver API (:func:`neuralode.solve`).
"""

from neuralode.nn.augment import Augment, augment
from neuralode.nn.hamiltonian import Hamiltonian, SeparableHamiltonian
from neuralode.nn.layers import (
    Autonomous,
    ConcatConv1d,
    ConcatConv2d,
    ConcatLinear,
    SecondOrder,
    TimeDependentModule,
    TimeSequential,
)
from neuralode.nn.ode_block import GRADIENTS, AugmentedODEBlock, ODEBlock
from neuralode.nn.regularisers import PROBES, RegularisedDynamics, regularisation_loss, sample_probe

__all__ = [
    "Augment",
    "AugmentedODEBlock",
    "Autonomous",
    "ConcatConv1d",
    "ConcatConv2d",
    "ConcatLinear",
    "GRADIENTS",
    "Hamiltonian",
    "ODEBlock",
    "PROBES",
    "RegularisedDynamics",
    "SecondOrder",
    "SeparableHamiltonian",
    "TimeDependentModule",
    "TimeSequential",
    "augment",
    "regularisation_loss",
    "sample_probe",
]
