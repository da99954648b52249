/**
 * A 16550A-compatible UART (the PC's COM1: 8 ports at 0x3f8, IRQ 4) over shared state.
 *
 * Register model (offsets from the base):
 *
 * | off | read                     | write                  |
 * | --- | ------------------------ | ---------------------- |
 * | 0   | RBR (DLAB=0) / DLL       | THR (DLAB=0) / DLL     |
 * | 1   | IER (DLAB=0) / DLM       | IER (DLAB=0) / DLM     |
 * | 2   | IIR                      | FCR                    |
 * | 3   | LCR                      | LCR                    |
 * | 4   | MCR                      | MCR                    |
 * | 5   | LSR (clears OE)          | ignored                |
 * | 6   | MSR (clears delta bits)  | ignored                |
 * | 7   | SCR                      | SCR                    |
 *
 * The transmitter is infinitely fast: THR is empty again as soon as it is written, so LSR always has
 * THRE and TEMT, and every THR write re-arms the THRE interrupt (the IRQ line drops and rises again
 * within the write, giving edge-triggered interrupt controllers an edge per byte). Enabling ETBEI (a 0 → 1 edge in IER)
 * while THR is empty raises THRE at once, which is what Linux's 8250 driver checks at start-up and
 * relies on for interrupt-driven transmission.
 *
 * Receive: a 16-byte FIFO (1 byte with FIFOs disabled) that the guest sees, refilled from a larger
 * host-side queue as the guest drains it. Host input is never dropped unless that queue is full
 * ({@link Serial16550.enqueueInput} reports how much it took). In loopback mode (MCR bit 4) the host
 * queue is disconnected and transmitted bytes land in the receive FIFO, overflowing into OE like the
 * real part (Linux sizes the FIFO that way and must find 16, not 64).
 *
 * Interrupt priority: receiver line status (OE) > received data (IIR 0x4, or 0xC "character timeout"
 * while the FIFO holds fewer bytes than the trigger level) > THR empty > modem status. IIR bits 7:6 are
 * 0b11 when FIFOs are enabled (a 16550A; FCR bit 5, the 16750's 64-byte mode, is ignored). The IRQ
 * output is gated by MCR OUT2 as on a PC, and is off in loopback (the OUT2 pin is forced inactive).
 * The line's level is recomputed after every access and reported to the IrqLine on changes.
 *
 * Output ordering and batching: transmitted bytes go into a small buffer in the shared state and are
 * written to the ByteSink, with the lock held, when a newline is sent, when `txBatch` bytes are
 * pending, when the guest clears ETBEI (its TX queue ran dry), and on {@link Serial16550.flush}. All
 * threads append to the same buffer under the same lock, so output is never reordered; nothing is
 * lost as long as someone calls `flush()` now and then (the host should do so every few tens of
 * milliseconds and at shutdown, to push out a trailing partial line such as a prompt written with
 * the console's polled path). `txBatch: 1` writes every byte immediately.
 */
import { type ByteSink, checkSab, type IrqLine, SabLayout, SharedLock } from "./shared.ts";

/** Register offsets. */
export const UART = {
  RBR: 0,
  THR: 0,
  DLL: 0,
  IER: 1,
  DLM: 1,
  IIR: 2,
  FCR: 2,
  LCR: 3,
  MCR: 4,
  LSR: 5,
  MSR: 6,
  SCR: 7,
} as const;

// IER bits.
const IER_RDI = 0x01;
const IER_THRI = 0x02;
const IER_RLSI = 0x04;
const IER_MSI = 0x08;
// IIR values.
const IIR_NONE = 0x01;
const IIR_MSI = 0x00;
const IIR_THRI = 0x02;
const IIR_RDI = 0x04;
const IIR_RLSI = 0x06;
const IIR_TIMEOUT = 0x0c;
const IIR_FIFO = 0xc0;
// FCR bits.
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const FCR_TRIGGER = 0xc0;
// LCR, MCR, LSR, MSR bits.
const LCR_DLAB = 0x80;
const MCR_DTR = 0x01;
const MCR_RTS = 0x02;
const MCR_OUT1 = 0x04;
const MCR_OUT2 = 0x08;
const MCR_LOOP = 0x10;
const LSR_DR = 0x01;
const LSR_OE = 0x02;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const MSR_DCTS = 0x01;
const MSR_DDSR = 0x02;
const MSR_TERI = 0x04;
const MSR_DDCD = 0x08;
const MSR_CTS = 0x10;
const MSR_DSR = 0x20;
const MSR_RI = 0x40;
const MSR_DCD = 0x80;

