/**
 * vhost-user devices (virtio-fs, vhost-user-blk, generic vhost-user): virtio-pci functions whose data
 * plane is another process, the back-end, reached over a UNIX socket (devices/virtio/vhost_user.ts).
 *
 * - Creation (main thread, {@link connectVhostUser}): connect (retrying while the back-end starts),
 *   SET_OWNER, feature and protocol-feature negotiation, queue count check, the device configuration
 *   (virtio-fs: tag and request queue count; blk: read from the back-end with GET_CONFIG). The features
 *   offered to the guest are the back-end's, limited to what this transport and dvmm support.
 * - Activation (device worker, {@link runVhostUser}): when the driver sets DRIVER_OK, the worker gives
 *   the back-end the negotiated features, the guest RAM memfds (SET_MEM_TABLE) and, per enabled queue,
 *   its size, ring addresses, the queue's ioeventfd as kick and its MSI-X vector's irqfd as call. From
 *   then on guest notifies go from KVM straight to the back-end and its interrupts straight to KVM;
 *   dvmm's worker only waits on its control eventfd and the socket.
 * - Reset: the vCPU that wrote status 0 waits ({@link waitVhostUserStopped}) until the worker has
 *   stopped every ring (GET_VRING_BASE), so the driver never frees rings the back-end still uses.
 * - A back-end that hangs up, stalls or answers garbage is logged and the device flagged
 *   DEVICE_NEEDS_RESET (with a configuration interrupt); dvmm and the guest's other devices go on.
 */
import { check, EINTR, shim } from "../../ffi/shim.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN, EPOLLRDHUP } from "../../ffi/kvm_constants.ts";
import { logger } from "../../vmm/log.ts";
import { BLK_F, F, featureBit, NET_F, VIRTIO_ID, VIRTIO_MSI_NO_VECTOR } from "./constants.ts";
import { ctrlQueueIndex, netConfigSpace, NetControl, netFeatures } from "./net.ts";
import { SplitQueue } from "./queue.ts";
import { GuestMemory } from "../../vmm/memory.ts";
import type { Activation, VirtioDeviceSpec } from "./pci_transport.ts";
import { CTL_WORKER_STATE, type VirtioDeviceDescriptor, type VirtioDeviceHandle } from "./device_shared.ts";
import {
  type MemRegion,
  PROTOCOL_F,
  VHOST_USER_F_PROTOCOL_FEATURES,
  type VhostUserDescriptor,
  VhostUserError,
  VhostUserFrontend,
} from "./vhost_user.ts";

export type { VhostUserDescriptor } from "./vhost_user.ts";

/** Guest RAM as the VMM mapped it; `fd` is the region's memfd (memory shared=on). */
export interface RamRegion {
  gpa: number;
  size: number;
  hostAddr: bigint;
  fd?: number;
  /** Where the region starts in `fd` (a memory zone laid over two RAM regions). */
  offset?: number;
}

/** The virtio-fs configuration: a 36-byte tag and the number of request queues. */
export const FS_TAG_BYTES = 36;
export const FS_CONFIG_SIZE = 40;
/** How much of the virtio-blk configuration is read from the back-end (through write_zeroes_may_unmap). */
export const VHOST_BLK_CONFIG_SIZE = 60;

/**
 * Generic devices: how much configuration space to read from the back-end (GET_CONFIG, once, at
 * creation), by virtio device type; the sizes of the spec's config structures that every back-end
 * knows. Other types get no configuration space.
 */
export const GENERIC_CONFIG_SIZES: Readonly<Record<number, number>> = {
  [VIRTIO_ID.NET]: 12,
  [VIRTIO_ID.BLOCK]: VHOST_BLK_CONFIG_SIZE,
  [VIRTIO_ID.CONSOLE]: 12,
  [VIRTIO_ID.GPU]: 16,
  [VIRTIO_ID.INPUT]: 136,
  [VIRTIO_ID.VSOCK]: 8,
  25: 12, // sound: jacks, streams, chmaps
  [VIRTIO_ID.FS]: FS_CONFIG_SIZE,
  41: 8, // gpio: ngpio, padding, gpio_names_size
};

