/**
 * ACPI table encoders: the common system description table header with checksum, RSDP, XSDT, FADT,
 * MADT and MCFG. Each function returns the table's bytes (checksummed); placement is done by
 * `writeAcpiTables` in `tables.ts`.
 */

import { Layout, pciSegmentEcam } from "../layout.ts";

export const OEM_ID = "DVMM  ";
export const CREATOR_ID = "DVMM";
const OEM_REVISION = 1;
const CREATOR_REVISION = 1;
export const HEADER_SIZE = 36;

/** Sum of all bytes modulo 256. A table is valid when the sum over it is 0. */
export function byteSum(b: Uint8Array, start = 0, end = b.length): number {
  let s = 0;
  for (let i = start; i < end; i++) s = (s + b[i]) & 0xff;
  return s;
}

function ascii(out: Uint8Array, off: number, s: string, len: number): void {
  for (let i = 0; i < len; i++) out[off + i] = i < s.length ? s.charCodeAt(i) : 0x20;
}

/** A table writer over a fixed-size buffer (little-endian helpers). */
export class TableBuf {
  readonly bytes: Uint8Array;
  readonly view: DataView;
  constructor(size: number) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
  }
  u8(off: number, v: number): this {
    this.view.setUint8(off, v);
    return this;
  }
  u16(off: number, v: number): this {
    this.view.setUint16(off, v, true);
    return this;
  }
  u32(off: number, v: number): this {
    this.view.setUint32(off, v >>> 0, true);
    return this;
  }
  u64(off: number, v: number | bigint): this {
    this.view.setBigUint64(off, BigInt(v), true);
    return this;
  }
  /** A Generic Address Structure (12 bytes). */
  gas(
    off: number,
    space: number,
    bitWidth: number,
    bitOffset: number,
    accessSize: number,
    addr: number,
  ): this {
    return this.u8(off, space).u8(off + 1, bitWidth).u8(off + 2, bitOffset).u8(off + 3, accessSize).u64(
      off + 4,
      addr,
    );
  }
}

/** Fills in the standard header and the checksum (byte 9) of a table. */
export function finishTable(
  t: TableBuf,
  signature: string,
  revision: number,
  oemTableId: string,
): Uint8Array {
  const b = t.bytes;
  ascii(b, 0, signature, 4);
  t.u32(4, b.length);
  t.u8(8, revision);
  t.u8(9, 0);
  ascii(b, 10, OEM_ID, 6);
  ascii(b, 16, oemTableId, 8);
  t.u32(24, OEM_REVISION);
  ascii(b, 28, CREATOR_ID, 4);
  t.u32(32, CREATOR_REVISION);
  t.u8(9, (256 - byteSum(b)) & 0xff);
  return b;
}

/** A table made of the header plus a body (used for the DSDT's AML). */
export function tableWithBody(
  signature: string,
  revision: number,
  oemTableId: string,
  body: Uint8Array,
): Uint8Array {
  const t = new TableBuf(HEADER_SIZE + body.length);
  t.bytes.set(body, HEADER_SIZE);
  return finishTable(t, signature, revision, oemTableId);
}

/** RSDP, ACPI 2.0+ form (36 bytes): RSDT address 0, XSDT address given. */
export function rsdp(xsdtAddr: number): Uint8Array {
  const t = new TableBuf(36);
  ascii(t.bytes, 0, "RSD PTR ", 8);
  ascii(t.bytes, 9, OEM_ID, 6);
  t.u8(15, 2); // revision: ACPI 2.0+
  t.u32(16, 0); // no RSDT
  t.u32(20, 36);
  t.u64(24, xsdtAddr);
  t.u8(8, (256 - byteSum(t.bytes, 0, 20)) & 0xff);
  t.u8(32, (256 - byteSum(t.bytes, 0, 36)) & 0xff);
  return t.bytes;
}

