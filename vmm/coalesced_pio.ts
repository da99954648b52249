/**
 * Coalesced port I/O for the serial port's transmit register.
 *
 * Linux writes its console byte by byte: for each byte it reads the line status register (an exit) and
 * writes the transmit register (another exit). With the transmit register in a KVM coalesced zone, the
 * write does not leave the kernel: KVM appends it to a ring in a page every vCPU's mmap shares, and the
 * VMM replays the ring, in order, before it handles any other exit (so a later read or register write
 * sees every byte written before it) and from the host's 20 ms output timer. A boot's console output
 * then takes half the exits.
 *
 * Only while the driver polls: a transmit register write must re-raise the THR-empty interrupt at once
 * when that interrupt is enabled (the guest's TX interrupt handler waits for it, halted, with nothing
 * else making it exit), so the zone is removed whenever the guest sets IER's THRI bit and put back when
 * it clears it. The serial port calls {@link CoalescedZone.set} from its IER write, under its lock.
 */
import type { VmFd } from "../ffi/kvm.ts";
import { KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO } from "../ffi/kvm_constants.ts";
import type { PioBus } from "../devices/bus.ts";
import { SharedLock } from "../devices/shared.ts";

const PAGE = 4096;
/** struct kvm_coalesced_mmio: phys_addr u64, len u32, pio u32, data[8]. */
const ENTRY = 24;
/** Entries in the ring (KVM_COALESCED_MMIO_MAX): the page after its two u32 indices (first, last). */
const MAX = Math.floor((PAGE - 8) / ENTRY);

// Int32 words of the shared state.
const LOCK = 0; // SharedLock.WORDS slots: one thread drains at a time
const ON = 3; // 1 while the zone is registered
const WORDS = 4;

/** What every thread needs: structured-cloneable. */
export interface CoalescedPioDescriptor {
  sab: SharedArrayBuffer;
  /** Byte offset of the ring in a vCPU's mmap (KVM_CAP_COALESCED_MMIO pages). */
  ringOffset: number;
  /** The zone: `size` ports from `port`. */
  port: number;
  size: number;
}

/** The zone's shared state for ports [port, port+size), or null when this KVM cannot coalesce port I/O. */
export function createCoalescedPio(vm: VmFd, port: number, size: number): CoalescedPioDescriptor | null {
  if (vm.checkExtension(KVM_CAP_COALESCED_PIO) <= 0) return null;
  const page = vm.checkExtension(KVM_CAP_COALESCED_MMIO);
  if (page <= 0 || (page + 1) * PAGE > vm.vcpuMmapSize) return null;
  return { sab: new SharedArrayBuffer(WORDS * 4), ringOffset: page * PAGE, port, size };
}

/** Registers and removes the zone. Callers serialize (the serial port's lock); idempotent. */
export class CoalescedZone {
  readonly #w: Int32Array;
  constructor(readonly desc: CoalescedPioDescriptor, readonly vm: VmFd) {
    this.#w = new Int32Array(desc.sab, 0, WORDS);
  }

  get on(): boolean {
    return Atomics.load(this.#w, ON) === 1;
  }

  set(on: boolean): void {
    if (this.on === on) return;
    this.vm.coalescedZone(on, this.desc.port, this.desc.size, true);
    Atomics.store(this.#w, ON, on ? 1 : 0);
  }
}

/** The ring, over one vCPU's mapping of it; any thread may drain it. */
export class CoalescedRing {
  readonly #idx: Uint32Array;
  readonly #v: DataView;
  readonly #lock: SharedLock;

  /** `mapping`: a vCPU's whole kvm_run mmap (every vCPU's maps the same ring page). */
  constructor(desc: CoalescedPioDescriptor, mapping: Uint8Array) {
    if (mapping.byteLength < desc.ringOffset + PAGE) {
      throw new RangeError("coalesced ring: mapping too small");
    }
    const at = mapping.byteOffset + desc.ringOffset;
    this.#idx = new Uint32Array(mapping.buffer, at, 2);
    this.#v = new DataView(mapping.buffer, at, PAGE);
    this.#lock = new SharedLock(new Int32Array(desc.sab, 0, WORDS), LOCK);
  }

  /** Whether writes wait in the ring (two loads: cheap enough for every exit). */
  get pending(): boolean {
    return this.#idx[0] !== this.#idx[1];
  }

  /** Replays the ring's writes on `pio`, oldest first; returns how many. */
  drain(pio: PioBus): number {
    const idx = this.#idx;
    const v = this.#v;
    let n = 0;
    this.#lock.lock();
    try {
      let first = Atomics.load(idx, 0);
      const last = Atomics.load(idx, 1);
      if (first >= MAX || last >= MAX) {
        throw new Error(`coalesced ring: indices ${first}/${last} out of range`);
      }
      while (first !== last) {
        const off = 8 + first * ENTRY;
        const port = v.getUint32(off, true);
        const len = v.getUint32(off + 8, true);
        const value = len === 1
          ? v.getUint8(off + 16)
          : len === 2
          ? v.getUint16(off + 16, true)
          : v.getUint32(off + 16, true);
        // The slot is given back before the write, so a device that throws loses one byte, not the ring.
        first = first + 1 === MAX ? 0 : first + 1;
        Atomics.store(idx, 0, first);
        n++;
        pio.write(port, len === 1 || len === 2 ? len : 4, value);
      }
    } finally {
      this.#lock.unlock();
    }
    return n;
  }
}
