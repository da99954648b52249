/// <reference lib="deno.worker" />
/**
 * A virtio device worker: one per device. Blocks in epoll_wait on the queue eventfds (registered as
 * KVM ioeventfds, so guest notifies never exit to userspace) plus the device's control eventfd, and
 * processes the queues with the device model (RngDevice / BlkDevice / NetDevice / ConsoleDevice),
 * signalling MSI-X vectors through their irqfds. A device may add host fds to the epoll set (the tap
 * queues of virtio-net, one per RX queue): their readiness is served like a notify of their queue.
 *
 * Commands never come by postMessage: activation and reset bump the epoch in the device's shared
 * control block (done by a vCPU worker inside the guest's register write, under the device lock) and
 * kick the control eventfd; shutdown sets the stop word. Each processing pass holds the device lock,
 * and checks the epoch first, so once a reset has been written no further chain is touched.
 */
import { check, EAGAIN, EINTR, shim } from "../../ffi/shim.ts";
import { setThreadName } from "../../ffi/socket.ts";
import { confineThread } from "../../vmm/seccomp.ts";
import {
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLLIN,
  MADV_DONTNEED,
  MADV_REMOVE,
  POLLOUT,
} from "../../ffi/kvm_constants.ts";
import { GuestMemory, GuestMemoryTable } from "../../vmm/memory.ts";
import { SplitQueue } from "./queue.ts";
import { BlkCounters, BlkDevice } from "./blk.ts";
import { FileEntropySource, RngCounters, RngDevice } from "./rng.ts";
import { ShimFileDisk, UringBatch } from "./device_blk.ts";
import { netService } from "./device_net.ts";
import { type ByteSink, CONSOLE_RX_QUEUE, ConsoleCounters, ConsoleDevice, ConsoleInput } from "./console.ts";
import {
  CTL_PAUSE,
  CTL_PAUSED,
  CTL_RESTORE,
  CTL_WORKER_STATE,
  SHARED_THREAD_NAME,
  type VirtioDeviceDescriptor,
  VirtioDeviceHandle,
} from "./device_shared.ts";
import { vsockService } from "./device_vsock.ts";
import { PmemCounters, PmemDevice } from "./pmem.ts";
import { FdPmemBackend } from "./device_pmem.ts";
import { BalloonCounters, BalloonDevice, hostMemoryReleaser } from "./balloon.ts";
import { runVhostUser } from "./device_vhost_user.ts";
import { MemCounters, VirtioMemDevice } from "./mem.ts";

/** The one message a device worker receives, at start. */
export interface DeviceWorkerInit {
  /** One device, or several light ones that share the worker (see `sharesDeviceWorker`). */
  devices: VirtioDeviceDescriptor[];
  /** Guest RAM; `fd` is the region's memfd when memory is shared (vhost-user back-ends map it). */
  ram: { gpa: number; size: number; hostAddr: bigint; fd?: number }[];
  /** RAM plugged after boot (GuestMemoryTable): taken in whenever the worker wakes. */
  memTable?: SharedArrayBuffer;
}

/** The worker's last message. */
/**
 * What a device worker reports: `exit` when it ends (with the error that ended it, if any); `failed` when
 * the device's own code threw while serving a queue: the device is then marked DEVICE_NEEDS_RESET for the
 * guest and the worker goes on (a driver reset re-activates it; pause and stop still work).
 */
export interface DeviceWorkerExit {
  type: "exit" | "failed";
  id: string;
  error?: string;
}

/** Most disk requests one notify's batch runs side by side (see BlkDevice). */
const BLK_BATCH = 64;

const CONTROL_TAG = 0xffff;
const HOST_FD_TAG = 0xfffe;
/** Tag of a host fd added by a device for one of its queues: this plus the queue its readiness serves. */
const HOST_QUEUE_TAG = 0x10000;

/** How a device serves its queues. */
interface Processor {
  /** Serves queue `index` after a notify; returns true when the driver should be interrupted. */
  service(q: SplitQueue, index: number): boolean;
  /** A host fd polled for input (readiness marks queue `hostQueue` as notified); polling starts off. */
  hostFd?: number;
  hostQueue?: number;
  /** DRIVER_OK (with the negotiated features) / reset or a broken queue. */
  activate?(features: bigint): void;
  deactivate?(): void;
  /** Chains of queue `index` the device has taken but not used yet (given back in a snapshot). */
  heldChains?(index: number): number;
  /** The device's own state as small integers (saved in the control block's device words). */
  saveWords?(words: Int32Array): void;
  /** After a restored activation: takes back what saveWords wrote. */
  loadWords?(words: Int32Array): void;
  close?(): void;
}

