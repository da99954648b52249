/**
 * The VM's platform devices as seen from every thread.
 *
 * The main thread creates the devices' shared state once ({@link createPlatform}); each vCPU worker
 * rebuilds its own device objects over that state ({@link buildPlatformBuses}). Interrupts go through
 * KVM_IRQ_LINE on the VM fd and output through raw fd writes, so both work from any thread.
 */
import { VmFd } from "../ffi/kvm.ts";
import { check, cstr, EAGAIN, EINTR, shim } from "../ffi/shim.ts";
import { O_APPEND, O_CREAT, O_TRUNC, O_WRONLY, POLLOUT } from "../ffi/kvm_constants.ts";
import type { VmConfig } from "./vm_config.ts";
import { deviceIds } from "./device_ids.ts";
import { MmioBus, PioBus } from "../devices/bus.ts";
import { type ByteSink, EventSource, type IrqLine, type VmEventSink } from "../devices/shared.ts";
import {
  buildLegacyDevices,
  createLegacyDescriptors,
  type LegacyDescriptors,
  type LegacyDevices,
} from "../devices/legacy.ts";
import { Layout, lowRamEnd, memoryHotplugSlots } from "./layout.ts";
import { VmEvent, type VmEvents } from "./vcpu_control.ts";
import { DEFAULT_ZONE, ramSize } from "./ram.ts";
import {
  buildPciBuses,
  createPci,
  type DevicePlacement,
  type PciDescriptors,
  type PciHost,
  type PciThread,
  type VirtioMemRegion,
  wantsPci,
} from "./pci_platform.ts";
import type { BalloonControl } from "../devices/virtio/balloon.ts";
import { type HostEnd, openPty, openSocketEnd } from "./host_end.ts";
import { CpuHotplug, type CpuHotplugDescriptor } from "../devices/cpu_hotplug.ts";
import { MemoryHotplug, type MemoryHotplugDescriptor } from "../devices/memory_hotplug.ts";
import {
  type CoalescedPioDescriptor,
  CoalescedRing,
  CoalescedZone,
  createCoalescedPio,
} from "./coalesced_pio.ts";

/** The serial flush beat while the guest writes, once it has been quiet, and after how many quiet beats. */
const FLUSH_BUSY_MS = 20;
const FLUSH_IDLE_MS = 100;
const FLUSH_QUIET_BEATS = 50;

/** Everything a thread needs to rebuild the platform: structured-cloneable. */
export interface PlatformDescriptors {
  vmFd: number;
  vcpuMmapSize: number;
  /** Raw fd the serial port writes to, or -1 to discard output. */
  serialOutFd: number;
  /** Output the fd does not take at once is dropped (pty and socket modes: never wait on a reader). */
  serialOutDrops: boolean;
  legacy: LegacyDescriptors;
  /** PCI segment with virtio devices, or null when the VM has none. */
  pci: PciDescriptors | null;
  /** The vCPU hotplug controller (when max_vcpus > boot_vcpus). */
  cpuHotplug: CpuHotplugDescriptor | null;
  /** The ACPI memory hotplug controller (hotplug_size with hotplug_method=acpi). */
  memoryHotplug: MemoryHotplugDescriptor | null;
  /** The serial transmit register's coalesced zone, or null (see coalesced_pio.ts). */
  coalesced: CoalescedPioDescriptor | null;
}

/** Writes all of `bytes` to a raw fd, waiting when the fd is non-blocking and full. */
export function writeAllFd(fd: number, bytes: Uint8Array): void {
  const s = shim();
  let off = 0;
  while (off < bytes.length) {
    const n = s.kvs_write_i32(fd, bytes.subarray(off), bytes.length - off);
    if (n >= 0) off += n;
    else if (n === -EAGAIN) s.kvs_poll1(fd, POLLOUT, 100);
    else if (n !== -EINTR) return; // the reader went away: output is dropped, the guest keeps running
  }
}

function fdSink(fd: number, drops = false): ByteSink {
  if (fd < 0) return { write() {} };
  if (drops) return { write: (b) => void shim().kvs_write_i32(fd, b, b.length) };
  return { write: (b) => writeAllFd(fd, b) };
}

function irqLine(vm: VmFd, gsi: number): IrqLine {
  return {
    set: (level) => vm.irqLine(gsi, level ? 1 : 0),
    pulse: () => {
      vm.irqLine(gsi, 1);
      vm.irqLine(gsi, 0);
    },
  };
}

function eventSink(events: VmEvents): VmEventSink {
  return { request: (e, by) => events.raise(e === "poweroff" ? VmEvent.Poweroff : VmEvent.Reboot, by) };
}

