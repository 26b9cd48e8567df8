#!/usr/bin/env bash
# Build the image with podman where no registry can be reached (this project's
# machines): a Debian base made with debootstrap from the machine's own apt
# mirror, and pip's local indexes and CA bundle passed in for the build only.
#
#   bash deploy/docker/build-local.sh [TAG]     # default localhost/gradcam-service:0.1.0
#
# Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap).
# On a machine that reaches a registry, `docker build .` is all it takes.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-localhost/gradcam-service:0.1.0}
BASE=localhost/debian-python:bookworm
# These machines refuse the default rlimits for container processes.
LIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

if ! podman image exists "$BASE"; then
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
    mirror=${mirror:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)}
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
        bookworm "$rootfs" "$mirror" >/dev/null
    tar -C "$rootfs" -c . | podman import - "$BASE" >/dev/null
fi

# pip's configuration here (local indexes as file:// URLs, a CA bundle), mounted and
# passed as build arguments; none of it stays in the image.
mounts=() extra=""
for index in $(pip config get global.extra-index-url 2>/dev/null || true); do
    path=${index#file://}
    if [ "$path" != "$index" ] && [ -d "$path" ]; then
        root=$(dirname "$path")  # the index's pages link to files beside it
        mounts+=(-v "$root:$root:ro")
        extra="$extra $index"
    fi
done
cert=$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)

podman --runtime runc build --format docker --network host "${LIMITS[@]}" "${mounts[@]}" \
    -v "$cert:/build-ca.crt:ro" --build-arg PIP_CERT=/build-ca.crt \
    --build-arg "PIP_EXTRA_INDEX_URL=${extra# }" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg "TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}" \
    -t "$TAG" .
