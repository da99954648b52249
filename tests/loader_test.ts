import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import {
  e820,
  E820_RAM,
  E820_RESERVED,
  hotplugRegion,
  Layout,
  lowRamEnd,
  mmio64Window,
  ramEnd,
  ramRegions,
} from "../vmm/layout.ts";
import { BP, CAN_USE_HEAP, loadBzImage, LOADED_HIGH, parseBzImage } from "../vmm/loader/bzimage.ts";
import { KernelLoadError } from "../vmm/loader/common.ts";
import { HVM_START_MAGIC, loadPvhElf, parseElf, XEN_ELFNOTE_PHYS32_ENTRY } from "../vmm/loader/elf.ts";
import {
  extractVmlinux,
  lz4DecompressBlock,
  lz4LegacyDecompress,
  payloadFormat,
} from "../vmm/loader/vmlinux_extract.ts";
import { loadPayload } from "../vmm/loader/payload.ts";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** The newest Debian kernel/initrd pair in /boot (the Makefile installs linux-image-cloud-amd64). */
function findBoot(): { kernel: string; initrd?: string } | null {
  try {
    const names = [...Deno.readDirSync("/boot")].map((e) => e.name).filter((n) => n.startsWith("vmlinuz-"))
      .sort();
    if (names.length === 0) return null;
    const k = names[names.length - 1];
    const initrd = "initrd.img-" + k.slice("vmlinuz-".length);
    let hasInitrd = false;
    try {
      hasInitrd = Deno.statSync(`/boot/${initrd}`).isFile;
    } catch { /* none */ }
    return { kernel: `/boot/${k}`, initrd: hasInitrd ? `/boot/${initrd}` : undefined };
  } catch {
    return null;
  }
}

const boot = findBoot();
const noKernel = boot === null;
if (noKernel) console.warn("loader_test: no /boot/vmlinuz-* on this machine; real-kernel tests are skipped");
let kernelCache: Uint8Array | undefined;
function kernel(): Uint8Array {
  return kernelCache ??= Deno.readFileSync(boot!.kernel);
}

function memOf(size: number): GuestMemory {
  return GuestMemory.fromBuffers(ramRegions(size));
}

function assertLoadError(fn: () => unknown, re: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof KernelLoadError, `expected KernelLoadError, got ${e}`);
    assert.match((e as Error).message, re);
    return true;
  });
}

// ---- layout ----

Deno.test("layout: RAM regions and E820 below and above the hole", () => {
  assert.deepEqual(ramRegions(512 * MiB), [{ gpa: 0, size: 512 * MiB }]);
  assert.deepEqual(ramRegions(6 * GiB), [{ gpa: 0, size: 3 * GiB }, { gpa: 4 * GiB, size: 3 * GiB }]);
  assert.equal(lowRamEnd(6 * GiB), 3 * GiB);
  assert.equal(ramEnd(6 * GiB), 7 * GiB);
  assert.deepEqual(mmio64Window(512 * MiB).start, 4 * GiB);
  assert.deepEqual(mmio64Window(6 * GiB).start, 7 * GiB);
  // memory.hotplug_size keeps address space after RAM; the 64-bit window goes after it.
  assert.deepEqual(hotplugRegion(512 * MiB, 2 * GiB), { start: 4 * GiB, size: 2 * GiB });
  assert.deepEqual(mmio64Window(512 * MiB, 2 * GiB).start, 6 * GiB);
  assert.deepEqual(mmio64Window(6 * GiB, 1536 * MiB).start, 9 * GiB);
  assert.throws(() => ramRegions(1000), RangeError);

  const m = e820(6 * GiB);
  assert.deepEqual(m, [
    { addr: 0, size: 0x9fc00, type: E820_RAM },
    { addr: 0x9fc00, size: 0x100000 - 0x9fc00, type: E820_RESERVED },
    { addr: 0x100000, size: 3 * GiB - 0x100000, type: E820_RAM },
    { addr: Layout.pciEcamStart, size: Layout.pciEcamSize, type: E820_RESERVED },
    { addr: 4 * GiB, size: 3 * GiB, type: E820_RAM },
  ]);
  for (let i = 1; i < m.length; i++) {
    assert.ok(m[i - 1].addr + m[i - 1].size <= m[i].addr, "sorted, disjoint");
  }
  // Fixed boot structures are in usable low RAM and do not overlap.
  const fixed: [number, number][] = [
    [Layout.gdtAddr, Layout.gdtEntries * 8],
    [Layout.idtAddr, 8],
    [Layout.pvhStartInfoAddr, 56],
    [Layout.pvhModlistAddr, 32],
    [Layout.pvhMemmapAddr, Layout.pvhMemmapMax * 24],
    [Layout.zeroPageAddr, 4096],
    [Layout.pml4Addr, 4096],
    [Layout.pdptAddr, 4096],
    [Layout.pdAddr, Layout.pdCount * 4096],
    [Layout.cmdlineAddr, Layout.cmdlineMax],
  ];
  fixed.sort((a, b) => a[0] - b[0]);
  for (let i = 0; i < fixed.length; i++) {
    const [a, n] = fixed[i];
    assert.ok(a + n <= Layout.ebdaStart);
    if (i > 0) assert.ok(fixed[i - 1][0] + fixed[i - 1][1] <= a, `overlap at 0x${a.toString(16)}`);
  }
  assert.ok(Layout.bootStackTop < Layout.pml4Addr && Layout.bootStackTop > Layout.zeroPageAddr + 4096);
});