function vmOf(d: PlatformDescriptors): VmFd {
  return VmFd.fromDescriptor({ fd: d.vmFd, vcpuMmapSize: d.vcpuMmapSize });
}

function build(d: PlatformDescriptors, events: VmEvents, pio = new PioBus()): LegacyDevices {
  const vm = vmOf(d);
  if (d.cpuHotplug) {
    const c = new CpuHotplug(d.cpuHotplug);
    pio.register(c.base, c.len, c, "cpu-hotplug");
  }
  if (d.memoryHotplug) {
    const m = new MemoryHotplug(d.memoryHotplug);
    pio.register(m.base, m.len, m, "memory-hotplug");
  }
  const zone = d.coalesced ? new CoalescedZone(d.coalesced, vm) : null;
  return buildLegacyDevices(d.legacy, {
    serialIrq: irqLine(vm, d.legacy.serial.irq),
    serialOut: fdSink(d.serialOutFd, d.serialOutDrops),
    // THR writes are coalesced only while the guest polls (THRI off): see coalesced_pio.ts.
    serialTxInterrupt: zone ? (enabled) => zone.set(!enabled) : undefined,
    events: eventSink(events),
    gedIrq: d.legacy.acpiPm ? irqLine(vm, d.legacy.acpiPm.gedGsi) : undefined,
    kbdIrq: irqLine(vm, 1),
    auxIrq: irqLine(vm, 12),
  }, pio);
}

/**
 * vCPU worker side: this thread's buses over the shared device state, and the coalesced ring (over
 * `mapping`, the vCPU's kvm_run mmap) when the VM has one: drain it before handling an exit.
 */
export function buildPlatformBuses(
  d: PlatformDescriptors,
  events: VmEvents,
  mapping?: Uint8Array,
): { pio: PioBus; mmio: MmioBus; pci: PciThread | null; ring: CoalescedRing | null } {
  const { pio } = build(d, events);
  const ring = d.coalesced && mapping ? new CoalescedRing(d.coalesced, mapping) : null;
  const mmio = new MmioBus();
  let pci: PciThread | null = null;
  if (d.pci) {
    pci = buildPciBuses(d.pci, vmOf(d), pio, mmio);
    // 0xCF9, the PC's reset control register: bit 2 (RST_CPU) resets the machine (Linux's reboot=pci).
    pci.bus.onResetControl = (value) => {
      if (value & 0x04) events.raise(VmEvent.Reboot, EventSource.PciResetControl);
    };
  }
  return { pio, mmio, pci, ring };
}

/** Main-thread handle on the platform devices. */
export interface Platform {
  readonly descriptors: PlatformDescriptors;
  /** Whether the DSDT should describe a PCI host bridge (and an MCFG be written). */
  readonly pciAcpi: boolean;
  /** Host input for the serial port; returns the bytes accepted (the rest is for a later call). */
  serialInput(bytes: Uint8Array): number;
  powerButton(): void;
  counters(): Record<string, Record<string, number>>;
  deviceTree(): Record<string, unknown>;
  /** The virtio-balloon's target and actual size, or null when the VM has none. */
  readonly balloon: BalloonControl | null;
  /** The PCI segments (hotplug, device tree), or null when the VM has no PCI devices. */
  readonly pci: PciHost | null;
  /** The vCPU hotplug controller, or null when max_vcpus = boot_vcpus. */
  readonly cpuHotplug: CpuHotplug | null;
  /** The ACPI memory hotplug controller, or null without hotplug_size (or with virtio-mem). */
  readonly memoryHotplug: MemoryHotplug | null;
  /** Raises GED event bits (hotplug scans). */
  raiseGed(bits: number): void;
  /**
   * Gives the main thread the coalesced ring, through vCPU 0's kvm_run mmap (`mapping`), and puts the
   * zone in the state the serial port's IER asks for (after a restore, IER is the snapshot's).
   */
  attachVcpuMapping(mapping: Uint8Array): void;
  /** Replays coalesced writes still in the ring (before device state is saved). */
  drainCoalesced(): void;
  /** Stops the device workers and releases fds (after the vCPUs have stopped). */
  close(): Promise<void>;
}

/** The ACPI memory hotplug controller a config asks for (hotplug_size, hotplug_method=acpi), or null. */
function memoryHotplugDescriptor(cfg: VmConfig): MemoryHotplugDescriptor | null {
  const m = cfg.memory;
  if (!m.hotplug_size || m.hotplug_method !== "Acpi") return null;
  const slots = memoryHotplugSlots(ramSize(m), m.hotplug_size);
  return slots.count > 0 ? MemoryHotplug.createDescriptor(Layout.memoryHotplugPort, slots.count) : null;
}