const FIFO_SIZE = 16;
const TX_CAP = 256;
const TRIGGER_LEVELS = [1, 4, 8, 14];

// Int32 word indices in the shared buffer.
const LOCK = 0; // SharedLock.WORDS slots
const IER = 3;
const LCR = 4;
const MCR = 5;
const LSR = 6; // sticky error bits only (OE); DR/THRE/TEMT are computed
const MSR = 7;
const SCR = 8;
const DLL = 9;
const DLM = 10;
const FCR = 11; // enable bit and trigger bits as last programmed
const THRP = 12; // THR-empty interrupt pending
const LEVEL = 13; // IRQ level last reported
const RXH = 14;
const RXN = 15;
const HQH = 16;
const HQN = 17;
const HQCAP = 18;
const TXN = 19;
const TXBATCH = 20;
const ST_TX = 21;
const ST_RX = 22;
const ST_REFUSED = 23;
const ST_OVERRUN = 24;
const ST_IRQ = 25;
const WORDS = 26;

const layout = new SabLayout();
const OFF_WORDS = layout.words(WORDS);
const OFF_RX = layout.bytes(FIFO_SIZE);
const OFF_TX = layout.bytes(TX_CAP);
const OFF_HQ = layout.bytes(0);

/** What a thread needs to attach to a UART: structured-cloneable. */
export interface SerialDescriptor {
  kind: "serial";
  sab: SharedArrayBuffer;
  /** First I/O port (8 ports). */
  base: number;
  /** The IRQ (GSI) the lead wires the IrqLine to. */
  irq: number;
}

export interface SerialParams {
  base?: number;
  irq?: number;
  /** Host-side receive queue size in bytes (default 4096). */
  hostQueueBytes?: number;
  /** Flush output after this many bytes (1..256, default 64); newlines always flush. */
  txBatch?: number;
}

/** Side-effect handles; all must work from any thread. */
export interface SerialDeps {
  irq: IrqLine;
  out: ByteSink;
  /**
   * Told when the guest enables or disables the THR-empty interrupt (IER bit 1), under the port's lock:
   * while it is off the driver polls, and THR writes may be coalesced (vmm/coalesced_pio.ts).
   */
  txInterrupt?: (enabled: boolean) => void;
}

export interface SerialStats {
  txBytes: number;
  rxBytes: number;
  /** Host bytes refused by enqueueInput because the host queue was full (the caller was told). */
  inputRefused: number;
  overruns: number;
  irqChanges: number;
  hostQueued: number;
}

/** A 16550A UART; construct one per thread over the same descriptor. */
export class Serial16550 {
  /** Allocates and resets the shared state (once, on the main thread). */
  static createDescriptor(p: SerialParams = {}): SerialDescriptor {
    const hq = p.hostQueueBytes ?? 4096;
    const batch = p.txBatch ?? 64;
    if (!Number.isInteger(hq) || hq < 1) throw new RangeError("serial: hostQueueBytes must be >= 1");
    if (!Number.isInteger(batch) || batch < 1 || batch > TX_CAP) {
      throw new RangeError(`serial: txBatch must be 1..${TX_CAP}`);
    }
    const sab = new SharedArrayBuffer(layout.byteLength + ((hq + 7) & ~7));
    const w = new Int32Array(sab, OFF_WORDS, WORDS);
    w[LSR] = 0;
    w[MSR] = MSR_CTS | MSR_DSR | MSR_DCD;
    w[DLL] = 12; // 9600 baud with the PC's 1.8432 MHz clock
    w[HQCAP] = hq;
    w[TXBATCH] = batch;
    return { kind: "serial", sab, base: p.base ?? 0x3f8, irq: p.irq ?? 4 };
  }