// ---- bzImage ----

Deno.test({
  name: "bzImage: header of the Debian kernel",
  ignore: noKernel,
  fn() {
    const img = kernel();
    const info = parseBzImage(img);
    assert.ok(info.version >= 0x020c, `protocol ${info.version.toString(16)}`);
    assert.ok(info.xloadflags & 1, "XLF_KERNEL_64");
    assert.equal(info.kernelOffset, (img[0x1f1] + 1) * 512);
    assert.equal(info.kernelSize, img.length - info.kernelOffset);
    assert.ok(info.syssize * 16 <= info.kernelSize);
    assert.ok(info.relocatable);
    assert.ok(info.prefAddress >= MiB && info.prefAddress % info.kernelAlignment === 0);
    assert.ok(info.initSize > info.kernelSize);
    assert.ok(info.cmdlineSize >= 255);
    assert.equal(info.headerEnd, 0x202 + img[0x201]);
    const payload = img.subarray(info.kernelOffset + info.payloadOffset);
    assert.equal(payloadFormat(payload), "lz4"); // Debian builds with CONFIG_KERNEL_LZ4
  },
});

Deno.test({
  name: "bzImage: load builds the zero page, cmdline, initramfs, E820 and entry state",
  ignore: noKernel,
  fn() {
    const img = kernel();
    const size = 512 * MiB;
    const mem = memOf(size);
    const initrd = new Uint8Array(3 * MiB + 123);
    for (let i = 0; i < initrd.length; i++) initrd[i] = (i * 7) & 0xff;
    const cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda";
    const r = loadBzImage(mem, img, { cmdline, initramfs: initrd });
    const info = r.info;
    const zp = Layout.zeroPageAddr;

    // Entry state.
    assert.deepEqual(r.entry, { kind: "linux64", rip: info.prefAddress + 0x200, rsi: zp });
    assert.equal(r.kernelAddr, info.prefAddress);
    // Protected-mode kernel copied verbatim.
    assert.deepEqual(mem.read(r.kernelAddr, 4096), img.subarray(info.kernelOffset, info.kernelOffset + 4096));
    const tail = img.length - info.kernelOffset;
    assert.deepEqual(mem.read(r.kernelAddr + tail - 64, 64), img.subarray(img.length - 64));

    // Setup header copied, our fields set.
    assert.equal(mem.readU32(zp + 0x202), 0x53726448);
    assert.equal(mem.readU16(zp + BP.version), info.version);
    assert.equal(mem.readU8(zp + BP.setupSects), img[0x1f1]);
    assert.equal(mem.readU32(zp + BP.initSize), info.initSize);
    assert.equal(mem.readU8(zp + BP.typeOfLoader), 0xff);
    const lf = mem.readU8(zp + BP.loadflags);
    assert.equal(lf & (LOADED_HIGH | CAN_USE_HEAP), LOADED_HIGH | CAN_USE_HEAP);
    assert.equal(mem.readU16(zp + BP.heapEndPtr), 0xfe00);
    assert.equal(mem.readU8(0x1ef + zp), 0, "sentinel stays 0");

    // Command line.
    assert.equal(mem.readU32(zp + BP.cmdLinePtr), Layout.cmdlineAddr);
    assert.equal(mem.readU32(zp + BP.extCmdLinePtr), 0);
    const cl = mem.read(Layout.cmdlineAddr, cmdline.length + 1);
    assert.equal(new TextDecoder().decode(cl.subarray(0, cmdline.length)), cmdline);
    assert.equal(cl[cmdline.length], 0);

    // initramfs: high, 4K-aligned, within initrd_addr_max and low RAM, above the kernel's init span.
    const ia = mem.readU32(zp + BP.ramdiskImage);
    assert.equal(ia, r.initramfsAddr);
    assert.equal(mem.readU32(zp + BP.ramdiskSize), initrd.length);
    assert.equal(mem.readU32(zp + BP.extRamdiskImage), 0);
    assert.equal(ia % 4096, 0);
    assert.ok(ia + initrd.length <= Math.min(size, info.initrdAddrMax + 1));
    assert.ok(size - (ia + initrd.length) < 4096, "as high as possible");
    assert.ok(ia >= r.kernelAddr + info.initSize);
    assert.deepEqual(mem.read(ia, initrd.length), initrd);

    // RSDP pointer (protocol >= 2.14).
    if (info.version >= 0x020e) assert.equal(mem.readU64(zp + BP.acpiRsdpAddr), Layout.rsdpAddr);

    // E820.
    const map = e820(size);
    assert.equal(mem.readU8(zp + BP.e820Entries), map.length);
    map.forEach((e, i) => {
      const at = zp + BP.e820Table + 20 * i;
      assert.deepEqual(
        { addr: mem.readU64(at), size: mem.readU64(at + 8), type: mem.readU32(at + 16) },
        e,
      );
    });
  },
});

