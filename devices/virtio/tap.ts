/**
 * Linux TAP devices for virtio-net (see the kernel's Documentation/networking/tuntap.rst).
 *
 * The main thread opens (or adopts) the tap: /dev/net/tun + TUNSETIFF with IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, so every frame read or written is preceded by a virtio-net header, whose size is set to
 * 12 bytes (virtio 1.x's header always carries num_buffers). The host side gets its IPv4 address,
 * netmask and IFF_UP through ioctls on an AF_INET datagram socket. The fd is made non-blocking: the
 * device worker polls it with epoll and reads until EAGAIN.
 *
 * Offloads (TUNSETOFFLOAD) are set by the device worker once the guest's features are known: the tap
 * may only hand the guest what the guest accepted.
 *
 * Multi-queue (a device with several queue pairs): the tap is created with IFF_MULTI_QUEUE and opened
 * once per pair, each fd being one tap queue; or the caller hands over one fd per pair. The device
 * worker detaches the queues of the pairs the driver does not use (TUNSETQUEUE), so the kernel never
 * steers a flow to a queue nobody reads.
 *
 * As Cloud Hypervisor: a tap opened by name that already existed keeps its IP configuration (ip/mask
 * are only given to a tap dvmm creates), while host_mac and mtu are set either way; for taps handed
 * over as fds only the MTU is set. The device advertises the tap's MTU as it stands after that.
 */
import { check, cstr, OsError, shim } from "../../ffi/shim.ts";
import { O_RDWR } from "../../ffi/kvm_constants.ts";
import { log } from "../../vmm/log.ts";

// ioctl numbers (_IOW('T', n, int) etc.) and flags from <linux/if_tun.h> and <linux/sockios.h>.
export const TUNSETIFF = 0x400454ca;
export const TUNGETIFF = 0x800454d2;
export const TUNSETOFFLOAD = 0x400454d0;
export const TUNSETVNETHDRSZ = 0x400454d8;
export const TUNSETQUEUE = 0x400454d9;
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const IFF_MULTI_QUEUE = 0x0100;
export const IFF_ATTACH_QUEUE = 0x0200;
export const IFF_DETACH_QUEUE = 0x0400;
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_UFO = 0x10;
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;
const SIOCGIFMTU = 0x8921;
const SIOCSIFMTU = 0x8922;
const SIOCSIFADDR = 0x8916;
const SIOCSIFNETMASK = 0x891c;
const SIOCSIFHWADDR = 0x8924;
const IFF_UP = 0x1;
const AF_INET = 2;
const SOCK_DGRAM = 2;
const ARPHRD_ETHER = 1;
const F_GETFL = 3;
const F_SETFL = 4;
const O_NONBLOCK = 0x800;
const IFNAMSIZ = 16;
const IFREQ_SIZE = 40;

/** Size of the virtio-net header in front of every frame (virtio 1.x: virtio_net_hdr + num_buffers). */
export const VNET_HDR_SIZE = 12;

function ifreq(name: string): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(IFREQ_SIZE);
  const n = new TextEncoder().encode(name);
  if (n.length >= IFNAMSIZ) throw new Error(`tap name "${name}" is longer than ${IFNAMSIZ - 1} bytes`);
  b.set(n);
  return b;
}

/** Parses dotted-quad IPv4 ("192.168.1.2") into 4 bytes (network order). */
export function parseIpv4(s: string): Uint8Array {
  const parts = s.split(".");
  if (parts.length !== 4) throw new Error(`bad IPv4 address "${s}"`);
  const out = new Uint8Array(4);
  parts.forEach((p, i) => {
    const v = Number(p);
    if (!/^\d{1,3}$/.test(p) || v > 255) throw new Error(`bad IPv4 address "${s}"`);
    out[i] = v;
  });
  return out;
}

/** Parses "52:54:00:12:34:56" into 6 bytes. */
export function parseMac(s: string): Uint8Array {
  const parts = s.split(":");
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{1,2}$/.test(p))) {
    throw new Error(`bad MAC address "${s}"`);
  }
  return Uint8Array.from(parts.map((p) => parseInt(p, 16)));
}

export function formatMac(b: Uint8Array): string {
  return Array.from(b.subarray(0, 6), (x) => x.toString(16).padStart(2, "0")).join(":");
}

/** A random unicast, locally administered MAC address. */
export function randomMac(): Uint8Array {
  const b = crypto.getRandomValues(new Uint8Array(6));
  b[0] = (b[0] & 0xfe) | 0x02;
  return b;
}

