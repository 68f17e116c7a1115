#!/usr/bin/env bash
# Set up everything the qemu guest of tests/kernel/ needs, idempotently (see README.md there):
#   - host tools: qemu-system-x86 and kmod (installed with apt when run as root),
#   - Debian's stock amd64 kernel, fetched with `apt-get download` and unpacked (never
#     installed), keeping only vmlinuz, its config and the modules the guest loads,
#   - busybox-static, and the initramfs built from them and tests/kernel/init.sh.
# Everything lands in the cache directory (default tests/kernel/.cache, git-ignored). A second
# run with nothing changed only checks and prints; a new kernel ABI (-57 -> -58) is fetched.
#
# Usage: bash tests/kernel/setup.sh [CACHE_DIR]     (or PYBMS_KERNEL_CACHE=DIR)
# Prints `KEY=value` lines for the host-side test on its last lines (KERNEL, INITRD, ...).
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${1:-${PYBMS_KERNEL_CACHE:-$HERE/.cache}}
# depmod and modprobe live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

# Modules the guest needs; modprobe --show-depends adds what they depend on, in load order.
REQUIRED_MODULES="virtio_pci 9pnet_virtio 9p overlay can_raw vcan i2c_dev i2c_stub"
HOST_PACKAGES=(qemu-system-x86 kmod)

log() { echo "kernel-setup: $*" >&2; }
die() { echo "kernel-setup: error: $*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
  fi
}