/** XSDT listing the 64-bit addresses of the other tables (the DSDT is reached through the FADT). */
export function xsdt(entries: number[]): Uint8Array {
  const t = new TableBuf(HEADER_SIZE + 8 * entries.length);
  entries.forEach((a, i) => t.u64(HEADER_SIZE + 8 * i, a));
  return finishTable(t, "XSDT", 1, "DVMMXSDT");
}

/** FADT flags (ACPI 6.x table 5.10). */
export const FADT_FLAG = {
  WBINVD: 1 << 0,
  PWR_BUTTON: 1 << 4,
  SLP_BUTTON: 1 << 5,
  RESET_REG_SUP: 1 << 10,
  HW_REDUCED_ACPI: 1 << 20,
} as const;

/** IA-PC boot architecture flags. */
export const IAPC_BOOT_ARCH = {
  LEGACY_DEVICES: 1 << 0,
  I8042: 1 << 1,
  VGA_NOT_PRESENT: 1 << 2,
  MSI_NOT_SUPPORTED: 1 << 3,
  PCIE_ASPM_CONTROLS: 1 << 4,
  CMOS_RTC_NOT_PRESENT: 1 << 5,
} as const;

export const FADT_SIZE = 276;
export const FADT_REVISION = 6;
/** FADT minor version 5: ACPI 6.5, so OSPM honours the MADT "online capable" bit. */
export const FADT_MINOR = 5;
const GAS_SYSTEM_IO = 1;
const ACCESS_BYTE = 1;

export interface FadtOptions {
  dsdtAddr: number;
  /** The IA-PC boot architecture flags (default: 8042 present, VGA not present). */
  iapcBootArch?: number;
}

/**
 * FADT for hardware-reduced ACPI: no PM1/GPE blocks, sleep control/status registers and a reset
 * register in I/O space (see Layout.acpiPm). Power button is a control-method device (GED + PNP0C0C).
 */
export function fadt(o: FadtOptions): Uint8Array {
  const pm = Layout.acpiPm;
  const t = new TableBuf(FADT_SIZE);
  t.u32(36, 0); // FIRMWARE_CTRL: no FACS (optional with HW_REDUCED_ACPI)
  t.u32(40, o.dsdtAddr >= 2 ** 32 ? 0 : o.dsdtAddr);
  t.u8(45, 0); // preferred PM profile: unspecified
  t.u16(46, pm.sciGsi);
  t.u16(109, o.iapcBootArch ?? (IAPC_BOOT_ARCH.I8042 | IAPC_BOOT_ARCH.VGA_NOT_PRESENT));
  t.u32(
    112,
    FADT_FLAG.WBINVD | FADT_FLAG.PWR_BUTTON | FADT_FLAG.SLP_BUTTON | FADT_FLAG.RESET_REG_SUP |
      FADT_FLAG.HW_REDUCED_ACPI,
  );
  t.gas(116, GAS_SYSTEM_IO, 8, 0, ACCESS_BYTE, pm.resetPort);
  t.u8(128, pm.resetValue);
  t.u8(131, FADT_MINOR);
  t.u64(140, o.dsdtAddr); // X_DSDT
  t.gas(244, GAS_SYSTEM_IO, 8, 0, ACCESS_BYTE, pm.sleepControlPort);
  t.gas(256, GAS_SYSTEM_IO, 8, 0, ACCESS_BYTE, pm.sleepStatusPort);
  ascii(t.bytes, 268, "DVMM", 8); // hypervisor vendor identity
  return finishTable(t, "FACP", FADT_REVISION, "DVMMFACP");
}

/** MADT Local APIC flags. */
export const LAPIC_ENABLED = 1;
export const LAPIC_ONLINE_CAPABLE = 2;
/** MPS INTI flags: polarity bits 1:0, trigger mode bits 3:2. */
export const MPS_INTI = {
  POLARITY_HIGH: 1,
  POLARITY_LOW: 3,
  TRIGGER_EDGE: 1 << 2,
  TRIGGER_LEVEL: 3 << 2,
} as const;

