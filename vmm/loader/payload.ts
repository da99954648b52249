/**
 * Loads a VM payload (kernel + optional initramfs + command line) from files, choosing the loader by
 * the kernel's format: an ELF vmlinux boots through PVH, a bzImage through the 64-bit boot protocol
 * (or, with `protocol: "pvh"`, through PVH after extracting its vmlinux).
 */

import type { GuestMemory } from "../memory.ts";
import { type BootEntry, KernelLoadError } from "./common.ts";
import { loadBzImage } from "./bzimage.ts";
import { loadPvhElf } from "./elf.ts";
import { extractVmlinux } from "./vmlinux_extract.ts";

export interface PayloadFiles {
  /** Path of the kernel (bzImage or ELF vmlinux). */
  kernel: string;
  /** Path of the initramfs. */
  initramfs?: string;
  cmdline?: string;
  /** "auto" (default): bzImage -> linux64, ELF -> PVH. "pvh": always PVH. "linux64": bzImage only. */
  protocol?: "auto" | "pvh" | "linux64";
  /** RSDP address handed to the kernel (default Layout.rsdpAddr). */
  rsdpAddr?: number;
}

/** Largest kernel image dvmm reads (Linux bzImages and vmlinux files are tens of MiB). */
export const MAX_KERNEL_BYTES = 512 * 1024 * 1024;

/**
 * Checks the payload's files before anything expensive is set up: each must be a regular file (a FIFO
 * would block the boot forever, a device like /dev/zero never ends), readable, and of a size that can
 * fit (the kernel within {@link MAX_KERNEL_BYTES}, the initramfs within guest RAM). Errors name the
 * option and the path.
 */
export async function checkPayloadFiles(
  p: { kernel?: string; initramfs?: string },
  memSize: number,
): Promise<void> {
  const check = async (path: string, what: string, option: string, limit: number) => {
    let st: Deno.FileInfo;
    try {
      st = await Deno.stat(path);
    } catch (e) {
      const why = e instanceof Deno.errors.NotFound ? "no such file" : (e as Error).message;
      throw new KernelLoadError(`${option}: cannot use ${what} ${path}: ${why}`);
    }
    if (!st.isFile) {
      throw new KernelLoadError(`${option}: ${what} ${path} is not a regular file`);
    }
    if (st.size === 0) throw new KernelLoadError(`${option}: ${what} ${path} is empty`);
    if (st.size > limit) {
      throw new KernelLoadError(
        `${option}: ${what} ${path} is ${st.size} bytes, more than the ${limit} that fit`,
      );
    }
    try {
      (await Deno.open(path, { read: true })).close();
    } catch (e) {
      throw new KernelLoadError(`${option}: cannot read ${what} ${path}: ${(e as Error).message}`);
    }
  };
  if (p.kernel !== undefined) await check(p.kernel, "kernel", "--kernel", MAX_KERNEL_BYTES);
  if (p.initramfs !== undefined) await check(p.initramfs, "initramfs", "--initramfs", memSize);
}

async function readFile(path: string, what: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "no such file" : (e as Error).message;
    throw new KernelLoadError(`cannot read ${what} ${path}: ${why}`);
  }
}

function isElf(b: Uint8Array): boolean {
  return b.length >= 4 && b[0] === 0x7f && b[1] === 0x45 && b[2] === 0x4c && b[3] === 0x46;
}

/** Loads kernel and initramfs into `mem` and returns the boot CPU's entry state. */
export async function loadPayload(mem: GuestMemory, memSize: number, p: PayloadFiles): Promise<BootEntry> {
  if (memSize !== mem.size) {
    throw new KernelLoadError(`guest memory size mismatch: ${memSize} configured, ${mem.size} mapped`);
  }
  let kernel = await readFile(p.kernel, "kernel");
  const initramfs = p.initramfs ? await readFile(p.initramfs, "initramfs") : undefined;
  const opts = { cmdline: p.cmdline ?? "", initramfs, rsdpAddr: p.rsdpAddr };
  const protocol = p.protocol ?? "auto";
  if (isElf(kernel)) {
    if (protocol === "linux64") {
      throw new KernelLoadError(`${p.kernel} is an ELF vmlinux; it boots only via PVH`);
    }
    return loadPvhElf(mem, kernel, opts).entry;
  }
  if (protocol === "pvh") {
    kernel = await extractVmlinux(kernel);
    return loadPvhElf(mem, kernel, opts).entry;
  }
  return loadBzImage(mem, kernel, opts).entry;
}
