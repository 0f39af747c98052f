"""Every fenced code block of README.md and docs/*.md runs as written.

* ``python`` blocks are executed, each in a fresh namespace, from an empty working directory
  (so they cannot lean on the repository root): they must run without error.
* ``bash``/``sh``/``console`` blocks are split into commands (``console``: the lines after ``$ ``,
  the rest is the output shown). ``neuralode list`` is run and must print exactly the output the
  block shows; ``neuralode run`` is parsed and its config resolved exactly as the command does
  before training (unknown keys, bad values and missing data fail here), without training;
  ``report`` and ``download`` are parsed; install lines must name real extras and PyTorch's CPU
  wheel index exactly; scripts and benchmarks must exist. A command of any other form fails the
  test, so a new kind of block needs a rule here.
* Blocks without a language are text (file layouts, formulas, synopses) and are not run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
from shared_data import SHARED_DATA

from neuralode.cli import _parser
from neuralode.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
CPU_INDEX = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def _blocks(kinds):
    out = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) in kinds:
                line = text.count("\n", 0, m.start()) + 1
                out.append(pytest.param(m.group(2), id=f"{path.relative_to(ROOT)}:{line}"))
    return out


@contextlib.contextmanager
def _data_or_skip():
    """Blocks that use a real data set skip where the suite's data directory (../shared/data) is absent,
    as the data tests do (a clean clone without it, e.g. CI); where it exists, missing data fails."""
    from neuralode.experiments.config import ConfigError

    try:
        yield
    except (FileNotFoundError, ConfigError) as error:
        if "data not found" in str(error) and not SHARED_DATA.is_dir():
            pytest.skip(f"needs {SHARED_DATA}: {str(error)[:80]}")
        raise


@pytest.mark.parametrize("code", _blocks({"python"}))
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), _data_or_skip():
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def _commands(lang: str, code: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown after it) for each command of a block."""
    lines = code.splitlines()
    out: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if lang == "console" and not line.startswith("$ "):
            if out:
                out[-1][1].append(line)
            i += 1
            continue
        command = line[2:] if lang == "console" else line
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i].strip()
        if command.strip() and not command.lstrip().startswith("#"):
            out.append((command, []))
        i += 1
    return out


def _extras() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def _check_neuralode(argv: list[str], shown: list[str], capsys) -> None:
    args = _parser().parse_args(argv)  # SystemExit(2) on an unknown option or choice
    if args.command == "list":
        assert cli_main(["list"]) == 0
        printed = capsys.readouterr().out.splitlines()
        if shown:
            assert [s for s in shown if s.strip()] == printed, "the block shows another `neuralode list`"
    elif args.command == "run" and not args.resume:
        from neuralode.experiments import apply_overrides, get_experiment

        experiment = get_experiment(args.name)
        overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
        with _data_or_skip():
            experiment.resolve(apply_overrides(experiment.Config(), overrides))


def _check(command: str, shown: list[str], capsys) -> None:
    for part in command.split("&&"):
        part = part.strip()
        words = shlex.split(part, comments=True)
        # Environment assignments (XLA_FLAGS=...) and core pinning (taskset -c N) only set how the command
        # runs: the command after them is what is checked.
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        if words[:2] == ["taskset", "-c"] and len(words) > 3:
            words = words[3:]
        if not words:
            continue
        head = words[0]
        if head == "neuralode":
            _check_neuralode(words[1:], shown, capsys)
        elif head == "torchrun":
            assert "-m" in words and words[words.index("-m") + 1] == "neuralode", part
            _check_neuralode(words[words.index("-m") + 2:], shown, capsys)
        elif words[:3] == ["python3", "-m", "venv"] and len(words) == 4:
            venv = words[3]
            assert f". {venv}/bin/activate" in command, f"{part}: activate the venv it creates"
        elif head in (".", "source") and words[1].endswith("/bin/activate"):
            pass
        elif words[:2] == ["pip", "install"] and words[2:3] == ["-e"]:
            extra = re.fullmatch(r"\.\[(\w+)\]", words[3])
            assert extra and extra.group(1) in _extras(), f"{part}: no such extra"
        elif words[:3] == ["pip", "install", "torch"]:
            assert part == CPU_INDEX or part == "pip install torch", part
        elif words[:2] == ["pip", "install"] and re.fullmatch(r"torch==[\d.]+", words[2]) and len(words) == 3:
            pass
        elif words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
            if "-n" in words:
                with open(ROOT / "pyproject.toml", "rb") as f:
                    assert "pytest-xdist" in tomllib.load(f)["project"]["optional-dependencies"]["test"]
        elif head in ("python", "python3") and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{part}: no such file"
        else:
            pytest.fail(f"no rule for the command {part!r}: teach tests/test_cli_docs.py how to check it")


@pytest.mark.parametrize("lang_code", _blocks({"bash", "sh", "console"}))
def test_shell_block_runs(lang_code, capsys, tmp_path, monkeypatch):
    code = lang_code
    lang = "console" if any(line.startswith("$ ") for line in code.splitlines()) else "bash"
    for command, shown in _commands(lang, code):
        _check(command, shown, capsys)


def test_readme_states_the_cpu_index_and_two_environments():
    readme = (ROOT / "README.md").read_text()
    assert CPU_INDEX in readme
    venvs = re.findall(r"python3 -m venv (\S+)", readme)
    assert len(venvs) == len(set(venvs)) == 2


def test_experiments_doc_lists_every_experiment():
    from neuralode.experiments import experiment_names

    text = (ROOT / "docs" / "experiments.md").read_text()
    block = text[text.index("$ neuralode list"):].split("\n\n")[0]
    assert [line.split()[0] for line in block.splitlines()[1:]] == experiment_names()


def test_every_fault_class_has_a_row():
    text = (ROOT / "docs" / "experiments.md").read_text()
    table = text[text.index("## Faults and what the command does"):]
    for kind in ("file system", "disk", "checkpoint", "config", "metrics", "data", "signal", "JSON"):
        assert f"\n| {kind} |" in table, kind
    assert glob.glob(str(ROOT / "tests" / "test_cli_faults.py"))
