import assert from "node:assert/strict";
import { BusError, MmioBus, type MmioDevice, PioBus, type PioDevice } from "../devices/bus.ts";

class RecordingPio implements PioDevice {
  reads: [number, number][] = [];
  writes: [number, number, number][] = [];
  constructor(readonly value = 0x5a) {}
  pioRead(offset: number, size: number): number {
    this.reads.push([offset, size]);
    return this.value + offset;
  }
  pioWrite(offset: number, size: number, value: number): void {
    this.writes.push([offset, size, value]);
  }
}

class RecordingMmio implements MmioDevice {
  reads: [number, number][] = [];
  writes: [number, number[]][] = [];
  constructor(readonly fillWith = 0x11) {}
  mmioRead(offset: number, data: Uint8Array): void {
    this.reads.push([offset, data.length]);
    data.fill(this.fillWith);
  }
  mmioWrite(offset: number, data: Uint8Array): void {
    this.writes.push([offset, [...data]]);
  }
}

Deno.test("pio bus: dispatches with offsets relative to the range", () => {
  const bus = new PioBus();
  const a = new RecordingPio(0x10);
  const b = new RecordingPio(0x20);
  bus.register(0x3f8, 8, a, "com1");
  bus.register(0x60, 1, b, "kbd");
  assert.equal(bus.read(0x3fd, 1), 0x15);
  bus.write(0x3f8, 1, 0x41);
  bus.write(0x60, 1, 0xfe);
  assert.deepEqual(a.reads, [[5, 1]]);
  assert.deepEqual(a.writes, [[0, 1, 0x41]]);
  assert.deepEqual(b.writes, [[0, 1, 0xfe]]);
  assert.equal(bus.unhandledReads + bus.unhandledWrites, 0);
  assert.equal(bus.deviceAt(0x3ff)?.name, "com1");
  assert.equal(bus.deviceAt(0x400), undefined);
});

Deno.test("pio bus: unhandled reads are all-ones per size, writes are dropped and counted", () => {
  const bus = new PioBus();
  assert.equal(bus.read(0x1234, 1), 0xff);
  assert.equal(bus.read(0x1234, 2), 0xffff);
  assert.equal(bus.read(0x1234, 4), 0xffffffff);
  bus.write(0x80, 1, 0x12);
  assert.equal(bus.unhandledReads, 3);
  assert.equal(bus.unhandledWrites, 1);
  assert.equal(bus.lastUnhandledPort, 0x80);
});

Deno.test("pio bus: an access that runs past the end of a range is unhandled", () => {
  const bus = new PioBus();
  const d = new RecordingPio();
  bus.register(0xcf8, 4, d, "pci");
  assert.equal(bus.read(0xcf8, 4), 0x5a);
  assert.equal(bus.read(0xcfa, 4), 0xffffffff);
  assert.deepEqual(d.reads, [[0, 4]]);
  assert.equal(bus.unhandledReads, 1);
});

Deno.test("pio bus: overlapping and malformed ranges are refused", () => {
  const bus = new PioBus();
  bus.register(0x70, 2, new RecordingPio(), "cmos");
  assert.throws(() => bus.register(0x71, 1, new RecordingPio(), "x"), BusError);
  assert.throws(() => bus.register(0x6f, 2, new RecordingPio(), "y"), /overlaps cmos/);
  assert.throws(() => bus.register(0xffff, 2, new RecordingPio()), BusError);
  assert.throws(() => bus.register(0x10, 0, new RecordingPio()), BusError);
  bus.register(0x72, 2, new RecordingPio(), "adjacent is fine");
});

Deno.test("pio bus: unregister frees the range for reuse", () => {
  const bus = new PioBus();
  const a = new RecordingPio(1);
  bus.register(0x600, 16, a, "pm");
  assert.equal(bus.unregister(0x601), false);
  assert.equal(bus.unregister(0x600), true);
  assert.equal(bus.read(0x600, 1), 0xff);
  const b = new RecordingPio(7);
  bus.register(0x604, 4, b, "again");
  assert.equal(bus.read(0x604, 1), 7);
});

Deno.test("mmio bus: binary search over many ranges, offsets, unhandled fills 0xff", () => {
  const bus = new MmioBus();
  const devs: RecordingMmio[] = [];
  // Registered out of order, including addresses above 4 GiB.
  const bases = [0x1_0000_0000, 0xd000_0000, 0xc000_0000, 0xfec0_0000, 0x40_0000_0000];
  for (const [i, base] of bases.entries()) {
    const d = new RecordingMmio(i + 1);
    devs.push(d);
    bus.register(base, 0x1000, d, `dev${i}`);
  }
  for (const [i, base] of bases.entries()) {
    const data = new Uint8Array(4);
    bus.read(base + 0x10, data);
    assert.deepEqual([...data], [i + 1, i + 1, i + 1, i + 1]);
    assert.deepEqual(devs[i].reads, [[0x10, 4]]);
  }
  bus.write(0xfec0_0ff8, new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]));
  assert.deepEqual(devs[3].writes, [[0xff8, [1, 2, 3, 4, 5, 6, 7, 8]]]);

  const miss = new Uint8Array(8);
  bus.read(0xe000_0000, miss);
  assert.deepEqual([...miss], [255, 255, 255, 255, 255, 255, 255, 255]);
  bus.write(0xc000_1000, new Uint8Array(4)); // one past the end of dev2
  bus.read(0xc000_0ffe, new Uint8Array(4)); // straddles the end
  assert.equal(bus.unhandledReads, 2);
  assert.equal(bus.unhandledWrites, 1);
  assert.equal(bus.deviceAt(0x1_0000_0fff)?.name, "dev0");
});

Deno.test("mmio bus: overlaps refused, unregister works", () => {
  const bus = new MmioBus();
  bus.register(0x1000, 0x1000, new RecordingMmio(), "a");
  assert.throws(() => bus.register(0x1fff, 1, new RecordingMmio(), "b"), /overlaps a/);
  assert.throws(() => bus.register(0x800, 0x801, new RecordingMmio(), "c"), BusError);
  bus.register(0x2000, 0x1000, new RecordingMmio(), "d");
  assert.equal(bus.unregister(0x1000), true);
  bus.register(0x800, 0x1000, new RecordingMmio(7), "e");
  const data = new Uint8Array(1);
  bus.read(0x17ff, data);
  assert.equal(data[0], 7);
});
