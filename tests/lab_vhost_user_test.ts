/**
 * vhost-user in the KVM lab, with real back-ends started here: QEMU's virtiofsd (virtio-fs) and
 * qemu-storage-daemon (vhost-user-blk), both devices in one boot of the stock guest under dvmm
 * (`--memory shared=on`, `--fs tag=myfs,socket=…`, `--disk vhost_user=on,socket=…`):
 *
 * - the guest mounts `-t virtiofs myfs /mnt`, reads the host's token file, writes a file the host
 *   then finds, and times a 64 MiB write and read through virtio-fs;
 * - virtiofsd is then killed while the guest runs: dvmm reports the back-end's hang-up and carries on
 *   (the guest learns it may go on through the disk: the host writes a marker into the image);
 * - the guest reads the disk's token from /dev/vda, writes one back (found in the image after
 *   poweroff) and times a 64 MiB read; /dev/vdb is a second export of the same qemu-storage-daemon
 *   through `--generic-vhost-user device_type=block`;
 * - the same guest script then runs under QEMU with vhost-user-fs-pci and a fresh virtiofsd, for the
 *   virtio-fs figures beside dvmm's.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();

// Both VMMs run it; the disk part only where there is a disk. T: wall clock in µs (adjtimex).
const GUEST = `
T(){ adjtimex|awk '/tv_sec/{s=$2}/tv_usec/{u=$2}END{printf "%.0f",s*1e6+u}';}
for d in /sys/bus/pci/devices/*;do echo "PCI $(cat $d/vendor) $(cat $d/device)";done
mount -t virtiofs myfs /mnt;echo "FS mount=$?"
echo "FS token=$(cat /mnt/token.txt)"
echo from-guest-7781 >/mnt/guest.txt;sync
t=$(T);dd if=/dev/zero of=/mnt/big bs=1M count=64 conv=fsync 2>/dev/null;echo "FS write rc=$? us=$(($(T)-t))"
echo 3 >/proc/sys/vm/drop_caches
t=$(T);dd if=/mnt/big of=/dev/null bs=1M 2>/dev/null;echo "FS read rc=$? us=$(($(T)-t))"
rm /mnt/big;umount /mnt;echo "FS umount=$?"
echo FS-DONE
if [ -b /dev/vda ];then
i=0;while [ $i -lt 600 ];do m=$(dd if=/dev/vda bs=512 skip=4096 count=1 iflag=direct 2>/dev/null|head -c6);[ "$m" = KILLED ]&&break;sleep 1;i=$((i+1));done
echo "SYNC $m"
for b in /dev/vd?;do echo "DISK $(basename $b) $(head -c 14 $b)";done
echo blk-from-guest-5519|dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null;echo "BLK write=$?"
t=$(T);dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null;echo "BLK read rc=$? us=$(($(T)-t))"
fi
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
VFS=$(command -v virtiofsd || echo /usr/lib/qemu/virtiofsd)
mkdir -p $D/share
echo fs-token-4242 >$D/share/token.txt
waitsock() { i=0; while [ ! -S "$1" ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; }
start_vfs() {
  rm -f $D/fs.sock
  $VFS --socket-path=$D/fs.sock -o source=$D/share -o cache=none -o sandbox=chroot >>$D/vfs.log 2>&1 &
  VPID=$!
  waitsock $D/fs.sock
}
dd if=/dev/zero of=$D/disk.img bs=1M count=64 2>/dev/null
printf blk-token-9001 | dd of=$D/disk.img conv=notrunc 2>/dev/null
dd if=/dev/zero of=$D/gen.img bs=1M count=8 2>/dev/null
printf gen-token-3003 | dd of=$D/gen.img conv=notrunc 2>/dev/null
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$D/disk.img \\
  --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$D/blk.sock,writable=on \\
  --blockdev driver=file,node-name=g,filename=$D/gen.img \\
  --export type=vhost-user-blk,id=e2,node-name=g,addr.type=unix,addr.path=$D/gen.sock,writable=on \\
  >$D/qsd.log 2>&1 &
QPID=$!
waitsock $D/blk.sock
waitsock $D/gen.sock
start_vfs
CMD="console=ttyS0 panic=-1 $(guest-arg < $D/guest.sh)"
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz --cmdline "$CMD" \\
  --cpus boot=2 --memory size=384M,shared=on --serial tty --console off \\
  --fs tag=myfs,socket=$D/fs.sock --disk vhost_user=on,socket=$D/blk.sock \\
  --generic-vhost-user socket=$D/gen.sock,queue_sizes=[128],device_type=block \\
  >$D/out.txt 2>$D/err.txt &
pid=$!
i=0
while ! grep -q FS-DONE $D/out.txt 2>/dev/null; do
  i=$((i+1)); [ $i -gt 1200 ] && { echo "timeout waiting for FS-DONE"; break; }
  kill -0 $pid 2>/dev/null || { echo "dvmm exited before FS-DONE"; break; }
  sleep 0.5
done
# The back-end goes away under a running guest.
kill $VPID; wait $VPID
echo "host-sees $(cat $D/share/guest.txt 2>&1)"
i=0; while ! grep -q "closed the connection" $D/err.txt && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
printf KILLED | dd of=$D/disk.img bs=512 seek=4096 conv=notrunc 2>/dev/null
wait $pid
echo "dvmm-exit $?"
kill $QPID; wait $QPID
echo "blk-host-sees $(dd if=$D/disk.img bs=512 skip=2048 count=1 2>/dev/null | head -c 19)"
echo "=== OUT"; tr -d '\\r' <$D/out.txt
echo "=== ERR"; cat $D/err.txt
echo "=== QSD"; cat $D/qsd.log
# The same guest under QEMU with vhost-user-fs-pci and a fresh virtiofsd (it exits with its client).
rm -f $D/share/guest.txt
start_vfs
timeout 300 qemu-system-x86_64 -accel kvm \\
  -M microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,pcie=on,memory-backend=mem \\
  -cpu host -smp 2 -m 384M -object memory-backend-memfd,id=mem,size=384M,share=on \\
  -nodefaults -no-user-config -display none -no-reboot -serial stdio \\
  -chardev socket,id=c,path=$D/fs.sock -device vhost-user-fs-pci,chardev=c,tag=myfs,queue-size=1024 \\
  -kernel /lab/vmlinuz -initrd /lab/initramfs.gz -append "$CMD" >$D/qemu.txt 2>&1
echo "qemu-exit $?"
kill $VPID 2>/dev/null; wait $VPID
echo "qemu-host-sees $(cat $D/share/guest.txt 2>&1)"
echo "=== QEMU"; tr -d '\\r' <$D/qemu.txt
echo "=== VFS"; cat $D/vfs.log
echo "=== END"
`;

/** "FS write rc=0 us=123" → MiB/s for 64 MiB, or null. */
function rate(text: string, what: string): { rc: number; mibs: number } | null {
  const m = text.match(new RegExp(`^${what} rc=(\\d+) us=(\\d+)$`, "m"));
  if (!m) return null;
  return { rc: Number(m[1]), mibs: 64 / (Number(m[2]) / 1e6) };
}

