/**
 * A device whose own code fails is marked failed, never left as a silent dead queue: the real device
 * worker (devices/virtio/worker.ts) runs virtio-rng (1) whose source is gone by the time the worker starts
 * (removed after the boot's check), and (2) whose source, a 16-byte file, runs dry while it serves the
 * guest's request: its handler throws. The worker reports it, and whenever the guest activates the device
 * it sets DEVICE_NEEDS_RESET with a configuration interrupt; the worker still pauses and stops. And one
 * worker serving several devices (the light devices of a VM share one): each pauses, fails and stops on
 * its own while the others are served.
 */
import assert from "node:assert/strict";
import { shim } from "../ffi/shim.ts";
import { EventFd, mapMemfd, unmap } from "../ffi/kvm.ts";
import { EFD_NONBLOCK } from "../ffi/kvm_constants.ts";
import { F, VIRTIO_ID } from "../devices/virtio/constants.ts";
import { rngFeatures } from "../devices/virtio/rng.ts";
import { VirtioPciDevice } from "../devices/virtio/pci_transport.ts";
import {
  CTL_STOP,
  CTL_WORKER_STATE,
  newControlBlock,
  type VirtioDeviceDescriptor,
  VirtioDeviceHandle,
} from "../devices/virtio/device_shared.ts";
import type { DeviceWorkerExit } from "../devices/virtio/worker.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { FakeDriverQueue, writeCommon as common } from "./virtio_driver.ts";
import { until } from "./helpers/host.ts";

interface RngRig {
  tr: VirtioPciDevice;
  /** The device's handle as the main thread holds it (pause, resume). */
  h: VirtioDeviceHandle;
  mem: GuestMemory;
  /** Where this rig's part of the RAM starts (its ring at +0x10000, buffers from +0x20000). */
  base: number;
  drv: FakeDriverQueue;
  /** What the worker reported about this device. */
  readonly messages: DeviceWorkerExit[];
  /** The driver's set-up: MSI-X vectors 0 (configuration) and 1 (the queue), one queue, DRIVER_OK. */
  driverInit(): void;
  /** Whether MSI-X vector v was signalled since the last call. */
  signalled(v: number): boolean;
  /** Tells the device that queue 0 has buffers. */
  notify(): void;
  /** Stops the worker and checks that it ends without an error. */
  stop(): Promise<void>;
}

/** Each rig's share of the test RAM: its ring at the start, its buffers above. */
const RIG_SPAN = 0x40000;

/**
 * Runs one real device worker serving a virtio-rng device per source in `srcs` (several: a shared
 * worker, as the light devices of a VM have), then `body`; cleans up.
 */
