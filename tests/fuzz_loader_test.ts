/**
 * Loader fuzzer: kernel images a hostile or broken build could hand dvmm, made by mutating small valid
 * ones built here (a bzImage with its setup header and an lz4, gzip or plain ELF payload; ELF vmlinux
 * images with PT_LOAD segments and a Xen PVH note; LZ4 legacy frames from a tiny encoder of our own):
 * header fields set to edge values (zero, all ones, sizes and offsets past the end, setup_sects 0 or
 * 255, huge p_memsz, overlapping segments, phnum/phoff out of the file), bytes flipped, files
 * truncated or extended. They go through
 *
 * - vmm/loader/bzimage.ts: parseBzImage, loadBzImage;
 * - vmm/loader/elf.ts: parseElf, parseNotes, loadPvhElf;
 * - vmm/loader/vmlinux_extract.ts: lz4DecompressBlock, lz4LegacyDecompress, payloadFormat, extractVmlinux;
 * - vmm/loader/payload.ts: checkPayloadFiles and loadPayload with an initramfs, from files;
 * - devices/virtio/device_blk.ts: imageFormat (the disk image probe; dvmm has no qcow2 reader).
 *
 * Reference check, against independent code: every input either loads or throws KernelLoadError with a
 * message, never any other exception; guest memory is written only where the boot protocol puts things
 * (boot data at 0x6000..0x8000, the command line at 0x20000, kernel and initramfs from 1 MiB to the end
 * of low RAM); what is loaded is where the loader says (kernel bytes, initramfs above the kernel's span,
 * 4 KiB aligned, below initrd_addr_max; PT_LOAD contents painted in order); the LZ4 decoder agrees with a
 * reference decoder written here; nothing allocates more than the input could decompress to, nothing
 * hangs.
 *
 * `make test` runs DVMM_FUZZ_LOADER (default 40000, some 10 s) episodes; `make fuzz` many more (DVMM_FUZZ_SEED
 * replays a run; a failure names the episode's seed).
 */
import assert from "node:assert/strict";
import { type Seeded, seeded } from "./helpers/seeded.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { e820, Layout, lowRamEnd, ramRegions } from "../vmm/layout.ts";
import { KernelLoadError } from "../vmm/loader/common.ts";
import { BP, type BzImageInfo, HDRS_MAGIC, loadBzImage, parseBzImage } from "../vmm/loader/bzimage.ts";
import { HVM_START_MAGIC, loadPvhElf, parseElf, parseNotes, PT_LOAD } from "../vmm/loader/elf.ts";
import {
  extractVmlinux,
  lz4DecompressBlock,
  lz4LegacyDecompress,
  payloadFormat,
} from "../vmm/loader/vmlinux_extract.ts";
import { checkPayloadFiles, loadPayload } from "../vmm/loader/payload.ts";
import { imageFormat } from "../devices/virtio/device_blk.ts";

const MiB = 1 << 20;
const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
const pick = <T>(r: Seeded, a: readonly T[]): T => a[r.below(a.length)];