Deno.test({
  name:
    "lab: virtio-fs (virtiofsd) and vhost-user-blk (qemu-storage-daemon) through dvmm's vhost-user front-end",
  ignore: why !== null,
}, async (t) => {
  const res = await runScriptInLab("vhost-user", { "guest.sh": GUEST }, HOST, { timeout: 400 });
  const out = res.stdout.replaceAll("\r", "");
  const tail = labTail(res, out);
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
  const guest = section("OUT");
  const qemu = section("QEMU");
  const line = (text: string, key: string) => text.match(new RegExp(`^${key} ?(.*)$`, "m"))?.[1];
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(out);

  await t.step("the guest sees virtio-fs and virtio-blk functions", () => {
    assert.match(guest, /^PCI 0x1af4 0x105a$/m, tail(8000));
    assert.match(guest, /^PCI 0x1af4 0x1042$/m);
  });
  await t.step("virtio-fs: mount, read the host's file, write one the host sees", () => {
    assert.equal(line(guest, "FS mount="), "0", tail(8000));
    assert.equal(line(guest, "FS token="), "fs-token-4242");
    assert.equal(line(out, "host-sees"), "from-guest-7781");
    assert.equal(rate(guest, "FS write")?.rc, 0);
    assert.equal(rate(guest, "FS read")?.rc, 0);
    assert.equal(line(guest, "FS umount="), "0");
  });
  await t.step("virtiofsd killed under the running guest: reported, dvmm goes on", () => {
    assert.match(
      section("ERR"),
      /vhost-user back-end .*fs\.sock: the back-end closed the connection/,
      tail(8000),
    );
    assert.equal(line(guest, "SYNC"), "KILLED");
  });
  await t.step("vhost-user-blk: the guest reads the image's token and writes one back", () => {
    assert.equal(line(guest, "DISK vda"), "blk-token-9001", tail(8000));
    assert.equal(line(guest, "BLK write="), "0");
    assert.equal(rate(guest, "BLK read")?.rc, 0);
    assert.equal(line(out, "dvmm-exit"), "0");
    assert.equal(line(out, "blk-host-sees"), "blk-from-guest-5519");
  });
  await t.step("generic vhost-user (device_type=block): a second disk, its config from the back-end", () => {
    assert.equal(line(guest, "DISK vdb"), "gen-token-3003", tail(8000));
  });
  await t.step("figures (64 MiB dd), dvmm beside QEMU vhost-user-fs-pci", () => {
    const f = (r: { mibs: number } | null) => r ? `${r.mibs.toFixed(1)} MiB/s` : "n/a";
    const qw = rate(qemu, "FS write"), qr = rate(qemu, "FS read");
    console.log(
      `virtio-fs write: dvmm ${f(rate(guest, "FS write"))}, QEMU ${f(qw)}; ` +
        `read: dvmm ${f(rate(guest, "FS read"))}, QEMU ${f(qr)}; ` +
        `vhost-user-blk read (O_DIRECT): dvmm ${f(rate(guest, "BLK read"))}`,
    );
    if (!qw || !qr) {
      console.log(
        `QEMU comparison did not run to the end (qemu-exit ${line(out, "qemu-exit")}):\n${qemu.slice(-2000)}`,
      );
    } else {
      assert.equal(line(out, "qemu-host-sees"), "from-guest-7781");
    }
  });
});
