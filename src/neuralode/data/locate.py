"""Where the data sets are found, by one rule for every loader and experiment, and how to fetch them.

The rule, first match wins:

1. an explicit directory (``--set data_dir=DIR``; the ``root``/``path`` argument of a loader) is
   used as given and nothing else is tried;
2. ``$NEURALODE_DATA/<set>`` when the environment variable ``NEURALODE_DATA`` is set;
3. the user cache, ``$XDG_CACHE_HOME/neuralode/<set>`` (default ``~/.cache/neuralode/<set>``),
   which is where ``neuralode download <set>`` puts the files, checked against their checksums;
4. ``../shared/data/<set>`` beside the checkout, when the package runs from a source checkout.

A directory counts only if it holds the set's files, so a half-filled cache does not hide the
checkout's copy. Nothing depends on the working directory, so ``torchrun`` and scripts find the
data from anywhere. ``<set>`` is one of :data:`DATASETS`: ``mnist``, ``mitbih``,
``physionet2012``, ``pendulum`` (the layout of ``../shared/data``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from ._io import expand_user

__all__ = ["DATASETS", "DataSet", "cache_dir", "data_search_path", "download", "find_data_dir"]

ENV = "NEURALODE_DATA"


@dataclasses.dataclass(frozen=True)
class DataSet:
    """A data set's folder name, the files that must be there, and where to get them.

    ``required`` lists alternatives per file: ``("a.csv.gz", "a.csv")`` means either will do.
    ``what`` names the files in words, ``source`` says where they come from. ``urls`` maps a file
    name to its download URL and ``sha256`` to its checksum; a set without URLs cannot be
    downloaded.
    """

    name: str
    required: tuple[tuple[str, ...], ...]
    what: str
    source: str = ""
    urls: dict[str, str] = dataclasses.field(default_factory=dict)
    sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    def holds(self, directory: Path) -> bool:
        return all(any(_present(directory / alt) for alt in alts) for alts in self.required)

    def missing(self, directory: Path) -> list[str]:
        return [" or ".join(alts) for alts in self.required if not any(_present(directory / a) for a in alts)]


def _present(path: Path) -> bool:
    """A required entry is there: a file, or a directory (an extracted archive such as PhysioNet's
    ``set-a``, which loaders read like the archive)."""
    return path.is_file() or path.is_dir()


_MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_PHYSIONET_URL = "https://physionet.org/files/challenge-2012/1.0.0/"

DATASETS: dict[str, DataSet] = {
    "mnist": DataSet(
        "mnist", tuple((n + ".gz", n) for n in _MNIST_NAMES),
        "the four MNIST IDX files (plain or .gz)", "LeCun, Cortes and Burges; `neuralode download mnist` fetches them",
    ),
    "mitbih": DataSet(
        "mitbih", (("mitbih_train.csv.gz", "mitbih_train.csv"), ("mitbih_test.csv.gz", "mitbih_test.csv")),
        "the Kaggle MIT-BIH heartbeat files mitbih_train.csv and mitbih_test.csv (or .csv.gz)",
        "Kaggle data set shayanfazeli/heartbeat, which needs a Kaggle account",
    ),
    "physionet2012": DataSet(
        "physionet2012", (("set-a.tar.gz", "set-a"),),
        "the PhysioNet/CinC Challenge 2012 archive set-a.tar.gz (and set-b.tar.gz, Outcomes-a.txt)",
        f"{_PHYSIONET_URL}; `neuralode download physionet2012` fetches them",
        urls={f: _PHYSIONET_URL + f for f in ("set-a.tar.gz", "set-b.tar.gz", "Outcomes-a.txt", "Outcomes-b.txt")},
        # The checksums of the files as published (the copy in ../shared/data has the same ones).
        sha256={
            "set-a.tar.gz": "dd6292adab790a67265cb95704db27187a2acbeec88ec39b98f5e9301ea4a7d2",
            "set-b.tar.gz": "165765a7e569b390ab9a8a80c3561c0e60e7ccab75d93e7401d70a4158d720d7",
            "Outcomes-a.txt": "2613ea60ccda29f87571a7d6b09ad130858a8ccd66325bd073365925026883c2",
            "Outcomes-b.txt": "1305f29734da374a809483229a99f33a9230aa8d4fa74b1a2d6ad788136423d5",
        },
    ),
    "pendulum": DataSet(
        "pendulum", (("real_pend_h_1.txt",),),
        "the Schmidt & Lipson (2009) motion-tracking files (real_pend_h_1.txt, ...)",
        "the supplementary data of Science 324:81, which has no stable URL to download from",
    ),
}


def cache_dir() -> Path:
    """The user cache for data sets: ``$XDG_CACHE_HOME/neuralode`` or ``~/.cache/neuralode``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuralode"


def _checkout_data() -> Optional[Path]:
    # src/neuralode/data/locate.py -> the checkout's root holds pyproject.toml when installed editable
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file():
        return root.parent / "shared" / "data"
    return None