async function withRngWorkers(srcs: string[], body: (rigs: RngRig[]) => Promise<void>): Promise<void> {
  const map = mapMemfd(RIG_SPAN * srcs.length, "fault-test");
  const fds: EventFd[] = [];
  const efd = () => {
    const e = EventFd.create(EFD_NONBLOCK);
    fds.push(e);
    return e.fd;
  };
  let w: Worker | null = null;
  try {
    const ram = [{ gpa: 0, size: RIG_SPAN * srcs.length, hostAddr: map.hostAddr, fd: map.fd }];
    const mem = GuestMemory.fromHost(ram);
    const messages: DeviceWorkerExit[] = [];
    const rigs = srcs.map((src, k) => {
      const spec = {
        type: VIRTIO_ID.RNG,
        features: rngFeatures(),
        numQueues: 1,
        maxQueueSize: 256,
        config: new Uint8Array(0),
      };
      const tr = new VirtioPciDevice(spec);
      const desc: VirtioDeviceDescriptor = {
        id: k === 0 ? "__rng" : `rng${k}`,
        kind: "rng",
        slot: 1 + k,
        spec,
        shared: tr.shared,
        control: newControlBlock(1),
        queueFds: [efd()],
        irqFds: [efd(), efd()],
        controlFd: efd(),
        gsiBase: 24 + 2 * k,
        counters: new SharedArrayBuffer(16),
        rng: { src },
      };
      const h = new VirtioDeviceHandle(desc, tr);
      tr.onActivate = () => h.bumpEpoch();
      tr.onReset = () => h.bumpEpoch();
      return { desc, tr, h, base: RIG_SPAN * k };
    });
    w = new Worker(new URL("../devices/virtio/worker.ts", import.meta.url).href, { type: "module" });
    w.onmessage = (ev) => messages.push(ev.data);
    w.postMessage({ devices: rigs.map((r) => r.desc), ram });

    const word = new Uint8Array(8);
    const one = new Uint8Array(8);
    new DataView(one.buffer).setBigUint64(0, 1n, true);
    await body(rigs.map(({ desc, tr, h, base }): RngRig => {
      const drv = new FakeDriverQueue(mem, base + 0x10000, 8);
      const mine = () => messages.filter((m) => m.id === desc.id);
      return {
        tr,
        h,
        mem,
        drv,
        base,
        get messages() {
          return mine();
        },
        driverInit: () => {
          tr.config.write(tr.msix.capOffset + 2, 2, 0x8000);
          for (const v of [0, 1]) tr.msix.tableWrite(16 * v + 12, new Uint8Array(4));
          common(tr, 0x14, 1, 1 | 2);
          common(tr, 0x08, 4, 1);
          common(tr, 0x0c, 4, 1 << (F.VERSION_1 - 32));
          common(tr, 0x14, 1, 1 | 2 | 8);
          common(tr, 0x10, 2, 0); // configuration changes: vector 0
          common(tr, 0x16, 2, 0);
          common(tr, 0x18, 2, drv.size);
          common(tr, 0x1a, 2, 1); // queue 0: vector 1
          common(tr, 0x20, 4, drv.config.descAddr);
          common(tr, 0x28, 4, drv.config.driverAddr);
          common(tr, 0x30, 4, drv.config.deviceAddr);
          common(tr, 0x1c, 2, 1);
          common(tr, 0x14, 1, 1 | 2 | 4 | 8);
        },
        signalled: (v) => Number(shim().kvs_read(desc.irqFds[v], word, 8)) === 8,
        notify: () => void shim().kvs_write(desc.queueFds[0], one, 8n),
        stop: async () => {
          Atomics.store(h.ctl, CTL_STOP, 1);
          h.kickWorker();
          await until(`${desc.id}'s exit`, () => mine().some((m) => m.type === "exit"), 10_000);
          assert.equal(mine().find((m) => m.type === "exit")!.error, undefined);
        },
      };
    }));
  } finally {
    w?.terminate();
    for (const e of fds) e.close();
    unmap(map);
  }
}

/** One device in its own worker. */
function withRngWorker(src: string, body: (rig: RngRig) => Promise<void>): Promise<void> {
  return withRngWorkers([src], ([rig]) => body(rig));
}

/** The guest sees DEVICE_NEEDS_RESET with a configuration interrupt, resets, tries again: still failed. */
async function needsResetTwice(rig: RngRig): Promise<void> {
  for (let round = 0; round < 2; round++) {
    if (round > 0) rig.driverInit();
    await until("DEVICE_NEEDS_RESET", () => (rig.tr.status & 0x40) !== 0, 10_000);
    await until("the configuration interrupt", () => rig.signalled(0), 10_000);
    common(rig.tr, 0x14, 1, 0);
    assert.equal(rig.tr.status, 0);
  }
}

