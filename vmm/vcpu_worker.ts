/// <reference lib="deno.worker" />
/**
 * A vCPU thread: blocks in a synchronous KVM_RUN and dispatches PIO/MMIO exits to buses built in
 * this worker over the devices' shared state. Commands come through the vCPU's control buffer (see
 * vcpu_control.ts); the only message it posts is its final exit. PCI hotplug changes arrive as messages
 * followed by the Reload command: the worker leaves KVM_RUN, returns to its event loop, takes the change
 * into its buses, acknowledges it in the control buffer and runs again.
 */
import {
  KVM_EXIT_FAIL_ENTRY,
  KVM_EXIT_HLT,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_INTR,
  KVM_EXIT_IO,
  KVM_EXIT_IO_OUT,
  KVM_EXIT_MMIO,
  KVM_EXIT_SHUTDOWN,
  KVM_EXIT_SYSTEM_EVENT,
  KVM_SYSTEM_EVENT_RESET,
  KVM_SYSTEM_EVENT_SHUTDOWN,
} from "../ffi/kvm_constants.ts";
import { kickInit, threadId, type VcpuDescriptor, VcpuFd } from "../ffi/kvm.ts";
import { setThreadName } from "../ffi/socket.ts";
import { confineThread } from "./seccomp.ts";
import { Cmd, CTL_EXITS, State, VcpuControl, VmEvent, VmEvents } from "./vcpu_control.ts";
import { buildPlatformBuses, type PlatformDescriptors } from "./platform.ts";
import type { MmioBus, PioBus } from "../devices/bus.ts";
import { EventSource } from "../devices/shared.ts";
import type { PciThread } from "./pci_platform.ts";
import type { VirtioDeviceDescriptor } from "../devices/virtio/device_shared.ts";
import type { CoalescedRing } from "./coalesced_pio.ts";

/** What the main thread sends a vCPU worker once, at start. */
export interface VcpuWorkerInit {
  vcpu: VcpuDescriptor;
  control: SharedArrayBuffer;
  events: SharedArrayBuffer;
  platform: PlatformDescriptors;
}

/** A PCI change for this vCPU's buses (hot-add or removal), generation `gen`. */
export type VcpuPciChange = PciChange & { gen: number };
/** The change itself: a device to attach, or the identifier of one to detach. */
export type PciChange =
  | { type: "pci-attach"; device: VirtioDeviceDescriptor }
  | { type: "pci-detach"; id: string };

/** The worker's last message. */
export interface VcpuWorkerExit {
  type: "exit";
  id: number;
  reason: string;
  error?: string;
}

const EINTR = 4;
const EAGAIN = 11;

/** This thread's vCPU and buses, built once. */
interface VcpuContext {
  init: VcpuWorkerInit;
  ctl: VcpuControl;
  events: VmEvents;
  vcpu: VcpuFd;
  pio: PioBus;
  mmio: MmioBus;
  pci: PciThread | null;
  /** The coalesced serial writes: replayed before every exit is handled. */
  ring: CoalescedRing | null;
}

/** Returned by runVcpu when the main thread asked for a reload (a PCI change is waiting as a message). */
const RELOAD = "reload";

function setUp(init: VcpuWorkerInit): VcpuContext {
  // Named as Cloud Hypervisor names its vCPU threads: orchestrators (Kata) find them by this name.
  setThreadName(`vcpu${init.vcpu.id}`);
  kickInit();
  confineThread("vcpu");
  const ctl = new VcpuControl(init.control);
  const events = new VmEvents(init.events);
  ctl.publishThread(threadId());
  const vcpu = VcpuFd.fromDescriptor(init.vcpu);
  const { pio, mmio, pci, ring } = buildPlatformBuses(init.platform, events, vcpu.kvmRun.data);
  return { init, ctl, events, vcpu, pio, mmio, pci, ring };
}

