/**
 * The VM: KVM objects, guest memory, the loaded payload, ACPI, devices and one Worker per vCPU.
 *
 * `Vm` implements the control loop's `VmBackend`. Guest-initiated events (poweroff, reboot, crash)
 * arrive through the shared {@link VmEvents} word; the VM stops its vCPUs and reports the event once.
 */
import { applyLandlock } from "./landlock.ts";
import {
  type HostMapping,
  kickTid,
  Kvm,
  mapAnonymous,
  mapFd,
  mapFilePrivate,
  mapMemfd,
  mappingBytes,
  unmap,
  type VcpuFd,
  type VmFd,
} from "../ffi/kvm.ts";
import type { SendMigrationData, VmConfig, VmResize } from "./vm_config.ts";
import { type GuestEvent, type VmBackend, VmmError } from "./control.ts";
import { GuestMemory, GuestMemoryTable } from "./memory.ts";
import { vcpuCpuid } from "./cpuid.ts";
import { Cmd, CTL_EXITS, State, VcpuControl, VmEvent, VmEvents } from "./vcpu_control.ts";
import type { PciChange, VcpuPciChange, VcpuWorkerExit, VcpuWorkerInit } from "./vcpu_worker.ts";
import type { HotplugKind } from "./control.ts";
import type { PciDeviceInfo } from "./vm_config.ts";
import type { PciHotplugRequest } from "./pci_platform.ts";
import { Layout, layout, memoryHotplugSlots } from "./layout.ts";
import { MEM_BLOCK_SIZE } from "../devices/virtio/mem.ts";
import { EVENT_SOURCE_NAMES } from "../devices/shared.ts";
import {
  DEFAULT_ZONE,
  hotplugSpace,
  mapPart,
  ramChunks,
  ramParts,
  ramSize,
  virtioMemPlacements,
} from "./ram.ts";
import type { VirtioMemRegion } from "./pci_platform.ts";
import { checkPayloadFiles, loadPayload } from "./loader/payload.ts";
import { writeAcpiTables } from "./acpi/tables.ts";
import { bspRegisters } from "./boot_cpu.ts";
import { writeResetVector } from "./reset_vector.ts";
import { checkSupported, createPlatform, type Platform } from "./platform.ts";
import { log } from "./log.ts";
import { shim } from "../ffi/shim.ts";
import { KVM_CAP_TSC_DEADLINE_TIMER, MADV_POPULATE_WRITE } from "../ffi/kvm_constants.ts";
import { fromBase64, loadVcpu, saveVcpu, toBase64 } from "./vcpu_state.ts";
import {
  MEMORY_FILE,
  type MemoryRange,
  newState,
  readRange,
  type RestoreSource,
  sharedBuffers,
  type SnapshotState,
  writeMemory,
} from "./snapshot.ts";
import { type CoreVcpu, writeCoredump } from "./coredump.ts";
import { DEVICE_WORKER, type DevicePlacement, deviceWorkerCount } from "./pci_platform.ts";
import { workerPool, workerUrl } from "./worker_pool.ts";
export { workerPool };
import { DirtyTracker, type TrackedSlot } from "./dirty.ts";
import {
  type MigrationHooks,
  type MigrationSource,
  type MigrationStats,
  sendMigration,
} from "./migration.ts";
import { lockImage, unlockImage } from "../devices/virtio/device_blk.ts";

const MSR = {
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  STAR: 0xc0000081,
  LSTAR: 0xc0000082,
  CSTAR: 0xc0000083,
  SYSCALL_MASK: 0xc0000084,
  KERNEL_GS_BASE: 0xc0000102,
  IA32_TSC: 0x10,
  IA32_MISC_ENABLE: 0x1a0,
  MTRR_DEF_TYPE: 0x2ff,
} as const;

const APIC_LVT_LINT0 = 0x350;
const APIC_LVT_LINT1 = 0x360;
const APIC_MODE_NMI = 0x4;
const APIC_MODE_EXTINT = 0x7;

/** The host reservation for ACPI memory hotplug (the default memory's hotplug_size), or null. */
function acpiHotplugReservation(m: VmConfig["memory"]): { start: number; size: number } | null {
  if (!m.hotplug_size || m.hotplug_method !== "Acpi") return null;
  const s = memoryHotplugSlots(ramSize(m), m.hotplug_size);
  return s.count > 0 ? { start: s.start, size: s.count * s.slot } : null;
}

/** KVM memory slots of virtio-mem regions (one each): after ACPI's. */
const VIRTIO_MEM_FIRST_SLOT = 400;

/** KVM memory slots of ACPI-hotplugged RAM: after boot RAM (0..) and pmem (32..). */
const MEMORY_HOTPLUG_FIRST_SLOT = 64;
/** How long the guest gets to let go of a device being removed (ACPI eject). */
const EJECT_TIMEOUT_MS = 20_000;
/** How long a vCPU thread gets to take a PCI change into its buses. */
const PCI_CHANGE_TIMEOUT_MS = 10_000;
/** Device kinds dvmm can hot-add (the others answer "not implemented"). */
const HOTPLUG_KINDS: readonly HotplugKind[] = ["disk", "net", "fs", "pmem", "vsock", "generic-vhost-user"];

/** Bytes in whole MiB (bit shifts would wrap above 2 GiB). */
function mib(n: number): number {
  return Math.floor(n / 2 ** 20);
}

/** Control words of the device state that stay with the host (never saved or loaded). */
const HOST_ONLY = new Set(["control", "coalesced"]);
/** Virtio device kinds whose state dvmm saves (vhost-user devices keep theirs in the back-end). */
const SAVABLE_KINDS = new Set(["rng", "blk", "net", "console", "pmem", "balloon", "vsock", "mem"]);
const MSR_KERNEL_GS_BASE = 0xc0000102;

/** A stretch of guest memory as a snapshot saves it. */
interface MemoryPiece {
  name: string;
  map: HostMapping;
}

interface VcpuThread {
  fd: VcpuFd;
  control: VcpuControl;
  worker: Worker;
  exited: Promise<VcpuWorkerExit>;
}