/** Transport features a vhost-user device may offer (split rings, MSI-X, no IOMMU). */
const TRANSPORT_FEATURES = featureBit(F.VERSION_1) | featureBit(F.INDIRECT_DESC) | featureBit(F.EVENT_IDX);
/** virtio-blk features passed through from the back-end (as Cloud Hypervisor; no writeback toggle). */
const BLK_DEVICE_FEATURES = [
  BLK_F.SIZE_MAX,
  BLK_F.SEG_MAX,
  BLK_F.GEOMETRY,
  BLK_F.RO,
  BLK_F.BLK_SIZE,
  BLK_F.FLUSH,
  BLK_F.TOPOLOGY,
  BLK_F.DISCARD,
  BLK_F.WRITE_ZEROES,
].reduce((m, b) => m | featureBit(b), 0n);
/** Device-specific feature bits 0..23 (generic devices pass all of the back-end's through). */
const DEVICE_BITS = featureBit(24) - 1n;
const PROTOCOL_FEATURES_BIT = featureBit(VHOST_USER_F_PROTOCOL_FEATURES);

/** The most rings a vhost-user device can have (SET_VRING_KICK/CALL carry the index in 8 bits). */
export const MAX_VHOST_USER_QUEUES = 256;

export type VhostUserKind = "fs" | "blk" | "generic" | "net";

/** vhost-user-net: what dvmm decides itself (the configuration space, offload policy). */
export interface VhostUserNetSetup {
  /** The guest's MAC (goes into the configuration space dvmm builds). */
  mac: Uint8Array;
  /** Offloads as the --net offload_* options allow them (each still needs the back-end's bit). */
  csum: boolean;
  tso: boolean;
  ufo: boolean;
}

/**
 * virtio-net features dvmm offers on its own, whatever the back-end: the MAC and link status in the
 * configuration space it builds, and the control queue it serves itself (with MQ, so the driver learns
 * max_virtqueue_pairs, and guest announcements, acknowledged there). Guest offload changes through
 * the control queue (CTRL_GUEST_OFFLOADS) are not offered: the back-end owns the tap's offloads.
 */
export const VHOST_NET_OWN_FEATURES = [NET_F.MAC, NET_F.STATUS, NET_F.CTRL_VQ, NET_F.MQ, NET_F.GUEST_ANNOUNCE]
  .reduce((m, b) => m | featureBit(b), 0n);

export interface VhostUserSetup {
  kind: VhostUserKind;
  /** Device id, for messages. */
  id: string;
  socket: string;
  /** Every queue of the device (virtio-fs: the high-priority queue plus the request queues). */
  queueSizes: number[];
  /** virtio device type (generic devices; fs and blk imply theirs). */
  deviceType?: number;
  /** virtio-fs tag. */
  tag?: string;
  /** vhost-user-net (queueSizes are then the data rings only, two per pair). */
  net?: VhostUserNetSetup;
  /** Guest RAM: every region must have its memfd (memory shared=on). */
  ram: readonly RamRegion[];
  timeoutMs?: number;
  connectTimeoutMs?: number;
}

/**
 * Connects to the back-end and negotiates what the device will offer the guest (main thread, at
 * device creation). The returned descriptor's socket is the caller's to close.
 */
