/**
 * PCI segment 0 with virtio-pci devices, wired to KVM.
 *
 * - Main thread ({@link createPci}): builds the bus and the devices' shared state, places BARs, makes
 *   the eventfds (one per queue for KVM ioeventfds, one per MSI-X vector for KVM irqfds, one control
 *   eventfd per device), installs the default irqchip GSI routes, opens disk images, and starts one
 *   device worker per device (devices/virtio/worker.ts).
 * - Every thread that dispatches exits ({@link buildPciBuses}): rebuilds the bus and devices over the
 *   shared state and registers config access (0xCF8 mechanism #1, ECAM) and BAR dispatch (over the
 *   whole 32- and 64-bit PCI windows, looking up where each BAR decodes at access time, so a BAR the
 *   guest moved in one vCPU thread is found by all) on that thread's buses.
 *
 * Locking: the bus lock covers the CONFIG_ADDRESS register and orders config accesses; each device's
 * lock (in its control block) covers its transport state. Order: bus lock, then device lock, then the
 * GSI routing lock. Device workers take only their device lock.
 *
 * GSIs: 0..23 are the irqchip pins; each device gets `msixVectors` consecutive GSIs from 24. A vector's
 * MSI route is (re)installed when the guest unmasks it with a new address/data; KVM_SET_GSI_ROUTING
 * replaces the whole table, so the table is always rebuilt from the shared routing state.
 */
import { EventFd, type IrqRoutingEntry, type VmFd } from "../ffi/kvm.ts";
import { check, cstr, shim } from "../ffi/shim.ts";
import {
  EFD_NONBLOCK,
  KVM_CAP_IOEVENTFD_ANY_LENGTH,
  O_APPEND,
  O_CREAT,
  O_TRUNC,
  O_WRONLY,
} from "../ffi/kvm_constants.ts";
import type {
  BalloonConfig,
  DiskConfig,
  FsConfig,
  GenericVhostUserConfig,
  NetConfig,
  PmemConfig,
  VmConfig,
  VsockConfig,
} from "./vm_config.ts";
import type { MmioBus, PioBus } from "../devices/bus.ts";
import { PCI_CONFIG_ADDRESS_PORT, PciBus, type Window } from "../devices/pci/bus.ts";
import type { MsixVector } from "../devices/pci/msix.ts";
import { SharedLock } from "../devices/shared.ts";
import {
  BAR_INDEX,
  BAR_SIZE,
  NOTIFY_MULTIPLIER,
  NOTIFY_OFFSET,
  VirtioPciDevice,
} from "../devices/virtio/pci_transport.ts";
import { VIRTIO_ID } from "../devices/virtio/constants.ts";
import { BLK_COUNTERS, blkConfigSpace, BlkCounters, blkFeatures } from "../devices/virtio/blk.ts";
import { rngFeatures } from "../devices/virtio/rng.ts";
import { openDiskImage } from "../devices/virtio/device_blk.ts";
import {
  DEFAULT_MTU,
  NET_COUNTERS,
  netConfigSpace,
  NetCounters,
  netFeatures,
} from "../devices/virtio/net.ts";
import { formatMac, openTap, parseMac, randomMac } from "../devices/virtio/tap.ts";
import {
  VSOCK_COUNTERS,
  VSOCK_NUM_QUEUES,
  VSOCK_QUEUE_SIZE,
  vsockConfigSpace,
  VsockCounters,
  vsockFeatures,
} from "../devices/virtio/vsock.ts";
import { openVsockListener, removeVsockSocket } from "../devices/virtio/device_vsock.ts";
import {
  PMEM_COUNTERS,
  PMEM_QUEUE_SIZE,
  pmemConfigSpace,
  PmemCounters,
  pmemFeatures,
} from "../devices/virtio/pmem.ts";
import { PmemRegions } from "../devices/virtio/device_pmem.ts";
import {
  MEM_BLOCK_SIZE,
  MEM_CONFIG,
  MEM_COUNTERS,
  MEM_QUEUE_SIZE,
  memConfigSpace,
  MemCounters,
  memFeatures,
} from "../devices/virtio/mem.ts";
import {
  BALLOON_COUNTERS,
  BALLOON_QUEUE_SIZE,
  balloonConfigSpace,
  balloonConfigWrite,
  BalloonControl,
  balloonFeatures,
  balloonQueues,
} from "../devices/virtio/balloon.ts";
import {
  consoleConfigSpace,
  ConsoleCounters,
  consoleFeatures,
  ConsoleInput,
} from "../devices/virtio/console.ts";
import {
  CTL_PAUSE,
  CTL_RESTORE,
  CTL_STOP,
  newControlBlock,
  sharesDeviceWorker,
  type VirtioDeviceDescriptor,
  VirtioDeviceHandle,
  type VirtioKind,
} from "../devices/virtio/device_shared.ts";
import type { DeviceWorkerExit, DeviceWorkerInit } from "../devices/virtio/worker.ts";
import { connectVhostUser, waitVhostUserStopped } from "../devices/virtio/device_vhost_user.ts";
import { deviceMemoryWindow, Layout, mmio64Window, pciSegmentEcam, pciSegmentMmio32 } from "./layout.ts";
import { PciHotplug, type PciHotplugDescriptor } from "../devices/pci_hotplug.ts";
import { hotplugSpace, ramSize } from "./ram.ts";
import { log } from "./log.ts";
import type { VirtioState } from "./snapshot.ts";
import { workerPool, workerUrl } from "./worker_pool.ts";
import { type HostEnd, openPty } from "./host_end.ts";

const IRQCHIP_PIC_MASTER = 0;
const IRQCHIP_PIC_SLAVE = 1;
const IRQCHIP_IOAPIC = 2;
const FIRST_MSI_GSI = 24;
/** KVM's default GSI count on x86 (KVM_MAX_IRQ_ROUTES is far larger; this bounds our table). */
const MAX_MSI_GSIS = 1024;

/** Structured-cloneable description of the PCI segment. */
export interface PciDescriptors {
  busState: SharedArrayBuffer;
  hostBridgeState: SharedArrayBuffer | ArrayBuffer;
  /** Bus lock (3 words) at Int32 index 0. */
  busLock: SharedArrayBuffer;
  /** GSI routing state: lock (3 words), then per MSI GSI: valid, addressLo, addressHi, data. */
  routing: SharedArrayBuffer;
  /** The whole 32-bit BAR window (every segment's BARs are found through it). */
  mmio32: Window;
  mmio64: Window;
  /** Segment 0's slice of `mmio32` when there are several segments. */
  segment0Mmio32?: Window;
  /** PCI segments 1.. (`platform.num_pci_segments`). */
  extraSegments?: PciSegmentDescriptor[];
  /** Access length for queue-notify ioeventfds: 0 (any, when KVM supports it) or 2 (iowrite16). */
  ioeventLen: number;
  devices: VirtioDeviceDescriptor[];
  /** The ACPI PCI hotplug controller's registers (every thread dispatches them). */
  hotplug?: PciHotplugDescriptor;
}

/** A PCI segment's shared state: bus 0 with its host bridge, its ECAM and its BAR window. */
export interface PciSegmentDescriptor {
  busState: SharedArrayBuffer;
  hostBridgeState: SharedArrayBuffer | ArrayBuffer;
  mmio32: Window;
  /** ECAM (bus 0 only); null for segment 0, whose ECAM is the layout's. */
  ecam: Window | null;
}

const R_LOCK = 0;
const R_ENTRIES = 4; // Int32 index of the first MSI entry
const R_STRIDE = 4;

