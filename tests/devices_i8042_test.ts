import assert from "node:assert/strict";
import { EVENT_SOURCE_NAMES } from "../devices/shared.ts";
import { I8042, I8042_CTR, I8042_STR } from "../devices/i8042.ts";
import { PioBus } from "../devices/bus.ts";

function kbc() {
  const events: string[] = [];
  const kbd: boolean[] = [];
  const aux: boolean[] = [];
  const dev = new I8042(I8042.createDescriptor(), {
    events: { request: (e, by) => events.push(`${e} by ${EVENT_SOURCE_NAMES[by]}`) },
    kbdIrq: { set: (l) => kbd.push(l) },
    auxIrq: { set: (l) => aux.push(l) },
  });
  const bus = new PioBus();
  bus.register(0x60, 1, dev.data, "data");
  bus.register(0x64, 1, dev.command, "cmd");
  const status = () => bus.read(0x64, 1);
  const cmd = (c: number) => bus.write(0x64, 1, c);
  const put = (v: number) => bus.write(0x60, 1, v);
  const get = () => bus.read(0x60, 1);
  return { dev, bus, events, kbd, aux, status, cmd, put, get };
}

/** Linux's i8042_command: wait for IBF clear, send, then read `n` result bytes (waiting for OBF). */
function command(k: ReturnType<typeof kbc>, c: number, param?: number, n = 0): number[] | "timeout" {
  if (k.status() & I8042_STR.IBF) return "timeout";
  k.cmd(c);
  if (param !== undefined) {
    if (k.status() & I8042_STR.IBF) return "timeout";
    k.put(param);
  }
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    if (!(k.status() & I8042_STR.OBF)) return "timeout";
    out.push(k.get());
  }
  return out;
}

Deno.test("i8042: command 0xFE pulses the reset line → reboot", () => {
  const k = kbc();
  assert.equal(k.status() & I8042_STR.IBF, 0, "Linux's kb_wait sees the input buffer empty");
  k.cmd(0xfe);
  assert.deepEqual(k.events, ["reboot by keyboard controller reset line"]);
  assert.equal(k.dev.resets, 1);
  k.cmd(0xff); // pulse nothing
  assert.deepEqual(k.events, ["reboot by keyboard controller reset line"]);
});

Deno.test("i8042: writing the output port with bit 0 clear resets too", () => {
  const k = kbc();
  assert.deepEqual(command(k, 0xd0, undefined, 1), [0x03]);
  command(k, 0xd1, 0x03);
  assert.deepEqual(k.events, []);
  command(k, 0xd1, 0x02);
  assert.deepEqual(k.events, ["reboot by keyboard controller reset line"]);
});

Deno.test("i8042: self-test, command byte read/write, interface tests", () => {
  const k = kbc();
  assert.deepEqual(command(k, 0xaa, undefined, 1), [0x55]);
  const ctr = command(k, 0x20, undefined, 1) as number[];
  assert.equal(ctr[0], I8042_CTR.KBDINT | I8042_CTR.SYS | I8042_CTR.XLATE);
  command(k, 0x60, 0x74);
  assert.deepEqual(command(k, 0x20, undefined, 1), [0x74]);
  command(k, 0xae);
  command(k, 0xa8);
  assert.deepEqual(command(k, 0x20, undefined, 1), [0x74 & ~0x30]);
  command(k, 0xad);
  command(k, 0xa7);
  assert.deepEqual(command(k, 0x20, undefined, 1), [0x74]);
  assert.deepEqual(command(k, 0xab, undefined, 1), [0x00]);
  assert.deepEqual(command(k, 0xa9, undefined, 1), [0x00]);
  assert.equal(k.status() & I8042_STR.OBF, 0);
  assert.ok(k.status() & I8042_STR.SYS);
  assert.ok(k.status() & I8042_STR.CMD, "last write went to the command port");
});

Deno.test("i8042: aux loopback echoes with AUXDATA; devices are absent (timeout, 0xFF)", () => {
  const k = kbc();
  command(k, 0x60, 0x47); // both interrupts on
  k.cmd(0xd3);
  k.put(0x5a);
  assert.equal(k.status() & (I8042_STR.OBF | I8042_STR.AUXDATA), I8042_STR.OBF | I8042_STR.AUXDATA);
  assert.deepEqual(k.aux, [true]);
  assert.equal(k.get(), 0x5a);
  assert.deepEqual(k.aux, [true, false]);
  // Keyboard command (GET ID) with no keyboard.
  k.put(0xf2);
  const st = k.status();
  assert.equal(
    st & (I8042_STR.OBF | I8042_STR.TIMEOUT | I8042_STR.AUXDATA),
    I8042_STR.OBF | I8042_STR.TIMEOUT,
  );
  assert.deepEqual(k.kbd, [true]);
  assert.equal(k.get(), 0xff);
  assert.deepEqual(k.kbd, [true, false]);
  // Mouse command through 0xD4.
  k.cmd(0xd4);
  k.put(0xff);
  assert.ok(k.status() & I8042_STR.AUXDATA);
  assert.ok(k.status() & I8042_STR.TIMEOUT);
  assert.equal(k.get(), 0xff);
  assert.equal(k.status() & I8042_STR.OBF, 0);
});

Deno.test("i8042: Linux's direct probe gets an answer to every controller command", () => {
  const k = kbc();
  // i8042_flush: drain the output buffer (must not stay full, or "No controller found").
  let n = 0;
  while (k.status() & I8042_STR.OBF && n < 16) {
    k.get();
    n++;
  }
  assert.equal(n, 0);
  // i8042_controller_init: read CTR twice, disable the keyboard, write it back.
  const a = command(k, 0x20, undefined, 1) as number[];
  const b = command(k, 0x20, undefined, 1) as number[];
  assert.deepEqual(a, b);
  assert.deepEqual(command(k, 0x60, (a[0] | I8042_CTR.KBDDIS) & ~I8042_CTR.KBDINT), []);
  // i8042_check_aux: loopback, then toggling AUXDIS is visible in CTR.
  assert.deepEqual(command(k, 0xd3, 0x5a, 1), [0x5a]);
  command(k, 0xa7);
  assert.ok((command(k, 0x20, undefined, 1) as number[])[0] & I8042_CTR.AUXDIS);
  command(k, 0xa8);
  assert.ok(!((command(k, 0x20, undefined, 1) as number[])[0] & I8042_CTR.AUXDIS));
  // MUX detection: a plain controller echoes all three loop bytes (no MUX version).
  assert.deepEqual(command(k, 0xd3, 0xf0, 1), [0xf0]);
  assert.deepEqual(command(k, 0xd3, 0x56, 1), [0x56]);
  assert.deepEqual(command(k, 0xd3, 0xa4, 1), [0xa4]);
});

Deno.test("i8042: unregistered neighbours and odd offsets stay quiet", () => {
  const k = kbc();
  assert.equal(k.bus.read(0x61, 1), 0xff); // speaker port is KVM's, not ours
  assert.equal(k.bus.unhandledReads, 1);
  assert.equal(k.get(), 0, "empty output buffer reads the last byte (none yet)");
});
