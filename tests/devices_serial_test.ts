import assert from "node:assert/strict";
import { Serial16550, type SerialParams, UART } from "../devices/serial.ts";

const dec = new TextDecoder();
const enc = new TextEncoder();

/** A UART with recording doubles for its interrupt line and output sink. */
function uart(p: SerialParams = {}) {
  const out: number[] = [];
  const writes: number[] = []; // size of each sink write
  const irq: boolean[] = [];
  const s = new Serial16550(Serial16550.createDescriptor(p), {
    irq: { set: (l) => irq.push(l) },
    out: {
      write: (b) => {
        writes.push(b.length);
        out.push(...b);
      },
    },
  });
  const inb = (off: number) => s.pioRead(off, 1);
  const outb = (off: number, v: number) => s.pioWrite(off, 1, v);
  return { s, out, writes, irq, inb, outb, text: () => dec.decode(new Uint8Array(out)) };
}

type Io = { inb(off: number): number; outb(off: number, v: number): void };

/**
 * The steps Linux's 8250 autoconfig takes to identify a port at boot (scratch test of IER, loopback
 * test, FIFO detection, then the 16550A refinements: EFR probes, NatSemi, 16750 64-byte FIFO, XScale
 * UUE bit, FIFO size). Returns the type Linux would settle on.
 */
function linuxAutoconfig(io: Io): string {
  const { inb, outb } = io;
  // IER scratch test.
  const ier0 = inb(UART.IER);
  outb(UART.IER, 0);
  const s2 = inb(UART.IER) & 0x0f;
  outb(UART.IER, 0x0f);
  const s3 = inb(UART.IER) & 0x0f;
  outb(UART.IER, ier0);
  if (s2 !== 0 || s3 !== 0x0f) return "none (IER test)";
  const saveMcr = inb(UART.MCR);
  const saveLcr = inb(UART.LCR);
  // Loopback test: RTS and OUT2 looped back to CTS and DCD.
  outb(UART.MCR, 0x10 | 0x0a);
  const msr = inb(UART.MSR) & 0xf0;
  outb(UART.MCR, saveMcr);
  if (msr !== 0x90) return `none (loopback ${msr.toString(16)})`;
  // EFR (offset 2 with LCR=0xBF) cleared, then FIFO detection through IIR bits 7:6.
  outb(UART.LCR, 0xbf);
  outb(2, 0);
  outb(UART.LCR, 0);
  outb(UART.FCR, 0x01);
  const fifoBits = inb(UART.IIR) >> 6;
  let type: string;
  if (fifoBits === 0) type = "16450";
  else if (fifoBits === 1) type = "unknown";
  else if (fifoBits === 2) type = "16550";
  else type = refine16550a(io);
  outb(UART.LCR, saveLcr);
  outb(UART.MCR, saveMcr);
  // Clear FIFOs, read RX, IER off.
  outb(UART.FCR, 0x01);
  outb(UART.FCR, 0x07);
  outb(UART.FCR, 0);
  inb(UART.RBR);
  outb(UART.IER, 0);
  return type;
}

function refine16550a(io: Io): string {
  const { inb, outb } = io;
  // EFR present with DLAB set? (reads IIR on a 16550A, which is never 0 with FIFOs on)
  outb(UART.LCR, 0x80);
  if (inb(2) === 0) return "16650";
  outb(UART.LCR, 0xbf);
  if (inb(2) === 0) return "16650V2/16C950";
  // NatSemi bank switch: IIR bit 4 must not follow MCR's LOOP bit.
  outb(UART.LCR, 0);
  const mcr = inb(UART.MCR);
  outb(UART.LCR, 0xe0);
  let st = inb(2);
  if (!((st ^ mcr) & 0x10)) {
    outb(UART.LCR, 0);
    outb(UART.MCR, mcr ^ 0x10);
    outb(UART.LCR, 0xe0);
    st = inb(2);
    outb(UART.LCR, 0);
    outb(UART.MCR, mcr);
    if ((st ^ mcr) & 0x10) return "NS16550A";
  }
  // 16750: IIR bit 5 when the 64-byte FIFO is enabled with DLAB set.
  outb(UART.LCR, 0);
  outb(UART.FCR, 0x21);
  const a = inb(UART.IIR) >> 5;
  outb(UART.FCR, 0x01);
  outb(UART.LCR, 0x80);
  outb(UART.FCR, 0x21);
  const b = inb(UART.IIR) >> 5;
  outb(UART.FCR, 0x01);
  outb(UART.LCR, 0);
  if (a === 6 && b === 7) return "16750";
  // XScale: IER bit 6 (UUE) must not stick.
  const ier = inb(UART.IER);
  outb(UART.IER, ier & ~0x40);
  if (!(inb(UART.IER) & 0x40)) {
    outb(UART.IER, ier | 0x40);
    if (inb(UART.IER) & 0x40) return "XScale";
  }
  outb(UART.IER, ier);
  return sizeFifo(io) === 64 ? "U6_16550A" : "16550A";
}

