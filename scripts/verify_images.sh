#!/usr/bin/env bash
# Build sedd-serve's container images for real, on a machine with no Docker engine and no registry but
# PyPI and Debian's archive (the CI machines: Debian, root), without touching the machine's own container
# configuration. tests/test_images.py runs this and then runs the images; `make images` runs that test.
#
#   scripts/verify_images.sh [build]   the CPU image, then docker/Dockerfile on a substituted base
#   scripts/verify_images.sh cpu       docker/Dockerfile.cpu only          -> localhost/sedd-serve:cpu
#   scripts/verify_images.sh gpu       docker/Dockerfile only (see below)  -> localhost/sedd-serve:cuda-on-debian
#   scripts/verify_images.sh env       `export` lines that point podman and docker compose at this setup
#   scripts/verify_images.sh socket    podman's Docker-compatible API on $SEDD_IMAGES_DIR/podman.sock
#                                      (foreground), for `docker compose`
#   scripts/verify_images.sh clean     delete $SEDD_IMAGES_DIR: images, containers, volumes, caches
#
# What it does (docs/deployment.md, "Verifying the images"):
# - installs Debian's podman, runc, catatonit (compose's `init: true`), netavark, aardvark-dns, iptables and
#   mmdebstrap where missing (Debian, root only);
# - keeps everything under one folder, $SEDD_IMAGES_DIR (default build/images, git-ignored): its own
#   containers.conf and storage.conf, passed to podman through CONTAINERS_CONF and CONTAINERS_STORAGE_CONF.
#   Only what podman keeps in fixed places as root stays outside: a blob-info cache in
#   /var/lib/containers/cache, netavark's state in /run/containers/networks and the iptables rules of
#   running containers;
# - the bases: python:3.12-slim-bookworm and nvidia/cuda cannot be pulled here, so Debian bookworm built by
#   mmdebstrap stands in: with Python (the CPU image's PYTHON_IMAGE) and without (the GPU image's
#   CUDA_IMAGE, whose own apt-get installs Python). The host's own CAs (/usr/local/share/ca-certificates)
#   go in too, so pip inside the builds reaches PyPI through whatever the host trusts (a TLS proxy's CA);
# - torch: a PEP 503 folder holding the CPU build of the pinned torch for the base's Python and its
#   dependencies, from pip's configured sources (this machine's local wheel), mounted into the build as
#   TORCH_INDEX_URL=file:///idx/. The resolution must pick a `+cpu` build: a CUDA torch from PyPI is
#   several GB and is refused;
# - `podman build --format docker` (the OCI format drops HEALTHCHECK).
# Everything is reused when present (the bases, the torch folder, podman's layer cache): a second run
# takes about a minute. Each step's time goes to $SEDD_IMAGES_DIR/timings.txt, each build's log to logs/.
#
# The GPU image: docker/Dockerfile runs whole, both stages, on the substituted Debian base, with the local
# CPU torch in place of the cu130 build and INSTALL_FLASH_ATTN=0. What only a GPU host runs: the
# nvidia/cuda base, the CUDA torch download and the flash-attn wheel.
#
# Environment: SEDD_IMAGES_DIR (the folder), PYTHON (whose pip downloads torch; default .venv/bin/python,
# else python3), PYTHON_IMAGE and TORCH_INDEX_URL (together, where both can be pulled: the CPU image on a
# real base and index instead of the substitutes; the GPU build keeps the substitutes).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${SEDD_IMAGES_DIR:-$ROOT/build/images}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
LOGS=$DIR/logs
BASE_IMAGE=localhost/sedd-base:bookworm                # Debian 12 + python3, python3-venv, python-is-python3
BARE_IMAGE=localhost/sedd-base:bookworm-minbase        # Debian 12, no Python
CPU_IMAGE=localhost/sedd-serve:cpu                     # what docker-compose.yml's sedd-cpu names (sedd-serve:cpu)
GPU_IMAGE=localhost/sedd-serve:cuda-on-debian          # docker/Dockerfile on the substitutes; not the real image
DEBIAN_TOOLS=(podman runc catatonit netavark aardvark-dns iptables mmdebstrap)

say() { printf 'verify_images: %s\n' "$*"; }
die() { printf 'verify_images: %s\n' "$*" >&2; exit 1; }

export CONTAINERS_CONF=$DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$DIR/storage.conf
export TMPDIR=$DIR/tmp

