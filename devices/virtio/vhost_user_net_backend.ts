/**
 * dvmm's vhost-user-net back-end (`dvmm vhost-user-net --net-backend "..."`), the counterpart of Cloud
 * Hypervisor's `vhost_user_net` program: it listens on a UNIX socket, serves one front-end at a time
 * (the protocol side is vhost_user_backend.ts) and moves frames between the rings in the guest memory it
 * was given and a tap, one tap queue per queue pair.
 *
 * The data path is the in-VMM virtio-net's: a {@link NetService} (device_net.ts) over the tap queues
 * serves the RX and TX rings with the same {@link NetDevice} code (net.ts) and the same queue parsing
 * (queue.ts), so hostile ring contents are handled the same way (a bad chain drops its frame; a ring the
 * driver broke is stopped and logged). One thread waits in one epoll set on the listening socket, the
 * connection, every ring's kick eventfd and the tap queues being polled; a ring whose driver should be
 * interrupted gets its call eventfd signalled.
 *
 * The control queue is not the back-end's: the front-end (dvmm's `--net vhost_user=on`, or Cloud
 * Hypervisor) handles it and tells the back-end which pairs are in use by enabling their rings
 * (SET_VRING_ENABLE); the tap queues of pairs not in use are detached, as the in-VMM device does.
 */
import { check, EINTR, shim } from "../../ffi/shim.ts";
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN } from "../../ffi/kvm_constants.ts";
import { accept, unixListen } from "../../ffi/socket.ts";
import { parseOptions } from "../../vmm/config.ts";
import { F, featureBit, NET_F } from "./constants.ts";
import { NetService, type NetServiceOptions } from "./device_net.ts";
import { DEFAULT_MTU, NetCounters } from "./net.ts";
import { openTap, parseIpv4, parseMac } from "./tap.ts";
import { PROTOCOL_F } from "./vhost_user.ts";
import { VhostUserBackendConnection, type VhostUserBackendDevice } from "./vhost_user_backend.ts";

/** The `--net-backend` options (Cloud Hypervisor's `vhost_user_net` spelling and defaults). */
export interface NetBackendOptions {
  /** Host-side address and netmask of the tap (default 192.168.100.1/255.255.255.0). */
  ip: string;
  mask: string;
  /** Where to listen for the front-end. */
  socket: string;
  /** Rings: two per queue pair (default 2). */
  numQueues: number;
  /** Largest ring size accepted (default 256). */
  queueSize: number;
  /** Tap interface name (default: the kernel picks one). */
  tap?: string;
  /** Host-side MAC of the tap. */
  hostMac?: string;
  /** MTU of the tap. */
  mtu?: number;
}

export const NET_BACKEND_USAGE =
  'dvmm vhost-user-net --net-backend "ip=<addr>,mask=<mask>,socket=<path>[,num_queues=<2N>][,queue_size=<size>][,tap=<name>][,host_mac=<mac>][,mtu=<mtu>]"';

/** Parses the `--net-backend` value; throws with the key at fault. */
export function parseNetBackend(value: string): NetBackendOptions {
  const o = "--net-backend";
  const v = parseOptions(o, value, [
    "tap",
    "ip",
    "host_mac",
    "mask",
    "mtu",
    "queue_size",
    "num_queues",
    "socket",
    "client",
    "mac",
  ]);
  if (v.toggle("client")) {
    v.fail("client=on (connecting to a listening front-end) is not implemented in dvmm's back-end");
  }
  if (v.string("mac") !== undefined) {
    v.fail("mac= is not implemented in dvmm's back-end: the front-end gives the guest its MAC (--net mac=)");
  }
  const ip = v.string("ip") ?? "192.168.100.1";
  const mask = v.string("mask") ?? "255.255.255.0";
  try {
    parseIpv4(ip);
    parseIpv4(mask);
  } catch (e) {
    v.fail((e as Error).message);
  }
  const hostMac = v.string("host_mac");
  if (hostMac !== undefined) {
    try {
      parseMac(hostMac);
    } catch (e) {
      v.fail(`host_mac: ${(e as Error).message}`);
    }
  }
  const numQueues = v.int("num_queues") ?? 2;
  if (numQueues < 2 || numQueues % 2 !== 0 || numQueues > 512) {
    v.fail(`num_queues=${numQueues}: an even number from 2 to 512 (one RX and one TX ring per pair)`);
  }
  const queueSize = v.int("queue_size", "u16") ?? 256;
  if (queueSize < 2 || (queueSize & (queueSize - 1)) !== 0 || queueSize > 32768) {
    v.fail(`queue_size=${queueSize}: a power of two up to 32768`);
  }
  const mtu = v.int("mtu", "u16");
  if (mtu !== undefined && mtu < 1280) v.fail(`mtu=${mtu}: at least 1280`);
  return {
    ip,
    mask,
    socket: v.required("socket", "socket=<path>"),
    numQueues,
    queueSize,
    tap: v.string("tap"),
    hostMac,
    mtu,
  };
}

