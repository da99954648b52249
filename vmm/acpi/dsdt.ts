/**
 * The DSDT's AML: \_S5, and in \_SB: COM1, the power button, the GED that signals it, the PCI host
 * bridge (optional) and a motherboard-resources device reserving the ECAM. Callers can append their
 * own \_SB devices (hook for PCI slots, hotplug, virtio-mmio...).
 */

import { Layout, pciMmio64Window, pciSegmentEcam, pciSegmentMmio32 } from "../layout.ts";
import {
  type Aml,
  and,
  buffer,
  call,
  cat,
  device,
  dwordMemory,
  eisaId,
  extendedInterrupt,
  field,
  FieldAccess,
  FieldUpdate,
  ifThen,
  int,
  ioPort,
  irqNoFlags,
  local,
  MemCache,
  memory32Fixed,
  method,
  name,
  notify,
  opRegion,
  pkgOf,
  qwordMemory,
  ref,
  RegionSpace,
  resourceTemplate,
  ret,
  scope,
  store,
  str,
  wordBusNumber,
  wordIo,
} from "./aml.ts";

export interface DsdtOptions {
  /** Describe COM1 (PNP0501 at 0x3F8, IRQ 4). Default true. */
  serial?: boolean;
  /** Describe the PCI host bridge PCI0 (PNP0A08) and reserve ECAM. Default true. */
  pci?: boolean;
  /** Guest RAM size: places the 64-bit MMIO window of the PCI host bridge. */
  memSize?: number;
  /** Address space kept after RAM for memory hotplug (the 64-bit window goes after it). */
  hotplugSize?: number;
  /** PCI segments (default 1): one host bridge each (PCI0, PC01, …), as Cloud Hypervisor describes them. */
  pciSegments?: number;
  /** Extra AML appended inside Scope(\_SB) (e.g. devices of later features). */
  sbDevices?: Aml[];
  /** Extra AML appended inside Device(\_SB.PCI0) (e.g. _PRT, slots). */
  pciDevices?: Aml[];
  /**
   * Describe ACPI PCI hotplug (default: with `pci`): slot objects with _EJ0 on every segment's bus 0 and
   * the PHPR controller the GED scans.
   */
  pciHotplug?: boolean;
  /**
   * vCPU hotplug: with `max` > `boot`, a processor object per possible vCPU (_STA, _MAT, _EJ0) and the
   * controller the GED scans.
   */
  cpus?: { boot: number; max: number };
  /** ACPI memory hotplug: the slots over the hotplug region (devices/memory_hotplug.ts). */
  memorySlots?: { start: number; slot: number; count: number };
}

/** \_S5: SLP_TYPa = Layout.acpiPm.s5SleepType. */
export function s5Package(): Aml {
  return name("_S5", pkgOf(int(Layout.acpiPm.s5SleepType), int(0), int(0), int(0)));
}

/** COM1: 16550 UART at I/O 0x3F8..0x3FF, ISA IRQ 4. */
export function com1(): Aml {
  return device(
    "COM1",
    name("_HID", eisaId("PNP0501")),
    name("_UID", int(1)),
    name("_CRS", resourceTemplate(ioPort(0x3f8, 0x3f8, 1, 8), irqNoFlags(4))),
  );
}

/** Power button (control-method device, notified by the GED). */
export function powerButton(): Aml {
  return device("PWRB", name("_HID", eisaId("PNP0C0C")), name("_UID", int(0)));
}

/**
 * Generic Event Device (ACPI0013): one edge-triggered GSI. Its _EVT reads the event status port
 * (reading clears it in the device model) and notifies the power button when bit 0 is set.
 */
