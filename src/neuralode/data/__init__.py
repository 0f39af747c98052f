"""Data set loaders: standard file formats read from any path, with downloads and checksums.

Every loader takes the location of the files as an argument and never assumes a working
directory; :func:`find_data_dir` finds a data set by one rule (explicit directory,
``$NEURALODE_DATA``, the user cache, the checkout's ``../shared/data``) and :func:`download`
fetches the downloadable ones into the cache with checksums. See ``docs/data.md`` for the formats, splits and where to put files when offline.
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
from .locate import DATASETS, cache_dir, data_search_path, download, find_data_dir
from .mnist import MNIST_FILES, MNIST_MD5, MNIST_MIRRORS, MNISTData, load_mnist, read_idx

__all__ = [
    "DATASETS",
    "cache_dir",
    "data_search_path",
    "download",
    "find_data_dir",
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
