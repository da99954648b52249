/**
 * The PC keyboard controller (i8042) at ports 0x60 (data) and 0x64 (status / command), with no
 * keyboard and no mouse attached. Its jobs here: the CPU reset line, and answering the controller
 * commands a guest (Linux probing the ports directly, firmware) sends, promptly, so that nothing waits
 * for a timeout.
 *
 * - Controller commands are answered through the output buffer: read/write the command byte
 *   (0x20/0x60 and the rest of the 0x20-0x3f / 0x60-0x7f RAM), self-test 0xAA → 0x55, interface tests
 *   0xAB / 0xA9 → 0x00, port enable/disable (0xAD/0xAE, 0xA7/0xA8, reflected in the command byte),
 *   input/output port (0xC0, 0xD0, 0xD1), write-to-output-buffer (0xD2/0xD3), A20 (0xDD/0xDF).
 * - CPU reset: command 0xFE (any 0xF0-0xFF pulse with bit 0 clear), or writing the output port with
 *   bit 0 clear → VmEventSink.request("reboot").
 * - Bytes for a device (data port writes, 0xD4 for the mouse) get no device answer: the controller
 *   reports a timeout (status bit 6) with 0xFF in the output buffer, as an AT controller does when
 *   nothing is connected.
 *
 * The input buffer is never full (status bit 1 stays clear): commands take effect at once. The
 * optional IRQ 1 / IRQ 12 lines follow "output buffer full with keyboard / mouse data and the
 * matching interrupt enabled in the command byte".
 *
 * With a hardware-reduced ACPI FADT (no 8042 boot flag) Linux does not probe this controller at all
 * ("i8042: PNP: No PS/2 controller found."); the reset command still works for `reboot=k`.
 */
import { checkSab, EventSource, type IrqLine, SabLayout, SharedLock, type VmEventSink } from "./shared.ts";

/** Status register bits. */
export const I8042_STR = {
  OBF: 0x01,
  IBF: 0x02,
  SYS: 0x04,
  CMD: 0x08,
  UNLOCKED: 0x10,
  AUXDATA: 0x20,
  TIMEOUT: 0x40,
} as const;

/** Command byte (controller RAM 0) bits. */
export const I8042_CTR = {
  KBDINT: 0x01,
  AUXINT: 0x02,
  SYS: 0x04,
  KBDDIS: 0x10,
  AUXDIS: 0x20,
  XLATE: 0x40,
} as const;

const DATA = 0; // offsets within the two registered ports (0x60 and 0x64 are separate ranges)

// Int32 word indices.
const LOCK = 0; // SharedLock.WORDS slots
const PENDING = 3; // controller command waiting for its data byte, 0 = none
const LASTCMD = 4; // 1 when the last write went to the command port (status bit 3)
const OUTPORT = 5;
const QH = 6;
const QN = 7;
const LAST = 8; // last byte read from the data port (re-read when empty)
const LVL_KBD = 9;
const LVL_AUX = 10;
const ST_RESETS = 11;
const Q0 = 12; // output queue entries: byte | AUX << 8 | TIMEOUT << 9
const QCAP = 8;
const RAM0 = Q0 + QCAP; // 32 bytes of controller RAM, one per word; RAM[0] is the command byte
const WORDS = RAM0 + 32;

const F_AUX = 0x100;
const F_TIMEOUT = 0x200;

const layout = new SabLayout();
const OFF_WORDS = layout.words(WORDS);

export interface I8042Descriptor {
  kind: "i8042";
  sab: SharedArrayBuffer;
  /** Data port (default 0x60). */
  dataPort: number;
  /** Status/command port (default 0x64). */
  commandPort: number;
}

export interface I8042Deps {
  events: VmEventSink;
  /** IRQ 1 (keyboard data), optional. */
  kbdIrq?: IrqLine;
  /** IRQ 12 (mouse data), optional. */
  auxIrq?: IrqLine;
}

/** The i8042 controller; register `data` at dataPort and `command` at commandPort (1 byte each). */
export class I8042 {
  static createDescriptor(p: { dataPort?: number; commandPort?: number } = {}): I8042Descriptor {
    const sab = new SharedArrayBuffer(layout.byteLength);
    const w = new Int32Array(sab, OFF_WORDS, WORDS);
    // What firmware leaves behind: keyboard interrupt on, system flag set, scancode translation.
    w[RAM0] = I8042_CTR.KBDINT | I8042_CTR.SYS | I8042_CTR.XLATE;
    w[OUTPORT] = 0x03; // reset line inactive (bit 0 high), A20 enabled (bit 1)
    return { kind: "i8042", sab, dataPort: p.dataPort ?? 0x60, commandPort: p.commandPort ?? 0x64 };
  }

  readonly dataPort: number;
  readonly commandPort: number;
  readonly #w: Int32Array;
  readonly #lock: SharedLock;
  readonly #deps: I8042Deps;
  /** The data port as a bus device. */
  readonly data: { pioRead(o: number, s: number): number; pioWrite(o: number, s: number, v: number): void };
  /** The status/command port as a bus device. */
  readonly command: {
    pioRead(o: number, s: number): number;
    pioWrite(o: number, s: number, v: number): void;
  };

