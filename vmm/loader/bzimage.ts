/**
 * Linux bzImage loader using the 64-bit boot protocol (Documentation/arch/x86/boot.rst).
 *
 * The protected-mode part of the image is copied to its preferred address, a zero page
 * (struct boot_params) is built from the image's setup header plus our fields (loader type, command
 * line, initramfs, E820 map, RSDP), and the entry point is the 64-bit entry at load address + 0x200.
 */

import type { GuestMemory } from "../memory.ts";
import { e820, initramfsAddress, Layout, lowRamEnd } from "../layout.ts";
import {
  cmdlineBytes,
  hex,
  KernelLoadError,
  type Linux64Entry,
  type LoadOptions,
  writeChecked,
} from "./common.ts";

/** Offsets inside the image / zero page (struct boot_params). */
export const BP = {
  acpiRsdpAddr: 0x070,
  extRamdiskImage: 0x0c0,
  extRamdiskSize: 0x0c4,
  extCmdLinePtr: 0x0c8,
  e820Entries: 0x1e8,
  setupSects: 0x1f1,
  syssize: 0x1f4,
  vidMode: 0x1fa,
  bootFlag: 0x1fe,
  jump: 0x200,
  header: 0x202,
  version: 0x206,
  typeOfLoader: 0x210,
  loadflags: 0x211,
  code32Start: 0x214,
  ramdiskImage: 0x218,
  ramdiskSize: 0x21c,
  heapEndPtr: 0x224,
  cmdLinePtr: 0x228,
  initrdAddrMax: 0x22c,
  kernelAlignment: 0x230,
  relocatableKernel: 0x234,
  minAlignment: 0x235,
  xloadflags: 0x236,
  cmdlineSize: 0x238,
  payloadOffset: 0x248,
  payloadLength: 0x24c,
  prefAddress: 0x258,
  initSize: 0x260,
  e820Table: 0x2d0,
  e820Max: 128,
} as const;

export const HDRS_MAGIC = 0x53726448; // "HdrS" little-endian
export const LOADED_HIGH = 0x01;
export const KEEP_SEGMENTS = 0x40;
export const CAN_USE_HEAP = 0x80;
export const XLF_KERNEL_64 = 0x01;
export const XLF_CAN_BE_LOADED_ABOVE_4G = 0x02;
/** Minimum protocol for the 64-bit entry point: 2.12 (xloadflags). */
const MIN_VERSION = 0x020c;

/** The parsed setup header of a bzImage. */
export interface BzImageInfo {
  /** Boot protocol version, e.g. 0x020f for 2.15. */
  version: number;
  setupSects: number;
  /** Offset of the protected-mode kernel in the file ((setup_sects + 1) * 512). */
  kernelOffset: number;
  /** Size of the protected-mode kernel in the file. */
  kernelSize: number;
  syssize: number;
  loadflags: number;
  xloadflags: number;
  relocatable: boolean;
  kernelAlignment: number;
  prefAddress: number;
  initSize: number;
  initrdAddrMax: number;
  /** Maximum command line length, NUL excluded. */
  cmdlineSize: number;
  /** Compressed payload location inside the protected-mode kernel. */
  payloadOffset: number;
  payloadLength: number;
  /** End of the setup header in the file (0x202 + the jump's displacement byte). */
  headerEnd: number;
}

