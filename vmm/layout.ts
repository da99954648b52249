/**
 * Guest physical memory map of an x86-64 dvmm guest.
 *
 * ```
 * 0x0000_0000  real-mode IVT / BIOS data area (left alone)
 * 0x0000_0500  boot GDT (6 entries), boot IDT (empty) at 0x0540
 * 0x0000_6000  PVH hvm_start_info, module list at 0x6040, memory map at 0x6100
 * 0x0000_7000  Linux zero page (struct boot_params)
 * 0x0000_8ff0  boot stack top
 * 0x0000_9000  PML4, PDPT at 0xA000, four page directories at 0xB000..0xEFFF (identity map of 4 GiB)
 * 0x0002_0000  kernel command line (up to 64 KiB)
 * 0x0009_fc00  EBDA .. 0x10_0000 (reserved in E820; ACPI tables live at 0xE0000, RSDP first)
 * 0x0010_0000  high RAM; the kernel is loaded at its pref_address (16 MiB for relocatable kernels)
 *              ... initramfs at the top of low RAM, 4 KiB aligned
 * 0xC000_0000  32-bit MMIO hole: device window 0xC000_0000..0xE800_0000,
 *              PCI ECAM 0xE800_0000..0xF800_0000 (256 buses), ECAM of segments 1.. from 0xF800_0000
 *              (1 MiB each), IOAPIC 0xFEC0_0000, LAPIC 0xFEE0_0000
 * 0x1_0000_0000  RAM above 4 GiB (whatever does not fit below the hole)
 * after RAM    64-bit MMIO window (1 GiB aligned, 64 GiB)
 * ```
 *
 * Legacy I/O ports used by the ACPI platform device (see {@link Layout.acpiPm}): sleep control 0x600,
 * sleep status 0x601, reset 0x602, GED event status 0x608.
 */

/** One contiguous range of guest RAM. */
export interface RamRegion {
  gpa: number;
  size: number;
}

/** E820 entry types (also the PVH hvm_memmap_table_entry types). */
export const E820_RAM = 1;
export const E820_RESERVED = 2;
export const E820_ACPI = 3;

export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Start of the 32-bit MMIO hole: RAM below it, devices above it up to 4 GiB. */
const MMIO_HOLE_START = 0xC000_0000;
/** First address above the 32-bit space. */
const FOUR_GIB = 0x1_0000_0000;
const PCI_ECAM_START = 0xE800_0000;
const PCI_ECAM_SIZE = 256 * MiB;
const MMIO64_SIZE = 64 * GiB;

