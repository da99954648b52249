/**
 * virtio-vsock around its device model (vsock.ts): the listening socket, made by the main thread at
 * boot (so a taken path fails the boot, as in Cloud Hypervisor) and removed at shutdown; and the device
 * as a device worker runs it, its nested epoll set being the worker's host fd.
 */
import { OsError } from "../../ffi/shim.ts";
import { unixListen } from "../../ffi/socket.ts";
import type { GuestMemory } from "../../vmm/memory.ts";
import type { VirtioDeviceDescriptor } from "./device_shared.ts";
import { VSOCK_RX_QUEUE, VsockCounters, VsockDevice } from "./vsock.ts";

const EADDRINUSE = 98;

/** The hybrid vsock's listening UNIX socket at `path` (non-blocking); throws naming the path. */
export function openVsockListener(path: string): number {
  try {
    return unixListen(path);
  } catch (e) {
    if (e instanceof OsError && e.errno === EADDRINUSE) {
      throw new Error(`vsock socket ${path} already exists; remove it or choose another path`);
    }
    throw new Error(`vsock: cannot listen on ${path}: ${(e as Error).message}`);
  }
}

/** Removes the listening socket's path (at shutdown, as Cloud Hypervisor does); ignores errors. */
export function removeVsockSocket(path: string): void {
  try {
    Deno.removeSync(path);
  } catch { /* already gone */ }
}

/**
 * The device for a worker. `setPolling(fd, on)` switches the worker's epoll interest in the device's
 * nested epoll fd (on while the driver is live).
 */
export function vsockService(
  d: VirtioDeviceDescriptor,
  mem: GuestMemory,
  setPolling: (fd: number, on: boolean) => void,
): VsockDevice {
  const v = d.vsock!;
  let polling = false;
  const dev: VsockDevice = new VsockDevice(mem, {
    cid: v.cid,
    path: v.path,
    listenFd: v.listenFd,
    rxKickFd: d.queueFds[VSOCK_RX_QUEUE],
    counters: new VsockCounters(d.counters),
    setPolling(on) {
      if (on === polling) return;
      polling = on;
      setPolling(dev.pollFd, on);
    },
    warn: (m) => console.warn(`dvmm: virtio-vsock ${d.id} (${v.path}): ${m}`),
  });
  return dev;
}