/** Linux's size_fifo: loop 256 bytes back with FIFOs on and count what can be read. */
function sizeFifo(io: Io): number {
  const { inb, outb } = io;
  const lcr = inb(UART.LCR);
  outb(UART.LCR, 0);
  const fcr = inb(UART.IIR);
  const mcr = inb(UART.MCR);
  outb(UART.FCR, 0x07);
  outb(UART.MCR, 0x10);
  outb(UART.LCR, 0x80);
  const dl = inb(UART.DLL) | (inb(UART.DLM) << 8);
  outb(UART.DLL, 1);
  outb(UART.DLM, 0);
  outb(UART.LCR, 0x03);
  for (let i = 0; i < 256; i++) outb(UART.THR, i);
  let count = 0;
  while (inb(UART.LSR) & 0x01 && count < 256) {
    inb(UART.RBR);
    count++;
  }
  outb(UART.FCR, fcr);
  outb(UART.MCR, mcr);
  outb(UART.LCR, 0x80);
  outb(UART.DLL, dl & 0xff);
  outb(UART.DLM, dl >> 8);
  outb(UART.LCR, lcr);
  return count;
}

Deno.test("serial: reset state", () => {
  const u = uart();
  assert.equal(u.inb(UART.IER), 0);
  assert.equal(u.inb(UART.IIR), 0x01);
  assert.equal(u.inb(UART.LCR), 0);
  assert.equal(u.inb(UART.MCR), 0);
  assert.equal(u.inb(UART.LSR), 0x60);
  assert.equal(u.inb(UART.MSR), 0xb0);
  assert.equal(u.inb(UART.SCR), 0);
  assert.deepEqual(u.irq, []);
});

Deno.test("serial: Linux's autoconfig probe identifies a 16550A with a 16-byte FIFO", () => {
  const u = uart();
  assert.equal(linuxAutoconfig(u), "16550A");
  assert.equal(sizeFifo(u), 16);
  // The probe left the port quiet: nothing sent to the host, no interrupt, no stale data.
  assert.deepEqual(u.out, []);
  assert.deepEqual(u.irq, []);
  assert.equal(u.inb(UART.LSR) & 0x01, 0);
  assert.equal(u.inb(UART.MCR), 0);
  assert.equal(u.inb(UART.LCR), 0);
});

Deno.test("serial: Linux's start-up THRE and TX-enable tests find no bugs", () => {
  const u = uart();
  // THRE re-assertion test (UART_BUG_THRE when not re-raised).
  assert.ok(u.inb(UART.LSR) & 0x20);
  u.outb(UART.IER, 0x02);
  const iir1 = u.inb(UART.IIR);
  u.outb(UART.IER, 0);
  u.outb(UART.IER, 0x02);
  const iir2 = u.inb(UART.IIR);
  u.outb(UART.IER, 0);
  assert.equal(iir1 & 0x01, 0, "THRE raised when ETBEI is enabled");
  assert.equal(iir2 & 0x01, 0, "THRE re-raised after IER was toggled (else UART_BUG_THRE)");
  assert.equal(iir2 & 0x0f, 0x02);
  // TX-enable test (UART_BUG_TXEN when LSR says empty but IIR shows nothing).
  u.outb(UART.LCR, 0x03);
  u.outb(UART.MCR, 0x0b);
  u.outb(UART.IER, 0x02);
  const lsr = u.inb(UART.LSR);
  const iir = u.inb(UART.IIR);
  u.outb(UART.IER, 0);
  assert.ok(!(lsr & 0x40 && iir & 0x01), "no UART_BUG_TXEN");
});