/** The default irqchip routes KVM installs: PIC pins for GSIs 0..15 (not the cascade, 2), IOAPIC 0..23. */
export function irqchipRoutes(): IrqRoutingEntry[] {
  const out: IrqRoutingEntry[] = [];
  for (let gsi = 0; gsi < 16; gsi++) {
    if (gsi === 2) continue;
    out.push({
      gsi,
      type: "irqchip",
      irqchip: gsi < 8 ? IRQCHIP_PIC_MASTER : IRQCHIP_PIC_SLAVE,
      pin: gsi % 8,
    });
  }
  for (let pin = 0; pin < Layout.ioapicPins; pin++) {
    out.push({ gsi: pin, type: "irqchip", irqchip: IRQCHIP_IOAPIC, pin });
  }
  return out;
}

/** The VM's GSI routing table over shared state: any thread may update one MSI route. */
class GsiRouting {
  readonly #i32: Int32Array;
  readonly #lock: SharedLock;
  constructor(readonly vm: VmFd, sab: SharedArrayBuffer) {
    this.#i32 = new Int32Array(sab);
    this.#lock = new SharedLock(this.#i32, R_LOCK);
  }

  static stateSize(gsis: number): number {
    return 4 * (R_ENTRIES + R_STRIDE * gsis);
  }

