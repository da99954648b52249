/**
 * Extracts the ELF vmlinux carried, compressed, inside a bzImage (setup header payload_offset /
 * payload_length). Supported: LZ4 legacy frames (our own decompressor), gzip (DecompressionStream).
 * Other formats produce a KernelLoadError naming the format.
 */

import { parseBzImage } from "./bzimage.ts";
import { KernelLoadError } from "./common.ts";

const LZ4_LEGACY_MAGIC = 0x184c2102;
/** Largest decompressed size of one legacy-frame block (8 MiB). */
const LZ4_LEGACY_BLOCK = 8 << 20;
/** Largest vmlinux we decompress (real ones are tens of MiB): a payload that expands further is refused. */
const MAX_VMLINUX_BYTES = 1 << 30;

/**
 * Decompresses one LZ4 block into `out` starting at `outPos`; returns the new output position.
 * Throws KernelLoadError on malformed input or when the output would overflow `out`.
 */
export function lz4DecompressBlock(src: Uint8Array, out: Uint8Array, outPos = 0): number {
  const bad = (why: string): never => {
    throw new KernelLoadError(`corrupt LZ4 data: ${why}`);
  };
  let ip = 0;
  let op = outPos;
  const end = src.length;
  while (ip < end) {
    const token = src[ip++];
    // Literals.
    let litLen = token >>> 4;
    if (litLen === 15) {
      let b: number;
      do {
        if (ip >= end) bad("literal length runs past the input");
        b = src[ip++];
        litLen += b;
      } while (b === 255);
    }
    if (ip + litLen > end) bad("literals run past the input");
    if (op + litLen > out.length) bad("output larger than expected");
    out.set(src.subarray(ip, ip + litLen), op);
    ip += litLen;
    op += litLen;
    if (ip >= end) break; // the last sequence has literals only
    // Match.
    if (ip + 2 > end) bad("truncated match offset");
    const offset = src[ip] | (src[ip + 1] << 8);
    ip += 2;
    if (offset === 0 || offset > op - outPos) bad("match offset points before the block");
    let matchLen = (token & 15) + 4;
    if ((token & 15) === 15) {
      let b: number;
      do {
        if (ip >= end) bad("match length runs past the input");
        b = src[ip++];
        matchLen += b;
      } while (b === 255);
    }
    if (op + matchLen > out.length) bad("output larger than expected");
    let from = op - offset;
    if (offset >= matchLen) {
      out.copyWithin(op, from, from + matchLen);
      op += matchLen;
    } else {
      // Overlapping copy (repeating pattern): byte by byte.
      for (let k = 0; k < matchLen; k++) out[op++] = out[from++];
    }
  }
  return op;
}

/**
 * Decompresses an LZ4 legacy frame stream (magic 0x184C2102, then blocks each prefixed by their
 * compressed size). `sizeHint` preallocates the output (the kernel appends the decompressed size as a
 * trailing little-endian u32, which is also tolerated and skipped here).
 */
export function lz4LegacyDecompress(src: Uint8Array, sizeHint = 0): Uint8Array {
  const v = new DataView(src.buffer, src.byteOffset, src.byteLength);
  if (src.length < 4 || v.getUint32(0, true) !== LZ4_LEGACY_MAGIC) {
    throw new KernelLoadError("not an LZ4 legacy frame (magic 0x184C2102 missing)");
  }
  // The hint is the image's own word: never allocate more than the input can decompress to (LZ4 expands
  // at most 255:1), nor more than the largest vmlinux.
  const hint = Math.min(sizeHint, 255 * src.length);
  let out = new Uint8Array(
    Math.min(hint > 0 ? hint : Math.max(src.length * 3, LZ4_LEGACY_BLOCK), MAX_VMLINUX_BYTES),
  );
  let op = 0;
  let ip = 4;
  while (ip + 4 <= src.length) {
    const n = v.getUint32(ip, true);
    if (n === LZ4_LEGACY_MAGIC) { // concatenated frame
      ip += 4;
      continue;
    }
    if (ip + 4 + n > src.length) {
      if (ip + 4 === src.length) break; // trailing size word
      throw new KernelLoadError(`corrupt LZ4 data: block of ${n} bytes runs past the input`);
    }
    if (n === 0) break;
    if (out.length - op < LZ4_LEGACY_BLOCK && out.length < MAX_VMLINUX_BYTES) {
      const bigger = new Uint8Array(
        Math.min(Math.max(out.length * 2, op + LZ4_LEGACY_BLOCK), MAX_VMLINUX_BYTES),
      );
      bigger.set(out.subarray(0, op));
      out = bigger;
    }
    op = lz4DecompressBlock(src.subarray(ip + 4, ip + 4 + n), out, op);
    ip += 4 + n;
  }
  return out.subarray(0, op);
}

