"""Environments: a pip requirements spec resolved by pip's own resolver to an exact lock with hashes.

The lock is for the Python that a model image runs, not for this process: CPython `python_version`
on glibc Linux of this machine's architecture, with the manylinux tags that deploy/build-image.sh
and the image builder download (glibc up to 2.36, Debian bookworm's). pip resolves without
installing anything (`pip install --dry-run --report`), and its installation report gives the exact
file of every package and its sha256.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from services.common.errors import InvalidArgument, MlmeshError, Unavailable
from services.common.settings import PackageIndex

MAX_REQUIREMENTS = 1000
MAX_REQUIREMENTS_BYTES = 64 * 1024
# The longest reason from pip that an error message carries.
MAX_REASON_CHARS = 2000
PYTHON_VERSION = re.compile(r"3\.\d{1,2}")
# Newest glibc first: pip prefers the first tag a package has a wheel for. Bookworm has glibc 2.36 and
# the python:3.X-slim images a newer one, so these tags install on both.
NEWEST_GLIBC_MINOR = 36
OLDEST_GLIBC_MINOR = 17
# pip's own comment syntax: `#` at the start of a line or after whitespace.
COMMENT = re.compile(r"(^|\s)#.*$")
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")
# pip expands ${NAME} in requirements files, where these lines may end up: a spec must not read the environment.
ENVIRONMENT_VARIABLE = re.compile(r"\$\{")
# Lines of pip's output that say nothing about the requirements: configured find-links folders that do not
# exist, a pointer to pip's help and a repetition of the line before.
NOISE = (
    re.compile(r"Location '.*' is ignored"),
    re.compile(r"is ignored: it is neither a file nor a directory"),
    re.compile(r"^ERROR: ResolutionImpossible: for help visit"),
    re.compile(r"^ERROR: No matching distribution found for "),
)
# pip only says that an index did not answer through urllib3's retry warnings and fetch failures; without
# them "from versions: none" would read as "no such package".
UNREACHABLE_INDEX = re.compile(
    r"Retrying \(Retry\(|Could not fetch URL|Max retries exceeded|NewConnectionError|ConnectTimeoutError"
    r"|ReadTimeoutError|Temporary failure in name resolution|Name or service not known|Network is unreachable"
)
RETRY_PREFIX = re.compile(r"^WARNING: Retrying \(Retry\(.*?\)\) after connection broken by ")
# Runs `python -m pip` with the marker environment of the target Python: pip evaluates markers such as
# `python_version < "3.12"` against the interpreter that runs it, whatever --python-version says
# (pypa/pip#11010), so a lock for another Python would miss or gain dependencies.
PIP_FOR_TARGET = """\
import json, runpy, sys
from pip._vendor.packaging import markers
host = markers.default_environment()
target = json.loads(sys.argv[1])
markers.default_environment = lambda: {**host, **target}
sys.argv = ["pip", *sys.argv[2:]]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class LockedPackage:
    """One package of a lock: the exact file pip chose and its sha256."""

    name: str
    version: str
    sha256: str
    filename: str


@dataclass(frozen=True)
class EnvironmentLock:
    """Every package an environment installs, pinned to one file each."""

    python_version: str
    packages: tuple[LockedPackage, ...]

    def requirements_text(self) -> str:
        """requirements.txt lines `name==version --hash=sha256:HEX`, sorted, ending in a newline: installable
        with `pip install --require-hashes -r`."""
        lines = sorted(f"{package.name}=={package.version} --hash=sha256:{package.sha256}" for package in self.packages)
        return "".join(line + "\n" for line in lines)