Deno.test("device fault: a device that cannot be set up is reported and shows the guest NEEDS_RESET", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-fault-" });
  try {
    await withRngWorker(`${dir}/entropy-gone`, async (rig) => {
      await until("the worker's report", () => rig.messages.length > 0, 10_000);
      assert.equal(rig.messages[0].type, "failed");
      assert.equal(rig.messages[0].id, "__rng");
      assert.match(rig.messages[0].error!, /entropy-gone/);
      rig.driverInit();
      await needsResetTwice(rig);
      await rig.stop();
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("device fault: a handler that throws while serving the guest fails the device, not the worker", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-fault-" });
  const src = `${dir}/sixteen-bytes`;
  await Deno.writeFile(src, new Uint8Array(16).fill(0xa5));
  try {
    await withRngWorker(src, async (rig) => {
      rig.driverInit();
      // A working device: 8 bytes from the file.
      rig.drv.setDesc(0, 0x20000, 8, 2 /* WRITE */);
      rig.drv.publish(0);
      rig.notify();
      await until("the first request's answer", () => rig.drv.usedIdx() === 1, 10_000);
      assert.deepEqual(rig.drv.used(0), { id: 0, len: 8 });
      assert.deepEqual([...rig.mem.slice(0x20000, 8)], new Array(8).fill(0xa5));
      assert.equal(rig.messages.length, 0);
      assert.equal(rig.tr.status & 0x40, 0);
      // 64 more bytes: the source has 8 left and runs dry in the handler.
      rig.drv.setDesc(1, 0x21000, 64, 2);
      rig.drv.publish(1);
      rig.notify();
      await until("the worker's report", () => rig.messages.length > 0, 10_000);
      assert.equal(rig.messages[0].type, "failed");
      assert.match(rig.messages[0].error!, /entropy source .*sixteen-bytes exhausted/);
      await needsResetTwice(rig);
      await rig.stop();
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shared device worker: its devices pause, fail and stop one by one; the others serve on", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-shared-" });
  const fill = [0xa5, 0x5a, 0x3c];
  const srcs = fill.map((_, k) => `${dir}/src${k}`);
  await Promise.all(srcs.map((p, k) => Deno.writeFile(p, new Uint8Array(4096).fill(fill[k]))));
  // The third device's source runs dry at its second request: its handler throws.
  await Deno.writeFile(srcs[2], new Uint8Array(12).fill(0x3c));
  try {
    await withRngWorkers(srcs, async (rigs) => {
      const ask = (k: number, n: number, len = 8) => {
        const r = rigs[k];
        r.drv.setDesc(n, r.base + 0x20000 + 0x100 * n, len, 2 /* WRITE */);
        r.drv.publish(n);
        r.notify();
      };
      const answered = async (k: number, count: number) => {
        const r = rigs[k];
        await until(`device ${k}: ${count} answers`, () => r.drv.usedIdx() === count, 10_000);
        const n = count - 1;
        assert.deepEqual([...r.mem.slice(r.base + 0x20000 + 0x100 * n, 8)], new Array(8).fill(fill[k]));
      };
      const idle = async (k: number, count: number) => {
        await new Promise((r) => setTimeout(r, 150));
        assert.equal(rigs[k].drv.usedIdx(), count, `device ${k} served while it should not`);
      };
      for (const r of rigs) r.driverInit();
      for (const k of [0, 1, 2]) {
        ask(k, 0);
        await answered(k, 1);
      }
      // The third device fails (DEVICE_NEEDS_RESET): the others are untouched.
      ask(2, 1, 16);
      await until("the failure report", () => rigs[2].messages.some((m) => m.type === "failed"), 10_000);
      await until("DEVICE_NEEDS_RESET", () => (rigs[2].tr.status & 0x40) !== 0, 10_000);
      assert.equal(rigs[0].tr.status & 0x40, 0);
      assert.equal(rigs[1].tr.status & 0x40, 0);
      // One device paused: it holds its requests; the others are served meanwhile.
      assert.ok(await rigs[0].h.pauseWorker());
      ask(0, 1);
      ask(1, 1);
      await answered(1, 2);
      await idle(0, 1);
      rigs[0].h.resumeWorker();
      await answered(0, 2);
      // All of them paused (as vm.pause does), then resumed: what was queued meanwhile is served.
      for (const r of rigs) assert.ok(await r.h.pauseWorker());
      ask(0, 2);
      ask(1, 2);
      await idle(0, 2);
      for (const r of rigs) r.h.resumeWorker();
      await answered(0, 3);
      await answered(1, 3);
      // One stopped (hot removal): it reports its exit; the others still serve.
      await rigs[1].stop();
      assert.equal(Atomics.load(rigs[1].h.ctl, CTL_WORKER_STATE), 2);
      assert.equal(Atomics.load(rigs[0].h.ctl, CTL_WORKER_STATE), 1);
      ask(1, 3);
      ask(0, 3);
      await answered(0, 4);
      await idle(1, 3);
      // The last ones: the worker ends.
      await rigs[2].stop();
      await rigs[0].stop();
      assert.equal(Atomics.load(rigs[0].h.ctl, CTL_WORKER_STATE), 2);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
