import assert from "node:assert/strict";
import { Cmos, RTC } from "../devices/cmos.ts";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
// 2024-02-29 23:59:58.250 UTC, a Thursday.
const T0 = Date.UTC(2024, 1, 29, 23, 59, 58, 250);

function rtc(lowMemBytes = 512 * MiB, highMemBytes = 0, cpus = 1) {
  let now = T0;
  const dev = new Cmos(Cmos.createDescriptor({ lowMemBytes, highMemBytes, cpus }), { now: () => now });
  const read = (r: number) => {
    dev.pioWrite(0, 1, r);
    return dev.pioRead(1, 1);
  };
  const write = (r: number, v: number) => {
    dev.pioWrite(0, 1, r);
    dev.pioWrite(1, 1, v);
  };
  return { dev, read, write, advance: (ms: number) => (now += ms) };
}

Deno.test("cmos: time in BCD, 24-hour, from the host clock", () => {
  const c = rtc();
  assert.equal(c.read(RTC.REG_B), 0x02);
  assert.equal(c.read(RTC.SECONDS), 0x58);
  assert.equal(c.read(RTC.MINUTES), 0x59);
  assert.equal(c.read(RTC.HOURS), 0x23);
  assert.equal(c.read(RTC.DAY_OF_WEEK), 5);
  assert.equal(c.read(RTC.DAY_OF_MONTH), 0x29);
  assert.equal(c.read(RTC.MONTH), 0x02);
  assert.equal(c.read(RTC.YEAR), 0x24);
  assert.equal(c.read(RTC.CENTURY), 0x20);
  c.advance(2000);
  assert.equal(c.read(RTC.SECONDS), 0x00);
  assert.equal(c.read(RTC.MONTH), 0x03);
  assert.equal(c.read(RTC.DAY_OF_MONTH), 0x01);
});

Deno.test("cmos: binary mode and 12-hour mode", () => {
  const c = rtc();
  c.write(RTC.REG_B, 0x06); // binary, 24h
  assert.equal(c.read(RTC.HOURS), 23);
  assert.equal(c.read(RTC.YEAR), 24);
  c.write(RTC.REG_B, 0x04); // binary, 12h
  assert.equal(c.read(RTC.HOURS), 0x80 | 11);
  c.write(RTC.REG_B, 0x00); // BCD, 12h
  assert.equal(c.read(RTC.HOURS), 0x80 | 0x11);
});

Deno.test("cmos: status registers A (UIP clear), C and D (valid)", () => {
  const c = rtc();
  assert.equal(c.read(RTC.REG_A), 0x26);
  assert.equal(c.read(RTC.REG_A) & 0x80, 0);
  assert.equal(c.read(RTC.REG_C), 0);
  assert.equal(c.read(RTC.REG_D), 0x80);
  c.write(RTC.REG_D, 0);
  assert.equal(c.read(RTC.REG_D), 0x80);
});

Deno.test("cmos: setting the time with SET, as hwclock does, then it runs on", () => {
  const c = rtc();
  c.write(RTC.REG_B, 0x82);
  c.advance(5000);
  assert.equal(c.read(RTC.SECONDS), 0x58, "frozen while SET");
  // 2031-12-31 10:20:30: day first (31 would not fit February), then month.
  c.write(RTC.SECONDS, 0x30);
  c.write(RTC.MINUTES, 0x20);
  c.write(RTC.HOURS, 0x10);
  c.write(RTC.DAY_OF_MONTH, 0x31);
  c.write(RTC.MONTH, 0x12);
  c.write(RTC.YEAR, 0x31);
  c.write(RTC.REG_B, 0x02);
  assert.equal(c.read(RTC.DAY_OF_MONTH), 0x31);
  assert.equal(c.read(RTC.MONTH), 0x12);
  assert.equal(c.read(RTC.YEAR), 0x31);
  assert.equal(c.read(RTC.HOURS), 0x10);
  c.advance(61_000);
  assert.equal(c.read(RTC.MINUTES), 0x21);
  assert.equal(c.read(RTC.SECONDS), 0x31);
});

Deno.test("cmos: a single field written while running", () => {
  const c = rtc();
  c.write(RTC.MINUTES, 0x05);
  assert.equal(c.read(RTC.MINUTES), 0x05);
  assert.equal(c.read(RTC.HOURS), 0x23);
  assert.equal(c.read(RTC.SECONDS), 0x58);
});

Deno.test("cmos: memory size registers", () => {
  const c = rtc(3 * GiB, 5 * GiB, 4);
  const r16 = (i: number) => c.read(i) | (c.read(i + 1) << 8);
  assert.equal(r16(0x15), 640);
  assert.equal(r16(0x17), 0xfc00, "extended memory capped at 63 MiB");
  assert.equal(r16(0x30), 0xfc00);
  assert.equal(r16(0x34), (3 * GiB - 16 * MiB) / 65536);
  assert.equal(c.read(0x5b) | (c.read(0x5c) << 8) | (c.read(0x5d) << 16), (5 * GiB) / 65536);
  assert.equal(c.read(0x5f), 3);
  const small = rtc(8 * MiB);
  assert.equal(small.read(0x17) | (small.read(0x18) << 8), 7 * 1024);
  assert.equal(small.read(0x34) | small.read(0x35), 0);
  let sum = 0;
  for (let i = 0x10; i <= 0x2d; i++) sum += c.read(i);
  assert.equal((c.read(0x2e) << 8) | c.read(0x2f), sum);
});

Deno.test("cmos: NVRAM, index register with NMI mask bit", () => {
  const c = rtc();
  c.write(0x40, 0xab);
  c.dev.pioWrite(0, 1, 0x80 | 0x40);
  assert.ok(c.dev.nmiMasked);
  assert.equal(c.dev.pioRead(1, 1), 0xab, "the NMI bit does not change the index");
  assert.equal(c.dev.pioRead(0, 1), 0xc0);
  c.dev.pioWrite(0, 1, 0x7f);
  c.dev.pioWrite(1, 1, 0x12);
  assert.equal(c.dev.pioRead(1, 1), 0x12);
  assert.ok(!c.dev.nmiMasked);
});
