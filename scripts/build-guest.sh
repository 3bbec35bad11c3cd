#!/usr/bin/env bash
# Build (or reuse from the cache) the guest kernel, the static guest init, the
# Flask root filesystem and the test initramfs; print shell assignments for
# their paths.
#   eval "$(scripts/build-guest.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=$(kernels/build.sh | tail -n1)
init=$(init/build.sh | tail -n1)
# Uncompressed: gunzip in the guest kernel is slow where KVM interprets it.
initrd=$(MICROVM_INITRAMFS_FORMAT=cpio tests/initramfs/build.sh | tail -n1)
rootfs=$(rootfs/build.sh | tail -n1)
for f in "$kernel" "$init" "$initrd" "$rootfs"; do
  [[ -f $f ]] || { echo "scripts/build-guest.sh: expected artifact missing: $f" >&2; exit 1; }
done
printf 'export MICROVM_KERNEL=%q MICROVM_INIT=%q MICROVM_TEST_INITRD=%q MICROVM_ROOTFS=%q\n' \
  "$kernel" "$init" "$initrd" "$rootfs"