  readonly base: number;
  readonly irqNumber: number;
  readonly #w: Int32Array;
  readonly #rx: Uint8Array;
  readonly #tx: Uint8Array;
  readonly #hq: Uint8Array;
  readonly #lock: SharedLock;
  readonly #irq: IrqLine;
  readonly #out: ByteSink;
  readonly #txInterrupt: ((enabled: boolean) => void) | undefined;
  // Thread-local copy of a batch handed to the sink (the sink may not accept shared memory).
  readonly #local = new Uint8Array(TX_CAP);
  readonly #views: Uint8Array[] = [];

  constructor(desc: SerialDescriptor, deps: SerialDeps) {
    const sab = checkSab(desc.sab, layout.byteLength, "serial");
    this.base = desc.base;
    this.irqNumber = desc.irq;
    this.#w = new Int32Array(sab, OFF_WORDS, WORDS);
    this.#rx = new Uint8Array(sab, OFF_RX, FIFO_SIZE);
    this.#tx = new Uint8Array(sab, OFF_TX, TX_CAP);
    this.#hq = new Uint8Array(sab, OFF_HQ, Atomics.load(this.#w, HQCAP));
    this.#lock = new SharedLock(this.#w, LOCK);
    this.#irq = deps.irq;
    this.#out = deps.out;
    this.#txInterrupt = deps.txInterrupt;
    for (let n = 0; n <= TX_CAP; n++) this.#views.push(this.#local.subarray(0, n));
  }

  pioRead(offset: number, _size: number): number {
    const w = this.#w;
    this.#lock.lock();
    try {
      let v: number;
      switch (offset) {
        case 0:
          v = w[LCR] & LCR_DLAB ? w[DLL] : this.#popRx();
          break;
        case 1:
          v = w[LCR] & LCR_DLAB ? w[DLM] : w[IER];
          break;
        case 2: {
          const id = this.#interruptId();
          if (id === IIR_THRI) w[THRP] = 0; // reading IIR clears a THRE interrupt it reports
          v = id | (w[FCR] & FCR_ENABLE ? IIR_FIFO : 0);
          break;
        }
        case 3:
          v = w[LCR];
          break;
        case 4:
          v = w[MCR];
          break;
        case 5:
          v = this.#lsr();
          w[LSR] = 0;
          break;
        case 6:
          v = w[MSR];
          w[MSR] = v & 0xf0;
          break;
        case 7:
          v = w[SCR];
          break;
        default:
          v = 0xff;
      }
      this.#updateIrq();
      return v;
    } finally {
      this.#lock.unlock();
    }
  }

  pioWrite(offset: number, _size: number, value: number): void {
    const w = this.#w;
    const v = value & 0xff;
    this.#lock.lock();
    try {
      switch (offset) {
        case 0:
          if (w[LCR] & LCR_DLAB) w[DLL] = v;
          else this.#transmit(v);
          break;
        case 1:
          if (w[LCR] & LCR_DLAB) w[DLM] = v;
          else this.#writeIer(v);
          break;
        case 2:
          this.#writeFcr(v);
          break;
        case 3:
          w[LCR] = v;
          break;
        case 4:
          this.#writeMcr(v);
          break;
        case 7:
          w[SCR] = v;
          break;
          // 5 (LSR) and 6 (MSR) are read-only here.
      }
      this.#updateIrq();
    } finally {
      this.#lock.unlock();
    }
  }