Deno.test("serial: DLAB switches offsets 0 and 1 to the divisor latch", () => {
  const u = uart();
  u.outb(UART.IER, 0x05);
  u.outb(UART.LCR, 0x83);
  assert.equal(u.inb(UART.DLL), 12, "default divisor 12 (9600 baud)");
  u.outb(UART.DLL, 0x01);
  u.outb(UART.DLM, 0x02);
  assert.equal(u.inb(UART.DLL), 0x01);
  assert.equal(u.inb(UART.DLM), 0x02);
  assert.deepEqual(u.out, [], "DLL writes are not transmitted");
  assert.equal(u.inb(UART.LCR), 0x83);
  u.outb(UART.LCR, 0x03);
  assert.equal(u.inb(UART.IER), 0x05, "IER untouched by DLM writes");
  u.outb(UART.THR, 0x0a);
  assert.deepEqual(u.out, [0x0a]);
});

Deno.test("serial: FCR enables 16-byte FIFOs (IIR 0xC0), ignores the 16750 bit, clears RX", () => {
  const u = uart();
  assert.equal(u.inb(UART.IIR) & 0xc0, 0);
  u.outb(UART.FCR, 0x01);
  assert.equal(u.inb(UART.IIR), 0xc1);
  u.outb(UART.FCR, 0x21);
  assert.equal(u.inb(UART.IIR), 0xc1, "no 64-byte FIFO bit");
  // Loopback fills the FIFO with exactly 16 bytes, then overruns.
  u.outb(UART.MCR, 0x10);
  for (let i = 0; i < 20; i++) u.outb(UART.THR, 0x40 + i);
  assert.equal(u.inb(UART.LSR), 0x63, "DR | OE | THRE | TEMT");
  assert.equal(u.inb(UART.LSR), 0x61, "OE cleared by reading LSR");
  assert.equal(u.s.stats().overruns, 4);
  const got: number[] = [];
  while (u.inb(UART.LSR) & 0x01) got.push(u.inb(UART.RBR));
  assert.deepEqual(got, Array.from({ length: 16 }, (_, i) => 0x40 + i));
  // FCR bit 1 clears the receive FIFO.
  u.outb(UART.THR, 1);
  u.outb(UART.THR, 2);
  u.outb(UART.FCR, 0x03);
  assert.equal(u.inb(UART.LSR) & 0x01, 0);
  // Without FIFOs the receiver holds one byte.
  u.outb(UART.FCR, 0x00);
  assert.equal(u.inb(UART.IIR), 0x01);
  u.outb(UART.THR, 7);
  u.outb(UART.THR, 8);
  assert.equal(u.inb(UART.LSR) & 0x03, 0x03);
  assert.equal(u.inb(UART.RBR), 7);
});

Deno.test("serial: interrupt priority and IIR values", () => {
  const u = uart();
  u.outb(UART.FCR, 0x01); // trigger level 1
  u.outb(UART.MCR, 0x10); // loopback: makes every source reachable (the IRQ pin itself stays off)
  u.outb(UART.MCR, 0x1a); // RTS+OUT2 in loopback → CTS/DCD change → modem status deltas
  u.outb(UART.IER, 0x0f);
  for (let i = 0; i < 17; i++) u.outb(UART.THR, i); // 16 in the FIFO, one overrun
  assert.equal(u.inb(UART.IIR), 0xc6, "receiver line status first");
  assert.equal(u.inb(UART.IIR), 0xc6, "until LSR is read");
  u.inb(UART.LSR);
  assert.equal(u.inb(UART.IIR), 0xc4, "then received data");
  for (let i = 0; i < 16; i++) u.inb(UART.RBR);
  assert.equal(u.inb(UART.IIR), 0xc2, "then THR empty");
  assert.equal(u.inb(UART.IIR), 0xc0, "reading IIR cleared THRE; modem status remains");
  const msr = u.inb(UART.MSR);
  assert.equal(msr & 0xf0, 0x90);
  assert.notEqual(msr & 0x0f, 0);
  assert.equal(u.inb(UART.MSR) & 0x0f, 0, "deltas clear on read");
  assert.equal(u.inb(UART.IIR), 0xc1);
  assert.deepEqual(u.irq, [], "no IRQ while in loopback");
  assert.deepEqual(u.out, [], "loopback output does not reach the host");
});

