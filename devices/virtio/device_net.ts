/**
 * virtio-net in a device worker: each tap queue as a {@link NetBackend} (readv/writev straight between
 * the tap and guest memory), and the service policy around one {@link NetDevice} per queue pair and
 * the control queue.
 *
 * One worker serves every queue pair of a device: its epoll set holds every queue eventfd and the tap
 * queue fds being polled (readiness of tap queue k serves receiveq 2k). Cloud Hypervisor runs a thread per pair;
 * dvmm does not, because here a thread is a Worker, i.e. a V8 isolate of its own: measured at about
 * 10 MiB of resident memory and 17 ms of start-up (module graph, compile) per extra device worker on
 * the development host, ~18x the time in the lab; before its JIT warms up, each runs slowly. With 8
 * pairs that is 80 MiB and a noticeable share of boot time, buying little: every processing pass
 * holds the device lock (a driver reset must never overlap one), so workers of one device would mostly
 * take turns; the JavaScript per frame is small beside the readv/writev system calls it issues; and
 * one epoll_wait hands over every ready queue and tap at once. What multi-queue is for in the guest is
 * kept: a TX queue per vCPU without a shared lock, RX interrupts spread over vCPUs, and one tap queue
 * per pair so a flow keeps its queue.
 *
 * A tap fd's readiness means "serve that pair's RX queue". Polling it means having it in the epoll set
 * (a detached tap queue reports EPOLLERR whatever the interest mask). It is off while the device is not
 * active, while its pair is not in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; the tap queue is detached
 * then), before the driver first notified that RX queue (so a queue the driver never set up cannot
 * make the worker spin), and while the guest has no RX buffers (level-triggered epoll would spin):
 * frames then wait in the tap queue (the kernel drops beyond its length) until the guest's RX notify,
 * which serves the queue and switches polling back on.
 *
 * Queue pairs in use: one after activation, as the virtio spec says, until the driver sets more (Linux
 * asks for min(vCPUs, max pairs) at probe). The tap queues of the other pairs are detached so the
 * kernel steers no flow to them; a frame the driver still transmits on such a pair goes out through
 * pair 0's tap queue.
 */
import { shim } from "../../ffi/shim.ts";
import { featureBit, NET_F } from "./constants.ts";
import type { VirtioDeviceDescriptor } from "./device_shared.ts";
import {
  ctrlQueueIndex,
  DEFAULT_MTU,
  MAX_GSO_FRAME,
  type NetBackend,
  NetControl,
  NetCounters,
  NetDevice,
  tapOffloadFor,
} from "./net.ts";
import type { SplitQueue } from "./queue.ts";
import { setTapOffload, setTapQueue } from "./tap.ts";

/** Ethernet + VLAN headers on top of the MTU: the largest frame without GSO. */
const FRAME_OVERHEAD = 14 + 4;
/** TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO: offloads that let the tap hand over 64 KiB frames. */
const TUN_GSO = 0x02 | 0x04 | 0x10;

/** A tap queue fd (non-blocking, 12-byte vnet header) as a NetBackend. */
export class TapBackend implements NetBackend {
  constructor(readonly fd: number) {}
  writev(iov: BigUint64Array, count: number): number {
    return shim().kvs_writev_i32(this.fd, iov, count);
  }
  readv(iov: BigUint64Array, count: number): number {
    return shim().kvs_readv_i32(this.fd, iov, count);
  }
}

/** What the worker gives the net service: switching a tap queue's readiness polling, and a logger. */
export interface NetServiceHost {
  setPolling(pair: number, on: boolean): void;
  warn(message: string): void;
}

/** The tap operations the service uses (replaced in tests). */
export interface TapControl {
  /** TUNSETOFFLOAD; throws on failure. */
  setOffload(fd: number, flags: number): void;
  /** TUNSETQUEUE attach/detach; 0 or -errno. */
  setQueue(fd: number, attach: boolean): number;
}