Deno.test({
  name: "bzImage: clear errors for bad images and options",
  ignore: noKernel,
  fn() {
    const img = kernel();
    const mem = memOf(256 * MiB);
    assertLoadError(() => parseBzImage(img.subarray(0, 100)), /too short/);
    const bad = img.slice(0, 0x10000);
    bad[0x202] = 0x58;
    assertLoadError(() => parseBzImage(bad), /HdrS/);
    const old = img.slice(0, 0x10000);
    old[0x206] = 0x0b; // 2.11
    assertLoadError(() => parseBzImage(old), /2\.11 is too old/);
    const no64 = img.slice(0, 0x10000);
    no64[0x236] &= ~1;
    assertLoadError(() => parseBzImage(no64), /XLF_KERNEL_64/);
    assertLoadError(() => parseBzImage(img.subarray(0, img.length >> 1)), /truncated/);
    const info = parseBzImage(img);
    assertLoadError(
      () => loadBzImage(mem, img, { cmdline: "x".repeat(info.cmdlineSize + 1) }),
      /command line/,
    );
    assertLoadError(
      () => loadBzImage(mem, img, { initramfs: new Uint8Array(250 * MiB) }),
      /initramfs of \d+ bytes does not fit/,
    );
    assertLoadError(() => loadBzImage(memOf(32 * MiB), img), /guest memory too small/);
    // Not a kernel at all.
    assertLoadError(() => parseBzImage(new Uint8Array(8192)), /HdrS/);
  },
});

// ---- LZ4 ----

