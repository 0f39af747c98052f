"""One rule finds every data set: an explicit directory, else $NEURALODE_DATA/<set>, else the user
cache (where `neuralode download` puts files, checked against checksums), else the checkout's
../shared/data/<set>; never the working directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from neuralode.cli import main
from neuralode.data import locate
from neuralode.data.locate import cache_dir, data_search_path, download, find_data_dir

from shared_data import SHARED_DATA


def _pendulum_set(root: Path) -> Path:
    d = root / "pendulum"
    d.mkdir(parents=True)
    (d / "real_pend_h_1.txt").write_text("% trial t theta omega\n")
    return d


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $NEURALODE_DATA, a cache in tmp_path, and no checkout copy."""
    monkeypatch.delenv("NEURALODE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(locate, "_checkout_data", lambda: tmp_path / "checkout" / "shared" / "data")
    return tmp_path


def test_the_order_explicit_env_cache_checkout(isolated, monkeypatch):
    root = isolated
    checkout = _pendulum_set(root / "checkout" / "shared" / "data")
    assert find_data_dir("pendulum") == checkout.resolve()
    cached = _pendulum_set(root / "cache" / "neuralode")
    assert find_data_dir("pendulum") == cached.resolve()
    env = _pendulum_set(root / "env")
    monkeypatch.setenv("NEURALODE_DATA", str(root / "env"))
    assert find_data_dir("pendulum") == env.resolve()
    explicit = _pendulum_set(root / "mine")
    assert find_data_dir("pendulum", str(explicit)) == explicit.resolve()
    assert data_search_path("pendulum") == [root / "env" / "pendulum", root / "cache" / "neuralode" / "pendulum",
                                            root / "checkout" / "shared" / "data" / "pendulum"]


def test_a_half_filled_directory_does_not_hide_a_full_one(isolated):
    (isolated / "cache" / "neuralode" / "mitbih").mkdir(parents=True)
    (isolated / "cache" / "neuralode" / "mitbih" / "mitbih_train.csv").write_text("x")
    full = isolated / "checkout" / "shared" / "data" / "mitbih"
    full.mkdir(parents=True)
    for name in ("mitbih_train.csv.gz", "mitbih_test.csv"):
        (full / name).write_text("x")
    assert find_data_dir("mitbih") == full.resolve()


def test_an_explicit_directory_is_never_second_guessed(isolated):
    _pendulum_set(isolated / "checkout" / "shared" / "data")
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir("pendulum", str(isolated / "elsewhere"))
    assert str(isolated / "elsewhere" / "real_pend_h_1.txt") in str(info.value)


def test_not_found_names_every_place_and_the_download(isolated):
    with pytest.raises(FileNotFoundError) as info:
        find_data_dir("mnist")
    message = str(info.value)
    assert str(cache_dir() / "mnist") in message and "neuralode download mnist" in message
    assert "NEURALODE_DATA" in message and "--set data_dir=" in message
    with pytest.raises(FileNotFoundError, match="put the Kaggle MIT-BIH"):
        find_data_dir("mitbih")


def test_the_working_directory_plays_no_part(tmp_path, monkeypatch):
    """What makes `torchrun` and scripts work from any directory."""
    if not SHARED_DATA.is_dir():
        pytest.skip("no ../shared/data on this machine")
    monkeypatch.delenv("NEURALODE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    from neuralode.experiments import get_experiment

    for name, field in (("pendulum", "data_dir"), ("mnist", "data_dir"), ("physionet", "data_path")):
        experiment = get_experiment(name)
        value = getattr(experiment.resolve(experiment.Config()), field)
        value = value[0] if isinstance(value, tuple) else value
        assert Path(value).is_absolute() and Path(value).exists()
        assert str(SHARED_DATA.resolve()) in str(Path(value).resolve())


def _served(tmp_path, files: dict[str, bytes]):
    src = tmp_path / "server"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    urls = {name: (src / name).as_uri() for name in files}
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return urls, sums


def test_download_verifies_and_keeps_what_is_intact(isolated):
    urls, sums = _served(isolated, {"set-a.tar.gz": b"a" * 1000, "Outcomes-a.txt": b"outcomes"})
    where = download("physionet2012", urls=urls, sha256=sums)
    assert where == (cache_dir() / "physionet2012").resolve()
    assert (where / "set-a.tar.gz").read_bytes() == b"a" * 1000
    assert find_data_dir("physionet2012") == where
    (isolated / "server" / "set-a.tar.gz").unlink()  # a second call keeps the verified file
    assert download("physionet2012", urls=urls, sha256=sums) == where


def test_a_bad_checksum_keeps_nothing(isolated):
    urls, sums = _served(isolated, {"set-a.tar.gz": b"tampered"})
    with pytest.raises(ConnectionError, match="expected SHA-256"):
        download("physionet2012", urls=urls, sha256={"set-a.tar.gz": "0" * 64})
    assert not list((cache_dir() / "physionet2012").iterdir())


def test_no_network_is_a_clear_error(isolated):
    with pytest.raises(ConnectionError, match="by hand"):
        download("physionet2012", urls={"set-a.tar.gz": (isolated / "nowhere.tar.gz").as_uri()}, sha256={})


def test_download_command(isolated, capsys, monkeypatch):
    assert main(["download", "mitbih"]) == 2
    err = capsys.readouterr().err
    assert "cannot be downloaded automatically" in err and "Traceback" not in err
    urls, sums = _served(isolated, {"set-a.tar.gz": b"archive"})
    data = locate.DATASETS["physionet2012"]
    monkeypatch.setitem(locate.DATASETS, "physionet2012",
                        locate.DataSet(data.name, data.required, data.what, data.source, urls=urls, sha256=sums))
    assert main(["download", "physionet2012", "--to", str(isolated / "here")]) == 0
    assert (isolated / "here" / "set-a.tar.gz").read_bytes() == b"archive"


def test_an_unknown_users_home_is_one_line_naming_the_setting(isolated, monkeypatch, capsys):
    """QA D9: ~nosuchuser makes pathlib raise RuntimeError("Could not determine home directory")."""
    with pytest.raises(ValueError, match=r"data_dir='~nosuchuser_q/x': ~nosuchuser_q names no user"):
        find_data_dir("pendulum", "~nosuchuser_q/x")
    monkeypatch.setenv("NEURALODE_DATA", "~nosuchuser_q")
    with pytest.raises(ValueError, match=r"NEURALODE_DATA='~nosuchuser_q'"):
        find_data_dir("pendulum")
    monkeypatch.delenv("NEURALODE_DATA")
    assert main(["download", "physionet2012", "--to", "~nosuchuser_q/x"]) == 2
    err = capsys.readouterr().err
    assert "--to='~nosuchuser_q/x'" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert main(["run", "pendulum", "--out", str(isolated / "run"), "--set", "data_dir=~nosuchuser_q/x"]) == 2
    err = capsys.readouterr().err
    assert "data_dir='~nosuchuser_q/x'" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (isolated / "run").exists()


def test_an_extracted_directory_counts_like_its_archive(isolated):
    """QA D10: set-a (the extracted archive) is one of physionet2012's accepted entries."""
    (isolated / "p" / "set-a").mkdir(parents=True)
    assert find_data_dir("physionet2012", isolated / "p") == (isolated / "p").resolve()
    assert find_data_dir("physionet2012", isolated / "p", required=[("set-a",)]) == (isolated / "p").resolve()
