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
import { ShimFileDisk } from "./device_blk.ts";
import { netService } from "./device_net.ts";
import { type ByteSink, CONSOLE_RX_QUEUE, ConsoleCounters, ConsoleDevice, ConsoleInput } from "./console.ts";
import {
  CTL_PAUSE,
  CTL_PAUSED,
  CTL_RESTORE,
  CTL_WORKER_STATE,
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
  device: VirtioDeviceDescriptor;
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

function run(init: DeviceWorkerInit): void {
  const d = init.device;
  const h = new VirtioDeviceHandle(d);
  Atomics.store(h.ctl, CTL_WORKER_STATE, 1);
  // vhost-user: the queues belong to the back-end; this thread is its control plane.
  if (d.kind === "vhost_user") return runVhostUser(init, h);
  const dev = h.transport;
  const mem = GuestMemory.fromHost(init.ram);
  const table = init.memTable ? new GuestMemoryTable(init.memTable) : null;
  let seenRegions = 0;
  const s = shim();
  const epfd = check(s.kvs_epoll_create(), "epoll_create");
  // The device's own processor. One that cannot be set up (its back end is gone, say) leaves a failed
  // device: reported, and DEVICE_NEEDS_RESET whenever the guest activates it; pause and stop still work.
  const makeProcessor = (): Processor => {
    if (d.kind === "blk") {
      const b = d.blk!;
      const blk = new BlkDevice(
        new ShimFileDisk(b.fd, b.size, b.readonly, b.serial),
        new BlkCounters(d.counters),
      );
      // A resize (vm.resize-disk) is published before the guest hears of it; take it in on every wake.
      return drainingProcessor((q) => {
        const size = h.diskSize;
        if (size > 0) blk.capacity = Math.floor(size / 512);
        return blk.processQueue(q);
      });
    } else if (d.kind === "net") {
      // Every queue pair in this one worker (see device_net.ts for why not a worker per pair). A tap
      // queue fd is in the epoll set only while polled: a detached tap queue reports EPOLLERR, which
      // epoll delivers whatever the interest mask.
      return netService(
        d,
        (fd, q, on) =>
          on
            ? s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, HOST_QUEUE_TAG + q)
            : s.kvs_epoll_ctl(epfd, EPOLL_CTL_DEL, fd, 0, 0),
      );
    } else if (d.kind === "console") {
      return consoleProcessor(d);
    } else if (d.kind === "vsock") {
      // Host sockets sit in the device's nested epoll set: its readiness serves the rx queue.
      return vsockService(
        d,
        mem,
        (fd, on) => s.kvs_epoll_ctl(epfd, EPOLL_CTL_MOD, fd, on ? EPOLLIN : 0, HOST_FD_TAG),
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
  };
  let proc: Processor;
  let setupError: string | null = null;
  try {
    proc = makeProcessor();
  } catch (e) {
    setupError = errorText(e);
    proc = { service: () => false };
    const failed: DeviceWorkerExit = { type: "failed", id: d.id, error: setupError };
    self.postMessage(failed);
  }

  check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, d.controlFd, EPOLLIN, CONTROL_TAG), "epoll_ctl control");
  d.queueFds.forEach((fd, i) =>
    check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, i), "epoll_ctl queue")
  );
  const hostQueue = proc.hostQueue ?? -1;
  if (proc.hostFd !== undefined) {
    check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, proc.hostFd, 0, HOST_FD_TAG), "epoll_ctl host fd");
  }
  const out = new BigUint64Array(16);
  const outBytes = new Uint8Array(out.buffer);
  const drain = new Uint8Array(8);
  const notified = new Uint8Array(d.queueFds.length);
  let epoch = -1;
  let queues: (SplitQueue | null)[] = [];

  const signalVector = (v: number) => {
    if (v >= 0 && v < d.irqFds.length) h.signal(d.irqFds[v]);
  };
  const fail = () => {
    dev.setNeedsReset();
    signalVector(dev.configInterrupt());
  };

  /**
   * Quiesced (vm.pause, snapshot): publishes each queue's positions (chains taken but not used are given
   * back) and the device's own words, acknowledges, and waits until resumed. False when asked to stop.
   */
  const pause = (): boolean => {
    h.lock.lock();
    try {
      // Restored and not activated yet: the queue area still holds the snapshot's positions.
      const pending = Atomics.load(h.ctl, CTL_RESTORE) === 1;
      for (let i = 0; !pending && i < d.queueFds.length; i++) {
        const q = queues[i];
        const held = q ? proc.heldChains?.(i) ?? 0 : 0;
        h.setQueuePosition(i, q ? [(q.lastAvailIdx - held) & 0xffff, q.nextUsedIdx] : null);
      }
      if (!pending) {
        h.deviceWords.fill(0);
        proc.saveWords?.(h.deviceWords);
      }
    } finally {
      h.lock.unlock();
    }
    Atomics.store(h.ctl, CTL_PAUSED, 1);
    Atomics.notify(h.ctl, CTL_PAUSED);
    while (Atomics.load(h.ctl, CTL_PAUSE) !== 0) {
      if (h.stopRequested) return false;
      Atomics.wait(h.ctl, CTL_PAUSE, 1, 100);
    }
    Atomics.store(h.ctl, CTL_PAUSED, 0);
    // A restored worker re-activates from the published positions (the device state was loaded).
    if (Atomics.load(h.ctl, CTL_RESTORE) === 1) epoch = -1;
    notified.fill(1); // what the driver queued meanwhile
    return true;
  };

  try {
    for (;;) {
      const n = Number(s.kvs_epoll_wait(epfd, outBytes, out.length, -1));
      if (n === -EINTR) continue;
      if (n < 0) throw new Error(`epoll_wait: errno ${-n}`);
      for (let i = 0; i < n; i++) {
        const tag = Number(out[i]);
        if (tag === CONTROL_TAG) s.kvs_read_i32(d.controlFd, drain, 8);
        else if (tag === HOST_FD_TAG) {
          if (hostQueue >= 0) notified[hostQueue] = 1;
        } else if (tag >= HOST_QUEUE_TAG) {
          if (tag - HOST_QUEUE_TAG < notified.length) notified[tag - HOST_QUEUE_TAG] = 1;
        } else if (tag < d.queueFds.length) {
          s.kvs_read_i32(d.queueFds[tag], drain, 8);
          notified[tag] = 1;
        }
      }
      if (h.stopRequested) return;
      if (h.pauseRequested) {
        if (!pause()) return;
        continue;
      }
      if (table && table.count !== seenRegions) seenRegions = table.syncInto(mem, seenRegions);
      h.lock.lock();
      try {
        const now = h.epoch;
        if (now !== epoch) {
          epoch = now;
          queues = [];
          proc.deactivate?.();
          if (dev.activated && setupError !== null) fail();
          else if (dev.activated) {
            const a = dev.activation();
            // A restored device goes on from the snapshot's queue positions (taken once).
            const restored = Atomics.exchange(h.ctl, CTL_RESTORE, 0) === 1;
            try {
              for (const qa of a.queues) {
                const at = restored ? h.queuePosition(qa.index) : null;
                queues[qa.index] = new SplitQueue(mem, qa, {
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
              queues = [];
              fail();
            }
          }
        }
        for (let i = 0; i < notified.length; i++) {
          if (!notified[i]) continue;
          notified[i] = 0;
          const q = queues[i];
          if (!q) continue;
          let irq: boolean;
          try {
            irq = proc.service(q, i);
          } catch (e) {
            queues = [];
            proc.deactivate?.();
            fail();
            const failed: DeviceWorkerExit = { type: "failed", id: d.id, error: errorText(e) };
            self.postMessage(failed);
            break;
          }
          if (q.broken !== null) {
            queues[i] = null;
            if (i === hostQueue) proc.deactivate?.();
            fail();
          }
          if (irq) signalVector(dev.queueInterrupt(i));
        }
      } finally {
        h.lock.unlock();
      }
    }
  } finally {
    s.kvs_close(epfd);
    proc.close?.();
  }
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.stack ?? e.message : String(e);
}

self.onmessage = (ev: MessageEvent<DeviceWorkerInit>) => {
  const init = ev.data;
  let msg: DeviceWorkerExit;
  try {
    // The thread is named after its device, as Cloud Hypervisor names its device threads.
    setThreadName(init.device.id);
    confineThread("device");
    run(init);
    msg = { type: "exit", id: init.device.id };
  } catch (e) {
    msg = { type: "exit", id: init.device.id, error: errorText(e) };
  }
  Atomics.store(new Int32Array(init.device.control), CTL_WORKER_STATE, 2);
  self.postMessage(msg);
  self.close();
};
