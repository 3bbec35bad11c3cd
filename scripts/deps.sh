#!/usr/bin/env bash
# Install the host packages microvm's build and tests need (Debian 12, root).
# Idempotent: installs only what is missing; `apt-get update` only when needed.
set -euo pipefail

PKGS=(
  # guest kernel build
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio kmod
  # guest root filesystem and test initramfs
  debootstrap busybox-static e2fsprogs
  # user-mode networking (--net user) and its tests: passt; setpriv (util-linux)
  # drops CAP_NET_ADMIN in the rootless test; network namespaces, HTTP client
  passt util-linux iproute2 curl
  # image tests: OCI layouts and docker archives made with tools that are not ours
  umoci skopeo zstd
  # nested normal-KVM lane (tests/nested/): QEMU's TCG emulates AMD SVM for an L1
  qemu-system-x86 python3
)
PKGS+=("$@")

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/deps.sh: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "scripts/deps.sh: installing ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { echo "scripts/deps.sh: cargo (Rust toolchain) not found on PATH" >&2; exit 1; }