  constructor(desc: I8042Descriptor, deps: I8042Deps) {
    const sab = checkSab(desc.sab, layout.byteLength, "i8042");
    this.dataPort = desc.dataPort;
    this.commandPort = desc.commandPort;
    this.#w = new Int32Array(sab, OFF_WORDS, WORDS);
    this.#lock = new SharedLock(this.#w, LOCK);
    this.#deps = deps;
    this.data = {
      pioRead: (o) => o === DATA ? this.readData() : 0xff,
      pioWrite: (o, _s, v) => {
        if (o === DATA) this.writeData(v & 0xff);
      },
    };
    this.command = {
      pioRead: (o) => o === 0 ? this.readStatus() : 0xff,
      pioWrite: (o, _s, v) => {
        if (o === 0) this.writeCommand(v & 0xff);
      },
    };
  }

  readStatus(): number {
    const w = this.#w;
    this.#lock.lock();
    try {
      let s = I8042_STR.UNLOCKED | (w[RAM0] & I8042_CTR.SYS ? I8042_STR.SYS : 0) |
        (w[LASTCMD] ? I8042_STR.CMD : 0);
      if (w[QN] > 0) {
        const e = w[Q0 + w[QH]];
        s |= I8042_STR.OBF | (e & F_AUX ? I8042_STR.AUXDATA : 0) | (e & F_TIMEOUT ? I8042_STR.TIMEOUT : 0);
      }
      return s;
    } finally {
      this.#lock.unlock();
    }
  }

  readData(): number {
    const w = this.#w;
    this.#lock.lock();
    try {
      if (w[QN] > 0) {
        w[LAST] = w[Q0 + w[QH]] & 0xff;
        w[QH] = (w[QH] + 1) % QCAP;
        w[QN]--;
        this.#updateIrqs();
      }
      return w[LAST];
    } finally {
      this.#lock.unlock();
    }
  }

  writeData(v: number): void {
    const w = this.#w;
    this.#lock.lock();
    try {
      w[LASTCMD] = 0;
      const cmd = w[PENDING];
      w[PENDING] = 0;
      if (cmd >= 0x60 && cmd <= 0x7f) w[RAM0 + cmd - 0x60] = v;
      else if (cmd === 0xd1) this.#writeOutputPort(v);
      else if (cmd === 0xd2) this.#push(v);
      else if (cmd === 0xd3) this.#push(v | F_AUX);
      else if (cmd === 0xd4) this.#push(0xff | F_AUX | F_TIMEOUT); // no mouse
      else this.#push(0xff | F_TIMEOUT); // no keyboard
      this.#updateIrqs();
    } finally {
      this.#lock.unlock();
    }
  }

  writeCommand(c: number): void {
    const w = this.#w;
    this.#lock.lock();
    try {
      w[LASTCMD] = 1;
      w[PENDING] = 0;
      if (c >= 0x20 && c <= 0x3f) this.#push(w[RAM0 + c - 0x20]);
      else if (c >= 0x60 && c <= 0x7f) w[PENDING] = c;
      else if (c >= 0xf0) {
        if (!(c & 1)) this.#reset(); // pulse output port bit 0 (the CPU reset line)
      } else {
        switch (c) {
          case 0xa7:
            w[RAM0] |= I8042_CTR.AUXDIS;
            break;
          case 0xa8:
            w[RAM0] &= ~I8042_CTR.AUXDIS;
            break;
          case 0xa9: // mouse interface test: no error
          case 0xab: // keyboard interface test: no error
            this.#push(0x00);
            break;
          case 0xaa: // controller self-test
            w[RAM0] |= I8042_CTR.SYS;
            this.#push(0x55);
            break;
          case 0xad:
            w[RAM0] |= I8042_CTR.KBDDIS;
            break;
          case 0xae:
            w[RAM0] &= ~I8042_CTR.KBDDIS;
            break;
          case 0xc0: // input port: keyboard not inhibited
            this.#push(0x80);
            break;
          case 0xd0:
            this.#push(w[OUTPORT]);
            break;
          case 0xd1:
          case 0xd2:
          case 0xd3:
          case 0xd4:
            w[PENDING] = c;
            break;
          case 0xdd:
            w[OUTPORT] &= ~0x02;
            break;
          case 0xdf:
            w[OUTPORT] |= 0x02;
            break;
        }
      }
      this.#updateIrqs();
    } finally {
      this.#lock.unlock();
    }
  }

  /** How many times the guest pulled the reset line. */
  get resets(): number {
    return Atomics.load(this.#w, ST_RESETS);
  }

  #writeOutputPort(v: number): void {
    this.#w[OUTPORT] = v | 0x01;
    if (!(v & 1)) this.#reset();
  }

  #reset(): void {
    this.#w[ST_RESETS]++;
    this.#deps.events.request("reboot", EventSource.KeyboardController);
  }

  #push(entry: number): void {
    const w = this.#w;
    if (w[QN] >= QCAP) return;
    w[Q0 + (w[QH] + w[QN]) % QCAP] = entry;
    w[QN]++;
  }

  #updateIrqs(): void {
    const w = this.#w;
    let kbd = 0;
    let aux = 0;
    if (w[QN] > 0) {
      const e = w[Q0 + w[QH]];
      if (e & F_AUX) aux = w[RAM0] & I8042_CTR.AUXINT ? 1 : 0;
      else kbd = w[RAM0] & I8042_CTR.KBDINT ? 1 : 0;
    }
    if (kbd !== w[LVL_KBD]) {
      w[LVL_KBD] = kbd;
      this.#deps.kbdIrq?.set(kbd === 1);
    }
    if (aux !== w[LVL_AUX]) {
      w[LVL_AUX] = aux;
      this.#deps.auxIrq?.set(aux === 1);
    }
  }
}
