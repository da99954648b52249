/**
 * The PC legacy devices as a set: descriptors made once on the main thread, and a builder that every
 * thread (each vCPU worker, the main thread) runs to get its own device objects over the shared state,
 * registered on a port-I/O bus.
 *
 * ```ts
 * // main thread
 * const legacy = createLegacyDescriptors({ lowMemBytes, highMemBytes, cpus, acpiPm: Layout.acpiPm });
 * worker.postMessage({ ..., legacy });            // SharedArrayBuffers and numbers only
 * const host = buildLegacyDevices(legacy, deps);  // for stdin → serial, flush timer, power button
 * // vCPU worker
 * const { pio } = buildLegacyDevices(init.legacy, deps, pio);
 * ```
 *
 * Besides the devices, a few ports that Linux touches on every PC but that have nothing behind them
 * here are claimed as "absent" (reads all-ones, writes dropped, not counted as unhandled): the POST
 * code port 0x80 and the alternative delay port 0xED (io_delay writes), and the COM2-COM4 UART ranges
 * the 8250 driver probes. The PIT, PICs, ELCR and speaker port are in KVM and never reach us.
 */
import { PioBus, type PioDevice } from "./bus.ts";
import { Serial16550, type SerialDescriptor, type SerialParams } from "./serial.ts";
import { I8042, type I8042Descriptor } from "./i8042.ts";
import { Cmos, type CmosDescriptor } from "./cmos.ts";
import { AcpiPm, type AcpiPmDescriptor, type AcpiPmParams } from "./acpi_pm.ts";
import type { ByteSink, IrqLine, VmEventSink } from "./shared.ts";

/** Ranges claimed with nothing behind them: [base, length]. */
export type QuietRange = [number, number];

export interface LegacyDescriptors {
  serial: SerialDescriptor;
  i8042: I8042Descriptor | null;
  cmos: CmosDescriptor;
  acpiPm: AcpiPmDescriptor | null;
  quiet: QuietRange[];
}

export interface LegacyParams {
  /** Bytes of RAM below 4 GiB and above it (CMOS memory size registers). */
  lowMemBytes: number;
  highMemBytes?: number;
  cpus?: number;
  serial?: SerialParams;
  /** false: no keyboard controller. */
  i8042?: boolean;
  /** ACPI platform registers (pass vmm/layout.ts's Layout.acpiPm); false: none. */
  acpiPm?: AcpiPmParams | false;
  /** Extra absent ranges, or a replacement list. */
  quiet?: QuietRange[];
}

/** Default absent ranges: POST code, delay port, COM2, COM3, COM4. */
export const DEFAULT_QUIET: readonly QuietRange[] = [[0x80, 1], [0xed, 1], [0x2f8, 8], [0x3e8, 8], [
  0x2e8,
  8,
]];

/** Makes (and resets) the shared state of the legacy devices. Main thread, once per VM. */
export function createLegacyDescriptors(p: LegacyParams): LegacyDescriptors {
  return {
    serial: Serial16550.createDescriptor(p.serial),
    i8042: p.i8042 === false ? null : I8042.createDescriptor(),
    cmos: Cmos.createDescriptor({ lowMemBytes: p.lowMemBytes, highMemBytes: p.highMemBytes, cpus: p.cpus }),
    acpiPm: p.acpiPm === false ? null : AcpiPm.createDescriptor(p.acpiPm ?? {}),
    quiet: (p.quiet ?? DEFAULT_QUIET).map(([b, l]) => [b, l] as QuietRange),
  };
}

/** Side-effect handles for one thread. All must work from any thread. */
export interface LegacyDeps {
  /** COM1's interrupt (GSI {@link SerialDescriptor.irq}, 4). */
  serialIrq: IrqLine;
  /** Where the guest's serial output goes. */
  serialOut: ByteSink;
  /** Told when the guest enables or disables the serial THR-empty interrupt (see SerialDeps). */
  serialTxInterrupt?: (enabled: boolean) => void;
  /** Poweroff / reboot requests (ACPI registers, i8042 reset). */
  events: VmEventSink;
  /** GED interrupt (GSI {@link AcpiPmDescriptor.gedGsi}); without it the power button does nothing. */
  gedIrq?: IrqLine;
  /** i8042 keyboard / mouse interrupts (GSI 1 and 12); let a directly-probing Linux give up at once. */
  kbdIrq?: IrqLine;
  auxIrq?: IrqLine;
}

export interface LegacyDevices {
  pio: PioBus;
  serial: Serial16550;
  i8042: I8042 | null;
  cmos: Cmos;
  acpiPm: AcpiPm | null;
}

const absent: PioDevice = {
  pioRead: (_o, size) => size >= 4 ? 0xffffffff : (1 << (size * 8)) - 1,
  pioWrite: () => {},
};

/** Builds this thread's device objects over the shared state and registers them on `pio`. */
export function buildLegacyDevices(
  d: LegacyDescriptors,
  deps: LegacyDeps,
  pio = new PioBus(),
): LegacyDevices {
  const serial = new Serial16550(d.serial, {
    irq: deps.serialIrq,
    out: deps.serialOut,
    txInterrupt: deps.serialTxInterrupt,
  });
  pio.register(serial.base, 8, serial, "serial");
  let i8042: I8042 | null = null;
  if (d.i8042) {
    i8042 = new I8042(d.i8042, { events: deps.events, kbdIrq: deps.kbdIrq, auxIrq: deps.auxIrq });
    pio.register(i8042.dataPort, 1, i8042.data, "i8042 data");
    pio.register(i8042.commandPort, 1, i8042.command, "i8042 command");
  }
  const cmos = new Cmos(d.cmos);
  pio.register(cmos.base, 2, cmos, "cmos");
  let acpiPm: AcpiPm | null = null;
  if (d.acpiPm) {
    acpiPm = new AcpiPm(d.acpiPm, { events: deps.events, gedIrq: deps.gedIrq });
    pio.register(acpiPm.base, acpiPm.len, acpiPm, "acpi_pm");
  }
  for (const [base, len] of d.quiet) pio.register(base, len, absent, "absent");
  return { pio, serial, i8042, cmos, acpiPm };
}
