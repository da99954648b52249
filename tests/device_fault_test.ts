/**
 * A device whose own code fails is marked failed, never left as a silent dead queue: the real device
 * worker (devices/virtio/worker.ts) runs virtio-rng whose source is gone by the time the worker starts
 * (removed after the boot's check). The worker reports it, and whenever the guest activates the device it
 * sets DEVICE_NEEDS_RESET with a configuration interrupt; the worker still pauses and stops.
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
  newControlBlock,
  type VirtioDeviceDescriptor,
  VirtioDeviceHandle,
} from "../devices/virtio/device_shared.ts";
import type { DeviceWorkerExit } from "../devices/virtio/worker.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { FakeDriverQueue, writeCommon as common } from "./virtio_driver.ts";
import { until } from "./helpers/host.ts";

Deno.test("device fault: a device that cannot be set up is reported and shows the guest NEEDS_RESET", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-fault-" });
  const src = `${dir}/entropy-gone`;
  const map = mapMemfd(0x100000, "fault-test");
  const fds: EventFd[] = [];
  const efd = () => {
    const e = EventFd.create(EFD_NONBLOCK);
    fds.push(e);
    return e.fd;
  };
  let w: Worker | null = null;
  try {
    const ram = [{ gpa: 0, size: 0x100000, hostAddr: map.hostAddr, fd: map.fd }];
    const mem = GuestMemory.fromHost(ram);
    const spec = {
      type: VIRTIO_ID.RNG,
      features: rngFeatures(),
      numQueues: 1,
      maxQueueSize: 256,
      config: new Uint8Array(0),
    };
    const tr = new VirtioPciDevice(spec);
    const desc: VirtioDeviceDescriptor = {
      id: "__rng",
      kind: "rng",
      slot: 1,
      spec,
      shared: tr.shared,
      control: newControlBlock(1),
      queueFds: [efd()],
      irqFds: [efd(), efd()],
      controlFd: efd(),
      gsiBase: 24,
      counters: new SharedArrayBuffer(16),
      rng: { src },
    };
    const h = new VirtioDeviceHandle(desc, tr);
    tr.onActivate = () => h.bumpEpoch();
    tr.onReset = () => h.bumpEpoch();
    w = new Worker(new URL("../devices/virtio/worker.ts", import.meta.url).href, { type: "module" });
    const messages: DeviceWorkerExit[] = [];
    w.onmessage = (ev) => messages.push(ev.data);
    w.postMessage({ device: desc, ram });

    const drv = new FakeDriverQueue(mem, 0x10000, 8);
    const driverInit = () => {
      // MSI-X on, vectors 0 (configuration) and 1 (the queue) unmasked.
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
    };
    const word = new Uint8Array(8);
    const signalled = (v: number) => Number(shim().kvs_read(desc.irqFds[v], word, 8)) === 8;

    await until("the worker's report", () => messages.length > 0, 10_000);
    assert.equal(messages[0].type, "failed");
    assert.equal(messages[0].id, "__rng");
    assert.match(messages[0].error!, /entropy-gone/);
    for (let round = 0; round < 2; round++) {
      driverInit();
      await until("DEVICE_NEEDS_RESET", () => (tr.status & 0x40) !== 0, 10_000);
      await until("the configuration interrupt", () => signalled(0), 10_000);
      // The driver resets the device (and may try again: it stays failed).
      common(tr, 0x14, 1, 0);
      assert.equal(tr.status, 0);
    }

    // Stop still works, and the worker ends without an error.
    Atomics.store(h.ctl, CTL_STOP, 1);
    h.kickWorker();
    await until("the worker's exit", () => messages.some((m) => m.type === "exit"), 10_000);
    assert.equal(messages.find((m) => m.type === "exit")!.error, undefined);
  } finally {
    w?.terminate();
    for (const e of fds) e.close();
    unmap(map);
    await Deno.remove(dir, { recursive: true });
  }
});