/** Devices whose work is all in the queue: serve until the driver added nothing more meanwhile. */
function drainingProcessor(processQueue: (q: SplitQueue) => boolean, close?: () => void): Processor {
  return {
    service(q) {
      let irq = false;
      do {
        if (processQueue(q)) irq = true;
        if (q.broken !== null) break;
      } while (q.enableNotification());
      return irq;
    },
    close,
  };
}

/** Writes all of `bytes` to a raw fd (waiting while a non-blocking fd is full); drops them on error. */
function fdSink(fd: number, drops = false): ByteSink {
  if (fd < 0) return { write() {} };
  const s = shim();
  if (drops) return { write: (bytes) => void s.kvs_write_i32(fd, bytes, bytes.length) };
  return {
    write(bytes) {
      let off = 0;
      while (off < bytes.length) {
        const n = s.kvs_write_i32(fd, off === 0 ? bytes : bytes.subarray(off), bytes.length - off);
        if (n > 0) off += n;
        else if (n === -EAGAIN) s.kvs_poll1(fd, POLLOUT, 100);
        else if (n !== -EINTR) return;
      }
    },
  };
}

function consoleProcessor(d: VirtioDeviceDescriptor): Processor {
  const c = d.console!;
  const dev = new ConsoleDevice(
    fdSink(c.outFd, c.drops),
    new ConsoleInput(c.input),
    new ConsoleCounters(d.counters),
  );
  const tx = drainingProcessor((q) => dev.processTx(q));
  return {
    // RX is served once per notify: input may be waiting for buffers, or buffers for input.
    service: (q, i) => i === CONSOLE_RX_QUEUE ? dev.processRx(q) : tx.service(q, i),
  };
}

/** Tags of one device's fds in the worker's epoll set: its slot times this, plus the tags above. */
const TAG_STRIDE = 1 << 24;

/**
 * One device served by a device worker: its processor, queues and control state. A worker serves one
 * device, or several light ones (see `sharesDeviceWorker`), each with its own tags in the epoll set.
 */
class DeviceRunner {
  readonly d: VirtioDeviceDescriptor;
  readonly h: VirtioDeviceHandle;
  readonly #dev: VirtioDeviceHandle["transport"];
  readonly #proc: Processor;
  readonly #setupError: string | null = null;
  readonly #hostQueue: number;
  readonly #notified: Uint8Array;
  readonly #tagBase: number;
  readonly #epfd: number;
  readonly #mem: GuestMemory;
  #epoch = -1;
  #queues: (SplitQueue | null)[] = [];
  /** Paused (vm.pause, snapshot): its queue positions are published and nothing is served. */
  paused = false;
  /** Stopped: its part of the worker is over (its fds are out of the epoll set). */
  done = false;