/**
 * Features the back-end offers: what dvmm's virtio-net data path handles (offloads both ways,
 * mergeable RX buffers, event index, indirect descriptors), plus CTRL_VQ and MQ so a front-end may
 * offer them (the control queue itself stays with the front-end).
 */
export function netBackendFeatures(): bigint {
  return [
    F.VERSION_1,
    F.EVENT_IDX,
    F.INDIRECT_DESC,
    NET_F.CSUM,
    NET_F.GUEST_CSUM,
    NET_F.GUEST_TSO4,
    NET_F.GUEST_TSO6,
    NET_F.GUEST_ECN,
    NET_F.GUEST_UFO,
    NET_F.HOST_TSO4,
    NET_F.HOST_TSO6,
    NET_F.HOST_ECN,
    NET_F.HOST_UFO,
    NET_F.MRG_RXBUF,
    NET_F.CTRL_VQ,
    NET_F.MQ,
  ].reduce((m, b) => m | featureBit(b), 0n);
}

/** Epoll tags: ring kicks use their ring index; tap queue k serving RX ring 2k uses TAP_TAG + 2k. */
const TAP_TAG = 0x10000;
const LISTEN_TAG = 0x20000;
const SOCKET_TAG = 0x20001;
const STOP_TAG = 0x20002;

/** The net device behind one back-end: the tap queues and the service over them. */
export class VhostUserNetDevice implements VhostUserBackendDevice {
  readonly features = netBackendFeatures();
  readonly protocolFeatures = featureBit(PROTOCOL_F.MQ) | featureBit(PROTOCOL_F.REPLY_ACK);
  readonly numQueues: number;
  readonly service: NetService;
  readonly counters = new NetCounters();
  #active = false;
  #features = -1n;
  #pairs = 0;

  /**
   * `tapFds`: one per queue pair; `setPolling(fd, ring, on)` switches the epoll interest in a tap
   * queue whose readiness serves RX ring `ring`.
   */
  constructor(
    readonly tapFds: number[],
    readonly maxQueueSize: number,
    setPolling: (fd: number, ring: number, on: boolean) => void,
    readonly log: (msg: string) => void,
    opts: NetServiceOptions = {},
  ) {
    this.numQueues = 2 * tapFds.length;
    this.service = new NetService(tapFds, this.counters, {
      setPolling: (k, on) => setPolling(tapFds[k], 2 * k, on),
      warn: log,
    }, opts);
  }