export function connectVhostUser(
  s: VhostUserSetup,
): { spec: VirtioDeviceSpec; vhostUser: VhostUserDescriptor } {
  const kindName = s.kind === "fs" ? "virtio-fs" : s.kind === "net" ? "virtio-net" : s.kind;
  const what = `${s.id}: vhost-user ${kindName} back-end at ${s.socket}`;
  if (s.ram.length === 0 || s.ram.some((r) => r.fd === undefined)) {
    throw new Error(`${what}: guest memory must be shared with the back-end (--memory shared=on)`);
  }
  const n = s.queueSizes.length;
  if (n < 1 || n > MAX_VHOST_USER_QUEUES) {
    throw new Error(`${what}: ${n} queues (1 to ${MAX_VHOST_USER_QUEUES})`);
  }
  // One size for every queue (the transport has one): the smallest, which every ring of the back-end takes.
  if (s.queueSizes.some((q) => q < 1 || q > 32768 || (q & (q - 1)) !== 0)) {
    throw new Error(`${what}: queue sizes must be powers of two up to 32768 (${s.queueSizes.join(", ")})`);
  }
  const maxQueueSize = Math.min(...s.queueSizes);
  const timeoutMs = s.timeoutMs ?? 10_000;
  let fe: VhostUserFrontend;
  try {
    fe = VhostUserFrontend.connect(s.socket, { timeoutMs, connectTimeoutMs: s.connectTimeoutMs });
  } catch (e) {
    throw new Error(`${what}: ${(e as Error).message}`);
  }
  try {
    fe.setOwner();
    const backendFeatures = fe.getFeatures();
    if (!(backendFeatures & featureBit(F.VERSION_1))) {
      throw new Error("the back-end does not offer VIRTIO_F_VERSION_1 (legacy devices are not supported)");
    }
    let protocolFeatures = 0n;
    if (backendFeatures & PROTOCOL_FEATURES_BIT) {
      let want = featureBit(PROTOCOL_F.MQ) | featureBit(PROTOCOL_F.REPLY_ACK);
      if (s.kind !== "fs" && s.kind !== "net") want |= featureBit(PROTOCOL_F.CONFIG);
      protocolFeatures = fe.getProtocolFeatures() & want;
      fe.setProtocolFeatures(protocolFeatures);
    }
    if (fe.hasProtocolFeature(PROTOCOL_F.MQ)) {
      const max = fe.getQueueNum();
      if (n > max) throw new Error(`${n} queues asked, the back-end has at most ${max}`);
    }
    let type: number;
    let features = backendFeatures & TRANSPORT_FEATURES;
    let config: Uint8Array;
    let numQueues = n;
    let netPairs: number | undefined;
    if (s.kind === "net") {
      const net = s.net!;
      if (n % 2 !== 0) throw new Error(`${n} rings: two per queue pair`);
      type = VIRTIO_ID.NET;
      netPairs = n / 2;
      // The back-end's data-path features, limited by the offload options; then dvmm's own.
      const allowed = netFeatures({ csum: net.csum, tso: net.tso, ufo: net.ufo, mrgRxbuf: true }) &
        ~featureBit(NET_F.CTRL_GUEST_OFFLOADS) & ~VHOST_NET_OWN_FEATURES;
      features = (backendFeatures & allowed) | VHOST_NET_OWN_FEATURES;
      config = netConfigSpace(net.mac, netPairs, 0);
      numQueues = n + 1; // the control queue, served by dvmm
    } else if (s.kind === "fs") {
      type = VIRTIO_ID.FS;
      config = fsConfigSpace(s.tag ?? "", n - 1);
    } else if (s.kind === "blk") {
      type = VIRTIO_ID.BLOCK;
      features |= backendFeatures & BLK_DEVICE_FEATURES;
      if (n > 1) {
        if (!(backendFeatures & featureBit(BLK_F.MQ))) {
          throw new Error(`num_queues=${n}: the back-end does not offer multi-queue (VIRTIO_BLK_F_MQ)`);
        }
        features |= featureBit(BLK_F.MQ);
      }
      if (!fe.hasProtocolFeature(PROTOCOL_F.CONFIG)) {
        throw new Error("the back-end does not give the disk's configuration (VHOST_USER_PROTOCOL_F_CONFIG)");
      }
      config = fe.getConfig(0, VHOST_BLK_CONFIG_SIZE);
      new DataView(config.buffer, config.byteOffset).setUint16(34, n, true); // num_queues
    } else {
      type = s.deviceType ?? 0;
      features |= backendFeatures & DEVICE_BITS;
      config = new Uint8Array(0);
      const size = GENERIC_CONFIG_SIZES[type] ?? 0;
      if (size > 0 && fe.hasProtocolFeature(PROTOCOL_F.CONFIG)) {
        try {
          config = fe.getConfig(0, size);
        } catch (e) {
          if (fe.broken !== null) throw e;
          logger(s.id).warn(`${what}: no device configuration (${(e as Error).message})`);
        }
      }
    }
    const state = new SharedArrayBuffer(8);
    return {
      spec: { type, features, numQueues, maxQueueSize, config },
      vhostUser: {
        socketFd: fe.fd,
        socket: s.socket,
        backendFeatures,
        protocolFeatures,
        state,
        timeoutMs,
        netPairs,
      },
    };
  } catch (e) {
    fe.close();
    throw new Error(`${what}: ${(e as Error).message}`);
  }
}

