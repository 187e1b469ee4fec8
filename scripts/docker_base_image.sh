#!/usr/bin/env bash
# Make the `debian:bookworm-slim` base image locally when it is missing and no registry can be reached:
# debootstrap a minimal Debian 12 from the apt mirror this machine already uses, then `docker import` it.
# Where a registry is reachable none of this is needed: `docker build` pulls the official image.
# Usage: scripts/docker_base_image.sh [image-tag]   (root, Debian, a running Docker engine)
set -euo pipefail
tag=${1:-debian:bookworm-slim}

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag: present"
    exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }

# The mirror and security mirror apt already uses (the only network here may be the package mirrors).
targets=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | sort -u)
mirror=$(awk '$2 == "bookworm" {print $1; exit}' <<<"$targets")
security=$(awk '$2 == "bookworm-security" {print $1; exit}' <<<"$targets")
mirror=${mirror:-http://deb.debian.org/debian/}
security=${security:-http://deb.debian.org/debian-security/}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "base image $tag: debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null

cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
# The same trimming the official slim image does: no docs, man pages or translations from later installs.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
rm -rf "$rootfs"/usr/share/{man,info,locale}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
docker image ls "$tag" --format 'base image {{.Repository}}:{{.Tag}}: built, {{.Size}}'