  /**
   * Host input (stdin). Returns how many bytes were taken: fewer than offered only when the host
   * queue is full; the caller may retry the rest later.
   */
  enqueueInput(bytes: Uint8Array): number {
    const w = this.#w;
    this.#lock.lock();
    try {
      const cap = this.#hq.length;
      const n = Math.min(bytes.length, cap - w[HQN]);
      let tail = (w[HQH] + w[HQN]) % cap;
      for (let i = 0; i < n; i++) {
        this.#hq[tail] = bytes[i];
        tail = tail + 1 === cap ? 0 : tail + 1;
      }
      w[HQN] += n;
      w[ST_REFUSED] += bytes.length - n;
      this.#refill();
      this.#updateIrq();
      return n;
    } finally {
      this.#lock.unlock();
    }
  }

  /** Writes buffered output to the sink. */
  flush(): void {
    if (Atomics.load(this.#w, TXN) === 0) return;
    this.#lock.lock();
    try {
      this.#flushLocked();
    } finally {
      this.#lock.unlock();
    }
  }

  /** Bytes waiting to be flushed (a racy hint, for the host's flush timer). */
  get pendingOutput(): number {
    return Atomics.load(this.#w, TXN);
  }

  /** Whether the guest has the THR-empty interrupt enabled (IER bit 1). */
  get txInterruptEnabled(): boolean {
    return (Atomics.load(this.#w, IER) & IER_THRI) !== 0;
  }

  /** Room left in the host receive queue. */
  get inputSpace(): number {
    return this.#hq.length - Atomics.load(this.#w, HQN);
  }

  stats(): SerialStats {
    const w = this.#w;
    return {
      txBytes: Atomics.load(w, ST_TX) >>> 0,
      rxBytes: Atomics.load(w, ST_RX) >>> 0,
      inputRefused: Atomics.load(w, ST_REFUSED) >>> 0,
      overruns: Atomics.load(w, ST_OVERRUN) >>> 0,
      irqChanges: Atomics.load(w, ST_IRQ) >>> 0,
      hostQueued: Atomics.load(w, HQN),
    };
  }

  // ---- internals; all run with the lock held ----

  #fifoCap(): number {
    return this.#w[FCR] & FCR_ENABLE ? FIFO_SIZE : 1;
  }

  #lsr(): number {
    const w = this.#w;
    return LSR_THRE | LSR_TEMT | (w[RXN] > 0 ? LSR_DR : 0) | w[LSR];
  }

  #interruptId(): number {
    const w = this.#w;
    const ier = w[IER];
    if (ier & IER_RLSI && w[LSR] & LSR_OE) return IIR_RLSI;
    if (ier & IER_RDI && w[RXN] > 0) {
      if (w[FCR] & FCR_ENABLE && w[RXN] < TRIGGER_LEVELS[(w[FCR] & FCR_TRIGGER) >> 6]) return IIR_TIMEOUT;
      return IIR_RDI;
    }
    if (ier & IER_THRI && w[THRP]) return IIR_THRI;
    if (ier & IER_MSI && w[MSR] & 0x0f) return IIR_MSI;
    return IIR_NONE;
  }

  #updateIrq(): void {
    const w = this.#w;
    const mcr = w[MCR];
    const level = (mcr & (MCR_OUT2 | MCR_LOOP)) === MCR_OUT2 && this.#interruptId() !== IIR_NONE ? 1 : 0;
    if (level !== w[LEVEL]) {
      w[LEVEL] = level;
      w[ST_IRQ]++;
      this.#irq.set(level === 1);
    }
  }

  #transmit(v: number): void {
    const w = this.#w;
    // THR is full for an instant, then empty again: the THRE interrupt drops and comes back, so an
    // edge-triggered input (the IOAPIC's ISA pins) sees a fresh edge for every byte, as with a real
    // transmitter. Without it the line could stay high across the guest's handler and never retrigger.
    w[THRP] = 0;
    this.#updateIrq();
    w[THRP] = 1; // the caller reports the line going up again
    if (w[MCR] & MCR_LOOP) {
      this.#pushRx(v);
      return;
    }
    w[ST_TX]++;
    const n = w[TXN];
    this.#tx[n] = v;
    w[TXN] = n + 1;
    if (v === 0x0a || n + 1 >= w[TXBATCH]) this.#flushLocked();
  }