def data_search_path(name: str) -> list[Path]:
    """The directories tried for data set ``name`` without an explicit one, in order."""
    _dataset(name)
    places = []
    if os.environ.get(ENV):
        places.append(expand_user(os.environ[ENV], ENV) / name)
    places.append(cache_dir() / name)
    checkout = _checkout_data()
    if checkout is not None:
        places.append(checkout / name)
    return places


def _dataset(name: str) -> DataSet:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None


def find_data_dir(name: str, explicit: Optional[str | os.PathLike] = None,
                  required: Optional[Sequence[Sequence[str]]] = None) -> Path:
    """The directory of data set ``name`` by the module's rule (explicit, ``NEURALODE_DATA``,
    cache, checkout), as an absolute path.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    explicit : path, optional
        A directory the user named (``--set data_dir=``); an empty string counts as none.
    required : sequence of sequences of str, optional
        Files that must be present (alternatives per file); default: the set's own list.

    Raises
    ------
    FileNotFoundError
        Naming every place tried, what belongs there and how to get it.
    ValueError
        ``explicit`` or ``$NEURALODE_DATA`` starts with ``~user`` for a user this machine does not know.
    """
    ds = _dataset(name)
    need = DataSet(ds.name, tuple(tuple(a) for a in required), ds.what) if required is not None else ds
    if explicit not in (None, ""):
        where = expand_user(explicit, "data_dir")
        if need.holds(where):
            return where.resolve()
        absent = [str(where / alts[0]) for alts in need.required if not any(_present(where / a) for a in alts)]
        raise FileNotFoundError(
            f"data_dir={str(where)!r} lacks {', '.join(need.missing(where))} (no {', '.join(absent)}); "
            f"put {ds.what} there (from {ds.source}) and pass --set data_dir= with that folder, or leave data_dir unset to use "
            f"${ENV}/{name}, {cache_dir() / name} or the checkout's ../shared/data/{name} (docs/data.md)")
    places = data_search_path(name)
    for where in places:
        if need.holds(where):
            return where.resolve()
    fetch = (f"run `neuralode download {name}` (saves to {cache_dir() / name}), or " if ds.urls or name == "mnist"
             else "")
    raise FileNotFoundError(
        f"{name} data not found (looked for {', '.join(need.missing(places[0]))} in "
        f"{', '.join(str(p) for p in places)}): {fetch}put {ds.what} (from {ds.source}) into one of those directories, "
        f"set {ENV}=DIR (with DIR/{name}/ inside), or pass --set data_dir=DIR (docs/data.md)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(name: str, to: Optional[str | os.PathLike] = None, *, urls: Optional[dict[str, str]] = None,
             sha256: Optional[dict[str, str]] = None, timeout: float = 60.0) -> Path:
    """Download data set ``name`` into ``to`` (default: the user cache, :func:`cache_dir`) and
    verify every file's checksum; files already there and intact are kept.

    Returns the directory. ``urls``/``sha256`` override the set's own (tests use ``file://`` URLs).

    Raises
    ------
    ValueError
        For a set that cannot be downloaded (the message says where to get it by hand).
    ConnectionError
        When a file could not be fetched or failed its checksum (nothing unverified is kept).
    """
    ds = _dataset(name)
    target = expand_user(to, "--to") if to not in (None, "") else cache_dir() / name
    if name == "mnist" and urls is None:
        from .mnist import load_mnist

        target.mkdir(parents=True, exist_ok=True)
        for train in (True, False):  # load_mnist fetches, verifies (MD5) and keeps what is missing
            load_mnist(target, train=train, download=True)
        return target.resolve()
    urls = dict(ds.urls if urls is None else urls)
    sums = dict(ds.sha256 if sha256 is None else sha256)
    if not urls:
        raise ValueError(f"{name} cannot be downloaded automatically (it comes from {ds.source}); put "
                         f"{ds.what} into {target} (or another place of docs/data.md's search path)")
    target.mkdir(parents=True, exist_ok=True)
    for file, url in urls.items():
        final = target / file
        if final.is_file() and (file not in sums or _sha256(final) == sums[file]):
            continue
        part = target / (file + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
        except (urllib.error.URLError, OSError) as exc:
            part.unlink(missing_ok=True)
            if isinstance(exc, OSError) and getattr(exc, "errno", None) is not None and not isinstance(
                    exc, urllib.error.URLError):
                raise  # a local fault (full disk, no permission): the command reports it as such
            raise ConnectionError(f"could not download {url} ({getattr(exc, 'reason', exc)}); without "
                                  f"network access put {ds.what} into {target} by hand") from None
        if file in sums and _sha256(part) != sums[file]:
            part.unlink()
            raise ConnectionError(f"{url} does not have the expected SHA-256 {sums[file]}; the download "
                                  f"was discarded. Try again, or put a verified copy into {target}")
        os.replace(part, final)
    return target.resolve()
