/**
 * MC146818-compatible RTC and CMOS RAM at ports 0x70 (index) and 0x71 (data).
 *
 * - Port 0x70: bits 6:0 select one of 128 registers; bit 7 is the chipset's NMI mask, kept and
 *   readable but without effect (NMIs are not gated by it here).
 * - Time registers (0-9, century at 0x32) read the host clock (UTC) plus an offset the guest can change
 *   by writing them. Register B picks BCD or binary (DM, bit 2) and 24 or 12 hour (bit 1, PM in bit 7
 *   of the hour). While B's SET bit (7) is on, the time registers are plain RAM holding the time being
 *   set (frozen at the moment SET was raised); clearing SET starts the clock from them. A field
 *   written with SET clear changes the running clock at once.
 * - Register A reads with UIP clear and the usual 32.768 kHz divider / 1024 Hz rate; C reads 0 (no
 *   interrupt flags: the RTC interrupt is not wired); D reads 0x80 (RAM and time valid).
 * - NVRAM: the other 114 bytes, including the memory size registers filled at construction:
 *   0x15/0x16 base memory in KiB, 0x17/0x18 and 0x30/0x31 memory above 1 MiB in KiB (at most 63 MiB),
 *   0x34/0x35 memory above 16 MiB in 64 KiB units, 0x5b-0x5d memory above 4 GiB in 64 KiB units, and
 *   0x5f the CPU count minus one; 0x2e/0x2f hold the checksum of 0x10-0x2d.
 */
import { checkSab, SabLayout, SharedLock } from "./shared.ts";

/** Register indices. */
export const RTC = {
  SECONDS: 0x00,
  SECONDS_ALARM: 0x01,
  MINUTES: 0x02,
  MINUTES_ALARM: 0x03,
  HOURS: 0x04,
  HOURS_ALARM: 0x05,
  DAY_OF_WEEK: 0x06,
  DAY_OF_MONTH: 0x07,
  MONTH: 0x08,
  YEAR: 0x09,
  REG_A: 0x0a,
  REG_B: 0x0b,
  REG_C: 0x0c,
  REG_D: 0x0d,
  CENTURY: 0x32,
} as const;

const B_SET = 0x80;
const B_DM_BINARY = 0x04;
const B_24H = 0x02;
const REG_A_DEFAULT = 0x26; // divider 010 (32.768 kHz), rate 0110 (1024 Hz)
const TIME_REGS = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32];

// Int32 word indices.
const LOCK = 0; // SharedLock.WORDS slots
const INDEX = 3; // last value written to port 0x70 (index | NMI mask)
const WORDS = 4;

const layout = new SabLayout();
const OFF_WORDS = layout.words(WORDS);
const OFF_TIME = layout.f64(1); // offset of the guest's clock from the host clock, in ms
const OFF_RAM = layout.bytes(128);

export interface CmosDescriptor {
  kind: "cmos";
  sab: SharedArrayBuffer;
  /** Index port (the data port follows it). */
  base: number;
}

export interface CmosParams {
  base?: number;
  /** Bytes of RAM below 4 GiB (from address 0). */
  lowMemBytes: number;
  /** Bytes of RAM above 4 GiB. */
  highMemBytes?: number;
  cpus?: number;
  /** Initial clock offset from the host's UTC time, in milliseconds (default 0). */
  clockOffsetMs?: number;
}

export interface CmosDeps {
  /** Clock source in ms since the epoch (tests); defaults to Date.now. */
  now?: () => number;
}

const KiB = 1024;
const MiB = 1024 * KiB;

function toBcd(v: number): number {
  return ((v / 10) | 0) * 16 + (v % 10);
}

function fromBcd(v: number): number {
  return (v >> 4) * 10 + (v & 0x0f);
}

/** The RTC/CMOS; registered on two ports (index, data). */
export class Cmos {
  static createDescriptor(p: CmosParams): CmosDescriptor {
    const sab = new SharedArrayBuffer(layout.byteLength);
    new Float64Array(sab, OFF_TIME, 1)[0] = p.clockOffsetMs ?? 0;
    const ram = new Uint8Array(sab, OFF_RAM, 128);
    ram[RTC.REG_A] = REG_A_DEFAULT;
    ram[RTC.REG_B] = B_24H;
    ram[RTC.REG_D] = 0x80;
    const low = p.lowMemBytes;
    const high = p.highMemBytes ?? 0;
    const put16 = (i: number, v: number) => {
      ram[i] = v & 0xff;
      ram[i + 1] = (v >> 8) & 0xff;
    };
    put16(0x15, 640);
    const ext = Math.min(Math.max(low - MiB, 0) / KiB, 0xfc00) | 0;
    put16(0x17, ext);
    put16(0x30, ext);
    put16(0x34, Math.min(Math.max(low - 16 * MiB, 0) / (64 * KiB), 0xffff) | 0);
    const above4g = Math.min(Math.floor(high / (64 * KiB)), 0xffffff);
    ram[0x5b] = above4g & 0xff;
    ram[0x5c] = (above4g >> 8) & 0xff;
    ram[0x5d] = (above4g >> 16) & 0xff;
    ram[0x5f] = Math.max((p.cpus ?? 1) - 1, 0) & 0xff;
    let sum = 0;
    for (let i = 0x10; i <= 0x2d; i++) sum += ram[i];
    ram[0x2e] = (sum >> 8) & 0xff;
    ram[0x2f] = sum & 0xff;
    return { kind: "cmos", sab, base: p.base ?? 0x70 };
  }

  readonly base: number;
  readonly #w: Int32Array;
  readonly #offset: Float64Array;
  readonly #ram: Uint8Array;
  readonly #lock: SharedLock;
  readonly #now: () => number;
  readonly #date = new Date(0);