const realTap: TapControl = { setOffload: setTapOffload, setQueue: setTapQueue };

export interface NetServiceOptions {
  /** The tap's MTU (frames without GSO are at most this + Ethernet/VLAN headers); default 1500. */
  mtu?: number;
  /** One backend per pair instead of TapBackends over the fds (tests). */
  backends?: NetBackend[];
  tap?: TapControl;
}

interface Pair {
  fd: number;
  device: NetDevice;
  /** Readiness polling of the tap queue is on. */
  polling: boolean;
  /** The driver notified this pair's RX queue since activation: the queue exists. */
  rxSeen: boolean;
  /** The tap queue is attached (gets frames). */
  attached: boolean;
}

/** The worker-side policy of one virtio-net device over its tap queues. */
export class NetService {
  readonly pairs: Pair[];
  readonly control: NetControl;
  readonly #host: NetServiceHost;
  readonly #tap: TapControl;
  readonly #mtu: number;
  #active = 1;
  #ctrl = -1;
  #features = 0n;
  #warned = new Set<string>();

  constructor(tapFds: number[], counters: NetCounters, host: NetServiceHost, opts: NetServiceOptions = {}) {
    if (tapFds.length < 1) throw new Error("virtio-net needs at least one tap queue");
    this.#host = host;
    this.#tap = opts.tap ?? realTap;
    this.#mtu = opts.mtu ?? DEFAULT_MTU;
    this.pairs = tapFds.map((fd, k) => ({
      fd,
      device: new NetDevice(opts.backends?.[k] ?? new TapBackend(fd), counters),
      polling: false,
      rxSeen: false,
      attached: true,
    }));
    this.control = new NetControl(tapFds.length, {
      setQueuePairs: (n) => this.#setActive(n),
      setGuestOffloads: (f) => this.#setOffloads(f),
    });
  }

  /** Queue pairs in use. */
  get activePairs(): number {
    return this.#active;
  }

  #warnOnce(key: string, message: string): void {
    if (this.#warned.has(key)) return;
    this.#warned.add(key);
    this.#host.warn(message);
  }