def normalize_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements file, validated and in a canonical form.

    Comments, blank lines and trailing spaces go; each line is parsed as a PEP 508 requirement and
    re-rendered with its name and extras normalised; the result is sorted without duplicates, so that
    the same spec written differently compares equal. Options (-r, -c, -e, --index-url, --hash),
    file paths and URLs are refused: an environment must be self-contained and resolvable from the
    package index.

    Raises:
        InvalidArgument: a line that is not a plain requirement (named by its number), or more than
            MAX_REQUIREMENTS requirements or MAX_REQUIREMENTS_BYTES bytes.
    """
    size = len(text) if len(text) > MAX_REQUIREMENTS_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_REQUIREMENTS_BYTES:
        raise InvalidArgument(
            f"requirements are {size} bytes; at most {MAX_REQUIREMENTS_BYTES} are accepted", field="requirements"
        )
    lines = _logical_lines(text)
    # Counted before parsing, duplicates too: the limit also bounds the work a hostile spec costs.
    if len(lines) > MAX_REQUIREMENTS:
        raise InvalidArgument(
            f"requirements have {len(lines)} lines; at most {MAX_REQUIREMENTS} requirements are accepted",
            field="requirements",
        )
    return sorted({_canonical_requirement(number, line) for number, line in lines})


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(number of its first line, text) of each non-empty line without its comment; a line ending in a
    backslash continues on the next, as pip reads requirements files."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            first = number
        if raw.endswith("\\") and not COMMENT.search(raw):
            pending.append(raw[:-1])
            continue
        line = COMMENT.sub("", "".join([*pending, raw])).strip()
        pending = []
        if line:
            lines.append((first, line))
    if pending and (line := COMMENT.sub("", "".join(pending)).strip()):
        lines.append((first, line))
    return lines


def _canonical_requirement(number: int, line: str) -> str:
    shown = f"requirements line {number} ({line[:120]!r})"
    if line.startswith("-"):
        raise InvalidArgument(
            f"{shown}: pip options are not allowed; list packages with versions, e.g. scikit-learn==1.5.2",
            field="requirements",
        )
    if "://" in line or line.startswith((".", "/", "~")) or "\\" in line:
        raise InvalidArgument(
            f"{shown}: file paths and URLs are not allowed; an environment installs from the package index only",
            field="requirements",
        )
    if ENVIRONMENT_VARIABLE.search(line):
        raise InvalidArgument(f"{shown}: environment variables are not allowed", field="requirements")
    try:
        requirement = Requirement(line)
    except InvalidRequirement as error:
        hint = " (per-requirement options such as --hash are not allowed)" if " -" in line else ""
        raise InvalidArgument(f"{shown} is not a requirement{hint}: {error}", field="requirements") from None
    # pip reads a name such as `model.whl` as a file in its working directory.
    if requirement.url or requirement.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise InvalidArgument(
            f"{shown}: file paths and URLs are not allowed; an environment installs from the package index only",
            field="requirements",
        )
    requirement.name = canonicalize_name(requirement.name)
    requirement.extras = {canonicalize_name(extra) for extra in requirement.extras}
    return str(requirement)


def spec_digest(python_version: str, requirements: list[str], base_image: str) -> str:
    """sha256 hex of the canonical spec: equal specs give equal digests.

    `requirements` are those of normalize_requirements; their order and duplicates do not count.
    """
    canonical = json.dumps(
        {"python": python_version, "requirements": sorted(set(requirements)), "base_image": base_image}
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def target_architecture() -> str:
    """This machine's architecture as manylinux tags name it (x86_64, aarch64, ...)."""
    return manylinux_architecture(platform.machine())


def manylinux_architecture(name: str) -> str:
    """An architecture as a machine or Docker engine names it (amd64, arm64, x86_64) as manylinux tags do."""
    name = name.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def manylinux_platforms(architecture: str) -> list[str]:
    """The manylinux platform tags of deploy/build-image.sh, preferred first."""
    tags = [f"manylinux_2_{minor}_{architecture}" for minor in range(NEWEST_GLIBC_MINOR, OLDEST_GLIBC_MINOR - 1, -1)]
    tags.append(f"manylinux2014_{architecture}")
    if architecture == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def target_options(python_version: str, architecture: str) -> list[str]:
    """pip's options that select binary wheels for CPython `python_version` on manylinux `architecture`."""
    abi = "cp" + python_version.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for tag in manylinux_platforms(architecture):
        options += ["--platform", tag]
    return options