/** Parses and validates the setup header of a bzImage; throws KernelLoadError with the reason. */
export function parseBzImage(image: Uint8Array): BzImageInfo {
  if (image.length < 0x400) {
    throw new KernelLoadError(
      `not a bzImage: the file is ${image.length} bytes, too short for a setup header`,
    );
  }
  const v = new DataView(image.buffer, image.byteOffset, image.byteLength);
  if (v.getUint32(BP.header, true) !== HDRS_MAGIC) {
    throw new KernelLoadError('not a bzImage: setup header magic "HdrS" missing at offset 0x202');
  }
  const version = v.getUint16(BP.version, true);
  const vstr = `${version >> 8}.${(version & 0xff).toString().padStart(2, "0")}`;
  if (version < MIN_VERSION) {
    throw new KernelLoadError(
      `bzImage boot protocol ${vstr} is too old: the 64-bit entry needs 2.12 or later`,
    );
  }
  const xloadflags = v.getUint16(BP.xloadflags, true);
  if (!(xloadflags & XLF_KERNEL_64)) {
    throw new KernelLoadError(
      "bzImage has no 64-bit entry point (XLF_KERNEL_64 not set): not an x86-64 kernel?",
    );
  }
  const loadflags = v.getUint8(BP.loadflags);
  if (!(loadflags & LOADED_HIGH)) {
    throw new KernelLoadError("zImage (kernel loaded at 0x10000) is not supported; need a bzImage");
  }
  let setupSects = v.getUint8(BP.setupSects);
  if (setupSects === 0) setupSects = 4;
  const kernelOffset = (setupSects + 1) * 512;
  const syssize = v.getUint32(BP.syssize, true);
  if (kernelOffset >= image.length) {
    throw new KernelLoadError(
      `bzImage is truncated: setup is ${kernelOffset} bytes but the file has only ${image.length}`,
    );
  }
  const kernelSize = image.length - kernelOffset;
  if (syssize * 16 > kernelSize) {
    throw new KernelLoadError(
      `bzImage is truncated: header says the kernel is ${syssize * 16} bytes, the file holds ${kernelSize}`,
    );
  }
  const headerEnd = 0x202 + v.getUint8(BP.jump + 1);
  const initSize = v.getUint32(BP.initSize, true);
  const payloadOffset = v.getUint32(BP.payloadOffset, true);
  const payloadLength = v.getUint32(BP.payloadLength, true);
  if (payloadOffset + payloadLength > kernelSize) {
    throw new KernelLoadError("bzImage is corrupt: compressed payload extends past the end of the file");
  }
  const prefAddress = Number(v.getBigUint64(BP.prefAddress, true));
  const kernelAlignment = v.getUint32(BP.kernelAlignment, true);
  if (kernelAlignment !== 0 && (kernelAlignment & (kernelAlignment - 1)) !== 0) {
    throw new KernelLoadError(
      `bzImage is corrupt: kernel_alignment ${hex(kernelAlignment)} is not a power of two`,
    );
  }
  return {
    version,
    setupSects,
    kernelOffset,
    kernelSize,
    syssize,
    loadflags,
    xloadflags,
    relocatable: v.getUint8(BP.relocatableKernel) !== 0,
    kernelAlignment,
    prefAddress,
    initSize,
    initrdAddrMax: v.getUint32(BP.initrdAddrMax, true),
    cmdlineSize: v.getUint32(BP.cmdlineSize, true),
    payloadOffset,
    payloadLength,
    headerEnd: Math.min(headerEnd, 0x290),
  };
}

/** What {@link loadBzImage} did. */
export interface BzImageLoad {
  entry: Linux64Entry;
  info: BzImageInfo;
  kernelAddr: number;
  zeroPageAddr: number;
  cmdlineAddr: number;
  initramfsAddr?: number;
  initramfsSize?: number;
}

/**
 * Loads a bzImage into guest memory and builds its zero page. `mem` must follow {@link Layout}
 * (regions from `ramRegions(mem.size)`).
 */
