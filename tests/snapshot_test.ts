/**
 * Snapshots: the memory file (sparse writing and reading back), the state format's version checks, the
 * shared-state walk, the ELF core, and on this machine's /dev/kvm a counting guest that is paused,
 * snapshotted, shut down and brought back (memory copied, and mapped on demand) where it goes on
 * counting from where it stood and still answers on its serial port.
 */
import assert from "node:assert/strict";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { Vm } from "../vmm/vm.ts";
import {
  checkState,
  fileUrlPath,
  MEMORY_FILE,
  newState,
  openMemory,
  readRange,
  sharedBuffers,
  SNAPSHOT_VERSION,
  writeMemory,
} from "../vmm/snapshot.ts";
import { writeCoredump } from "../vmm/coredump.ts";
import { shim } from "../ffi/shim.ts";
import { mapAnonymous, mappingBytes, unmap } from "../ffi/kvm.ts";
import { countingGuest, guestCounter, pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { until, waitForSocket, which } from "./helpers/host.ts";

const ignore = !kvmAvailable();

Deno.test("memory file: zero pages become holes; data comes back byte for byte", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-snap-" });
  const a = new Uint8Array(8 << 20); // 8 MiB, three touched pages
  a[0] = 1;
  a[5 * 4096 + 17] = 2;
  a.fill(7, (8 << 20) - 4096);
  const b = new Uint8Array(3 * 4096);
  b[4096] = 9;
  const { ranges, written } = writeMemory(`${dir}/${MEMORY_FILE}`, [
    { name: "ram:mem0", bytes: a },
    { name: "hotplug", bytes: b },
  ]);
  assert.equal(written, 4 * 4096, "only the four non-zero pages are written");
  assert.equal(ranges[0].offset, 0);
  assert.equal(ranges[1].offset, 8 << 20, "ranges start 2 MiB aligned");
  const st = await Deno.stat(`${dir}/${MEMORY_FILE}`);
  assert.equal(st.size, (8 << 20) + 3 * 4096);
  assert.ok(st.blocks !== null && st.blocks * 512 < 1 << 20, `sparse: ${st.blocks} blocks allocated`);
  const fd = openMemory(`${dir}/${MEMORY_FILE}`);
  try {
    const a2 = new Uint8Array(a.length);
    readRange(fd, ranges[0], a2);
    assert.deepEqual(a2, a);
    const b2 = new Uint8Array(b.length);
    readRange(fd, ranges[1], b2);
    assert.deepEqual(b2, b);
    assert.throws(() => readRange(fd, ranges[1], new Uint8Array(4096)), /3 pages|12288 bytes saved/);
  } finally {
    shim().kvs_close(fd);
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("memory file: a range beyond 2 GiB keeps its data at the right offset", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-snap-" });
  const m = mapAnonymous(3 * 2 ** 30); // never-touched pages read as zero and cost nothing
  try {
    const bytes = mappingBytes(m);
    const at = 2.5 * 2 ** 30 + 4096 * 3;
    bytes.set(new TextEncoder().encode("beyond-2-GiB"), at);
    const { ranges, written } = writeMemory(`${dir}/${MEMORY_FILE}`, [{ name: "ram:mem0", bytes }]);
    assert.equal(written, 4096);
    const fd = openMemory(`${dir}/${MEMORY_FILE}`);
    const back = new Uint8Array(12);
    shim().kvs_pread(fd, back, 12n, BigInt(ranges[0].offset + at));
    shim().kvs_close(fd);
    assert.equal(new TextDecoder().decode(back), "beyond-2-GiB");
  } finally {
    unmap(m);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("state format: foreign files and newer versions are refused by name", () => {
  assert.throws(() => checkState({ format: "qemu" }, "/x"), /not a dvmm snapshot/);
  const s = newState();
  assert.equal(checkState(JSON.parse(JSON.stringify(s)), "/x").version, SNAPSHOT_VERSION);
  assert.throws(
    () => checkState({ ...s, version: SNAPSHOT_VERSION + 1, dvmm: "9.9" }, "/x"),
    /version 2 \(written by dvmm 9\.9\) is not readable/,
  );
  assert.throws(() => checkState({ ...s, vcpus: undefined }, "/x"), /incomplete/);
});

Deno.test("file URLs: only file:// with a path", () => {
  assert.equal(fileUrlPath("file:///tmp/snap%20a", "destination_url"), "/tmp/snap a");
  assert.throws(() => fileUrlPath("tcp://1.2.3.4:5", "destination_url"), /only file:\/\//);
  assert.throws(() => fileUrlPath("/tmp/x", "destination_url"), /not a URL/);
  assert.throws(() => fileUrlPath("file://host/x", "source_url"), /host must be empty/);
});

Deno.test("shared state walk: paths by key and device id; host-only keys left out", () => {
  const x = new SharedArrayBuffer(4);
  const y = new SharedArrayBuffer(8);
  const z = new SharedArrayBuffer(8);
  const m = sharedBuffers(
    { legacy: { serial: { sab: x } }, pci: { devices: [{ id: "_disk0", shared: { pci: y }, control: z }] } },
    new Set(["control"]),
  );
  assert.deepEqual([...m.keys()], ["legacy.serial.sab", "pci.devices[_disk0].shared.pci"]);
  assert.equal(m.get("legacy.serial.sab"), x);
});

Deno.test("coredump: ELF core with a PRSTATUS and a QEMU note per vCPU; RAM at its physical address", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-core-" });
  const ram = new Uint8Array(4 << 20);
  const token = new TextEncoder().encode("core-token-4711");
  ram.set(token, 0x123456);
  const regs = Object.fromEntries(
    [
      "rax",
      "rbx",
      "rcx",
      "rdx",
      "rsi",
      "rdi",
      "rsp",
      "rbp",
      "r8",
      "r9",
      "r10",
      "r11",
      "r12",
      "r13",
      "r14",
      "r15",
    ]
      .map((r, i) => [r, BigInt(i + 1)]),
  );
  const seg = {
    base: 0n,
    limit: 0xffff,
    selector: 0x10,
    type: 3,
    present: 1,
    dpl: 0,
    db: 1,
    s: 1,
    l: 0,
    g: 1,
    avl: 0,
    unusable: 0,
  };
  const sregs = {
    cs: seg,
    ds: seg,
    es: seg,
    fs: seg,
    gs: seg,
    ss: seg,
    tr: seg,
    ldt: seg,
    gdt: { base: 0x1000n, limit: 0x27 },
    idt: { base: 0n, limit: 0 },
    cr0: 0x11n,
    cr2: 0n,
    cr3: 0x5000n,
    cr4: 0x20n,
    cr8: 0n,
    efer: 0n,
    apicBase: 0xfee00000n,
    interruptBitmap: [0n, 0n, 0n, 0n],
  };
  const vcpus = [0, 1].map((id) => ({
    id,
    regs: { ...regs, rip: 0x100000n + BigInt(id), rflags: 2n } as never,
    sregs: sregs as never,
    kernelGsBase: 0n,
  }));
  const path = `${dir}/core`;
  writeCoredump(path, vcpus, [{ gpa: 0x40000000, bytes: ram }]);
  const f = await Deno.readFile(path);
  const v = new DataView(f.buffer);
  assert.deepEqual([...f.subarray(0, 4)], [0x7f, 0x45, 0x4c, 0x46]);
  assert.equal(v.getUint16(16, true), 4, "ET_CORE");
  assert.equal(v.getUint16(18, true), 62, "EM_X86_64");
  const phnum = v.getUint16(56, true);
  assert.equal(phnum, 2);
  // Notes: walk them.
  const noteOff = Number(v.getBigUint64(64 + 8, true));
  const noteLen = Number(v.getBigUint64(64 + 32, true));
  const notes: { name: string; type: number; desc: number }[] = [];
  for (let o = noteOff; o < noteOff + noteLen;) {
    const nsz = v.getUint32(o, true), dsz = v.getUint32(o + 4, true), type = v.getUint32(o + 8, true);
    const name = new TextDecoder().decode(f.subarray(o + 12, o + 12 + nsz - 1));
    const desc = o + 12 + ((nsz + 3) & ~3);
    notes.push({ name, type, desc });
    o = desc + ((dsz + 3) & ~3);
  }
  assert.deepEqual(notes.map((n) => `${n.name}/${n.type}`), ["CORE/1", "QEMU/0", "CORE/1", "QEMU/0"]);
  // NT_PRSTATUS: pr_pid, then rip in user_regs_struct (index 16 of pr_reg at 112).
  assert.equal(v.getInt32(notes[2].desc + 32, true), 2);
  assert.equal(v.getBigUint64(notes[2].desc + 112 + 16 * 8, true), 0x100001n);
  // The PT_LOAD: the token sits at p_offset + (gpa - p_paddr).
  const ph = 64 + 56;
  assert.equal(v.getUint32(ph, true), 1);
  assert.equal(v.getBigUint64(ph + 24, true), 0x40000000n);
  const at = Number(v.getBigUint64(ph + 8, true)) + 0x123456;
  assert.equal(new TextDecoder().decode(f.subarray(at, at + token.length)), "core-token-4711");
  assert.equal(f.length, Number(v.getBigUint64(ph + 8, true)) + ram.length);
  // Standard tools read it: readelf lists one NT_PRSTATUS per vCPU.
  const readelf = await new Deno.Command("readelf", { args: ["-n", path], stdout: "piped", stderr: "piped" })
    .output().catch(() => null);
  if (readelf) {
    const text = new TextDecoder().decode(readelf.stdout);
    assert.ok(readelf.success, new TextDecoder().decode(readelf.stderr));
    assert.equal(text.match(/NT_PRSTATUS/g)?.length, 2, text);
  }
  // gdb shows one thread per vCPU, each where its vCPU stood.
  const gdb = await new Deno.Command("gdb", {
    args: ["-batch", "-nx", "-c", path, "-ex", "info threads"],
    stdout: "piped",
    stderr: "piped",
  }).output().catch(() => null);
  if (gdb) {
    const text = new TextDecoder().decode(gdb.stdout);
    assert.match(text, /1 +LWP 1 +0x0+100000 /, text);
    assert.match(text, /2 +LWP 2 +0x0+100001 /, text);
  }
  await Deno.remove(dir, { recursive: true });
});

for (const onDemand of [false, true]) {
  Deno.test({
    name:
      `snapshot and restore (${onDemand ? "memory on demand" : "memory copied"}): the guest counts on from ` +
      "where it stood and its serial port still answers",
    ignore,
  }, async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-snap-vm-" });
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(countingGuest()));
    const config = (out: string) =>
      VmConfigSchema.parse({
        cpus: { boot_vcpus: 2, max_vcpus: 2 },
        memory: { size: 128 << 20 },
        payload: { kernel: `${dir}/guest.elf` },
        serial: { mode: "File", file: `${dir}/${out}` },
        console: { mode: "Null" },
      });
    const a = new Vm(config("a.out"));
    await a.boot();
    let b: Vm | null = null;
    try {
      await until("the guest to count", () => guestCounter(a) > 2000);
      await a.pause();
      const saved = guestCounter(a);
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(guestCounter(a), saved, "a paused guest does not count");
      const state = a.snapshot(dir);
      await a.shutdown();
      assert.equal(state.vcpus.length, 2);
      assert.ok(state.vcpus[0].msrs.some(([i]) => i === 0x10), "the TSC is saved");
      assert.ok(Object.keys(state.devices).some((k) => k.startsWith("legacy.serial")));
      assert.ok(state.virtio.some((d) => d.id === "__console"), "the virtio console is saved");

      if (onDemand) {
        // A memory file cut short is refused before anything is mapped from it (a touch would SIGBUS).
        await Deno.copyFile(`${dir}/${MEMORY_FILE}`, `${dir}/short`);
        await Deno.truncate(`${dir}/short`, 64 << 20);
        const bad = new Vm(config("bad.out"));
        const sfd = openMemory(`${dir}/short`);
        await assert.rejects(
          bad.boot({ state: JSON.parse(JSON.stringify(state)), memoryFd: sfd, onDemand, prefault: false }),
          /memory range 'ram:mem0' lies outside the memory file \(67108864 bytes\)/,
        );
        shim().kvs_close(sfd);
        await bad.shutdown();
      }
      // A fresh VM from the same config and the saved state: paused where it was.
      b = new Vm(config("b.out"));
      const event = new Promise<GuestEvent>((resolve) => b!.onGuestEvent(resolve));
      const fd = openMemory(`${dir}/${MEMORY_FILE}`);
      try {
        await b.boot({ state: JSON.parse(JSON.stringify(state)), memoryFd: fd, onDemand, prefault: false });
      } finally {
        shim().kvs_close(fd);
      }
      assert.equal(guestCounter(b), saved, "guest memory is the saved memory");
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(guestCounter(b), saved, "the restored VM waits, paused");
      await b.resume();
      await until("the restored guest to count on", () => guestCounter(b!) > saved + 2000);
      b.serialInput(new TextEncoder().encode("xyz"));
      await until("the echo", async () => (await Deno.readTextFile(`${dir}/b.out`)).includes("xyz"));
      b.serialInput(new TextEncoder().encode("q"));
      assert.equal(await event, "poweroff");
    } finally {
      await a.shutdown();
      await b?.shutdown();
      await Deno.remove(dir, { recursive: true });
    }
  });
}

const QSD = which("qemu-storage-daemon");

Deno.test({
  name: "snapshot of a VM with a vhost-user disk (qemu-storage-daemon) fails naming the device",
  ignore: ignore || QSD === null,
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-snap-vu-" });
  const sock = `${dir}/blk.sock`;
  await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1 << 20));
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(countingGuest()));
  const qsd = new Deno.Command(QSD!, {
    args: [
      "--blockdev",
      `driver=file,node-name=f,filename=${dir}/disk.img`,
      "--export",
      `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sock},writable=on`,
    ],
    stdout: "null",
    stderr: "null",
  }).spawn();
  let vm: Vm | null = null;
  try {
    assert.ok(await waitForSocket(sock), "the back-end's socket");
    vm = new Vm(VmConfigSchema.parse({
      memory: { size: 64 << 20, shared: true },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "Null" },
      console: { mode: "Off" },
      disks: [{ id: "vublk", vhost_user: true, vhost_socket: sock }],
    }));
    await vm.boot();
    await vm.pause();
    assert.throws(() => vm!.snapshot(dir), /device 'vublk' \(vhost-user\) has no save path/);
    await Deno.stat(`${dir}/${MEMORY_FILE}`).then(
      () => assert.fail("no memory file is written for a refused snapshot"),
      () => {},
    );
  } finally {
    await vm?.shutdown();
    qsd.kill("SIGKILL");
    await qsd.status;
    await Deno.remove(dir, { recursive: true });
  }
});
