/**
 * virtio-mem (virtio 1.2, "Memory Device", type 24): a region of guest-physical memory the guest plugs
 * and unplugs block by block, following the size the host asks for. dvmm maps the whole region into
 * KVM at boot (its pages are only used once touched); the device keeps which blocks are plugged, and an
 * unplug gives the blocks' memory back to the host.
 *
 * Configuration space (little endian, 56 bytes): block_size @0 (u64), node_id @8 (u16), addr @16,
 * region_size @24, usable_region_size @32, plugged_size @40, requested_size @48 (all u64). The host
 * changes requested_size (vm.resize desired_ram) and signals a configuration change; the device updates
 * plugged_size as requests succeed.
 *
 * Request (device-readable, 24 bytes): { le16 type; pad[6]; le64 addr; le16 nb_blocks; pad[6] }.
 * Response (device-writable, 10 bytes): { le16 type; pad[6]; le16 state }.
 * PLUG: every block of the range unplugged, the range inside the usable region and plugged_size staying
 * within requested_size → ACK, else NACK (size) or ERROR (range). UNPLUG: every block plugged → ACK.
 * UNPLUG_ALL: everything unplugged → ACK. STATE: PLUGGED / UNPLUGGED / MIXED for the range. A chain
 * without room for a response is completed with used length 0 and counted as malformed.
 */
import { F, featureBit } from "./constants.ts";
import type { DescriptorChain, SplitQueue } from "./queue.ts";

export const MEM_REQ = { PLUG: 0, UNPLUG: 1, UNPLUG_ALL: 2, STATE: 3 } as const;
export const MEM_RESP = { ACK: 0, NACK: 1, BUSY: 2, ERROR: 3 } as const;
export const MEM_STATE = { PLUGGED: 0, UNPLUGGED: 1, MIXED: 2 } as const;
/** Configuration space layout (byte offsets). */
export const MEM_CONFIG = {
  BLOCK_SIZE: 0,
  NODE_ID: 8,
  ADDR: 16,
  REGION_SIZE: 24,
  USABLE_REGION_SIZE: 32,
  PLUGGED_SIZE: 40,
  REQUESTED_SIZE: 48,
  SIZE: 56,
} as const;
/** Block size: 2 MiB, so KVM can back plugged blocks with transparent huge pages (as Cloud Hypervisor). */
export const MEM_BLOCK_SIZE = 2 << 20;
/** Region alignment: Linux's memory block size, which the guest driver adds memory in. */
export const MEM_REGION_ALIGN = 128 << 20;
export const MEM_QUEUE_SIZE = 128;
const REQ_SIZE = 24;
const RESP_SIZE = 10;

/** Features: VERSION_1 (no ACPI proximity domain; unplugged memory stays accessible, the legacy mode). */
export function memFeatures(): bigint {
  return featureBit(F.VERSION_1);
}

export function memConfigSpace(o: { addr: number; regionSize: number; requested: number }): Uint8Array {
  const b = new Uint8Array(MEM_CONFIG.SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(MEM_CONFIG.BLOCK_SIZE, BigInt(MEM_BLOCK_SIZE), true);
  v.setBigUint64(MEM_CONFIG.ADDR, BigInt(o.addr), true);
  v.setBigUint64(MEM_CONFIG.REGION_SIZE, BigInt(o.regionSize), true);
  v.setBigUint64(MEM_CONFIG.USABLE_REGION_SIZE, BigInt(o.regionSize), true);
  v.setBigUint64(MEM_CONFIG.REQUESTED_SIZE, BigInt(o.requested), true);
  return b;
}

/** The device's view of its configuration space: reads, and writes that signal nothing by themselves. */
export interface MemConfigAccess {
  read(offset: number): number;
  write(offset: number, value: number): void;
}

/** Gives an unplugged range of the region back to the host (offset from the region's start). */
export interface MemDiscard {
  discard(offset: number, len: number): boolean;
}

/** Counters, dvmm's own (Cloud Hypervisor reports none for virtio-mem). */
export const MEM_COUNTERS = ["plug_requests", "unplug_requests", "refused_requests", "bad_requests"] as const;

export class MemCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(buffer ?? new SharedArrayBuffer(8 * MEM_COUNTERS.length), 0, 4);
  }
  snapshot(): Record<(typeof MEM_COUNTERS)[number], number> {
    const v = this.values;
    return { plug_requests: v[0], unplug_requests: v[1], refused_requests: v[2], bad_requests: v[3] };
  }
}

export class VirtioMemDevice {
  readonly counters: MemCounters;
  /** One byte per block: 1 plugged. */
  readonly plugged: Uint8Array;
  readonly #req = new Uint8Array(REQ_SIZE);
  readonly #reqView = new DataView(this.#req.buffer);
  readonly #resp = new Uint8Array(RESP_SIZE);
  readonly #respView = new DataView(this.#resp.buffer);
  readonly #addr: number;
  readonly #regionSize: number;

