/**
 * Writes the guest's ACPI tables into RAM in the Layout.acpiStart..acpiEnd area:
 * RSDP (at Layout.rsdpAddr) -> XSDT -> FADT (-> DSDT), MADT, MCFG.
 */

import type { GuestMemory } from "../memory.ts";
import { Layout } from "../layout.ts";
import type { Aml } from "./aml.ts";
import { dsdtAml } from "./dsdt.ts";
import { fadt, madt, mcfg, rsdp, tableWithBody, xsdt } from "./sdt.ts";

export interface AcpiOptions {
  /** vCPUs enabled at boot. */
  vcpus: number;
  /** ACPI memory hotplug slots (hotplug_method=acpi with a hotplug_size). */
  memorySlots?: { start: number; slot: number; count: number };
  /** vCPUs that may ever exist (hot-pluggable beyond `vcpus`); default `vcpus`. */
  maxVcpus?: number;
  /** Guest RAM size (places the 64-bit PCI window). */
  memSize?: number;
  /** Address space kept after RAM for memory hotplug (the 64-bit PCI window goes after it). */
  hotplugSize?: number;
  /** PCI segments (default 1): a host bridge and an MCFG entry each. */
  pciSegments?: number;
  /** COM1 in the DSDT (default true). */
  serial?: boolean;
  /** PCI host bridge in the DSDT plus MCFG (default true). */
  pci?: boolean;
  /** Extra AML inside Scope(\_SB). */
  sbDevices?: Aml[];
  /** Extra AML inside Device(\_SB.PCI0). */
  pciDevices?: Aml[];
  /** FADT IA-PC boot architecture flags (default: 8042 present, no VGA). */
  iapcBootArch?: number;
}

/** Where each table went. */
export interface AcpiPlacement {
  rsdp: number;
  xsdt: number;
  fadt: number;
  dsdt: number;
  madt: number;
  mcfg?: number;
  end: number;
}

function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Writes all tables and returns their addresses. */
export function placeAcpiTables(mem: GuestMemory, opts: AcpiOptions): AcpiPlacement {
  const pci = opts.pci ?? true;
  let at = Layout.rsdpAddr + 64;
  const put = (table: Uint8Array): number => {
    const addr = align(at, 16);
    if (addr + table.length > Layout.acpiEnd) {
      throw new RangeError("ACPI tables overflow their area below 1 MiB");
    }
    mem.write(addr, table);
    at = addr + table.length;
    return addr;
  };
  const dsdtAddr = put(
    tableWithBody(
      "DSDT",
      2,
      "DVMMDSDT",
      dsdtAml({
        serial: opts.serial,
        pci,
        memSize: opts.memSize ?? mem.size,
        hotplugSize: opts.hotplugSize,
        pciSegments: opts.pciSegments,
        sbDevices: opts.sbDevices,
        pciDevices: opts.pciDevices,
        cpus: { boot: opts.vcpus, max: opts.maxVcpus ?? opts.vcpus },
        memorySlots: opts.memorySlots,
      }),
    ),
  );
  const fadtAddr = put(fadt({ dsdtAddr, iapcBootArch: opts.iapcBootArch }));
  const madtAddr = put(madt({ vcpus: opts.vcpus, maxVcpus: opts.maxVcpus ?? opts.vcpus }));
  const entries = [fadtAddr, madtAddr];
  let mcfgAddr: number | undefined;
  if (pci) {
    mcfgAddr = put(mcfg(opts.pciSegments));
    entries.push(mcfgAddr);
  }
  const xsdtAddr = put(xsdt(entries));
  mem.write(Layout.rsdpAddr, rsdp(xsdtAddr));
  return {
    rsdp: Layout.rsdpAddr,
    xsdt: xsdtAddr,
    fadt: fadtAddr,
    dsdt: dsdtAddr,
    madt: madtAddr,
    mcfg: mcfgAddr,
    end: at,
  };
}

/** Writes all ACPI tables into guest memory; returns the RSDP address (for boot_params / start_info). */
export function writeAcpiTables(mem: GuestMemory, opts: AcpiOptions): number {
  return placeAcpiTables(mem, opts).rsdp;
}