Deno.test("lz4: block decoding, overlapping matches, long lengths, corrupt input", () => {
  const enc = (s: string) => new TextEncoder().encode(s);
  // "abc" + match(offset 3, length 6) + final literal "x".
  const blk = Uint8Array.from([0x32, ...enc("abc"), 3, 0, 0x10, ...enc("x")]);
  const out = new Uint8Array(64);
  const n = lz4DecompressBlock(blk, out);
  assert.equal(new TextDecoder().decode(out.subarray(0, n)), "abcabcabcx");
  // Run-length: "a" + match(offset 1, length 4+15+10 = 29) then "b".
  const rle = Uint8Array.from([0x1f, 0x61, 1, 0, 10, 0x10, 0x62]);
  const n2 = lz4DecompressBlock(rle, out);
  assert.equal(new TextDecoder().decode(out.subarray(0, n2)), "a".repeat(30) + "b");
  // Literal length 15 + 255 + 3 = 273.
  const lits = new Uint8Array(273).fill(0x71);
  const long = Uint8Array.from([0xf0, 255, 3, ...lits]);
  const big = new Uint8Array(300);
  assert.equal(lz4DecompressBlock(long, big), 273);
  // Corrupt: offset before the start, literals past the end, output overflow.
  assertLoadError(() => lz4DecompressBlock(Uint8Array.from([0x10, 0x61, 5, 0]), out), /offset/);
  assertLoadError(() => lz4DecompressBlock(Uint8Array.from([0x50, 0x61]), out), /past the input/);
  assertLoadError(() => lz4DecompressBlock(long, new Uint8Array(10)), /larger than expected/);
  // Legacy frame: magic, block size, block, trailing size word.
  const frame = Uint8Array.from([0x02, 0x21, 0x4c, 0x18, blk.length, 0, 0, 0, ...blk, 10, 0, 0, 0]);
  assert.equal(new TextDecoder().decode(lz4LegacyDecompress(frame, 10)), "abcabcabcx");
  assert.equal(new TextDecoder().decode(lz4LegacyDecompress(frame)), "abcabcabcx");
  assertLoadError(() => lz4LegacyDecompress(enc("nope")), /magic/);
});

// ---- ELF / PVH ----

/** A minimal ELF64 x86-64 image: one PT_LOAD at `paddr`, optionally a PT_NOTE with notes. */
function makeElf(paddr: number, code: Uint8Array, notes?: Uint8Array): Uint8Array {
  const phnum = notes ? 2 : 1;
  const phoff = 64;
  const dataOff = phoff + 56 * phnum;
  const noteOff = dataOff + code.length;
  const total = noteOff + (notes?.length ?? 0);
  const b = new Uint8Array(total);
  const v = new DataView(b.buffer);
  b.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  v.setUint16(16, 2, true); // ET_EXEC
  v.setUint16(18, 62, true);
  v.setUint32(20, 1, true);
  v.setBigUint64(24, BigInt(paddr), true);
  v.setBigUint64(32, BigInt(phoff), true);
  v.setUint16(52, 64, true);
  v.setUint16(54, 56, true);
  v.setUint16(56, phnum, true);
  const ph = (i: number, type: number, off: number, addr: number, filesz: number, memsz: number) => {
    const o = phoff + 56 * i;
    v.setUint32(o, type, true);
    v.setUint32(o + 4, 5, true);
    v.setBigUint64(o + 8, BigInt(off), true);
    v.setBigUint64(o + 16, BigInt(addr), true);
    v.setBigUint64(o + 24, BigInt(addr), true);
    v.setBigUint64(o + 32, BigInt(filesz), true);
    v.setBigUint64(o + 40, BigInt(memsz), true);
    v.setBigUint64(o + 48, 0x1000n, true);
  };
  ph(0, 1, dataOff, paddr, code.length, code.length + 0x1000);
  b.set(code, dataOff);
  if (notes) {
    ph(1, 4, noteOff, 0, notes.length, notes.length);
    b.set(notes, noteOff);
  }
  return b;
}

function xenNote(type: number, desc: Uint8Array): Uint8Array {
  const b = new Uint8Array(12 + 4 + ((desc.length + 3) & ~3));
  const v = new DataView(b.buffer);
  v.setUint32(0, 4, true);
  v.setUint32(4, desc.length, true);
  v.setUint32(8, type, true);
  b.set([0x58, 0x65, 0x6e, 0], 12);
  b.set(desc, 16);
  return b;
}

