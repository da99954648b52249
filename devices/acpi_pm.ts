/**
 * The hardware-reduced ACPI platform registers the FADT points to, plus the GED event register the
 * DSDT's Generic Event Device reads. All are 8-bit I/O ports inside one claimed block; their positions
 * and values are descriptor parameters (the defaults match `Layout.acpiPm` in vmm/layout.ts, whose
 * field names the params reuse, so the layout object can be passed as is).
 *
 * - Sleep control (FADT SLEEP_CONTROL_REG): a write with SLP_EN (bit 5) and SLP_TYP (bits 4:2) equal
 *   to the \_S5 value → VmEventSink.request("poweroff"). Other sleep types are not supported: they are
 *   counted and WAK_STS is set at once, as if the machine had woken straight away.
 * - Sleep status (FADT SLEEP_STATUS_REG): WAK_STS in bit 7, write 1 to clear.
 * - Reset (FADT RESET_REG): writing the reset value → request("reboot").
 * - GED event status: pending event bits (bit 0 power button); reading returns and clears them, writing
 *   1s clears those bits. The GED interrupt line is high while any event is pending (the DSDT declares
 *   it edge-triggered: the rising edge is what the guest sees).
 * - Other ports of the block read 0 and ignore writes.
 */
import { checkSab, EventSource, type IrqLine, SabLayout, SharedLock, type VmEventSink } from "./shared.ts";

/** GED event bits. */
export const GED_EVENT = { POWER_BUTTON: 0x01 } as const;

const SLP_EN = 0x20;
const WAK_STS = 0x80;

// Int32 word indices.
const LOCK = 0; // SharedLock.WORDS slots
const SLP_STS = 3;
const GED = 4;
const LEVEL = 5;
const ST_POWEROFF = 6;
const ST_RESET = 7;
const ST_OTHER_SLEEP = 8;
const WORDS = 10;

const layout = new SabLayout();
const OFF_WORDS = layout.words(WORDS);

export interface AcpiPmParams {
  sleepControlPort?: number;
  sleepStatusPort?: number;
  resetPort?: number;
  resetValue?: number;
  /** SLP_TYP of \_S5. */
  s5SleepType?: number;
  gedStatusPort?: number;
  /** Size of the claimed block starting at the lowest port (default: just enough for the registers). */
  portCount?: number;
  /** GSI of the GED interrupt (for the lead's wiring; the device only drives the IrqLine). */
  gedGsi?: number;
}

export interface AcpiPmDescriptor {
  kind: "acpi_pm";
  sab: SharedArrayBuffer;
  sleepControlPort: number;
  sleepStatusPort: number;
  resetPort: number;
  resetValue: number;
  s5SleepType: number;
  gedStatusPort: number;
  /** First port of the claimed block and its length. */
  base: number;
  len: number;
  gedGsi: number;
}

export interface AcpiPmDeps {
  events: VmEventSink;
  /** The GED interrupt; optional (no power button events without it). */
  gedIrq?: IrqLine;
}

export class AcpiPm {
  static createDescriptor(p: AcpiPmParams = {}): AcpiPmDescriptor {
    const d = {
      sleepControlPort: p.sleepControlPort ?? 0x600,
      sleepStatusPort: p.sleepStatusPort ?? 0x601,
      resetPort: p.resetPort ?? 0x602,
      resetValue: p.resetValue ?? 0x01,
      s5SleepType: p.s5SleepType ?? 5,
      gedStatusPort: p.gedStatusPort ?? 0x608,
      gedGsi: p.gedGsi ?? 5,
    };
    const ports = [d.sleepControlPort, d.sleepStatusPort, d.resetPort, d.gedStatusPort];
    if (new Set(ports).size !== ports.length) throw new RangeError("acpi_pm: registers share a port");
    const base = Math.min(...ports);
    const len = Math.max(p.portCount ?? 0, Math.max(...ports) - base + 1);
    if (len > 0x100) throw new RangeError("acpi_pm: registers too far apart for one block");
    const sab = new SharedArrayBuffer(layout.byteLength);
    return { kind: "acpi_pm", sab, base, len, ...d };
  }