/** Options for opening a tap. */
export interface TapOptions {
  /** Interface name; "" lets the kernel pick (vmtapN). */
  name?: string;
  /** An already-open tap fd (e.g. passed by a management tool) instead of a name. */
  fd?: number;
  /** Already-open tap fds, one per queue pair (a multi-queue tap when more than one). */
  fds?: number[];
  /** Queue pairs of a tap opened by name: that many fds, IFF_MULTI_QUEUE when more than one. */
  queues?: number;
  /** Host-side IPv4 address and netmask (skipped when absent, and for a tap that already exists). */
  ip?: string;
  mask?: string;
  /** Host-side MAC of the tap interface (a tap opened by name). */
  hostMac?: string;
  /** MTU to give the interface. */
  mtu?: number;
}

/** An open tap: its queue fds (non-blocking, owned by the caller after open), name and MTU. */
export interface Tap {
  /** The first queue's fd (fds[0]). */
  fd: number;
  /** One fd per queue pair. */
  fds: number[];
  name: string;
  /** The interface's MTU after set-up, or null when it could not be read. */
  mtu: number | null;
}

/** TUNSETIFF on a fresh /dev/net/tun fd; returns the interface name the kernel gave. */
function tunSetIff(fd: number, name: string, flags: number): string {
  const req = ifreq(name);
  new DataView(req.buffer).setUint16(IFNAMSIZ, flags, true);
  check(shim().kvs_ioctl(fd, TUNSETIFF, req), `TUNSETIFF ${name || "(new tap)"}`);
  return new TextDecoder().decode(req.subarray(0, req.indexOf(0)));
}

/** A tap queue fd made ready for the worker: 12-byte vnet header, no offloads yet, non-blocking. */
function prepareQueue(fd: number, name: string): void {
  const s = shim();
  const sz = new Int32Array([VNET_HDR_SIZE]);
  check(s.kvs_ioctl(fd, TUNSETVNETHDRSZ, sz), `${name}: TUNSETVNETHDRSZ`);
  // No offloads until the guest negotiates them (the worker calls setTapOffload).
  check(s.kvs_ioctl_val(fd, TUNSETOFFLOAD, 0), `${name}: TUNSETOFFLOAD`);
  const fl = check(s.kvs_fcntl(fd, F_GETFL, 0), `${name}: F_GETFL`);
  check(s.kvs_fcntl(fd, F_SETFL, fl | O_NONBLOCK), `${name}: F_SETFL O_NONBLOCK`);
}

/** TUNGETIFF: the interface name and flags of a tap fd. */
function tapInfo(fd: number): { name: string; flags: number } {
  const req = new Uint8Array(IFREQ_SIZE);
  check(shim().kvs_ioctl(fd, TUNGETIFF, req), `tap fd ${fd}: TUNGETIFF (is it a tap?)`);
  const flags = new DataView(req.buffer).getUint16(IFNAMSIZ, true);
  return { name: new TextDecoder().decode(req.subarray(0, req.indexOf(0))), flags };
}

/** The tun flags of an existing interface (from sysfs), or null when it does not exist. */
function existingTunFlags(name: string): number | null {
  if (!name || name.includes("%")) return null;
  try {
    return parseInt(Deno.readTextFileSync(`/sys/class/net/${name}/tun_flags`).trim(), 16);
  } catch {
    try {
      Deno.statSync(`/sys/class/net/${name}`);
      return 0; // an interface, but not a tun/tap one: TUNSETIFF will say so
    } catch {
      return null;
    }
  }
}

/**
 * Creates or attaches to a tap and configures it; throws with the failing step named. The returned fds
 * are non-blocking and have a 12-byte vnet header.
 */
export function openTap(o: TapOptions): Tap {
  const s = shim();
  const given = o.fds ?? (o.fd !== undefined ? [o.fd] : null);
  const fds: number[] = [];
  let name: string;
  try {
    if (given !== null) {
      if (given.length === 0) throw new Error("no tap fd given");
      name = "";
      for (const fd of given) {
        const info = tapInfo(fd);
        if (!(info.flags & IFF_TAP)) throw new Error(`fd ${fd} is a tun device, not a tap`);
        if (!(info.flags & IFF_VNET_HDR)) {
          throw new Error(`tap fd ${fd} (${info.name}) was opened without IFF_VNET_HDR`);
        }
        if (given.length > 1 && !(info.flags & IFF_MULTI_QUEUE)) {
          throw new Error(
            `tap fd ${fd} (${info.name}) was opened without IFF_MULTI_QUEUE, but ${given.length} fds are given`,
          );
        }
        if (name && info.name !== name) {
          throw new Error(`tap fds belong to different taps (${name}, ${info.name})`);
        }
        name = info.name;
        prepareQueue(fd, name);
      }
      if (o.mtu !== undefined) setMtu(name, o.mtu);
      return { fd: given[0], fds: [...given], name, mtu: getMtu(name) };
    }
    const queues = o.queues ?? 1;
    const mq = queues > 1;
    name = o.name || "vmtap%d"; // like Cloud Hypervisor: the kernel picks the number
    const existing = existingTunFlags(name);
    if (existing !== null && existing !== 0) {
      if (mq && !(existing & IFF_MULTI_QUEUE)) {
        throw new Error(
          `tap ${name} exists without multi-queue support, but ${queues} queue pairs are asked for`,
        );
      }
      if (!mq && (existing & IFF_MULTI_QUEUE)) {
        throw new Error(`tap ${name} is a multi-queue tap, but one queue pair is asked for (num_queues=2)`);
      }
    }
    const flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (mq ? IFF_MULTI_QUEUE : 0);
    for (let q = 0; q < queues; q++) {
      fds.push(check(s.kvs_open(cstr("/dev/net/tun"), O_RDWR, 0), "open /dev/net/tun"));
      name = tunSetIff(fds[q], name, flags);
      prepareQueue(fds[q], name);
    }
    if (existing !== null && o.ip) {
      log.warn(`tap ${name} already exists; its IP configuration is left as it is`);
    }
    configureInterface(name, {
      ...o,
      ip: existing === null ? o.ip : undefined,
      mask: existing === null ? o.mask : undefined,
    });
    return { fd: fds[0], fds, name, mtu: getMtu(name) };
  } catch (e) {
    for (const fd of fds) s.kvs_close(fd);
    throw e;
  }
}

