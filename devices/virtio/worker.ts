/// <reference lib="deno.worker" />
/**
 * A virtio device worker: one per device. Blocks in epoll_wait on the queue eventfds (registered as
 * KVM ioeventfds, so guest notifies never exit to userspace) plus the device's control eventfd, and
 * processes the queues with the device model (RngDevice / BlkDevice), signalling MSI-X vectors through
 * their irqfds.
 *
 * Commands never come by postMessage: activation and reset bump the epoch in the device's shared
 * control block (done by a vCPU worker inside the guest's register write, under the device lock) and
 * kick the control eventfd; shutdown sets the stop word. Each processing pass holds the device lock,
 * and checks the epoch first, so once a reset has been written no further chain is touched.
 */
import { check, EINTR, shim } from "../../ffi/shim.ts";
import { EPOLL_CTL_ADD, EPOLLIN } from "../../ffi/kvm_constants.ts";
import { GuestMemory } from "../../vmm/memory.ts";
import { SplitQueue } from "./queue.ts";
import { BlkCounters, BlkDevice } from "./blk.ts";
import { FileEntropySource, RngCounters, RngDevice } from "./rng.ts";
import { ShimFileDisk } from "./device_blk.ts";
import { CTL_WORKER_STATE, type VirtioDeviceDescriptor, VirtioDeviceHandle } from "./device_shared.ts";

/** The one message a device worker receives, at start. */
export interface DeviceWorkerInit {
  device: VirtioDeviceDescriptor;
  ram: { gpa: number; size: number; hostAddr: bigint }[];
}

/** The worker's last message. */
export interface DeviceWorkerExit {
  type: "exit";
  id: string;
  error?: string;
}

const CONTROL_TAG = 0xffff;

interface Processor {
  processQueue(q: SplitQueue): boolean;
}

function run(init: DeviceWorkerInit): void {
  const d = init.device;
  const h = new VirtioDeviceHandle(d);
  Atomics.store(h.ctl, CTL_WORKER_STATE, 1);
  const dev = h.transport;
  const mem = GuestMemory.fromHost(init.ram);
  let proc: Processor;
  let closeProc = () => {};
  if (d.kind === "blk") {
    const b = d.blk!;
    proc = new BlkDevice(new ShimFileDisk(b.fd, b.size, b.readonly, b.serial), new BlkCounters(d.counters));
  } else {
    const src = new FileEntropySource(d.rng?.src ?? "/dev/urandom");
    closeProc = () => src.close();
    proc = new RngDevice(src, new RngCounters(d.counters));
  }

  const s = shim();
  const epfd = check(s.kvs_epoll_create(), "epoll_create");
  check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, d.controlFd, EPOLLIN, CONTROL_TAG), "epoll_ctl control");
  d.queueFds.forEach((fd, i) =>
    check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, i), "epoll_ctl queue")
  );
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

  try {
    for (;;) {
      const n = Number(s.kvs_epoll_wait(epfd, outBytes, out.length, -1));
      if (n === -EINTR) continue;
      if (n < 0) throw new Error(`epoll_wait: errno ${-n}`);
      for (let i = 0; i < n; i++) {
        const tag = Number(out[i]);
        if (tag === CONTROL_TAG) s.kvs_read_i32(d.controlFd, drain, 8);
        else if (tag < d.queueFds.length) {
          s.kvs_read_i32(d.queueFds[tag], drain, 8);
          notified[tag] = 1;
        }
      }
      if (h.stopRequested) return;
      h.lock.lock();
      try {
        const now = h.epoch;
        if (now !== epoch) {
          epoch = now;
          queues = [];
          if (dev.activated) {
            const a = dev.activation();
            try {
              for (const qa of a.queues) {
                queues[qa.index] = new SplitQueue(mem, qa, { eventIdx: a.eventIdx, indirect: a.indirect });
              }
              notified.fill(1); // buffers may have been made available before DRIVER_OK
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
          let irq = false;
          do {
            if (proc.processQueue(q)) irq = true;
            if (q.broken !== null) break;
          } while (q.enableNotification());
          if (q.broken !== null) {
            queues[i] = null;
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
    closeProc();
  }
}

self.onmessage = (ev: MessageEvent<DeviceWorkerInit>) => {
  const init = ev.data;
  let msg: DeviceWorkerExit;
  try {
    run(init);
    msg = { type: "exit", id: init.device.id };
  } catch (e) {
    msg = { type: "exit", id: init.device.id, error: e instanceof Error ? e.stack ?? e.message : String(e) };
  }
  Atomics.store(new Int32Array(init.device.control), CTL_WORKER_STATE, 2);
  self.postMessage(msg);
  self.close();
};