  constructor(desc: CmosDescriptor, deps: CmosDeps = {}) {
    const sab = checkSab(desc.sab, layout.byteLength, "cmos");
    this.base = desc.base;
    this.#w = new Int32Array(sab, OFF_WORDS, WORDS);
    this.#offset = new Float64Array(sab, OFF_TIME, 1);
    this.#ram = new Uint8Array(sab, OFF_RAM, 128);
    this.#lock = new SharedLock(this.#w, LOCK);
    this.#now = deps.now ?? Date.now;
  }

  pioRead(offset: number, _size: number): number {
    this.#lock.lock();
    try {
      if (offset === 0) return this.#w[INDEX];
      return this.#readReg(this.#w[INDEX] & 0x7f);
    } finally {
      this.#lock.unlock();
    }
  }

  pioWrite(offset: number, _size: number, value: number): void {
    const v = value & 0xff;
    this.#lock.lock();
    try {
      if (offset === 0) this.#w[INDEX] = v;
      else this.#writeReg(this.#w[INDEX] & 0x7f, v);
    } finally {
      this.#lock.unlock();
    }
  }

  /** Whether the guest has NMIs masked through port 0x70 bit 7. */
  get nmiMasked(): boolean {
    return (Atomics.load(this.#w, INDEX) & 0x80) !== 0;
  }

  // ---- with the lock held ----

  #frozen(): boolean {
    return (this.#ram[RTC.REG_B] & B_SET) !== 0;
  }

  #encode(v: number): number {
    return this.#ram[RTC.REG_B] & B_DM_BINARY ? v : toBcd(v);
  }

  #decode(v: number): number {
    return this.#ram[RTC.REG_B] & B_DM_BINARY ? v : fromBcd(v);
  }

  #isTime(r: number): boolean {
    return r <= RTC.YEAR && r !== RTC.SECONDS_ALARM && r !== RTC.MINUTES_ALARM && r !== RTC.HOURS_ALARM ||
      r === RTC.CENTURY;
  }

  #readReg(r: number): number {
    const ram = this.#ram;
    if (r === RTC.REG_A) return ram[r] & 0x7f; // UIP never set: reads are always consistent
    if (r === RTC.REG_C) return 0;
    if (r === RTC.REG_D) return 0x80;
    if (!this.#isTime(r) || this.#frozen()) return ram[r];
    return this.#timeField(r, this.#now() + this.#offset[0]);
  }

  #timeField(r: number, ms: number): number {
    const d = this.#date;
    d.setTime(ms);
    switch (r) {
      case RTC.SECONDS:
        return this.#encode(d.getUTCSeconds());
      case RTC.MINUTES:
        return this.#encode(d.getUTCMinutes());
      case RTC.HOURS: {
        const h = d.getUTCHours();
        if (this.#ram[RTC.REG_B] & B_24H) return this.#encode(h);
        return this.#encode(h % 12 === 0 ? 12 : h % 12) | (h >= 12 ? 0x80 : 0);
      }
      case RTC.DAY_OF_WEEK:
        return this.#encode(d.getUTCDay() + 1);
      case RTC.DAY_OF_MONTH:
        return this.#encode(d.getUTCDate());
      case RTC.MONTH:
        return this.#encode(d.getUTCMonth() + 1);
      case RTC.YEAR:
        return this.#encode(d.getUTCFullYear() % 100);
      default: // century
        return this.#encode(Math.floor(d.getUTCFullYear() / 100) % 100);
    }
  }

  #writeReg(r: number, v: number): void {
    const ram = this.#ram;
    if (r === RTC.REG_A) {
      ram[r] = v & 0x7f;
    } else if (r === RTC.REG_B) {
      const was = ram[r];
      if (v & B_SET && !(was & B_SET)) {
        // Freeze: the time registers hold the current time until SET is cleared.
        const now = this.#now() + this.#offset[0];
        for (const t of TIME_REGS) ram[t] = this.#timeField(t, now);
        ram[r] = v;
      } else if (!(v & B_SET) && was & B_SET) {
        ram[r] = v;
        this.#setClock(); // run again from the time that was set (decoded in the new mode)
      } else {
        ram[r] = v;
      }
    } else if (r === RTC.REG_C || r === RTC.REG_D) {
      // read-only
    } else if (!this.#isTime(r) || this.#frozen()) {
      ram[r] = v;
    } else {
      // A single field written while the clock runs: take the current time, change that field.
      const now = this.#now() + this.#offset[0];
      for (const t of TIME_REGS) ram[t] = this.#timeField(t, now);
      ram[r] = v;
      this.#setClock(r === RTC.SECONDS ? 0 : now % 1000);
    }
  }

  /** Sets the clock from the time registers in RAM. */
  #setClock(ms = 0): void {
    const ram = this.#ram;
    const sec = this.#decode(ram[RTC.SECONDS] & 0x7f);
    const min = this.#decode(ram[RTC.MINUTES] & 0x7f);
    const hr = ram[RTC.HOURS];
    const hour = ram[RTC.REG_B] & B_24H
      ? this.#decode(hr & 0x3f)
      : (this.#decode(hr & 0x7f) % 12) + (hr & 0x80 ? 12 : 0);
    const day = this.#decode(ram[RTC.DAY_OF_MONTH]);
    const month = this.#decode(ram[RTC.MONTH]) - 1;
    const year = this.#decode(ram[RTC.CENTURY]) * 100 + this.#decode(ram[RTC.YEAR]);
    const d = this.#date;
    d.setTime(0);
    d.setUTCFullYear(year, month, day);
    d.setUTCHours(hour, min, sec, ms);
    const t = d.getTime();
    if (!Number.isNaN(t)) this.#offset[0] = t - this.#now();
  }
}
