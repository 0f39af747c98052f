"""Small file helpers shared by the loaders: path checks and transparent gzip.

Kept private: the public surface of :mod:`neuralode.data` is the ``load_*`` functions.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Union

PathLike = Union[str, "os.PathLike[str]"]

# The first two bytes of every gzip member (RFC 1952). We sniff them instead of trusting the
# suffix because users rename files (``x.csv`` that is really gzipped, or the reverse) and a
# wrong guess would otherwise surface as a baffling parse error deep inside numpy.
_GZIP_MAGIC = b"\x1f\x8b"


def as_path(path: PathLike, argname: str) -> Path:
    """Convert ``path`` to a :class:`~pathlib.Path`, rejecting non-path types.

    Parameters
    ----------
    path : str or os.PathLike
        The user's argument.
    argname : str
        Name of the argument, used in the error message.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    TypeError
        If ``path`` is not a ``str`` or ``os.PathLike`` (for example an open file or ``None``).
    """
    if isinstance(path, (str, os.PathLike)):
        return expand_user(path, argname)
    raise TypeError(
        f"{argname} must be a path (str or os.PathLike), got {type(path).__name__}; "
        f"pass the location of the file on disk, e.g. {argname}='data/file.csv'"
    )


def expand_user(path: str | os.PathLike, setting: str) -> Path:
    """``Path(path).expanduser()``, with a ValueError naming ``setting`` (not pathlib's RuntimeError
    "Could not determine home directory") when ``~user`` names no user this machine knows."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = os.fspath(path).split("/", 1)[0]
        raise ValueError(f"{setting}={os.fspath(path)!r}: {user} names no user whose home directory is known "
                         f"here; write the path out in full (or with ~/ for your own home)") from None


def require_file(path: Path, argname: str, what: str) -> None:
    """Raise a FileNotFoundError that says what belongs at ``path`` if it is not a file.

    Parameters
    ----------
    path : pathlib.Path
        Location that must be an existing regular file.
    argname : str
        Name of the argument the path came from.
    what : str
        A short description of the expected content, e.g. ``"the MIT-BIH heartbeat CSV"``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or is a directory.
    """
    if path.is_file():
        return
    if path.is_dir():
        raise FileNotFoundError(
            f"{argname}={str(path)!r} is a directory; pass the file itself ({what})"
        )
    raise FileNotFoundError(
        f"{argname}={str(path)!r} does not exist; put {what} there or pass the path where it is"
    )


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes.

    Parameters
    ----------
    path : pathlib.Path
        An existing file.

    Returns
    -------
    bool
    """
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing on the fly if it is gzipped.

    Parameters
    ----------
    path : pathlib.Path
        An existing file, plain or gzip-compressed (detected from its content, not its suffix).

    Returns
    -------
    BinaryIO
        A readable stream of the decompressed bytes; the caller closes it.
    """
    if is_gzip(path):
        # A BufferedReader over GzipFile: numpy and our chunked readers issue many small reads.
        return io.BufferedReader(_NamedGzipReader(path), buffer_size=1 << 20)  # type: ignore[arg-type]
    return open(path, "rb")


#: What gzip, zlib and tarfile raise on a cut or corrupted file. None of their messages names the file.
DAMAGED_ARCHIVE_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError)


def damaged_file_error(path: Path, exc: BaseException) -> ValueError:
    """The ValueError for a compressed file or archive that cannot be read to its end.

    Parameters
    ----------
    path : pathlib.Path
        The file being read.
    exc : BaseException
        What gzip, zlib or tarfile raised (one of :data:`DAMAGED_ARCHIVE_ERRORS`).

    Returns
    -------
    ValueError
        Its message names the file, says it is truncated or damaged, and keeps the library's reason.
    """
    return ValueError(f"{path}: the file is truncated or damaged ({type(exc).__name__}: {exc}); "
                      "download it again or restore it from a backup")


class _NamedGzipReader(io.RawIOBase):
    """A raw stream of the decompressed bytes of ``path`` whose read errors name the file."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = path
        self._gzip = gzip.GzipFile(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._gzip.readinto(buffer)
        except DAMAGED_ARCHIVE_ERRORS as exc:
            raise damaged_file_error(self._path, exc) from exc

    def close(self) -> None:
        self._gzip.close()
        super().close()
