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
 */
import { check, cstr, OsError, shim } from "../../ffi/shim.ts";
import { O_RDWR } from "../../ffi/kvm_constants.ts";

// ioctl numbers (_IOW('T', n, int) etc.) and flags from <linux/if_tun.h> and <linux/sockios.h>.
export const TUNSETIFF = 0x400454ca;
export const TUNGETIFF = 0x800454d2;
export const TUNSETOFFLOAD = 0x400454d0;
export const TUNSETVNETHDRSZ = 0x400454d8;
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_UFO = 0x10;
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;
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
  /** Interface name; "" lets the kernel pick (tapN). */
  name?: string;
  /** An already-open tap fd (e.g. passed by a management tool) instead of a name. */
  fd?: number;
  /** Host-side IPv4 address and netmask (skipped when absent). */
  ip?: string;
  mask?: string;
  /** Host-side MAC of the tap interface. */
  hostMac?: string;
}

/** An open tap: its fd (non-blocking, owned by the caller after open) and interface name. */
export interface Tap {
  fd: number;
  name: string;
}

/**
 * Creates or attaches to a tap and configures it; throws with the failing step named. The returned fd
 * is non-blocking and has a 12-byte vnet header.
 */
export function openTap(o: TapOptions): Tap {
  const s = shim();
  let fd: number;
  let name: string;
  let owned = false;
  if (o.fd !== undefined) {
    fd = o.fd;
    const req = new Uint8Array(IFREQ_SIZE);
    check(s.kvs_ioctl(fd, TUNGETIFF, req), `tap fd ${fd}: TUNGETIFF (is it a tap?)`);
    const flags = new DataView(req.buffer).getUint16(IFNAMSIZ, true);
    name = new TextDecoder().decode(req.subarray(0, req.indexOf(0)));
    if (!(flags & IFF_TAP)) throw new Error(`fd ${fd} is a tun device, not a tap`);
    if (!(flags & IFF_VNET_HDR)) throw new Error(`tap fd ${fd} (${name}) was opened without IFF_VNET_HDR`);
  } else {
    fd = check(s.kvs_open(cstr("/dev/net/tun"), O_RDWR, 0), "open /dev/net/tun");
    owned = true;
    name = o.name || "vmtap%d"; // like Cloud Hypervisor: the kernel picks the number
  }
  try {
    if (owned) {
      const req = ifreq(name);
      new DataView(req.buffer).setUint16(IFNAMSIZ, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, true);
      check(s.kvs_ioctl(fd, TUNSETIFF, req), `TUNSETIFF ${name || "(new tap)"}`);
      name = new TextDecoder().decode(req.subarray(0, req.indexOf(0)));
    }
    const sz = new Int32Array([VNET_HDR_SIZE]);
    check(s.kvs_ioctl(fd, TUNSETVNETHDRSZ, sz), `${name}: TUNSETVNETHDRSZ`);
    // No offloads until the guest negotiates them (the worker calls setTapOffload).
    check(s.kvs_ioctl_val(fd, TUNSETOFFLOAD, 0), `${name}: TUNSETOFFLOAD`);
    const fl = check(s.kvs_fcntl(fd, F_GETFL, 0), `${name}: F_GETFL`);
    check(s.kvs_fcntl(fd, F_SETFL, fl | O_NONBLOCK), `${name}: F_SETFL O_NONBLOCK`);
    configureInterface(name, o);
  } catch (e) {
    if (owned) s.kvs_close(fd);
    throw e;
  }
  return { fd, name };
}

/** Host side of the interface: MAC, IPv4 address, netmask, up. */
function configureInterface(name: string, o: TapOptions): void {
  const s = shim();
  const sock = check(s.kvs_socket(AF_INET, SOCK_DGRAM, 0), "socket(AF_INET)");
  try {
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
    const req = ifreq(name);
    check(s.kvs_ioctl(sock, SIOCGIFFLAGS, req), `${name}: get flags`);
    const v = new DataView(req.buffer);
    v.setUint16(IFNAMSIZ, v.getUint16(IFNAMSIZ, true) | IFF_UP, true);
    check(s.kvs_ioctl(sock, SIOCSIFFLAGS, req), `${name}: set up`);
  } finally {
    s.kvs_close(sock);
  }
}

/** Sets the tap's offloads (TUN_F_* bits): what the tap may hand over not fully checksummed / segmented. */
export function setTapOffload(fd: number, flags: number): void {
  const r = Number(shim().kvs_ioctl_val(fd, TUNSETOFFLOAD, flags));
  if (r < 0) throw new OsError(-r, "TUNSETOFFLOAD");
}