export function ged(pciHotplug = false, cpuHotplug = false, memoryHotplug = false): Aml {
  const pm = Layout.acpiPm;
  return device(
    "GED_",
    name("_HID", str("ACPI0013")),
    name("_UID", int(0)),
    name("_CRS", resourceTemplate(extendedInterrupt([pm.gedGsi], { edge: true }))),
    opRegion("GDST", RegionSpace.SystemIO, pm.gedStatusPort, 1),
    field("GDST", FieldAccess.Byte, false, FieldUpdate.WriteAsZeros, [{ name: "GDAT", bits: 8 }]),
    method(
      "_EVT",
      1,
      true,
      store(ref("GDAT"), local(0)),
      ifThen(and(local(0), int(pm.gedPowerButtonBit)), notify(ref("\\_SB.PWRB"), int(0x80))),
      ...(pciHotplug ? [ifThen(and(local(0), int(pm.gedPciHotplugBit)), call("\\_SB.PHPR.PSCN"))] : []),
      ...(cpuHotplug ? [ifThen(and(local(0), int(pm.gedCpuHotplugBit)), call("\\_SB.CPHP.CSCN"))] : []),
      ...(memoryHotplug ? [ifThen(and(local(0), int(pm.gedMemoryHotplugBit)), call("\\_SB.MHPC.MSCN"))] : []),
    ),
  );
}

const hex2 = (n: number) => n.toString(16).toUpperCase().padStart(2, "0");

/** The ACPI name of segment `segment`'s host bridge. */
export function pciSegmentName(segment: number): string {
  return segment === 0 ? "PCI0" : `PC${hex2(segment)}`;
}

/**
 * The slots of a segment's bus 0 (1..31), each an ejectable object the guest's acpiphp manages: `_ADR`
 * (device N, function 0), `_SUN` (unique across segments) and `_EJ0`, which tells the hotplug controller
 * that the guest has let go of the slot.
 */
export function pciHotplugSlots(segment: number): Aml[] {
  const out: Aml[] = [];
  for (let slot = 1; slot < 32; slot++) {
    out.push(device(
      `SL${hex2(slot)}`,
      name("_ADR", int(slot << 16)),
      name("_SUN", int(segment * 32 + slot)),
      method("_EJ0", 1, true, store(int((1 << slot) >>> 0), ref(`\\_SB.PHPR.PE${hex2(segment)}`))),
    ));
  }
  return out;
}

/**
 * The PCI hotplug controller (devices/pci_hotplug.ts): its I/O ports, and PSCN, which the GED calls. For
 * each segment PSCN reads the slots that gained a device (Notify 1, device check: the guest scans the
 * slot) and those to give up (Notify 3, eject request: the guest unbinds, then calls the slot's _EJ0).
 */
export function pciHotplugController(segments: number): Aml {
  const base = Layout.pciHotplugPort;
  const units = [];
  for (let s = 0; s < segments; s++) {
    units.push(
      { name: `PU${hex2(s)}`, bits: 32 },
      { name: `PD${hex2(s)}`, bits: 32 },
      { name: `PE${hex2(s)}`, bits: 32 },
      { name: "", bits: 32 },
    );
  }
  const scan: Aml[] = [];
  for (let s = 0; s < segments; s++) {
    scan.push(store(ref(`PU${hex2(s)}`), local(0)), store(ref(`PD${hex2(s)}`), local(1)));
    for (let slot = 1; slot < 32; slot++) {
      const path = `\\_SB.${pciSegmentName(s)}.SL${hex2(slot)}`;
      const bit = int((1 << slot) >>> 0);
      scan.push(
        ifThen(and(local(0), bit), notify(ref(path), int(1))),
        ifThen(and(local(1), bit), notify(ref(path), int(3))),
      );
    }
  }
  return device(
    "PHPR",
    name("_HID", eisaId("PNP0A06")),
    name("_UID", str("PCI hotplug")),
    name("_CRS", resourceTemplate(ioPort(base, base, 1, segments * 16))),
    opRegion("PCST", RegionSpace.SystemIO, base, segments * 16),
    field("PCST", FieldAccess.DWord, false, FieldUpdate.WriteAsZeros, units),
    method("PSCN", 0, true, ...scan),
  );
}