  /** Pairs whose RX and TX rings are both running, counted from pair 0. */
  #readyPairs(conn: VhostUserBackendConnection): number {
    let n = 0;
    while (n < this.tapFds.length && conn.queue(2 * n) && conn.queue(2 * n + 1)) n++;
    return n;
  }

  ringsChanged(conn: VhostUserBackendConnection): void {
    const any = conn.rings.some((r) => r.queue !== null);
    if (!any) {
      if (this.#active) this.service.deactivate();
      this.#active = false;
      this.#pairs = 0;
      return;
    }
    if (!this.#active || this.#features !== conn.ackedFeatures) {
      if (this.#active) this.service.deactivate();
      this.service.activate(conn.ackedFeatures);
      this.#active = true;
      this.#features = conn.ackedFeatures;
      this.#pairs = 1;
    }
    const pairs = Math.max(1, this.#readyPairs(conn));
    if (pairs !== this.#pairs) {
      this.service.setActivePairs(pairs);
      this.#pairs = pairs;
    }
  }

  /** Serves ring `i` (a kick, or tap readiness for an RX ring); never throws. */
  serve(conn: VhostUserBackendConnection, i: number): void {
    const q = conn.queue(i);
    if (!q) return;
    let irq = false;
    try {
      irq = this.service.service(q, i);
    } catch (e) {
      conn.stopRing(i, `${(e as Error).message}`);
      return;
    }
    if (q.broken !== null) conn.stopRing(i, `the driver broke the ring (${q.broken})`);
    if (irq) conn.signal(i);
  }
}

/** Hooks for running the back-end inside a test. */
export interface NetBackendHooks {
  log?: (msg: string) => void;
  /** Called once the socket listens. */
  listening?: () => void;
  /** An eventfd whose readiness ends the loop. */
  stopFd?: number;
  /** Serve this many front-ends, then return (default: forever). */
  connections?: number;
}

/**
 * Runs the back-end: opens the tap, listens on the socket and serves front-ends one at a time until
 * `hooks.stopFd` fires (or forever). Throws only for set-up failures (tap, socket).
 */
export function runNetBackend(o: NetBackendOptions, hooks: NetBackendHooks = {}): void {
  const log = hooks.log ?? ((m: string) => console.error(`dvmm vhost-user-net: ${m}`));
  const s = shim();
  const pairs = o.numQueues / 2;
  const tap = openTap({
    name: o.tap ?? "",
    ip: o.ip,
    mask: o.mask,
    hostMac: o.hostMac,
    mtu: o.mtu,
    queues: pairs,
  });
  const epfd = check(s.kvs_epoll_create(), "epoll_create");
  let listener = -1;
  let conn: VhostUserBackendConnection | null = null;
  try {
    try {
      if (Deno.lstatSync(o.socket).isSocket) Deno.removeSync(o.socket);
    } catch { /* absent */ }
    listener = unixListen(o.socket, 1);
    check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, listener, EPOLLIN, LISTEN_TAG), "epoll_ctl listener");
    if (hooks.stopFd !== undefined) {
      check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, hooks.stopFd, EPOLLIN, STOP_TAG), "epoll_ctl stop");
    }
    const dev = new VhostUserNetDevice(
      tap.fds,
      o.queueSize,
      (fd, ring, on) =>
        on
          ? s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, TAP_TAG + ring)
          : s.kvs_epoll_ctl(epfd, EPOLL_CTL_DEL, fd, 0, 0),
      log,
      { mtu: tap.mtu ?? DEFAULT_MTU },
    );
    log(`tap ${tap.name} (${pairs} queue pair(s), MTU ${tap.mtu}), listening on ${o.socket}`);
    hooks.listening?.();
    const out = new BigUint64Array(32);
    const outBytes = new Uint8Array(out.buffer);
    const drain = new Uint8Array(8);
    let served = 0;
    for (;;) {
      const n = Number(s.kvs_epoll_wait(epfd, outBytes, out.length, -1));
      if (n === -EINTR) continue;
      if (n < 0) throw new Error(`epoll_wait: errno ${-n}`);
      for (let k = 0; k < n; k++) {
        const tag = Number(out[k]);
        if (tag === STOP_TAG) return;
        if (tag === LISTEN_TAG) {
          const fd = accept(listener);
          if (fd === null) continue;
          if (conn) {
            log("a second front-end was refused: one at a time");
            s.kvs_close(fd);
            continue;
          }
          conn = new VhostUserBackendConnection(fd, dev, epfd, log);
          check(s.kvs_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, SOCKET_TAG), "epoll_ctl connection");
          log("front-end connected");
        } else if (tag === SOCKET_TAG) {
          if (conn && !conn.handle()) {
            s.kvs_epoll_ctl(epfd, EPOLL_CTL_DEL, conn.fd, 0, 0);
            conn.close();
            conn = null;
            log(`front-end disconnected; ${JSON.stringify(dev.counters.snapshot())}`);
            if (hooks.connections !== undefined && ++served >= hooks.connections) return;
            // Later events of this batch were for the connection that is gone.
            break;
          }
        } else if (conn) {
          const ring = tag >= TAP_TAG ? tag - TAP_TAG : tag;
          if (tag < TAP_TAG) s.kvs_read_i32(conn.rings[ring]?.kickFd ?? -1, drain, 8);
          dev.serve(conn, ring);
        }
      }
    }
  } finally {
    if (conn) conn.close();
    for (const fd of tap.fds) s.kvs_close(fd);
    if (listener >= 0) {
      s.kvs_close(listener);
      try {
        Deno.removeSync(o.socket);
      } catch { /* gone */ }
    }
    s.kvs_close(epfd);
  }
}