# ---- tools and configuration -------------------------------------------------------------------------
tools() {
    local missing=() tool
    for tool in podman runc mmdebstrap iptables; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
    done
    [ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
    [ -x /usr/lib/podman/netavark ] || missing+=(netavark)
    [ -x /usr/lib/podman/aardvark-dns ] || missing+=(aardvark-dns)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
        die "missing ${missing[*]}: this script installs them on Debian as root (apt-get install ${DEBIAN_TOOLS[*]})"
    fi
    say "installing ${DEBIAN_TOOLS[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${DEBIAN_TOOLS[@]}" >/dev/null
}

# podman's settings for this folder only; nothing under /etc changes.
# default_ulimits = []: podman's default rlimits are refused inside this kind of sandbox.
# runtime = "runc": crun refuses the hybrid cgroup layout. cgroupfs, file events: there is no systemd.
config() {
    mkdir -p "$DIR/storage" "$DIR/run" "$DIR/tmp" "$DIR/networks" "$LOGS"
    cat > "$CONTAINERS_CONF" <<EOF
# Written by scripts/verify_images.sh; podman reads it through CONTAINERS_CONF.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$DIR/events.log"
tmp_dir = "$DIR/tmp"
image_copy_tmp_dir = "$DIR/tmp"

[network]
network_backend = "netavark"
network_config_dir = "$DIR/networks"
EOF
    cat > "$CONTAINERS_STORAGE_CONF" <<EOF
# Written by scripts/verify_images.sh; podman reads it through CONTAINERS_STORAGE_CONF.
[storage]
driver = "overlay"
graphroot = "$DIR/storage"
runroot = "$DIR/run"
EOF
}

timed() {  # timed NAME COMMAND...: run it, append "NAME SECONDS" to timings.txt
    local name=$1 start seconds
    shift
    start=$(date +%s.%N)
    "$@"
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "$name $seconds" >> "$DIR/timings.txt"
    say "$name: $seconds s"
}

# ---- bases -------------------------------------------------------------------------------------------
debian_image() {  # debian_image IMAGE TAR [MMDEBSTRAP-OPTIONS...]
    local image=$1 tar=$DIR/$2 log=$LOGS/mmdebstrap-${2%.tar}.log hooks=()
    shift 2
    podman image exists "$image" && return
    if [ ! -f "$tar" ]; then
        # The CAs this host adds to Debian's (/usr/local/share/ca-certificates) go into the base, so pip and
        # apt inside the builds trust the same TLS endpoints as the host does (a proxy's CA, for one);
        # ca-certificates puts them into the bundle, now or when a build installs it.
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            # shellcheck disable=SC2016  # mmdebstrap, not this shell, expands $1 (the new root)
            hooks+=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"'
                    --customize-hook='sync-in /usr/local/share/ca-certificates /usr/local/share/ca-certificates'
                    --customize-hook='if [ -x "$1/usr/sbin/update-ca-certificates" ]; then chroot "$1" update-ca-certificates; fi')
        fi
        say "mmdebstrap --variant=minbase $* bookworm -> $tar"
        mmdebstrap --quiet --format=tar --variant=minbase "$@" "${hooks[@]}" bookworm "$tar.part" > "$log" 2>&1 \
            || { tail -20 "$log" >&2; die "mmdebstrap failed (log: $log)"; }
        mv "$tar.part" "$tar"
    fi
    podman import --quiet "$tar" "$image" >/dev/null
}

bases() {
    debian_image "$BASE_IMAGE" base-bookworm.tar --include=python3,python3-venv,python-is-python3,ca-certificates
    debian_image "$BARE_IMAGE" minbase-bookworm.tar
}

# ---- torch -------------------------------------------------------------------------------------------
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/docker/Dockerfile.cpu")
[ -n "$TORCH_VERSION" ] || die "no ARG TORCH_VERSION=... in docker/Dockerfile.cpu"

pip_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
    elif [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"
    else echo python3; fi
}

