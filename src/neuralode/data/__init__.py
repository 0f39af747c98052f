"""Data set loaders: standard file formats read from any path, with downloads and checksums.

Every loader takes the location of the files as an argument and never assumes a working
directory. See ``docs/data.md`` for the formats, splits and where to put files when offline.
"""

from .heartbeat import (
    DE_CHAZAL_DS1,
    DE_CHAZAL_DS2,
    HEARTBEAT_CLASSES,
    HEARTBEAT_LENGTH,
    HeartbeatData,
    inter_patient_split,
    load_heartbeat,
)
from .pendulum import PendulumData, PendulumTrajectory, load_pendulum
from .physionet import (
    PHYSIONET_STATIC,
    PHYSIONET_VARIABLES,
    PhysioNetBatch,
    PhysioNetNormalizer,
    PhysioNetRecord,
    collate_physionet,
    load_physionet,
    load_physionet_outcomes,
)
from .mnist import MNIST_FILES, MNIST_MD5, MNIST_MIRRORS, MNISTData, load_mnist, read_idx

__all__ = [
    "DE_CHAZAL_DS1",
    "DE_CHAZAL_DS2",
    "HEARTBEAT_CLASSES",
    "HEARTBEAT_LENGTH",
    "HeartbeatData",
    "inter_patient_split",
    "load_heartbeat",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNISTData",
    "load_mnist",
    "read_idx",
    "PendulumData",
    "PendulumTrajectory",
    "load_pendulum",
    "PHYSIONET_STATIC",
    "PHYSIONET_VARIABLES",
    "PhysioNetBatch",
    "PhysioNetNormalizer",
    "PhysioNetRecord",
    "collate_physionet",
    "load_physionet",
    "load_physionet_outcomes",
]
