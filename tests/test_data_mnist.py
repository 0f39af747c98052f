"""Tests for the IDX reader and the MNIST loader, including downloads from a local HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralode.data import MNIST_MD5, load_mnist, read_idx

from shared_data import shared  # noqa: E402  (tests/shared_data.py)


CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
         np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` (already in a big-endian or single-byte dtype) as IDX."""
    header = bytes([0, 0, CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def small_mnist(n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_set(root: Path, images, labels, train=True, gz=(True, False)) -> dict[str, str]:
    """Write an MNIST-layout pair; return the md5 table of the decompressed files."""
    prefix = "train" if train else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    table = {}
    for name, arr, compress in zip(names, (images, labels), gz):
        raw = idx_bytes(arr)
        table[name] = hashlib.md5(raw).hexdigest()
        (root / (name + (".gz" if compress else ""))).write_bytes(gzip.compress(raw) if compress else raw)
    return table


# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("gz", [(False, False), (True, True), (True, False)])
def test_load_small_set_plain_gz_and_mixed(tmp_path, gz):
    images, labels = small_mnist()
    md5 = write_set(tmp_path, images, labels, gz=gz)
    data = load_mnist(tmp_path, md5=md5)
    assert data.images.dtype == torch.uint8 and data.images.shape == (4, 28, 28)
    assert data.labels.dtype == torch.int64 and len(data) == 4
    assert np.array_equal(data.images.numpy(), images)
    assert data.labels.tolist() == labels.tolist()


def test_test_split_is_t10k(tmp_path):
    images, labels = small_mnist(2)
    md5 = write_set(tmp_path, images, labels, train=False)
    assert load_mnist(tmp_path, train=False, md5=md5).labels.tolist() == labels.tolist()


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_dtypes(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != "u1" else np.arange(24, dtype="u1").reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    out = read_idx(tmp_path / "a.idx")
    assert out.shape == (2, 3, 4) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    torch.from_numpy(out)  # native order and writable: torch accepts it without a copy


def test_wrong_magic(tmp_path):
    (tmp_path / "a").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=r"wrong magic number 0x3c68746d.*not HTML"):
        read_idx(tmp_path / "a")
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="wrong magic number 0x00000701"):
        read_idx(tmp_path / "b")


def test_truncated_files(tmp_path):
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    (tmp_path / "a").write_bytes(raw[:2])
    with pytest.raises(ValueError, match="truncated IDX file, 2 byte"):
        read_idx(tmp_path / "a")
    (tmp_path / "b").write_bytes(raw[:9])
    with pytest.raises(ValueError, match="announces 3 dimensions but only 5 of 12"):
        read_idx(tmp_path / "b")
    (tmp_path / "c.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match=r"truncated IDX file, the header announces shape \(3, 28, 28\)"):
        read_idx(tmp_path / "c.gz")


def test_trailing_bytes(tmp_path):
    (tmp_path / "a").write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="bytes remain after the 3 data bytes"):
        read_idx(tmp_path / "a")


def test_checksum_mismatch_names_file(tmp_path):
    images, labels = small_mnist()
    write_set(tmp_path, images, labels)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: MD5 of the decompressed file is .* expected 6bbc9ace"):
        load_mnist(tmp_path)  # the published sums do not match the generated files
    with pytest.raises(ValueError) as info:
        load_mnist(tmp_path)
    # QA D14: the advice works from the command line (no `verify=False` there)
    assert "run `neuralode download mnist`" in str(info.value) and "only from Python" in str(info.value)
    assert len(load_mnist(tmp_path, verify=False)) == 4


def test_wrong_dimension_counts(tmp_path):
    images, labels = small_mnist()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images.reshape(4, 784)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match=r"expected 3-D uint8 images .* got 2-D uint8 with shape \(4, 784\)"):
        load_mnist(tmp_path, verify=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels.reshape(2, 2)))
    with pytest.raises(ValueError, match="expected 1-D uint8 labels"):
        load_mnist(tmp_path, verify=False)


def test_count_mismatch(tmp_path):
    images, labels = small_mnist()
    write_set(tmp_path, images, labels[:3])
    with pytest.raises(ValueError, match="holds 4 images but .* holds 3 labels"):
        load_mnist(tmp_path, verify=False)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST files missing in root=.*train-images-idx3-ubyte, train-labels-idx1-ubyte.*Put them in that directory.*download=True"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="root must be a path"):
        load_mnist(3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="does not exist; put an IDX file"):
        read_idx(tmp_path / "x")


# --------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve ``tmp_path / 'srv'`` over HTTP on 127.0.0.1; yields (base_url, directory)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    directory = tmp_path / "srv"
    directory.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval so shutdown() returns quickly at teardown.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", directory
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def dead_url() -> str:
    """A URL on a local port nobody listens on: connection refused, instantly, offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def test_download_from_local_mirror_after_dead_one(tmp_path, server):
    base, srv = server
    images, labels = small_mnist(5)
    md5 = write_set(srv, images, labels, gz=(True, True))
    root = tmp_path / "data" / "mnist"
    data = load_mnist(root, download=True, mirrors=[dead_url(), base], md5=md5, timeout=5)
    assert np.array_equal(data.images.numpy(), images)
    assert sorted(p.name for p in root.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    # Second call reads the cached files; no server needed.
    assert len(load_mnist(root, md5=md5)) == 5


def test_download_rejects_bad_checksum_and_leaves_nothing(tmp_path, server):
    base, srv = server
    images, labels = small_mnist()
    write_set(srv, images, labels, gz=(True, True))
    root = tmp_path / "mnist"
    with pytest.raises(ConnectionError, match="could not download train-images-idx3-ubyte.gz from any mirror.*MD5"):
        load_mnist(root, download=True, mirrors=[base], timeout=5)
    assert list(root.iterdir()) == []


def test_download_without_network_says_where_to_put_files(tmp_path):
    root = tmp_path / "mnist"
    with pytest.raises(ConnectionError, match=r"put train-images-idx3-ubyte\.gz, train-labels-idx1-ubyte\.gz .*into '.*mnist' by hand"):
        load_mnist(root, download=True, mirrors=[dead_url()], timeout=2)


def test_download_only_missing_file(tmp_path, server):
    base, srv = server
    images, labels = small_mnist()
    md5 = write_set(srv, images, labels, gz=(True, True))
    root = tmp_path / "m"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    assert load_mnist(root, download=True, mirrors=[base], md5=md5).labels.tolist() == labels.tolist()
    assert (root / "train-labels-idx1-ubyte.gz").is_file()


# --------------------------------------------------------------------------- real data


def test_real_mnist_counts_and_checksums():
    root = shared("mnist")
    train = load_mnist(root, train=True)  # verify=True: the published MD5s must match
    test = load_mnist(root, train=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert set(MNIST_MD5) == {
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
    }