/** A running (or runnable) VM built from a VmConfig. */
export class Vm implements VmBackend, MigrationSource {
  #kvm?: Kvm;
  #vm?: VmFd;
  #maps: HostMapping[] = [];
  #mem?: GuestMemory;
  #vcpus: VcpuThread[] = [];
  /** Workers started for vCPUs that have not been handed one yet. */
  #idle: Worker[] = [];
  #events = new VmEvents();
  #platform?: Platform;
  #listeners: ((e: GuestEvent) => void)[] = [];
  #stopping = false;
  #closed = false;
  /**
   * How long the guest gets to let go of a device or vCPU being removed (ACPI eject), in ms: 20 s, as a
   * default; tests shorten it.
   */
  ejectTimeoutMs: number = EJECT_TIMEOUT_MS;
  #supportedCpuid?: ReturnType<Kvm["supportedCpuid"]>;
  /** KVM_CAP_TSC_DEADLINE_TIMER: the guest is told its LAPIC has the TSC-deadline mode. */
  #tscDeadline = false;
  #msrList = new Set<number>();
  /** virtio-mem regions by zone id: the region's size and the zone's boot size. */
  #virtioMemZones = new Map<string, { size: number; base: number }>();
  /** The reserved ACPI memory hotplug region (plugged slots are parts of it). */
  #hotplugRam?: { gpa: number; size: number; hostAddr: bigint; fd?: number };
  /** RAM plugged after boot, as the device threads learn of it. */
  #memTable = new GuestMemoryTable();
  /** vCPUs unplugged by the guest: KVM cannot destroy a vCPU, so its fd waits here to be plugged again. */
  #parked = new Map<number, VcpuFd>();
  /** Generation of the last PCI change sent to the vCPU threads. */
  #pciGeneration = 0;
  /** Guest memory by stretch (RAM parts, the ACPI hotplug region, virtio-mem regions), for snapshots. */
  #pieces: MemoryPiece[] = [];
  /** Every KVM memory slot with guest RAM and where it lies in #pieces (live migration's dirty log). */
  #slots: TrackedSlot[] = [];

  constructor(readonly config: VmConfig) {}

  onGuestEvent(cb: (e: GuestEvent) => void): void {
    this.#listeners.push(cb);
  }

  /** Guest memory (after boot). */
  get memory(): GuestMemory | undefined {
    return this.#mem;
  }

  memoryActualSize(): number {
    // As Cloud Hypervisor: guest RAM (with what virtio-mem has plugged) less what the balloon holds.
    let plugged = 0;
    for (const z of this.#platform?.pci?.virtioMem.values() ?? []) plugged += z.plugged();
    const ram = (this.#mem?.size ?? ramSize(this.config.memory)) + plugged;
    return Math.max(0, ram - (this.#platform?.balloon?.actualBytes() ?? 0));
  }

  /**
   * vm.resize of the running VM: RAM (ACPI memory hotplug, growing only), vCPUs (ACPI CPU hotplug, up to
   * max_vcpus) and the balloon's target.
   */
  async resize(r: VmResize): Promise<void> {
    if (r.desired_balloon !== undefined && !this.#platform?.balloon) {
      throw new VmmError("BadRequest", "the VM has no balloon device");
    }
    if (r.desired_ram !== undefined) this.#resizeRam(r.desired_ram);
    if (r.desired_vcpus !== undefined) await this.#resizeVcpus(r.desired_vcpus);
    if (r.desired_balloon !== undefined) this.#platform!.balloon!.setTarget(r.desired_balloon);
  }

  /** The default memory now: its boot size plus what was plugged since (ACPI slots or virtio-mem). */
  #ramNow(): number {
    const m = this.#platform?.memoryHotplug;
    const c = this.config.memory;
    const vmem = this.#platform?.pci?.virtioMem.get(DEFAULT_ZONE);
    if (vmem) return c.size + vmem.plugged();
    return c.size +
      (m && c.hotplug_size ? m.plugged() * memoryHotplugSlots(ramSize(c), c.hotplug_size).slot : 0);
  }

  /**
   * virtio-mem: asks the guest for zone `id` to be `want` bytes (its boot size plus plugged memory); the
   * guest plugs or unplugs blocks itself and the answer comes at once, as Cloud Hypervisor's.
   */
  #requestZone(id: string, want: number, field: string): void {
    const z = this.#virtioMemZones.get(id);
    const dev = this.#platform?.pci?.virtioMem.get(id);
    if (!z || !dev) {
      throw new VmmError(
        "BadRequest",
        `${field}: memory zone '${id}' has no hotplug_size (of at least 128 MiB)`,
      );
    }
    const requested = want - z.base;
    if (requested < 0) {
      throw new VmmError("BadRequest", `${field} (${want}) is below the boot memory size (${z.base})`);
    }
    if (requested % MEM_BLOCK_SIZE !== 0) {
      throw new VmmError(
        "BadRequest",
        `${field} must differ from the boot memory size by a multiple of 2 MiB`,
      );
    }
    if (requested > z.size) {
      throw new VmmError(
        "BadRequest",
        `${field} (${want}) exceeds memory size plus the usable hotplug_size (${
          z.base + z.size
        } bytes: hotplug_size in whole 128 MiB blocks)`,
      );
    }
    dev.request(requested);
    log.info(
      `memory ${id}: virtio-mem asked for ${mib(requested)} MiB (plugged: ${mib(dev.plugged())} MiB)`,
    );
  }

  /** vm.resize-zone on the running VM: a memory zone's size, through its virtio-mem device. */
  resizeZone(id: string, size: number): Promise<void> {
    try {
      this.#requestZone(id, size, "desired_ram");
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Grows guest RAM by whole hotplug slots (ACPI memory hotplug): each slot's memory is mapped, given to
   * KVM and to the device threads, then announced; the guest adds it (onlining it is the guest's business).
   */
  #resizeRam(want: number): void {
    const c = this.config.memory;
    const now = this.#ramNow();
    if (want === now && !this.#virtioMemZones.has(DEFAULT_ZONE)) return;
    const m = this.#platform?.memoryHotplug;
    if (this.#virtioMemZones.has(DEFAULT_ZONE)) {
      // virtio-mem (vm.info's memory_actual_size follows what the guest plugs).
      this.#requestZone(DEFAULT_ZONE, want, "desired_ram");
      return;
    }
    if (c.zones?.length && c.size === 0) {
      throw new VmmError(
        "BadRequest",
        "desired_ram: this VM's memory is in zones; resize them with vm.resize-zone",
      );
    }
    if (!m || !c.hotplug_size) {
      throw new VmmError(
        "BadRequest",
        `desired_ram (${want}): the VM has no memory hotplug region (memory hotplug_size)`,
      );
    }
    const slots = memoryHotplugSlots(ramSize(c), c.hotplug_size);
    if (want < now) {
      throw new VmmError(
        "BadRequest",
        `desired_ram (${want}) is below the current ${now} bytes: ACPI-plugged memory cannot be taken back`,
      );
    }
    if ((want - now) % slots.slot !== 0) {
      throw new VmmError(
        "BadRequest",
        `desired_ram must grow the RAM by a multiple of ${mib(slots.slot)} MiB`,
      );
    }
    const plugged = m.plugged();
    const n = (want - now) / slots.slot;
    if (plugged + n > slots.count) {
      throw new VmmError(
        "BadRequest",
        `desired_ram (${want}) exceeds memory size plus the usable hotplug_size (${
          c.size + slots.count * slots.slot
        } bytes: hotplug_size in whole ${mib(slots.slot)} MiB slots)`,
      );
    }
    const reserved = this.#hotplugRam;
    if (!reserved) throw new VmmError("Internal", "the memory hotplug region was not reserved");
    for (let i = plugged; i < plugged + n; i++) {
      this.#mapRamSlot(i);
      m.plug(i);
    }
    this.#platform!.raiseGed(Layout.acpiPm.gedMemoryHotplugBit);
    log.info(`RAM: ${mib(now)} MiB → ${mib(want)} MiB (the guest onlines the new memory)`);
  }

  /** ACPI memory hotplug: slot `i`'s memory given to KVM, to guest memory and to the device threads. */
  #mapRamSlot(i: number): void {
    const c = this.config.memory;
    const slots = memoryHotplugSlots(ramSize(c), c.hotplug_size!);
    const reserved = this.#hotplugRam!;
    const gpa = slots.start + i * slots.slot;
    const hostAddr = reserved.hostAddr + BigInt(i * slots.slot);
    this.#vm!.setUserMemoryRegion({
      slot: MEMORY_HOTPLUG_FIRST_SLOT + i,
      flags: 0,
      guestPhysAddr: BigInt(gpa),
      memorySize: BigInt(slots.slot),
      userspaceAddr: hostAddr,
    });
    const region = { gpa, size: slots.slot, hostAddr };
    this.#mem!.addHostRegion(region);
    this.#memTable.add(region);
    this.#slots.push({
      slot: MEMORY_HOTPLUG_FIRST_SLOT + i,
      gpa,
      size: slots.slot,
      hostAddr,
      piece: this.#pieces.findIndex((p) => p.name === "hotplug"),
      pieceOffset: i * slots.slot,
    });
  }