/** PCI Express host bridge for segment 0 with its bus, I/O and memory windows. */
export function pciHostBridge(
  memSize: number | undefined,
  extra: Aml[] = [],
  hotplugSize = 0,
  segments = 1,
): Aml {
  const m64 = pciMmio64Window(memSize ?? Layout.mmioHoleStart, hotplugSize);
  const w32 = pciSegmentMmio32(0, segments);
  return device(
    "PCI0",
    name("_HID", eisaId("PNP0A08")),
    name("_CID", eisaId("PNP0A03")),
    name("_SEG", int(0)),
    name("_UID", int(0)),
    name("_BBN", int(Layout.pciBusStart)),
    name(
      "_CRS",
      resourceTemplate(
        wordBusNumber(Layout.pciBusStart, Layout.pciBusEnd),
        ioPort(0xcf8, 0xcf8, 1, 8),
        wordIo(0x0000, 0x0cf7),
        wordIo(0x0d00, 0xffff),
        dwordMemory(w32.base, w32.base + w32.size - 1),
        qwordMemory(m64.start, m64.start + m64.size - 1),
      ),
    ),
    ...extra,
  );
}

/** The host bridge of PCI segment `segment` (1..): its bus 0 and its slice of the 32-bit window. */
export function pciSegmentHostBridge(segment: number, segments: number, extra: Aml[] = []): Aml {
  const w32 = pciSegmentMmio32(segment, segments);
  return device(
    pciSegmentName(segment),
    name("_HID", eisaId("PNP0A08")),
    name("_CID", eisaId("PNP0A03")),
    name("_SEG", int(segment)),
    name("_UID", int(segment)),
    name("_BBN", int(0)),
    name("_CRS", resourceTemplate(wordBusNumber(0, 0), dwordMemory(w32.base, w32.base + w32.size - 1))),
    ...extra,
  );
}

/** Motherboard resources (PNP0C02): reserves the ECAM so the OS accepts the MCFG region. */
export function motherboardResources(segments = 1): Aml {
  return device(
    "MBRD",
    name("_HID", eisaId("PNP0C02")),
    name("_UID", int(0)),
    name(
      "_CRS",
      resourceTemplate(
        memory32Fixed(Layout.pciEcamStart, Layout.pciEcamSize, true),
        ...(segments > 1
          ? [memory32Fixed(pciSegmentEcam(1).base, (segments - 1) * pciSegmentEcam(1).size, true)]
          : []),
      ),
    ),
  );
}

/**
 * vCPU hotplug: the controller (CPHP, one I/O byte per possible vCPU: present, inserting, removing, eject)
 * with CSCN, which the GED calls, and a processor object (ACPI0007) per possible vCPU. CSCN notifies
 * each vCPU just added (1, device check: the guest adds it; it is then onlined) and each one the VMM wants
 * back (3, eject request: the guest takes it offline and calls its _EJ0), acknowledging both.
 */
export function cpuHotplug(max: number): Aml[] {
  const base = Layout.cpuHotplugPort;
  const units = [];
  for (let i = 0; i < max; i++) {
    units.push(
      { name: `CE${hex2(i)}`, bits: 1 },
      { name: `CI${hex2(i)}`, bits: 1 },
      { name: `CR${hex2(i)}`, bits: 1 },
      { name: `CJ${hex2(i)}`, bits: 1 },
      { name: "", bits: 4 },
    );
  }
  const scan: Aml[] = [];
  for (let i = 0; i < max; i++) {
    const cpu = `\\_SB.C${hex3(i)}`;
    scan.push(
      ifThen(ref(`CI${hex2(i)}`), notify(ref(cpu), int(1)), store(int(1), ref(`CI${hex2(i)}`))),
      ifThen(ref(`CR${hex2(i)}`), notify(ref(cpu), int(3)), store(int(1), ref(`CR${hex2(i)}`))),
    );
  }
  const controller = device(
    "CPHP",
    name("_HID", eisaId("PNP0A06")),
    name("_UID", str("CPU hotplug")),
    name("_CRS", resourceTemplate(ioPort(base, base, 1, max))),
    opRegion("CPST", RegionSpace.SystemIO, base, max),
    field("CPST", FieldAccess.Byte, false, FieldUpdate.WriteAsZeros, units),
    method("CSCN", 0, true, ...scan),
  );
  const processors = Array.from({ length: max }, (_, i) => {
    const enabled = ref(`\\_SB.CPHP.CE${hex2(i)}`);
    // _MAT: the vCPU's MADT entry (processor UID i, APIC id i, enabled), which maps it when it arrives.
    const mat = Uint8Array.of(0, 8, i, i, 1, 0, 0, 0);
    return device(
      `C${hex3(i)}`,
      name("_HID", str("ACPI0007")),
      name("_UID", int(i)),
      method("_STA", 0, false, ifThen(enabled, ret(int(0x0f))), ret(int(0))),
      name("_MAT", buffer(mat)),
      ...(i === 0 ? [] : [method("_EJ0", 1, true, store(int(1), ref(`\\_SB.CPHP.CJ${hex2(i)}`)))]),
    );
  });
  return [controller, ...processors];
}

