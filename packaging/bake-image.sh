#!/usr/bin/env bash
# bake-image.sh — put uve-agent into a Debian guest image.
#
# Installs the uve-agent .deb into a root filesystem (its postinst enables
# uve-agent.service; nothing is started, no network is needed inside the
# image), writes /etc/uve/agent.toml, and optionally turns the tree into an
# ext4 disk image without mounting anything (mkfs.ext4 -d).
#
# The root filesystem is either
#   --debootstrap            built fresh: debootstrap bookworm, minbase +
#                            systemd-sysv, udev, kmod (+ --include), cached
#                            under --cache keyed by suite/variant/packages
#   (default)                an existing tree at --rootfs (e.g. an unpacked
#                            cloud image or a previous bake)
# For a Debian cloud image file (qcow2/raw) use virt-customize instead:
# packaging/README.md shows the one-liner.
#
# Usage:
#   packaging/bake-image.sh --rootfs DIR [--debootstrap [--suite S]
#       [--mirror URL (default: debootstrap's)] [--include pkg,pkg] [--cache DIR]]
#       [--agent-deb FILE] [--deb FILE]... [--config agent.toml]
#       [--modules-from KROOT] [--copy-in SRC DST]... [--enable UNIT]...
#       [--run 'CMD']... [--hostname NAME] [--disk IMG [--disk-size 2G]]
#
#   --agent-deb FILE   the uve-agent package (default target/debian/uve-agent.deb)
#   --deb FILE         another package to install the same way (repeatable)
#   --config FILE      becomes /etc/uve/agent.toml (the package ships one
#                      with every option commented out = the defaults)
#   --modules-from K   copy K/lib/modules/<version> (an unpacked linux-image
#                      package) into the image and run depmod: for guests
#                      booted with an external kernel (Firecracker, Cloud
#                      Hypervisor, QEMU -kernel) whose drivers are modules
#   --copy-in SRC DST  copy a file into the image (DST absolute, inside)
#   --enable UNIT      systemctl enable UNIT inside the image (offline)
#   --run 'CMD'        run a shell command chrooted into the image
#   --disk IMG         write an ext4 image of the tree (label uve-root,
#                      /etc/fstab mounts it as /)
#
# Needs root (chroot, ownership of the tree), debootstrap for --debootstrap,
# e2fsprogs for --disk. Prints the timings of its steps.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'bake-image: [%3ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'bake-image: error: %s\n' "$*" >&2; exit 1; }

rootfs="" debootstrap=0 suite=bookworm mirror=""
include="systemd-sysv,udev,kmod" extra_include="" cache=""
agent_deb="$repo/target/debian/uve-agent.deb" config="" modules_from=""
hostname=uve-guest disk="" disk_size=2G
debs=() copies=() enables=() runs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rootfs) rootfs=$2; shift ;;
    --debootstrap) debootstrap=1 ;;
    --suite) suite=$2; shift ;;
    --mirror) mirror=$2; shift ;;
    --include) extra_include=$2; shift ;;
    --cache) cache=$2; shift ;;
    --agent-deb) agent_deb=$2; shift ;;
    --deb) debs+=("$2"); shift ;;
    --config) config=$2; shift ;;
    --modules-from) modules_from=$2; shift ;;
    --copy-in) copies+=("$2" "$3"); shift 2 ;;
    --enable) enables+=("$2"); shift ;;
    --run) runs+=("$2"); shift ;;
    --hostname) hostname=$2; shift ;;
    --disk) disk=$2; shift ;;
    --disk-size) disk_size=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ -n "$rootfs" ] || die "--rootfs DIR is required"
[ "$(id -u)" = 0 ] || die "needs root (chroot into the image, file ownership)"
[ -f "$agent_deb" ] || die "no agent package at $agent_deb (packaging/build-debs.sh builds it)"
agent_deb=$(readlink -f "$agent_deb")