  #poll(k: number, on: boolean): void {
    const p = this.pairs[k];
    if (p.polling === on) return;
    p.polling = on;
    this.#host.setPolling(k, on);
  }

  /** The driver set DRIVER_OK with `features`: match the tap's offloads, one pair in use. */
  activate(features: bigint): void {
    this.#features = features;
    this.control.features = features;
    this.#ctrl = ctrlQueueIndex(features, this.pairs.length);
    const offloads = tapOffloadFor(features);
    const maxFrame = offloads & TUN_GSO ? MAX_GSO_FRAME : this.#mtu + FRAME_OVERHEAD;
    const mergeable = (features & featureBit(NET_F.MRG_RXBUF)) !== 0n;
    for (const p of this.pairs) {
      p.device.configure(mergeable, maxFrame);
      p.rxSeen = false;
    }
    this.#setOffloads(features);
    // Polling starts per pair when its RX queue is first served (the worker serves every queue now).
    this.#setActive(1);
  }

  /**
   * Uses queue pairs [0, n) (their tap queues attached, the others detached): the virtio-net control
   * queue's VQ_PAIRS_SET, or a vhost-user back-end following the rings the front-end enables.
   */
  setActivePairs(n: number): boolean {
    return this.#setActive(Math.max(1, Math.min(n, this.pairs.length)));
  }

  /** RX chains pair `index / 2` holds for frames not received yet (mergeable RX). */
  heldChains(index: number): number {
    const p = index % 2 === 0 ? this.pairs[index / 2] : undefined;
    return p ? p.device.heldChains : 0;
  }

  /** Saved with the device: the queue pairs in use. */
  saveWords(words: Int32Array): void {
    words[0] = this.#active;
  }
  loadWords(words: Int32Array): void {
    if (words[0] > 0) this.setActivePairs(words[0]);
  }

  /** Reset: stop receiving. */
  deactivate(): void {
    for (let k = 0; k < this.pairs.length; k++) {
      this.#poll(k, false);
      this.pairs[k].rxSeen = false;
    }
  }

  /** TUNSETOFFLOAD for the guest offloads in `features` (one call: the offloads are the tap's). */
  #setOffloads(features: bigint): boolean {
    try {
      this.#tap.setOffload(this.pairs[0].fd, tapOffloadFor(features));
      return true;
    } catch (e) {
      this.#warnOnce("offload", `TUNSETOFFLOAD: ${(e as Error).message}`);
      return false;
    }
  }

  /** Uses pairs [0, n): their tap queues attached and polled, the others detached. */
  #setActive(n: number): boolean {
    let ok = true;
    for (let k = 0; k < this.pairs.length; k++) {
      const p = this.pairs[k];
      const use = k < n;
      if (p.attached !== use) {
        const r = this.#tap.setQueue(p.fd, use);
        if (r < 0 && use) ok = false;
        if (r < 0) {
          this.#warnOnce(`queue${k}`, `TUNSETQUEUE ${use ? "attach" : "detach"} queue ${k}: errno ${-r}`);
        } else p.attached = use;
      }
      p.device.txBackend = p.attached ? p.device.backend : this.pairs[0].device.backend;
      // A pair newly in use polls (its RX service turns that off again when it has no buffers).
      if (!use) this.#poll(k, false);
      else if (k >= this.#active && p.rxSeen) this.#poll(k, true);
    }
    this.#active = n;
    return ok;
  }

  /** Serves queue `index` after a notify (RX: also after tap readiness). Returns true to interrupt. */
  service(q: SplitQueue, index: number): boolean {
    if (index === this.#ctrl) {
      let irq = false;
      do {
        if (this.control.process(q)) irq = true;
        if (q.broken !== null) break;
      } while (q.enableNotification());
      return irq;
    }
    const k = index >> 1;
    if (k >= this.pairs.length || (this.#ctrl >= 0 && index > this.#ctrl)) return false;
    const p = this.pairs[k];
    if (index & 1) {
      let irq = false;
      do {
        if (p.device.processTx(q)) irq = true;
        if (q.broken !== null) break;
      } while (q.enableNotification());
      return irq;
    }
    p.rxSeen = true;
    if (k >= this.#active) return false; // buffers wait until the pair is used again
    const out = { irq: false };
    for (;;) {
      const stop = p.device.processRx(q, out);
      if (stop === "empty") {
        this.#poll(k, true);
        break;
      }
      if (stop === "error") {
        if (p.device.lastRxErrno) {
          this.#warnOnce(
            `rx${k}`,
            `tap queue ${k} read failed (errno ${p.device.lastRxErrno}); RX paused until the next notify`,
          );
        }
        this.#poll(k, false);
        break;
      }
      // No buffers: buffers the driver added meanwhile are served now, otherwise wait for its notify.
      if (q.enableNotification() && q.broken === null) continue;
      this.#poll(k, false);
      break;
    }
    return out.irq;
  }

  /** Negotiated features (for tests and logs). */
  get features(): bigint {
    return this.#features;
  }
}

/**
 * The service for a device worker. `setPolling(fd, queue, on)` switches the worker's epoll interest in
 * a tap queue fd whose readiness serves `queue`.
 */
export function netService(
  d: VirtioDeviceDescriptor,
  setPolling: (fd: number, queue: number, on: boolean) => void,
): NetService {
  const n = d.net!;
  const svc: NetService = new NetService(n.tapFds, new NetCounters(d.counters), {
    setPolling: (k, on) => setPolling(n.tapFds[k], 2 * k, on),
    warn: (m) => console.warn(`dvmm: virtio-net ${d.id} (${n.tap}): ${m}`),
  }, { mtu: n.mtu });
  return svc;
}