torch_index() {
    local index=$DIR/torch-index py py_tag wheels pip target=()
    py=$(podman run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
    py_tag=cp$py
    if ls "$index/torch/torch-$TORCH_VERSION+cpu-$py_tag-"*.whl >/dev/null 2>&1; then
        return
    fi
    pip=$(pip_python)
    target=(--only-binary=:all: --python-version "$py" --implementation cp --abi "$py_tag"
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
            --platform linux_x86_64)
    # First what pip would pick, without downloading it: only a CPU build is acceptable.
    "$pip" -m pip install --quiet --dry-run --ignore-installed --target "$DIR/tmp/nowhere" --report "$DIR/tmp/torch.json" \
        "${target[@]}" "torch==$TORCH_VERSION" > "$LOGS/pip-torch.log" 2>&1 \
        || die "pip ($pip) finds no torch==$TORCH_VERSION wheel for CPython $py on Linux x86-64 (log: $LOGS/pip-torch.log)"
    local picked
    picked=$("$pip" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(next(i["metadata"]["version"] + " " + i["download_info"]["url"] for i in r["install"] if i["metadata"]["name"] == "torch"))' \
        "$DIR/tmp/torch.json")
    case "$picked" in
        *+cpu\ *) ;;
        *) die "pip would take torch $picked, not a CPU build (a CUDA torch is several GB): put torch-$TORCH_VERSION+cpu for $py_tag where pip finds it (find-links), or set TORCH_INDEX_URL to an index the build can reach (https://download.pytorch.org/whl/cpu)";;
    esac
    say "torch $picked and its dependencies -> $index"
    wheels=$DIR/wheels
    rm -rf "$wheels" "$index.part"
    "$pip" -m pip download --quiet --dest "$wheels" "${target[@]}" "torch==$TORCH_VERSION" >> "$LOGS/pip-torch.log" 2>&1 \
        || die "pip download torch==$TORCH_VERSION failed (log: $LOGS/pip-torch.log)"
    ls "$wheels/torch-$TORCH_VERSION+cpu-$py_tag-"*.whl >/dev/null 2>&1 || die "pip download did not bring torch-$TORCH_VERSION+cpu"
    # PEP 503: one folder per normalised project name, each with an index.html linking its files.
    "$pip" - "$wheels" "$index.part" <<'EOF'
import html, re, sys
from pathlib import Path

wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    project = index / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    project.mkdir(parents=True, exist_ok=True)
    wheel.replace(project / wheel.name)
for project in index.iterdir():
    links = "".join(f'<a href="{html.escape(w.name)}">{html.escape(w.name)}</a><br>\n' for w in sorted(project.glob("*.whl")))
    (project / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
(index / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "".join(
    f'<a href="{p.name}/">{p.name}</a><br>\n' for p in sorted(index.iterdir()) if p.is_dir()) + "</body></html>\n")
EOF
    rm -rf "$index" "$wheels"
    mv "$index.part" "$index"
}

# ---- builds ------------------------------------------------------------------------------------------
build() {  # build NAME DOCKERFILE IMAGE BUILD-ARGS...
    local name=$1 dockerfile=$2 image=$3 log=$LOGS/build-$1.log mounts=() target
    shift 3
    [ -d "$DIR/torch-index" ] && mounts+=(-v "$DIR/torch-index:/idx:ro")
    : > "$log"
    # The builder stage gets a tag of its own (IMAGE-builder), so that the prune below, which drops what
    # earlier builds left, keeps the layer cache of this one.
    for target in builder ""; do
        if ! podman build --format docker --file "$ROOT/$dockerfile" ${target:+--target "$target"} \
                --tag "$image${target:+-$target}" "${mounts[@]}" "$@" "$ROOT" >> "$log" 2>&1; then
            tail -40 "$log" >&2
            die "building $dockerfile failed (whole log: $log)"
        fi
    done
    podman image prune --force >/dev/null
}

cpu() {
    local args=()
    if [ -n "${PYTHON_IMAGE:-}" ]; then args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"); else args+=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE"); fi
    if [ -n "${TORCH_INDEX_URL:-}" ]; then args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"); else args+=(--build-arg "TORCH_INDEX_URL=file:///idx/"); fi
    timed "cpu-image-build" build cpu docker/Dockerfile.cpu "$CPU_IMAGE" "${args[@]}"
}

gpu() {
    timed "gpu-dockerfile-build" build gpu docker/Dockerfile "$GPU_IMAGE" \
        --build-arg "CUDA_IMAGE=$BARE_IMAGE" --build-arg "TORCH_INDEX_URL=file:///idx/" --build-arg INSTALL_FLASH_ATTN=0
}

prepare() {
    exec 9> "$DIR/.lock"
    flock 9 || die "another run holds $DIR/.lock"
    : > "$DIR/timings.txt"
    timed "tools" tools
    config
    timed "bases" bases
    if [ -z "${TORCH_INDEX_URL:-}" ] || [ "${1:-}" != cpu ]; then timed "torch-index" torch_index; fi
}

case "${1:-build}" in
    build) prepare; cpu; gpu ;;
    cpu) prepare cpu; cpu ;;
    gpu) prepare; gpu ;;
    env)
        for name in CONTAINERS_CONF CONTAINERS_STORAGE_CONF; do printf 'export %s=%q\n' "$name" "${!name}"; done
        printf 'export DOCKER_HOST=%q\n' "unix://$DIR/podman.sock"
        printf 'export SEDD_IMAGES_DIR=%q\n' "$DIR"
        ;;
    socket)
        [ -f "$CONTAINERS_CONF" ] || die "nothing set up in $DIR yet: run $0 first"
        rm -f "$DIR/podman.sock"
        exec podman system service --time=0 "unix://$DIR/podman.sock"
        ;;
    clean)
        if [ -f "$CONTAINERS_CONF" ] && command -v podman >/dev/null 2>&1; then
            podman rm --all --force --time 0 >/dev/null 2>&1 || true
            podman system reset --force >/dev/null 2>&1 || true
        fi
        rm -rf "$DIR"
        ;;
    *) die "usage: $0 [build|cpu|gpu|env|socket|clean]" ;;
esac
