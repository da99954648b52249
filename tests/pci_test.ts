import assert from "node:assert/strict";
import { PciConfigSpace } from "../devices/pci/config.ts";
import { PciBus, PlainPciFunction } from "../devices/pci/bus.ts";
import { Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK } from "../devices/pci/msix.ts";

const params = {
  mmio32: { base: 0xc000_0000, size: 0x2800_0000 },
  mmio64: { base: 0x10_0000_0000, size: 2 ** 36 },
};

function cfgAddr(bus: number, dev: number, fn: number, reg: number): number {
  return (0x80000000 | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xfc)) >>> 0;
}

function makeBus() {
  const bus = new PciBus(params);
  bus.add(0, PciBus.hostBridge(params));
  const cfg = new PciConfigSpace({
    vendorId: 0x1234,
    deviceId: 0x5678,
    classCode: 0x018000,
    revision: 2,
    bars: [
      { index: 0, size: 0x20000, kind: "mem64" },
      { index: 2, size: 0x1000, kind: "mem32" },
      { index: 3, size: 0x100, kind: "mem64", prefetchable: true },
      { index: 5, size: 0x20, kind: "io" },
    ],
  });
  const fn = new PlainPciFunction(cfg);
  return { bus, cfg, fn };
}

Deno.test("pci: config mechanism #1 via 0xCF8/0xCFC", () => {
  const { bus, fn } = makeBus();
  const bars = bus.add(3, fn, false);
  assert.equal(bars.size, 4);
  bus.pioWrite(0, 4, cfgAddr(0, 0, 0, 0));
  assert.equal(bus.pioRead(0, 4), cfgAddr(0, 0, 0, 0));
  assert.equal(bus.pioRead(4, 4), 0x0008_1b36); // host bridge
  bus.pioWrite(0, 4, cfgAddr(0, 0, 0, 8));
  assert.equal(bus.pioRead(4, 4) >>> 8, 0x060000);
  bus.pioWrite(0, 4, cfgAddr(0, 3, 0, 0));
  assert.equal(bus.pioRead(4, 2), 0x1234);
  assert.equal(bus.pioRead(6, 2), 0x5678);
  assert.equal(bus.pioRead(7, 1), 0x56);
  bus.pioWrite(0, 4, cfgAddr(0, 3, 0, 8));
  assert.equal(bus.pioRead(4, 4), 0x0180_0002);
  // absent device / function / bus
  for (const a of [cfgAddr(0, 4, 0, 0), cfgAddr(0, 3, 1, 0), cfgAddr(1, 3, 0, 0)]) {
    bus.pioWrite(0, 4, a);
    assert.equal(bus.pioRead(4, 4), 0xffffffff);
    assert.equal(bus.pioRead(4, 2), 0xffff);
  }
  // enable bit clear: data reads all-ones, writes ignored
  bus.pioWrite(0, 4, cfgAddr(0, 3, 0, 4) & 0x7fffffff);
  bus.pioWrite(4, 2, 0x7);
  assert.equal(bus.pioRead(4, 4), 0xffffffff);
  // byte / word writes at 0xCFC..0xCFF
  bus.pioWrite(0, 4, cfgAddr(0, 3, 0, 0x3c));
  bus.pioWrite(4, 1, 0x0b); // interrupt line
  assert.equal(bus.pioRead(4, 1), 0x0b);
  bus.pioWrite(5, 1, 0x04); // interrupt pin is read-only
  assert.equal(bus.pioRead(5, 1), 0);
  // 0xCF9 byte write → reset control hook
  let reset = -1;
  bus.onResetControl = (v) => reset = v;
  bus.pioWrite(1, 1, 0x06);
  assert.equal(reset, 6);
});

Deno.test("pci: ECAM access", () => {
  const { bus, fn } = makeBus();
  bus.add(5, fn);
  const d = new Uint8Array(4);
  const ecam = (b: number, dev: number, f: number, reg: number) => (b << 20) | (dev << 15) | (f << 12) | reg;
  bus.mmioRead(ecam(0, 5, 0, 0), d);
  assert.deepEqual([...d], [0x34, 0x12, 0x78, 0x56]);
  const w = new Uint8Array(2);
  bus.mmioRead(ecam(0, 5, 0, 2), w);
  assert.deepEqual([...w], [0x78, 0x56]);
  bus.mmioRead(ecam(0, 6, 0, 0), d);
  assert.deepEqual([...d], [0xff, 0xff, 0xff, 0xff]);
  bus.mmioRead(ecam(2, 5, 0, 0), d);
  assert.deepEqual([...d], [0xff, 0xff, 0xff, 0xff]);
  bus.mmioRead(ecam(0, 5, 0, 0x100), d); // extended space: no capabilities
  assert.deepEqual([...d], [0, 0, 0, 0]);
  bus.mmioWrite(ecam(0, 5, 0, 4), new Uint8Array([2, 0]));
  assert.equal(fn.config.command, 2);
});

