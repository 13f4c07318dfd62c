"""docs/install.md, checked as a user follows it: a wheel in a fresh venv and with pipx.

The wheel is built from a copy of the package's sources (so the checkout
gets no build/ folder) and installed without the `dev` extra into a venv
of its own; its dependencies come from the package index as they would
for a user. The configuration checked is the `toml` block of
docs/install.md, read from the page, so the page cannot drift from what
tun2sx accepts. The unit it prints is checked with `systemd-analyze
verify`; systemd cannot run the unit here (it is not PID 1), which
tests/e2e/test_service.py makes up for by running the unit's command with
the unit's capabilities.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "docs" / "install.md"
SOURCES = ("pyproject.toml", "README.md", "tun2sx", "stack", "outbounds")
DEV_TOOLS = ("pytest", "ruff", "mypy", "hypothesis", "atheris", "dpkt", "py-spy")


def docs_config() -> str:
    """The one `toml` block of docs/install.md."""
    blocks = re.findall(r"```toml\n(.*?)```", INSTALL.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/install.md should show one configuration"
    return blocks[0]


def _run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs
    )  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a checkout holds for installing, copied (builds write into it)."""
    src = tmp_path_factory.mktemp("checkout") / "tun2sx"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(path, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = source
    result = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, src])
    assert result.returncode == 0, result.stderr
    (built,) = tmp.glob("tun2sx-*.whl")
    yield built


def test_the_wheel_has_the_unit_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "tun2sx/control/tun2sx.service" in names
    # Built here with a compiler (`./dev` installs gcc): the C checksum is in.
    assert [n for n in names if n.startswith("stack/wire/_checksum.") and n.endswith(".so")]
    assert not [n for n in names if n.startswith(("tests/", "fuzz/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    required = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [line for line in required if "extra ==" not in line]
    assert not [line for line in runtime if any(tool in line for tool in DEV_TOOLS)]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, as docs/install.md's plain-venv way."""
    path = tmp_path_factory.mktemp("venv") / "tun2sx"
    made = _run([sys.executable, "-m", "venv", path])
    assert made.returncode == 0, made.stderr
    installed = _run([path / "bin" / "pip", "install", "-q", wheel])
    assert installed.returncode == 0, installed.stderr
    return path


def test_nothing_for_development_is_installed(venv: Path) -> None:
    listed = _run([venv / "bin" / "pip", "list", "--format=freeze"]).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "tun2sx" in names
    assert not names & set(DEV_TOOLS)


def test_version(venv: Path, tmp_path: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # From elsewhere than the checkout: the installed package answers.
    result = _run([venv / "bin" / "tun2sx", "--version"], cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"tun2sx {version} (checksum: C)\n")


def test_without_a_compiler_the_install_runs_the_python_checksum(
    source: Path, tmp_path: Path
) -> None:
    """The accelerator is optional: a machine without a C compiler gets a
    wheel without it, and the same tun2sx on the pure-Python sum."""
    # A copy of its own: the other builds left their objects in build/.
    checkout = tmp_path / "tun2sx"
    shutil.copytree(source, checkout, ignore=shutil.ignore_patterns("build", "*.egg-info", "*.so"))
    no_cc = tmp_path / "no-cc"
    no_cc.mkdir()
    # What setuptools finds when there is no compiler: the command fails.
    for name in ("cc", "gcc", "x86_64-linux-gnu-gcc"):
        (no_cc / name).write_text("#!/bin/sh\nexit 1\n")
        (no_cc / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{no_cc}:{os.environ['PATH']}", CC=str(no_cc / "cc"))
    out = tmp_path / "wheel"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, checkout], env=env
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("tun2sx-*.whl")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    installed = _run([venv / "bin" / "pip", "install", "-q", wheel])
    assert installed.returncode == 0, installed.stderr
    result = _run([venv / "bin" / "tun2sx", "--version"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.endswith(" (checksum: Python)\n")


def test_check_config_accepts_the_docs_configuration(venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(docs_config())
    result = _run([venv / "bin" / "tun2sx", "check-config", config], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
    config.write_text(docs_config().replace('"MATCH,proxy"', '"MATCH,proxi"'))
    result = _run([venv / "bin" / "tun2sx", "check-config", config], cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "rules[3]" in result.stderr


def test_the_printed_unit_verifies(venv: Path, tmp_path: Path) -> None:
    verify = require_binary("systemd-analyze")
    program = venv / "bin" / "tun2sx"
    unit = _run([program, "service-unit"], cwd=tmp_path).stdout
    assert f"ExecStart={program} --config /etc/tun2sx/config.toml\n" in unit
    path = tmp_path / "tun2sx.service"
    path.write_text(unit)
    result = _run([verify, "verify", path])
    assert result.returncode == 0, result.stderr
    # A value systemd cannot parse is only a warning naming the file and
    # line ("Failed to parse value, ignoring"), and the status stays 0.
    assert path.name not in result.stderr, result.stderr


def test_pipx_installs_a_working_command_from_a_checkout(source: Path, tmp_path: Path) -> None:
    """As docs/install.md does it: `pipx install` of the checkout's folder."""
    pipx = require_binary("pipx")
    env = dict(os.environ, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    env.pop("VIRTUAL_ENV", None)
    installed = _run([pipx, "install", source], env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    result = _run([tmp_path / "bin" / "tun2sx", "--version"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("tun2sx ")
    assert result.stdout.endswith(" (checksum: C)\n")
    config = tmp_path / "config.toml"
    config.write_text(docs_config())
    checked = _run([tmp_path / "bin" / "tun2sx", "check-config", config], cwd=tmp_path)
    assert checked.stdout == "ok\n"
    removed = _run([pipx, "uninstall", "tun2sx"], env=env, cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert not (tmp_path / "bin" / "tun2sx").exists()