function openOutput(path: string): number {
  return check(shim().kvs_open(cstr(path), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0o644), `open ${path}`);
}

/** Refuses configuration this VMM cannot honour yet, naming what is missing. */
export function checkSupported(cfg: VmConfig): void {
  const missing = (what: string, option: string) => {
    throw new Error(`${what} is not implemented in dvmm yet (${option})`);
  };
  if (cfg.devices?.length) missing("VFIO device passthrough", "--device / devices");
  if (cfg.user_devices?.length) missing("vfio-user devices", "--user-device / user_devices");
  if (cfg.vdpa?.length) missing("vDPA devices", "--vdpa / vdpa");
  if (cfg.numa?.length) missing("guest NUMA nodes", "--numa / numa");
  if (cfg.tpm) missing("a TPM", "--tpm / tpm");
  if (cfg.iommu) missing("a virtual IOMMU", "iommu");
  if (cfg.watchdog) missing("the virtio watchdog", "--watchdog / watchdog");
  if (cfg.pvpanic) missing("the pvpanic device", "--pvpanic / pvpanic");
  if (cfg.rate_limit_groups?.length) missing("rate-limit groups", "rate_limit_groups");
  // Segments share the 32-bit BAR window equally: CH's default weights, and no others.
  if (cfg.pci_segments?.some((p) => p.mmio32_aperture_weight !== 1 || p.mmio64_aperture_weight !== 1)) {
    missing(
      "PCI aperture weights other than 1",
      "--pci-segment mmio32_aperture_weight=/mmio64_aperture_weight=",
    );
  }
  if (cfg.debug_console && cfg.debug_console.mode !== "Off") {
    missing("the debug console (port 0xe9)", "--debug-console / debug_console");
  }
  for (const z of cfg.memory.zones ?? []) {
    const opt = `--memory-zone id=${z.id}`;
    if (z.hotplug_size && cfg.memory.hotplug_method !== "VirtioMem") {
      missing(
        "ACPI hotplug of memory zones (Cloud Hypervisor has none either)",
        `${opt},hotplug_size= needs hotplug_method=virtio-mem`,
      );
    }
    if (z.host_numa_node !== undefined) {
      missing("binding memory zones to host NUMA nodes", `${opt},host_numa_node=`);
    }
    if (z.hugepage_size !== undefined) missing("a memory zone's own huge page size", `${opt},hugepage_size=`);
    if (z.reserve) missing("reserving memory zones", `${opt},reserve=on`);
    if (z.hotplugged_size && !z.hotplug_size) {
      throw new Error(`${opt}: hotplugged_size needs the zone's hotplug_size`);
    }
    if (z.hotplug_size && z.hugepages) {
      missing("virtio-mem on huge pages", `${opt},hugepages=on with hotplug_size`);
    }
  }
  const m = cfg.memory;
  if (m.reserve) missing("reserving guest memory up front", "--memory reserve=on");
  if (m.size > 0 && m.zones?.length) {
    // As Cloud Hypervisor: either the default memory or zones.
    throw new Error("--memory size must be 0 when memory zones are given (--memory-zone)");
  }
  // hotplug_size need not be a 128 MiB multiple (Kata sends 25275924480): the usable part is rounded down
  // to whole 128 MiB blocks, and the errors of vm.resize name that usable size.
  if (m.hotplug_size && m.hotplug_method === "VirtioMem" && m.hugepages) {
    missing("virtio-mem on huge pages", "--memory hugepages=on with hotplug_method=virtio-mem");
  }
  if (m.hotplug_size && m.hotplug_method === "VirtioMem") {
    // The default memory's virtio-mem device is called mem0, as Cloud Hypervisor's.
    const clash = deviceIds(cfg).find((d) => d.id === DEFAULT_ZONE);
    if (clash) {
      throw new Error(`the id '${DEFAULT_ZONE}' is the default memory's virtio-mem device (${clash.where})`);
    }
  }
  // hotplug_size only reserves address space after RAM (layout.ts hotplugRegion) until hot-adding
  // memory is built; what would plug memory at boot is refused.
  if (cfg.memory.hotplugged_size && cfg.memory.hotplug_method !== "VirtioMem") {
    missing("ACPI memory plugged at boot", "--memory hotplugged_size= (with hotplug_method=acpi)");
  }
  if (cfg.payload.firmware) missing("booting firmware", "--firmware / payload.firmware");
  const console = cfg.console?.mode ?? "Off";
  if (console === "Socket") {
    missing(
      "virtio-console mode Socket (Cloud Hypervisor has none either)",
      "--console socket=; use pty, tty, file=PATH or off",
    );
  }

  // Settings that dvmm reads but has no machinery for: refused unless they ask for what dvmm does anyway.
  const c = cfg.cpus;
  if (c.affinity?.length) missing("vCPU affinity", "--cpus affinity=");
  if (c.kvm_hyperv) missing("Hyper-V enlightenments", "--cpus kvm_hyperv=on");
  if (c.features.amx) missing("AMX", "--cpus features=amx");
  if (!c.nested) missing("hiding nested virtualization from the guest", "--cpus nested=off");
  if (c.max_phys_bits !== 46) {
    missing("a guest physical address width other than 46", "--cpus max_phys_bits=");
  }
  const t = c.topology;
  if (t && (t.threads_per_core !== 1 || t.dies_per_package !== 1 || t.packages !== 1)) {
    missing("CPU topologies other than one package of single-threaded cores", "--cpus topology=");
  }
  const devices = [
    ...(cfg.disks ?? []),
    ...(cfg.net ?? []),
    ...(cfg.fs ?? []),
    ...(cfg.generic_vhost_user ?? []),
    ...(cfg.pmem ?? []),
    ...(cfg.balloon ? [cfg.balloon] : []),
    cfg.rng,
    cfg.console,
    ...(cfg.vsock ? [cfg.vsock] : []),
  ];
  if (devices.some((d) => d.pci_device_id !== undefined)) {
    missing("choosing a device's PCI slot", "pci_device_id=");
  }
  if (cfg.disks?.some((d) => d.rate_limiter_config) || cfg.net?.some((n) => n.rate_limiter_config)) {
    missing("I/O rate limiting", "bw_*/ops_* (rate_limiter_config)");
  }
  if (cfg.disks?.some((d) => d.queue_affinity?.length)) {
    missing("virtqueue affinity", "--disk queue_affinity=");
  }
  const p = cfg.platform;
  if (
    p && (p.system_serial_number ?? p.system_uuid ?? p.system_manufacturer ?? p.system_product_name ??
        p.system_version ?? p.system_family ?? p.system_sku_number ?? p.chassis_asset_tag ??
        p.oem_strings) !==
      undefined
  ) {
    missing("SMBIOS tables", "--platform system_*=/oem_strings=");
  }
  if (p?.tdx || p?.sev_snp) missing("confidential guests (TDX, SEV-SNP)", "--platform tdx/sev_snp");
  if (p?.iommufd || p?.iommufd_fd !== undefined) missing("iommufd", "--platform iommufd=");
}

