/**
 * virtio-net (virtio 1.x, "Network Device") frame processing: the device side of the RX, TX and
 * control queues over a {@link NetBackend} (a tap queue in production, a fake in tests). Transport,
 * threads, interrupts and the tap's set-up live elsewhere (device_net.ts, tap.ts, worker.ts).
 *
 * Every frame on either queue starts with the 12-byte virtio-net header (VERSION_1 always includes
 * num_buffers). The tap is opened with a vnet header of the same size, so frames pass through with
 * their headers, zero-copy: the chains' segments become the iovecs of one writev / readv. Iovecs are
 * filled as u32 halves from numbers, so building them allocates nothing.
 *
 * Queue layout: pair k is receiveq 2k and transmitq 2k+1 (one {@link NetDevice} per pair); the control
 * queue comes after the pairs the driver can use: index 2 × max_virtqueue_pairs with VIRTIO_NET_F_MQ,
 * index 2 without it ({@link ctrlQueueIndex}).
 *
 * Receive, one chain per frame (no VIRTIO_NET_F_MRG_RXBUF): the chain must hold the largest frame, so
 * drivers post large chains. Receive with MRG_RXBUF: a frame may be spread over several chains, the
 * count going into the header's num_buffers. The device keeps a window of chains popped and not used
 * yet, large enough for the largest frame the tap can hand over (with guest TSO/UFO a 64 KiB GSO
 * frame, without them MTU + Ethernet + VLAN headers); one readv fills them in order, the chains the
 * frame used are completed together (one used-idx update) and the rest stay for the next frame. The
 * readv ends in a host "spare" buffer: when the guest has posted less than a whole frame's worth, the
 * tail lands there and is copied into the chains the driver posts next (only then is the frame
 * completed), so a frame is never lost for want of buffers the driver is about to give.
 *
 * Hostile chains never throw: a chain with a descriptor error, too few bytes for a header (or, TX, for
 * a header and an Ethernet header), or more segments than an iovec allows is completed with length 0
 * (its frame is dropped) and counted. A frame that would need every descriptor of the ring and still
 * does not fit is dropped, its chains completed with length 0. Control commands that are malformed or
 * unknown are answered VIRTIO_NET_ERR.
 */
import { addressOf, EAGAIN, EINTR } from "../../ffi/shim.ts";
import { F, featureBit, NET_F } from "./constants.ts";
import { type DescriptorChain, setIovec, type SplitQueue } from "./queue.ts";

/** virtio-net header size with VERSION_1 (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers). */
export const NET_HDR_SIZE = 12;
/** Smallest frame worth handing on: an Ethernet header. */
const ETH_HLEN = 14;
const VLAN_HLEN = 4;
/** Most segments in one readv/writev (Linux IOV_MAX). */
export const MAX_IOV = 1024;
/** Device configuration space size: mac[6], status u16, max_virtqueue_pairs u16, mtu u16. */
export const NET_CONFIG_SIZE = 12;
/** VIRTIO_NET_S_LINK_UP. */
export const NET_S_LINK_UP = 1;
/** The largest frame a tap hands over with GSO offloads on: a 64 KiB IP packet, Ethernet and VLAN headers. */
export const MAX_GSO_FRAME = 65535 + ETH_HLEN + VLAN_HLEN;
/** Without VIRTIO_NET_F_MTU the guest assumes Ethernet's. */
export const DEFAULT_MTU = 1500;
/** max_virtqueue_pairs bounds (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN / _MAX). */
export const MQ_PAIRS_MIN = 1;
export const MQ_PAIRS_MAX = 0x8000;

