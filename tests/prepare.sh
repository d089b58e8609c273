#!/usr/bin/env bash
# Prepares (once) and caches the ingredients of the QEMU end-to-end suite
# under target/e2e-cache (inside the repo, never elsewhere):
#   - apt packages: qemu-system-x86, qemu-utils (qemu-io for agent/tests/nbd.rs), busybox-static, cpio
#   - Debian's current 6.1 kernel package, unpacked (not installed), and an
#     uncompressed vmlinux extracted from its bzImage (boots ~7 s faster
#     under TCG than the compressed image)
#   - rust-vmm's vhost-device-vsock 0.3.0 (cargo install into the cache)
#   - the libnss-extrausers package file (a directory-user source for the
#     baked-image NSS scenario)
#   - static builds of uve-agent and the e2e guest helper
# Re-running is cheap: every step checks its output first.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache="$repo/target/e2e-cache"
mkdir -p "$cache"
log() { printf 'prepare: %s\n' "$*" >&2; }

# qemu-utils (qemu-io) serves agent/tests/nbd.rs. Installing
# qemu-system-x86 removes a qemu-utils of another QEMU version (a machine
# image may ship one from backports): a second pass installs the matching
# one again.
for pass in 1 2; do
  need=()
  for p in qemu-system-x86 qemu-utils busybox-static cpio xz-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  [ ${#need[@]} -gt 0 ] || break
  log "installing ${need[*]} (pass $pass)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
done

if [ ! -s "$cache/kernel/vmlinux" ]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
  log "kernel package $pkg"
  rm -rf "$cache/kernel" && mkdir -p "$cache/kernel/deb"
  (cd "$cache/kernel/deb" && apt-get download "$pkg" 2>/dev/null)
  dpkg-deb -x "$cache"/kernel/deb/*.deb "$cache/kernel/root"
  vmlinuz=$(ls "$cache"/kernel/root/boot/vmlinuz-*)
  # extract-vmlinux: find the compressed payload and decompress it
  python3 - "$vmlinuz" "$cache/kernel/vmlinux" <<'PY'
import lzma, gzip, sys, zlib
data = open(sys.argv[1], 'rb').read()
for magic, unpack in ((b'\xfd7zXZ\x00', lambda b: lzma.LZMADecompressor().decompress(b)),
                      (b'\x1f\x8b\x08', lambda b: zlib.decompressobj(31).decompress(b))):
    at = data.find(magic)
    while at >= 0:
        try:
            out = unpack(data[at:])
            if out[:4] == b'\x7fELF':
                open(sys.argv[2], 'wb').write(out)
                sys.exit(0)
        except Exception:
            pass
        at = data.find(magic, at + 1)
sys.exit('no ELF payload found in ' + sys.argv[1])
PY
  rm -rf "$cache/kernel/deb"
  log "vmlinux $(du -h "$cache/kernel/vmlinux" | cut -f1)"
fi

if [ ! -x "$cache/vhost/bin/vhost-device-vsock" ]; then
  log "building vhost-device-vsock 0.3.0 (a few minutes)"
  cargo install -q --locked vhost-device-vsock --version 0.3.0 --root "$cache/vhost"
fi

# A real non-files NSS source for the directory-user scenarios (baked_nss):
# the package file only, installed into the guest image by bake-image.sh.
if ! ls "$cache"/debs/libnss-extrausers_*.deb >/dev/null 2>&1; then
  log "libnss-extrausers package (directory users in the baked image)"
  mkdir -p "$cache/debs"
  (cd "$cache/debs" && { apt-get download libnss-extrausers 2>/dev/null ||
    { apt-get update -qq && apt-get download libnss-extrausers; }; })
fi

log "static guest binaries"
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release \
  --target x86_64-unknown-linux-gnu --target-dir "$repo/target/static" \
  -p uve-agent -p uve-e2e --bin uve-agent --bin e2e-guest
log "ready"