/**
 * Creates the platform devices' shared state for a VM (main thread). `ram` (guest RAM as host
 * mappings) is needed when the VM has virtio devices: their workers access guest memory directly.
 */
export function createPlatform(
  cfg: VmConfig,
  vmFd: VmFd,
  events: VmEvents,
  ram: { gpa: number; size: number; hostAddr: bigint; fd?: number }[] = [],
  memTable?: SharedArrayBuffer,
  hotplugRam?: { gpa: number; size: number; hostAddr: bigint; fd?: number },
  virtioMemRegions: VirtioMemRegion[] = [],
  placement?: Map<string, DevicePlacement>,
): Platform {
  checkSupported(cfg);
  const memSize = ramSize(cfg.memory);
  const low = lowRamEnd(memSize);
  const legacy = createLegacyDescriptors({
    lowMemBytes: low,
    highMemBytes: memSize - low,
    cpus: cfg.cpus.boot_vcpus,
    acpiPm: Layout.acpiPm,
  });
  const mode = cfg.serial?.mode ?? "Null";
  let serialOutFd = -1;
  let ownFd = false;
  // pty and socket: a host end of dvmm's own; what the user types there goes to the UART.
  let hostEnd: HostEnd | null = null;
  const toUart = (bytes: Uint8Array) => void host.serial.enqueueInput(bytes);
  if (mode === "Tty") serialOutFd = 1;
  else if (mode === "File") {
    if (!cfg.serial?.file) throw new Error("serial mode File needs a file path");
    serialOutFd = openOutput(cfg.serial.file);
    ownFd = true;
  } else if (mode === "Pty") {
    hostEnd = openPty(toUart);
    // As Cloud Hypervisor, vm.info reports the terminal's path in `file`.
    cfg.serial.file = hostEnd.path;
  } else if (mode === "Socket") {
    if (!cfg.serial?.socket) throw new Error("serial mode Socket needs a socket path");
    hostEnd = openSocketEnd(cfg.serial.socket, toUart);
  }
  if (hostEnd) serialOutFd = hostEnd.outFd;
  const descriptors: PlatformDescriptors = {
    vmFd: vmFd.fd,
    vcpuMmapSize: vmFd.descriptor().vcpuMmapSize,
    serialOutFd,
    serialOutDrops: hostEnd !== null,
    legacy,
    pci: null,
    cpuHotplug: cfg.cpus.max_vcpus > cfg.cpus.boot_vcpus
      ? CpuHotplug.createDescriptor(Layout.cpuHotplugPort, cfg.cpus.max_vcpus, cfg.cpus.boot_vcpus)
      : null,
    memoryHotplug: memoryHotplugDescriptor(cfg),
    // DVMM_COALESCED_PIO=0 turns it off (benchmarks compare both).
    coalesced: Deno.env.get("DVMM_COALESCED_PIO") === "0"
      ? null
      : createCoalescedPio(vmFd, legacy.serial.base, 1),
  };
  const host = build(descriptors, events);
  const zone = descriptors.coalesced ? new CoalescedZone(descriptors.coalesced, vmFd) : null;
  let ring: CoalescedRing | null = null;
  const drain = () => {
    if (ring?.pending) ring.drain(host.pio);
  };
  let pci: PciHost | null = null;
  if (wantsPci(cfg)) {
    try {
      pci = createPci(
        cfg,
        vmFd,
        ram,
        host.pio,
        new MmioBus(),
        (bits) => host.acpiPm?.raiseEvent(bits),
        memTable,
        hotplugRam,
        virtioMemRegions,
        placement,
      );
    } catch (e) {
      zone?.set(false);
      if (ownFd) shim().kvs_close(serialOutFd);
      void hostEnd?.close();
      throw e;
    }
    descriptors.pci = pci.descriptors;
  }
  // Output is batched per line by the UART; a partial line (a shell prompt) is flushed here.
  // Coalesced THR writes are replayed on the same beat (a vCPU's next exit usually comes first).
  // Every 20 ms while the guest writes or input arrives; after a second of silence every 100 ms (each
  // beat wakes this thread, which in the lab cost a tenth of a CPU through a whole I/O benchmark with a
  // silent guest).
  let quietBeats = 0;
  let period = FLUSH_BUSY_MS;
  const beat = () => {
    const busy = (ring?.pending ?? false) || host.serial.pendingOutput > 0;
    drain();
    host.serial.flush();
    if (busy) busyBeat();
    else if (++quietBeats === FLUSH_QUIET_BEATS && period !== FLUSH_IDLE_MS) reschedule(FLUSH_IDLE_MS);
  };
  /** Output or input: back to the busy beat. */
  const busyBeat = () => {
    quietBeats = 0;
    if (period !== FLUSH_BUSY_MS) reschedule(FLUSH_BUSY_MS);
  };
  let flusher = setInterval(beat, period);
  const reschedule = (ms: number) => {
    clearInterval(flusher);
    period = ms;
    flusher = setInterval(beat, ms);
  };
  return {
    descriptors,
    pciAcpi: pci !== null,
    // stdin goes to the serial port when it uses the terminal, else to a terminal virtio-console.
    serialInput: (bytes) => {
      busyBeat(); // typing: the echo should come back on the busy beat
      return mode !== "Tty" && cfg.console?.mode === "Tty" && pci !== null
        ? Math.max(0, pci.consoleInput(bytes))
        : host.serial.enqueueInput(bytes);
    },
    powerButton: () => {
      if (!host.acpiPm) throw new Error("the VM has no ACPI power button");
      host.acpiPm.powerButton();
    },
    counters: () => pci?.counters() ?? {},
    balloon: pci?.balloon ?? null,
    pci,
    cpuHotplug: descriptors.cpuHotplug ? new CpuHotplug(descriptors.cpuHotplug) : null,
    memoryHotplug: descriptors.memoryHotplug ? new MemoryHotplug(descriptors.memoryHotplug) : null,
    raiseGed: (bits) => host.acpiPm?.raiseEvent(bits),
    attachVcpuMapping: (mapping) => {
      if (!descriptors.coalesced || !zone) return;
      ring = new CoalescedRing(descriptors.coalesced, mapping);
      zone.set(!host.serial.txInterruptEnabled);
    },
    drainCoalesced: drain,
    deviceTree: () => ({
      ...pci?.deviceTree(),
      __serial: {
        id: "__serial",
        resources: [{ PioAddressRange: { base: legacy.serial.base, size: 8 } }],
        children: [],
      },
    }),
    close: async () => {
      await pci?.close();
      clearInterval(flusher);
      drain();
      host.serial.flush();
      if (ownFd) shim().kvs_close(serialOutFd);
      await hostEnd?.close();
    },
  };
}
