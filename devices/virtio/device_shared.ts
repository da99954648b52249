/**
 * What every thread knows about one virtio-pci device: its structured-cloneable descriptor and the
 * control block shared by the vCPU workers (register accesses), the device worker (queue processing)
 * and the main thread (lifecycle).
 *
 * Control block (Int32 words of `control`):
 *   [0..3)  the device lock (devices/shared.ts SharedLock): held around every transport access, by
 *           vCPU workers for BAR/config accesses and by the device worker around each processing pass,
 *           so a driver reset (status 0, written under the lock) never overlaps queue processing.
 *   [3]     epoch: bumped under the lock on every activation (DRIVER_OK) and every reset. The device
 *           worker rebuilds (or drops) its queues when the epoch it last saw differs.
 *   [4]     stop: set by the main thread at shutdown (then the control eventfd is signalled).
 *   [5]     worker state: 0 starting, 1 running, 2 exited.
 *   f64 [3] (byte 24): guest-physical base at which the queue ioeventfds are registered, -1 if none.
 *   f64 [4] (byte 32): blk: the disk's size in bytes once resized (vm.resize-disk), -1 before.
 *   [10]    pause: set by the main thread to quiesce the worker (vm.pause, snapshots); cleared to resume.
 *   [11]    paused: the worker's acknowledgement; its queue positions are then in the queue area.
 *   [12]    restore: the queue area (and device words) hold a snapshot's positions, for the worker to start
 *           its queues from at the next activation instead of from 0.
 *   [16..24) device words: a device's own small state (virtio-net: queue pairs in use), saved with it.
 *   [24..)  queue area: per queue, the next available index the device reads and the next used index it
 *           writes (-1, -1 when the queue is not live).
 */
import { shim } from "../../ffi/shim.ts";
import { SharedLock } from "../shared.ts";
import { type VirtioDeviceSpec, VirtioPciDevice, type VirtioPciShared } from "./pci_transport.ts";
import type { VhostUserDescriptor } from "./vhost_user.ts";

export const CTL_EPOCH = 3;
export const CTL_STOP = 4;
export const CTL_WORKER_STATE = 5;
const CTL_IOEVENT_BASE_F64 = 3; // Float64 index (byte offset 24)
const CTL_DISK_SIZE_F64 = 4; // Float64 index (byte offset 32): blk, the image's size after a resize
export const CTL_PAUSE = 10;
export const CTL_PAUSED = 11;
export const CTL_RESTORE = 12;
/** Int32 index of the device words, and how many there are. */
export const CTL_DEVICE_WORDS = 16;
export const DEVICE_WORDS = 8;
/** Int32 index of the queue area (two words per queue). */
export const CTL_QUEUES = 24;
/** Bytes before the queue area. */
export const CONTROL_BYTES = 4 * CTL_QUEUES;

export type VirtioKind =
  | "rng"
  | "blk"
  | "net"
  | "console"
  | "pmem"
  | "balloon"
  | "vhost_user"
  | "vsock"
  | "mem";

/**
 * Whether a device of this kind shares one device worker with the VM's other light devices: rng,
 * console, balloon and virtio-mem see little traffic, and each worker is a V8 isolate (about 8 MiB).
 * Data-plane devices (disks, net, vsock, pmem, vhost-user) keep a worker each, and so does any device
 * added to a running VM.
 */
export function sharesDeviceWorker(kind: VirtioKind): boolean {
  return kind === "rng" || kind === "console" || kind === "balloon" || kind === "mem";
}

/** The name of a device thread that serves several devices (a thread serving one is named after it). */
export const SHARED_THREAD_NAME = "virtio-shared";

/** Structured-cloneable description of one virtio-pci device (made once, on the main thread). */
export interface VirtioDeviceDescriptor {
  /** Device id as the API names it ("_disk0", "__rng", or the user's id). */
  id: string;
  kind: VirtioKind;
  /** PCI slot on bus 0 (function 0) of its segment. */
  slot: number;
  /** PCI segment (0 unless `platform.num_pci_segments` > 1). */
  segment?: number;
  spec: VirtioDeviceSpec;
  shared: VirtioPciShared;
  control: SharedArrayBuffer;
  /** eventfds (non-blocking): one per queue (ioeventfd), one per MSI-X vector (irqfd), one control. */
  queueFds: number[];
  irqFds: number[];
  controlFd: number;
  /** First GSI of this device's MSI-X vectors (vector v uses gsiBase + v). */
  gsiBase: number;
  /**
   * blk: the image, opened by the main thread (kvs_open), and its size. `ioUring`: the requests a notify
   * brings run together in an io_uring (false: `_disable_io_uring=on`, one request after the other).
   */
  blk?: { fd: number; size: number; readonly: boolean; serial: string; ioUring?: boolean };
  /** rng: entropy source path. */
  rng?: { src: string };
  /**
   * net: one tap queue fd per queue pair (non-blocking, vnet header 12; owned by the main thread), the
   * tap's name and MTU.
   */
  net?: { tapFds: number[]; tap: string; mtu: number };
  /** console: output fd (-1: discard; not owned by the worker) and the input ring (ConsoleInput). */
  /** `drops`: output the fd does not take at once is dropped (a pty nobody reads must not stall). */
  console?: { outFd: number; input: SharedArrayBuffer; drops?: boolean };
  /** vsock: the guest CID, the listening socket (owned by the main thread) and its path. */
  vsock?: { cid: number; listenFd: number; path: string };
  /** vhost_user: the back-end connection (virtio-fs, vhost-user-blk, generic), set up at creation. */
  vhostUser?: VhostUserDescriptor;
  /** pmem: the backing file (owned by the main thread), for flushes; discard_writes. */
  pmem?: { fd: number; discardWrites: boolean };
  /** virtio-mem: the region's host mapping (address as a number), and whether it is a shared memfd. */
  mem?: { hostAddr: number; size: number; sharedMemory: boolean; plugged?: SharedArrayBuffer };
  /** balloon: whether guest RAM is a shared memfd (pages are then released with MADV_REMOVE). */
  balloon?: { sharedMemory: boolean };
  /**
   * Counters (Float64Array over this buffer): blk read_bytes, write_bytes, read_ops, write_ops; net
   * rx_bytes, rx_frames, tx_bytes, tx_frames.
   */
  counters: SharedArrayBuffer;
}