  #flushLocked(): void {
    const w = this.#w;
    const n = w[TXN];
    if (n === 0) return;
    this.#local.set(n === TX_CAP ? this.#tx : this.#tx.subarray(0, n));
    w[TXN] = 0;
    this.#out.write(this.#views[n]);
  }

  #writeIer(v: number): void {
    const w = this.#w;
    const old = w[IER];
    const ier = v & 0x0f; // bits 7:4 do not exist on a 16550A
    w[IER] = ier;
    if (ier & IER_THRI && !(old & IER_THRI)) {
      w[THRP] = 1;
      this.#txInterrupt?.(true);
    } else if (!(ier & IER_THRI) && old & IER_THRI) {
      this.#flushLocked(); // the driver's TX queue ran dry
      this.#txInterrupt?.(false);
    }
  }

  #writeFcr(v: number): void {
    const w = this.#w;
    const was = w[FCR] & FCR_ENABLE;
    if (v & FCR_ENABLE) {
      w[FCR] = v & (FCR_ENABLE | FCR_TRIGGER);
      if (!was || v & FCR_CLEAR_RX) this.#clearRx();
      // FCR_CLEAR_TX: the transmitter is always empty.
    } else {
      w[FCR] = 0; // with FCR0 clear the other bits are not programmed
      if (was) this.#clearRx();
    }
  }

  #writeMcr(v: number): void {
    const w = this.#w;
    const old = w[MCR];
    const mcr = v & 0x1f;
    w[MCR] = mcr;
    const before = w[MSR] & 0xf0;
    let now: number;
    if (mcr & MCR_LOOP) {
      now = (mcr & MCR_RTS ? MSR_CTS : 0) | (mcr & MCR_DTR ? MSR_DSR : 0) |
        (mcr & MCR_OUT1 ? MSR_RI : 0) | (mcr & MCR_OUT2 ? MSR_DCD : 0);
    } else {
      now = MSR_CTS | MSR_DSR | MSR_DCD;
    }
    const changed = before ^ now;
    let delta = w[MSR] & 0x0f;
    if (changed & MSR_CTS) delta |= MSR_DCTS;
    if (changed & MSR_DSR) delta |= MSR_DDSR;
    if (before & MSR_RI && !(now & MSR_RI)) delta |= MSR_TERI;
    if (changed & MSR_DCD) delta |= MSR_DDCD;
    w[MSR] = now | delta;
    if (old & MCR_LOOP && !(mcr & MCR_LOOP)) this.#refill(); // the wire is connected again
  }

  #pushRx(v: number): void {
    const w = this.#w;
    const n = w[RXN];
    if (n >= this.#fifoCap()) {
      w[LSR] |= LSR_OE;
      w[ST_OVERRUN]++;
      return;
    }
    this.#rx[(w[RXH] + n) % FIFO_SIZE] = v;
    w[RXN] = n + 1;
  }

  #popRx(): number {
    const w = this.#w;
    if (w[RXN] === 0) return 0;
    const h = w[RXH];
    const v = this.#rx[h];
    w[RXH] = (h + 1) % FIFO_SIZE;
    w[RXN]--;
    this.#refill();
    return v;
  }

  #clearRx(): void {
    const w = this.#w;
    w[RXH] = 0;
    w[RXN] = 0;
    this.#refill();
  }

  /** Moves host input into the FIFO while there is room (not in loopback). */
  #refill(): void {
    const w = this.#w;
    if (w[MCR] & MCR_LOOP) return;
    const cap = this.#fifoCap();
    const hq = this.#hq;
    while (w[RXN] < cap && w[HQN] > 0) {
      const h = w[HQH];
      this.#rx[(w[RXH] + w[RXN]) % FIFO_SIZE] = hq[h];
      w[RXN]++;
      w[HQH] = h + 1 === hq.length ? 0 : h + 1;
      w[HQN]--;
      w[ST_RX]++;
    }
  }
}