/** Control queue command classes and commands (virtio spec 5.1.6.5). */
export const NET_CTRL = {
  RX: 0,
  MAC: 1,
  VLAN: 2,
  ANNOUNCE: 3,
  MQ: 4,
  GUEST_OFFLOADS: 5,
} as const;
/** VIRTIO_NET_CTRL_RX commands PROMISC .. NOBCAST (0..5), VLAN ADD/DEL (0, 1), the rest 0. */
const RX_CMDS = 6;
const VLAN_CMDS = 2;
const ANNOUNCE_ACK = 0;
const MQ_VQ_PAIRS_SET = 0;
const GUEST_OFFLOADS_SET = 0;
export const NET_OK = 0;
export const NET_ERR = 1;

export const RX_QUEUE = 0;
export const TX_QUEUE = 1;

/** Where frames go to and come from. Both calls return a byte count or -errno. */
export interface NetBackend {
  /** Sends one frame (header first) gathered from `count` iovecs (u64 base, u64 len pairs). */
  writev(iov: BigUint64Array, count: number): number;
  /** Receives one frame (header first) into `count` iovecs; -EAGAIN when none is waiting. */
  readv(iov: BigUint64Array, count: number): number;
}

/** What a virtio-net device offers, from its --net options and its tap. */
export interface NetFeatureOptions {
  /** offload_csum: checksum offload both ways, and the control command that changes guest offloads. */
  csum?: boolean;
  /** offload_tso (counts only with csum): TSO4, TSO6 and ECN both ways. */
  tso?: boolean;
  /** offload_ufo (counts only with csum): UFO both ways. */
  ufo?: boolean;
  /** The tap's MTU is known and goes into the config space: VIRTIO_NET_F_MTU. */
  mtu?: boolean;
  /** VIRTIO_NET_F_MRG_RXBUF (dvmm's addition; Cloud Hypervisor does not offer it). */
  mrgRxbuf?: boolean;
}

/**
 * Features offered by a virtio-net device: Cloud Hypervisor's set (the control queue and MQ always, so
 * the driver learns max_virtqueue_pairs even when it is 1; offloads as its offload_* options map them),
 * plus dvmm's indirect descriptors and, when asked, mergeable RX buffers.
 */
export function netFeatures(o: NetFeatureOptions = {}): bigint {
  let f = 0n;
  const add = (...bits: number[]) => {
    for (const b of bits) f |= featureBit(b);
  };
  add(F.VERSION_1, F.EVENT_IDX, F.INDIRECT_DESC);
  add(NET_F.MAC, NET_F.STATUS, NET_F.CTRL_VQ, NET_F.MQ, NET_F.GUEST_ANNOUNCE);
  if (o.mtu) add(NET_F.MTU);
  if (o.csum) {
    add(NET_F.CSUM, NET_F.GUEST_CSUM, NET_F.CTRL_GUEST_OFFLOADS);
    if (o.tso) {
      add(
        NET_F.HOST_TSO4,
        NET_F.HOST_TSO6,
        NET_F.HOST_ECN,
        NET_F.GUEST_TSO4,
        NET_F.GUEST_TSO6,
        NET_F.GUEST_ECN,
      );
    }
    if (o.ufo) add(NET_F.HOST_UFO, NET_F.GUEST_UFO);
  }
  if (o.mrgRxbuf) add(NET_F.MRG_RXBUF);
  return f;
}

/**
 * TUN_F_* offload bits (linux/if_tun.h) for the guest offloads in `features`: what the tap may hand the
 * guest unchecksummed or unsegmented. The kernel refuses TSO/UFO without CSUM and ECN without TSO, so
 * those combinations are never asked for.
 */
export function tapOffloadFor(features: bigint): number {
  const has = (b: number) => (features & featureBit(b)) !== 0n;
  let t = 0;
  if (has(NET_F.GUEST_CSUM)) {
    t |= 0x01; // TUN_F_CSUM
    if (has(NET_F.GUEST_TSO4)) t |= 0x02;
    if (has(NET_F.GUEST_TSO6)) t |= 0x04;
    if ((t & 0x06) && has(NET_F.GUEST_ECN)) t |= 0x08;
    if (has(NET_F.GUEST_UFO)) t |= 0x10;
  }
  return t;
}

