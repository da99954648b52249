/**
 * Test doubles for the control loop and the REST server: a scripted {@link VmBackend} that records what
 * it is asked to do (it tests the loop and the API, not a VM), and a helper that serves a loop on a
 * temporary UNIX socket. Not used by dvmm itself.
 */
import type { VmConfig } from "../vmm/vm_config.ts";
import { ControlLoop, type GuestEvent, type VmBackend } from "../vmm/control.ts";
import type { EventSink } from "../vmm/events.ts";
import { type ApiServer, startApiServer } from "./server.ts";

export class FakeBackend implements VmBackend {
  readonly calls: string[] = [];
  #listener: ((e: GuestEvent) => void) | null = null;
  failBoot: Error | null = null;

  constructor(readonly config: VmConfig) {}

  boot(): Promise<void> {
    this.calls.push("boot");
    return this.failBoot ? Promise.reject(this.failBoot) : Promise.resolve();
  }
  pause(): Promise<void> {
    this.calls.push("pause");
    return Promise.resolve();
  }
  resume(): Promise<void> {
    this.calls.push("resume");
    return Promise.resolve();
  }
  shutdown(): Promise<void> {
    this.calls.push("shutdown");
    return Promise.resolve();
  }
  powerButton(): Promise<void> {
    this.calls.push("powerButton");
    return Promise.resolve();
  }
  nmi(): Promise<void> {
    this.calls.push("nmi");
    return Promise.resolve();
  }
  counters(): Record<string, Record<string, number>> {
    return { "_disk0": { read_bytes: 0, write_bytes: 0 } };
  }
  deviceTree(): Record<string, unknown> {
    return { "_serial": { id: "_serial", resources: [], children: [], pci_bdf: null } };
  }
  memoryActualSize(): number {
    return this.config.memory.size;
  }
  onGuestEvent(cb: (e: GuestEvent) => void): void {
    this.#listener = cb;
  }
  /** Pretend the guest did something. */
  guest(e: GuestEvent): void {
    this.#listener?.(e);
  }
}

/** A factory that remembers every backend it made. */
export function fakeFactory(): { factory: (config: VmConfig) => FakeBackend; made: FakeBackend[] } {
  const made: FakeBackend[] = [];
  return {
    made,
    factory: (config) => {
      const b = new FakeBackend(config);
      made.push(b);
      return b;
    },
  };
}

export class RecordingEvents implements EventSink {
  readonly seen: string[] = [];
  emit(source: string, event: string): void {
    this.seen.push(`${source}:${event}`);
  }
}

export interface TestServer {
  loop: ControlLoop;
  server: ApiServer;
  socket: string;
  made: FakeBackend[];
  events: RecordingEvents;
  dir: string;
  close(): Promise<void>;
}

/** A control loop with fake backends, served on a socket in a fresh temporary directory. */
export async function startTestServer(): Promise<TestServer> {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-api-" });
  const socket = `${dir}/api.sock`;
  const { factory, made } = fakeFactory();
  const events = new RecordingEvents();
  const loop = new ControlLoop({ factory, events });
  const server = await startApiServer({ path: socket }, loop);
  return {
    loop,
    server,
    socket,
    made,
    events,
    dir,
    async close() {
      await server.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** The VM configuration of the API document's example (before defaults). */
export const EXAMPLE_VM = {
  cpus: { boot_vcpus: 4, max_vcpus: 4 },
  payload: {
    kernel: "/opt/clh/kernel/vmlinux-virtio-fs-virtio-iommu",
    cmdline: "console=ttyS0 console=hvc0 root=/dev/vda1 rw",
  },
  disks: [{ path: "/opt/clh/images/focal-server-cloudimg-amd64.raw" }],
  rng: { src: "/dev/urandom" },
  net: [{ ip: "192.168.10.10", mask: "255.255.255.0", mac: "12:34:56:78:90:01" }],
};
