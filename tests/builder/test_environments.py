"""Environments resolved by pip's real resolver against a folder of real wheels (no network)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from services.builder import environments
from services.builder.environments import PackageIndex
from services.common.errors import InvalidArgument
from tests.builder.conftest import make_wheel


@pytest.fixture
def wheels(tmp_path: Path) -> tuple[Path, PackageIndex]:
    folder = tmp_path / "wheels"
    make_wheel(folder, "alpha", "1.0", ("beta>=2",))
    make_wheel(folder, "beta", "1.0")
    make_wheel(folder, "beta", "2.0")
    make_wheel(folder, "beta", "2.5")
    make_wheel(folder, "gamma", "3.0")
    return folder, PackageIndex(find_links=(str(folder),), no_index=True)


def test_a_chain_resolves_to_exact_versions_with_the_files_hashes_and_installs_by_hash(wheels, tmp_path):
    folder, index = wheels
    lock = environments.resolve_lock(["alpha"], "3.11", index)
    assert [(p.name, p.version) for p in lock.packages] == [("alpha", "1.0"), ("beta", "2.5")]
    for package in lock.packages:
        assert package.sha256 == hashlib.sha256((folder / package.filename).read_bytes()).hexdigest()
    (tmp_path / "lock.txt").write_text(lock.requirements_text())
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--require-hashes", "--no-index", "--find-links",
         str(folder), "--target", str(tmp_path / "site"), "-r", str(tmp_path / "lock.txt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert (tmp_path / "site" / "beta" / "__init__.py").read_text() == "VERSION = '2.5'\n"


def test_the_same_spec_written_differently_is_equal_and_other_specs_differ():
    one = environments.normalize_requirements("# tools\nGamma==3.0\n\nalpha  # the app\n")
    two = environments.normalize_requirements("alpha\ngamma == 3.0\nalpha\n")
    assert one == two == ["alpha", "gamma==3.0"]
    digest = environments.spec_digest("3.11", one, "")
    assert digest == environments.spec_digest("3.11", two, "")
    assert digest != environments.spec_digest("3.12", one, "")
    assert digest != environments.spec_digest("3.11", one, "python:3.11-slim")


@pytest.mark.parametrize(
    ("requirements", "words"),
    [
        (["nosuchpackage==1.0"], "nosuchpackage"),
        (["beta==9.0"], "beta==9.0"),
        (["alpha", "beta==1.0"], "conflict"),
    ],
)
def test_what_pip_cannot_resolve_is_refused_with_pips_reason(wheels, requirements, words):
    _, index = wheels
    with pytest.raises(InvalidArgument) as failure:
        environments.resolve_lock(requirements, "3.11", index)
    assert "pip could not resolve" in failure.value.message
    assert words.lower() in failure.value.message.lower(), failure.value.message
    assert "neither a file nor a directory" not in failure.value.message


@pytest.mark.parametrize(
    "line",
    ["-r other.txt", "--index-url http://x", "-e .", "https://example.com/x.whl", "./local", "pkg @ file:///x", "=="],
)
def test_options_paths_urls_and_garbage_are_refused_naming_the_line(line):
    with pytest.raises(InvalidArgument) as failure:
        environments.normalize_requirements(f"alpha\n{line}\n")
    assert "line 2" in failure.value.message


def test_huge_specs_and_bad_python_versions_are_refused_quickly():
    with pytest.raises(InvalidArgument, match="bytes"):
        environments.normalize_requirements("alpha\n" * 100_000)
    with pytest.raises(InvalidArgument, match="at most"):
        environments.normalize_requirements("".join(f"package{n}\n" for n in range(1500)))
    with pytest.raises(InvalidArgument, match="python_version"):
        environments.resolve_lock(["alpha"], "2.7; rm -rf /", PackageIndex(no_index=True))