/** Runs `f` with an AF_INET datagram socket (the handle interface ioctls go through). */
function withSocket<T>(f: (sock: number) => T): T {
  const s = shim();
  const sock = check(s.kvs_socket(AF_INET, SOCK_DGRAM, 0), "socket(AF_INET)");
  try {
    return f(sock);
  } finally {
    s.kvs_close(sock);
  }
}

/** The interface's MTU, or null when it cannot be read. */
export function getMtu(name: string): number | null {
  return withSocket((sock) => {
    const req = ifreq(name);
    if (Number(shim().kvs_ioctl(sock, SIOCGIFMTU, req)) < 0) return null;
    return new DataView(req.buffer).getInt32(IFNAMSIZ, true);
  });
}

/** Sets the interface's MTU. */
export function setMtu(name: string, mtu: number): void {
  withSocket((sock) => {
    const req = ifreq(name);
    new DataView(req.buffer).setInt32(IFNAMSIZ, mtu, true);
    check(shim().kvs_ioctl(sock, SIOCSIFMTU, req), `${name}: set MTU ${mtu}`);
  });
}

/**
 * Attaches or detaches one queue of a multi-queue tap (TUNSETQUEUE): a detached queue gets no frames
 * and cannot be read or written. Returns 0 or -errno.
 */
export function setTapQueue(fd: number, attach: boolean): number {
  const req = new Uint8Array(IFREQ_SIZE);
  new DataView(req.buffer).setUint16(IFNAMSIZ, attach ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE, true);
  const r = Number(shim().kvs_ioctl(fd, TUNSETQUEUE, req));
  return r < 0 ? r : 0;
}

/** Host side of the interface: MAC, IPv4 address, netmask, MTU, up. */
function configureInterface(name: string, o: TapOptions): void {
  const s = shim();
  withSocket((sock) => {
    const sockaddrIn = (ip: string) => {
      const req = ifreq(name);
      new DataView(req.buffer).setUint16(IFNAMSIZ, AF_INET, true);
      req.set(parseIpv4(ip), IFNAMSIZ + 4);
      return req;
    };
    if (o.hostMac) {
      const req = ifreq(name);
      new DataView(req.buffer).setUint16(IFNAMSIZ, ARPHRD_ETHER, true);
      req.set(parseMac(o.hostMac), IFNAMSIZ + 2);
      check(s.kvs_ioctl(sock, SIOCSIFHWADDR, req), `${name}: set MAC ${o.hostMac}`);
    }
    if (o.ip) {
      check(s.kvs_ioctl(sock, SIOCSIFADDR, sockaddrIn(o.ip)), `${name}: set address ${o.ip}`);
    }
    if (o.mask) {
      check(s.kvs_ioctl(sock, SIOCSIFNETMASK, sockaddrIn(o.mask)), `${name}: set netmask ${o.mask}`);
    }
    if (o.mtu !== undefined) setMtu(name, o.mtu);
    const req = ifreq(name);
    check(s.kvs_ioctl(sock, SIOCGIFFLAGS, req), `${name}: get flags`);
    const v = new DataView(req.buffer);
    v.setUint16(IFNAMSIZ, v.getUint16(IFNAMSIZ, true) | IFF_UP, true);
    check(s.kvs_ioctl(sock, SIOCSIFFLAGS, req), `${name}: set up`);
  });
}

/** Sets the tap's offloads (TUN_F_* bits): what the tap may hand over not fully checksummed / segmented. */
export function setTapOffload(fd: number, flags: number): void {
  const r = Number(shim().kvs_ioctl_val(fd, TUNSETOFFLOAD, flags));
  if (r < 0) throw new OsError(-r, "TUNSETOFFLOAD");
}