Deno.test("pci: BAR allocation, sizing protocol and reprogramming callback", () => {
  const { bus, cfg, fn } = makeBus();
  const addrs = bus.add(1, fn);
  assert.equal(addrs.get(0), 0x10_0000_0000);
  assert.equal(addrs.get(2), 0xc000_0000);
  assert.equal(addrs.get(3), 0x10_0002_0000);
  assert.equal(addrs.get(5), 0); // no io window: the BAR is left unassigned
  const changes: [number, number, number][] = [];
  bus.onBarChange = (_a, _f, bar, o, n) => changes.push([bar, o, n]);
  const rd = (reg: number) => bus.configRead(0, 1, 0, reg, 4);
  const wr = (reg: number, v: number) => bus.configWrite(0, 1, 0, reg, 4, v);
  // sizing with decoding disabled, as Linux does
  wr(0x10, 0xffffffff);
  wr(0x14, 0xffffffff);
  assert.equal(rd(0x10), 0xfffe0004); // 128 KiB, 64-bit, non-prefetchable
  assert.equal(rd(0x14), 0xffffffff);
  wr(0x18, 0xffffffff);
  assert.equal(rd(0x18), 0xfffff000);
  wr(0x1c, 0xffffffff);
  assert.equal(rd(0x1c), 0xffffff0c); // 64-bit prefetchable
  wr(0x24, 0xffffffff);
  assert.equal(rd(0x24), 0xffffffe1); // io, 32 ports
  wr(0x30, 0xffffffff);
  assert.equal(rd(0x30), 0); // no expansion ROM
  // restore
  wr(0x10, 0);
  wr(0x14, 0x10);
  wr(0x18, 0xc000_0000);
  wr(0x1c, 0x0002_0000);
  assert.deepEqual(changes, []);
  // enable memory decoding: BARs 0, 2, 3 start decoding
  bus.configWrite(0, 1, 0, 4, 2, 0x0006);
  assert.deepEqual(changes, [[0, -1, 0x10_0000_0000], [2, -1, 0xc000_0000], [3, -1, 0x10_0002_0000]]);
  changes.length = 0;
  // move BAR 2 while decoding
  wr(0x18, 0xc010_0000);
  assert.deepEqual(changes, [[2, 0xc000_0000, 0xc010_0000]]);
  assert.equal(cfg.barDecodeAddress(2), 0xc010_0000);
  changes.length = 0;
  // a sizing probe while decoding is not reported as a move; the restore is a no-op
  wr(0x18, 0xffffffff);
  assert.deepEqual(changes, [[2, 0xc010_0000, -1]]);
  wr(0x18, 0xc010_0000);
  assert.deepEqual(changes, [[2, 0xc010_0000, -1], [2, -1, 0xc010_0000]]);
  // command register: read-only bits stay clear, status w1c
  bus.configWrite(0, 1, 0, 4, 2, 0xffff);
  assert.equal(cfg.command, 0x0547);
  cfg.bytes[7] = 0x80; // pretend a parity error was latched
  bus.configWrite(0, 1, 0, 6, 2, 0x8000);
  assert.equal(cfg.bytes[7], 0);
});

Deno.test("pci: config state shared between two instances", () => {
  const a = new PciConfigSpace({
    vendorId: 1,
    deviceId: 2,
    classCode: 0,
    bars: [{ index: 0, size: 0x1000, kind: "mem32" }],
  });
  a.write(0x10, 4, 0xfeed_0000);
  const b = new PciConfigSpace({
    vendorId: 9,
    deviceId: 9,
    classCode: 0,
    bars: [{ index: 0, size: 0x1000, kind: "mem32" }],
  }, a.state);
  assert.equal(b.read(0, 4), 0x0002_0001); // not re-initialised
  assert.equal(b.barAddress(0), 0xfeed_0000);
});