/** The fixed guest physical addresses. All values are plain numbers (GPAs). */
export const Layout = {
  /** Boot GDT: null, code32 (0x08), code64 (0x10 = __BOOT_CS), data (0x18 = __BOOT_DS), TSS (0x20, 16 bytes). */
  gdtAddr: 0x500,
  gdtEntries: 6,
  /** An empty IDT (limit 0): the guest installs its own before enabling interrupts. */
  idtAddr: 0x540,
  /** PVH: struct hvm_start_info (56 bytes). */
  pvhStartInfoAddr: 0x6000,
  /** PVH: hvm_modlist_entry array (32 bytes each; one for the initramfs). */
  pvhModlistAddr: 0x6040,
  /** PVH: hvm_memmap_table_entry array (24 bytes each, up to 160). */
  pvhMemmapAddr: 0x6100,
  pvhMemmapMax: 160,
  /** Linux: struct boot_params (4 KiB). */
  zeroPageAddr: 0x7000,
  /** Initial stack pointer of the boot CPU. */
  bootStackTop: 0x8ff0,
  /** Page tables for the 64-bit entry: PML4, PDPT, then `pdCount` page directories (2 MiB pages). */
  pml4Addr: 0x9000,
  pdptAddr: 0xA000,
  pdAddr: 0xB000,
  pdCount: 4,
  /** Kernel command line and its maximum size (NUL included). */
  cmdlineAddr: 0x20000,
  cmdlineMax: 0x10000,
  /** Extended BIOS data area: E820 reserved from here up to 1 MiB. */
  ebdaStart: 0x9FC00,
  /** ACPI tables: RSDP at the start, other tables after it, all below 1 MiB. */
  acpiStart: 0xE0000,
  acpiEnd: 0x100000,
  rsdpAddr: 0xE0000,
  /** First byte above the legacy area: where "high" memory begins. */
  highMemStart: 0x100000,
  /** Default load address of a kernel that has no preference (protocol < 2.10). */
  kernelDefaultAddr: 0x100000,

  /** 32-bit MMIO hole [mmioHoleStart, 4 GiB). */
  mmioHoleStart: MMIO_HOLE_START,
  mmioHoleEnd: FOUR_GIB,
  /** 32-bit device MMIO window (PCI BARs, virtio-mmio if any) inside the hole, below ECAM. */
  mmio32Start: MMIO_HOLE_START,
  mmio32Size: PCI_ECAM_START - MMIO_HOLE_START,
  /** PCI Express ECAM window for segment 0 (room for buses 0..255, 1 MiB per bus). */
  pciEcamStart: PCI_ECAM_START,
  pciEcamSize: PCI_ECAM_SIZE,
  /**
   * The buses the MCFG and the host bridge describe: bus 0 only, the one bus dvmm has (as Cloud
   * Hypervisor). Describing 0..255 made Linux probe 255 empty buses one type-1 config cycle at a time
   * (its "peer bridge" fix-up): some 16,000 port exits at boot, 1.2 s of guest time in the lab.
   */
  pciBusStart: 0,
  pciBusEnd: 0,
  /** IOAPIC (one, id 0, GSI base 0, 24 pins). */
  ioapicAddr: 0xFEC0_0000,
  ioapicSize: 0x1000,
  ioapicPins: 24,
  /** KVM_SET_TSS_ADDR: three pages KVM uses for real-mode emulation on VMX (inside the hole, below IOAPIC). */
  tssAddr: 0xFFFB_D000,
  /** Local APIC default base. */
  lapicAddr: 0xFEE0_0000,
  lapicSize: 0x10_0000,
  /** Start of RAM above 4 GiB. */
  highRamStart: FOUR_GIB,
  /** Size of the 64-bit MMIO window placed after the end of RAM (see {@link mmio64Window}). */
  mmio64Size: MMIO64_SIZE,

  /**
   * The ACPI platform device (hardware-reduced ACPI: FADT sleep control/status and reset registers,
   * plus the GED used for the power button). All registers are 8-bit legacy I/O ports.
   */
  acpiPm: {
    /** Sleep control register: the guest writes SLP_EN (bit 5) | SLP_TYP << 2. */
    sleepControlPort: 0x600,
    /** Sleep status register: reads 0; writes (WAK_STS clear, 0x80) are ignored. */
    sleepStatusPort: 0x601,
    /** Reset register: writing {@link Layout.acpiPm.resetValue} reboots the VM. */
    resetPort: 0x602,
    resetValue: 0x01,
    /** SLP_TYP for S5 (the \_S5 package); the sleep control write for power-off is 0x34. */
    s5SleepType: 5,
    /** Value written to the sleep control register to power off: SLP_EN | (S5 << 2). */
    s5ControlValue: (1 << 5) | (5 << 2),
    /** Ports claimed by the device: [0x600, 0x600 + portCount). */
    portCount: 0x10,
    /** GED event status register: read by the GED _EVT method; bit 0 = power button. Read clears. */
    gedStatusPort: 0x608,
    gedPowerButtonBit: 0x01,
    /** GED event bit: the PCI hotplug controller has slots to scan (devices arrived or to eject). */
    gedPciHotplugBit: 0x02,
    /** GED event bit: the vCPU hotplug controller has vCPUs to scan (added, or to give up). */
    gedCpuHotplugBit: 0x04,
    /** GED event bit: the memory hotplug controller has slots to scan. */
    gedMemoryHotplugBit: 0x08,
    /** GSI (IOAPIC pin) of the GED interrupt: edge-triggered, active high. */
    gedGsi: 5,
    /** GSI given as SCI_INT in the FADT (unused by hardware-reduced ACPI, but must be sane). */
    sciGsi: 9,
  },

  /**
   * The PCI hotplug controller (devices/pci_hotplug.ts): 16 I/O ports per PCI segment from here, which
   * the DSDT's PHPR device claims. Outside the PCI I/O window dvmm's devices use (they have no I/O BARs).
   */
  pciHotplugPort: 0xae00,
  /** The vCPU hotplug controller (devices/cpu_hotplug.ts): one I/O port per possible vCPU from here. */
  cpuHotplugPort: 0xb800,
  /** The ACPI memory hotplug controller (devices/memory_hotplug.ts): one I/O port per slot from here. */
  memoryHotplugPort: 0xba00,
} as const;

