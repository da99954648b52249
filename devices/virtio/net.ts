/**
 * virtio-net (virtio 1.x, "Network Device") frame processing: the device side of the RX and TX queues
 * over a {@link NetBackend} (a tap in production, a fake in tests). Transport, threads, interrupts and
 * the tap's set-up live elsewhere (device_net.ts, tap.ts, worker.ts).
 *
 * Every frame on either queue starts with the 12-byte virtio-net header (VERSION_1 always includes
 * num_buffers). The tap is opened with a vnet header of the same size, so frames pass through with
 * their headers, zero-copy: the chain's segments become the iovecs of one writev / readv.
 *
 * Queue layout (no multiqueue, no control queue): 0 = receiveq, 1 = transmitq.
 *
 * Hostile chains never throw: a chain with a descriptor error, too few bytes for a header, or more
 * segments than an iovec allows is completed with length 0 (its frame is dropped) and counted.
 */
import { EAGAIN, EINTR } from "../../ffi/shim.ts";
import { F, featureBit, NET_F } from "./constants.ts";
import type { DescriptorChain, SplitQueue } from "./queue.ts";

/** virtio-net header size with VERSION_1 (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers). */
export const NET_HDR_SIZE = 12;
/** Smallest frame worth handing on: an Ethernet header. */
const ETH_HLEN = 14;
/** Most segments in one readv/writev (Linux IOV_MAX). */
export const MAX_IOV = 1024;
/** Device configuration space size: mac[6], status u16, max_virtqueue_pairs u16, mtu u16. */
export const NET_CONFIG_SIZE = 12;
/** VIRTIO_NET_S_LINK_UP. */
export const NET_S_LINK_UP = 1;

export const RX_QUEUE = 0;
export const TX_QUEUE = 1;

/** Where frames go to and come from. Both calls return a byte count or -errno. */
export interface NetBackend {
  /** Sends one frame (header first) gathered from `count` iovecs (u64 base, u64 len pairs). */
  writev(iov: BigUint64Array, count: number): number;
  /** Receives one frame (header first) into `count` iovecs; -EAGAIN when none is waiting. */
  readv(iov: BigUint64Array, count: number): number;
}

/** Which offloads the device offers (each only if the tap is configured to match). */
export interface NetOffloads {
  csum?: boolean;
  tso?: boolean;
}

/** Features offered by a virtio-net device. */
export function netFeatures(o: NetOffloads = {}): bigint {
  let f = featureBit(F.VERSION_1) | featureBit(NET_F.MAC) | featureBit(NET_F.STATUS) |
    featureBit(F.EVENT_IDX) | featureBit(F.INDIRECT_DESC);
  if (o.csum) {
    f |= featureBit(NET_F.CSUM) | featureBit(NET_F.GUEST_CSUM);
    if (o.tso) {
      for (const b of [NET_F.HOST_TSO4, NET_F.HOST_TSO6, NET_F.HOST_ECN]) f |= featureBit(b);
      for (const b of [NET_F.GUEST_TSO4, NET_F.GUEST_TSO6, NET_F.GUEST_ECN]) f |= featureBit(b);
    }
  }
  return f;
}

/** TUN_F_* offload bits (linux/if_tun.h) matching the features the guest accepted. */
export function tapOffloadFor(features: bigint): number {
  const has = (b: number) => (features & featureBit(b)) !== 0n;
  let t = 0;
  if (has(NET_F.GUEST_CSUM)) {
    t |= 0x01; // TUN_F_CSUM
    if (has(NET_F.GUEST_TSO4)) t |= 0x02;
    if (has(NET_F.GUEST_TSO6)) t |= 0x04;
    if ((t & 0x06) && has(NET_F.GUEST_ECN)) t |= 0x08;
  }
  return t;
}

/** The device configuration space. */
export function netConfigSpace(mac: Uint8Array, queuePairs = 1): Uint8Array {
  const b = new Uint8Array(NET_CONFIG_SIZE);
  const v = new DataView(b.buffer);
  b.set(mac.subarray(0, 6), 0);
  v.setUint16(6, NET_S_LINK_UP, true);
  v.setUint16(8, queuePairs, true);
  return b;
}

/** Counter names (Cloud Hypervisor's); bytes count frames without the virtio-net header. */
export const NET_COUNTERS = ["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"] as const;

/** Net counters in a Float64Array, optionally over a SharedArrayBuffer read by the main thread. */
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
  /** Last backend errno that stopped RX (other than EAGAIN), for the worker's log. */
  lastRxErrno = 0;
  #iov = new BigUint64Array(2 * 64);
  static readonly #ONE = new Uint8Array([1, 0]);

  constructor(readonly backend: NetBackend, counters?: NetCounters) {
    this.counters = counters ?? new NetCounters();
  }

  #ensureIov(n: number): BigUint64Array {
    if (this.#iov.length < 2 * n) {
      let len = this.#iov.length;
      while (len < 2 * n) len *= 2;
      this.#iov = new BigUint64Array(len);
    }
    return this.#iov;
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
    const iov = this.#ensureIov(n);
    for (let i = 0; i < n; i++) {
      iov[2 * i] = c.readableHost(i);
      iov[2 * i + 1] = BigInt(c.readableLen(i));
    }
    let r: number;
    do r = this.backend.writev(iov, n); while (r === -EINTR);
    if (r < 0) {
      this.counters.dropped++;
      return;
    }
    const v = this.counters.values;
    v[2] += c.readableBytes - NET_HDR_SIZE;
    v[3]++;
  }

  /**
   * Moves waiting frames from the backend into available RX chains until the backend is empty, the
   * queue has no buffers, or the backend fails. `irq` is set when the driver should be interrupted.
   */
  processRx(q: SplitQueue, out: { irq: boolean }): RxStop {
    let stop: RxStop = "no-buffers";
    let failures = 0;
    for (;;) {
      const chain = q.popChain();
      if (chain === null) break;
      if (q.broken !== null) {
        stop = "error";
        break;
      }
      if (!chain.headValid) continue;
      const n = chain.writableCount;
      if (chain.error !== null || chain.writableBytes < NET_HDR_SIZE + ETH_HLEN || n > MAX_IOV) {
        this.counters.dropped++;
        q.pushUsed(chain.head, 0);
        continue;
      }
      const iov = this.#ensureIov(n);
      for (let i = 0; i < n; i++) {
        iov[2 * i] = chain.writableHost(i);
        iov[2 * i + 1] = BigInt(chain.writableLen(i));
      }
      let r: number;
      do r = this.backend.readv(iov, n); while (r === -EINTR);
      if (r < 0 || r < NET_HDR_SIZE) {
        // Give the chain back: it was not used. EAGAIN: nothing waiting. EFAULT/EINVAL: the backend
        // dropped a frame that did not fit; try the next one with the same buffers. Anything else stops.
        q.lastAvailIdx = (q.lastAvailIdx - 1) & 0xffff;
        if (r === -EAGAIN) {
          stop = "empty";
          break;
        }
        this.counters.dropped++;
        const dropped = r >= 0 || r === -14 /* EFAULT */ || r === -22; /* EINVAL */
        if (dropped && ++failures < 64) continue;
        this.lastRxErrno = r < 0 ? -r : 0;
        stop = "error";
        break;
      }
      chain.writeAt(10, NetDevice.#ONE); // num_buffers = 1
      q.pushUsed(chain.head, r);
      const v = this.counters.values;
      v[0] += r - NET_HDR_SIZE;
      v[1]++;
    }
    if (q.needsInterrupt()) out.irq = true;
    return stop;
  }
}