  readonly #d: AcpiPmDescriptor;
  readonly #w: Int32Array;
  readonly #lock: SharedLock;
  readonly #deps: AcpiPmDeps;
  // Offsets of the registers within the block.
  readonly #ctl: number;
  readonly #sts: number;
  readonly #rst: number;
  readonly #ged: number;

  constructor(desc: AcpiPmDescriptor, deps: AcpiPmDeps) {
    const sab = checkSab(desc.sab, layout.byteLength, "acpi_pm");
    this.#d = desc;
    this.#w = new Int32Array(sab, OFF_WORDS, WORDS);
    this.#lock = new SharedLock(this.#w, LOCK);
    this.#deps = deps;
    this.#ctl = desc.sleepControlPort - desc.base;
    this.#sts = desc.sleepStatusPort - desc.base;
    this.#rst = desc.resetPort - desc.base;
    this.#ged = desc.gedStatusPort - desc.base;
  }

  get base(): number {
    return this.#d.base;
  }
  get len(): number {
    return this.#d.len;
  }

  pioRead(offset: number, _size: number): number {
    const w = this.#w;
    this.#lock.lock();
    try {
      if (offset === this.#sts) return w[SLP_STS];
      if (offset === this.#ged) {
        const v = w[GED];
        w[GED] = 0;
        this.#updateIrq();
        return v;
      }
      return 0;
    } finally {
      this.#lock.unlock();
    }
  }

  pioWrite(offset: number, _size: number, value: number): void {
    const v = value & 0xff;
    const w = this.#w;
    this.#lock.lock();
    try {
      if (offset === this.#ctl) {
        if (v & SLP_EN) {
          if (((v >> 2) & 7) === this.#d.s5SleepType) {
            w[ST_POWEROFF]++;
            this.#deps.events.request("poweroff", EventSource.AcpiSleepControl);
          } else {
            w[ST_OTHER_SLEEP]++;
            w[SLP_STS] |= WAK_STS;
          }
        }
      } else if (offset === this.#sts) {
        w[SLP_STS] &= ~v;
      } else if (offset === this.#rst) {
        if (v === this.#d.resetValue) {
          w[ST_RESET]++;
          this.#deps.events.request("reboot", EventSource.AcpiResetRegister);
        }
      } else if (offset === this.#ged) {
        w[GED] &= ~v;
        this.#updateIrq();
      }
    } finally {
      this.#lock.unlock();
    }
  }

  /** Host side (any thread): raises GED events, e.g. {@link GED_EVENT.POWER_BUTTON}. */
  raiseEvent(bits: number): void {
    this.#lock.lock();
    try {
      this.#w[GED] |= bits & 0xff;
      this.#updateIrq();
    } finally {
      this.#lock.unlock();
    }
  }

  /** Presses the power button: the guest's GED handler notifies \_SB.PWRB. */
  powerButton(): void {
    this.raiseEvent(GED_EVENT.POWER_BUTTON);
  }

  /** Pending GED events (diagnostics). */
  get pendingEvents(): number {
    return Atomics.load(this.#w, GED);
  }

  stats(): { poweroffs: number; resets: number; otherSleeps: number } {
    const w = this.#w;
    return {
      poweroffs: Atomics.load(w, ST_POWEROFF),
      resets: Atomics.load(w, ST_RESET),
      otherSleeps: Atomics.load(w, ST_OTHER_SLEEP),
    };
  }

  #updateIrq(): void {
    const w = this.#w;
    const level = w[GED] !== 0 ? 1 : 0;
    if (level !== w[LEVEL]) {
      w[LEVEL] = level;
      this.#deps.gedIrq?.set(level === 1);
    }
  }
}