/** Alias of {@link Layout}. */
export const layout = Layout;

/** Guest RAM regions for a VM of `sizeBytes`: below the 32-bit hole, then from 4 GiB. */
export function ramRegions(sizeBytes: number): RamRegion[] {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw new RangeError(`invalid guest memory size ${sizeBytes}`);
  }
  if (sizeBytes % 4096 !== 0) {
    throw new RangeError(`guest memory size ${sizeBytes} is not a multiple of 4 KiB`);
  }
  if (sizeBytes < 2 * MiB) throw new RangeError(`guest memory size ${sizeBytes} is below the 2 MiB minimum`);
  const low = Math.min(sizeBytes, MMIO_HOLE_START);
  const regions: RamRegion[] = [{ gpa: 0, size: low }];
  if (sizeBytes > low) regions.push({ gpa: FOUR_GIB, size: sizeBytes - low });
  return regions;
}

/** End (exclusive) of RAM below the 32-bit hole. */
export function lowRamEnd(sizeBytes: number): number {
  return Math.min(sizeBytes, MMIO_HOLE_START);
}

/** First address after all RAM (above 4 GiB when RAM spills over the hole). */
export function ramEnd(sizeBytes: number): number {
  return sizeBytes > MMIO_HOLE_START ? FOUR_GIB + (sizeBytes - MMIO_HOLE_START) : sizeBytes;
}

/** ECAM of PCI segments 1..: bus 0 only (1 MiB each), in the hole above segment 0's, below the IOAPIC. */
const PCI_ECAM_EXTRA_START = PCI_ECAM_START + PCI_ECAM_SIZE;
/** Most PCI segments (Cloud Hypervisor's limit too). */
export const MAX_PCI_SEGMENTS = 96;

/** The ECAM window of PCI segment `segment` (segment 0: all 256 buses; the others: bus 0). */
export function pciSegmentEcam(segment: number): { base: number; size: number } {
  if (segment === 0) return { base: PCI_ECAM_START, size: PCI_ECAM_SIZE };
  if (segment < 0 || segment >= MAX_PCI_SEGMENTS) throw new RangeError(`PCI segment ${segment} out of range`);
  return { base: PCI_ECAM_EXTRA_START + (segment - 1) * MiB, size: MiB };
}

/** Segment `segment`'s slice of the 32-bit BAR window, when it is shared by `count` segments (1 MiB aligned). */
export function pciSegmentMmio32(segment: number, count: number): { base: number; size: number } {
  const slice = Math.floor(Layout.mmio32Size / count / MiB) * MiB;
  return { base: Layout.mmio32Start + segment * slice, size: slice };
}

/**
 * Address space kept for memory hotplug (`memory.hotplug_size`): from the end of RAM (at least from
 * 4 GiB), 1 GiB aligned. Nothing is mapped there until memory is plugged.
 */
export function hotplugRegion(sizeBytes: number, hotplugBytes: number): { start: number; size: number } {
  const end = Math.max(ramEnd(sizeBytes), FOUR_GIB);
  return { start: Math.ceil(end / GiB) * GiB, size: hotplugBytes };
}