/** Index of the control queue for the negotiated features, or -1 without VIRTIO_NET_F_CTRL_VQ. */
export function ctrlQueueIndex(features: bigint, maxPairs: number): number {
  if ((features & featureBit(NET_F.CTRL_VQ)) === 0n) return -1;
  return (features & featureBit(NET_F.MQ)) !== 0n ? 2 * maxPairs : 2;
}

/** The device configuration space: MAC, link up, max_virtqueue_pairs, MTU (0: not advertised). */
export function netConfigSpace(mac: Uint8Array, queuePairs = 1, mtu = 0): Uint8Array {
  const b = new Uint8Array(NET_CONFIG_SIZE);
  const v = new DataView(b.buffer);
  b.set(mac.subarray(0, 6), 0);
  v.setUint16(6, NET_S_LINK_UP, true);
  v.setUint16(8, queuePairs, true);
  v.setUint16(10, mtu, true);
  return b;
}

/** Counter names (Cloud Hypervisor's); bytes count frames without the virtio-net header. */
export const NET_COUNTERS = ["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"] as const;

/**
 * Net counters in a Float64Array, optionally over a SharedArrayBuffer read by the main thread. Every
 * queue pair of a device updates the same counters (one worker serves them all), so they are sums.
 */
export class NetCounters {
  readonly values: Float64Array;
  /** Frames dropped (bad chains, backend errors): not a Cloud Hypervisor counter, kept for tests/logs. */
  dropped = 0;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(buffer ?? new SharedArrayBuffer(8 * NET_COUNTERS.length), 0, 4);
  }
  snapshot(): Record<(typeof NET_COUNTERS)[number], number> {
    const v = this.values;
    return { rx_bytes: v[0], rx_frames: v[1], tx_bytes: v[2], tx_frames: v[3] };
  }
}

/** Why an RX pass stopped. */
export type RxStop = "empty" | "no-buffers" | "error";

/** Frame processing for one virtio-net queue pair. */
export class NetDevice {
  readonly counters: NetCounters;
  /** Where TX frames go: the pair's own backend unless its tap queue is detached (device_net.ts). */
  txBackend: NetBackend;
  /** Last backend errno that stopped RX (other than EAGAIN), for the worker's log. */
  lastRxErrno = 0;
  /** VIRTIO_NET_F_MRG_RXBUF negotiated: frames may span chains. */
  #mergeable = false;
  /** Bytes of the largest frame (header included) the backend may hand over. */
  #budget = NET_HDR_SIZE + DEFAULT_MTU + ETH_HLEN + VLAN_HLEN;

  // iovecs for RX; TX has its own (the mergeable RX window keeps its iovecs between passes)
  #iov = new BigUint64Array(2 * 64);
  #iov32 = new Uint32Array(this.#iov.buffer);
  #txIov = new BigUint64Array(2 * 64);
  #txIov32 = new Uint32Array(this.#txIov.buffer);

  // Mergeable RX: the window of chains popped and not used yet, in ring order. Chain j: head, writable
  // bytes, iovec segments (its segments are iovecs [sum of earlier, + segs)), and where bytes 10 and
  // 11 of its writable stream (num_buffers) lie: region, offset, region, offset.
  #wN = 0;
  #wSegs = 0;
  #wCap = 0;
  #wHead = new Uint32Array(64);
  #wCapOf = new Float64Array(64);
  #wSegsOf = new Uint32Array(64);
  #wNb = new Float64Array(4 * 64);
  /** A chain object of the RX queue (for its guest memory regions). */
  #rxChain: DescriptorChain | null = null;
  /** Host buffer the readv ends in; `#spill` bytes of the current frame wait there from `#spillOff`. */
  #spare: Uint8Array<ArrayBuffer> | null = null;
  #spareAddr = 0;
  #spill = 0;
  #spillOff = 0;
  #frameLen = 0;