# --- 1. the root filesystem -------------------------------------------------
if [ "$debootstrap" = 1 ]; then
  command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
  [ ! -e "$rootfs" ] || [ -z "$(ls -A "$rootfs")" ] || die "$rootfs exists and is not empty"
  pkgs="$include${extra_include:+,$extra_include}"
  key=$(printf '%s\n' "$suite" minbase "$pkgs" "${mirror:-default}" | sha256sum | cut -c1-16)
  tarball="${cache:+$cache/debootstrap-$suite-$key.tar}"
  mkdir -p "$rootfs"
  if [ -n "$tarball" ] && [ -s "$tarball" ]; then
    log "rootfs from cache $(basename "$tarball")"
    tar -C "$rootfs" --numeric-owner -xpf "$tarball"
  else
    log "debootstrap $suite minbase +$pkgs (a few minutes)"
    # No mirror given: debootstrap's own default Debian mirror.
    debootstrap --variant=minbase --include="$pkgs" "$suite" "$rootfs" ${mirror:+"$mirror"} >"$rootfs.debootstrap.log" 2>&1 \
      || { tail -20 "$rootfs.debootstrap.log" >&2; die "debootstrap failed (log: $rootfs.debootstrap.log)"; }
    rm -f "$rootfs.debootstrap.log"
    # Nothing of the build host's apt state is useful inside the image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*_Packages
    if [ -n "$tarball" ]; then
      mkdir -p "$cache"
      tar -C "$rootfs" --numeric-owner -cpf "$tarball.tmp.$$" .
      mv "$tarball.tmp.$$" "$tarball"
      log "cached as $tarball ($(du -m "$tarball" | cut -f1) MiB)"
    fi
  fi
fi
[ -x "$rootfs/usr/bin/dpkg" ] || die "$rootfs does not look like a Debian root filesystem"
rootfs=$(readlink -f "$rootfs")

# --- 2. install the packages (maintainer scripts run chrooted) --------------
# policy-rc.d: no package may start a service while we bake (the uve
# postinsts would not anyway: they start units only under a running systemd).
policy="$rootfs/usr/sbin/policy-rc.d"
had_policy=0; [ -e "$policy" ] && had_policy=1
[ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; }
cleanup() { [ "$had_policy" = 1 ] || rm -f "$policy"; rm -rf "$rootfs/tmp/uve-bake"; }
trap cleanup EXIT
mkdir -p "$rootfs/tmp/uve-bake"
in_image=()
for d in "$agent_deb" "${debs[@]}"; do
  [ -f "$d" ] || die "no package $d"
  cp "$(readlink -f "$d")" "$rootfs/tmp/uve-bake/"
  in_image+=("/tmp/uve-bake/$(basename "$(readlink -f "$d")")")
done
log "dpkg -i ${in_image[*]##*/}"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  dpkg -i "${in_image[@]}" >&2
chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin systemctl is-enabled uve-agent.service >/dev/null \
  || die "uve-agent.service is not enabled after installation"

# --- 3. configuration -------------------------------------------------------
if [ -n "$config" ]; then
  install -D -m 0644 "$config" "$rootfs/etc/uve/agent.toml"
  log "wrote /etc/uve/agent.toml from $config"
fi
echo "$hostname" >"$rootfs/etc/hostname"
# Every VM made from the image must get its own machine id (first boot).
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"

if [ -n "$modules_from" ]; then
  mods=$(ls -d "$modules_from"/lib/modules/*/ 2>/dev/null | head -1)
  [ -n "$mods" ] || die "no lib/modules/<version> under $modules_from"
  ver=$(basename "$mods")
  mkdir -p "$rootfs/lib/modules"
  rm -rf "$rootfs/lib/modules/$ver"
  cp -a "$mods" "$rootfs/lib/modules/$ver"
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin depmod "$ver"
  log "kernel modules $ver installed and indexed"
fi

i=0
while [ $i -lt ${#copies[@]} ]; do
  src=${copies[$i]} dst=${copies[$((i + 1))]}
  install -D -m "$(stat -c %a "$src")" "$src" "$rootfs$dst"
  i=$((i + 2))
done
for u in "${enables[@]}"; do
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin systemctl enable "$u" >&2
done
for c in "${runs[@]}"; do
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -c "$c" >&2
done

cleanup
trap - EXIT

# --- 4. disk image ----------------------------------------------------------
if [ -n "$disk" ]; then
  command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install e2fsprogs)"
  printf 'LABEL=uve-root / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
  rm -f "$disk"
  truncate -s "$disk_size" "$disk"
  mkfs.ext4 -q -F -L uve-root -d "$rootfs" "$disk" >&2
  log "disk image $disk ($disk_size, $(du -m "$disk" | cut -f1) MiB used)"
fi
log "done: uve-agent $(dpkg-deb -f "$agent_deb" Version) baked into $rootfs"