ensure_host_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86_64)
  command -v depmod >/dev/null || missing+=(depmod)
  command -v modprobe >/dev/null || missing+=(modprobe)
  command -v dpkg-deb >/dev/null || missing+=(dpkg-deb)
  command -v apt-get >/dev/null || missing+=(apt-get)
  [ ${#missing[@]} = 0 ] && return
  if ! is_root || ! command -v apt-get >/dev/null; then
    die "missing ${missing[*]}. The kernel tests boot a Debian kernel under qemu; install it
    with:  sudo apt-get install --no-install-recommends ${HOST_PACKAGES[*]}
    (on a machine without apt: qemu-system-x86_64 and kmod from your distribution)"
  fi
  apt_update
  log "installing ${HOST_PACKAGES[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${HOST_PACKAGES[@]}" >&2
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing after install"
}

# The package linux-image-amd64 depends on the current ABI's image (linux-image-6.1.0-57-amd64);
# resolved on every run so an ABI bump is followed.
resolve_kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# apt-get download into $1; as root, let _apt write there (else apt warns it runs unsandboxed).
apt_download() {
  local dir=$1; shift
  if is_root; then chown _apt "$dir" 2>/dev/null || true; fi
  (cd "$dir" && apt-get download -qq "$@" >&2)
}

# Unpack the kernel .deb downloaded into $1 and keep what the guest needs in kernel/$KVER.
unpack_kernel() {
  local tmp=$1 kpkg=$2 kver=$3 dest=$CACHE/kernel/$3
  dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/root"
  rm -f "$tmp"/*.deb
  # The .deb ships no modules.dep (it is made at install time): make one to resolve with.
  depmod -b "$tmp/root" "$kver"
  local config=$tmp/root/boot/config-$kver
  [ -f "$config" ] || die "$kpkg has no boot/config-$kver"
  for option in CAN_VCAN CAN_RAW I2C_CHARDEV I2C_STUB 9P_FS NET_9P_VIRTIO VIRTIO_PCI OVERLAY_FS; do
    grep -qE "^CONFIG_$option=(y|m)" "$config" || die "$kpkg lacks CONFIG_$option"
  done
  rm -rf "$tmp/out"
  mkdir -p "$tmp/out/mods"
  # `insmod PATH [params]` lines in load order; built-in modules print `builtin NAME`.
  local paths
  paths=$(for m in $REQUIRED_MODULES; do
    modprobe -d "$tmp/root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++')
  : >"$tmp/out/modules.list"
  for path in $paths; do
    local name
    name=$(basename "$path")
    case "$name" in
      *.ko) cp "$path" "$tmp/out/mods/$name" ;;
      *.ko.xz) xz -dc "$path" >"$tmp/out/mods/${name%.xz}"; name=${name%.xz} ;;
      *.ko.zst) zstd -qdc "$path" >"$tmp/out/mods/${name%.zst}"; name=${name%.zst} ;;
      *) die "unexpected module file $path" ;;
    esac
    echo "$name" >>"$tmp/out/modules.list"
  done
  cp "$tmp/root/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
  cp "$config" "$tmp/out/config"
  rm -rf "$dest"
  mkdir -p "$CACHE/kernel"
  mv "$tmp/out" "$dest"
  rm -rf "$tmp"
}

unpack_busybox() {
  local tmp=$1
  dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/root"
  cp "$tmp/root/bin/busybox" "$CACHE/busybox.new"
  mv "$CACHE/busybox.new" "$CACHE/busybox"
  rm -rf "$tmp"
}

build_initramfs() {
  local kdir=$1 out=$CACHE/initramfs.cpio.gz
  local stamp
  stamp=$(cat "$HERE/init.sh" "$kdir/modules.list" "$CACHE/busybox" | sha256sum | cut -d' ' -f1)
  if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp-$(basename "$kdir")" ]; then
    return
  fi
  log "building the initramfs"
  local tmp
  tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
  mkdir -p "$tmp/bin" "$tmp/mods" "$tmp/proc" "$tmp/sys" "$tmp/dev" "$tmp/newroot"
  cp "$CACHE/busybox" "$tmp/bin/busybox"
  cp "$HERE/init.sh" "$tmp/init"
  chmod 755 "$tmp/init" "$tmp/bin/busybox"
  cp "$kdir"/mods/*.ko "$tmp/mods/"
  cp "$kdir/modules.list" "$tmp/modules.list"
  (cd "$tmp" && find . | "$CACHE/busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$out.new"
  mv "$out.new" "$out"
  echo "$stamp-$(basename "$kdir")" >"$out.stamp"
  rm -rf "$tmp"
}

main() {
  mkdir -p "$CACHE"
  rm -rf "$CACHE"/tmp.*
  ensure_host_tools

  local kpkg
  kpkg=$(resolve_kernel_package)
  if [ -z "$kpkg" ] && is_root; then
    apt_update  # a fresh machine has no package lists yet
    kpkg=$(resolve_kernel_package)
  fi
  local kver=${kpkg#linux-image-}
  if [ -z "$kpkg" ]; then
    # no package lists (and not root): use the kernel fetched before, if any
    kver=$(cat "$CACHE/kernel/current" 2>/dev/null || true)
    [ -n "$kver" ] || die "cannot resolve the kernel package (apt-cache depends linux-image-amd64
    finds nothing): run 'sudo apt-get update' first"
    log "no package lists: using the cached kernel $kver"
  fi
  if [ ! -f "$CACHE/kernel/$kver/vmlinuz" ] || [ ! -x "$CACHE/busybox" ]; then
    # About to download: fresh lists first, or apt may name a version the archive dropped.
    if is_root && [ "$apt_updated" = 0 ]; then
      apt_update
      kpkg=$(resolve_kernel_package)
      kver=${kpkg#linux-image-}
    fi
  fi
  local tmp
  if [ ! -f "$CACHE/kernel/$kver/vmlinuz" ]; then
    tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
    log "fetching $kpkg (about 70 MB, unpacked only for a moment)"
    apt_download "$tmp" "$kpkg" || die "apt-get download $kpkg failed"
    unpack_kernel "$tmp" "$kpkg" "$kver"
    # keep only the current kernel
    find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d ! -name "$kver" -exec rm -rf {} +
  fi
  echo "$kver" >"$CACHE/kernel/current"
  if [ ! -x "$CACHE/busybox" ]; then
    tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
    log "fetching busybox-static"
    apt_download "$tmp" busybox-static || die "apt-get download busybox-static failed"
    unpack_busybox "$tmp"
  fi
  build_initramfs "$CACHE/kernel/$kver"

  echo "KERNEL_VERSION=$kver"
  echo "KERNEL=$CACHE/kernel/$kver/vmlinuz"
  echo "INITRD=$CACHE/initramfs.cpio.gz"
  echo "QEMU=$(command -v qemu-system-x86_64)"
}

main "$@"