  constructor(readonly backend: NetBackend, counters?: NetCounters) {
    this.counters = counters ?? new NetCounters();
    this.txBackend = backend;
  }

  /**
   * Sets up receiving for a (re)activated device, forgetting every chain of the previous queues.
   * `maxFrame` is the largest frame without its virtio-net header the backend may hand over.
   */
  configure(mergeable: boolean, maxFrame: number): void {
    this.#mergeable = mergeable;
    this.#budget = NET_HDR_SIZE + maxFrame;
    this.#wN = this.#wSegs = this.#wCap = 0;
    this.#spill = this.#spillOff = this.#frameLen = 0;
    this.#rxChain = null;
    if (mergeable && this.#spare === null) {
      this.#spare = new Uint8Array(NET_HDR_SIZE + MAX_GSO_FRAME);
      this.#spareAddr = Number(addressOf(this.#spare));
    }
  }

  /** Chains held for frames not received yet (mergeable RX). */
  get heldChains(): number {
    return this.#wN;
  }

  #ensureIov(n: number): void {
    if (this.#iov.length < 2 * n) {
      let len = this.#iov.length;
      while (len < 2 * n) len *= 2;
      const next = new BigUint64Array(len);
      next.set(this.#iov);
      this.#iov = next;
      this.#iov32 = new Uint32Array(next.buffer);
    }
  }

  /** RX iovec k = (addr, len), written as u32 halves (little-endian host). */
  #setIov(k: number, addr: number, len: number): void {
    setIovec(this.#iov32, k, addr, len);
  }

  /** Sends every available TX chain; returns true when the driver should be interrupted. */
  processTx(q: SplitQueue): boolean {
    for (;;) {
      const chain = q.popChain();
      if (chain === null || q.broken !== null) break;
      if (!chain.headValid) continue;
      this.#send(chain);
      q.pushUsed(chain.head, 0);
    }
    return q.needsInterrupt();
  }

  #send(c: DescriptorChain): void {
    const n = c.readableCount;
    if (c.error !== null || c.readableBytes < NET_HDR_SIZE + ETH_HLEN || n > MAX_IOV) {
      this.counters.dropped++;
      return;
    }
    if (this.#txIov.length < 2 * n) {
      this.#txIov = new BigUint64Array(2 * MAX_IOV);
      this.#txIov32 = new Uint32Array(this.#txIov.buffer);
    }
    const v = this.#txIov32;
    for (let i = 0; i < n; i++) setIovec(v, i, c.readableAddr(i), c.readableLen(i));
    let r: number;
    do r = this.txBackend.writev(this.#txIov, n); while (r === -EINTR);
    if (r < 0) {
      this.counters.dropped++;
      return;
    }
    const cv = this.counters.values;
    cv[2] += c.readableBytes - NET_HDR_SIZE;
    cv[3]++;
  }

  /**
   * Moves waiting frames from the backend into available RX chains until the backend is empty, the
   * queue has no buffers, or the backend fails. `irq` is set when the driver should be interrupted.
   */
  processRx(q: SplitQueue, out: { irq: boolean }): RxStop {
    const stop = this.#mergeable ? this.#rxMerged(q) : this.#rxSingle(q);
    if (q.needsInterrupt()) out.irq = true;
    return stop;
  }

