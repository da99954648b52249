/**
 * virtio-net in a device worker: the tap as a {@link NetBackend} (readv/writev straight between the
 * tap and guest memory), and the queue service policy around {@link NetDevice}.
 *
 * The tap fd sits in the worker's epoll next to the queue eventfds; readiness means "serve the RX
 * queue". Polling it is switched off while the device is not active, and while the guest has no RX
 * buffers (level-triggered epoll would otherwise spin): frames then wait in the tap's queue (the kernel
 * drops beyond its length) until the guest's RX notify, which serves the queue and switches it back on.
 */
import { shim } from "../../ffi/shim.ts";
import { type NetBackend, NetCounters, NetDevice, RX_QUEUE, tapOffloadFor, TX_QUEUE } from "./net.ts";
import type { SplitQueue } from "./queue.ts";
import { setTapOffload } from "./tap.ts";

/** A tap fd (non-blocking, 12-byte vnet header) as a NetBackend. */
export class TapBackend implements NetBackend {
  constructor(readonly fd: number) {}
  writev(iov: BigUint64Array, count: number): number {
    return shim().kvs_writev_i32(this.fd, iov, count);
  }
  readv(iov: BigUint64Array, count: number): number {
    return shim().kvs_readv_i32(this.fd, iov, count);
  }
}

/** What the worker gives the net service: switching the tap's readiness polling, and a logger. */
export interface NetServiceHost {
  setPolling(on: boolean): void;
  warn(message: string): void;
}

/** The worker-side policy of one virtio-net device over a tap. */
export class NetService {
  readonly device: NetDevice;
  #warned = false;

  constructor(
    readonly tapFd: number,
    counters: NetCounters,
    readonly host: NetServiceHost,
    backend: NetBackend = new TapBackend(tapFd),
  ) {
    this.device = new NetDevice(backend, counters);
  }

  /** The driver set DRIVER_OK with `features`: match the tap's offloads and start receiving. */
  activate(features: bigint): void {
    try {
      setTapOffload(this.tapFd, tapOffloadFor(features));
    } catch (e) {
      this.host.warn(`TUNSETOFFLOAD: ${(e as Error).message}`);
    }
    this.host.setPolling(true);
  }

  /** Reset (or a broken RX queue): stop receiving. */
  deactivate(): void {
    this.host.setPolling(false);
  }

  /** Serves queue `index` after a notify (RX: also after tap readiness). Returns true to interrupt. */
  service(q: SplitQueue, index: number): boolean {
    if (index === TX_QUEUE) {
      let irq = false;
      do {
        if (this.device.processTx(q)) irq = true;
        if (q.broken !== null) break;
      } while (q.enableNotification());
      return irq;
    }
    if (index !== RX_QUEUE) return false;
    const out = { irq: false };
    for (;;) {
      const stop = this.device.processRx(q, out);
      if (stop === "empty") {
        this.host.setPolling(true);
        break;
      }
      if (stop === "error") {
        if (!this.#warned && this.device.lastRxErrno) {
          this.#warned = true;
          this.host.warn(
            `tap read failed (errno ${this.device.lastRxErrno}); RX paused until the next notify`,
          );
        }
        this.host.setPolling(false);
        break;
      }
      // No buffers: buffers the driver added meanwhile are served now, otherwise wait for its notify.
      if (q.enableNotification() && q.broken === null) continue;
      this.host.setPolling(false);
      break;
    }
    return out.irq;
  }
}
