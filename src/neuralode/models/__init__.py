"""Models built from :mod:`neuralode.nn`: classifiers (MLP, ResNet, RK-Net, ODE-Net) and generative
models (continuous normalising flows with a planar-flow baseline; latent ODEs with an RNN baseline and
Rubanova et al.'s RNN-VAE).

Generic families (:class:`MLP`, :class:`ResNet`, :class:`RKNet`, :class:`ODENet`) and builders
for vectors (:func:`vector_classifier`), sequences (:func:`sequence_classifier`, ECG defaults)
and images (:func:`image_classifier`, the MNIST networks of Chen et al. 2018; :func:`robust_classifier`,
the CNN / ODE-Net / TisODE of Yan et al. 2020), plus
:func:`build_model` to build any of them by name. No training code lives here.
"""

from neuralode.models.cnf import (CNF, TRACE_ESTIMATORS, CNFOutput, ConcatSquashLinear, ConcatSquashMLP,
                                  PlanarCNFDynamics, PlanarFlow, trace_exact, trace_hutchinson)
from neuralode.models.latent_ode import (ENCODERS, LatentODE, LatentODEOutput, ObservationEncoder, RNNBaseline,
                                         RNNBaselineOutput, gather_observations,
                                         size_matched_rnn_width)
from neuralode.models.rnn_vae import DECODER_GRIDS, RNNVAE, RNNVAEOutput
from neuralode.models.base import FIXED_STEP_RK_METHODS, MLP, ODENet, ResidualBlock, ResNet, RKNet, count_parameters
from neuralode.models.image import image_classifier
from neuralode.models.registry import MODEL_NAMES, PAPER_PARAMETER_COUNTS, build_model
from neuralode.models.robust import ROBUST_KINDS, SteadyStateDynamics, TisODENet, robust_classifier
from neuralode.models.sequence import sequence_classifier
from neuralode.models.vector import vector_classifier

__all__ = [
    "CNF", "CNFOutput", "ConcatSquashLinear", "ConcatSquashMLP", "PlanarCNFDynamics", "PlanarFlow",
    "TRACE_ESTIMATORS", "trace_exact", "trace_hutchinson",
    "ENCODERS", "LatentODE", "LatentODEOutput", "ObservationEncoder", "RNNBaseline", "RNNBaselineOutput",
    "gather_observations", "size_matched_rnn_width",
    "DECODER_GRIDS", "RNNVAE", "RNNVAEOutput",
    "FIXED_STEP_RK_METHODS",
    "MLP",
    "MODEL_NAMES",
    "ODENet",
    "PAPER_PARAMETER_COUNTS",
    "ROBUST_KINDS",
    "RKNet",
    "ResNet",
    "ResidualBlock",
    "SteadyStateDynamics",
    "TisODENet",
    "build_model",
    "count_parameters",
    "image_classifier",
    "robust_classifier",
    "sequence_classifier",
    "vector_classifier",
]