/** Smallest ACPI memory hotplug slot: Linux's memory block size on x86-64 guests below 64 GiB. */
export const MEMORY_SLOT_MIN = 128 * MiB;
/** Most memory slots (each a DSDT device, a KVM memory slot and a mapping). */
export const MEMORY_SLOTS_MAX = 256;

/**
 * The ACPI memory hotplug slots over the hotplug region: equal slots, 128 MiB each, or a larger power-of-two
 * multiple of it so that there are at most MEMORY_SLOTS_MAX. `count` is 0 when the region is smaller than
 * a slot.
 */
export function memoryHotplugSlots(
  sizeBytes: number,
  hotplugBytes: number,
): { start: number; slot: number; count: number } {
  const h = hotplugRegion(sizeBytes, hotplugBytes);
  let slot = MEMORY_SLOT_MIN;
  while (Math.floor(hotplugBytes / slot) > MEMORY_SLOTS_MAX) slot *= 2;
  return { start: h.start, slot, count: Math.floor(hotplugBytes / slot) };
}

/**
 * Device memory (virtio-pmem regions): the first half of the 64-bit window. The guest is never told it
 * may put BARs there (the host bridge's window is the second half), so a BAR the guest assigns to a
 * hot-added device cannot land on a pmem region it does not know about yet.
 */
export function deviceMemoryWindow(sizeBytes: number, hotplugBytes = 0): { start: number; size: number } {
  const w = mmio64Window(sizeBytes, hotplugBytes);
  return { start: w.start, size: w.size / 2 };
}

/** The part of the 64-bit window the PCI host bridge describes for BARs (the second half). */
export function pciMmio64Window(sizeBytes: number, hotplugBytes = 0): { start: number; size: number } {
  const w = mmio64Window(sizeBytes, hotplugBytes);
  return { start: w.start + w.size / 2, size: w.size / 2 };
}

/** The 64-bit MMIO window: after RAM and the hotplug region (at least from 4 GiB), aligned to 1 GiB. */
export function mmio64Window(sizeBytes: number, hotplugBytes = 0): { start: number; size: number } {
  const h = hotplugRegion(sizeBytes, hotplugBytes);
  const start = Math.ceil((h.start + h.size) / GiB) * GiB;
  return { start, size: MMIO64_SIZE };
}

/**
 * The E820 map handed to the guest: usable [0, EBDA), reserved EBDA..1 MiB (BIOS area, ACPI tables),
 * usable 1 MiB..min(RAM, hole), reserved PCI ECAM (so Linux accepts MCFG), usable RAM above 4 GiB.
 */
export function e820(sizeBytes: number): E820Entry[] {
  ramRegions(sizeBytes); // validates
  const low = lowRamEnd(sizeBytes);
  const out: E820Entry[] = [
    { addr: 0, size: Layout.ebdaStart, type: E820_RAM },
    { addr: Layout.ebdaStart, size: Layout.highMemStart - Layout.ebdaStart, type: E820_RESERVED },
  ];
  if (low > Layout.highMemStart) {
    out.push({ addr: Layout.highMemStart, size: low - Layout.highMemStart, type: E820_RAM });
  }
  out.push({ addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type: E820_RESERVED });
  if (sizeBytes > low) out.push({ addr: FOUR_GIB, size: sizeBytes - low, type: E820_RAM });
  return out;
}

/**
 * Where to put an initramfs of `size` bytes: as high as possible below `maxEnd` (exclusive; the
 * smaller of low RAM's end and the kernel's initrd_addr_max + 1), 4 KiB aligned, not below `minAddr`.
 * Returns null when it does not fit.
 */
export function initramfsAddress(
  sizeBytes: number,
  size: number,
  maxEnd: number,
  minAddr: number,
): number | null {
  const top = Math.min(lowRamEnd(sizeBytes), maxEnd);
  const addr = Math.floor((top - size) / 4096) * 4096;
  if (size < 0 || addr < minAddr || addr + size > top) return null;
  return addr;
}