Deno.test("elf: synthetic PVH image loads segments, zero-fills bss, writes hvm_start_info", () => {
  const mem = memOf(64 * MiB);
  const code = new Uint8Array(100).fill(0x90);
  const entry = new Uint8Array(8);
  new DataView(entry.buffer).setUint32(0, 0x200040, true);
  const elf = makeElf(0x200000, code, xenNote(XEN_ELFNOTE_PHYS32_ENTRY, entry));
  mem.fill(0x200000 + 100, 0x1000, 0xaa);
  const initrd = new Uint8Array(8192).fill(0x42);
  const r = loadPvhElf(mem, elf, { cmdline: "console=hvc0", initramfs: initrd, rsdpAddr: 0xe0000 });
  assert.deepEqual(r.entry, { kind: "pvh", rip: 0x200040, rbx: Layout.pvhStartInfoAddr });
  assert.deepEqual(mem.read(0x200000, 100), code);
  assert.ok(mem.read(0x200000 + 100, 0x1000).every((x) => x === 0), "bss zeroed");
  const si = Layout.pvhStartInfoAddr;
  assert.equal(mem.readU32(si), HVM_START_MAGIC);
  assert.equal(mem.readU32(si + 4), 1);
  assert.equal(mem.readU32(si + 12), 1);
  assert.equal(mem.readU64(si + 16), Layout.pvhModlistAddr);
  assert.equal(mem.readU64(si + 24), Layout.cmdlineAddr);
  assert.equal(mem.readU64(si + 32), 0xe0000);
  assert.equal(mem.readU64(si + 40), Layout.pvhMemmapAddr);
  const map = e820(64 * MiB);
  assert.equal(mem.readU32(si + 48), map.length);
  map.forEach((e, i) => {
    const at = Layout.pvhMemmapAddr + 24 * i;
    assert.deepEqual({ addr: mem.readU64(at), size: mem.readU64(at + 8), type: mem.readU32(at + 16) }, e);
  });
  const ia = mem.readU64(Layout.pvhModlistAddr);
  assert.equal(ia, r.initramfsAddr);
  assert.equal(mem.readU64(Layout.pvhModlistAddr + 8), initrd.length);
  assert.equal(ia % 4096, 0);
  assert.deepEqual(mem.read(ia, initrd.length), initrd);
  assert.equal(new TextDecoder().decode(mem.read(Layout.cmdlineAddr, 12)), "console=hvc0");
  assert.equal(mem.readU8(Layout.cmdlineAddr + 12), 0);
});

Deno.test("elf: errors for missing PVH note, bad images, segments outside RAM", () => {
  const mem = memOf(16 * MiB);
  const code = new Uint8Array(16);
  assertLoadError(() => loadPvhElf(mem, makeElf(0x200000, code)), /no PVH entry/);
  const other = xenNote(5, new Uint8Array(8)); // XEN_ELFNOTE_XEN_VERSION-like, not the entry
  assertLoadError(() => loadPvhElf(mem, makeElf(0x200000, code, other)), /no PVH entry/);
  assertLoadError(() => parseElf(new Uint8Array(10)), /too short/);
  assertLoadError(() => parseElf(new Uint8Array(64)), /bad magic/);
  const e32 = makeElf(0x200000, code);
  e32[4] = 1;
  assertLoadError(() => parseElf(e32), /64-bit/);
  const entry = xenNote(XEN_ELFNOTE_PHYS32_ENTRY, new Uint8Array(4));
  assertLoadError(() => loadPvhElf(mem, makeElf(0x2000000, code, entry)), /does not fit in guest RAM/);
  assertLoadError(() => loadPvhElf(mem, makeElf(0x1000, code, entry)), /below 1 MiB/);
  const trunc = makeElf(0x200000, code, entry);
  assertLoadError(() => parseElf(trunc.subarray(0, 100)), /truncated/);
});