/** The virtio-fs device configuration: tag (NUL-padded, 36 bytes), le32 num_request_queues. */
export function fsConfigSpace(tag: string, requestQueues: number): Uint8Array {
  const out = new Uint8Array(FS_CONFIG_SIZE);
  const t = new TextEncoder().encode(tag);
  if (t.length === 0 || t.length > FS_TAG_BYTES) throw new Error(`virtio-fs tag '${tag}': 1 to 36 bytes`);
  out.set(t);
  new DataView(out.buffer).setUint32(FS_TAG_BYTES, requestQueues, true);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// The control plane (device worker)

/** Ring layout sizes of a split queue of `size` entries (with the event-idx words). */
function ringBytes(size: number) {
  return { desc: 16 * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/**
 * Programs one back-end for one activation of the device and stops it again. Every call may throw
 * VhostUserError (the connection is then unusable) or Error (a ring outside guest RAM).
 */
export class VhostUserControl {
  /** Rings started and not yet stopped. */
  running: number[] = [];

  constructor(
    readonly fe: VhostUserFrontend,
    readonly ram: readonly RamRegion[],
    /** Per queue: the eventfd the guest's notify signals (KVM ioeventfd). */
    readonly kickFds: readonly number[],
    /** Per MSI-X vector: the eventfd that raises it (KVM irqfd). */
    readonly callFds: readonly number[],
    readonly backendFeatures: bigint,
    readonly warn: (msg: string) => void = () => {},
  ) {}

  /** The front-end (dvmm) address of guest range [gpa, gpa + len), which must lie in one region. */
  hostAddress(gpa: number, len: number): bigint {
    for (const r of this.ram) {
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) return r.hostAddr + BigInt(gpa - r.gpa);
    }
    throw new Error(`ring at guest address 0x${gpa.toString(16)} (+${len}) is not in guest RAM`);
  }

  /** The memory table: every RAM region, mapped by the back-end from its memfd at offset 0. */
  memRegions(): MemRegion[] {
    return this.ram.map((r) => {
      if (r.fd === undefined) throw new Error("guest RAM region without a memfd (memory shared=on)");
      return {
        guestPhysAddr: BigInt(r.gpa),
        size: BigInt(r.size),
        userAddr: r.hostAddr,
        mmapOffset: BigInt(r.offset ?? 0),
        fd: r.fd,
      };
    });
  }

  /** Hands the driver's queues to the back-end and starts them. */
  start(a: Activation): void {
    const fe = this.fe;
    const protocol = (this.backendFeatures & PROTOCOL_FEATURES_BIT) !== 0n;
    // Addresses first: a ring outside RAM fails the activation before the back-end is touched.
    const rings = a.queues.map((q) => {
      const b = ringBytes(q.size);
      return {
        q,
        desc: this.hostAddress(q.descAddr, b.desc),
        avail: this.hostAddress(q.driverAddr, b.avail),
        used: this.hostAddress(q.deviceAddr, b.used),
      };
    });
    fe.setFeatures((a.features & this.backendFeatures) | (this.backendFeatures & PROTOCOL_FEATURES_BIT));
    fe.setMemTable(this.memRegions());
    for (const { q } of rings) fe.setVringNum(q.index, q.size);
    for (const r of rings) {
      const i = r.q.index;
      fe.setVringBase(i, 0);
      fe.setVringAddr({ index: i, desc: r.desc, used: r.used, avail: r.avail });
      const v = r.q.msixVector;
      if (v === VIRTIO_MSI_NO_VECTOR || v >= this.callFds.length) {
        this.warn(`queue ${i} has no MSI-X vector: the back-end cannot interrupt the guest for it`);
        fe.setVringCall(i, -1);
      } else {
        fe.setVringCall(i, this.callFds[v]);
      }
      fe.setVringKick(i, this.kickFds[i]);
      this.running.push(i);
    }
    if (protocol) { for (const { q } of rings) fe.setVringEnable(q.index, true); }
    // Notifies the driver made before its notify address was an ioeventfd already sit in the
    // eventfds; one more kick per ring costs the back-end a look at an unchanged ring at most.
    const one = new BigUint64Array([1n]);
    for (const { q } of rings) shim().kvs_write_i32(this.kickFds[q.index], new Uint8Array(one.buffer), 8);
  }

  /** Stops every running ring; returns their bases (the next available index per ring). */
  stop(): Map<number, number> {
    const bases = new Map<number, number>();
    const protocol = (this.backendFeatures & PROTOCOL_FEATURES_BIT) !== 0n;
    const rings = this.running;
    this.running = [];
    for (const i of rings) {
      if (protocol) this.fe.setVringEnable(i, false);
      bases.set(i, this.fe.getVringBase(i));
    }
    return bases;
  }
}

// ---------------------------------------------------------------------------------------------------
// The worker

const ST_STOPPED_EPOCH = 0;
const ST_FAILED = 1;
const CONTROL_TAG = 0;
const SOCKET_TAG = 1;
const NET_CTRL_TAG = 2;

/**
 * vhost-user-net: the rings of an activation that go to the back-end (the data rings the driver may
 * use), and the control queue dvmm serves itself (null without VIRTIO_NET_F_CTRL_VQ).
 */
export function splitNetQueues(
  a: Activation,
  pairs: number,
): { data: Activation["queues"]; ctrl: Activation["queues"][number] | null } {
  const ctrlIdx = ctrlQueueIndex(a.features, pairs);
  const dataRings = (a.features & featureBit(NET_F.MQ)) !== 0n ? 2 * pairs : 2;
  return {
    data: a.queues.filter((q) => q.index < dataRings && q.index !== ctrlIdx),
    ctrl: a.queues.find((q) => q.index === ctrlIdx) ?? null,
  };
}

/** Runs a vhost-user device's control plane until shutdown (called by devices/virtio/worker.ts). */
export function runVhostUser(
  init: { device: VirtioDeviceDescriptor; ram: readonly RamRegion[] },
  h: VirtioDeviceHandle,
): void {
  const d = init.device;
  const vu = d.vhostUser!;
  const log = logger(d.id);
  const dev = h.transport;
  const st = new Int32Array(vu.state);
  const s = shim();
  const fe = new VhostUserFrontend(vu.socketFd, {
    timeoutMs: vu.timeoutMs,
    protocolFeatures: vu.protocolFeatures,
  });
  const ctl = new VhostUserControl(
    fe,
    init.ram,
    d.queueFds,
    d.irqFds,
    vu.backendFeatures,
    (m) => log.warn(m),
  );
  const epfd = check(s.kvs_epoll_create(), "epoll_create");
  check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, d.controlFd, EPOLLIN, CONTROL_TAG), "epoll_ctl control");
  check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fe.fd, EPOLLIN | EPOLLRDHUP, SOCKET_TAG), "epoll_ctl socket");
  const out = new BigUint64Array(4);
  const outBytes = new Uint8Array(out.buffer);
  const drain = new Uint8Array(8);
  let seen = -1;
  let failed: string | null = null;
  // vhost-user-net: the control queue, served here (Cloud Hypervisor serves it in the VMM too).
  const pairs = vu.netPairs ?? 0;
  const mem = pairs > 0 ? GuestMemory.fromHost([...init.ram]) : null;
  let ctrlQ: SplitQueue | null = null;
  let ctrlIdx = -1;
  let ctrlPending = false;
  let ctrlFailed = false;
  const control = new NetControl(Math.max(pairs, 1), {
    // VQ_PAIRS_SET: the back-end serves the pairs whose rings are enabled (as QEMU tells its
    // vhost-user back-ends); without protocol features rings cannot be disabled, all stay in use.
    setQueuePairs: (want) => {
      if (!(vu.backendFeatures & PROTOCOL_FEATURES_BIT) || failed !== null) return failed === null;
      try {
        for (let k = 0; k < pairs; k++) {
          for (const ring of [2 * k, 2 * k + 1]) {
            if (ctl.running.includes(ring)) fe.setVringEnable(ring, k < want);
          }
        }
        return true;
      } catch (e) {
        fail(`VQ_PAIRS_SET ${want}: ${(e as Error).message}`);
        ctrlFailed = true;
        return false;
      }
    },
    setGuestOffloads: () => false, // CTRL_GUEST_OFFLOADS is not offered
  });
  const stopCtrl = () => {
    if (ctrlQ !== null) s.kvs_epoll_ctl(epfd, EPOLL_CTL_DEL, d.queueFds[ctrlIdx], 0, 0);
    ctrlQ = null;
    ctrlIdx = -1;
    ctrlPending = false;
  };
  /** Serves the control queue (false: the device lock was busy, try again shortly). */
  const serveCtrl = (): boolean => {
    if (!ctrlPending || ctrlQ === null) return true;
    if (!h.lock.tryLock()) return false;
    let irq = false;
    const q: SplitQueue = ctrlQ;
    try {
      if (h.epoch !== seen) return true; // a reset is under way: the epoch pass comes first
      ctrlPending = false;
      do {
        if (control.process(q)) irq = true;
        if (q.broken !== null) break;
      } while (q.enableNotification());
      if (irq) signalVector(dev.queueInterrupt(ctrlIdx));
    } finally {
      h.lock.unlock();
    }
    if (q.broken !== null) {
      log.error(`control queue: the driver broke it (${q.broken})`);
      stopCtrl();
      needsReset();
    }
    if (ctrlFailed) {
      ctrlFailed = false;
      needsReset();
    }
    return true;
  };

  const signalVector = (v: number) => {
    if (v >= 0 && v < d.irqFds.length) h.signal(d.irqFds[v]);
  };
  /** Marks the device broken for the driver (only while it is live, i.e. DRIVER_OK). */
  const needsReset = () => {
    h.lock.lock();
    try {
      if (!dev.activated) return;
      dev.setNeedsReset();
      signalVector(dev.configInterrupt());
    } finally {
      h.lock.unlock();
    }
  };
  const fail = (why: string) => {
    if (failed === null) {
      log.error(`vhost-user back-end ${vu.socket}: ${why}; the device needs a reset and stays unusable`);
      failed = why;
      Atomics.store(st, ST_FAILED, 1);
      s.kvs_epoll_ctl(epfd, EPOLL_CTL_DEL, fe.fd, 0, 0);
    }
    ctl.running = [];
  };
  const publishStopped = (epoch: number) => {
    Atomics.store(st, ST_STOPPED_EPOCH, epoch);
    Atomics.notify(st, ST_STOPPED_EPOCH);
  };

  try {
    for (;;) {
      const n = Number(s.kvs_epoll_wait(epfd, outBytes, out.length, ctrlPending ? 1 : -1));
      if (n === -EINTR) continue;
      if (n < 0) throw new Error(`epoll_wait: errno ${-n}`);
      let socketEvent = false;
      for (let i = 0; i < n; i++) {
        const tag = Number(out[i]);
        if (tag === CONTROL_TAG) s.kvs_read_i32(d.controlFd, drain, 8);
        else if (tag === NET_CTRL_TAG) {
          if (ctrlIdx >= 0) s.kvs_read_i32(d.queueFds[ctrlIdx], drain, 8);
          ctrlPending = true;
        } else socketEvent = true;
      }
      if (socketEvent && failed === null) {
        const why = fe.probe();
        if (why !== null) {
          fail(why);
          needsReset();
        }
      }
      if (h.stopRequested) {
        if (failed === null && ctl.running.length) {
          try {
            ctl.stop();
          } catch { /* shutting down: the back-end sees the socket close anyway */ }
        }
        return;
      }
      const now = h.epoch;
      if (now === seen) {
        serveCtrl();
        continue;
      }
      seen = now;
      stopCtrl();
      // Stop first, and say so before touching the device lock: the vCPU resetting the device holds
      // it while it waits for this.
      if (ctl.running.length && failed === null) {
        try {
          ctl.stop();
        } catch (e) {
          fail(`stopping the rings: ${(e as Error).message}`);
        }
      }
      publishStopped(now);
      if (!dev.activated) continue;
      if (failed !== null) {
        needsReset();
        continue;
      }
      // Queue registers are frozen once DRIVER_OK is set; a reset meanwhile shows as a new epoch.
      const a = dev.activation();
      if (h.epoch !== now) continue;
      try {
        if (pairs > 0) {
          const { data, ctrl } = splitNetQueues(a, pairs);
          ctl.start({ ...a, queues: data });
          if (ctrl !== null) {
            ctrlQ = new SplitQueue(mem!, ctrl, { eventIdx: a.eventIdx, indirect: a.indirect });
            ctrlIdx = ctrl.index;
            control.features = a.features;
            check(
              s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, d.queueFds[ctrlIdx], EPOLLIN, NET_CTRL_TAG),
              "epoll_ctl control queue",
            );
            ctrlPending = true; // commands may have been queued before DRIVER_OK
          }
        } else ctl.start(a);
        log.debug(`started ${a.queues.length} ring(s), features 0x${a.features.toString(16)}`);
      } catch (e) {
        if (e instanceof VhostUserError) fail(`starting the rings: ${e.message}`);
        else {
          log.error(`activation: ${(e as Error).message}`);
          // The back-end may hold some rings: take them back before flagging the device.
          try {
            ctl.stop();
          } catch (e2) {
            fail(`stopping the rings: ${(e2 as Error).message}`);
          }
        }
        needsReset();
      }
    }
  } finally {
    s.kvs_close(epfd);
    publishStopped(0x7fffffff);
  }
}

/**
 * Called by the vCPU that reset the device (status 0 written, epoch bumped to `epoch`), with the
 * device lock held: waits until the worker has stopped the back-end's rings, so the driver may free
 * them. Gives up after `timeoutMs` (a stuck back-end must not hang the guest forever).
 */
export function waitVhostUserStopped(desc: VirtioDeviceDescriptor, epoch: number, timeoutMs = 5000): void {
  const vu = desc.vhostUser;
  if (!vu) return;
  const st = new Int32Array(vu.state);
  const ctl = new Int32Array(desc.control);
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const done = Atomics.load(st, ST_STOPPED_EPOCH);
    if (done - epoch >= 0) return;
    // A worker not running (yet, or any more) has no ring started.
    if (Atomics.load(ctl, CTL_WORKER_STATE) !== 1) return;
    const left = deadline - performance.now();
    if (left <= 0) {
      logger(desc.id).warn(
        `the vhost-user back-end did not stop its rings within ${timeoutMs} ms of a reset`,
      );
      return;
    }
    try {
      Atomics.wait(st, ST_STOPPED_EPOCH, done, Math.min(left, 100));
    } catch {
      return; // a thread that may not block: do not wait
    }
  }
}