def marker_environment(python_version: str, architecture: str) -> dict[str, str]:
    """PEP 508 marker values of CPython `python_version` on Linux. The image's patch level is unknown: `X.Y.0`,
    as pip's Requires-Python check takes `--python-version X.Y`."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python_version}.0",
        "os_name": "posix",
        "platform_machine": architecture,
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "python_full_version": f"{python_version}.0",
        "python_version": python_version,
        "sys_platform": "linux",
    }


def pip_command(python_version: str, index: PackageIndex, requirements: list[str], report_file: Path) -> list[str]:
    """The pip run that resolves `requirements` (normalised: none starts with `-`) for the target and writes its
    installation report.

    The requirements go on the command line rather than in a file: pip then names them in its reasons
    (`Cannot install alpha==1.0 and beta==1.0`) instead of naming a line of a file the caller never saw.
    """
    architecture = target_architecture()
    return [
        sys.executable,
        "-c",
        PIP_FOR_TARGET,
        json.dumps(marker_environment(python_version, architecture)),
        "install",
        "--dry-run",
        "--ignore-installed",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--report",
        str(report_file),
        *target_options(python_version, architecture),
        *index.pip_arguments(),
        *requirements,
    ]


def resolve_lock(
    requirements: list[str], python_version: str, index: PackageIndex, *, timeout_seconds: float = 300
) -> EnvironmentLock:
    """Resolves `requirements` with pip's resolver for the target Python, without installing anything.

    The target is binary wheels for CPython `python_version` on manylinux of this machine's architecture,
    as a Docker image of that Python would install them; pure-Python wheels fit every target.

    Raises:
        InvalidArgument: a malformed requirement or python_version, or requirements that pip cannot
            resolve (with pip's reason).
        Unavailable: the package index did not answer, or not within `timeout_seconds`.
    """
    if not isinstance(python_version, str) or not PYTHON_VERSION.fullmatch(python_version):
        raise InvalidArgument(
            f"python_version {str(python_version)[:20]!r} must look like 3.11", field="python_version"
        )
    # Callers pass normalised requirements; checking again keeps options and paths away from pip whatever they pass.
    requirements = normalize_requirements("\n".join(requirements))
    if not requirements:
        return EnvironmentLock(python_version, ())
    deadline = time.monotonic() + timeout_seconds
    with tempfile.TemporaryDirectory(prefix="mlmesh-resolve-") as scratch:
        folder = Path(scratch)
        report_file = folder / "report.json"
        try:
            # Working in the scratch folder: nothing pip reads relative to it can be the builder's own files.
            answer = subprocess.run(
                pip_command(python_version, index, requirements, report_file),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                timeout=timeout_seconds,
                cwd=folder,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"pip did not resolve the requirements within {timeout_seconds:g} s: the package index did not "
                "answer in time"
            ) from None
        if answer.returncode != 0:
            raise _resolution_error(answer.stdout, answer.returncode)
        report = json.loads(report_file.read_text())
    _check_marker_environment(report, python_version)
    packages = [_locked_package(item, deadline) for item in report.get("install", [])]
    return EnvironmentLock(python_version, tuple(sorted(packages, key=lambda package: package.name)))


def _resolution_error(output: str, returncode: int) -> MlmeshError:
    """The error for a failed pip run: Unavailable when an index did not answer, INTERNAL without pip, else
    InvalidArgument with pip's reason."""
    if "No module named 'pip'" in output or "No module named pip" in output:
        return MlmeshError(
            f"pip is not installed beside the builder ({sys.executable}); environments are resolved by it"
        )
    lines = [line.rstrip() for line in output.splitlines()]
    unreachable = next((line.strip() for line in lines if UNREACHABLE_INDEX.search(line)), "")
    unreachable = RETRY_PREFIX.sub("", unreachable)
    reason = pip_reason(output) or f"pip exited with status {returncode} without saying why"
    if unreachable:
        return Unavailable(f"the package index did not answer: {unreachable[:500]}\n{reason}")
    return InvalidArgument(f"pip could not resolve the requirements: {reason}", field="requirements")


def pip_reason(output: str) -> str:
    """pip's own reason in its output: from its first ERROR line on, without noise and advice (else its last
    lines), at most MAX_REASON_CHARS characters."""
    lines = [line.rstrip() for line in output.splitlines()]
    lines = [line for line in lines if not any(noise.search(line) for noise in NOISE)]
    first_error = next((number for number, line in enumerate(lines) if line.startswith("ERROR:")), None)
    if first_error is None:
        kept = [line for line in lines if line.strip()][-5:]
    else:
        kept = []
        advice = False
        for line in lines[first_error:]:
            # pip's "To fix this you could try to:" list is generic; the conflict itself is the reason.
            if line.startswith("To fix this you could try"):
                advice = True
            elif advice and not line.strip():
                advice = False
                continue
            if advice or (not line.strip() and (not kept or not kept[-1].strip())):
                continue
            kept.append(line)
    reason = "\n".join(kept).strip()
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def _check_marker_environment(report: dict[str, Any], python_version: str) -> None:
    """Refuses a lock that pip made with the markers of this interpreter instead of the target's (a pip
    whose vendored packaging no longer takes PIP_FOR_TARGET's environment)."""
    used = report.get("environment", {})
    if used.get("python_version") != python_version or used.get("sys_platform") != "linux":
        raise MlmeshError(
            f"pip evaluated markers for Python {used.get('python_version')} on {used.get('sys_platform')}, not for "
            f"the target Python {python_version} on linux; this pip ({report.get('pip_version')}) cannot make locks "
            "for another Python"
        )


def _locked_package(item: dict[str, Any], deadline: float) -> LockedPackage:
    """One item of pip's installation report as a locked package with the sha256 of its file."""
    metadata = item["metadata"]
    download = item.get("download_info", {})
    url = download.get("url", "")
    archive = download.get("archive_info", {})
    sha256 = archive.get("hashes", {}).get("sha256", "")
    # Older pips name one hash only, as "algorithm=hex".
    if not sha256 and archive.get("hash", "").startswith("sha256="):
        sha256 = archive["hash"].removeprefix("sha256=")
    if not sha256:
        # pip vouches for no hash of some files (a --find-links page without hashes; local files in older pips).
        sha256 = _sha256_of(url, deadline)
    filename = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    return LockedPackage(canonicalize_name(metadata["name"]), metadata["version"], sha256.lower(), filename)


def _sha256_of(url: str, deadline: float) -> str:
    digest = hashlib.sha256()
    if urllib.parse.urlparse(url).scheme == "file":
        with Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).open("rb") as source:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
        return digest.hexdigest()
    try:
        with urllib.request.urlopen(url, timeout=max(1.0, deadline - time.monotonic())) as source:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError("it did not arrive in time")
    except (OSError, urllib.error.URLError) as error:
        raise Unavailable(f"could not download {url[:300]} to hash it: {error}") from None
    return digest.hexdigest()
