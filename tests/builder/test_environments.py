"""Environments resolved by pip's real resolver from a folder of real wheels (no network)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.builder import environments
from services.builder.environments import EnvironmentLock, LockedPackage, PackageIndex
from services.common.errors import InvalidArgument, MlmeshError, Unavailable
from tests.builder.wheels import make_wheel

ARCHITECTURE = environments.target_architecture()


@pytest.fixture(autouse=True)
def pip_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip sees only what a test gives it: no configured indexes, find-links or constraints of this machine."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


@pytest.fixture
def wheels(tmp_path: Path) -> tuple[Path, PackageIndex]:
    folder = tmp_path / "wheels"
    make_wheel(folder, "alpha", "1.0", ("beta>=2",))
    for version in ("1.0", "2.0", "2.5"):
        make_wheel(folder, "beta", version)
    make_wheel(folder, "beta", "3.0", requires_python=">=3.12")
    make_wheel(folder, "gamma", "3.0")
    make_wheel(folder, "epsilon", "1.0")
    make_wheel(folder, "marked", "1.0", ('gamma; python_version >= "3.12"',))
    # Compiled wheels: only manylinux up to glibc 2.36 fits the image; abi3 fits every later CPython.
    make_wheel(folder, "native", "1.0", tag=f"cp311-cp311-manylinux2014_{ARCHITECTURE}")
    for platform_tag in (f"manylinux_2_38_{ARCHITECTURE}", f"musllinux_1_2_{ARCHITECTURE}", f"linux_{ARCHITECTURE}"):
        make_wheel(folder, "native", "2.0", tag=f"cp311-cp311-{platform_tag}")
    make_wheel(folder, "stable", "1.0", tag=f"cp39-abi3-manylinux_2_17_{ARCHITECTURE}")
    make_wheel(folder, "newer-only", "1.0", tag=f"cp312-cp312-manylinux_2_17_{ARCHITECTURE}")
    return folder, PackageIndex(find_links=(str(folder),), no_index=True)


def versions(lock: EnvironmentLock) -> list[tuple[str, str]]:
    return [(package.name, package.version) for package in lock.packages]


def test_a_chain_resolves_to_the_highest_allowed_versions_with_the_files_hashes_and_installs_by_hash(wheels, tmp_path):
    folder, index = wheels
    lock = environments.resolve_lock(["alpha"], "3.11", index)
    # beta 3.0 needs Python 3.12: 2.5 is the highest that alpha's beta>=2 allows on 3.11.
    assert lock.python_version == "3.11"
    assert versions(lock) == [("alpha", "1.0"), ("beta", "2.5")]
    for package in lock.packages:
        assert package.sha256 == hashlib.sha256((folder / package.filename).read_bytes()).hexdigest()
    assert [package.filename for package in lock.packages] == [
        "alpha-1.0-py3-none-any.whl",
        "beta-2.5-py3-none-any.whl",
    ]
    assert lock.requirements_text() == "".join(
        f"{package.name}=={package.version} --hash=sha256:{package.sha256}\n" for package in lock.packages
    )

    (tmp_path / "lock.txt").write_text(lock.requirements_text())
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--require-hashes", "--no-index", "--find-links",
         str(folder), "--target", str(tmp_path / "site"), "-r", str(tmp_path / "lock.txt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert (tmp_path / "site" / "alpha" / "__init__.py").read_text() == "VERSION = '1.0'\n"
    assert (tmp_path / "site" / "beta" / "__init__.py").read_text() == "VERSION = '2.5'\n"


def test_the_lock_is_for_the_target_python_its_requires_python_and_its_markers(wheels):
    _, index = wheels
    requirements = ["alpha", "marked", 'epsilon; python_version < "3.12"']
    on_311 = environments.resolve_lock(requirements, "3.11", index)
    on_312 = environments.resolve_lock(requirements, "3.12", index)
    assert versions(on_311) == [("alpha", "1.0"), ("beta", "2.5"), ("epsilon", "1.0"), ("marked", "1.0")]
    # Markers count for the target, not for the Python that runs pip (3.11 here).
    assert versions(on_312) == [("alpha", "1.0"), ("beta", "3.0"), ("gamma", "3.0"), ("marked", "1.0")]


def test_compiled_wheels_are_those_a_manylinux_image_of_the_target_python_installs(wheels):
    _, index = wheels
    lock = environments.resolve_lock(["native", "stable"], "3.11", index)
    assert [package.filename for package in lock.packages] == [
        f"native-1.0-cp311-cp311-manylinux2014_{ARCHITECTURE}.whl",
        f"stable-1.0-cp39-abi3-manylinux_2_17_{ARCHITECTURE}.whl",
    ]


@pytest.mark.parametrize(
    ("requirements", "reason"),
    [
        (["nosuchpackage==1.0"], "Could not find a version that satisfies the requirement nosuchpackage==1.0"),
        (["beta==9.0"], "beta==9.0 (from versions: 1.0, 2.0, 2.5, 3.0)"),
        (["alpha", "beta==1.0"], "alpha 1.0 depends on beta>=2"),
        (["beta==1.0", "beta==2.5"], "Cannot install beta==1.0 and beta==2.5"),
        (["newer-only"], "Could not find a version that satisfies the requirement newer-only"),
    ],
)
def test_what_pip_cannot_resolve_is_refused_with_pips_reason(wheels, tmp_path, requirements, reason):
    folder, _ = wheels
    # A configured folder that does not exist makes pip complain on every lookup: noise, not a reason.
    index = PackageIndex(find_links=(str(folder), str(tmp_path / "missing")), no_index=True)
    with pytest.raises(InvalidArgument) as failure:
        environments.resolve_lock(requirements, "3.11", index)
    message = failure.value.message
    assert message.startswith("pip could not resolve the requirements: ERROR: "), message
    assert reason in message
    assert "is ignored" not in message and "To fix this" not in message
    assert failure.value.field == "requirements"


def test_the_same_spec_written_differently_is_equal_and_other_specs_differ():
    one = environments.normalize_requirements(
        "# serving\nGamma==3.0\n\nalpha  # the app\nscikit_learn[Alldeps] >= 1.4 ; python_version>='3.8'   \n"
    )
    two = environments.normalize_requirements(
        "scikit-learn [alldeps]>=1.4; python_version >= '3.8'\r\nalpha\n\tgamma == 3.0\nALPHA\n"
    )
    assert one == two == ["alpha", "gamma==3.0", 'scikit-learn[alldeps]>=1.4; python_version >= "3.8"']
    assert environments.normalize_requirements("gamma \\\n  ==3.0\n") == ["gamma==3.0"]
    digest = environments.spec_digest("3.11", one, "python:3.11-slim")
    assert len(digest) == 64
    assert digest == environments.spec_digest("3.11", list(reversed(two)), "python:3.11-slim")
    assert digest != environments.spec_digest("3.12", one, "python:3.11-slim")
    assert digest != environments.spec_digest("3.11", one, "python:3.11-bookworm")
    assert digest != environments.spec_digest("3.11", ["alpha", "gamma==3.1"], "python:3.11-slim")


@pytest.mark.parametrize(
    "line",
    [
        "-r other.txt",
        "-c constraints.txt",
        "--index-url http://example.com/simple",
        "-e .",
        "https://example.com/alpha-1.0-py3-none-any.whl",
        "git+https://example.com/alpha.git",
        "alpha @ https://example.com/alpha-1.0-py3-none-any.whl",
        "./local",
        "/srv/wheels/alpha-1.0-py3-none-any.whl",
        "alpha-1.0-py3-none-any.whl",
        "alpha==1.0 --hash=sha256:00",
        'alpha; python_version == "${HOME}"',
        "==",
        "alpha==",
        "not a requirement",
    ],
)
def test_options_paths_urls_and_garbage_are_refused_naming_the_line(line):
    with pytest.raises(InvalidArgument) as failure:
        environments.normalize_requirements(f"gamma==3.0\n{line}\n")
    assert f"requirements line 2 ({line[:120]!r})" in failure.value.message


def test_resolve_lock_checks_the_requirements_it_is_given_and_the_python_version():
    index = PackageIndex(no_index=True)
    with pytest.raises(InvalidArgument, match="pip options are not allowed"):
        environments.resolve_lock(["alpha", "-r /etc/passwd"], "3.11", index)
    for version in ("2.7", "3", "3.11.4", "3.11; rm -rf /", "", "py3.11"):
        with pytest.raises(InvalidArgument, match="python_version") as failure:
            environments.resolve_lock(["alpha"], version, index)
        assert failure.value.field == "python_version"


def test_empty_requirements_give_an_empty_lock_without_asking_pip():
    index = PackageIndex(index_url="http://127.0.0.1:9/simple")
    lock = environments.resolve_lock(environments.normalize_requirements("# nothing yet\n\n"), "3.12", index)
    assert lock == EnvironmentLock("3.12", ())
    assert lock.requirements_text() == ""


def test_huge_specs_are_refused_quickly():
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match=f"at most {environments.MAX_REQUIREMENTS_BYTES}"):
        environments.normalize_requirements("alpha==1.0\n" * 100_000)
    with pytest.raises(InvalidArgument, match=f"at most {environments.MAX_REQUIREMENTS_BYTES}"):
        environments.normalize_requirements("a" * (environments.MAX_REQUIREMENTS_BYTES + 1))
    with pytest.raises(InvalidArgument, match=f"at most {environments.MAX_REQUIREMENTS} requirements"):
        environments.normalize_requirements("".join(f"p{n}\n" for n in range(environments.MAX_REQUIREMENTS + 1)))
    assert len(environments.normalize_requirements("".join(f"p{n}\n" for n in range(1000)))) == 1000
    assert time.monotonic() - started < 2


def test_the_index_options_are_pips():
    index = PackageIndex(
        index_url="https://pypi.example.com/simple",
        extra_index_urls=("https://more.example.com/simple",),
        find_links=("/srv/wheels", "https://example.com/wheels/"),
        no_index=True,
    )
    assert index.pip_arguments() == [
        "--index-url", "https://pypi.example.com/simple",
        "--extra-index-url", "https://more.example.com/simple",
        "--find-links", "/srv/wheels",
        "--find-links", "https://example.com/wheels/",
        "--no-index",
    ]  # fmt: skip
    assert PackageIndex().pip_arguments() == []
    assert LockedPackage("alpha", "1.0", "ab" * 32, "alpha-1.0-py3-none-any.whl").name == "alpha"


@pytest.fixture
def silent_index() -> Iterator[str]:
    """An index URL whose server takes connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/simple/"


def test_an_index_that_does_not_answer_in_time_is_unavailable(silent_index):
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer in time"):
        environments.resolve_lock(["alpha"], "3.11", PackageIndex(index_url=silent_index), timeout_seconds=3)
    assert time.monotonic() - started < 10


def test_an_index_that_refuses_connections_is_unavailable_not_a_missing_package(monkeypatch):
    # One retry: pip reports a connection failure only when it retries.
    monkeypatch.setenv("PIP_RETRIES", "1")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(Unavailable, match="the package index did not answer") as failure:
        environments.resolve_lock(["alpha"], "3.11", PackageIndex(index_url=f"http://127.0.0.1:{port}/simple/"))
    assert "Connection refused" in failure.value.message


def test_a_python_without_pip_is_the_builders_fault_not_the_callers(tmp_path, monkeypatch):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=60)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bare" / "bin" / "python"))
    with pytest.raises(MlmeshError, match="pip is not installed") as failure:
        environments.resolve_lock(["alpha"], "3.11", PackageIndex(no_index=True))
    assert failure.value.code == "INTERNAL"
