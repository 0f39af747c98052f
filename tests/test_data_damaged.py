"""A compressed file cut short or corrupted on disk is reported as a ValueError that names the file,
for every loader: gzip, zlib and tarfile raise EOFError, zlib.error or BadGzipFile without a name."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

from neuralode.data.heartbeat import load_heartbeat
from neuralode.data.mnist import read_idx
from neuralode.data.pendulum import load_pendulum
from neuralode.data.physionet import load_physionet


def _idx_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (50, 28, 28)) + rng.integers(
        0, 255, 50 * 784, dtype=np.uint8).tobytes()


def _heartbeat_bytes() -> bytes:
    return "\n".join(",".join(["0.5"] * 187 + ["1"]) for _ in range(400)).encode()


def _pendulum_bytes() -> bytes:
    rows = "\n".join(f"1 {0.01 * i:.2f} {np.sin(0.01 * i):.6f} {np.cos(0.01 * i):.6f}" for i in range(4000))
    return ("% o v\n" + rows + "\n").encode()


def _physionet_tar_gz() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for record in range(40):
            lines = ["Time,Parameter,Value", f"00:00,RecordID,{132539 + record}", "00:00,Age,54"]
            lines += [f"{hour:02d}:{minute:02d},HR,{70 + minute}" for hour in range(48) for minute in range(0, 60, 20)]
            data = ("\n".join(lines) + "\n").encode()
            info = tarfile.TarInfo(f"set-a/{132539 + record}.txt")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


CASES = {
    "mnist idx": (lambda: gzip.compress(_idx_bytes()), read_idx),
    "heartbeat csv": (lambda: gzip.compress(_heartbeat_bytes()), load_heartbeat),
    "pendulum txt": (lambda: gzip.compress(_pendulum_bytes()), load_pendulum),
    "physionet tar.gz": (_physionet_tar_gz, load_physionet),
}


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


@pytest.mark.parametrize("damage", [_cut, _flip_a_byte], ids=["cut", "corrupted"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_compressed_file_names_the_file(tmp_path, case, damage):
    make, load = CASES[case]
    intact = tmp_path / "intact.gz"
    intact.write_bytes(make())
    load(intact)  # the undamaged file loads: the error below is the damage's
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(damage(make()))
    with pytest.raises(ValueError, match=r"damaged\.gz: the file is truncated or damaged \(.*download it again"):
        load(damaged)