function randomBytes(r: Seeded, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = r.below(256);
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Seeds: images built here

interface Seg {
  type: number;
  paddr: number;
  data: Uint8Array;
  memsz: number;
}

/** An ELF64 x86-64 executable with the given program headers (data after them) and a PVH note. */
function buildElf(segs: Seg[], entry: number, noteDesc8 = false): Uint8Array {
  const phoff = 64;
  const notes = phoff + 56 * (segs.length + 1);
  const descsz = noteDesc8 ? 8 : 4;
  const noteLen = 12 + 4 + descsz;
  let at = (notes + noteLen + 15) & ~15;
  const offs = segs.map((s) => {
    const o = at;
    at += s.data.length;
    return o;
  });
  const out = new Uint8Array(at);
  const v = dv(out);
  out.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  v.setUint16(16, 2, true);
  v.setUint16(18, 62, true);
  v.setUint32(20, 1, true);
  v.setBigUint64(24, BigInt(entry), true);
  v.setBigUint64(32, BigInt(phoff), true);
  v.setUint16(52, 64, true);
  v.setUint16(54, 56, true);
  v.setUint16(56, segs.length + 1, true);
  const ph = (i: number, type: number, off: number, addr: number, filesz: number, memsz: number) => {
    const b = phoff + 56 * i;
    v.setUint32(b, type, true);
    v.setUint32(b + 4, 7, true);
    v.setBigUint64(b + 8, BigInt(off), true);
    v.setBigUint64(b + 16, BigInt(addr) | 0xffffffff80000000n, true); // kernel-style vaddr
    v.setBigUint64(b + 24, BigInt(addr), true);
    v.setBigUint64(b + 32, BigInt(filesz), true);
    v.setBigUint64(b + 40, BigInt(memsz), true);
    v.setBigUint64(b + 48, 0x1000n, true);
  };
  segs.forEach((s, i) => {
    ph(i, s.type, offs[i], s.paddr, s.data.length, s.memsz);
    out.set(s.data, offs[i]);
  });
  ph(segs.length, 4, notes, 0, noteLen, noteLen);
  v.setUint32(notes, 4, true);
  v.setUint32(notes + 4, descsz, true);
  v.setUint32(notes + 8, 18, true);
  out.set([0x58, 0x65, 0x6e, 0], notes + 12);
  if (noteDesc8) v.setBigUint64(notes + 16, BigInt(entry), true);
  else v.setUint32(notes + 16, entry, true);
  return out;
}

function elfSeeds(r: Seeded): Uint8Array[] {
  const code = (n: number) => randomBytes(r, n);
  return [
    pvhElf(code(64)),
    buildElf([{ type: PT_LOAD, paddr: 0x100000, data: code(300), memsz: 0x3000 }], 0x100000),
    buildElf(
      [
        { type: PT_LOAD, paddr: 0x200000, data: code(500), memsz: 500 },
        { type: PT_LOAD, paddr: 0x200100, data: code(200), memsz: 0x800 }, // overlaps the first
        { type: 6, paddr: 0, data: code(16), memsz: 16 }, // PT_PHDR: ignored
        { type: PT_LOAD, paddr: 0x400000, data: new Uint8Array(0), memsz: 0x10000 }, // bss only
      ],
      0x200000,
      true,
    ),
  ];
}

/** A tiny LZ4 block encoder of our own: greedy matches (offset up to 64 back), literals otherwise. */
function lz4EncodeBlock(src: Uint8Array): Uint8Array {
  const out: number[] = [];
  const lengthBytes = (n: number) => {
    for (; n >= 255; n -= 255) out.push(255);
    out.push(n);
  };
  let anchor = 0;
  let i = 0;
  const lastLiterals = Math.max(0, src.length - 5);
  while (i < lastLiterals) {
    let best = 0;
    let bestOff = 0;
    for (let off = 1; off <= Math.min(64, i); off++) {
      let n = 0;
      while (i + n < lastLiterals && src[i + n] === src[i + n - off]) n++;
      if (n > best) [best, bestOff] = [n, off];
    }
    if (best < 4) {
      i++;
      continue;
    }
    const lit = i - anchor;
    const ml = best - 4;
    out.push((Math.min(lit, 15) << 4) | Math.min(ml, 15));
    if (lit >= 15) lengthBytes(lit - 15);
    for (let k = anchor; k < i; k++) out.push(src[k]);
    out.push(bestOff & 0xff, bestOff >> 8);
    if (ml >= 15) lengthBytes(ml - 15);
    i += best;
    anchor = i;
  }
  const lit = src.length - anchor;
  out.push(Math.min(lit, 15) << 4);
  if (lit >= 15) lengthBytes(lit - 15);
  for (let k = anchor; k < src.length; k++) out.push(src[k]);
  return Uint8Array.from(out);
}

/** An LZ4 legacy frame: magic, then each block with its size; the kernel build's size word at the end. */
function lz4LegacyFrame(data: Uint8Array, blockSize = 4096, sizeWord = true): Uint8Array {
  const parts: Uint8Array[] = [Uint8Array.from([0x02, 0x21, 0x4c, 0x18])];
  for (let at = 0; at < data.length; at += blockSize) {
    const blk = lz4EncodeBlock(data.subarray(at, at + blockSize));
    const len = new Uint8Array(4);
    dv(len).setUint32(0, blk.length, true);
    parts.push(len, blk);
  }
  if (sizeWord) {
    const n = new Uint8Array(4);
    dv(n).setUint32(0, data.length, true);
    parts.push(n);
  }
  return concat(parts);
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

async function gzip(data: Uint8Array): Promise<Uint8Array> {
  const s = new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(s).arrayBuffer());
}

/**
 * A bzImage (protocol 2.15, 64-bit entry) whose protected-mode part carries `payload` (plus the
 * decompressed size word, as the kernel build appends it) at payload_offset.
 */
function buildBzImage(payload: Uint8Array, setupSects = 4, extra = 64): Uint8Array {
  const kernelOffset = (setupSects + 1) * 512;
  const payloadOffset = 0x40;
  const kernelSize = payloadOffset + payload.length + extra;
  const out = new Uint8Array(kernelOffset + kernelSize);
  const v = dv(out);
  out[BP.setupSects] = setupSects;
  v.setUint32(BP.syssize, Math.floor(kernelSize / 16), true);
  v.setUint16(BP.bootFlag, 0xaa55, true);
  out[BP.jump] = 0xeb;
  out[BP.jump + 1] = 0x6a; // header ends at 0x26c
  v.setUint32(BP.header, HDRS_MAGIC, true);
  v.setUint16(BP.version, 0x020f, true);
  out[BP.loadflags] = 0x01;
  v.setUint32(BP.code32Start, 0x100000, true);
  v.setUint32(BP.initrdAddrMax, 0x7fffffff, true);
  v.setUint32(BP.kernelAlignment, 0x200000, true);
  out[BP.relocatableKernel] = 1;
  v.setUint16(BP.xloadflags, 0x03, true);
  v.setUint32(BP.cmdlineSize, 2047, true);
  v.setUint32(BP.payloadOffset, payloadOffset, true);
  v.setUint32(BP.payloadLength, payload.length, true);
  v.setBigUint64(BP.prefAddress, 0x1000000n, true);
  v.setUint32(BP.initSize, 0x100000, true);
  out.set(payload, kernelOffset + payloadOffset);
  return out;
}

/** The payload as the kernel build lays it out: the compressed stream, then its decompressed size. */
function withSizeWord(stream: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(stream.length + 4);
  out.set(stream);
  dv(out).setUint32(stream.length, size, true);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Mutations

/** Numbers worth trying in a header field (some relative to the image and to guest memory). */
function edgeValue(r: Seeded, len: number, wide: boolean): bigint {
  const vals: (number | bigint)[] = [
    0,
    1,
    2,
    4,
    0xff,
    0x100,
    0xfff,
    0x1000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    len,
    len - 1,
    len + 1,
    len - 4,
    0x10_0000,
    0xf_ffff,
    0xe_0000,
    0x9_fc00,
    0x6000,
    0x20000,
    0x100_0000,
    16 * MiB - 1,
    32 * MiB,
    32 * MiB - 0x1000,
    32 * MiB + 1,
    2 * MiB,
    0xc000_0000,
    r.u32(),
    r.below(0x10000),
    r.below(len + 16),
  ];
  if (wide) {
    vals.push(
      2n ** 32n,
      2n ** 53n,
      2n ** 53n + 1n,
      2n ** 63n,
      2n ** 64n - 1n,
      2n ** 64n - 0x1000n,
      (BigInt(r.u32()) << 32n) | BigInt(r.u32()),
    );
  }
  const v = BigInt(pick(r, vals));
  return v < 0n ? 0n : v;
}

function setField(b: Uint8Array, off: number, size: 1 | 2 | 4 | 8, value: bigint): void {
  if (off < 0 || off + size > b.length) return;
  const v = dv(b);
  const mask = (1n << BigInt(size * 8)) - 1n;
  const x = value & mask;
  if (size === 1) v.setUint8(off, Number(x));
  else if (size === 2) v.setUint16(off, Number(x), true);
  else if (size === 4) v.setUint32(off, Number(x), true);
  else v.setBigUint64(off, x, true);
}

/** Damage anywhere: flipped bytes, truncation, junk appended, a chunk copied elsewhere. */
function mutateBytes(r: Seeded, b: Uint8Array): Uint8Array {
  switch (r.below(6)) {
    case 0:
      return b.slice(0, r.below(b.length + 1));
    case 1: {
      const out = new Uint8Array(b.length + 1 + r.below(64));
      out.set(b);
      out.set(randomBytes(r, out.length - b.length), b.length);
      return out;
    }
    case 2: {
      const out = b.slice();
      const n = 1 + r.below(8);
      const from = r.below(out.length + 1);
      out.copyWithin(r.below(out.length + 1), from, from + n);
      return out;
    }
    default: {
      const out = b.slice();
      for (let n = 1 + r.below(4); n > 0 && out.length; n--) {
        const i = r.below(out.length);
        out[i] = pick(r, [0, 0xff, out[i] ^ (1 << r.below(8)), r.below(256)]);
      }
      return out;
    }
  }
}

/** Setup-header fields: [offset, size]. */
const BZ_FIELDS: [number, 1 | 2 | 4 | 8][] = [
  [BP.setupSects, 1],
  [BP.syssize, 4],
  [BP.jump + 1, 1],
  [BP.header, 4],
  [BP.version, 2],
  [BP.loadflags, 1],
  [BP.xloadflags, 2],
  [BP.initrdAddrMax, 4],
  [BP.kernelAlignment, 4],
  [BP.relocatableKernel, 1],
  [BP.cmdlineSize, 4],
  [BP.payloadOffset, 4],
  [BP.payloadLength, 4],
  [BP.prefAddress, 8],
  [BP.initSize, 4],
  [BP.ramdiskImage, 4],
  [BP.code32Start, 4],
];

function mutateBzImage(r: Seeded, img: Uint8Array): Uint8Array {
  let b: Uint8Array = img.slice();
  for (let n = 1 + r.below(3); n > 0; n--) {
    if (r.chance(0.7)) {
      const [off, size] = pick(r, BZ_FIELDS);
      if (off === BP.setupSects && r.chance(0.5)) b[off] = pick(r, [0, 1, 4, 255, 0x40]);
      else setField(b, off, size, edgeValue(r, b.length, size === 8));
    } else {
      b = mutateBytes(r, b);
    }
  }
  return b;
}

/** ELF header and program header fields (for phdr i). */
function elfFields(b: Uint8Array): [number, 1 | 2 | 4 | 8][] {
  const fields: [number, 1 | 2 | 4 | 8][] = [[4, 1], [5, 1], [18, 2], [24, 8], [32, 8], [54, 2], [56, 2]];
  if (b.length >= 64) {
    const phoff = Number(dv(b).getBigUint64(32, true));
    const phnum = dv(b).getUint16(56, true);
    for (let i = 0; i < Math.min(phnum, 8); i++) {
      const o = phoff + 56 * i;
      fields.push([o, 4], [o + 8, 8], [o + 24, 8], [o + 32, 8], [o + 40, 8], [o + 48, 8]);
    }
  }
  // Note header words (namesz, descsz, type) and the entry, wherever the note sits.
  const at = findNote(b);
  if (at >= 0) fields.push([at, 4], [at + 4, 4], [at + 8, 4], [at + 16, 4], [at + 16, 8]);
  return fields;
}

function findNote(b: Uint8Array): number {
  for (let i = 0; i + 16 <= b.length; i += 4) {
    if (b[i + 12] === 0x58 && b[i + 13] === 0x65 && b[i + 14] === 0x6e && b[i + 15] === 0) return i;
  }
  return -1;
}

function mutateElf(r: Seeded, img: Uint8Array): Uint8Array {
  let b: Uint8Array = img.slice();
  for (let n = 1 + r.below(3); n > 0; n--) {
    const k = r.below(10);
    if (k < 7) {
      const [off, size] = pick(r, elfFields(b));
      setField(b, off, size, edgeValue(r, b.length, size === 8));
    } else if (k === 7 && b.length >= 64) {
      // Many program headers: phnum up, or phoff pointing into the data.
      setField(b, 56, 2, BigInt(pick(r, [3, 20, 255, 0xffff])));
    } else {
      b = mutateBytes(r, b);
    }
  }
  return b;
}

function mutateLz4(r: Seeded, frame: Uint8Array): Uint8Array {
  let b: Uint8Array = frame.slice();
  for (let n = 1 + r.below(3); n > 0; n--) {
    switch (r.below(5)) {
      case 0:
        // The first block's size word.
        setField(b, 4, 4, edgeValue(r, b.length, false));
        break;
      case 1:
        // A concatenated frame, or an empty block.
        b = concat([
          b.subarray(0, 8 + r.below(Math.max(1, b.length - 8))),
          pick(r, [
            Uint8Array.from([0x02, 0x21, 0x4c, 0x18]),
            new Uint8Array(4),
          ]),
          b.subarray(8),
        ]);
        break;
      default:
        b = mutateBytes(r, b);
    }
  }
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Independent references

/** LZ4 block decoding as the format describes it: sequences of literals and a back-reference. */
function refLz4Block(src: Uint8Array, room: number): number[] | "error" {
  const out: number[] = [];
  let i = 0;
  const more = (n: number) => i + n <= src.length;
  const extend = (base: number): number | null => {
    if (base !== 15) return base;
    let n = base;
    for (;;) {
      if (!more(1)) return null;
      const b = src[i++];
      n += b;
      if (b !== 255) return n;
    }
  };
  while (i < src.length) {
    const token = src[i++];
    const lit = extend(token >> 4);
    if (lit === null || !more(lit) || out.length + lit > room) return "error";
    for (let k = 0; k < lit; k++) out.push(src[i++]);
    if (i === src.length) break;
    if (!more(2)) return "error";
    const off = src[i] + 256 * src[i + 1];
    i += 2;
    if (off < 1 || off > out.length) return "error";
    const m = extend(token & 15);
    if (m === null) return "error";
    const len = m + 4;
    if (out.length + len > room) return "error";
    for (let k = 0; k < len; k++) out.push(out[out.length - off]);
  }
  return out;
}

/** A legacy frame: blocks decoded independently, each into what room is left. */
function refLz4Legacy(src: Uint8Array): number[] | "error" {
  const v = dv(src);
  if (src.length < 4 || v.getUint32(0, true) !== 0x184c2102) return "error";
  const out: number[] = [];
  let i = 4;
  while (i + 4 <= src.length) {
    const n = v.getUint32(i, true);
    if (n === 0x184c2102) {
      i += 4;
      continue;
    }
    if (i + 4 + n > src.length) {
      if (i + 4 === src.length) break;
      return "error";
    }
    if (n === 0) break;
    const blk = refLz4Block(src.subarray(i + 4, i + 4 + n), 8 * MiB);
    if (blk === "error") return "error";
    for (const x of blk) out.push(x);
    i += 4 + n;
  }
  return out;
}

/** ELF notes: namesz, descsz, type, then the name and the desc, each padded to 4 bytes; a cut note ends. */
function refNotes(b: Uint8Array): { name: string; type: number; desc: Uint8Array }[] {
  const v = dv(b);
  const out: { name: string; type: number; desc: Uint8Array }[] = [];
  for (let p = 0; p + 12 <= b.length;) {
    const namesz = v.getUint32(p, true), descsz = v.getUint32(p + 4, true), type = v.getUint32(p + 8, true);
    const name = p + 12, desc = name + Math.ceil(namesz / 4) * 4;
    if (namesz > b.length || desc + descsz > b.length) break;
    out.push({
      name: new TextDecoder().decode(b.subarray(name, name + namesz)).replace(/\0+$/, ""),
      type,
      desc: b.subarray(desc, desc + descsz),
    });
    p = desc + Math.ceil(descsz / 4) * 4;
  }
  return out;
}

/** The program headers and PVH entry, read here field by field. */
function refElf(b: Uint8Array): { segs: Seg[]; fileszs: number[]; entry?: number } {
  const v = dv(b);
  const phoff = Number(v.getBigUint64(32, true));
  const phnum = v.getUint16(56, true);
  const phentsize = v.getUint16(54, true);
  const segs: Seg[] = [];
  const fileszs: number[] = [];
  let entry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const o = phoff + i * phentsize;
    const type = v.getUint32(o, true);
    const off = Number(v.getBigUint64(o + 8, true));
    const filesz = Number(v.getBigUint64(o + 32, true));
    segs.push({
      type,
      paddr: Number(v.getBigUint64(o + 24, true)),
      data: b.subarray(off, off + filesz),
      memsz: Number(v.getBigUint64(o + 40, true)),
    });
    fileszs.push(filesz);
    if (type !== 4) continue;
    for (const n of refNotes(b.subarray(off, off + filesz))) {
      if (n.name === "Xen" && n.type === 18 && n.desc.length >= 4) {
        const d = dv(n.desc);
        entry = n.desc.length >= 8 ? Number(d.getBigUint64(0, true) & 0xffff_ffffn) : d.getUint32(0, true);
      }
    }
  }
  return { segs, fileszs, entry };
}

// ---------------------------------------------------------------------------------------------------
// Guest memory that records where it is written

class RecordingMemory extends GuestMemory {
  writes: [number, number][] = [];
  static of(size: number): RecordingMemory {
    return new RecordingMemory(
      ramRegions(size).map((l) => ({ gpa: l.gpa, bytes: new Uint8Array(l.size), hostAddr: 0n })),
    );
  }
  override write(gpa: number, data: Uint8Array): void {
    this.writes.push([gpa, data.length]);
    super.write(gpa, data);
  }
  override fill(gpa: number, len: number, value = 0): void {
    this.writes.push([gpa, len]);
    super.fill(gpa, len, value);
  }
  override writeU8(gpa: number, v: number): void {
    this.writes.push([gpa, 1]);
    super.writeU8(gpa, v);
  }
  override writeU16(gpa: number, v: number): void {
    this.writes.push([gpa, 2]);
    super.writeU16(gpa, v);
  }
  override writeU32(gpa: number, v: number): void {
    this.writes.push([gpa, 4]);
    super.writeU32(gpa, v);
  }
  override writeU64(gpa: number, v: number | bigint): void {
    this.writes.push([gpa, 8]);
    super.writeU64(gpa, v);
  }
}

/** Where the boot protocols put things: boot data, the command line, kernel and initramfs. */
function outsideBootAreas(mem: RecordingMemory): [number, number] | null {
  const low = lowRamEnd(mem.size);
  const areas = [[0x6000, 0x8000], [Layout.cmdlineAddr, Layout.cmdlineAddr + Layout.cmdlineMax], [
    Layout.highMemStart,
    low,
  ]];
  for (const [gpa, len] of mem.writes) {
    if (len === 0) continue;
    if (!areas.some(([a, b]) => gpa >= a && gpa + len <= b)) return [gpa, len];
  }
  return null;
}

// ---------------------------------------------------------------------------------------------------
// Allocation watch: every Uint8Array made while the loaders run is measured (decompressors must not
// allocate from a size the image claims).

let biggestAlloc = 0;
const RealUint8Array = Uint8Array;
const WatchedUint8Array: typeof Uint8Array = new Proxy(RealUint8Array, {
  construct(target, args, newTarget): object {
    if (typeof args[0] === "number") biggestAlloc = Math.max(biggestAlloc, args[0]);
    return Reflect.construct(target, args, newTarget === WatchedUint8Array ? target : newTarget);
  },
});

/** The most a stream of `n` bytes can decompress to (LZ4 at most 255:1, plus the 8 MiB first block). */
const allocLimit = (n: number) => 2 * 256 * n + 16 * MiB;

// ---------------------------------------------------------------------------------------------------
// Episodes

class Finding extends Error {}

interface Counts {
  episodes: number;
  loaded: number;
  refused: number;
  byKind: Record<string, [number, number]>;
  /** Distinct refusal reasons (numbers blanked), per target. */
  reasons: Map<string, number>;
  slowest: { ms: number; what: string };
}

const SLOW_MS = 2000;

interface Ctx {
  r: Seeded;
  seed: number;
  c: Counts;
  mem: RecordingMemory;
  small: RecordingMemory;
  seeds: { bz: Uint8Array[]; elf: Uint8Array[]; lz4: Uint8Array[]; blocks: Uint8Array[] };
  dir: string;
  initrd: Uint8Array;
}

function fail(x: Ctx, what: string, why: string): never {
  throw new Finding(`${what} (seed ${x.seed}): ${why}`);
}

/** Runs one target; a KernelLoadError with a message is a refusal, anything else a finding. */
async function run<T>(x: Ctx, what: string, input: number, f: () => T | Promise<T>): Promise<T | null> {
  biggestAlloc = 0;
  const t0 = performance.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  let result: T | null = null;
  let ok = false;
  try {
    const p = f();
    result = p instanceof Promise
      ? await Promise.race([
        p,
        new Promise<never>((_, rej) => {
          timer = setTimeout(() => rej(new Finding(`${what} (seed ${x.seed}): no answer in 10 s`)), 10_000);
        }),
      ]).finally(() => clearTimeout(timer))
      : p;
    ok = true;
  } catch (e) {
    if (e instanceof Finding) throw e;
    if (!(e instanceof KernelLoadError) || !e.message) {
      fail(x, what, `threw ${e instanceof Error ? `${e.name}: ${e.message}\n${e.stack}` : String(e)}`);
    }
    const reason = `${what}: ${e.message.replace(/0x[0-9a-f]+|\d+/g, "N")}`.slice(0, 140);
    x.c.reasons.set(reason, (x.c.reasons.get(reason) ?? 0) + 1);
  }
  const ms = performance.now() - t0;
  if (ms > SLOW_MS) fail(x, what, `took ${ms.toFixed(0)} ms`);
  if (ms > x.c.slowest.ms) x.c.slowest = { ms, what: `${what} (seed ${x.seed})` };
  if (biggestAlloc > allocLimit(input)) {
    fail(x, what, `allocated ${biggestAlloc} bytes for an input of ${input} bytes`);
  }
  const k = (x.c.byKind[what] ??= [0, 0]);
  k[ok ? 0 : 1]++;
  if (ok) x.c.loaded++;
  else x.c.refused++;
  return result;
}

function randomCmdline(r: Seeded): string {
  switch (r.below(8)) {
    case 0:
      return "";
    case 1:
      return "x".repeat(pick(r, [2046, 2047, 2048, 0xffff, 0x10000]));
    case 2:
      return "console=ttyS0\u0000evil";
    case 3:
      return "é💥".repeat(r.below(600));
    default:
      return "console=ttyS0 panic=-1 root=/dev/vda";
  }
}

/** Sizes of initramfs to try: none, small, page edges, most or all of RAM. */
function randomInitrd(x: Ctx, mem: GuestMemory): Uint8Array | undefined {
  const r = x.r;
  if (r.chance(0.4)) return undefined;
  const n = pick(r, [0, 1, 4095, 4096, 4097, 100_000, mem.size / 2, mem.size - 0x200000, mem.size]);
  // A window of a long pattern: its contents differ from episode to episode.
  const at = r.below(0x10000);
  return x.initrd.subarray(at, at + n);
}

/** Whether the loader wrote exactly [gpa, gpa+len) in one go (memory is reused: contents alone could be stale). */
function wrote(mem: RecordingMemory, gpa: number, len: number): boolean {
  return len === 0 || mem.writes.some(([a, n]) => a === gpa && n === len);
}

function checkCmdline(x: Ctx, what: string, mem: GuestMemory, cmdline: string): void {
  const want = new TextEncoder().encode(cmdline);
  const got = mem.read(Layout.cmdlineAddr, want.length + 1);
  if (got[want.length] !== 0 || !equalBytes(got.subarray(0, want.length), want)) {
    fail(x, what, "command line not at its address");
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function checkInitrd(
  x: Ctx,
  what: string,
  mem: RecordingMemory,
  initrd: Uint8Array | undefined,
  addr: number | undefined,
  above: number,
  below: number,
): void {
  if (!initrd || initrd.length === 0) {
    if (addr !== undefined) fail(x, what, "an initramfs address without an initramfs");
    return;
  }
  if (addr === undefined) return fail(x, what, "initramfs not placed");
  if (addr % 4096 !== 0 || addr < above || addr + initrd.length > below) {
    fail(
      x,
      what,
      `initramfs at 0x${addr.toString(16)}+${initrd.length} outside [0x${above.toString(16)}, 0x${
        below.toString(16)
      })`,
    );
  }
  if (!wrote(mem, addr, initrd.length)) fail(x, what, "initramfs not written where the loader says");
  // Written last and never overlapped: whole (compared at its ends and a stride through it).
  for (
    const at of [
      0,
      initrd.length - 1,
      ...Array.from({ length: 16 }, (_, i) => (i * 7919) % initrd.length),
    ]
  ) {
    if (mem.readU8(addr + at) !== initrd[at]) fail(x, what, `initramfs byte ${at} differs`);
  }
}

async function fuzzBzImage(x: Ctx): Promise<void> {
  const r = x.r;
  const img = mutateBzImage(r, pick(r, x.seeds.bz));
  const info = await run(x, "parseBzImage", img.length, () => parseBzImage(img));
  if (info) checkBzInfo(x, img, info);
  const mem = r.chance(0.1) ? x.small : x.mem;
  mem.writes = [];
  const cmdline = randomCmdline(r);
  const initrd = randomInitrd(x, mem);
  const res = await run(
    x,
    "loadBzImage",
    img.length,
    () => loadBzImage(mem, img, { cmdline, initramfs: initrd }),
  );
  const bad = outsideBootAreas(mem);
  if (bad) fail(x, "loadBzImage", `wrote 0x${bad[0].toString(16)}+${bad[1]} outside the boot areas`);
  if (!res) return;
  const i = res.info;
  const low = lowRamEnd(mem.size);
  const span = Math.max(i.initSize, i.kernelSize);
  if (res.kernelAddr < Layout.highMemStart || res.kernelAddr + span > low) {
    fail(x, "loadBzImage", "kernel span");
  }
  if (res.entry.rip !== res.kernelAddr + 0x200 || res.entry.rsi !== Layout.zeroPageAddr) {
    fail(x, "loadBzImage", `entry ${JSON.stringify(res.entry)}`);
  }
  if (
    !wrote(mem, res.kernelAddr, i.kernelSize) ||
    !equalBytes(mem.read(res.kernelAddr, i.kernelSize), img.subarray(i.kernelOffset))
  ) {
    fail(x, "loadBzImage", "kernel bytes differ from the image");
  }
  const zp = Layout.zeroPageAddr;
  if (mem.readU8(zp + BP.typeOfLoader) !== 0xff || mem.readU32(zp + BP.cmdLinePtr) !== Layout.cmdlineAddr) {
    fail(x, "loadBzImage", "zero page fields");
  }
  if (mem.readU8(zp + BP.e820Entries) !== e820(mem.size).length) fail(x, "loadBzImage", "E820 count");
  checkCmdline(x, "loadBzImage", mem, cmdline);
  checkInitrd(
    x,
    "loadBzImage",
    mem,
    initrd,
    res.initramfsAddr,
    res.kernelAddr + span,
    Math.min(low, i.initrdAddrMax + 1),
  );
  if (res.initramfsAddr !== undefined) {
    if (
      mem.readU32(zp + BP.ramdiskImage) !== res.initramfsAddr ||
      mem.readU32(zp + BP.ramdiskSize) !== initrd!.length
    ) {
      fail(x, "loadBzImage", "ramdisk fields");
    }
  }
}

/** What parseBzImage accepted, checked against the header read here. */
function checkBzInfo(x: Ctx, img: Uint8Array, i: BzImageInfo): void {
  const v = dv(img);
  const sects = img[BP.setupSects] || 4;
  const ok = v.getUint32(BP.header, true) === HDRS_MAGIC && i.kernelOffset === (sects + 1) * 512 &&
    i.kernelOffset < img.length && i.kernelSize === img.length - i.kernelOffset &&
    i.syssize * 16 <= i.kernelSize && i.payloadOffset + i.payloadLength <= i.kernelSize &&
    i.version >= 0x020c && (i.xloadflags & 1) === 1 && (i.loadflags & 1) === 1 &&
    i.headerEnd >= 0x202 && i.headerEnd <= 0x290;
  if (!ok) fail(x, "parseBzImage", `accepted an inconsistent header: ${JSON.stringify(i)}`);
}

async function fuzzElf(x: Ctx): Promise<void> {
  const r = x.r;
  const img = mutateElf(r, pick(r, x.seeds.elf));
  const info = await run(x, "parseElf", img.length, () => parseElf(img));
  if (info) {
    const ref = refElf(img);
    if (info.segments.length !== ref.segs.length) fail(x, "parseElf", "segment count");
    info.segments.forEach((s, k) => {
      const t = ref.segs[k];
      if (s.type !== t.type || s.paddr !== t.paddr || s.memsz !== t.memsz || s.filesz !== ref.fileszs[k]) {
        fail(x, "parseElf", `segment ${k} read as ${JSON.stringify(s)}`);
      }
    });
    if (info.pvhEntry !== ref.entry) {
      fail(x, "parseElf", `PVH entry ${info.pvhEntry}, reference ${ref.entry}`);
    }
  }
  const mem = r.chance(0.1) ? x.small : x.mem;
  mem.writes = [];
  const cmdline = randomCmdline(r);
  const initrd = randomInitrd(x, mem);
  const res = await run(
    x,
    "loadPvhElf",
    img.length,
    () => loadPvhElf(mem, img, { cmdline, initramfs: initrd }),
  );
  const bad = outsideBootAreas(mem);
  if (bad) fail(x, "loadPvhElf", `wrote 0x${bad[0].toString(16)}+${bad[1]} outside the boot areas`);
  if (!res) return;
  const ref = refElf(img);
  const loads = ref.segs.filter((s) => s.type === PT_LOAD && s.memsz > 0);
  const start = Math.min(...loads.map((s) => s.paddr));
  const end = Math.max(...loads.map((s) => s.paddr + s.memsz));
  if (
    res.kernelStart !== start || res.kernelEnd !== end || start < Layout.highMemStart ||
    end > lowRamEnd(mem.size)
  ) {
    fail(x, "loadPvhElf", `kernel span 0x${res.kernelStart.toString(16)}..0x${res.kernelEnd.toString(16)}`);
  }
  if (res.entry.rip !== ref.entry || res.entry.rbx !== Layout.pvhStartInfoAddr) {
    fail(x, "loadPvhElf", "entry");
  }
  if (mem.readU32(Layout.pvhStartInfoAddr) !== HVM_START_MAGIC) fail(x, "loadPvhElf", "hvm_start_info magic");
  if (mem.readU32(Layout.pvhStartInfoAddr + 12) !== (initrd?.length ? 1 : 0)) {
    fail(x, "loadPvhElf", "nr_modules");
  }
  for (const s of loads) {
    if (!wrote(mem, s.paddr, s.data.length)) fail(x, "loadPvhElf", "a segment not written");
  }
  // The segments painted in order (later ones over earlier ones), where the span is small.
  if (end - start <= MiB) {
    const want = new Uint8Array(end - start);
    for (const s of loads) {
      want.fill(0, s.paddr - start, s.paddr - start + s.memsz);
      want.set(s.data, s.paddr - start);
    }
    if (!equalBytes(mem.read(start, end - start), want)) fail(x, "loadPvhElf", "segment contents differ");
  }
  checkCmdline(x, "loadPvhElf", mem, cmdline);
  checkInitrd(x, "loadPvhElf", mem, initrd, res.initramfsAddr, end, lowRamEnd(mem.size));
}

async function fuzzLz4(x: Ctx): Promise<void> {
  const r = x.r;
  const frame = r.chance(0.9) ? mutateLz4(r, pick(r, x.seeds.lz4)) : randomBytes(r, r.below(200));
  if (r.chance(0.3)) frame.set([0x02, 0x21, 0x4c, 0x18].slice(0, frame.length));
  // The size hint comes from the image (the word the build appends): anything up to 1 GiB.
  const hint = pick(r, [0, 1, 100, frame.length, 4096, 1 << 20, 64 << 20, 1 << 30, r.u32() % (1 << 30)]);
  const out = await run(x, "lz4LegacyDecompress", frame.length, () => lz4LegacyDecompress(frame, hint));
  const ref = refLz4Legacy(frame);
  if ((out === null) !== (ref === "error")) {
    fail(
      x,
      "lz4LegacyDecompress",
      out === null ? "refused what the reference decodes" : "decoded what the reference refuses",
    );
  }
  if (out && !equalBytes(out, RealUint8Array.from(ref as number[]))) {
    fail(x, "lz4LegacyDecompress", "output differs");
  }
}

async function fuzzLz4Block(x: Ctx): Promise<void> {
  const r = x.r;
  const src = r.chance(0.8) ? mutateBytes(r, pick(r, x.seeds.blocks)) : randomBytes(r, r.below(64));
  const size = pick(r, [0, 1, 16, 64, 1000, 5000, 70000]);
  const out = new RealUint8Array(size).fill(0xa5);
  const outPos = r.below(size + 1);
  const end = await run(x, "lz4DecompressBlock", src.length, () => lz4DecompressBlock(src, out, outPos));
  const ref = refLz4Block(src, size - outPos);
  if ((end === null) !== (ref === "error")) {
    fail(
      x,
      "lz4DecompressBlock",
      end === null ? "refused what the reference decodes" : "decoded what the reference refuses",
    );
  }
  for (let i = 0; i < outPos; i++) {
    if (out[i] !== 0xa5) fail(x, "lz4DecompressBlock", `wrote before outPos at ${i}`);
  }
  if (end === null) return;
  if (!equalBytes(out.subarray(outPos, end), RealUint8Array.from(ref as number[]))) {
    fail(x, "lz4DecompressBlock", "output differs");
  }
  for (let i = end; i < size; i++) {
    if (out[i] !== 0xa5) fail(x, "lz4DecompressBlock", `wrote past its end at ${i}`);
  }
}

/** A note segment: the seeds' notes and a few more, mutated. */
async function fuzzNotes(x: Ctx): Promise<void> {
  const r = x.r;
  const note = (name: string, type: number, desc: Uint8Array) => {
    const n = new TextEncoder().encode(name);
    const out = new RealUint8Array(12 + Math.ceil(n.length / 4) * 4 + Math.ceil(desc.length / 4) * 4);
    const v = dv(out);
    v.setUint32(0, n.length, true);
    v.setUint32(4, desc.length, true);
    v.setUint32(8, type, true);
    out.set(n, 12);
    out.set(desc, 12 + Math.ceil(n.length / 4) * 4);
    return out;
  };
  let b: Uint8Array = concat([
    note("Xen\0", 18, randomBytes(r, pick(r, [4, 8]))),
    note("GNU\0", 3, randomBytes(r, 20)),
    note("Linux\0", 6, randomBytes(r, r.below(9))),
  ].slice(0, 1 + r.below(3)));
  for (let n = r.below(4); n > 0; n--) {
    if (r.chance(0.6)) setField(b, 4 * r.below(Math.max(1, b.length >> 2)), 4, edgeValue(r, b.length, false));
    else b = mutateBytes(r, b);
  }
  const got = await run(x, "parseNotes", b.length, () => parseNotes(b));
  if (!got) return;
  const want = refNotes(b);
  const same = got.length === want.length &&
    got.every((n, i) =>
      n.name === want[i].name && n.type === want[i].type && n.desc.byteOffset === want[i].desc.byteOffset &&
      n.desc.length === want[i].desc.length
    );
  if (!same) fail(x, "parseNotes", `read ${got.length} notes, the reference ${want.length}`);
}

const FORMATS = new Set(["lz4", "gzip", "zstd", "xz", "bzip2", "lzma", "lzo", "elf", "unknown"]);

async function fuzzProbes(x: Ctx): Promise<void> {
  const r = x.r;
  const heads = [
    [0x02, 0x21, 0x4c, 0x18],
    [0x1f, 0x8b],
    [0x28, 0xb5, 0x2f, 0xfd],
    [0x7f, 0x45, 0x4c, 0x46],
    [0x51, 0x46, 0x49, 0xfb], // QFI\xfb
    [...new TextEncoder().encode("vhdxfile")],
  ];
  const b = concat([
    RealUint8Array.from(pick(r, heads)).subarray(0, r.below(9)),
    randomBytes(r, r.below(12)),
  ]);
  const fmt = await run(x, "payloadFormat", b.length, () => payloadFormat(b));
  if (fmt === null || !FORMATS.has(fmt)) fail(x, "payloadFormat", `answered ${fmt}`);
  const img = await run(x, "imageFormat", b.length, () => imageFormat(b));
  const want = b.length >= 4 && b[0] === 0x51 && b[1] === 0x46 && b[2] === 0x49 && b[3] === 0xfb
    ? "Qcow2"
    : new TextDecoder("latin1").decode(b.subarray(0, 8)) === "vhdxfile"
    ? "Vhdx"
    : "Raw";
  if (img !== want) fail(x, "imageFormat", `answered ${img} for ${Array.from(b.subarray(0, 8))}`);
}

async function fuzzExtract(x: Ctx): Promise<void> {
  const r = x.r;
  const img = mutateBzImage(r, pick(r, x.seeds.bz));
  const elf = await run(x, "extractVmlinux", img.length, () => extractVmlinux(img));
  if (elf && !(elf.length >= 4 && elf[0] === 0x7f && elf[1] === 0x45 && elf[2] === 0x4c && elf[3] === 0x46)) {
    fail(x, "extractVmlinux", "returned something that is not ELF");
  }
}

/** The file path: checkPayloadFiles, then loadPayload with the kernel and an initramfs read from files. */
async function fuzzPayload(x: Ctx): Promise<void> {
  const r = x.r;
  const kernelPath = `${x.dir}/kernel`;
  const initrdPath = `${x.dir}/initrd`;
  const img = r.chance(0.5) ? mutateBzImage(r, pick(r, x.seeds.bz)) : mutateElf(r, pick(r, x.seeds.elf));
  await Deno.writeFile(kernelPath, img);
  const mem = x.mem;
  // Small ones written; large ones (half of RAM to more than RAM) as sparse files of zeros.
  let initrd: Uint8Array | undefined;
  if (r.chance(0.7)) {
    initrd = x.initrd.subarray(0, pick(r, [1, 4096, 100_000]));
    await Deno.writeFile(initrdPath, initrd);
  } else if (r.chance(0.2)) {
    initrd = new RealUint8Array(pick(r, [mem.size / 2, mem.size - 0x200000, mem.size, mem.size + 1]));
    await Deno.writeFile(initrdPath, new RealUint8Array(0));
    await Deno.truncate(initrdPath, initrd.length);
  }
  // Now and then a path that is no image file: a directory, a device, nothing.
  const odd = () => r.chance(0.9) ? null : pick(r, [x.dir, "/dev/null", `${x.dir}/missing`]);
  const files = { kernel: odd() ?? kernelPath, initramfs: initrd ? (odd() ?? initrdPath) : undefined };
  const input = img.length + (initrd?.length ?? 0);
  await run(x, "checkPayloadFiles", input, () => checkPayloadFiles(files, mem.size));
  mem.writes = [];
  const protocol = pick(r, ["auto", "auto", "pvh", "linux64"] as const);
  const cmdline = randomCmdline(r);
  const entry = await run(
    x,
    "loadPayload",
    input,
    () => loadPayload(mem, mem.size, { ...files, cmdline, protocol }),
  );
  const bad = outsideBootAreas(mem);
  if (bad) fail(x, "loadPayload", `wrote 0x${bad[0].toString(16)}+${bad[1]} outside the boot areas`);
  if (entry && !(entry.kind === "pvh" || entry.kind === "linux64")) fail(x, "loadPayload", "entry kind");
}

const KINDS: ((x: Ctx) => Promise<void>)[] = [
  fuzzBzImage,
  fuzzBzImage,
  fuzzElf,
  fuzzElf,
  fuzzLz4,
  fuzzLz4Block,
  fuzzNotes,
  fuzzProbes,
  fuzzExtract,
];

async function makeSeeds(): Promise<Ctx["seeds"]> {
  const r = seeded(0xb007);
  const elf = elfSeeds(r);
  // A vmlinux-like ELF with repetitive contents, so the compressors have matches to find.
  const body = new RealUint8Array(6000);
  for (let i = 0; i < body.length; i++) body[i] = i % 97 < 40 ? 0x90 : (i * 13) & 0xff;
  const vmlinux = buildElf([{ type: PT_LOAD, paddr: 0x1000000, data: body, memsz: 0x2000 }], 0x1000000);
  const frame = lz4LegacyFrame(vmlinux, 4096, false);
  const blocks = [
    lz4EncodeBlock(body.subarray(0, 700)),
    lz4EncodeBlock(new TextEncoder().encode("abcabcabcabc".repeat(30))),
  ];
  // The seeds must be valid: decoded by the loader's decoder and by the reference.
  assert.deepEqual(lz4LegacyDecompress(frame), vmlinux);
  assert.deepEqual(refLz4Legacy(frame), Array.from(vmlinux));
  const bz = [
    buildBzImage(withSizeWord(frame, vmlinux.length)),
    buildBzImage(withSizeWord(await gzip(vmlinux), vmlinux.length), 1),
    buildBzImage(vmlinux, 0x1f),
  ];
  for (const b of bz) assert.deepEqual(await extractVmlinux(b), vmlinux);
  return { bz, elf, lz4: [frame, lz4LegacyFrame(vmlinux, 1000, true)], blocks };
}

export async function fuzzLoaders(seed: number, episodes: number, kinds = KINDS): Promise<Counts> {
  const c: Counts = {
    episodes: 0,
    loaded: 0,
    refused: 0,
    byKind: {},
    reasons: new Map(),
    slowest: { ms: 0, what: "" },
  };
  const seeds = await makeSeeds();
  const mem = RecordingMemory.of(32 * MiB);
  const small = RecordingMemory.of(2 * MiB);
  const initrd = new RealUint8Array(mem.size + 0x10000);
  for (let i = 0; i < initrd.length; i++) initrd[i] = Math.imul(i, 0x9e3779b1) >>> 24;
  const dir = await Deno.makeTempDir({ prefix: "dvmm-fuzz-loader-" });
  const g = globalThis as { Uint8Array: typeof Uint8Array };
  g.Uint8Array = WatchedUint8Array;
  try {
    for (let e = 0; e < episodes; e++) {
      const s = seed + e;
      const x: Ctx = { r: seeded(s), seed: s, c, mem, small, seeds, dir, initrd };
      // The file path is slower (two files per episode): one episode in 16.
      await (e % 16 === 15 && kinds === KINDS ? fuzzPayload : kinds[e % kinds.length])(x);
      c.episodes++;
    }
  } finally {
    g.Uint8Array = RealUint8Array;
    await Deno.remove(dir, { recursive: true });
  }
  return c;
}

Deno.test("fuzz: kernel loaders and decompressors load or refuse with KernelLoadError, writing only where they should", async () => {
  const episodes = Number(Deno.env.get("DVMM_FUZZ_LOADER") ?? 40000);
  const seed = Number(Deno.env.get("DVMM_FUZZ_SEED") ?? 0x5eed);
  const t0 = performance.now();
  const c = await fuzzLoaders(seed, episodes);
  console.log(
    `loader fuzzer: ${c.episodes} episodes (seed ${seed}), ${c.loaded} loaded, ${c.refused} refused, ` +
      `${((performance.now() - t0) / 1000).toFixed(1)} s; ` +
      Object.entries(c.byKind).map(([k, [a, f]]) => `${k} ${a}/${a + f}`).join(" ") +
      `; ${c.reasons.size} distinct refusals; slowest ${c.slowest.ms.toFixed(1)} ms (${c.slowest.what})`,
  );
  assert.equal(c.episodes, episodes);
});

Deno.test("fuzz: the loader reference check catches a loader writing outside the boot areas", async () => {
  // A wrong loader: the ELF path also scribbles over the ACPI area below 1 MiB.
  const careless = async (x: Ctx) => {
    const img = pick(x.r, x.seeds.elf);
    x.mem.writes = [];
    await run(x, "careless", img.length, () => {
      loadPvhElf(x.mem, img, {});
      x.mem.fill(Layout.rsdpAddr, 16, 0);
    });
    const bad = outsideBootAreas(x.mem);
    if (bad) fail(x, "careless", `wrote 0x${bad[0].toString(16)}+${bad[1]} outside the boot areas`);
  };
  await assert.rejects(() => fuzzLoaders(1, 3, [careless]), /wrote 0xe0000\+16 outside the boot areas/);
});

Deno.test("fuzz: the loader reference check catches a decompressor allocating what the image claims", async () => {
  // A wrong decompressor: it trusts the size word at the end of the frame (as lz4LegacyDecompress once did).
  const trusting = async (x: Ctx) => {
    const frame = pick(x.r, x.seeds.lz4);
    await run(
      x,
      "trusting",
      frame.length,
      () => new Uint8Array(dv(frame).getUint32(frame.length - 4, true) << 10),
    );
  };
  await assert.rejects(() => fuzzLoaders(1, 4, [trusting]), /trusting \(seed \d+\): allocated \d+ bytes/);
});