Deno.test("serial: character-timeout id below the trigger level, data-available at or above it", () => {
  const u = uart();
  u.outb(UART.FCR, 0x81); // trigger 8
  u.outb(UART.IER, 0x01);
  u.s.enqueueInput(enc.encode("abc"));
  assert.equal(u.inb(UART.IIR), 0xcc);
  u.s.enqueueInput(enc.encode("defgh"));
  assert.equal(u.inb(UART.IIR), 0xc4);
});

Deno.test("serial: RX with interrupts: OUT2 gates the line, reading drains it", () => {
  const u = uart();
  u.outb(UART.FCR, 0x01);
  u.outb(UART.IER, 0x01);
  assert.equal(u.s.enqueueInput(enc.encode("hi")), 2);
  assert.deepEqual(u.irq, [], "OUT2 clear: the PC's IRQ buffer is off");
  u.outb(UART.MCR, 0x0b); // DTR RTS OUT2
  assert.deepEqual(u.irq, [true]);
  assert.equal(u.inb(UART.IIR), 0xc4);
  assert.equal(u.inb(UART.LSR) & 0x01, 1);
  assert.equal(u.inb(UART.RBR), 0x68);
  assert.deepEqual(u.irq, [true]);
  assert.equal(u.inb(UART.RBR), 0x69);
  assert.deepEqual(u.irq, [true, false]);
  assert.equal(u.inb(UART.LSR), 0x60);
  assert.equal(u.inb(UART.IIR), 0xc1);
});

Deno.test("serial: host input larger than the FIFO arrives complete and in order", () => {
  const u = uart({ hostQueueBytes: 1024 });
  u.outb(UART.FCR, 0x01);
  const input = Uint8Array.from({ length: 1000 }, (_, i) => (i * 7) & 0xff);
  assert.equal(u.s.enqueueInput(input), 1000);
  const got: number[] = [];
  while (u.inb(UART.LSR) & 0x01) got.push(u.inb(UART.RBR));
  assert.deepEqual(got, [...input]);
  assert.equal(u.s.stats().rxBytes, 1000);
  assert.equal(u.s.stats().overruns, 0);
});

Deno.test("serial: the host queue bounds input; what does not fit is refused, not corrupted", () => {
  const u = uart({ hostQueueBytes: 32 });
  u.outb(UART.FCR, 0x01);
  const input = Uint8Array.from({ length: 100 }, (_, i) => i);
  const took = u.s.enqueueInput(input);
  assert.equal(took, 32);
  assert.equal(u.s.stats().inputRefused, 68);
  // The FIFO took 16 of them, so there is room again.
  assert.equal(u.s.inputSpace, 16);
  assert.equal(u.s.enqueueInput(input.subarray(took)), 16);
  const got: number[] = [];
  while (u.inb(UART.LSR) & 0x01) got.push(u.inb(UART.RBR));
  assert.deepEqual(got, [...input.subarray(0, 48)]);
});

Deno.test("serial: loopback routes TX to RX and MCR outputs to MSR inputs", () => {
  const u = uart();
  u.outb(UART.MCR, 0x10);
  assert.equal(u.inb(UART.MSR) & 0xf0, 0x00);
  u.outb(UART.MCR, 0x1f);
  assert.equal(u.inb(UART.MSR) & 0xf0, 0xf0);
  u.outb(UART.MCR, 0x11); // DTR only
  assert.equal(u.inb(UART.MSR), 0x20 | 0x01 | 0x04 | 0x08, "DSR, with CTS/RI(trailing)/DCD deltas");
  u.outb(UART.THR, 0x55);
  assert.equal(u.inb(UART.RBR), 0x55);
  // Host input waits while in loopback and arrives afterwards.
  u.s.enqueueInput(enc.encode("x"));
  assert.equal(u.inb(UART.LSR) & 0x01, 0);
  u.outb(UART.MCR, 0x00);
  assert.equal(u.inb(UART.MSR) & 0xf0, 0xb0, "CTS, DSR, DCD asserted outside loopback");
  assert.equal(u.inb(UART.RBR), 0x78);
  assert.deepEqual(u.out, []);
});

Deno.test("serial: modem status interrupt", () => {
  const u = uart();
  u.outb(UART.IER, 0x08);
  u.outb(UART.MCR, 0x18); // loopback with OUT2 → DCD rises
  assert.equal(u.inb(UART.IIR), 0x00);
  u.inb(UART.MSR);
  assert.equal(u.inb(UART.IIR), 0x01);
});