/** A thread's view of a device: the transport over the shared state, its lock and control words. */
export class VirtioDeviceHandle {
  readonly transport: VirtioPciDevice;
  readonly lock: SharedLock;
  readonly ctl: Int32Array;
  readonly #f64: Float64Array;
  readonly #buf = new BigUint64Array(1);
  readonly #bytes = new Uint8Array(this.#buf.buffer);

  constructor(readonly desc: VirtioDeviceDescriptor, transport?: VirtioPciDevice) {
    this.transport = transport ?? new VirtioPciDevice(desc.spec, desc.shared);
    this.ctl = new Int32Array(desc.control);
    this.#f64 = new Float64Array(desc.control);
    this.lock = new SharedLock(this.ctl, 0);
  }

  get epoch(): number {
    return Atomics.load(this.ctl, CTL_EPOCH);
  }

  get stopRequested(): boolean {
    return Atomics.load(this.ctl, CTL_STOP) !== 0;
  }

  get ioeventBase(): number {
    return this.#f64[CTL_IOEVENT_BASE_F64];
  }
  set ioeventBase(v: number) {
    this.#f64[CTL_IOEVENT_BASE_F64] = v;
  }

  /** blk: the disk's size after vm.resize-disk (bytes), or -1 when it was never resized. */
  get diskSize(): number {
    return this.#f64[CTL_DISK_SIZE_F64];
  }
  set diskSize(v: number) {
    this.#f64[CTL_DISK_SIZE_F64] = v;
  }

  /** Adds 1 to an eventfd; never throws (a full counter already means "signalled"). */
  signal(fd: number): void {
    this.#buf[0] = 1n;
    shim().kvs_write_i32(fd, this.#bytes, 8);
  }

  /**
   * Host side: changes device configuration bytes (config_generation moves) under the device lock and
   * raises the configuration-change interrupt, as a resize or a new target needs.
   */
  updateConfig(offset: number, bytes: Uint8Array): void {
    let vector = -1;
    this.lock.lock();
    try {
      this.transport.updateDeviceConfig(offset, bytes);
      vector = this.transport.configInterrupt();
    } finally {
      this.lock.unlock();
    }
    if (vector >= 0 && vector < this.desc.irqFds.length) this.signal(this.desc.irqFds[vector]);
  }

  get pauseRequested(): boolean {
    return Atomics.load(this.ctl, CTL_PAUSE) !== 0;
  }

  /** Queue `i`'s saved positions (next available, next used), or null when it was not live. */
  queuePosition(i: number): [number, number] | null {
    const o = CTL_QUEUES + 2 * i;
    if (o + 1 >= this.ctl.length || this.ctl[o] < 0) return null;
    return [this.ctl[o], this.ctl[o + 1]];
  }
  setQueuePosition(i: number, p: [number, number] | null): void {
    const o = CTL_QUEUES + 2 * i;
    if (o + 1 >= this.ctl.length) return;
    this.ctl[o] = p ? p[0] & 0xffff : -1;
    this.ctl[o + 1] = p ? p[1] & 0xffff : -1;
  }
  /** The device's own words (see the control block layout). */
  get deviceWords(): Int32Array {
    return this.ctl.subarray(CTL_DEVICE_WORDS, CTL_DEVICE_WORDS + DEVICE_WORDS);
  }

  /**
   * Main thread: asks the worker to stop serving its queues and waits (bounded) until it has published
   * their positions. A worker that has exited serves nothing: that counts as paused. False when a live
   * worker did not answer in time.
   */
  async pauseWorker(timeoutMs = 5000): Promise<boolean> {
    Atomics.store(this.ctl, CTL_PAUSE, 1);
    this.kickWorker();
    const end = Date.now() + timeoutMs;
    while (Atomics.load(this.ctl, CTL_PAUSED) !== 1) {
      if (Atomics.load(this.ctl, CTL_WORKER_STATE) === 2) return true;
      if (Date.now() > end) return false;
      const w = Atomics.waitAsync(this.ctl, CTL_PAUSED, 0, 50);
      if (w.async) await w.value;
    }
    return true;
  }

  /** Main thread: lets a paused worker serve its queues again. */
  resumeWorker(): void {
    Atomics.store(this.ctl, CTL_PAUSE, 0);
    Atomics.notify(this.ctl, CTL_PAUSE);
    this.kickWorker();
  }

  /** Wakes the device worker to look at the epoch / stop flag. */
  kickWorker(): void {
    this.signal(this.desc.controlFd);
  }

  /** Called under the lock by whoever activated or reset the device. */
  bumpEpoch(): void {
    Atomics.add(this.ctl, CTL_EPOCH, 1);
    this.kickWorker();
  }
}

/** A fresh control block for a device with `queues` queues (no ioeventfds registered). */
export function newControlBlock(queues = 0): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(CONTROL_BYTES + 8 * queues);
  new Float64Array(sab)[CTL_IOEVENT_BASE_F64] = -1;
  new Float64Array(sab)[CTL_DISK_SIZE_F64] = -1;
  return sab;
}