  /** Receive with one chain per frame. */
  #rxSingle(q: SplitQueue): RxStop {
    let failures = 0;
    for (;;) {
      const chain = q.popChain();
      if (chain === null) return "no-buffers";
      if (q.broken !== null) return "error";
      if (!chain.headValid) continue;
      const n = chain.writableCount;
      if (chain.error !== null || chain.writableBytes < NET_HDR_SIZE + ETH_HLEN || n > MAX_IOV) {
        this.counters.dropped++;
        q.pushUsed(chain.head, 0);
        continue;
      }
      this.#ensureIov(n);
      for (let i = 0; i < n; i++) this.#setIov(i, chain.writableAddr(i), chain.writableLen(i));
      let r: number;
      do r = this.backend.readv(this.#iov, n); while (r === -EINTR);
      if (r < NET_HDR_SIZE || r > chain.writableBytes) {
        // Give the chain back: it was not used. EAGAIN: nothing waiting.
        q.lastAvailIdx = (q.lastAvailIdx - 1) & 0xffff;
        if (r === -EAGAIN) return "empty";
        if (this.#dropOrStop(r, ++failures)) continue;
        return "error";
      }
      chain.writeByte(10, 1); // num_buffers = 1
      chain.writeByte(11, 0);
      q.pushUsed(chain.head, r);
      const v = this.counters.values;
      v[0] += r - NET_HDR_SIZE;
      v[1]++;
    }
  }

  /**
   * A failed read: true when a frame was dropped and the next may be tried (a frame shorter than a
   * header, one larger than the buffers that the tap truncated, EFAULT/EINVAL: the tap dropped a frame
   * that did not fit), at most 64 in a row; false to stop, remembering the errno.
   */
  #dropOrStop(r: number, failures: number): boolean {
    this.counters.dropped++;
    const dropped = r >= 0 || r === -14 /* EFAULT */ || r === -22; /* EINVAL */
    if (dropped && failures < 64) return true;
    this.lastRxErrno = r < 0 ? -r : 0;
    return false;
  }

  /** Receive with frames spread over chains (VIRTIO_NET_F_MRG_RXBUF). */
  #rxMerged(q: SplitQueue): RxStop {
    let failures = 0;
    for (;;) {
      if (this.#spill > 0) {
        const s = this.#placeSpill(q);
        if (s !== null) return s;
        continue;
      }
      if (!this.#topUp(q)) return "error";
      if (this.#wN === 0) return "no-buffers";
      const segs = this.#wSegs;
      this.#setIov(segs, this.#spareAddr, this.#spare!.length);
      let r: number;
      do r = this.backend.readv(this.#iov, segs + 1); while (r === -EINTR);
      if (r === -EAGAIN) return "empty";
      if (r < NET_HDR_SIZE || r > this.#wCap + this.#spare!.length) {
        if (this.#dropOrStop(r, ++failures)) continue;
        return "error";
      }
      if (r <= this.#wCap) {
        let k = 0;
        for (let covered = 0; covered < r; k++) covered += this.#wCapOf[k];
        this.#complete(q, k, r);
      } else {
        // Every chain of the window is full; the rest waits in the spare buffer for more chains.
        this.#frameLen = r;
        this.#spill = r - this.#wCap;
        this.#spillOff = 0;
      }
    }
  }

  /**
   * Pops chains into the window until it holds the largest frame or the ring is empty (or the iovecs
   * are all taken, one being kept for the spare buffer). Bad chains are completed with length 0 on
   * the way. False when the ring is broken.
   */
  #topUp(q: SplitQueue): boolean {
    while (this.#wCap < this.#budget) {
      const c = q.popChain();
      if (c === null) return true;
      if (q.broken !== null) return false;
      if (!c.headValid) continue;
      const n = c.writableCount;
      if (c.error !== null || c.writableBytes < NET_HDR_SIZE || n >= MAX_IOV) {
        this.counters.dropped++;
        q.pushUsed(c.head, 0);
        continue;
      }
      if (this.#wSegs + n >= MAX_IOV) {
        q.lastAvailIdx = (q.lastAvailIdx - 1) & 0xffff; // popped again for a later frame
        return true;
      }
      const k = this.#hold(c.head, c.writableBytes, n);
      this.#rxChain = c;
      this.#locate(c, 10, 4 * k);
      this.#locate(c, 11, 4 * k + 2);
      this.#ensureIov(this.#wSegs + n + 1);
      for (let i = 0; i < n; i++) this.#setIov(this.#wSegs + i, c.writableAddr(i), c.writableLen(i));
      this.#wSegs += n;
    }
    return true;
  }

  /** Appends a chain to the window; returns its position. */
  #hold(head: number, cap: number, segs: number): number {
    const k = this.#wN;
    if (k === this.#wHead.length) {
      const grow = <T extends Uint32Array | Float64Array>(a: T, f: (n: number) => T): T => {
        const b = f(a.length * 2);
        b.set(a);
        return b;
      };
      this.#wHead = grow(this.#wHead, (n) => new Uint32Array(n));
      this.#wCapOf = grow(this.#wCapOf, (n) => new Float64Array(n));
      this.#wSegsOf = grow(this.#wSegsOf, (n) => new Uint32Array(n));
      this.#wNb = grow(this.#wNb, (n) => new Float64Array(n));
    }
    this.#wHead[k] = head;
    this.#wCapOf[k] = cap;
    this.#wSegsOf[k] = segs;
    this.#wN = k + 1;
    this.#wCap += cap;
    return k;
  }

  /** Records where writable stream byte `pos` of chain c lies (region, offset) at #wNb[at]. */
  #locate(c: DescriptorChain, pos: number, at: number): void {
    for (let i = 0; i < c.writableCount; i++) {
      const len = c.writableLen(i);
      if (pos < len) {
        this.#wNb[at] = c.writableRegion(i);
        this.#wNb[at + 1] = c.writableOffset(i) + pos;
        return;
      }
      pos -= len;
    }
  }