export function loadBzImage(mem: GuestMemory, image: Uint8Array, opts: LoadOptions = {}): BzImageLoad {
  const info = parseBzImage(image);
  const memSize = mem.size;
  const lowEnd = lowRamEnd(memSize);

  // The protected-mode kernel: at pref_address (the kernel decompresses itself in place there).
  const kernelAddr = info.prefAddress >= Layout.highMemStart ? info.prefAddress : Layout.kernelDefaultAddr;
  const span = Math.max(info.initSize, info.kernelSize);
  if (kernelAddr + span > lowEnd) {
    throw new KernelLoadError(
      `guest memory too small: the kernel needs ${hex(kernelAddr)}..${hex(kernelAddr + span)} ` +
        `(init_size ${info.initSize} bytes) but RAM below 4 GiB ends at ${hex(lowEnd)}`,
    );
  }
  writeChecked(mem, kernelAddr, image.subarray(info.kernelOffset), "kernel");

  // Zero page: zeroed, then the setup header from the image, then our fields.
  const zp = Layout.zeroPageAddr;
  mem.fill(zp, 4096, 0);
  mem.write(zp + BP.setupSects, image.subarray(BP.setupSects, info.headerEnd));
  mem.writeU8(zp + BP.typeOfLoader, 0xff);
  mem.writeU8(zp + BP.loadflags, (info.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~KEEP_SEGMENTS);
  mem.writeU16(zp + BP.heapEndPtr, 0xfe00);
  mem.writeU16(zp + BP.vidMode, 0xffff);
  mem.writeU32(zp + BP.code32Start, kernelAddr);

  // Command line.
  const cmd = cmdlineBytes(opts.cmdline ?? "", Math.min(info.cmdlineSize, Layout.cmdlineMax - 1));
  writeChecked(mem, Layout.cmdlineAddr, cmd, "kernel command line");
  mem.writeU32(zp + BP.cmdLinePtr, Layout.cmdlineAddr);
  mem.writeU32(zp + BP.extCmdLinePtr, 0);

  // initramfs: high in low RAM, under initrd_addr_max, above the kernel's init_size span.
  let initramfsAddr: number | undefined;
  const initrd = opts.initramfs;
  if (initrd && initrd.length > 0) {
    const maxEnd = info.initrdAddrMax + 1;
    const addr = initramfsAddress(memSize, initrd.length, maxEnd, kernelAddr + span);
    if (addr === null) {
      const room = Math.max(0, Math.min(lowEnd, maxEnd) - (kernelAddr + span));
      throw new KernelLoadError(
        `initramfs of ${initrd.length} bytes does not fit: only ${room} bytes free between the kernel ` +
          `(ends ${hex(kernelAddr + span)}) and ${hex(Math.min(lowEnd, maxEnd))}; give the VM more memory`,
      );
    }
    writeChecked(mem, addr, initrd, "initramfs");
    mem.writeU32(zp + BP.ramdiskImage, addr);
    mem.writeU32(zp + BP.ramdiskSize, initrd.length);
    mem.writeU32(zp + BP.extRamdiskImage, 0);
    mem.writeU32(zp + BP.extRamdiskSize, 0);
    initramfsAddr = addr;
  } else {
    mem.writeU32(zp + BP.ramdiskImage, 0);
    mem.writeU32(zp + BP.ramdiskSize, 0);
  }

  // ACPI RSDP (protocol 2.14+ reads boot_params.acpi_rsdp_addr; older kernels scan 0xE0000).
  if (info.version >= 0x020e) mem.writeU64(zp + BP.acpiRsdpAddr, opts.rsdpAddr ?? Layout.rsdpAddr);

  // E820 map.
  const map = e820(memSize);
  if (map.length > BP.e820Max) throw new KernelLoadError("too many E820 entries");
  mem.writeU8(zp + BP.e820Entries, map.length);
  map.forEach((e, i) => {
    const at = zp + BP.e820Table + i * 20;
    mem.writeU64(at, e.addr);
    mem.writeU64(at + 8, e.size);
    mem.writeU32(at + 16, e.type);
  });

  return {
    entry: { kind: "linux64", rip: kernelAddr + 0x200, rsi: zp },
    info,
    kernelAddr,
    zeroPageAddr: zp,
    cmdlineAddr: Layout.cmdlineAddr,
    initramfsAddr,
    initramfsSize: initrd?.length,
  };
}