/**
 * ACPI memory hotplug: the controller (MHPC, one I/O byte per slot: plugged, just plugged) with MSCN, which
 * the GED calls, and a memory device (PNP0C80) per slot with its fixed range; _STA follows the controller.
 * MSCN notifies each slot just plugged (1, device check): the guest adds the range (then onlines it).
 */
export function memoryHotplug(m: { start: number; slot: number; count: number }): Aml[] {
  const base = Layout.memoryHotplugPort;
  const units = [];
  for (let i = 0; i < m.count; i++) {
    units.push({ name: `MP${hex2(i)}`, bits: 1 }, { name: `MI${hex2(i)}`, bits: 1 }, { name: "", bits: 6 });
  }
  const scan: Aml[] = [];
  for (let i = 0; i < m.count; i++) {
    scan.push(
      ifThen(
        ref(`MI${hex2(i)}`),
        notify(ref(`\\_SB.MS${hex2(i)}`), int(1)),
        store(int(1), ref(`MI${hex2(i)}`)),
      ),
    );
  }
  const controller = device(
    "MHPC",
    name("_HID", eisaId("PNP0A06")),
    name("_UID", str("Memory hotplug")),
    name("_CRS", resourceTemplate(ioPort(base, base, 1, m.count))),
    opRegion("MHST", RegionSpace.SystemIO, base, m.count),
    field("MHST", FieldAccess.Byte, false, FieldUpdate.WriteAsZeros, units),
    method("MSCN", 0, true, ...scan),
  );
  const slots = Array.from({ length: m.count }, (_, i) => {
    const at = m.start + i * m.slot;
    return device(
      `MS${hex2(i)}`,
      name("_HID", eisaId("PNP0C80")),
      name("_UID", int(i)),
      method("_STA", 0, false, ifThen(ref(`\\_SB.MHPC.MP${hex2(i)}`), ret(int(0x0f))), ret(int(0))),
      name(
        "_CRS",
        resourceTemplate(qwordMemory(at, at + m.slot - 1, MemCache.Cacheable, { consumer: true })),
      ),
    );
  });
  return [controller, ...slots];
}

const hex3 = (n: number) => n.toString(16).toUpperCase().padStart(3, "0");

/** The DSDT body (AML after the table header). */
export function dsdtAml(o: DsdtOptions = {}): Aml {
  const sb: Aml[] = [];
  const pci = o.pci ?? true;
  const hotplug = pci && (o.pciHotplug ?? true);
  if (pci) {
    const segments = o.pciSegments ?? 1;
    const slots = (s: number) => hotplug ? pciHotplugSlots(s) : [];
    sb.push(pciHostBridge(o.memSize, [...(o.pciDevices ?? []), ...slots(0)], o.hotplugSize, segments));
    for (let s = 1; s < segments; s++) sb.push(pciSegmentHostBridge(s, segments, slots(s)));
    sb.push(motherboardResources(segments));
    if (hotplug) sb.push(pciHotplugController(segments));
  }
  if (o.serial ?? true) sb.push(com1());
  const cpus = o.cpus !== undefined && o.cpus.max > o.cpus.boot;
  if (cpus) sb.push(...cpuHotplug(o.cpus!.max));
  const memory = (o.memorySlots?.count ?? 0) > 0;
  if (memory) sb.push(...memoryHotplug(o.memorySlots!));
  sb.push(powerButton(), ged(hotplug, cpus, memory), ...(o.sbDevices ?? []));
  return cat(s5Package(), scope("\\_SB", ...sb));
}
