#!/usr/bin/env bash
# Make the Debian base image locally, for hosts that cannot pull from a container registry.
#
#   sudo docker/make-base-image.sh            # -> debian:bookworm-slim
#   BASE_IMAGE=debian:bookworm-slim SUITE=bookworm MIRROR=http://deb.debian.org/debian docker/make-base-image.sh
#
# debootstrap --variant=minbase SUITE into a temporary folder, from the Debian mirror this host's apt already
# uses (first URI in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list, or $MIRROR), then
# `docker import` it under the tag the Dockerfiles start FROM. Idempotent: does nothing when the image exists
# (pulled or made earlier). Where the registry is reachable, `docker pull debian:bookworm-slim` is the better
# choice: it is smaller and signed by Docker's official-images pipeline.
# Needs root (debootstrap), debootstrap and a running Docker engine.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
SUITE=${SUITE:-bookworm}
DOCKER=${DOCKER:-docker}

if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "make-base-image: $BASE_IMAGE exists, nothing to do"
    exit 0
fi

# The mirror: $MIRROR, else the first Debian archive URI (not the security archive) in apt's sources.
find_mirror() {
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -v -- '-security' | head -n1 || true)
    if [[ -z "$uri" ]]; then
        uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print $2}' | grep -v -- '-security' | grep -i debian | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${MIRROR:-$(find_mirror)}

command -v debootstrap >/dev/null || { echo "make-base-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "make-base-image: debootstrap needs root" >&2; exit 1; }

ROOTFS=$(mktemp -d /tmp/medseg-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "make-base-image: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >/tmp/medseg-debootstrap.log 2>&1 || {
    tail -n 20 /tmp/medseg-debootstrap.log >&2
    echo "make-base-image: debootstrap failed (full log: /tmp/medseg-debootstrap.log)" >&2
    exit 1
}

# Trim it towards what debian:*-slim carries: no apt lists, caches, docs or man pages, and the same dpkg
# excludes so that later apt-get installs stay slim too.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log
cat >"$ROOTFS"/etc/dpkg/dpkg.cfg.d/docker-slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
cat >"$ROOTFS"/etc/apt/apt.conf.d/docker-clean <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
# The same suites the official image lists (base, updates, security), from the same mirror host.
cat >"$ROOTFS"/etc/apt/sources.list <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
# The host's own hostname/resolv.conf must not travel into the image (Docker provides both at run time).
: >"$ROOTFS"/etc/hostname
rm -f "$ROOTFS"/etc/resolv.conf

echo "make-base-image: docker import -> $BASE_IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'CMD ["bash"]' \
    --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$BASE_IMAGE" >/dev/null
"$DOCKER" image ls "$BASE_IMAGE"
