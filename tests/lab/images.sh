#!/bin/bash
# Build (or refresh) the cached KVM-lab images under build/lab/. Idempotent and safe to run concurrently
# (flock); every artifact carries a key file and is rebuilt only when its inputs changed (kernel, qemu,
# deno, busybox, these scripts). Usage: tests/lab/images.sh [--force]
#
# Artifacts (see README.md):
#   build/lab/vmlinuz            the lab kernel (copy of the installed Debian cloud kernel)
#   build/lab/lab-initrd.gz      tiny initramfs: loads virtio_mmio+virtio_blk, switch_root to rootfs.ext4
#   build/lab/rootfs.ext4        lab userland: busybox, bash, qemu-system-x86_64, deno, kernel modules, /lab/*
#   build/lab/guest/vmlinuz      the default dvmm test guest kernel (same kernel)
#   build/lab/guest/initramfs.gz the default guest initramfs (busybox + virtio modules + guest-init.sh)
#   (in the rootfs) /lab/iperf3.cpio.gz  iperf3 and its libraries, to append to a guest's initramfs
set -euo pipefail
# System tools (mke2fs, mknod, modprobe) live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LAB_DIR=${LAB_DIR:-$ROOT/build/lab}
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

say() { echo "lab-images: $*" >&2; }
die() { echo "lab-images: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------
# Host packages (CI starts from a fresh Debian machine).
pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

ensure_packages() {
	local want=() p
	command -v qemu-system-x86_64 >/dev/null || want+=(qemu-system-x86)
	[[ -e /usr/share/seabios/bios-256k.bin ]] || want+=(seabios)
	pkg_installed busybox-static || want+=(busybox-static)
	command -v cpio >/dev/null || want+=(cpio)
	command -v lz4 >/dev/null || want+=(lz4)
	command -v zstd >/dev/null || want+=(zstd)
	command -v mke2fs >/dev/null || want+=(e2fsprogs)
	command -v flock >/dev/null || want+=(util-linux)
	command -v gzip >/dev/null || want+=(gzip)
	command -v xz >/dev/null || want+=(xz-utils)
	command -v curl >/dev/null || want+=(curl)
	command -v dbus-daemon >/dev/null || want+=(dbus) # the D-Bus API lab test
	command -v iperf3 >/dev/null || want+=(iperf3)     # TCP throughput in tests/bench/io
	[[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] && command -v gcc >/dev/null || want+=(gcc libc6-dev) # guest tools
	# vhost-user back-ends for the virtio-fs and vhost-user-blk lab test
	{ command -v qemu-storage-daemon >/dev/null && [[ -x /usr/lib/qemu/virtiofsd ]]; } || want+=(qemu-system-common)
	if [[ -z ${LAB_KERNEL:-} ]] && ! compgen -G '/boot/vmlinuz-*-cloud-amd64' >/dev/null; then
		want+=(linux-image-cloud-amd64)
	fi
	((${#want[@]})) || return 0
	[[ $(id -u) == 0 ]] || die "missing packages (${want[*]}); run as root or install them"
	say "installing ${want[*]} (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${want[@]}" >&2
	for p in "${want[@]}"; do pkg_installed "$p" || die "apt-get could not install $p"; done
}

# ---------------------------------------------------------------------------------------------------
# Inputs.
pick_kernel() {
	if [[ -n ${LAB_KERNEL:-} ]]; then
		KERNEL=$LAB_KERNEL
	else
		KERNEL=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)
	fi
	[[ -f $KERNEL ]] || die "no lab kernel found (/boot/vmlinuz-*-cloud-amd64); set LAB_KERNEL"
	KVER=${KERNEL##*/vmlinuz-}
	MODDIR=/lib/modules/$KVER
	[[ -f $MODDIR/modules.dep ]] || die "$MODDIR/modules.dep missing (kernel $KVER modules not installed)"
}

find_deno() {
	DENO_BIN=""
	local c
	for c in "$ROOT/.tools/deno" "$(command -v deno 2>/dev/null || true)"; do
		[[ -n $c && -x $c ]] && { DENO_BIN=$(readlink -f "$c"); return 0; }
	done
	say "warning: no deno found (.tools/deno or PATH); the lab will have no deno (run 'make deno')"
}

fstamp() { local f; for f in "$@"; do [[ -e $f ]] && stat -L -c '%n %s %Y' "$f" || echo "$f -"; done; }

# Key of everything an artifact depends on. Artifacts are rebuilt when the stored key differs.
key_common() {
	fstamp "$KERNEL" "$MODDIR/modules.dep" /bin/busybox "$HERE/images.sh"
	echo "kver $KVER"
}
key_guest() { key_common; fstamp "$HERE/guest-init.sh" "$HERE/guest-tools/vsock.c" "$HERE/guest-tools/randread.c"; }
key_initrd() { key_common; fstamp "$HERE/lab-initrd-init.sh"; }
key_rootfs() {
	key_guest
	fstamp "$HERE/lab-init.sh" "$HERE/guest-arg" "$(command -v qemu-system-x86_64)" "$DENO_BIN"
	local b; for b in $(extra_bins); do fstamp "$b"; done
	dpkg-query -W -f='${Package} ${Version}\n' qemu-system-x86 2>/dev/null || true
}

up_to_date() { # name keyfunc
	[[ $FORCE == 0 && -e $LAB_DIR/$1 && -f $LAB_DIR/$1.key ]] && cmp -s <($2) "$LAB_DIR/$1.key"
}

# ---------------------------------------------------------------------------------------------------
# Helpers.
declare -A MOD_PATH=() MOD_DEPS=() MOD_SEEN=()
MOD_ORDER=()
load_moddep() {
	local path deps name
	while IFS=: read -r path deps; do
		name=${path##*/}; name=${name%%.ko*}; name=${name//-/_}
		MOD_PATH[$name]=$path
		MOD_DEPS[$name]=$deps
	done <"$MODDIR/modules.dep"
}
# Append module $1 and (first) its dependencies to MOD_ORDER, each once. Built-in modules are skipped.
resolve_mod() {
	local n=${1//-/_} d
	[[ -n ${MOD_SEEN[$n]:-} ]] && return 0
	MOD_SEEN[$n]=1
	if [[ -z ${MOD_PATH[$n]:-} ]]; then
		sed 's,.*/,,; s,\.ko.*,,; s,-,_,g' "$MODDIR/modules.builtin" 2>/dev/null | grep -qx "$n" && return 0
		die "kernel module $1 not found for $KVER"
	fi
	for d in ${MOD_DEPS[$n]}; do d=${d##*/}; resolve_mod "${d%%.ko*}"; done
	MOD_ORDER+=("${MOD_PATH[$n]}")
}
# Copy the resolved modules (decompressed) into $1/lib/modules and write the load order to load.list.
install_mods() {
	local dst=$1/lib/modules p base
	shift
	MOD_SEEN=(); MOD_ORDER=()
	for p in "$@"; do resolve_mod "$p"; done
	mkdir -p "$dst"
	: >"$dst/load.list"
	for p in "${MOD_ORDER[@]}"; do
		base=${p##*/}; base=${base%%.ko*}.ko
		case $p in
		*.ko.xz) xz -dc "$MODDIR/$p" >"$dst/$base" ;;
		*.ko.zst) zstd -qdc "$MODDIR/$p" >"$dst/$base" ;;
		*.ko.gz) gzip -dc "$MODDIR/$p" >"$dst/$base" ;;
		*) cp "$MODDIR/$p" "$dst/$base" ;;
		esac
		echo "$base" >>"$dst/load.list"
	done
}

# Busybox with applet symlinks in $1/bin (skipping names already present in the tree's bin dirs).
install_busybox() {
	local t=$1 a
	mkdir -p "$t/bin"
	cp /bin/busybox "$t/bin/busybox"
	for a in $(/bin/busybox --list); do
		[[ -e $t/bin/$a || -e $t/sbin/$a || -L $t/bin/$a ]] && continue
		ln -s busybox "$t/bin/$a"
	done
}

# Copy an executable and the shared libraries it needs (same absolute paths, symlinks dereferenced).
copy_elf() { # tree src [dest-path-in-tree]
	local t=$1 src=$2 dst=${3:-$2} lib
	mkdir -p "$t$(dirname "$dst")"
	cp -L "$src" "$t$dst"
	for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
		[[ -e $t$lib ]] && continue
		mkdir -p "$t$(dirname "$lib")"
		cp -L "$lib" "$t$lib"
	done
}

mkcpio_gz() { # dir out
	(cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 >"$2.tmp"
	mv -f "$2.tmp" "$2"
}

base_tree() { # minimal skeleton with /dev/console (the kernel opens it before /init runs)
	local t=$1
	mkdir -p "$t"/{bin,dev,etc,proc,sys,tmp,run,root,mnt}
	ln -s bin "$t/sbin"
	mknod -m 600 "$t/dev/console" c 5 1
	mknod -m 666 "$t/dev/null" c 1 3
	echo 'root:x:0:0:root:/root:/bin/sh' >"$t/etc/passwd"
	echo 'root:x:0:' >"$t/etc/group"
	printf '127.0.0.1 localhost\n::1 localhost\n' >"$t/etc/hosts"
}

extra_bins() { # host binaries copied into the lab rootfs when present (plus $LAB_EXTRA_BINS)
	local b
	for b in qemu-img bash ip strace curl dbus-daemon dbus-send dbus-monitor qemu-storage-daemon iperf3 \
		/usr/lib/qemu/virtiofsd ${LAB_EXTRA_BINS:-}; do command -v "$b" 2>/dev/null || true; done
}

# ---------------------------------------------------------------------------------------------------
# Artifacts.
GUEST_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
 virtio_blk failover net_failover virtio_net virtio_console virtio-rng button evdev
 vmw_vsock_virtio_transport virtiofs virtio_pmem nd_pmem virtio_balloon virtio_mem"

build_guest() {
	mkdir -p "$LAB_DIR/guest"
	local t
	t=$(mktemp -d "$LAB_DIR/tmp.guest.XXXXXX")
	base_tree "$t"
	install_busybox "$t"
	install_mods "$t" $GUEST_MODULES
	# Guest tools busybox lacks: `vsock` (AF_VSOCK listen/connect/echo-test), static.
	gcc -static -O2 -o "$t/bin/vsock" "$HERE/guest-tools/vsock.c" || die "cannot build guest-tools/vsock.c"
	# `randread` (random O_DIRECT reads, IOPS: tests/bench/io), static.
	gcc -static -O2 -o "$t/bin/randread" "$HERE/guest-tools/randread.c" || die "cannot build guest-tools/randread.c"
	install -m 755 "$HERE/guest-init.sh" "$t/init"
	mkcpio_gz "$t" "$LAB_DIR/guest/initramfs.gz"
	rm -rf "$t"
	cp "$KERNEL" "$LAB_DIR/guest/vmlinuz.tmp" && mv -f "$LAB_DIR/guest/vmlinuz.tmp" "$LAB_DIR/guest/vmlinuz"
	key_guest >"$LAB_DIR/guest/initramfs.gz.key"
	say "built guest/initramfs.gz ($(du -h "$LAB_DIR/guest/initramfs.gz" | cut -f1)) for $KVER"
}

build_initrd() {
	local t
	t=$(mktemp -d "$LAB_DIR/tmp.initrd.XXXXXX")
	base_tree "$t"
	mkdir -p "$t/newroot"
	install_busybox "$t"
	install_mods "$t" virtio_mmio virtio_blk
	install -m 755 "$HERE/lab-initrd-init.sh" "$t/init"
	mkcpio_gz "$t" "$LAB_DIR/lab-initrd.gz"
	rm -rf "$t"
	cp "$KERNEL" "$LAB_DIR/vmlinuz.tmp" && mv -f "$LAB_DIR/vmlinuz.tmp" "$LAB_DIR/vmlinuz"
	key_initrd >"$LAB_DIR/lab-initrd.gz.key"
	say "built lab-initrd.gz + vmlinuz ($KVER)"
}

build_rootfs() {
	local t b qemu size
	t=$(mktemp -d "$LAB_DIR/tmp.rootfs.XXXXXX")
	# usr-merged layout: /bin, /sbin, /usr/sbin -> /usr/bin; /lib, /lib64 -> /usr/lib*.
	mkdir -p "$t"/usr/{lib,lib64,bin,local/bin,share} "$t"/{work,lab,var/tmp}
	ln -s usr/bin "$t/bin"; ln -s bin "$t/usr/sbin"; ln -s usr/lib "$t/lib"; ln -s usr/lib64 "$t/lib64"
	base_tree "$t"
	mkdir -p "$t"/dev/{pts,shm}
	qemu=$(command -v qemu-system-x86_64)
	copy_elf "$t" "$qemu" /usr/bin/qemu-system-x86_64
	cp -rL /usr/share/qemu "$t/usr/share/qemu"
	# SeaBIOS for QEMU's -M pc (the hotplug comparison), when Debian's qemu-system-data lacks the link.
	[[ -e $t/usr/share/qemu/bios-256k.bin || ! -e /usr/share/seabios/bios-256k.bin ]] ||
		cp /usr/share/seabios/bios-256k.bin "$t/usr/share/qemu/bios-256k.bin"
	for b in $(extra_bins); do copy_elf "$t" "$b" "/usr/bin/${b##*/}"; done
	[[ -n $DENO_BIN ]] && copy_elf "$t" "$DENO_BIN" /usr/local/bin/deno
	install_busybox "$t"
	# Whole module tree so `modprobe` works inside the lab (bridge, vhost_net, ...).
	mkdir -p "$t/lib/modules"
	cp -a "$MODDIR" "$t/lib/modules/$KVER"
	rm -f "$t/lib/modules/$KVER/build" "$t/lib/modules/$KVER/source"
	install -m 755 "$HERE/lab-init.sh" "$t/sbin/lab-init"
	install -m 755 "$HERE/guest-arg" "$t/usr/local/bin/guest-arg"
	cp "$KERNEL" "$t/lab/vmlinuz"
	cp "$LAB_DIR/guest/initramfs.gz" "$t/lab/initramfs.gz"
	# iperf3 for the guest, with its libraries and loader: an initramfs of its own that a bench appends to
	# the guest's (Linux unpacks concatenated archives), so that other guests do not carry its 8 MB.
	if command -v iperf3 >/dev/null; then
		local it
		it=$(mktemp -d "$LAB_DIR/tmp.iperf3.XXXXXX")
		copy_elf "$it" "$(command -v iperf3)" /bin/iperf3
		mkcpio_gz "$it" "$t/lab/iperf3.cpio.gz"
		rm -rf "$it"
	fi
	echo "$KVER" >"$t/lab/kernel-version"
	size=$(($(du -sm "$t" | cut -f1) + 128))
	rm -f "$LAB_DIR/rootfs.ext4.tmp"
	truncate -s "${size}M" "$LAB_DIR/rootfs.ext4.tmp"
	mke2fs -q -F -t ext4 -O ^has_journal -m 0 -L dvmm-lab-root -d "$t" "$LAB_DIR/rootfs.ext4.tmp"
	mv -f "$LAB_DIR/rootfs.ext4.tmp" "$LAB_DIR/rootfs.ext4"
	rm -rf "$t"
	key_rootfs >"$LAB_DIR/rootfs.ext4.key"
	say "built rootfs.ext4 (${size} MiB; deno: ${DENO_BIN:-none})"
}

main() {
	ensure_packages
	mkdir -p "$LAB_DIR"
	pick_kernel
	find_deno
	exec 9>"$LAB_DIR/.images.lock"
	flock 9
	rm -rf "$LAB_DIR"/tmp.*
	load_moddep
	local rebuilt=0
	if ! up_to_date guest/initramfs.gz key_guest; then build_guest; rebuilt=1; fi
	if ! up_to_date lab-initrd.gz key_initrd; then build_initrd; fi
	if [[ $rebuilt == 1 ]] || ! up_to_date rootfs.ext4 key_rootfs; then build_rootfs; fi
}

main "$@"
