"""MNIST from the four original IDX files, with checksums and an offline-friendly download.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the
data in C order, big-endian. Dtype codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64.
"""

from __future__ import annotations

import hashlib
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping, Optional, Sequence

import numpy as np
import torch

from ._io import PathLike, as_path, open_binary, require_file

__all__ = [
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNISTData",
    "load_mnist",
    "read_idx",
]

#: Base URLs tried in order; each serves ``<name>.gz``. The S3 mirror is the one torchvision uses
#: because yann.lecun.com often refuses automated downloads; it stays as the original source.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: (images, labels) file names, without the ``.gz`` suffix, for ``train=True`` / ``False``.
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: MD5 of the *decompressed* IDX files. We check these rather than the .gz files' sums because
#: gzip wrappers differ between mirrors (and recompression) while the content is the same. The
#: image sums are the published ones; the label sums are widely cited (e.g. torch C++ examples,
#: tensorflow-datasets scripts) and match the complete copy in ``shared/data/mnist``.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Read in 4 MiB chunks so the MD5 is computed in the same pass that fills the array: the
# 47 MB training images are never held twice (decompressed bytes plus the array).
_CHUNK = 1 << 22


@dataclass(frozen=True)
class MNISTData:
    """MNIST images and labels.

    Attributes
    ----------
    images : torch.Tensor
        uint8, shape ``(N, 28, 28)``, raw pixel intensities 0..255 (0 is background).
    labels : torch.Tensor
        int64, shape ``(N,)``, digits 0..9.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    return data if data is not None else b""


def read_idx(path: PathLike, expected_md5: Optional[str] = None) -> np.ndarray:
    """Read one IDX file, plain or gzipped, optionally checking the MD5 of its decompressed bytes.

    Parameters
    ----------
    path : str or os.PathLike
        The IDX file (``.gz`` or not; compression is detected from the content).
    expected_md5 : str, optional
        Hex MD5 of the decompressed file. If given and different, a ValueError is raised.

    Returns
    -------
    numpy.ndarray
        Shape given by the header's dimensions, native-endian version of the header's dtype
        (uint8 for MNIST), writable.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the magic number is wrong (not IDX), the dtype code is unknown, the file is shorter
        than its header says (truncated), has bytes after the data, or the checksum differs.
    """
    path = as_path(path, "path")
    require_file(path, "path", "an IDX file (e.g. train-images-idx3-ubyte or its .gz)")
    md5 = hashlib.md5()
    with open_binary(path) as fh:
        magic = _read_exact(fh, 4)
        md5.update(magic)
        if len(magic) < 4:
            raise ValueError(
                f"{path}: truncated IDX file, {len(magic)} byte(s) where the 4-byte magic number "
                "should be; download the file again"
            )
        if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
            raise ValueError(
                f"{path}: wrong magic number 0x{magic.hex()}; an IDX file starts with 0x0000 then "
                f"a dtype code in {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} and the "
                "number of dimensions. Is this an IDX file (not HTML from a failed download)?"
            )
        dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
        header = _read_exact(fh, 4 * ndim)
        md5.update(header)
        if len(header) < 4 * ndim:
            raise ValueError(
                f"{path}: truncated IDX file, the header announces {ndim} dimensions but only "
                f"{len(header)} of {4 * ndim} size bytes follow; download the file again"
            )
        shape = struct.unpack(f">{ndim}I", header)
        out = np.empty(shape, dtype=dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        filled = 0
        while filled < buf.nbytes:
            chunk = fh.readinto(buf[filled : filled + _CHUNK])  # type: ignore[attr-defined]
            if not chunk:
                raise ValueError(
                    f"{path}: truncated IDX file, the header announces shape {shape} "
                    f"({buf.nbytes} data bytes) but the file ends after {filled}; "
                    "download the file again"
                )
            md5.update(buf[filled : filled + chunk])
            filled += chunk
        extra = _read_exact(fh, 1)
        if extra:
            raise ValueError(
                f"{path}: bytes remain after the {buf.nbytes} data bytes the header announces "
                f"(shape {shape}); the file is corrupt or not the one the header describes"
            )
    if expected_md5 is not None and md5.hexdigest() != expected_md5.lower():
        raise ValueError(
            f"{path}: MD5 of the decompressed file is {md5.hexdigest()}, expected {expected_md5}; "
            "the file is corrupt or a different data set. Delete it and run `neuralode download mnist` "
            "(or put an intact copy there); only from Python can load_mnist(..., verify=False) read a "
            "modified copy on purpose"
        )
    # Convert to native byte order (a no-op for uint8) so torch.from_numpy accepts it.
    return out.astype(dtype.newbyteorder("="), copy=False)


def _find(root: Path, name: str) -> Optional[Path]:
    # Prefer the decompressed file: it is what users get after `gunzip`, and reading it is faster.
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _download(
    root: Path,
    name: str,
    mirrors: Sequence[str],
    expected_md5: Optional[str],
    timeout: float,
) -> tuple[Optional[Path], list[str]]:
    """Try each mirror for ``name.gz``; keep the first file that parses and verifies."""
    errors = []
    target = root / (name + ".gz")
    part = root / (name + ".gz.part")
    for base in mirrors:
        url = base.rstrip("/") + "/" + name + ".gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
            # Verify before the file takes its final name, so a bad download never looks cached.
            read_idx(part, expected_md5)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            part.unlink(missing_ok=True)
            continue
        os.replace(part, target)
        return target, errors
    return None, errors


def load_mnist(
    root: PathLike,
    train: bool = True,
    download: bool = False,
    verify: bool = True,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    md5: Optional[Mapping[str, str]] = None,
    timeout: float = 30.0,
) -> MNISTData:
    """Load the MNIST training or test set from IDX files in ``root``.

    Parameters
    ----------
    root : str or os.PathLike
        Directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or with ``.gz``.
    train : bool, default True
        The 60,000 training images if True, else the 10,000 test images.
    download : bool, default False
        Download missing files (as ``.gz``) from ``mirrors`` into ``root``, creating it.
    verify : bool, default True
        Check the MD5 of each decompressed file against ``md5``.
    mirrors : sequence of str, default :data:`MNIST_MIRRORS`
        Base URLs tried in order; ``<base>/<name>.gz`` is fetched.
    md5 : mapping of str to str, optional
        File name (without ``.gz``) to hex MD5 of the decompressed file; defaults to
        :data:`MNIST_MD5`. Names without an entry are not checked. Override it for MNIST-format
        data sets such as Fashion-MNIST, or in tests.
    timeout : float, default 30.0
        Seconds to wait for each connection.

    Returns
    -------
    MNISTData
        ``images`` uint8 ``(N, 28, 28)`` and ``labels`` int64 ``(N,)``.

    Raises
    ------
    FileNotFoundError
        If files are missing and ``download`` is False; the message lists the files, the
        directory to put them in and the URLs to get them from.
    ConnectionError
        If ``download`` is True and no mirror delivered a valid file (e.g. no network); the
        message lists each URL's error and where to put the files by hand.
    ValueError
        If a file is not valid IDX (see :func:`read_idx`), images are not 3-D uint8, labels are
        not 1-D uint8, their counts differ, or a checksum differs.

    Notes
    -----
    Peak memory is about one copy of the images (47 MB for the training set): each file is
    streamed into a preallocated array while its MD5 is updated.
    """
    root = as_path(root, "root")
    checksums = MNIST_MD5 if md5 is None else dict(md5)
    names = MNIST_FILES[bool(train)]
    found = {name: _find(root, name) for name in names}
    missing = [name for name, p in found.items() if p is None]
    if missing and not download:
        raise FileNotFoundError(
            f"MNIST files missing in root={str(root)!r}: {', '.join(missing)} (plain or .gz). "
            f"Put them in that directory (e.g. from {mirrors[0] if mirrors else MNIST_MIRRORS[0]}"
            f"<name>.gz) or pass download=True (from the command line: neuralode download mnist)"
        )
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        for name in missing:
            path, errors = _download(root, name, mirrors, checksums.get(name) if verify else None, timeout)
            if path is None:
                raise ConnectionError(
                    f"could not download {name}.gz from any mirror ({'; '.join(errors) or 'no mirrors given'}). "
                    f"Without network access, put {', '.join(n + '.gz' for n in missing)} "
                    f"(or the decompressed files) into {str(root)!r} by hand"
                )
            found[name] = path

    image_name, label_name = names
    images = read_idx(found[image_name], checksums.get(image_name) if verify else None)
    labels = read_idx(found[label_name], checksums.get(label_name) if verify else None)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{found[image_name]}: expected 3-D uint8 images (N, rows, cols), got "
            f"{images.ndim}-D {images.dtype} with shape {images.shape}; is this an image file?"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{found[label_name]}: expected 1-D uint8 labels (N,), got {labels.ndim}-D "
            f"{labels.dtype} with shape {labels.shape}; is this a label file?"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{found[image_name]} holds {images.shape[0]} images but {found[label_name]} holds "
            f"{labels.shape[0]} labels; the two files must come from the same split"
        )
    return MNISTData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