Deno.test("serial: THRE re-arms after every THR write and on the ETBEI edge; IRQ follows", () => {
  const u = uart({ txBatch: 1 });
  u.outb(UART.MCR, 0x08);
  u.outb(UART.IER, 0x02);
  assert.deepEqual(u.irq, [true]);
  assert.equal(u.inb(UART.IIR), 0x02);
  assert.deepEqual(u.irq, [true, false]);
  u.outb(UART.THR, 0x41); // the interrupt handler's write: THR empties at once → THRE again
  assert.deepEqual(u.irq, [true, false, true]);
  u.outb(UART.THR, 0x42); // written without reading IIR: the line still drops and rises (an edge)
  assert.deepEqual(u.irq, [true, false, true, false, true]);
  assert.equal(u.inb(UART.IIR), 0x02);
  u.irq.length = 0;
  u.outb(UART.IER, 0x00); // stop_tx
  u.outb(UART.IER, 0x02); // start_tx: 0 → 1 edge raises THRE although IIR was read
  assert.deepEqual(u.irq, [true]);
  u.outb(UART.IER, 0x02); // writing it again (no edge) changes nothing
  assert.equal(u.inb(UART.IIR), 0x02);
  assert.equal(u.inb(UART.IIR), 0x01);
  assert.equal(u.text(), "AB");
  // Another pending source keeps the line up across a THR write (no edge is lost: it never fell).
  u.s.enqueueInput(new Uint8Array([1]));
  u.outb(UART.IER, 0x03);
  u.irq.length = 0;
  u.outb(UART.THR, 0x43);
  assert.deepEqual(u.irq, [], "no change reported");
});

Deno.test("serial: output is batched, flushed on newline, batch size, ETBEI off and flush()", () => {
  const u = uart({ txBatch: 8 });
  for (const c of enc.encode("ab")) u.outb(UART.THR, c);
  assert.equal(u.text(), "");
  assert.equal(u.s.pendingOutput, 2);
  u.outb(UART.THR, 0x0a);
  assert.equal(u.text(), "ab\n");
  for (const c of enc.encode("0123456789")) u.outb(UART.THR, c);
  assert.equal(u.text(), "ab\n01234567", "a full batch is written");
  u.s.flush();
  assert.equal(u.text(), "ab\n0123456789");
  u.outb(UART.IER, 0x02);
  u.outb(UART.THR, 0x7a);
  u.outb(UART.IER, 0x00);
  assert.equal(u.text(), "ab\n0123456789z", "TX queue ran dry");
  assert.deepEqual(u.writes, [3, 8, 2, 1]);
  assert.equal(u.s.stats().txBytes, 14);
});

Deno.test("serial: every byte written reaches the sink, in order, with any batch size", () => {
  for (const batch of [1, 3, 64, 256]) {
    const u = uart({ txBatch: batch });
    const data = Uint8Array.from({ length: 5000 }, (_, i) => (i * 31 + (i >> 8)) & 0xff);
    for (const b of data) u.outb(UART.THR, b);
    u.s.flush();
    assert.deepEqual(u.out, [...data], `batch ${batch}`);
  }
});

Deno.test("serial: scratch register and read-only LSR/MSR", () => {
  const u = uart();
  u.outb(UART.SCR, 0xa5);
  assert.equal(u.inb(UART.SCR), 0xa5);
  u.outb(UART.LSR, 0x00);
  u.outb(UART.MSR, 0x00);
  assert.equal(u.inb(UART.LSR), 0x60);
  assert.equal(u.inb(UART.MSR), 0xb0);
});

Deno.test("serial: descriptor is structured-cloneable and instances share state", () => {
  const d = Serial16550.createDescriptor();
  const clone = structuredClone(d);
  assert.equal(clone.sab, clone.sab);
  const out: number[] = [];
  const a = new Serial16550(d, { irq: { set() {} }, out: { write: (b) => out.push(...b) } });
  const b = new Serial16550(clone, { irq: { set() {} }, out: { write: (b) => out.push(...b) } });
  a.pioWrite(UART.SCR, 1, 0x42);
  assert.equal(b.pioRead(UART.SCR, 1), 0x42);
  a.pioWrite(UART.THR, 1, 0x31);
  b.pioWrite(UART.THR, 1, 0x32);
  a.flush();
  assert.deepEqual(out, [0x31, 0x32]);
  assert.throws(() => Serial16550.createDescriptor({ txBatch: 0 }), RangeError);
});