  /**
   * Plugs vCPUs in (created, or taken back from the parked ones, their threads started, then announced
   * to the guest, which adds them; onlining them is the guest's business) or asks the guest to give the
   * highest ones up, stopping each thread once the guest has ejected it.
   */
  async #resizeVcpus(want: number): Promise<void> {
    const have = this.#vcpus.length;
    if (want === have) return;
    const max = this.config.cpus.max_vcpus;
    if (!Number.isInteger(want) || want < 1 || want > max) {
      throw new VmmError("BadRequest", `desired_vcpus (${want}) must be between 1 and max_vcpus (${max})`);
    }
    const hp = this.#platform?.cpuHotplug;
    if (!hp) {
      throw new VmmError(
        "BadRequest",
        `desired_vcpus (${want}): this VM cannot change its vCPUs (max_vcpus equals boot_vcpus)`,
      );
    }
    const bit = Layout.acpiPm.gedCpuHotplugBit;
    if (want > have) {
      for (let id = have; id < want; id++) {
        const fd = this.#parked.get(id) ?? this.#createVcpu(id, true);
        this.#parked.delete(id);
        const t = this.#start(fd, newVcpuWorker());
        this.#vcpus.push(t);
        await waitReady(t.control);
        hp.plug(id);
      }
      this.#platform!.raiseGed(bit);
      log.info(`vCPUs: ${have} → ${want} (the guest brings them online)`);
      return;
    }
    for (let id = have - 1; id >= want; id--) {
      hp.requestEject(id);
      this.#platform!.raiseGed(bit);
      if (!await hp.waitEjected(id, this.ejectTimeoutMs)) {
        throw new VmmError(
          "Internal",
          `the guest did not give up vCPU ${id} within ${
            this.ejectTimeoutMs / 1000
          } s; ${this.#vcpus.length} vCPUs stay`,
        );
      }
      const t = this.#vcpus.pop()!;
      t.control.setCommand(Cmd.Stop);
      this.#kick(t);
      await t.exited;
      this.#parked.set(id, t.fd);
    }
    log.info(`vCPUs: ${have} → ${want}`);
  }

  /**
   * Hot-adds a device (ACPI PCI hotplug): built and started on the host, taken in by every vCPU thread,
   * then announced to the guest, which scans the slot. Answers once the device is in place, as Cloud
   * Hypervisor does (the guest's driver binds it shortly after).
   */
  async addDevice(kind: HotplugKind, config: unknown): Promise<PciDeviceInfo> {
    const pci = this.#platform?.pci;
    if (!pci) throw new VmmError("Internal", "the VM has no PCI bus to add devices to");
    if (!HOTPLUG_KINDS.includes(kind)) {
      throw new VmmError("NotImplemented", `hot-adding ${kind} devices is not implemented in dvmm yet`);
    }
    let desc;
    try {
      desc = pci.hotAdd({ kind, config } as PciHotplugRequest);
    } catch (e) {
      throw new VmmError("Internal", [`failed to add the ${kind} device`, (e as Error).message]);
    }
    try {
      await this.#changePci({ type: "pci-attach", device: desc });
    } catch (e) {
      // Undo only when every vCPU thread has let go of it; otherwise the device stays (unannounced) rather
      // than a reused slot meeting a stale one.
      const undone = await this.#changePci({ type: "pci-detach", id: desc.id }).then(() => true, () => false);
      if (undone) await pci.release(desc.id);
      else log.error(`${desc.id}: a vCPU thread did not take the device in or out; it stays, unannounced`);
      throw new VmmError("Internal", [`failed to add the ${kind} device`, (e as Error).message]);
    }
    pci.announce(desc.id);
    log.info(`hot-added ${kind} device ${desc.id} at ${pci.bdfOf(desc.id)}`);
    return { id: desc.id, bdf: pci.bdfOf(desc.id)! };
  }

  /**
   * Hot-removes a device: the guest is asked to eject it (ACPI), and once it has let go (its `_EJ0`),
   * every vCPU thread drops it and its worker, BAR, GSIs, ioeventfds, irqfds and descriptors are freed.
   * A guest that does not let go within `ejectTimeoutMs` gets an error; the device stays.
   */
  async removeDevice(id: string): Promise<void> {
    const pci = this.#platform?.pci;
    const desc = pci?.descriptors.devices.find((d) => d.id === id);
    if (!pci || !desc) throw new VmmError("NotFound", `no PCI device with identifier '${id}'`);
    if (desc.kind === "balloon" || desc.kind === "console") {
      throw new VmmError("NotImplemented", `removing ${desc.kind} devices is not implemented in dvmm yet`);
    }
    const ejected = await pci.requestEject(id, this.ejectTimeoutMs);
    if (!ejected) {
      throw new VmmError(
        "Internal",
        `the guest did not release device '${id}' within ${this.ejectTimeoutMs / 1000} s ` +
          "(does it run ACPI PCI hotplug, acpiphp?); the device stays",
      );
    }
    await this.#changePci({ type: "pci-detach", id });
    await pci.release(id);
    log.info(`removed device ${id}`);
  }

  /** vm.resize-disk: grows the image and tells the guest (virtio-blk capacity + config change). */
  resizeDisk(id: string, size: number): Promise<void> {
    try {
      const pci = this.#platform?.pci;
      if (!pci) throw new VmmError("NotFound", `no disk with identifier '${id}'`);
      try {
        pci.resizeDisk(id, size);
      } catch (e) {
        throw new VmmError("BadRequest", [`cannot resize disk '${id}'`, (e as Error).message]);
      }
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** vCPUs running now (after a resize that stopped half-way too). */
  vcpuCount(): number {
    return this.#vcpus.length;
  }

  /** Sends a PCI change to every vCPU thread and waits until each has taken it in. */
  async #changePci(change: PciChange): Promise<void> {
    const gen = ++this.#pciGeneration;
    const msg: VcpuPciChange = { ...change, gen };
    for (const v of this.#vcpus) {
      v.worker.postMessage(msg);
      // Only a running vCPU is asked to reload: a stopping one must not lose its Stop.
      Atomics.compareExchange(v.control.i32, 0, Cmd.Run, Cmd.Reload);
    }
    this.#kickAll();
    const ok = await Promise.all(
      this.#vcpus.map((v) => v.control.waitPciGeneration(gen, PCI_CHANGE_TIMEOUT_MS)),
    );
    if (ok.includes(false)) throw new Error("a vCPU thread did not take in the PCI change");
  }

  /** Boots the VM, or (`restore`) brings a snapshot's VM back, paused. */
  async boot(restore?: RestoreSource): Promise<void> {
    // Time each phase of the set-up (-vv): the lab runs it ~18x slower than hardware.
    let t = performance.now();
    const phase = (what: string) => {
      const now = performance.now();
      log.debug(`boot: ${what} ${(now - t).toFixed(1)} ms`);
      t = now;
    };
    const cfg = this.config;
    const boot = restore ? restore.state.vcpus.length : cfg.cpus.boot_vcpus;
    const max = cfg.cpus.max_vcpus;
    if (!cfg.payload?.kernel && !restore) throw new Error("no kernel in the VM config (payload.kernel)");
    // What dvmm cannot honour is refused before anything is mapped or loaded.
    checkSupported(cfg);
    // Cheap checks before any expensive set-up: a missing kernel must not first start 255 workers.
    if (!restore) await checkPayloadFiles(cfg.payload, ramSize(cfg.memory));
    phase("checks");
    const ranges = new Map((restore?.state.memory ?? []).map((r) => [r.name, r]));
    if (restore && restore.memoryFd >= 0) {
      // A short file would fault (SIGBUS) where RAM is mapped from it: refuse it up front.
      const have = Number(shim().kvs_fd_size(restore.memoryFd));
      for (const r of ranges.values()) {
        if (
          !Number.isSafeInteger(r.offset) || r.offset < 0 || r.offset % 4096 !== 0 || r.offset + r.size > have
        ) {
          throw new Error(`memory range '${r.name}' lies outside the memory file (${have} bytes)`);
        }
      }
    }
    const range = (name: string, size: number): MemoryRange | undefined => {
      if (!restore) return undefined;
      const r = ranges.get(name);
      if (!r) throw new Error(`the snapshot has no memory range '${name}'`);
      if (r.size !== size) {
        throw new Error(`memory range '${name}': ${r.size} bytes saved, the config makes ${size}`);
      }
      return r;
    };
    /** Restore, copy mode: the saved bytes into a fresh mapping. */
    const fill = (name: string, map: HostMapping) => {
      const r = range(name, map.size);
      if (r) readRange(restore!.memoryFd, r, mappingBytes(map));
    };
    const huge = ramParts(cfg.memory).filter((p) => p.hugepages).reduce((n, p) => n + p.size, 0);
    const meminfo = Deno.readTextFileSync("/proc/meminfo");
    if (huge > 0) checkHugePages(huge, cfg.memory.hugepage_size, meminfo);
    const tooBig = hostMemoryWarning(ramSize(cfg.memory) + (cfg.memory.hotplug_size ?? 0), meminfo);
    if (tooBig) log.warn(tooBig);
    // vCPU threads first: a Worker needs its own V8 isolate and module graph, which costs more than
    // the rest of the set-up when the host is slow (the lab runs this ~20x slower than hardware), so
    // they load while this thread maps RAM and loads the kernel. Each gets its vCPU later.
    this.#idle = Array.from({ length: boot }, () => newVcpuWorker());
    // The device workers start once the vCPUs run (see PciHost.startWorkers): the guest needs none of
    // them for a while, and creating each blocks this thread.
    phase("workers started");
    try {
      const kvm = this.#kvm = Kvm.open();
      const vm = this.#vm = kvm.createVm();
      vm.setTssAddr(layout.tssAddr);
      vm.createIrqchip();
      vm.createPit2(0);

      phase("KVM VM, irqchip, PIT");
      // Guest RAM: the default memory and the memory zones, each mapped once, laid over the RAM regions.
      const mc = cfg.memory;
      const parts = ramParts(mc);
      const hostRegions = [];
      const partMaps = parts.map((p) => {
        const name = `ram:${p.id}`;
        // Restore on demand: plain RAM is the memory file itself, copy-on-write; pages are read as touched.
        const plain = !p.shared && !p.hugepages && p.file === undefined;
        let map: HostMapping;
        const given = restore?.memfds?.[name];
        if (given !== undefined) {
          // Local migration: the sender's own memory, shared, becomes this VM's (nothing is copied).
          map = { ...mapFd(given, p.size, 0), fd: given };
          this.#maps.push(map);
        } else if (restore?.onDemand && plain) {
          // The mapping holds the file open itself: the caller may close memoryFd after boot.
          map = mapFilePrivate(restore.memoryFd, p.size, range(name, p.size)!.offset);
        } else {
          map = mapPart(p, `dvmm-ram-${p.id}`);
          this.#maps.push(map);
          fill(name, map);
        }
        if (given === undefined && restore?.onDemand && plain) this.#maps.push(map);
        this.#pieces.push({ name, map });
        return map;
      });
      let slot = 0;
      const chunks = ramChunks(parts);
      // KVM slots 0..31 are RAM's (pmem, hotplug and virtio-mem have theirs after).
      if (chunks.length > 32) throw new Error(`too many memory zones (${parts.length}): at most 30`);
      for (const c of chunks) {
        const map = partMaps[c.part];
        const hostAddr = map.hostAddr + BigInt(c.offset);
        this.#slots.push({ slot, gpa: c.gpa, size: c.size, hostAddr, piece: c.part, pieceOffset: c.offset });
        vm.setUserMemoryRegion({
          slot: slot++,
          flags: 0,
          guestPhysAddr: BigInt(c.gpa),
          memorySize: BigInt(c.size),
          userspaceAddr: hostAddr,
        });
        // With shared memory, `fd` (at `offset`) is what vhost-user back-ends map.
        hostRegions.push({ gpa: c.gpa, size: c.size, hostAddr, fd: map.fd, offset: c.offset });
      }
      const mem = this.#mem = GuestMemory.fromHost(hostRegions);
      // ACPI memory hotplug: the whole region is reserved now (no page is used until the guest touches a
      // plugged slot), so vhost-user back-ends get it in their memory table from the start.
      let hotplugRam: { gpa: number; size: number; hostAddr: bigint; fd?: number } | undefined;
      const region = acpiHotplugReservation(mc);
      if (region) {
        const given = restore?.memfds?.hotplug;
        const m = given !== undefined
          ? { ...mapFd(given, region.size, 0, true), fd: given }
          : mc.shared
          ? mapMemfd(region.size, "dvmm-ram-hotplug", { hugepages: mc.hugepages, noReserve: true })
          : mapAnonymous(region.size, { hugepages: mc.hugepages });
        this.#maps.push(m);
        this.#pieces.push({ name: "hotplug", map: m });
        if (given === undefined) fill("hotplug", m);
        hotplugRam = this.#hotplugRam = {
          gpa: region.start,
          size: region.size,
          hostAddr: m.hostAddr,
          fd: m.fd,
        };
      }
      // virtio-mem: a region per memory zone with a hotplug size (mem0: the default memory's), reserved
      // and given to KVM whole now; the guest plugs blocks of it.
      const virtioMemRegions: VirtioMemRegion[] = [];
      virtioMemPlacements(mc, parts).forEach((pl, k) => {
        const part = parts[pl.part];
        const given = restore?.memfds?.[`virtio-mem:${pl.id}`];
        const m = given !== undefined ? { ...mapFd(given, pl.size, 0, true), fd: given } : mapPart(
          { ...part, file: undefined, size: pl.size, prefault: false, noReserve: true },
          `dvmm-ram-${pl.id}-hotplug`,
        );
        this.#maps.push(m);
        this.#pieces.push({ name: `virtio-mem:${pl.id}`, map: m });
        if (given === undefined) fill(`virtio-mem:${pl.id}`, m);
        vm.setUserMemoryRegion({
          slot: VIRTIO_MEM_FIRST_SLOT + k,
          flags: 0,
          guestPhysAddr: BigInt(pl.gpa),
          memorySize: BigInt(pl.size),
          userspaceAddr: m.hostAddr,
        });
        this.#slots.push({
          slot: VIRTIO_MEM_FIRST_SLOT + k,
          gpa: pl.gpa,
          size: pl.size,
          hostAddr: m.hostAddr,
          piece: this.#pieces.length - 1,
          pieceOffset: 0,
        });
        virtioMemRegions.push({
          id: pl.id,
          gpa: pl.gpa,
          size: pl.size,
          hostAddr: m.hostAddr,
          fd: m.fd,
          requested: pl.requested,
          sharedMemory: part.shared,
        });
      });
      this.#virtioMemZones = new Map(
        virtioMemRegions.map((r) => [r.id, { size: r.size, base: parts.find((p) => p.id === r.id)!.size }]),
      );
      phase("guest RAM mapped");

      if (restore?.prefault) {
        // RAM only: the hotplug regions are reserved address space, most of it never used.
        for (const p of this.#pieces.filter((x) => x.name.startsWith("ram:"))) {
          shim().kvs_madvise(p.map.hostAddr, p.map.size, MADV_POPULATE_WRITE);
        }
      }
      // Payload (a restored VM's is in its memory already).
      const entry = restore ? null : await loadPayload(mem, ramSize(cfg.memory), {
        kernel: cfg.payload.kernel!,
        initramfs: cfg.payload.initramfs ?? undefined,
        cmdline: cfg.payload.cmdline ?? "",
      });
      phase(restore ? "guest memory restored" : "kernel and initramfs loaded");
      const placement = restore
        ? new Map<string, DevicePlacement>(restore.state.virtio.map((d) => [d.id, d]))
        : undefined;
      this.#platform = createPlatform(
        cfg,
        vm,
        this.#events,
        hostRegions,
        this.#memTable.sab,
        hotplugRam,
        virtioMemRegions,
        placement,
      );
      phase("devices created");
      if (restore) this.#loadDevices(restore.state);
      if (!restore) writeResetVector(mem);
      if (!restore) {
        writeAcpiTables(mem, {
          vcpus: boot,
          maxVcpus: max,
          memSize: ramSize(cfg.memory),
          hotplugSize: hotplugSpace(cfg.memory),
          pciSegments: cfg.platform?.num_pci_segments ?? 1,
          pci: this.#platform.pciAcpi,
          memorySlots:
            this.#platform.memoryHotplug && cfg.memory.hotplug_size && cfg.memory.hotplug_method === "Acpi"
              ? memoryHotplugSlots(ramSize(cfg.memory), cfg.memory.hotplug_size)
              : undefined,
        });
      }

      // vCPUs.
      phase("ACPI tables written");
      this.#supportedCpuid = kvm.supportedCpuid();
      // DVMM_TSC_DEADLINE=off withholds it (for comparing the two timer modes in one bench session).
      this.#tscDeadline = vm.checkExtension(KVM_CAP_TSC_DEADLINE_TIMER) > 0 &&
        Deno.env.get("DVMM_TSC_DEADLINE") !== "off";
      this.#msrList = new Set(kvm.msrIndexList());
      if (restore) {
        // vCPUs as they were (their threads start paused), then the irqchip, PIT and clock.
        for (const st of restore.state.vcpus) {
          const fd = this.#createVcpu(st.id, true);
          loadVcpu(fd, st);
          this.#vcpus.push(this.#start(fd, this.#idle.shift()!, true));
        }
        const v = restore.state.vm;
        for (const chip of v.irqchip) vm.setIrqchip(fromBase64(chip));
        vm.setPit2(fromBase64(v.pit2));
        vm.setClock({ clock: BigInt(v.clock) });
      } else {
        for (let id = 0; id < boot; id++) {
          const fd = this.#createVcpu(id);
          if (id === 0) {
            const { regs, sregs } = bspRegisters(mem, entry!, fd.getSregs());
            fd.setSregs(sregs);
            fd.setRegs(regs);
          }
          this.#vcpus.push(this.#start(fd, this.#idle.shift()!));
        }
      }
      this.#platform.attachVcpuMapping(this.#vcpus[0].fd.kvmRun.data);
      phase("vCPUs set up, workers spawned");
      log.info(
        restore
          ? `restored: ${boot} vCPU(s), ${mib(ramSize(cfg.memory))} MiB (memory ${
            restore.onDemand ? "on demand" : "copied"
          })`
          : `booting: ${boot} vCPU(s), ${mib(ramSize(cfg.memory))} MiB, kernel ${cfg.payload.kernel}`,
      );
      this.#watchEvents();
      // Wait until every worker has published its thread, so pause/stop can kick it.
      await Promise.all(this.#vcpus.map((v) => waitReady(v.control)));
      phase("vCPU workers running");
      // Only now: a vCPU worker still loading its code would share the CPU with the device workers'.
      this.#platform.pci?.startWorkers();
      phase("device workers started");
      workerPool.drain(); // what a head start prepared and this VM did not take
    } catch (e) {
      await this.shutdown();
      throw e;
    }
  }

  /** Creates vCPU `id` with its CPUID, MSRs, FPU and LAPIC set up (an AP waits for INIT/SIPI). */
  #createVcpu(id: number, hotplugged = false): VcpuFd {
    const max = this.config.cpus.max_vcpus;
    const fd = this.#vm!.createVcpu(id);
    fd.setCpuid2(vcpuCpuid(this.#supportedCpuid!, id, { cores: max }, { tscDeadline: this.#tscDeadline }));
    fd.setMsrs([
      { index: MSR.IA32_SYSENTER_CS, data: 0n },
      { index: MSR.IA32_SYSENTER_ESP, data: 0n },
      { index: MSR.IA32_SYSENTER_EIP, data: 0n },
      { index: MSR.STAR, data: 0n },
      { index: MSR.CSTAR, data: 0n },
      { index: MSR.KERNEL_GS_BASE, data: 0n },
      { index: MSR.SYSCALL_MASK, data: 0n },
      { index: MSR.LSTAR, data: 0n },
      { index: MSR.IA32_TSC, data: 0n },
      { index: MSR.IA32_MISC_ENABLE, data: 1n },
      { index: MSR.MTRR_DEF_TYPE, data: (1n << 11n) | 6n },
      // A vCPU added later keeps the TSC KVM gives it (in step with the others); writing 0 would not be.
    ].filter((m) => this.#msrList.has(m.index) && !(hotplugged && m.index === MSR.IA32_TSC)));
    fd.setFpu({ fcw: 0x37f, mxcsr: 0x1f80 });
    const lapic = fd.getLapic();
    const lv = new DataView(lapic.buffer, lapic.byteOffset, lapic.byteLength);
    const setMode = (reg: number, mode: number) =>
      lv.setUint32(reg, (lv.getUint32(reg, true) & ~0x700) | (mode << 8), true);
    setMode(APIC_LVT_LINT0, APIC_MODE_EXTINT);
    setMode(APIC_LVT_LINT1, APIC_MODE_NMI);
    fd.setLapic(lapic);
    return fd;
  }

  /** Hands vCPU `fd` to a started worker (`paused`: it waits for resume before it first runs). */
  #start(fd: VcpuFd, worker: Worker, paused = false): VcpuThread {
    const control = new VcpuControl();
    if (paused) control.setCommand(Cmd.Pause);
    const exited = new Promise<VcpuWorkerExit>((resolve) => {
      worker.onmessage = (ev: MessageEvent<VcpuWorkerExit>) => resolve(ev.data);
      worker.onerror = (ev) => {
        ev.preventDefault();
        this.#events.raise(VmEvent.Crash);
        resolve({ type: "exit", id: fd.id, reason: "error", error: ev.message });
      };
    });
    exited.then((m) => {
      if (m.error) log.error(`vCPU ${m.id}: ${m.error}`);
      // A triple fault resets the machine as on a PC, which a guest never asks for: say so by default.
      else if (m.reason.startsWith("shutdown (triple fault)")) {
        log.warn(`vCPU ${m.id}: ${m.reason}; the VM resets`);
      } else log.debug(`vCPU ${m.id} exited: ${m.reason}`);
    });
    const init: VcpuWorkerInit = {
      vcpu: fd.descriptor(),
      control: control.sab,
      events: this.#events.sab,
      platform: this.#platform!.descriptors,
    };
    worker.postMessage(init);
    return { fd, control, worker, exited };
  }

  async #watchEvents(): Promise<void> {
    const code = await this.#events.next();
    if (this.#stopping) return;
    const ev: GuestEvent = code === VmEvent.Poweroff
      ? "poweroff"
      : code === VmEvent.Reboot
      ? "reboot"
      : "crash";
    // What caused it (which register, a triple fault): an unexpected reset is then told apart in the log.
    log.info(`guest event: ${ev} (${EVENT_SOURCE_NAMES[this.#events.source] ?? "source unknown"})`);
    await this.#stopVcpus();
    for (const cb of this.#listeners) cb(ev);
  }

  /** Gets a vCPU out of KVM_RUN (or keeps it from entering) so it looks at its command. */
  #kick(v: VcpuThread): void {
    v.fd.kvmRun.immediateExit = 1;
    const t = v.control.thread;
    if (t !== null) kickTid(t);
  }

  #kickAll(): void {
    for (const v of this.#vcpus) this.#kick(v);
  }

  async #stopVcpus(): Promise<void> {
    for (const v of this.#vcpus) v.control.setCommand(Cmd.Stop);
    this.#kickAll();
    // A vCPU that has not entered KVM_RUN yet sees the command; one in it is kicked out.
    await Promise.all(this.#vcpus.map((v) => v.exited));
  }

  /** vCPUs first, then the device workers (their queue positions are then published). */
  async pause(): Promise<void> {
    for (const v of this.#vcpus) v.control.setCommand(Cmd.Pause);
    this.#kickAll();
    await Promise.all(this.#vcpus.map((v) => waitState(v.control, State.Paused)));
    try {
      await this.#platform?.pci?.pauseWorkers();
    } catch (e) {
      // Not paused after all: the vCPUs go on, and the caller hears why.
      await this.resume();
      throw new VmmError("Internal", ["the VM could not be paused", (e as Error).message]);
    }
  }

  async resume(): Promise<void> {
    this.#platform?.pci?.resumeWorkers();
    for (const v of this.#vcpus) v.control.setCommand(Cmd.Run);
    await Promise.all(this.#vcpus.map((v) => waitState(v.control, State.Running)));
  }

  /**
   * Snapshot of the paused VM into directory `dir` (which exists): state.json's content is returned for
   * the caller to write beside the config; the memory file is written here. Fails, naming it, on a
   * device whose state dvmm cannot save, before anything is written.
   */
  snapshot(dir: string): SnapshotState {
    const state = this.saveState();
    const t = performance.now();
    const { ranges, written } = writeMemory(
      `${dir}/${MEMORY_FILE}`,
      this.#pieces.map((p) => ({ name: p.name, bytes: mappingBytes(p.map), fd: p.map.fd })),
    );
    state.memory = ranges;
    log.info(
      `snapshot: ${mib(written)} MiB of guest memory written in ${(performance.now() - t).toFixed(0)} ms ` +
        `(${mib(ranges.reduce((n, r) => n + r.size, 0))} MiB mapped)`,
    );
    return state;
  }

  /** The paused VM's state without its memory (snapshot and migration). */
  saveState(): SnapshotState {
    const platform = this.#platform;
    const vm = this.#vm;
    if (!platform || !vm) throw new VmmError("WrongState", "the VM is not running");
    this.checkSavable();
    platform.drainCoalesced(); // serial bytes still in KVM's ring belong to the saved UART state
    const state = newState();
    const msrs = [...this.#msrList];
    state.vcpus = this.#vcpus.map((v) => saveVcpu(v.fd, msrs));
    state.vm = {
      clock: vm.getClock().clock.toString(),
      irqchip: [0, 1, 2].map((id) => toBase64(vm.getIrqchip(id))),
      pit2: toBase64(vm.getPit2()),
    };
    for (const [path, sab] of sharedBuffers(platform.descriptors, HOST_ONLY)) {
      state.devices[path] = toBase64(new Uint8Array(sab));
    }
    state.virtio = platform.pci?.saveVirtio() ?? [];
    return state;
  }

  /** Throws, naming it, when a device's state cannot be saved (before anything is written or sent). */
  checkSavable(): void {
    for (const d of this.#platform?.pci?.descriptors.devices ?? []) {
      if (!SAVABLE_KINDS.has(d.kind)) {
        throw new VmmError(
          "Internal",
          `device '${d.id}' (${d.kind === "vhost_user" ? "vhost-user" : d.kind}) has no save path: its ` +
            "state lives in its back-end, which dvmm cannot save",
        );
      }
    }
  }

  /** Guest memory pieces, for live migration. */
  pieces(): { name: string; hostAddr: bigint; size: number; fd?: number }[] {
    return this.#pieces.map((p) => ({
      name: p.name,
      hostAddr: p.map.hostAddr,
      size: p.map.size,
      fd: p.map.fd,
    }));
  }

  /** A dirty-page tracker over every memory slot (live migration). */
  dirtyTracker(): DirtyTracker {
    if (!this.#vm) throw new VmmError("WrongState", "the VM is not running");
    return new DirtyTracker(this.#vm, this.#slots, this.#pieces.map((p) => p.map));
  }

  /** Holds the device workers (their writes to guest memory stop) while the vCPUs run on. */
  async quiesceDevices(): Promise<void> {
    await this.#platform?.pci?.pauseWorkers();
  }

  releaseDevices(): void {
    this.#platform?.pci?.resumeWorkers();
  }

  /** Lets go of the disk images' locks (the paused VM's destination takes them). */
  releaseImages(): void {
    for (const d of this.#platform?.pci?.descriptors.devices ?? []) if (d.blk) unlockImage(d.blk.fd);
  }

  /** Takes the disk images' locks back (a migration that failed after releaseImages). */
  retakeImages(): void {
    for (const d of this.#platform?.pci?.descriptors.devices ?? []) {
      if (!d.blk) continue;
      try {
        lockImage(d.blk.fd, !d.blk.readonly);
      } catch (e) {
        log.error(`disk ${d.id}: ${(e as Error).message}`);
      }
    }
  }

  /**
   * Sends this running VM to another dvmm (vm.send-migration); on failure, or when the hooks' signal
   * aborts it before the destination has everything, it runs on here.
   */
  sendMigration(opts: SendMigrationData, config: unknown, hooks?: MigrationHooks): Promise<MigrationStats> {
    return sendMigration(this, config, opts, hooks);
  }

  /** Restore: the saved shared state into the fresh devices; ACPI-plugged RAM mapped again. */
  #loadDevices(state: SnapshotState): void {
    const platform = this.#platform!;
    const now = sharedBuffers(platform.descriptors, HOST_ONLY);
    for (const [path, b64] of Object.entries(state.devices)) {
      const sab = now.get(path);
      if (!sab) throw new Error(`the snapshot holds state for '${path}', which this VM does not have`);
      const bytes = fromBase64(b64);
      if (bytes.length !== sab.byteLength) {
        throw new Error(`device state '${path}': ${bytes.length} bytes saved, ${sab.byteLength} now`);
      }
      new Uint8Array(sab).set(bytes);
    }
    const missing = [...now.keys()].filter((p) => !(p in state.devices));
    if (missing.length > 0) throw new Error(`the snapshot has no state for ${missing.join(", ")}`);
    const m = platform.memoryHotplug;
    if (m) { for (let i = 0; i < m.plugged(); i++) this.#mapRamSlot(i); }
    platform.pci?.loadVirtio(state.virtio);
  }

  /** vm.coredump of the paused VM: an ELF core at `path`; returns the RAM bytes written. */
  coredump(path: string): number {
    if (!this.#mem) throw new VmmError("WrongState", "the VM is not running");
    const vcpus: CoreVcpu[] = this.#vcpus.map((v) => ({
      id: v.fd.id,
      regs: v.fd.getRegs(),
      sregs: v.fd.getSregs(),
      kernelGsBase: v.fd.getMsrs([MSR_KERNEL_GS_BASE])[0]?.data ?? 0n,
    }));
    const ram = this.#mem.regions.map((r) => ({ gpa: r.gpa, bytes: r.bytes }));
    return writeCoredump(path, vcpus, ram);
  }

  powerButton(): Promise<void> {
    try {
      if (!this.#platform) throw new Error("VM is not running");
      this.#platform.powerButton();
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** An NMI to every vCPU (as Cloud Hypervisor's vm.nmi); a paused vCPU takes it when resumed. */
  nmi(): Promise<void> {
    for (const v of this.#vcpus) v.control.requestNmi();
    this.#kickAll();
    return Promise.resolve();
  }

  /** Exits each running vCPU has handled in userspace so far (diagnostics and tests). */
  vcpuExits(): number[] {
    return this.#vcpus.map((v) => Atomics.load(v.control.i32, CTL_EXITS));
  }

  counters(): Record<string, Record<string, number>> {
    return this.#platform?.counters() ?? {};
  }

  deviceTree(): Record<string, unknown> {
    return this.#platform?.deviceTree() ?? {};
  }

  /** Serial input from the host (stdin). */
  serialInput(bytes: Uint8Array): void {
    this.#platform?.serialInput(bytes);
  }

  async shutdown(): Promise<void> {
    if (this.#closed) return;
    this.#stopping = true;
    await this.#stopVcpus();
    for (const w of this.#idle) w.terminate();
    this.#idle = [];
    this.#closed = true;
    this.#events.raise(VmEvent.Poweroff); // releases the event watcher
    try {
      await this.#platform?.close();
    } catch (e) {
      log.error(`closing the platform: ${(e as Error).message}`);
    }
    for (const v of this.#vcpus) v.fd.close();
    this.#vcpus = [];
    for (const fd of this.#parked.values()) fd.close();
    this.#parked.clear();
    this.#vm?.close();
    this.#kvm?.close();
    for (const m of this.#maps) unmap(m);
    this.#maps = [];
    this.#pieces = [];
    this.#mem = undefined;
  }
}

/** A reader of /proc/meminfo's numbers (`text`, or the file read now): field name → its value, NaN if absent. */
function meminfoReader(text = Deno.readTextFileSync("/proc/meminfo")): (name: string) => number {
  return (name) => Number(text.match(new RegExp(`^${name}:\\s+(\\d+)`, "m"))?.[1] ?? NaN);
}

/**
 * Guest RAM larger than the host's memory and swap together: dvmm maps it without reserving it (as Cloud
 * Hypervisor does), so the VM starts, but the guest cannot use all of it (the host kills dvmm first).
 * Returns the warning to log, naming the option, or null.
 */
export function hostMemoryWarning(bytes: number, meminfo?: string): string | null {
  const field = meminfoReader(meminfo);
  const host = field("MemTotal") * 1024 + (field("SwapTotal") * 1024 || 0);
  if (!(bytes > host)) return null;
  return `--memory size=${mib(bytes)} MiB is more than this host's memory and swap (${
    mib(host)
  } MiB): the guest cannot use all of it, and the host's OOM killer ends dvmm when it tries`;
}

/**
 * Guest RAM on huge pages must find them free now: the kernel hands out a hugetlb mapping without
 * reserving it, and the first access past the free pages is a SIGBUS that kills the VMM.
 */
export function checkHugePages(bytes: number, pageSize?: number, meminfo?: string): void {
  const field = meminfoReader(meminfo);
  const size = field("Hugepagesize") * 1024;
  if (pageSize !== undefined && pageSize !== size) {
    throw new Error(
      `memory hugepage_size=${pageSize}: only the default huge page size (${size} bytes) is supported`,
    );
  }
  const free = field("HugePages_Free") * size;
  if (!(free >= bytes)) {
    throw new Error(
      `memory hugepages=on: ${mib(bytes)} MiB of huge pages needed, ${
        Number.isNaN(free) ? 0 : mib(free)
      } MiB free (raise /proc/sys/vm/nr_hugepages)`,
    );
  }
}

const VCPU_WORKER = workerUrl("./vcpu_worker.ts", import.meta.url);

function newVcpuWorker(): Worker {
  return workerPool.take(VCPU_WORKER);
}

/**
 * Starts the workers a VM of `config` will need (its vCPUs' and its virtio devices'), ahead of its boot
 * or restore (a migration's receiver, while memory arrives). Those not taken are ended by
 * `workerPool.drain()`.
 */
export function prewarmVm(config: VmConfig): void {
  if (applyLandlock(config)) workerPool.drain();
  workerPool.prewarm(VCPU_WORKER, config.cpus.boot_vcpus);
  workerPool.prewarm(DEVICE_WORKER, deviceWorkerCount(config));
}

async function waitState(ctl: VcpuControl, want: number): Promise<void> {
  for (;;) {
    const s = ctl.state;
    if (s === want || s === State.Stopped) return;
    const w = Atomics.waitAsync(ctl.i32, 1, s, 1000);
    if (w.async) await w.value;
  }
}

async function waitReady(ctl: VcpuControl): Promise<void> {
  for (;;) {
    if (ctl.thread !== null || ctl.state === State.Stopped) return;
    const w = Atomics.waitAsync(ctl.i32, 3, 0, 1000);
    if (w.async) await w.value;
  }
}

/** The factory the control loop uses. */
export function createVmBackend(config: VmConfig): VmBackend {
  // Cloud Hypervisor applies Landlock when the VM is created, before any of its threads start.
  if (applyLandlock(config)) workerPool.drain();
  return new Vm(config);
}