export interface MadtOptions {
  /** vCPUs present at boot (enabled). */
  vcpus: number;
  /** vCPUs that may exist (the rest are online-capable, i.e. hot-pluggable). */
  maxVcpus: number;
  /** Set PCAT_COMPAT (dual 8259 present; KVM's in-kernel irqchip has them). Default true. */
  pcatCompat?: boolean;
}

/**
 * MADT (revision 5): one Processor Local APIC per vCPU (UID = APIC id = index), the IOAPIC, the
 * ISA IRQ0 -> GSI 2 override, SCI override (level, active high) and LINT1 = NMI for all processors.
 */
export function madt(o: MadtOptions): Uint8Array {
  if (!Number.isInteger(o.vcpus) || o.vcpus < 1) throw new RangeError(`vcpus must be >= 1 (got ${o.vcpus})`);
  if (!Number.isInteger(o.maxVcpus) || o.maxVcpus < o.vcpus) {
    throw new RangeError(`maxVcpus (${o.maxVcpus}) must be >= vcpus (${o.vcpus})`);
  }
  if (o.maxVcpus > 255) throw new RangeError(`at most 255 vCPUs (xAPIC ids), got ${o.maxVcpus}`);
  const size = HEADER_SIZE + 8 + 8 * o.maxVcpus + 12 + 10 + 10 + 6;
  const t = new TableBuf(size);
  t.u32(36, Layout.lapicAddr);
  t.u32(40, (o.pcatCompat ?? true) ? 1 : 0);
  let p = 44;
  for (let i = 0; i < o.maxVcpus; i++) {
    t.u8(p, 0).u8(p + 1, 8).u8(p + 2, i).u8(p + 3, i).u32(
      p + 4,
      i < o.vcpus ? LAPIC_ENABLED : LAPIC_ONLINE_CAPABLE,
    );
    p += 8;
  }
  // IO APIC: id 0, address, GSI base 0.
  t.u8(p, 1).u8(p + 1, 12).u8(p + 2, 0).u8(p + 3, 0).u32(p + 4, Layout.ioapicAddr).u32(p + 8, 0);
  p += 12;
  // Interrupt source overrides (bus 0 = ISA).
  t.u8(p, 2).u8(p + 1, 10).u8(p + 2, 0).u8(p + 3, 0).u32(p + 4, 2).u16(p + 8, 0); // IRQ0 -> GSI2, bus defaults
  p += 10;
  const sci = Layout.acpiPm.sciGsi;
  t.u8(p, 2).u8(p + 1, 10).u8(p + 2, 0).u8(p + 3, sci).u32(p + 4, sci)
    .u16(p + 8, MPS_INTI.POLARITY_HIGH | MPS_INTI.TRIGGER_LEVEL);
  p += 10;
  // Local APIC NMI: all processors (UID 0xFF), bus-default flags, LINT1.
  t.u8(p, 4).u8(p + 1, 6).u8(p + 2, 0xff).u16(p + 3, 0).u8(p + 5, 1);
  p += 6;
  return finishTable(t, "APIC", 5, "DVMMAPIC");
}

/** MCFG with one ECAM allocation: segment 0, buses Layout.pciBusStart..pciBusEnd. */
export function mcfg(segments = 1): Uint8Array {
  const t = new TableBuf(HEADER_SIZE + 8 + 16 * segments);
  let p = HEADER_SIZE + 8;
  t.u64(p, Layout.pciEcamStart).u16(p + 8, 0).u8(p + 10, Layout.pciBusStart).u8(p + 11, Layout.pciBusEnd);
  // Further segments (PCI segment groups) have bus 0 only.
  for (let s = 1; s < segments; s++) {
    p += 16;
    t.u64(p, pciSegmentEcam(s).base).u16(p + 8, s).u8(p + 10, 0).u8(p + 11, 0);
  }
  return finishTable(t, "MCFG", 1, "DVMMMCFG");
}
