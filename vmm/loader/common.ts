/** Shared types of the kernel loaders. */

import type { GuestMemory } from "../memory.ts";
import { GuestMemoryError } from "../memory.ts";

/** 64-bit Linux boot protocol entry: long mode, paging on, RSI = zero page. */
export interface Linux64Entry {
  kind: "linux64";
  rip: number;
  rsi: number;
}

/** PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info. */
export interface PvhEntry {
  kind: "pvh";
  rip: number;
  rbx: number;
}

export type BootEntry = Linux64Entry | PvhEntry;

/** A kernel image that cannot be booted, or an option that does not fit; the message says why. */
export class KernelLoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "KernelLoadError";
  }
}

/** Options shared by the loaders. */
export interface LoadOptions {
  /** Kernel command line (ASCII/UTF-8, without the terminating NUL). */
  cmdline?: string;
  /** initramfs contents, if any. */
  initramfs?: Uint8Array;
  /** Guest physical address of the ACPI RSDP (default Layout.rsdpAddr, where writeAcpiTables puts it; 0 = none). */
  rsdpAddr?: number;
}

export function hex(n: number): string {
  return "0x" + n.toString(16);
}

/** Writes bytes into guest memory, turning an out-of-RAM range into a KernelLoadError naming `what`. */
export function writeChecked(mem: GuestMemory, gpa: number, data: Uint8Array, what: string): void {
  if (!mem.contains(gpa, data.length)) {
    throw new KernelLoadError(
      `${what} (${data.length} bytes at ${hex(gpa)}..${hex(gpa + data.length)}) does not fit in guest RAM ` +
        `(${mem.size / (1024 * 1024)} MiB)`,
    );
  }
  try {
    mem.write(gpa, data);
  } catch (e) {
    if (e instanceof GuestMemoryError) throw new KernelLoadError(`${what}: ${e.message}`);
    throw e;
  }
}

/** The NUL-terminated bytes of the command line, checked against a maximum length (NUL excluded). */
export function cmdlineBytes(cmdline: string, maxLen: number): Uint8Array {
  const text = new TextEncoder().encode(cmdline);
  if (text.includes(0)) throw new KernelLoadError("kernel command line contains a NUL byte");
  if (text.length > maxLen) {
    throw new KernelLoadError(
      `kernel command line is ${text.length} bytes; this kernel accepts at most ${maxLen}`,
    );
  }
  const out = new Uint8Array(text.length + 1);
  out.set(text);
  return out;
}