Deno.test("msix: capability, table programming, masking and pending bits", () => {
  const cfg = new PciConfigSpace({
    vendorId: 1,
    deviceId: 2,
    classCode: 0,
    bars: [{ index: 0, size: 0x4000, kind: "mem32" }],
  });
  const m = new Msix(cfg, { vectors: 3, bar: 0, tableOffset: 0x2000, pbaOffset: 0x3000 });
  assert.equal(cfg.read(0x34, 1), m.capOffset);
  assert.equal(cfg.read(6, 2) & 0x10, 0x10);
  assert.equal(cfg.read(m.capOffset, 1), 0x11);
  assert.equal(cfg.read(m.capOffset + 2, 2), 2); // table size - 1
  assert.equal(cfg.read(m.capOffset + 4, 4), 0x2000);
  assert.equal(cfg.read(m.capOffset + 8, 4), 0x3000);
  cfg.write(m.capOffset + 2, 2, 0xffff);
  assert.equal(cfg.read(m.capOffset + 2, 2), 0xc002); // only enable + function mask are writable
  cfg.write(m.capOffset + 2, 2, 0);
  const events: [number, boolean, number][] = [];
  const delivered: number[] = [];
  m.onVectorChange = (v, e) => events.push([v, e.masked, e.data]);
  m.onDeliverPending = (v) => delivered.push(v);
  // all vectors start masked
  const d = new Uint8Array(4);
  m.tableRead(12, d);
  assert.deepEqual([...d], [1, 0, 0, 0]);
  const u32 = (x: number) => new Uint8Array(new Uint32Array([x]).buffer);
  m.tableWrite(16 + 0, u32(0xfee0_0000));
  m.tableWrite(16 + 4, u32(0));
  m.tableWrite(16 + 8, u32(0x4041));
  assert.deepEqual(events.map((e) => e[0]), [1, 1]); // address lo and data changed; hi unchanged
  events.length = 0;
  // disabled MSI-X: trigger sets the pending bit
  assert.equal(m.trigger(1), false);
  assert.equal(m.isPending(1), true);
  const pba = new Uint8Array(8);
  m.pbaRead(0, pba);
  assert.equal(pba[0], 2);
  // enable MSI-X with function mask, unmask entry: still masked by function
  cfg.write(m.capOffset + 2, 2, MSIX_ENABLE | MSIX_FUNCTION_MASK);
  m.tableWrite(16 + 12, u32(0xfffffffe)); // reserved bits are ignored
  m.tableRead(16 + 12, d);
  assert.deepEqual([...d], [0, 0, 0, 0]);
  assert.equal(m.isMasked(1), true);
  assert.deepEqual(delivered, []);
  // clearing the function mask delivers the pending vector
  events.length = 0;
  cfg.write(m.capOffset + 2, 2, MSIX_ENABLE);
  assert.deepEqual(delivered, [1]);
  assert.equal(m.isPending(1), false);
  assert.deepEqual(events, [[0, true, 0], [1, false, 0x4041], [2, true, 0]]);
  assert.equal(m.trigger(1), true);
  assert.equal(m.trigger(0), false);
  assert.equal(m.trigger(7), false);
  // masking the entry again then unmasking with a pending bit delivers it
  m.tableWrite(16 + 12, u32(1));
  assert.equal(m.trigger(1), false);
  m.tableWrite(16 + 12, u32(0));
  assert.deepEqual(delivered, [1, 1]);
  // an 8-byte write covering address lo+hi
  m.tableWrite(32, new Uint8Array([0, 0, 0xe0, 0xfe, 0, 0, 0, 0]));
  assert.equal(m.vector(2).addressLo, 0xfee0_0000);
  // out-of-range table writes are ignored
  m.tableWrite(48, u32(5));
});

Deno.test("device workers at boot: the light devices (console, rng, balloon, virtio-mem) share one", async () => {
  const { VmConfigSchema } = await import("../vmm/vm_config.ts");
  const { deviceWorkerCount, wantsPci } = await import("../vmm/pci_platform.ts");
  const base = { payload: { kernel: "/k" }, memory: { size: 1 << 28 } };
  const cfg = (extra: Record<string, unknown>) => VmConfigSchema.parse({ ...base, ...extra });
  assert.equal(deviceWorkerCount(cfg({})), 1, "the default rng");
  assert.equal(wantsPci(cfg({})), true, "the rng is always there");
  assert.equal(
    deviceWorkerCount(
      cfg({ console: { mode: "Tty" }, balloon: { size: 0 }, disks: [{ path: "/a" }, { path: "/b" }] }),
    ),
    3,
    "rng, console and balloon together; a worker per disk",
  );
  assert.equal(
    deviceWorkerCount(cfg({ net: [{}], vsock: { cid: 3, socket: "/v" }, pmem: [{ file: "/p" }] })),
    4,
  );
  assert.equal(
    deviceWorkerCount(cfg({ memory: { size: 1 << 28, hotplug_method: "VirtioMem", hotplug_size: 1 << 28 } })),
    1,
    "virtio-mem joins the rng",
  );
});