  constructor(d: VirtioDeviceDescriptor, slot: number, epfd: number, mem: GuestMemory) {
    this.d = d;
    this.h = new VirtioDeviceHandle(d);
    this.#dev = this.h.transport;
    this.#epfd = epfd;
    this.#mem = mem;
    this.#tagBase = slot * TAG_STRIDE;
    Atomics.store(this.h.ctl, CTL_WORKER_STATE, 1);
    // A device whose processor cannot be set up (its back end is gone, say) is a failed device:
    // reported, and DEVICE_NEEDS_RESET whenever the guest activates it; pause and stop still work.
    let proc: Processor;
    try {
      proc = makeProcessor(d, this.h, mem, epfd, this.#tagBase);
    } catch (e) {
      this.#setupError = errorText(e);
      proc = { service: () => false };
      const failed: DeviceWorkerExit = { type: "failed", id: d.id, error: this.#setupError };
      self.postMessage(failed);
    }
    this.#proc = proc;
    this.#hostQueue = proc.hostQueue ?? -1;
    this.#notified = new Uint8Array(d.queueFds.length);
    const s = shim();
    const base = this.#tagBase;
    check(
      s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, d.controlFd, EPOLLIN, base + CONTROL_TAG),
      "epoll_ctl control",
    );
    d.queueFds.forEach((fd, i) =>
      check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, base + i), "epoll_ctl queue")
    );
    if (proc.hostFd !== undefined) {
      check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, proc.hostFd, 0, base + HOST_FD_TAG), "epoll_ctl host fd");
    }
  }

  /** An epoll event of this device (`tag` less its base): drains a notify, marks the queue. */
  event(tag: number, drain: Uint8Array): void {
    const d = this.d;
    if (tag === CONTROL_TAG) shim().kvs_read_i32(d.controlFd, drain, 8);
    else if (tag === HOST_FD_TAG) {
      if (this.#hostQueue >= 0) this.#notified[this.#hostQueue] = 1;
    } else if (tag >= HOST_QUEUE_TAG) {
      if (tag - HOST_QUEUE_TAG < this.#notified.length) this.#notified[tag - HOST_QUEUE_TAG] = 1;
    } else if (tag < d.queueFds.length) {
      shim().kvs_read_i32(d.queueFds[tag], drain, 8);
      this.#notified[tag] = 1;
    }
  }

  #signalVector(v: number): void {
    if (v >= 0 && v < this.d.irqFds.length) this.h.signal(this.d.irqFds[v]);
  }

  #fail(): void {
    this.#dev.setNeedsReset();
    this.#signalVector(this.#dev.configInterrupt());
  }

  /**
   * Quiesces (vm.pause, snapshot): publishes each queue's positions (chains taken but not used are given
   * back) and the device's own words, and acknowledges. Served again once {@link resume} runs.
   */
  pause(): void {
    const h = this.h;
    h.lock.lock();
    try {
      // Restored and not activated yet: the queue area still holds the snapshot's positions.
      const pending = Atomics.load(h.ctl, CTL_RESTORE) === 1;
      for (let i = 0; !pending && i < this.d.queueFds.length; i++) {
        const q = this.#queues[i];
        const held = q ? this.#proc.heldChains?.(i) ?? 0 : 0;
        h.setQueuePosition(i, q ? [(q.lastAvailIdx - held) & 0xffff, q.nextUsedIdx] : null);
      }
      if (!pending) {
        h.deviceWords.fill(0);
        this.#proc.saveWords?.(h.deviceWords);
      }
    } finally {
      h.lock.unlock();
    }
    this.paused = true;
    Atomics.store(h.ctl, CTL_PAUSED, 1);
    Atomics.notify(h.ctl, CTL_PAUSED);
  }

  /** After a pause: a restored device re-activates from the published positions. */
  resume(): void {
    this.paused = false;
    Atomics.store(this.h.ctl, CTL_PAUSED, 0);
    if (Atomics.load(this.h.ctl, CTL_RESTORE) === 1) this.#epoch = -1;
    this.#notified.fill(1); // what the driver queued meanwhile
  }

  /** Takes in an activation or reset, then serves every notified queue. */
  serve(): void {
    const { d, h } = this;
    const dev = this.#dev;
    const proc = this.#proc;
    const notified = this.#notified;
    h.lock.lock();
    try {
      const now = h.epoch;
      if (now !== this.#epoch) {
        this.#epoch = now;
        this.#queues = [];
        proc.deactivate?.();
        if (dev.activated && this.#setupError !== null) this.#fail();
        else if (dev.activated) {
          const a = dev.activation();
          // A restored device goes on from the snapshot's queue positions (taken once).
          const restored = Atomics.exchange(h.ctl, CTL_RESTORE, 0) === 1;
          try {
            for (const qa of a.queues) {
              const at = restored ? h.queuePosition(qa.index) : null;
              this.#queues[qa.index] = new SplitQueue(this.#mem, qa, {
                eventIdx: a.eventIdx,
                indirect: a.indirect,
                lastAvailIdx: at?.[0],
                nextUsedIdx: at?.[1],
              });
            }
            notified.fill(1); // buffers may have been made available before DRIVER_OK
            proc.activate?.(a.features);
            if (restored) proc.loadWords?.(h.deviceWords);
          } catch {
            this.#queues = [];
            this.#fail();
          }
        }
      }
      for (let i = 0; i < notified.length; i++) {
        if (!notified[i]) continue;
        notified[i] = 0;
        const q = this.#queues[i];
        if (!q) continue;
        let irq: boolean;
        try {
          irq = proc.service(q, i);
        } catch (e) {
          this.#queues = [];
          proc.deactivate?.();
          this.#fail();
          const failed: DeviceWorkerExit = { type: "failed", id: d.id, error: errorText(e) };
          self.postMessage(failed);
          break;
        }
        if (q.broken !== null) {
          this.#queues[i] = null;
          if (i === this.#hostQueue) proc.deactivate?.();
          this.#fail();
        }
        if (irq) this.#signalVector(dev.queueInterrupt(i));
      }
    } finally {
      h.lock.unlock();
    }
  }

  /** Ends this device's part: its fds leave the epoll set, its processor closes. */
  finish(): void {
    if (this.done) return;
    this.done = true;
    const s = shim();
    const d = this.d;
    s.kvs_epoll_ctl(this.#epfd, EPOLL_CTL_DEL, d.controlFd, 0, 0);
    for (const fd of d.queueFds) s.kvs_epoll_ctl(this.#epfd, EPOLL_CTL_DEL, fd, 0, 0);
    if (this.#proc.hostFd !== undefined) s.kvs_epoll_ctl(this.#epfd, EPOLL_CTL_DEL, this.#proc.hostFd, 0, 0);
    this.#proc.close?.();
  }
}

/** A device's processor (its model over its back end), with its host fds tagged from `base`. */
function makeProcessor(
  d: VirtioDeviceDescriptor,
  h: VirtioDeviceHandle,
  mem: GuestMemory,
  epfd: number,
  base: number,
): Processor {
  const s = shim();
  const dev = h.transport;
  if (d.kind === "blk") {
    const b = d.blk!;
    // No io_uring here (an old kernel, io_uring_disabled): requests run one by one, and the log says so.
    const batch = b.ioUring !== false ? UringBatch.open(b.fd, BLK_BATCH) : null;
    if (b.ioUring !== false && batch === null) {
      console.warn(
        `dvmm: virtio-blk ${d.id}: no io_uring (errno ${UringBatch.lastErrno}); requests run one at a time`,
      );
    }
    const blk = new BlkDevice(
      new ShimFileDisk(b.fd, b.size, b.readonly, b.serial),
      new BlkCounters(d.counters),
      batch,
    );
    // A resize (vm.resize-disk) is published before the guest hears of it; take it in on every wake.
    return drainingProcessor((q) => {
      const size = h.diskSize;
      if (size > 0) blk.capacity = Math.floor(size / 512);
      return blk.processQueue(q);
    }, () => blk.close());
  } else if (d.kind === "net") {
    // Every queue pair in this one worker (see device_net.ts for why not a worker per pair). A tap
    // queue fd is in the epoll set only while polled: a detached tap queue reports EPOLLERR, which
    // epoll delivers whatever the interest mask.
    return netService(
      d,
      (fd, q, on) =>
        on
          ? s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, base + HOST_QUEUE_TAG + q)
          : s.kvs_epoll_ctl(epfd, EPOLL_CTL_DEL, fd, 0, 0),
    );
  } else if (d.kind === "console") {
    return consoleProcessor(d);
  } else if (d.kind === "vsock") {
    // Host sockets sit in the device's nested epoll set: its readiness serves the rx queue.
    return vsockService(
      d,
      mem,
      (fd, on) => s.kvs_epoll_ctl(epfd, EPOLL_CTL_MOD, fd, on ? EPOLLIN : 0, base + HOST_FD_TAG),
    );
  } else if (d.kind === "pmem") {
    const p = d.pmem!;
    return new PmemDevice(new FdPmemBackend(p.fd), p.discardWrites, new PmemCounters(d.counters));
  } else if (d.kind === "mem") {
    const m = d.mem!;
    const cfg = dev.deviceConfig();
    const advice = m.sharedMemory ? MADV_REMOVE : MADV_DONTNEED;
    const vmem = new VirtioMemDevice(
      {
        read: (off) => Number(cfg.getBigUint64(off, true)),
        write: (off, value) => {
          const b = new Uint8Array(8);
          new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
          dev.updateDeviceConfig(off, b);
        },
      },
      {
        discard: (off, len) =>
          off >= 0 && off + len <= m.size &&
          s.kvs_madvise_at(Number(m.hostAddr) + off, len, advice) === 0,
      },
      new MemCounters(d.counters),
      m.plugged ? new Uint8Array(m.plugged) : undefined,
    );
    return { service: (q, i) => vmem.service(q, i) };
  } else if (d.kind === "balloon") {
    const releaser = hostMemoryReleaser(mem, d.balloon!.sharedMemory);
    return new BalloonDevice(releaser, mem, new BalloonCounters(d.counters));
  } else {
    const src = new FileEntropySource(d.rng?.src ?? "/dev/urandom");
    const rng = new RngDevice(src, new RngCounters(d.counters));
    return drainingProcessor((q) => rng.processQueue(q), () => src.close());
  }
}

/**
 * Serves `init.devices` until each is stopped: one epoll set over all their eventfds. Pause is per
 * device and does not block the others; while every device of the worker is paused, the worker waits
 * for a resume (or stop) instead of polling. Reports `exit` for each device as its part ends.
 */
function run(init: DeviceWorkerInit): void {
  const first = init.devices[0];
  // vhost-user: the queues belong to the back-end; this thread is its control plane (always alone).
  if (first.kind === "vhost_user") {
    const h = new VirtioDeviceHandle(first);
    Atomics.store(h.ctl, CTL_WORKER_STATE, 1);
    runVhostUser({ device: first, ram: init.ram }, h);
    return;
  }
  const mem = GuestMemory.fromHost(init.ram);
  const table = init.memTable ? new GuestMemoryTable(init.memTable) : null;
  let seenRegions = 0;
  const s = shim();
  const epfd = check(s.kvs_epoll_create(), "epoll_create");
  const runners: DeviceRunner[] = [];
  // 16 epoll data words (u64; our tags fit in their low halves), read as u32s: a wakeup makes no BigInt.
  const out32 = new Uint32Array(2 * 16);
  const outBytes = new Uint8Array(out32.buffer);
  const drain = new Uint8Array(8);
  try {
    init.devices.forEach((d, slot) => {
      runners.push(new DeviceRunner(d, slot, epfd, mem));
    });
    const end = (r: DeviceRunner) => {
      r.finish();
      Atomics.store(r.h.ctl, CTL_WORKER_STATE, 2);
      const msg: DeviceWorkerExit = { type: "exit", id: r.d.id };
      self.postMessage(msg);
    };
    for (;;) {
      // Every live device paused: wait for a resume or a stop (the eventfds keep what arrives meanwhile).
      if (runners.every((r) => r.done || r.paused)) {
        const r = runners.find((x) => !x.done)!;
        Atomics.wait(r.h.ctl, CTL_PAUSE, 1, 100);
      } else {
        const n = s.kvs_epoll_wait_i32(epfd, outBytes, out32.length / 2, -1);
        if (n === -EINTR) continue;
        if (n < 0) throw new Error(`epoll_wait: errno ${-n}`);
        for (let i = 0; i < n; i++) {
          const tag = out32[2 * i];
          const r = runners[Math.floor(tag / TAG_STRIDE)];
          if (r && !r.done) r.event(tag % TAG_STRIDE, drain);
        }
      }
      if (table && table.count !== seenRegions) seenRegions = table.syncInto(mem, seenRegions);
      for (const r of runners) {
        if (r.done) continue;
        if (r.h.stopRequested) {
          end(r);
          continue;
        }
        if (r.h.pauseRequested) {
          if (!r.paused) r.pause();
          continue;
        }
        if (r.paused) r.resume();
        r.serve();
      }
      if (runners.every((r) => r.done)) return;
    }
  } finally {
    s.kvs_close(epfd);
    for (const r of runners) if (!r.done) r.finish();
  }
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.stack ?? e.message : String(e);
}

self.onmessage = (ev: MessageEvent<DeviceWorkerInit>) => {
  const init = ev.data;
  const ids = init.devices.map((d) => d.id);
  let error: string | undefined;
  try {
    // The thread is named after its device, as Cloud Hypervisor names its device threads; a thread that
    // serves several light devices is "virtio-shared".
    setThreadName(ids.length === 1 ? ids[0] : SHARED_THREAD_NAME);
    confineThread("device");
    run(init);
  } catch (e) {
    error = errorText(e);
  }
  // Whatever devices had not ended when the worker did (an error, or vhost-user's control plane).
  for (const d of init.devices) {
    const ctl = new Int32Array(d.control);
    if (Atomics.load(ctl, CTL_WORKER_STATE) === 2) continue;
    Atomics.store(ctl, CTL_WORKER_STATE, 2);
    const msg: DeviceWorkerExit = { type: "exit", id: d.id, error };
    self.postMessage(msg);
  }
  self.close();
};