Deno.test({
  name: "vmlinux: extract the PVH ELF from the Debian bzImage and load it",
  ignore: noKernel,
  async fn() {
    const img = kernel();
    const elf = await extractVmlinux(img);
    assert.deepEqual([...elf.subarray(0, 6)], [0x7f, 0x45, 0x4c, 0x46, 2, 1]);
    const info = parseElf(elf);
    assert.ok(info.pvhEntry !== undefined, "PVH note present (CONFIG_PVH=y)");
    assert.ok(info.notes.some((n) => n.name === "Xen" && n.type === XEN_ELFNOTE_PHYS32_ENTRY));
    const loads = info.segments.filter((s) => s.type === 1);
    assert.ok(loads.length >= 1);
    const lo = Math.min(...loads.map((s) => s.paddr));
    const hi = Math.max(...loads.map((s) => s.paddr + s.memsz));
    assert.ok(info.pvhEntry! >= lo && info.pvhEntry! < hi, "entry inside the kernel");

    const mem = memOf(512 * MiB);
    const initrd = boot!.initrd ? Deno.readFileSync(boot!.initrd) : new Uint8Array(4096);
    const r = loadPvhElf(mem, elf, { cmdline: "console=ttyS0", initramfs: initrd });
    assert.equal(r.entry.rip, info.pvhEntry);
    assert.equal(r.kernelStart, lo);
    assert.equal(r.kernelEnd, hi);
    assert.ok(r.initramfsAddr! >= hi);
    const first = loads[0];
    assert.deepEqual(mem.read(first.paddr, 256), elf.subarray(first.offset, first.offset + 256));
    assert.equal(mem.readU32(Layout.pvhStartInfoAddr), HVM_START_MAGIC);
  },
});

Deno.test({
  name: "vmlinux: gzip payloads (synthetic bzImage) and unsupported formats",
  ignore: noKernel,
  async fn() {
    const real = kernel();
    const info = parseBzImage(real);
    const elf = makeElf(0x1000000, new Uint8Array(64).fill(0xcc));
    const gz = new Uint8Array(
      await new Response(
        new Blob([elf as Uint8Array<ArrayBuffer>]).stream().pipeThrough(new CompressionStream("gzip")),
      ).arrayBuffer(),
    );
    const mk = (payload: Uint8Array) => {
      const withSize = new Uint8Array(payload.length + 4);
      withSize.set(payload);
      new DataView(withSize.buffer).setUint32(payload.length, elf.length, true);
      const img = new Uint8Array(info.kernelOffset + 0x100 + withSize.length);
      img.set(real.subarray(0, info.kernelOffset));
      img.set(withSize, info.kernelOffset + 0x100);
      const v = new DataView(img.buffer);
      v.setUint32(BP.payloadOffset, 0x100, true);
      v.setUint32(BP.payloadLength, withSize.length, true);
      v.setUint32(BP.syssize, Math.floor((img.length - info.kernelOffset) / 16), true);
      return img;
    };
    assert.deepEqual(await extractVmlinux(mk(gz)), elf);
    const xz = Uint8Array.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0, 1, 2, 3, 4]);
    await assert.rejects(() => extractVmlinux(mk(xz)), /xz-compressed/);
  },
});

Deno.test({
  name: "payload: loadPayload picks linux64 for a bzImage, PVH on request, reports missing files",
  ignore: noKernel,
  async fn() {
    const size = 512 * MiB;
    const e1 = await loadPayload(memOf(size), size, {
      kernel: boot!.kernel,
      initramfs: boot!.initrd,
      cmdline: "quiet",
    });
    assert.equal(e1.kind, "linux64");
    const e2 = await loadPayload(memOf(size), size, {
      kernel: boot!.kernel,
      cmdline: "quiet",
      protocol: "pvh",
    });
    assert.equal(e2.kind, "pvh");
    await assert.rejects(
      () => loadPayload(memOf(size), size, { kernel: "/nonexistent/vmlinuz" }),
      (e: unknown) => e instanceof KernelLoadError && /cannot read kernel .*no such file/.test(e.message),
    );
  },
});