  #table(): IrqRoutingEntry[] {
    const t = irqchipRoutes();
    const a = this.#i32;
    const n = (a.length - R_ENTRIES) / R_STRIDE;
    for (let i = 0; i < n; i++) {
      const o = R_ENTRIES + R_STRIDE * i;
      if (!a[o]) continue;
      t.push({
        gsi: FIRST_MSI_GSI + i,
        type: "msi",
        addressLo: a[o + 1] >>> 0,
        addressHi: a[o + 2] >>> 0,
        data: a[o + 3] >>> 0,
      });
    }
    return t;
  }

  /** Forgets the routes of `count` GSIs from `gsi` (a removed device's vectors). */
  clear(gsi: number, count: number): void {
    const a = this.#i32;
    this.#lock.lock();
    try {
      for (let i = 0; i < count; i++) a[R_ENTRIES + R_STRIDE * (gsi + i - FIRST_MSI_GSI)] = 0;
      this.vm.setGsiRouting(this.#table());
    } finally {
      this.#lock.unlock();
    }
  }

  /** Installs the table as it stands (boot). */
  install(): void {
    this.#lock.lock();
    try {
      this.vm.setGsiRouting(this.#table());
    } finally {
      this.#lock.unlock();
    }
  }

  /** A vector changed: when it is deliverable with a new message, route its GSI to that message. */
  update(gsi: number, v: MsixVector): void {
    if (v.masked) return; // the old route stays; the device does not signal a masked vector
    const o = R_ENTRIES + R_STRIDE * (gsi - FIRST_MSI_GSI);
    const a = this.#i32;
    this.#lock.lock();
    try {
      if (
        a[o] === 1 && a[o + 1] === (v.addressLo | 0) && a[o + 2] === (v.addressHi | 0) &&
        a[o + 3] === (v.data | 0)
      ) {
        return;
      }
      a[o] = 1;
      a[o + 1] = v.addressLo | 0;
      a[o + 2] = v.addressHi | 0;
      a[o + 3] = v.data | 0;
      this.vm.setGsiRouting(this.#table());
    } finally {
      this.#lock.unlock();
    }
  }
}

/** One thread's PCI objects. */
export interface PciThread {
  /** Segment 0's bus (the 0xCF8 mechanism and the reset control register live on it). */
  bus: PciBus;
  /** Every virtio device on every segment, in the order they were attached. */
  devices: VirtioDeviceHandle[];
  /** Puts a device on its segment's bus (hot-add); the primary thread also places its BAR. */
  attach(desc: VirtioDeviceDescriptor): VirtioDeviceHandle;
  /** Takes device `id` off its bus (hot removal); the primary thread also frees its BAR. */
  detach(id: string): VirtioDeviceHandle | undefined;
}

/** Finds the device whose BAR 0 decodes `addr` (or null). Reads shared config state; no lock needed. */
function barLookup(devs: VirtioDeviceHandle[], addr: number): VirtioDeviceHandle | null {
  for (let i = 0; i < devs.length; i++) {
    const base = devs[i].transport.config.barDecodeAddress(BAR_INDEX);
    if (base >= 0 && addr >= base && addr < base + BAR_SIZE) return devs[i];
  }
  return null;
}

/**
 * Builds the bus and devices over the shared state and registers them on this thread's buses.
 * `primary` is the main thread's first build: it allocates BARs.
 */
export function buildPciBuses(
  d: PciDescriptors,
  vm: VmFd,
  pio: PioBus,
  mmio: MmioBus,
  primary = false,
): PciThread {
  const busLock = new SharedLock(new Int32Array(d.busLock), 0);
  const routing = new GsiRouting(vm, d.routing);
  const devices: VirtioDeviceHandle[] = [];
  // Segment 0, then any further PCI segments (`platform.num_pci_segments`): each its own bus 0 with a
  // host bridge, its own ECAM window and its own slice of the 32-bit BAR window.
  const segments: PciSegmentDescriptor[] = [
    {
      busState: d.busState,
      hostBridgeState: d.hostBridgeState,
      mmio32: d.segment0Mmio32 ?? d.mmio32,
      ecam: null,
    },
    ...(d.extraSegments ?? []),
  ];
  const perSegment = segments.map((seg) => {
    const params = { mmio32: seg.mmio32, state: seg.busState };
    const bus = new PciBus(params);
    bus.add(0, PciBus.hostBridge(params, seg.hostBridgeState as SharedArrayBuffer), primary);
    const bySlot: (VirtioDeviceHandle | undefined)[] = new Array(32);
    // Runs inside a config write (bus + device locks held): a live device's ioeventfds follow BAR 0.
    bus.onBarChange = (addr, _fn, bar, _old, now) => {
      const h = bySlot[addr.device];
      if (!h || bar !== BAR_INDEX || !h.transport.activated) return;
      moveIoeventfds(vm, h, d.ioeventLen, now);
    };
    return { bus, bySlot };
  });
  const segmentOf = (desc: VirtioDeviceDescriptor) => {
    const s = perSegment[desc.segment ?? 0];
    if (!s) throw new Error(`${desc.id}: no PCI segment ${desc.segment}`);
    return s;
  };

  const attach = (desc: VirtioDeviceDescriptor): VirtioDeviceHandle => {
    const { bus, bySlot } = segmentOf(desc);
    const h = new VirtioDeviceHandle(desc);
    const t = h.transport;
    // Queue-notify ioeventfds exist only while the driver is live: registering one waits for an SRCU
    // grace period in KVM, and Linux toggles BAR decode around every BAR it sizes during enumeration.
    t.onActivate = () => {
      h.bumpEpoch();
      moveIoeventfds(vm, h, d.ioeventLen, t.config.barDecodeAddress(BAR_INDEX));
    };
    t.onReset = () => {
      h.bumpEpoch();
      moveIoeventfds(vm, h, d.ioeventLen, -1);
      // A vhost-user back-end must have let go of the rings before the driver frees them.
      if (desc.vhostUser) waitVhostUserStopped(desc, h.epoch);
    };
    t.onNotify = (q) => {
      if (q < desc.queueFds.length) h.signal(desc.queueFds[q]);
    };
    t.msix.onVectorChange = (v, vec) => routing.update(desc.gsiBase + v, vec);
    t.msix.onDeliverPending = (v) => h.signal(desc.irqFds[v]);
    if (desc.kind === "balloon") t.onConfigWrite = (off, data) => balloonConfigWrite(t, off, data);
    // Under the bus lock: a vCPU's config access may be walking the slots right now.
    busLock.lock();
    try {
      bus.add(desc.slot, t, primary);
      bySlot[desc.slot] = h;
      devices.push(h);
    } finally {
      busLock.unlock();
    }
    return h;
  };
  const detach = (id: string): VirtioDeviceHandle | undefined => {
    const i = devices.findIndex((h) => h.desc.id === id);
    if (i < 0) return undefined;
    const h = devices[i];
    const { bus, bySlot } = segmentOf(h.desc);
    busLock.lock();
    h.lock.lock();
    try {
      bus.remove(h.desc.slot, primary);
      bySlot[h.desc.slot] = undefined;
      devices.splice(i, 1);
    } finally {
      h.lock.unlock();
      busLock.unlock();
    }
    return h;
  };
  for (const desc of d.devices) attach(desc);
  if (d.hotplug) {
    const hp = new PciHotplug(d.hotplug);
    pio.register(hp.base, hp.len, hp, "pci-hotplug");
  }

  const buses = perSegment.map(({ bus, bySlot }, segment) => {
    const seg = segments[segment];
    // The device lock a config access to (bus, device, function) needs: only bus 0, function 0 has devices.
    const configLock = (b: number, dev: number, fn: number): SharedLock | null =>
      b === 0 && fn === 0 ? bySlot[dev]?.lock ?? null : null;
    // 0xCFC-0xCFF reach the function CONFIG_ADDRESS selects (read under the bus lock); 0xCF8-0xCFB none.
    const pioLock = (offset: number): SharedLock | null => {
      if (offset < 4) return null;
      const a = bus.pioRead(0, 4);
      return configLock((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 7);
    };
    const ecamLock = (offset: number) =>
      configLock(offset >>> 20, (offset >>> 15) & 0x1f, (offset >>> 12) & 7);
    const ones = (size: number) => size >= 4 ? 0xffffffff : (1 << (8 * size)) - 1;
    // 0xCF8/0xCFC reach segment 0 only (the legacy mechanism has no segment).
    if (segment === 0) {
      pio.register(PCI_CONFIG_ADDRESS_PORT, 8, {
        pioRead(offset, size) {
          busLock.lock();
          let dl: SharedLock | null = null;
          try {
            dl = pioLock(offset);
            dl?.lock();
            return bus.pioRead(offset, size);
          } catch {
            return ones(size);
          } finally {
            dl?.unlock();
            busLock.unlock();
          }
        },
        pioWrite(offset, size, value) {
          busLock.lock();
          let dl: SharedLock | null = null;
          try {
            dl = pioLock(offset);
            dl?.lock();
            bus.pioWrite(offset, size, value);
          } finally {
            dl?.unlock();
            busLock.unlock();
          }
        },
      }, "pci-config-io");
    }
    const ecam = seg.ecam ?? { base: Layout.pciEcamStart, size: Layout.pciEcamSize };
    mmio.register(ecam.base, ecam.size, {
      mmioRead(offset, data) {
        busLock.lock();
        const dl = ecamLock(offset);
        dl?.lock();
        try {
          bus.mmioRead(offset, data);
        } finally {
          dl?.unlock();
          busLock.unlock();
        }
      },
      mmioWrite(offset, data) {
        busLock.lock();
        const dl = ecamLock(offset);
        dl?.lock();
        try {
          bus.mmioWrite(offset, data);
        } finally {
          dl?.unlock();
          busLock.unlock();
        }
      },
    }, segment === 0 ? "pci-ecam" : `pci-ecam-${segment}`);
    return bus;
  });
  const barWindow = (base: number) => ({
    mmioRead(offset: number, data: Uint8Array) {
      const addr = base + offset;
      const h = barLookup(devices, addr);
      if (h === null) {
        data.fill(0xff);
        return;
      }
      h.lock.lock();
      try {
        const b = h.transport.config.barDecodeAddress(BAR_INDEX);
        if (b >= 0 && addr >= b && addr + data.length <= b + BAR_SIZE) h.transport.mmioRead(addr - b, data);
        else data.fill(0xff);
      } finally {
        h.lock.unlock();
      }
    },
    mmioWrite(offset: number, data: Uint8Array) {
      const addr = base + offset;
      const h = barLookup(devices, addr);
      if (h === null) return;
      h.lock.lock();
      try {
        const b = h.transport.config.barDecodeAddress(BAR_INDEX);
        if (b >= 0 && addr >= b && addr + data.length <= b + BAR_SIZE) h.transport.mmioWrite(addr - b, data);
      } finally {
        h.lock.unlock();
      }
    },
  });
  mmio.register(d.mmio32.base, d.mmio32.size, barWindow(d.mmio32.base), "pci-mmio32");
  mmio.register(d.mmio64.base, d.mmio64.size, barWindow(d.mmio64.base), "pci-mmio64");
  return { bus: buses[0], devices, attach, detach };
}

/** Re-registers a device's queue-notify ioeventfds at BAR base `now` (-1: not decoded, remove them). */
function moveIoeventfds(vm: VmFd, h: VirtioDeviceHandle, len: number, now: number): void {
  const old = h.ioeventBase;
  if (old === now) return;
  const fds = h.desc.queueFds;
  const at = (base: number, q: number) => base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q;
  if (old >= 0) {
    for (let q = 0; q < fds.length; q++) {
      try {
        vm.ioeventfd({ addr: at(old, q), len, eventfd: fds[q], deassign: true });
      } catch (e) {
        log.warn(`${h.desc.id}: ioeventfd deassign: ${(e as Error).message}`);
      }
    }
    h.ioeventBase = -1;
  }
  if (now >= 0) {
    try {
      for (let q = 0; q < fds.length; q++) vm.ioeventfd({ addr: at(now, q), len, eventfd: fds[q] });
      h.ioeventBase = now;
    } catch (e) {
      // Notifies then exit to userspace and reach the worker through onNotify.
      log.warn(`${h.desc.id}: ioeventfd: ${(e as Error).message}`);
    }
  }
}

/** A virtio-mem region (the default memory zone's `mem0`, or a memory zone's), mapped and given to KVM. */
export interface VirtioMemRegion {
  /** The device's id: the memory zone's id, as Cloud Hypervisor names it. */
  id: string;
  gpa: number;
  size: number;
  hostAddr: bigint;
  fd?: number;
  /** Bytes the guest is asked for from boot (hotplugged_size, after a reboot). */
  requested: number;
  sharedMemory: boolean;
}

/** Device kinds that can be hot-added, with the config each takes. */
export type PciHotplugRequest =
  | { kind: "disk"; config: DiskConfig }
  | { kind: "net"; config: NetConfig }
  | { kind: "fs"; config: FsConfig }
  | { kind: "pmem"; config: PmemConfig }
  | { kind: "vsock"; config: VsockConfig }
  | { kind: "generic-vhost-user"; config: GenericVhostUserConfig };

/** Main-thread handle on the PCI segments. */
export interface PciHost {
  readonly descriptors: PciDescriptors;
  counters(): Record<string, Record<string, number>>;
  deviceTree(): Record<string, unknown>;
  /** Host input for the virtio console; returns the bytes accepted, or -1 when there is no console. */
  consoleInput(bytes: Uint8Array): number;
  /** The balloon's target and actual size, or null when the VM has no balloon. */
  readonly balloon: BalloonControl | null;
  /**
   * Hot-add, step 1: builds the device (its backing opened, slot, GSIs, eventfds, BAR) and starts its
   * worker. The caller then attaches the returned descriptor on every vCPU thread and calls `announce`.
   */
  hotAdd(req: PciHotplugRequest): VirtioDeviceDescriptor;
  /**
   * Starts the boot-time devices' workers (once; later calls do nothing). The VM's boot calls it once its
   * vCPU threads have their vCPUs: a new Worker blocks the creating thread while its V8 isolate is made
   * (~10 ms natively, ~0.5 s in the KVM lab), and no guest instruction needs to wait for that. The guest
   * finds the devices' registers at once; a queue kicked before its worker is up is served when it is.
   */
  startWorkers(): void;
  /** Hot-add, step 2: tells the guest (ACPI PCI hotplug) that the device is in its slot. */
  announce(id: string): void;
  /** Removal, step 1: asks the guest to let go of device `id`; resolves with whether it did in time. */
  requestEject(id: string, timeoutMs: number): Promise<boolean>;
  /** Removal, step 2 (once every vCPU thread has detached it): stops the worker, frees everything. */
  release(id: string): Promise<void>;
  /** The device's slot address (`pci_bdf`). */
  bdfOf(id: string): string | null;
  /**
   * virtio-mem: asks the guest for `bytes` of the region (a configuration change) and reports what is
   * plugged; null when the VM has no virtio-mem device.
   */
  readonly virtioMem: Map<string, { request(bytes: number): void; plugged(): number }>;
  /**
   * vm.resize-disk: grows disk `id`'s image to `size` bytes and tells the guest (new capacity in the
   * config space, config-change interrupt). Throws a message naming what is wrong otherwise.
   */
  resizeDisk(id: string, size: number): void;
  /**
   * Quiesces the device workers (vm.pause): each stops serving its queues and publishes their positions.
   * vhost-user devices have no worker of ours on the data path and are left alone.
   */
  pauseWorkers(): Promise<void>;
  resumeWorkers(): void;
  /** For a snapshot (workers paused): each device's place and queue positions. */
  saveVirtio(): VirtioState[];
  /**
   * Restore, after the shared state was loaded: the workers start their queues from the snapshot's
   * positions once resumed; MSI routes and queue-notify ioeventfds are set up as the guest left them.
   */
  loadVirtio(states: VirtioState[]): void;
  close(): Promise<void>;
}

/** A device's place on the bus, fixed by a snapshot (restore builds each device where it was). */
export interface DevicePlacement {
  slot: number;
  segment: number;
  gsiBase: number;
}

function bdf(slot: number, segment = 0): string {
  return `${segment.toString(16).padStart(4, "0")}:00:${slot.toString(16).padStart(2, "0")}.0`;
}

/** The module every virtio device worker runs. */
export const DEVICE_WORKER = workerUrl("../devices/virtio/worker.ts", import.meta.url);

/** The kinds of the virtio devices a config creates at boot, one entry per device. */
function bootDeviceKinds(cfg: VmConfig): VirtioKind[] {
  const m = cfg.memory;
  const n = (k: VirtioKind, count: number) => Array<VirtioKind>(count).fill(k);
  return [
    ...n("console", wantsConsole(cfg) ? 1 : 0),
    ...n("rng", cfg.rng?.src ? 1 : 0),
    ...n("balloon", cfg.balloon ? 1 : 0),
    ...n(
      "mem",
      (m.hotplug_size && m.hotplug_method === "VirtioMem" ? 1 : 0) +
        (m.zones ?? []).filter((z) => z.hotplug_size).length,
    ),
    ...n("blk", cfg.disks?.length ?? 0),
    ...n("net", cfg.net?.length ?? 0),
    ...n("vhost_user", (cfg.generic_vhost_user?.length ?? 0) + (cfg.fs?.length ?? 0)),
    ...n("pmem", cfg.pmem?.length ?? 0),
    ...n("vsock", cfg.vsock ? 1 : 0),
  ];
}

/** How many device workers a config's virtio devices take at boot (the light ones share one). */
export function deviceWorkerCount(cfg: VmConfig): number {
  const kinds = bootDeviceKinds(cfg);
  const own = kinds.filter((k) => !sharesDeviceWorker(k)).length;
  return own + (own < kinds.length ? 1 : 0);
}

/** Whether the config asks for a virtio-console (every console mode but Off). */
function wantsConsole(cfg: VmConfig): boolean {
  return (cfg.console?.mode ?? "Off") !== "Off";
}

/**
 * Whether the VM gets PCI segments. Always, since the VM config always has an rng source by default;
 * without any device, devices can still be hot-added.
 */
export function wantsPci(cfg: VmConfig): boolean {
  return bootDeviceKinds(cfg).length > 0;
}

/** Refuses the parts of a --net this VMM does not implement, naming them. */
function checkNet(n: NetConfig, i: number | string): void {
  const what = `net ${n.id ?? i}`;
  if (n.vhost_user) {
    if (n.vhost_mode === "Server") {
      throw new Error(
        `${what}: vhost_mode=server (dvmm listening for the back-end) is not implemented in dvmm yet`,
      );
    }
    if (n.tap || n.fds?.length) {
      throw new Error(`${what}: vhost_user=on takes no tap= or fd= (the back-end has the tap)`);
    }
    return;
  }
  if (n.fds?.length && n.tap) throw new Error(`${what}: give either tap= or fd=, not both`);
  if (n.fds?.length && n.fds.length * 2 !== n.num_queues) {
    throw new Error(
      `${what}: ${n.fds.length} tap fd(s) for num_queues=${n.num_queues}: one fd per queue pair`,
    );
  }
}

/** What a device holds besides its descriptor, released when it goes. */
interface DeviceResources {
  /** Descriptors the main thread opened for it (image, taps, eventfds, sockets). */
  fds: number[];
  /** Anything else to undo (a socket path to remove). */
  cleanup: (() => void)[];
  /** Its device worker; `group`: the devices that worker still serves (one, or the light devices). */
  worker?: { w: Worker; exited: Promise<void>; group: Set<string> };
}

/** How long a stopping device worker gets before it is terminated. */
const WORKER_STOP_MS = 3000;

/**
 * Creates the PCI segments and their devices (main thread), and starts the device workers.
 * `ram` is guest RAM as host mappings (the workers map it by address). `raiseGed` raises GED event
 * bits (the PCI hotplug event among them).
 */
export function createPci(
  cfg: VmConfig,
  vm: VmFd,
  ram: { gpa: number; size: number; hostAddr: bigint; fd?: number }[],
  pio: PioBus,
  mmio: MmioBus,
  raiseGed: (bits: number) => void = () => {},
  memTable?: SharedArrayBuffer,
  hotplugRam?: { gpa: number; size: number; hostAddr: bigint; fd?: number },
  virtioMemRegions: VirtioMemRegion[] = [],
  placement?: Map<string, DevicePlacement>,
): PciHost {
  const m64 = mmio64Window(ramSize(cfg.memory), hotplugSpace(cfg.memory));
  const mmio32: Window = { base: Layout.mmio32Start, size: Layout.mmio32Size };
  const resources = new Map<string, DeviceResources>();
  // Descriptors opened for the device being built; addDevice hands them to that device.
  let pending: DeviceResources = { fds: [], cleanup: [] };
  // Device memory (pmem) in the first half of the 64-bit window, outside what the guest may give BARs.
  const pmem = new PmemRegions(vm, deviceMemoryWindow(ramSize(cfg.memory), hotplugSpace(cfg.memory)));
  const devices: VirtioDeviceDescriptor[] = [];
  let consoleIn: ConsoleInput | null = null;
  // `--console pty`: the terminal dvmm opens; what is typed there goes to the console's RX queue.
  let consolePty = null as HostEnd | null;
  let toConsole: ((bytes: Uint8Array) => void) | null = null;
  // MSI GSIs: handed out from FIRST_MSI_GSI; a removed device's run goes back to the free list.
  let nextGsi = FIRST_MSI_GSI;
  const freeGsis: { base: number; count: number }[] = [];
  const takeGsis = (count: number): number => {
    const i = freeGsis.findIndex((r) => r.count === count);
    if (i >= 0) return freeGsis.splice(i, 1)[0].base;
    if (nextGsi + count > FIRST_MSI_GSI + MAX_MSI_GSIS) throw new Error("too many MSI-X vectors");
    nextGsi += count;
    return nextGsi - count;
  };
  // PCI segments: a device's segment comes from its config (`pci_segment`); it takes the lowest free
  // slot there (0 is each segment's host bridge).
  const segmentCount = cfg.platform?.num_pci_segments ?? 1;
  const usedSlots = Array.from({ length: segmentCount }, () => new Set<number>([0]));
  const segmentOf = new Map<string, number>();
  for (const list of [cfg.disks, cfg.net, cfg.fs, cfg.pmem, cfg.generic_vhost_user, cfg.vdpa]) {
    for (const dev of list ?? []) if (dev.id !== undefined) segmentOf.set(dev.id, dev.pci_segment);
  }
  if (cfg.vsock?.id !== undefined) segmentOf.set(cfg.vsock.id, cfg.vsock.pci_segment);
  segmentOf.set(cfg.console.id ?? "__console", cfg.console.pci_segment);
  segmentOf.set(cfg.rng.id ?? "__rng", cfg.rng.pci_segment);
  if (cfg.balloon) segmentOf.set(cfg.balloon.id ?? "__balloon", cfg.balloon.pci_segment);

  /** Closes what a device (or a device that failed half-way) holds. */
  const releaseResources = (r: DeviceResources) => {
    for (const fd of r.fds) shim().kvs_close(fd);
    for (const f of r.cleanup) {
      try {
        f();
      } catch (e) {
        log.warn(`releasing a device: ${(e as Error).message}`);
      }
    }
    r.fds = [];
    r.cleanup = [];
  };

  const addDevice = (
    id: string,
    kind: VirtioDeviceDescriptor["kind"],
    spec: VirtioDeviceDescriptor["spec"],
    extra: Partial<VirtioDeviceDescriptor>,
    counters: SharedArrayBuffer,
  ): VirtioDeviceDescriptor => {
    const placed = placement?.get(id);
    if (placement && !placed) throw new Error(`the snapshot has no device '${id}'`);
    const segment = placed?.segment ?? segmentOf.get(id) ?? 0;
    const used = usedSlots[segment];
    if (!used) throw new Error(`${id}: no PCI segment ${segment}`);
    let slot = 1;
    while (slot < 32 && used.has(slot)) slot++;
    if (placed) {
      if (used.has(placed.slot)) throw new Error(`${id}: slot ${placed.slot} of segment ${segment} is taken`);
      slot = placed.slot;
    }
    if (slot > 31) throw new Error(`PCI segment ${segment} has no free slot for ${id}`);
    const t = new VirtioPciDevice(spec);
    const vectors = t.msix.vectors;
    const mk = () => {
      const e = EventFd.create(EFD_NONBLOCK);
      pending.fds.push(e.fd);
      return e.fd;
    };
    const queueFds = Array.from({ length: spec.numQueues }, mk);
    const irqFds = Array.from({ length: vectors }, mk);
    const controlFd = mk();
    let gsiBase: number;
    if (placed) {
      gsiBase = placed.gsiBase;
      nextGsi = Math.max(nextGsi, gsiBase + vectors);
    } else gsiBase = takeGsis(vectors);
    const desc: VirtioDeviceDescriptor = {
      id,
      kind,
      slot,
      segment,
      spec,
      shared: t.shared,
      control: newControlBlock(spec.numQueues),
      queueFds,
      irqFds,
      controlFd,
      gsiBase,
      counters,
      ...extra,
    };
    try {
      irqFds.forEach((fd, v) => vm.irqfd(fd, gsiBase + v));
    } catch (e) {
      freeGsis.push({ base: gsiBase, count: vectors });
      throw e;
    }
    used.add(slot);
    devices.push(desc);
    resources.set(id, pending);
    pending = { fds: [], cleanup: [] };
    return desc;
  };

  const buildConsole = () => {
    const c = cfg.console!;
    let outFd = -1;
    if (c.mode === "Tty") outFd = 1;
    else if (c.mode === "File") {
      if (!c.file) throw new Error("console mode File needs a file path");
      outFd = check(
        shim().kvs_open(cstr(c.file), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0o644),
        `open ${c.file}`,
      );
      pending.fds.push(outFd);
    } else if (c.mode === "Pty") {
      consolePty = openPty((bytes) => toConsole?.(bytes), log);
      c.file = consolePty.path; // as Cloud Hypervisor, vm.info reports the terminal's path
      outFd = consolePty.outFd;
    } else if (c.mode !== "Null") {
      throw new Error(`virtio-console mode ${c.mode} is not implemented in dvmm yet (--console)`);
    }
    consoleIn = new ConsoleInput(ConsoleInput.create());
    return addDevice(
      c.id ?? "__console",
      "console",
      {
        type: VIRTIO_ID.CONSOLE,
        features: consoleFeatures(),
        numQueues: 2,
        maxQueueSize: 256,
        config: consoleConfigSpace(),
      },
      { console: { outFd, input: consoleIn.buffer, drops: consolePty !== null } },
      new SharedArrayBuffer(16),
    );
  };

  const buildDisk = (disk: DiskConfig, i: number) => {
    const id = disk.id ?? `_disk${i}`;
    if (disk.vhost_user) {
      // vhost-user-blk: the back-end owns the image; its features and config come from it.
      const queueSizes = Array<number>(disk.num_queues).fill(disk.queue_size);
      const vu = connectVhostUser({ kind: "blk", id, socket: disk.vhost_socket!, queueSizes, ram });
      pending.fds.push(vu.vhostUser.socketFd);
      return addDevice(id, "vhost_user", vu.spec, { vhostUser: vu.vhostUser }, new SharedArrayBuffer(8));
    }
    if (!disk.path) throw new Error(`disk ${id} has no path`);
    let image: ReturnType<typeof openDiskImage>;
    try {
      image = openDiskImage(disk.path, { readonly: disk.readonly, direct: disk.direct });
    } catch (e) {
      throw new Error(`--disk ${id}: cannot open the image ${disk.path}: ${(e as Error).message}`);
    }
    const { fd, size, format } = image;
    pending.fds.push(fd);
    // As Cloud Hypervisor: the image's own format is recorded in the config, a contradiction refused.
    if (disk.image_type !== "Unknown" && disk.image_type !== format) {
      throw new Error(`disk ${id}: image_type ${disk.image_type} given, but ${disk.path} is ${format}`);
    }
    if (format !== "Raw") {
      throw new Error(
        `disk ${id}: ${format} images are not implemented in dvmm yet (${disk.path}); use a raw image`,
      );
    }
    disk.image_type = format;
    const opts = { numQueues: disk.num_queues };
    const serial = disk.serial ?? disk.path.split("/").pop()!.slice(0, 20);
    return addDevice(
      id,
      "blk",
      {
        type: VIRTIO_ID.BLOCK,
        features: blkFeatures({ readonly: disk.readonly }, opts),
        numQueues: disk.num_queues,
        maxQueueSize: disk.queue_size,
        config: blkConfigSpace({ size }, opts),
      },
      { blk: { fd, size, readonly: disk.readonly, serial, ioUring: !disk.disable_io_uring } },
      new SharedArrayBuffer(8 * BLK_COUNTERS.length),
    );
  };

  const buildNet = (n: NetConfig, i: number) => {
    checkNet(n, i);
    if (n.vhost_user) {
      // vhost-user-net: the back-end moves the frames; dvmm builds the configuration space and serves
      // the control queue (see device_vhost_user.ts).
      const id = n.id ?? `_net${i}`;
      const mac = n.mac ? parseMac(n.mac) : randomMac();
      const vu = connectVhostUser({
        kind: "net",
        id,
        socket: n.vhost_socket!,
        queueSizes: Array<number>(n.num_queues).fill(n.queue_size),
        ram,
        net: { mac, csum: n.offload_csum, tso: n.offload_tso, ufo: n.offload_ufo },
      });
      pending.fds.push(vu.vhostUser.socketFd);
      log.debug(
        `${id}: vhost-user-net at ${n.vhost_socket} (${n.num_queues / 2} pair(s)), MAC ${formatMac(mac)}`,
      );
      return addDevice(id, "vhost_user", vu.spec, { vhostUser: vu.vhostUser }, new SharedArrayBuffer(8));
    }
    // Taps handed over as fds (one per queue pair) are set up by whoever opened them: their vnet
    // header, non-blocking mode and the MTU are ours to set. A tap dvmm opens by name gets one queue
    // per pair, the host address (when dvmm creates it), host_mac and the MTU, as in Cloud Hypervisor.
    const pairs = n.num_queues / 2;
    const tap = n.fds?.length
      ? openTap({ fds: n.fds, mtu: n.mtu })
      : openTap({ name: n.tap, ip: n.ip, mask: n.mask, hostMac: n.host_mac, mtu: n.mtu, queues: pairs });
    if (!n.fds?.length) pending.fds.push(...tap.fds);
    const mac = n.mac ? parseMac(n.mac) : randomMac();
    // Offloads as Cloud Hypervisor maps them (TSO and UFO ride on checksum offload); the MTU is the
    // tap's. Mergeable RX buffers are offered, as QEMU does: without them a Linux guest with TSO posts
    // 64 KiB "big packet" buffers and spends one on every frame, down to each TCP ACK; in the lab they
    // doubled guest → host TCP (tests/lab_net_mq_test.ts, sq-nomrg against sq-mrg in two sessions).
    // DVMM_NET_MRG_RXBUF=off withholds them.
    const features = netFeatures({
      csum: n.offload_csum,
      tso: n.offload_tso,
      ufo: n.offload_ufo,
      mtu: tap.mtu !== null,
      mrgRxbuf: Deno.env.get("DVMM_NET_MRG_RXBUF") !== "off",
    });
    const id = n.id ?? `_net${i}`;
    log.debug(
      `${id}: tap ${tap.name} (${pairs} queue pair(s), MTU ${tap.mtu}), guest MAC ${formatMac(mac)}`,
    );
    return addDevice(
      id,
      "net",
      {
        type: VIRTIO_ID.NET,
        features,
        numQueues: n.num_queues + 1, // the pairs, then the control queue
        maxQueueSize: n.queue_size,
        config: netConfigSpace(mac, pairs, tap.mtu ?? 0),
      },
      { net: { tapFds: tap.fds, tap: tap.name, mtu: tap.mtu ?? DEFAULT_MTU } },
      new SharedArrayBuffer(8 * NET_COUNTERS.length),
    );
  };

  const buildRng = () => {
    // Fail at boot, not in the worker, when the source cannot be opened.
    Deno.openSync(cfg.rng.src, { read: true }).close();
    return addDevice(
      cfg.rng.id ?? "__rng",
      "rng",
      {
        type: VIRTIO_ID.RNG,
        features: rngFeatures(),
        numQueues: 1,
        maxQueueSize: 256,
        config: new Uint8Array(0),
      },
      { rng: { src: cfg.rng.src } },
      new SharedArrayBuffer(16),
    );
  };

  // Generic vhost-user devices: type, features, queues and configuration are the back-end's.
  const buildGenericVhostUser = (g: GenericVhostUserConfig, i: number) => {
    const id = g.id ?? `_generic_vhost_user${i}`;
    const setup = { socket: g.socket, queueSizes: g.queue_sizes, deviceType: g.device_type, ram };
    const vu = connectVhostUser({ kind: "generic", id, ...setup });
    pending.fds.push(vu.vhostUser.socketFd);
    return addDevice(id, "vhost_user", vu.spec, { vhostUser: vu.vhostUser }, new SharedArrayBuffer(8));
  };

  // virtio-fs: a vhost-user device; queue 0 is the high-priority queue, then the request queues.
  const buildFs = (f: FsConfig, i: number) => {
    const id = f.id ?? `_fs${i}`;
    const queueSizes = Array<number>(1 + f.num_queues).fill(f.queue_size);
    const vu = connectVhostUser({ kind: "fs", id, socket: f.socket, tag: f.tag, queueSizes, ram });
    pending.fds.push(vu.vhostUser.socketFd);
    return addDevice(id, "vhost_user", vu.spec, { vhostUser: vu.vhostUser }, new SharedArrayBuffer(8));
  };

  // virtio-pmem: the file mapped into guest memory (a KVM slot of its own), then its device.
  const buildPmem = (p: PmemConfig, i: number) => {
    const id = p.id ?? `_pmem${i}`;
    const r = pmem.add(p, id);
    pending.cleanup.push(() => pmem.remove(id));
    log.debug(`${id}: ${p.file} at 0x${r.gpa.toString(16)}, ${r.size} bytes (slot ${r.slot})`);
    return addDevice(
      id,
      "pmem",
      {
        type: VIRTIO_ID.PMEM,
        features: pmemFeatures(),
        numQueues: 1,
        maxQueueSize: PMEM_QUEUE_SIZE,
        config: pmemConfigSpace(r.gpa, r.size),
      },
      { pmem: { fd: r.fd, discardWrites: r.discardWrites } },
      new SharedArrayBuffer(8 * PMEM_COUNTERS.length),
    );
  };

  // virtio-vsock: its UNIX socket listens from creation on.
  const buildVsock = (v: VsockConfig) => {
    const listenFd = openVsockListener(v.socket);
    pending.fds.push(listenFd);
    pending.cleanup.push(() => removeVsockSocket(v.socket));
    return addDevice(
      v.id ?? "_vsock",
      "vsock",
      {
        type: VIRTIO_ID.VSOCK,
        features: vsockFeatures(),
        numQueues: VSOCK_NUM_QUEUES,
        maxQueueSize: VSOCK_QUEUE_SIZE,
        config: vsockConfigSpace(v.cid),
      },
      { vsock: { cid: v.cid, listenFd, path: v.socket } },
      new SharedArrayBuffer(8 * VSOCK_COUNTERS.length),
    );
  };

  const buildBalloon = (b: BalloonConfig) => {
    const opts = { deflateOnOom: b.deflate_on_oom, freePageReporting: b.free_page_reporting };
    return addDevice(
      b.id ?? "__balloon",
      "balloon",
      {
        type: VIRTIO_ID.BALLOON,
        features: balloonFeatures(opts),
        numQueues: balloonQueues(opts),
        maxQueueSize: BALLOON_QUEUE_SIZE,
        config: balloonConfigSpace(b.size),
      },
      { balloon: { sharedMemory: cfg.memory.shared } },
      new SharedArrayBuffer(8 * BALLOON_COUNTERS.length),
    );
  };

  // virtio-mem: the region (mapped and given to KVM by the VM) the guest plugs block by block.
  const buildVirtioMem = (r: VirtioMemRegion) =>
    addDevice(
      r.id,
      "mem",
      {
        type: VIRTIO_ID.MEM,
        features: memFeatures(),
        numQueues: 1,
        maxQueueSize: MEM_QUEUE_SIZE,
        // hotplugged_size (a reboot after vm.resize): the guest plugs it again as its driver starts.
        config: memConfigSpace({
          addr: r.gpa,
          regionSize: r.size,
          requested: Math.min(r.size, Math.floor(r.requested / MEM_BLOCK_SIZE) * MEM_BLOCK_SIZE),
        }),
      },
      {
        mem: {
          hostAddr: Number(r.hostAddr),
          size: r.size,
          sharedMemory: r.sharedMemory,
          plugged: new SharedArrayBuffer(Math.floor(r.size / MEM_BLOCK_SIZE)),
        },
      },
      new SharedArrayBuffer(8 * MEM_COUNTERS.length),
    );

  /** Releases everything every device holds (boot failure, close). */
  const releaseAll = () => {
    releaseResources(pending);
    for (const r of resources.values()) releaseResources(r);
    pmem.close();
  };

  try {
    // In Cloud Hypervisor's order: console, disks, net, rng, generic vhost-user, fs, pmem, vsock (after
    // fs and pmem), balloon (after the other virtio devices).
    if (wantsConsole(cfg)) buildConsole();
    (cfg.disks ?? []).forEach(buildDisk);
    (cfg.net ?? []).forEach(buildNet);
    if (cfg.rng?.src) buildRng();
    (cfg.generic_vhost_user ?? []).forEach(buildGenericVhostUser);
    (cfg.fs ?? []).forEach(buildFs);
    (cfg.pmem ?? []).forEach(buildPmem);
    if (cfg.vsock) buildVsock(cfg.vsock);
    if (cfg.balloon) buildBalloon(cfg.balloon);
    virtioMemRegions.forEach(buildVirtioMem);
  } catch (e) {
    releaseAll();
    void consolePty?.close();
    throw e;
  }

  const descriptors: PciDescriptors = {
    busState: new SharedArrayBuffer(8),
    hostBridgeState: new SharedArrayBuffer(0), // replaced below by the primary build's state
    busLock: new SharedArrayBuffer(4 * SharedLock.WORDS),
    // Room for every GSI a hot-added device may take later.
    routing: new SharedArrayBuffer(GsiRouting.stateSize(MAX_MSI_GSIS)),
    mmio32,
    mmio64: { base: m64.start, size: m64.size },
    ioeventLen: vm.checkExtension(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0 ? 0 : 2,
    devices,
    hotplug: PciHotplug.createDescriptor(Layout.pciHotplugPort, segmentCount),
  };
  // The primary build creates the host bridge state; later builds reuse it.
  const hb = PciBus.hostBridge({ mmio32 });
  descriptors.hostBridgeState = hb.config.state;
  if (segmentCount > 1) {
    // Each segment allocates its BARs from its own slice of the 32-bit window (the slices are what the
    // segments' host bridges describe in the DSDT).
    descriptors.segment0Mmio32 = pciSegmentMmio32(0, segmentCount);
    descriptors.extraSegments = Array.from({ length: segmentCount - 1 }, (_, i) => {
      const window = pciSegmentMmio32(i + 1, segmentCount);
      return {
        busState: new SharedArrayBuffer(8),
        hostBridgeState: PciBus.hostBridge({ mmio32: window }).config.state,
        mmio32: window,
        ecam: pciSegmentEcam(i + 1),
      };
    });
  }
  const primary = buildPciBuses(descriptors, vm, pio, mmio, true);
  const hotplug = new PciHotplug(descriptors.hotplug!);
  const balloonHandle = primary.devices.find((h) => h.desc.kind === "balloon");
  const balloon = balloonHandle ? new BalloonControl(balloonHandle) : null;
  const routing = new GsiRouting(vm, descriptors.routing);
  routing.install();

  // Device workers: one per device, named after it, except that the light devices present at boot share
  // one (sharesDeviceWorker). Each device has its own exit (a worker reports one per device it served).
  const startWorker = (descs: VirtioDeviceDescriptor[]) => {
    const w = workerPool.take(DEVICE_WORKER);
    const ends = new Map<string, () => void>();
    const group = new Set(descs.map((d) => d.id));
    const all = () => {
      for (const end of ends.values()) end();
    };
    for (const desc of descs) {
      const exited = new Promise<void>((resolve) => ends.set(desc.id, resolve));
      resources.get(desc.id)!.worker = { w, exited, group };
    }
    w.onmessage = (ev: MessageEvent<DeviceWorkerExit>) => {
      if (ev.data.type === "failed") {
        log.error(
          `virtio device ${ev.data.id} failed (the guest sees DEVICE_NEEDS_RESET): ${ev.data.error}`,
        );
        return;
      }
      if (ev.data.error) log.error(`virtio device ${ev.data.id}: ${ev.data.error}`);
      else log.debug(`virtio device ${ev.data.id} worker exited`);
      ends.get(ev.data.id)?.();
    };
    w.onerror = (ev) => {
      ev.preventDefault();
      log.error(`virtio device ${descs.map((d) => d.id).join(", ")}: ${ev.message}`);
      all();
    };
    // A vhost-user back-end maps the memory hotplug region from the start (its pages are used only once
    // plugged); so does every worker with virtio-mem (the whole region is guest RAM to KVM). With ACPI
    // hotplug, the workers that touch rings themselves learn of plugged slots from memTable.
    const init: DeviceWorkerInit = {
      devices: descs,
      ram: [
        ...ram,
        ...(hotplugRam && descs[0].kind === "vhost_user" ? [hotplugRam] : []),
        ...virtioMemRegions,
      ],
      memTable,
    };
    w.postMessage(init);
  };
  let unstarted: VirtioDeviceDescriptor[] | null = [...devices];

  /** Stops device workers (bounded); returns whether they all stopped by themselves. */
  const stopWorkers = async (handles: VirtioDeviceHandle[]): Promise<boolean> => {
    for (const h of handles) {
      Atomics.store(h.ctl, CTL_STOP, 1);
      h.kickWorker();
    }
    const ws = handles.map((h) => resources.get(h.desc.id)?.worker).filter((w) => w !== undefined);
    let timer = 0;
    const timeout = new Promise<"timeout">((r) => {
      timer = setTimeout(() => r("timeout"), WORKER_STOP_MS) as unknown as number;
      Deno.unrefTimer(timer);
    });
    const r = await Promise.race([Promise.all(ws.map((x) => x.exited)), timeout]);
    clearTimeout(timer);
    // A worker shared with devices that stay serves on; it ends when its last device has stopped.
    for (const h of handles) resources.get(h.desc.id)?.worker?.group.delete(h.desc.id);
    for (const x of ws) if (x.group.size === 0) x.w.terminate();
    return r !== "timeout";
  };

  const handleOf = (id: string) => {
    const h = primary.devices.find((x) => x.desc.id === id);
    if (!h) throw new Error(`no PCI device '${id}'`);
    return h;
  };

  let closed = false;
  const consoleInput = (bytes: Uint8Array): number => {
    if (consoleIn === null) return -1;
    const n = consoleIn.push(bytes);
    const h = primary.devices.find((x) => x.desc.kind === "console");
    if (n > 0 && h) h.signal(h.desc.queueFds[0]);
    return n;
  };
  toConsole = (bytes) => void consoleInput(bytes);
  return {
    descriptors,
    counters: () => {
      const out: Record<string, Record<string, number>> = {};
      for (const desc of devices) {
        if (desc.kind === "blk") out[desc.id] = new BlkCounters(desc.counters).snapshot();
        else if (desc.kind === "net") out[desc.id] = new NetCounters(desc.counters).snapshot();
        else if (desc.kind === "console") out[desc.id] = new ConsoleCounters(desc.counters).snapshot();
        else if (desc.kind === "pmem") out[desc.id] = new PmemCounters(desc.counters).snapshot();
        else if (desc.kind === "vsock") out[desc.id] = new VsockCounters(desc.counters).snapshot();
        else if (desc.kind === "balloon" && balloon) out[desc.id] = balloon.counters();
        else if (desc.kind === "mem") out[desc.id] = new MemCounters(desc.counters).snapshot();
      }
      return out;
    },
    deviceTree: () => {
      const out: Record<string, unknown> = {};
      for (const h of primary.devices) {
        const desc = h.desc;
        const pciId = `_virtio-pci-${desc.id}`;
        const base = h.transport.config.barAddress(BAR_INDEX);
        // The API document types pci_bdf as a string: nodes without one leave it out (and "parent").
        // A BAR is written as Cloud Hypervisor writes it (its field is `type_`), which clients parse.
        // A pmem device's node holds its guest memory range, as Cloud Hypervisor's.
        const pr = pmem.regions.find((r) => r.id === desc.id);
        const resources = pr ? [{ MmioAddressRange: { base: pr.gpa, size: pr.size } }] : [];
        out[desc.id] = { id: desc.id, resources, parent: pciId, children: [] };
        out[pciId] = {
          id: pciId,
          resources: [{
            PciBar: { index: BAR_INDEX, base, size: BAR_SIZE, type_: "Mmio64", prefetchable: false },
          }],
          children: [desc.id],
          pci_bdf: bdf(desc.slot, desc.segment),
        };
      }
      return out;
    },
    balloon,
    consoleInput,
    bdfOf: (id) => {
      const d = devices.find((x) => x.id === id);
      return d ? bdf(d.slot, d.segment) : null;
    },
    virtioMem: new Map(
      primary.devices.filter((x) => x.desc.kind === "mem").map((h) => {
        const cfgView = h.transport.deviceConfig();
        return [h.desc.id, {
          plugged: () => Number(cfgView.getBigUint64(MEM_CONFIG.PLUGGED_SIZE, true)),
          request: (bytes: number) => {
            const b = new Uint8Array(8);
            new DataView(b.buffer).setBigUint64(0, BigInt(bytes), true);
            h.updateConfig(MEM_CONFIG.REQUESTED_SIZE, b);
          },
        }];
      }),
    ),
    resizeDisk: (id, size) => {
      const h = primary.devices.find((x) => x.desc.id === id);
      if (!h) throw new Error(`no disk '${id}'`);
      const b = h.desc.blk;
      if (!b) throw new Error(`disk '${id}' is served by a vhost-user back-end: resize it there`);
      if (b.readonly) throw new Error(`disk '${id}' is read-only`);
      if (!Number.isSafeInteger(size) || size <= 0 || size % 512 !== 0) {
        throw new Error(`desired_size ${size} is not a positive multiple of 512 bytes`);
      }
      const current = h.diskSize > 0 ? h.diskSize : b.size;
      if (size < current) {
        throw new Error(
          `shrinking a disk is not supported (disk '${id}' has ${current} bytes, ${size} asked)`,
        );
      }
      const r = Number(shim().kvs_ftruncate(b.fd, size));
      if (r < 0) {
        // EINVAL: not a regular file (a block device is resized by its owner, not by dvmm).
        throw new Error(`growing the image failed (errno ${-r}${-r === 22 ? ": not a regular file" : ""})`);
      }
      const cap = new Uint8Array(8);
      new DataView(cap.buffer).setBigUint64(0, BigInt(size / 512), true);
      // The worker serves the new capacity before the guest can hear of it (it reads it on every wake).
      h.diskSize = size;
      h.updateConfig(0, cap);
      h.kickWorker();
      log.info(`disk ${id} resized to ${size} bytes`);
    },
    hotAdd: (req) => {
      if (closed) throw new Error("the VM's devices are shut down");
      const c = req.config;
      if (c.id === undefined) throw new Error("a hot-added device needs an identifier");
      if (resources.has(c.id)) throw new Error(`a device '${c.id}' is already on the PCI bus`);
      segmentOf.set(c.id, c.pci_segment ?? 0);
      let desc: VirtioDeviceDescriptor;
      try {
        if (req.kind === "disk") desc = buildDisk(req.config, 0);
        else if (req.kind === "net") desc = buildNet(req.config, 0);
        else if (req.kind === "fs") desc = buildFs(req.config, 0);
        else if (req.kind === "pmem") desc = buildPmem(req.config, 0);
        else if (req.kind === "vsock") desc = buildVsock(req.config);
        else desc = buildGenericVhostUser(req.config, 0);
      } catch (e) {
        releaseResources(pending);
        pending = { fds: [], cleanup: [] };
        segmentOf.delete(c.id);
        throw e;
      }
      primary.attach(desc);
      startWorker([desc]);
      return desc;
    },
    announce: (id) => {
      const h = handleOf(id);
      hotplug.plug(h.desc.segment ?? 0, h.desc.slot);
      raiseGed(Layout.acpiPm.gedPciHotplugBit);
    },
    requestEject: (id, timeoutMs) => {
      const h = handleOf(id);
      const segment = h.desc.segment ?? 0;
      hotplug.requestEject(segment, h.desc.slot);
      raiseGed(Layout.acpiPm.gedPciHotplugBit);
      return hotplug.waitEjected(segment, h.desc.slot, timeoutMs);
    },
    release: async (id) => {
      const h = handleOf(id);
      const desc = h.desc;
      const stopped = await stopWorkers([h]);
      primary.detach(id);
      moveIoeventfds(vm, h, descriptors.ioeventLen, -1);
      const vectors = desc.irqFds.length;
      desc.irqFds.forEach((fd, v) => {
        try {
          vm.irqfd(fd, desc.gsiBase + v, { deassign: true });
        } catch (e) {
          log.warn(`${id}: irqfd deassign: ${(e as Error).message}`);
        }
      });
      routing.clear(desc.gsiBase, vectors);
      freeGsis.push({ base: desc.gsiBase, count: vectors });
      const r = resources.get(id)!;
      resources.delete(id);
      // A worker that had to be terminated may still be inside a system call on these descriptors.
      if (stopped) releaseResources(r);
      else log.warn(`${id}: its worker did not stop in time; its descriptors stay open`);
      devices.splice(devices.indexOf(desc), 1);
      usedSlots[desc.segment ?? 0].delete(desc.slot);
      segmentOf.delete(id);
    },
    startWorkers: () => {
      const p = unstarted;
      unstarted = null;
      if (!p) return;
      const shared = p.filter((d) => sharesDeviceWorker(d.kind));
      if (shared.length > 0) startWorker(shared);
      for (const d of p) if (!sharesDeviceWorker(d.kind)) startWorker([d]);
    },
    pauseWorkers: async () => {
      const live = primary.devices.filter((h) => h.desc.kind !== "vhost_user");
      const ok = await Promise.all(live.map((h) => h.pauseWorker()));
      const stuck = live.filter((_, i) => !ok[i]).map((h) => h.desc.id);
      if (stuck.length > 0) {
        for (const h of live) h.resumeWorker();
        throw new Error(`device worker(s) did not pause: ${stuck.join(", ")}`);
      }
    },
    resumeWorkers: () => {
      for (const h of primary.devices) if (h.desc.kind !== "vhost_user") h.resumeWorker();
    },
    saveVirtio: () =>
      primary.devices.map((h) => ({
        id: h.desc.id,
        kind: h.desc.kind,
        slot: h.desc.slot,
        segment: h.desc.segment ?? 0,
        gsiBase: h.desc.gsiBase,
        queues: h.desc.queueFds.map((_, i) => h.queuePosition(i)),
        words: [...h.deviceWords],
      })),
    loadVirtio: (states) => {
      for (const st of states) {
        const h = handleOf(st.id);
        st.queues.forEach((p, i) => h.setQueuePosition(i, p));
        h.deviceWords.set(st.words.slice(0, h.deviceWords.length));
        // The worker stays quiesced until the VM resumes, then activates from these positions.
        Atomics.store(h.ctl, CTL_PAUSE, 1);
        Atomics.store(h.ctl, CTL_RESTORE, 1);
        if (h.transport.activated) {
          moveIoeventfds(vm, h, descriptors.ioeventLen, h.transport.config.barDecodeAddress(BAR_INDEX));
        }
        h.kickWorker();
      }
      routing.install();
    },
    close: async () => {
      if (closed) return;
      closed = true;
      const stopped = await stopWorkers(primary.devices);
      if (!stopped) {
        log.warn("virtio device workers did not stop in time; terminated them");
        // Descriptors stay open: a terminated worker may still be blocked on one.
        for (const r of resources.values()) {
          for (const f of r.cleanup) f();
        }
        return;
      }
      releaseAll();
      // Closed only once no worker can write to it (a reused descriptor number would get the output).
      await consolePty?.close();
    },
  };
}