  /**
   * Copies the spilled tail of the current frame into newly popped chains; completes the frame once
   * all of it is placed. Returns null to go on, or why RX stops (no buffers yet: the frame waits).
   */
  #placeSpill(q: SplitQueue): RxStop | null {
    const spare = this.#spare!;
    while (this.#spill > 0) {
      if (this.#wN >= q.size) {
        // The frame would need more than the whole ring: give every chain back empty.
        for (let j = 0; j < this.#wN; j++) q.addUsed(this.#wHead[j], 0);
        q.publishUsed();
        this.counters.dropped++;
        this.#clearWindow();
        return null;
      }
      const c = q.popChain();
      if (c === null) return "no-buffers";
      if (q.broken !== null) return "error";
      if (!c.headValid) continue;
      if (c.error !== null || c.writableBytes < NET_HDR_SIZE) {
        this.counters.dropped++;
        q.pushUsed(c.head, 0);
        continue;
      }
      const n = Math.min(c.writableBytes, this.#spill);
      c.writeAt(0, spare.subarray(this.#spillOff, this.#spillOff + n));
      this.#spillOff += n;
      this.#spill -= n;
      this.#hold(c.head, c.writableBytes, 0);
    }
    this.#complete(q, this.#wN, this.#frameLen);
    return null;
  }

  /** Completes a frame of `len` bytes that fills the first k chains of the window, together. */
  #complete(q: SplitQueue, k: number, len: number): void {
    const c = this.#rxChain!;
    const nb = this.#wNb;
    c.regionBytes(nb[0])[nb[1]] = k & 0xff;
    c.regionBytes(nb[2])[nb[3]] = k >>> 8;
    let rem = len;
    let segs = 0;
    let cap = 0;
    for (let j = 0; j < k; j++) {
      const used = Math.min(this.#wCapOf[j], rem);
      q.addUsed(this.#wHead[j], used);
      rem -= used;
      segs += this.#wSegsOf[j];
      cap += this.#wCapOf[j];
    }
    q.publishUsed();
    const v = this.counters.values;
    v[0] += len - NET_HDR_SIZE;
    v[1]++;
    this.#spill = this.#spillOff = this.#frameLen = 0;
    if (k >= this.#wN) {
      this.#clearWindow();
      return;
    }
    const n = this.#wN;
    this.#wHead.copyWithin(0, k, n);
    this.#wCapOf.copyWithin(0, k, n);
    this.#wSegsOf.copyWithin(0, k, n);
    this.#wNb.copyWithin(0, 4 * k, 4 * n);
    this.#iov.copyWithin(0, 2 * segs, 2 * this.#wSegs);
    this.#wN = n - k;
    this.#wSegs -= segs;
    this.#wCap -= cap;
  }

  #clearWindow(): void {
    this.#wN = this.#wSegs = this.#wCap = 0;
    this.#spill = this.#spillOff = this.#frameLen = 0;
  }
}

/** What control commands change, supplied by the service that owns the taps. */
export interface NetControlHandler {
  /** VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with a count already checked against max_virtqueue_pairs. */
  setQueuePairs(pairs: number): boolean;
  /** VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET with the guest offload feature bits asked for. */
  setGuestOffloads(features: bigint): boolean;
}

/**
 * The control queue. A command is a device-readable stream — class u8, command u8, then the command's
 * data — and a device-writable ack byte. Descriptor boundaries do not matter. Supported, as in Cloud
 * Hypervisor: MQ VQ_PAIRS_SET (1 ≤ pairs ≤ max_virtqueue_pairs), GUEST_OFFLOADS_SET (only offloads
 * that were negotiated, and only with CTRL_GUEST_OFFLOADS), ANNOUNCE_ACK; the RX-mode and VLAN
 * commands are acknowledged and ignored (the tap delivers everything). Anything else, or a command with
 * too little data, is answered VIRTIO_NET_ERR. A chain without room for the ack is completed with
 * length 0.
 */
export class NetControl {
  /** Negotiated features (set at activation). */
  features = 0n;
  readonly #buf = new Uint8Array(16);
  readonly #view = new DataView(this.#buf.buffer);

  constructor(readonly maxPairs: number, readonly handler: NetControlHandler) {}

  /** Answers every available command; returns true when the driver should be interrupted. */
  process(q: SplitQueue): boolean {
    for (;;) {
      const c = q.popChain();
      if (c === null || q.broken !== null) break;
      if (!c.headValid) continue;
      if (c.error !== null || c.writableBytes < 1) {
        q.pushUsed(c.head, 0);
        continue;
      }
      c.writeByte(0, this.#command(c) ? NET_OK : NET_ERR);
      q.pushUsed(c.head, 1);
    }
    return q.needsInterrupt();
  }

  #command(c: DescriptorChain): boolean {
    const b = this.#buf;
    b.fill(0);
    const got = c.readAt(0, b);
    if (got < 2) return false;
    const cls = b[0], cmd = b[1], data = got - 2;
    const v = this.#view;
    switch (cls) {
      case NET_CTRL.MQ: {
        if (cmd !== MQ_VQ_PAIRS_SET || data < 2) return false;
        const pairs = v.getUint16(2, true);
        if (pairs < MQ_PAIRS_MIN || pairs > MQ_PAIRS_MAX || pairs > this.maxPairs) return false;
        return this.handler.setQueuePairs(pairs);
      }
      case NET_CTRL.GUEST_OFFLOADS: {
        if (cmd !== GUEST_OFFLOADS_SET || data < 8) return false;
        if ((this.features & featureBit(NET_F.CTRL_GUEST_OFFLOADS)) === 0n) return false;
        const asked = v.getBigUint64(2, true);
        const offloads = [
          NET_F.GUEST_CSUM,
          NET_F.GUEST_TSO4,
          NET_F.GUEST_TSO6,
          NET_F.GUEST_ECN,
          NET_F.GUEST_UFO,
        ]
          .reduce((m, bit) => m | featureBit(bit), 0n);
        if ((asked & ~(offloads & this.features)) !== 0n) return false;
        return this.handler.setGuestOffloads(asked);
      }
      case NET_CTRL.ANNOUNCE:
        return cmd === ANNOUNCE_ACK;
      case NET_CTRL.RX:
        return cmd < RX_CMDS && data >= 1;
      case NET_CTRL.VLAN:
        return cmd < VLAN_CMDS && data >= 2;
      default:
        return false;
    }
  }
}
