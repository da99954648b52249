import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import { consoleConfigSpace, ConsoleDevice, ConsoleInput } from "../devices/virtio/console.ts";
import { VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as W } from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { Vm } from "../vmm/vm.ts";
import { printAndPoweroffCode, pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

function setup(capacity = 64) {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x100000 }]);
  const rxd = new FakeDriverQueue(mem, 0x1000, 8);
  const txd = new FakeDriverQueue(mem, 0x3000, 8);
  const rx = new SplitQueue(mem, rxd.config);
  const tx = new SplitQueue(mem, txd.config);
  const out: string[] = [];
  const input = new ConsoleInput(ConsoleInput.create(capacity));
  const dev = new ConsoleDevice({ write: (b) => out.push(dec.decode(b)) }, input);
  return { mem, rxd, txd, rx, tx, out, input, dev };
}

Deno.test("console: input ring wraps and refuses what does not fit", () => {
  const input = new ConsoleInput(ConsoleInput.create(8));
  assert.equal(input.push(enc.encode("abcdef")), 6);
  const d = new Uint8Array(4);
  assert.equal(input.pull(d), 4);
  assert.equal(dec.decode(d), "abcd");
  assert.equal(input.push(enc.encode("ghijklmnop")), 6);
  assert.equal(input.available, 8);
  const all = new Uint8Array(16);
  assert.equal(input.pull(all), 8);
  assert.equal(dec.decode(all.subarray(0, 8)), "efghijkl");
  assert.throws(() => ConsoleInput.create(12), /power of two/);
});

Deno.test("console: TX writes the readable bytes to the sink; hostile chains are completed", () => {
  const { mem, txd, tx, out, dev } = setup();
  mem.write(0x10000, enc.encode("hello "));
  mem.write(0x20000, enc.encode("hvc\n"));
  txd.setDesc(0, 0x10000, 6, NEXT, 1);
  txd.setDesc(1, 0x20000, 4);
  txd.publish(0);
  txd.setDesc(2, 0x900000, 4); // outside RAM
  txd.publish(2);
  txd.setDesc(3, 0x10000, 4, NEXT, 3); // loop
  txd.publish(3);
  assert.equal(dev.processTx(tx), true);
  assert.equal(out.join(""), "hello hvc\n");
  assert.deepEqual([0, 1, 2].map((i) => txd.used(i)), [{ id: 0, len: 0 }, { id: 2, len: 0 }, {
    id: 3,
    len: 0,
  }]);
  assert.deepEqual(dev.counters.snapshot(), { rx_bytes: 0, tx_bytes: 10 });
});

Deno.test("console: RX moves input into buffers only when both exist", () => {
  const { mem, rxd, rx, input, dev } = setup();
  rxd.setDesc(0, 0x10000, 4, W);
  rxd.publish(0);
  assert.equal(dev.processRx(rx), false, "no input: the buffer stays available");
  assert.equal(rx.availableCount(), 1);
  input.push(enc.encode("ls -l\n"));
  assert.equal(dev.processRx(rx), true);
  assert.deepEqual(rxd.used(0), { id: 0, len: 4 });
  assert.equal(dec.decode(mem.read(0x10000, 4)), "ls -");
  assert.equal(input.available, 2, "the rest waits for the next buffer");
  rxd.setDesc(1, 0x900000, 16, W); // hostile: completed with nothing
  rxd.publish(1);
  rxd.setDesc(2, 0x20000, 16, W);
  rxd.publish(2);
  dev.processRx(rx);
  assert.deepEqual(rxd.used(1), { id: 1, len: 0 });
  assert.deepEqual(rxd.used(2), { id: 2, len: 2 });
  assert.equal(dec.decode(mem.read(0x20000, 2)), "l\n");
  assert.deepEqual(dev.counters.snapshot(), { rx_bytes: 6, tx_bytes: 0 });
  assert.equal(consoleConfigSpace().length, 12);
});

Deno.test({
  name: "native: --console file=PATH adds a virtio-console at 00:01.0 with counters; bad net options fail",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-console-test-" });
  try {
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(printAndPoweroffCode("hi\n")));
    const base = {
      memory: { size: 64 << 20 },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "Null" },
    };
    const vm = new Vm(
      VmConfigSchema.parse({ ...base, console: { mode: "File", file: `${dir}/console.log` } }),
    );
    const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
    await vm.boot();
    try {
      assert.equal(await event, "poweroff");
      const tree = vm.deviceTree() as Record<string, { pci_bdf: string | null; children: string[] }>;
      assert.equal(tree["_virtio-pci-__console"].pci_bdf, "0000:00:01.0");
      assert.deepEqual(tree["_virtio-pci-__console"].children, ["__console"]);
      assert.equal(tree["_virtio-pci-__rng"].pci_bdf, "0000:00:02.0");
      assert.deepEqual(vm.counters().__console, { rx_bytes: 0, tx_bytes: 0 });
      assert.equal(Deno.statSync(`${dir}/console.log`).size, 0);
    } finally {
      await vm.shutdown();
    }
    // As Cloud Hypervisor: no more net queue pairs than boot vCPUs.
    assert.throws(
      () =>
        VmConfigSchema.parse({
          ...base,
          console: { mode: "Off" },
          net: [{ tap: "dvmmtest0", num_queues: 4 }],
        }),
      /2 queue pairs, more than the 1 boot vCPU/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