function runVcpu(c: VcpuContext): string {
  const { ctl, events, vcpu, pio, mmio, ring } = c;
  const run = vcpu.kvmRun;
  const page = run.data;
  const dv = new DataView(page.buffer, page.byteOffset, page.byteLength);
  const mmioData = run.mmioData;
  // Views of mmio.data for each access size, made once: no allocation per exit.
  const mmioViews: Uint8Array[] = [];
  for (let n = 0; n <= 8; n++) mmioViews.push(mmioData.subarray(0, n));
  ctl.setState(State.Running);

  for (;;) {
    run.immediateExit = 0;
    const cmd = ctl.command;
    if (cmd === Cmd.Stop) return "stopped";
    if (cmd === Cmd.Reload) return RELOAD;
    if (cmd === Cmd.Pause) {
      // An I/O exit is completed by the next KVM_RUN (an IN's data lands in a register then): one with
      // immediate_exit set does just that, so the state a snapshot reads is whole.
      run.immediateExit = 1;
      vcpu.run();
      run.immediateExit = 0;
      ctl.setState(State.Paused);
      while (ctl.command === Cmd.Pause) Atomics.wait(ctl.i32, 0, Cmd.Pause);
      ctl.setState(State.Running);
      continue;
    }
    // vm.nmi: injected from this thread, where the vCPU's ioctls belong, before it runs again.
    if (ctl.takeNmi()) vcpu.nmi();
    const r = vcpu.run();
    if (r < 0) {
      if (r === -EINTR || r === -EAGAIN) continue;
      events.raise(VmEvent.Crash);
      return `KVM_RUN failed: errno ${-r}`;
    }
    Atomics.add(ctl.i32, CTL_EXITS, 1);
    // Serial bytes KVM coalesced since the last exit come first: this exit may read what they changed.
    if (ring !== null && ring.pending) ring.drain(pio);
    switch (run.exitReason) {
      case KVM_EXIT_IO: {
        const port = run.ioPort;
        const size = run.ioSize;
        let off = run.ioDataOffset;
        const count = run.ioCount;
        const out = run.ioDirection === KVM_EXIT_IO_OUT;
        for (let i = 0; i < count; i++, off += size) {
          if (out) {
            const v = size === 1
              ? dv.getUint8(off)
              : size === 2
              ? dv.getUint16(off, true)
              : dv.getUint32(off, true);
            pio.write(port, size, v);
          } else {
            const v = pio.read(port, size);
            if (size === 1) dv.setUint8(off, v);
            else if (size === 2) dv.setUint16(off, v, true);
            else dv.setUint32(off, v >>> 0, true);
          }
        }
        break;
      }
      case KVM_EXIT_MMIO: {
        const len = run.mmioLen;
        const view = mmioViews[len] ?? mmioData;
        if (run.mmioIsWrite) mmio.write(run.mmioPhysAddr, view);
        else mmio.read(run.mmioPhysAddr, view);
        break;
      }
      case KVM_EXIT_HLT:
        // Only without an in-kernel irqchip; ours has one, so a halted vCPU never exits here.
        break;
      case KVM_EXIT_SHUTDOWN:
        // Triple fault: the machine resets, as a PC does.
        events.raise(VmEvent.Reboot, EventSource.TripleFault);
        return "shutdown (triple fault)";
      case KVM_EXIT_SYSTEM_EVENT: {
        const t = run.systemEventType;
        if (t === KVM_SYSTEM_EVENT_SHUTDOWN) events.raise(VmEvent.Poweroff, EventSource.KvmSystemEvent);
        else if (t === KVM_SYSTEM_EVENT_RESET) events.raise(VmEvent.Reboot, EventSource.KvmSystemEvent);
        else events.raise(VmEvent.Crash);
        return `system event ${t}`;
      }
      case KVM_EXIT_INTR:
        break;
      default:
        events.raise(VmEvent.Crash);
        return `unhandled exit reason ${run.exitReason}` +
          (run.exitReason === KVM_EXIT_INTERNAL_ERROR ? ` (suberror ${run.internalSuberror})` : "") +
          (run.exitReason === KVM_EXIT_FAIL_ENTRY
            ? ` (hardware reason 0x${run.failEntryReason.toString(16)})`
            : "");
    }
    // A device may have raised a VM event (poweroff/reboot register): stop this vCPU promptly.
    if (events.current !== VmEvent.None) return "vm event";
  }
}

let context: VcpuContext | null = null;

/** Runs the vCPU until it stops for good (then posts the exit) or is asked to reload. */
function runOrExit(c: VcpuContext): void {
  const init = c.init;
  let msg: VcpuWorkerExit;
  try {
    const reason = runVcpu(c);
    if (reason === RELOAD) return; // back to the event loop: the change's message comes next
    // Where the vCPU stood when it stopped: the first thing to look at when a guest hangs.
    const vcpu = VcpuFd.fromDescriptor(init.vcpu);
    const rip = vcpu.getRegs().rip;
    const exits = Atomics.load(new VcpuControl(init.control).i32, CTL_EXITS);
    msg = {
      type: "exit",
      id: init.vcpu.id,
      reason: `${reason} at rip 0x${rip.toString(16)} after ${exits} exits`,
    };
  } catch (e) {
    new VmEvents(init.events).raise(VmEvent.Crash);
    msg = {
      type: "exit",
      id: init.vcpu.id,
      reason: "error",
      error: e instanceof Error ? e.stack ?? e.message : String(e),
    };
  }
  context = null;
  new VcpuControl(init.control).setState(State.Stopped);
  self.postMessage(msg);
  self.close();
}

/** Takes a PCI change into this thread's buses, acknowledges it and runs the vCPU again. */
function applyPciChange(c: VcpuContext, m: VcpuPciChange): void {
  // Back to Run before acknowledging: once the main thread sees the acknowledgement it may ask for the
  // next reload, and that request must not be swallowed by this one's reset.
  Atomics.compareExchange(c.ctl.i32, 0, Cmd.Reload, Cmd.Run);
  try {
    if (!c.pci) throw new Error("this VM has no PCI bus");
    if (m.type === "pci-attach") c.pci.attach(m.device);
    else c.pci.detach(m.id);
    c.ctl.setPciGeneration(m.gen);
  } catch (e) {
    // No acknowledgement: the main thread times out waiting for it and reports the failure.
    console.error(`vCPU ${c.init.vcpu.id}: PCI change failed: ${(e as Error).message}`);
  }
  runOrExit(c);
}

self.onmessage = (ev: MessageEvent<VcpuWorkerInit | VcpuPciChange>) => {
  const data = ev.data;
  if ("type" in data) {
    if (context) applyPciChange(context, data);
    return;
  }
  try {
    context = setUp(data);
  } catch (e) {
    new VmEvents(data.events).raise(VmEvent.Crash);
    new VcpuControl(data.control).setState(State.Stopped);
    self.postMessage({ type: "exit", id: data.vcpu.id, reason: "error", error: (e as Error).stack });
    self.close();
    return;
  }
  runOrExit(context);
};
