#!/usr/bin/env bash
# Build the mlmesh image (one image for every service) as `mlmesh:dev`.
#
# Nothing inside the build reaches a package index: this script downloads the runtime
# dependencies as cp311 manylinux wheels on the host, builds mlmesh's own wheel, and the
# Dockerfile installs both with `pip install --no-index`. Every step is cached, so a re-run
# with nothing changed only asks Docker to confirm its layer cache.
#
# Environment (all optional):
#   MLMESH_IMAGE        tag to build                        (default mlmesh:dev)
#   MLMESH_BASE_IMAGE   base image; the default is built by deploy/build-base-image.sh, any other
#                       (e.g. python:3.11-slim) is pulled by `docker build` as usual
#   DEBIAN_MIRROR       mirror for debootstrap              (default http://deb.debian.org/debian)
#   PYTHON              host Python that runs pip           (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${MLMESH_IMAGE:-mlmesh:dev}
DEFAULT_BASE=mlmesh-base:py3.11
BASE_IMAGE=${MLMESH_BASE_IMAGE:-$DEFAULT_BASE}
# deploy/Dockerfile and .dockerignore name these folders: the cache lives in the build context.
CACHE="$PWD/.cache"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$CACHE"

step() { printf '== %s\n' "$*" >&2; }
elapsed() { printf '   done in %ss\n' "$(($(date +%s) - $1))" >&2; }

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
  echo "build-image.sh: no Docker engine answers (see deploy/README.md to start one)" >&2
  exit 2
}

# --- 1. base image: Debian bookworm minbase with its python3 (3.11), built once ----------
if [ "$BASE_IMAGE" = "$DEFAULT_BASE" ]; then
  MLMESH_BASE_IMAGE="$BASE_IMAGE" DEBIAN_MIRROR="$MIRROR" MLMESH_CACHE="$CACHE" bash deploy/build-base-image.sh
fi

# --- 2. wheelhouse: the runtime dependencies as wheels for CPython 3.11 on glibc Linux ----
# The requirement list comes from pyproject.toml; it is downloaded again only when it changes.
requirements=$("$PYTHON" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as file:
    print("\n".join(tomllib.load(file)["project"]["dependencies"]))
EOF
)
arch=$(uname -m)
platforms=()
# bookworm has glibc 2.36; python:3.11-slim has a newer one, so these tags fit both.
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
platforms+=(--platform "manylinux2014_${arch}")
[ "$arch" = x86_64 ] && platforms+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
wheelhouse="$CACHE/wheelhouse"
want=$(printf '%s\n%s\n' "$requirements" "${platforms[*]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$wheelhouse/.stamp" 2>/dev/null)" != "$want" ]; then
  step "wheelhouse $wheelhouse (pip download, cp311 manylinux)"
  started=$(date +%s)
  rm -rf "$wheelhouse.partial"
  mkdir -p "$wheelhouse.partial"
  printf '%s\n' "$requirements" >"$wheelhouse.partial/requirements.txt"
  # (pip's complaints about configured file:// indexes that lack a package are only noise)
  "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$wheelhouse.partial" \
    --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
    -r "$wheelhouse.partial/requirements.txt" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  echo "$want" >"$wheelhouse.partial/.stamp"
  rm -rf "$wheelhouse"
  mv "$wheelhouse.partial" "$wheelhouse"
  elapsed "$started"
fi

# --- 3. mlmesh's own wheel, rebuilt only when its sources change ---------------------------
dist="$CACHE/dist"
sources=$( (
  echo pyproject.toml
  find services -type f ! -path '*/__pycache__/*' ! -name '*.pyc'
) | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$dist/.stamp" 2>/dev/null)" != "$sources" ] || ! ls "$dist"/mlmesh-*.whl >/dev/null 2>&1; then
  step "mlmesh wheel"
  started=$(date +%s)
  rm -rf "$dist"
  mkdir -p "$dist"
  # A fixed timestamp makes the same sources give the same wheel bytes (and a Docker cache hit).
  SOURCE_DATE_EPOCH=315532800 "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dist" . >&2
  echo "$sources" >"$dist/.stamp"
  elapsed "$started"
fi

# --- 4. the image ------------------------------------------------------------------------------
# BuildKit when this machine has it: the legacy builder copies the whole image for every
# instruction on the vfs storage driver (minutes instead of seconds). Clients from Docker 23 on
# need the buildx plugin for it; docker.io 20.10's own client (/usr/bin/docker) has it built in.
build=(docker build)
if docker buildx version >/dev/null 2>&1; then
  build=(env DOCKER_BUILDKIT=1 docker build --progress=plain)
else
  for client in docker /usr/bin/docker; do
    version=$("$client" version --format '{{.Client.Version}}' 2>/dev/null) || continue
    if [ "${version%%.*}" -lt 23 ] 2>/dev/null; then
      build=(env DOCKER_BUILDKIT=1 "$client" build --progress=plain)
      break
    fi
  done
fi
step "image $IMAGE (FROM $BASE_IMAGE, ${build[*]})"
started=$(date +%s)
"${build[@]}" -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" . >"$CACHE/docker-build.log" 2>&1 || {
  tail -n 40 "$CACHE/docker-build.log" >&2
  exit 1
}
elapsed "$started"
docker image inspect --format "$IMAGE {{.Id}} {{.Size}} bytes" "$IMAGE"