  /**
   * `plugged`: where the block map lives (one byte per block; a shared buffer, so a snapshot saves it with
   * the rest of the device's shared state); a fresh array when absent.
   */
  constructor(
    readonly config: MemConfigAccess,
    readonly backing: MemDiscard,
    counters?: MemCounters,
    plugged?: Uint8Array,
  ) {
    this.counters = counters ?? new MemCounters();
    this.#addr = config.read(MEM_CONFIG.ADDR);
    this.#regionSize = config.read(MEM_CONFIG.REGION_SIZE);
    const blocks = Math.floor(this.#regionSize / MEM_BLOCK_SIZE);
    if (plugged && plugged.length < blocks) {
      throw new RangeError(`virtio-mem: block map for ${plugged.length} of ${blocks} blocks`);
    }
    this.plugged = plugged ? plugged.subarray(0, blocks) : new Uint8Array(blocks);
  }

  /** Bytes plugged now. */
  get pluggedSize(): number {
    return this.config.read(MEM_CONFIG.PLUGGED_SIZE);
  }

  /** Executes one request; returns the used length. */
  handle(chain: DescriptorChain): number {
    const c = this.counters.values;
    if (chain.error !== null || chain.readableBytes < REQ_SIZE || chain.writableBytes < RESP_SIZE) {
      c[3]++;
      return 0;
    }
    chain.readAt(0, this.#req);
    const type = this.#reqView.getUint16(0, true);
    const addr = Number(this.#reqView.getBigUint64(8, true));
    const blocks = this.#reqView.getUint16(16, true);
    let resp: number = MEM_RESP.ERROR;
    let state = 0;
    if (type === MEM_REQ.PLUG || type === MEM_REQ.UNPLUG) {
      resp = this.#change(addr, blocks, type === MEM_REQ.PLUG);
    } else if (type === MEM_REQ.UNPLUG_ALL) {
      c[1]++;
      this.unplugAll();
      resp = MEM_RESP.ACK;
    } else if (type === MEM_REQ.STATE) {
      const first = this.#firstBlock(addr, blocks);
      if (first >= 0) {
        let on = 0;
        for (let i = first; i < first + blocks; i++) on += this.plugged[i];
        state = on === blocks ? MEM_STATE.PLUGGED : on === 0 ? MEM_STATE.UNPLUGGED : MEM_STATE.MIXED;
        resp = MEM_RESP.ACK;
      }
    } else {
      c[3]++;
    }
    if (resp === MEM_RESP.NACK || resp === MEM_RESP.ERROR) c[2]++;
    this.#resp.fill(0);
    this.#respView.setUint16(0, resp, true);
    this.#respView.setUint16(8, state, true);
    chain.writeAt(0, this.#resp);
    return RESP_SIZE;
  }

  /** Index of the range's first block, or -1 when the range is misaligned or outside the usable region. */
  #firstBlock(addr: number, blocks: number): number {
    const usable = this.config.read(MEM_CONFIG.USABLE_REGION_SIZE);
    const off = addr - this.#addr;
    if (blocks === 0 || off < 0 || off % MEM_BLOCK_SIZE !== 0) return -1;
    if (off + blocks * MEM_BLOCK_SIZE > Math.min(usable, this.#regionSize)) return -1;
    return off / MEM_BLOCK_SIZE;
  }

  #change(addr: number, blocks: number, plug: boolean): number {
    const c = this.counters.values;
    c[plug ? 0 : 1]++;
    const first = this.#firstBlock(addr, blocks);
    if (first < 0) return MEM_RESP.ERROR;
    const want = plug ? 0 : 1;
    for (let i = first; i < first + blocks; i++) if (this.plugged[i] !== want) return MEM_RESP.ERROR;
    const size = blocks * MEM_BLOCK_SIZE;
    const now = this.pluggedSize;
    if (plug && now + size > this.config.read(MEM_CONFIG.REQUESTED_SIZE)) return MEM_RESP.NACK;
    if (!plug && !this.backing.discard(first * MEM_BLOCK_SIZE, size)) return MEM_RESP.BUSY;
    this.plugged.fill(plug ? 1 : 0, first, first + blocks);
    this.config.write(MEM_CONFIG.PLUGGED_SIZE, plug ? now + size : now - size);
    return MEM_RESP.ACK;
  }

  /** Unplugs everything (UNPLUG_ALL, and when the driver resets the device). */
  unplugAll(): void {
    let i = 0;
    while (i < this.plugged.length) {
      if (!this.plugged[i]) {
        i++;
        continue;
      }
      let j = i;
      while (j < this.plugged.length && this.plugged[j]) j++;
      this.backing.discard(i * MEM_BLOCK_SIZE, (j - i) * MEM_BLOCK_SIZE);
      i = j;
    }
    this.plugged.fill(0);
    this.config.write(MEM_CONFIG.PLUGGED_SIZE, 0);
  }

  /** Serves the queue after a notify, until the driver adds nothing more; true → interrupt. */
  service(q: SplitQueue, _index = 0): boolean {
    let irq = false;
    do {
      for (;;) {
        const chain = q.popChain();
        if (chain === null || q.broken !== null) break;
        if (!chain.headValid) continue;
        q.pushUsed(chain.head, this.handle(chain));
      }
      if (q.needsInterrupt()) irq = true;
      if (q.broken !== null) break;
    } while (q.enableNotification());
    return irq;
  }
}
