#!/usr/bin/env bash
# Build the base image of mlmesh's images, `mlmesh-base:py3.11`: Debian bookworm minbase with its
# python3 (3.11, with venv and pip), made with debootstrap and imported with `docker import`.
#
# No image registry is needed: the root file system comes from Debian's package mirror. The image
# is built only when it is missing, so a second run returns at once. deploy/build-image.sh and
# the builder's tests both call this script; a lock keeps two of them from building it at once.
#
# Environment (all optional):
#   MLMESH_BASE_IMAGE   tag to build                        (default mlmesh-base:py3.11)
#   DEBIAN_MIRROR       mirror for debootstrap              (default http://deb.debian.org/debian)
#   MLMESH_CACHE        folder for debootstrap's downloads  (default .cache at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${MLMESH_BASE_IMAGE:-mlmesh-base:py3.11}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${MLMESH_CACHE:-$PWD/.cache}
mkdir -p "$CACHE"

step() { printf '== %s\n' "$*" >&2; }
elapsed() { printf '   done in %ss\n' "$(($(date +%s) - $1))" >&2; }

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
  echo "build-base-image.sh: no Docker engine answers (see deploy/README.md to start one)" >&2
  exit 2
}

exists() { docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; }
exists && exit 0

# Whoever holds the lock builds; the others wait for it and then find the image there.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/base-image.lock"
  flock 9
  exists && exit 0
fi

step "base image $BASE_IMAGE (debootstrap bookworm minbase)"
started=$(date +%s)
if ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  else
    echo "build-base-image.sh: debootstrap is needed to build $BASE_IMAGE (apt-get install debootstrap)" >&2
    exit 2
  fi
fi
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/mlmesh-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$CACHE/debootstrap"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
  --cache-dir="$CACHE/debootstrap" bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
  tail -n 30 "$CACHE/debootstrap.log" >&2
  exit 1
}
# What an image never needs: package lists, downloaded .debs, manuals (copyright files stay).
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/man/* \
  "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
find "$rootfs"/var/cache/apt/archives -name '*.deb' -delete
find "$rootfs"/usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete
chmod 755 "$rootfs" # mktemp made it 0700, and it becomes the image's /: others could not enter it
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase bookworm + python3" - "$BASE_IMAGE" >/dev/null
elapsed "$started"