async function gunzip(data: Uint8Array): Promise<Uint8Array> {
  // The caller trims the kernel's trailing size word: DecompressionStream rejects data after the member.
  const reader = new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new DecompressionStream("gzip"),
  ).getReader();
  // Read piece by piece, so that a payload expanding past the largest vmlinux is refused, not buffered.
  const pieces: Uint8Array[] = [];
  let total = 0;
  try {
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      total += r.value.length;
      if (total > MAX_VMLINUX_BYTES) {
        reader.cancel().catch(() => {});
        throw new KernelLoadError(`gzip payload decompresses to more than ${MAX_VMLINUX_BYTES >> 20} MiB`);
      }
      pieces.push(r.value);
    }
  } catch (e) {
    if (e instanceof KernelLoadError) throw e;
    throw new KernelLoadError(`gzip payload could not be decompressed: ${(e as Error).message}`);
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of pieces) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Identifies the compression of a kernel payload by its magic bytes. */
export function payloadFormat(p: Uint8Array): string {
  const b = (i: number) => p[i] ?? -1;
  if (b(0) === 0x02 && b(1) === 0x21 && b(2) === 0x4c && b(3) === 0x18) return "lz4";
  if (b(0) === 0x1f && (b(1) === 0x8b || b(1) === 0x9e)) return "gzip";
  if (b(0) === 0x28 && b(1) === 0xb5 && b(2) === 0x2f && b(3) === 0xfd) return "zstd";
  if (b(0) === 0xfd && b(1) === 0x37 && b(2) === 0x7a && b(3) === 0x58) return "xz";
  if (b(0) === 0x42 && b(1) === 0x5a && b(2) === 0x68) return "bzip2";
  if (b(0) === 0x5d && b(1) === 0x00) return "lzma";
  if (b(0) === 0x89 && b(1) === 0x4c && b(2) === 0x5a && b(3) === 0x4f) return "lzo";
  if (b(0) === 0x7f && b(1) === 0x45 && b(2) === 0x4c && b(3) === 0x46) return "elf";
  return "unknown";
}

/**
 * Returns the ELF vmlinux inside a bzImage. Throws KernelLoadError for an unsupported compression or
 * a payload that does not decompress to an ELF image.
 */
export async function extractVmlinux(bzImage: Uint8Array): Promise<Uint8Array> {
  const info = parseBzImage(bzImage);
  if (info.payloadLength === 0) throw new KernelLoadError("bzImage has no payload (payload_length is 0)");
  const start = info.kernelOffset + info.payloadOffset;
  const payload = bzImage.subarray(start, start + info.payloadLength);
  // The build appends the decompressed size as a little-endian u32 at the payload's end.
  const tail = new DataView(payload.buffer, payload.byteOffset + payload.length - 4, 4).getUint32(0, true);
  const sizeHint = tail > 0 && tail <= 1 << 30 ? tail : 0;
  const fmt = payloadFormat(payload);
  let elf: Uint8Array;
  switch (fmt) {
    case "lz4":
      elf = lz4LegacyDecompress(payload, sizeHint);
      break;
    case "gzip":
      elf = await gunzip(payload.subarray(0, payload.length - 4));
      break;
    case "elf":
      elf = payload;
      break;
    default:
      throw new KernelLoadError(
        `bzImage payload is ${fmt}-compressed; only lz4 and gzip can be extracted (boot the bzImage instead)`,
      );
  }
  if (elf.length < 4 || elf[0] !== 0x7f || elf[1] !== 0x45 || elf[2] !== 0x4c || elf[3] !== 0x46) {
    throw new KernelLoadError(`bzImage payload (${fmt}) did not decompress to an ELF image`);
  }
  return elf;
}
