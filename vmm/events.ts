/**
 * The event monitor (`--event-monitor path=FILE|fd=N`): one JSON object per line for every VMM and VM
 * life-cycle event, written as it happens. The format follows Cloud Hypervisor's: a timestamp relative
 * to the monitor's start as `{secs, nanos}`, the event's source ("vmm", "vm", ...), its name and
 * optional string properties (null when there are none).
 */

export interface MonitorEvent {
  timestamp: { secs: number; nanos: number };
  source: string;
  event: string;
  properties: Record<string, string> | null;
}

/** Anything that receives events; the control loop emits through this. */
export interface EventSink {
  emit(source: string, event: string, properties?: Record<string, string>): void;
}

/** An event sink that discards everything (no `--event-monitor`). */
export const nullEventSink: EventSink = { emit() {} };

/** The event as the monitor writes it, timed from `start` (a `performance.now()` value). */
export function formatEvent(
  start: number,
  source: string,
  event: string,
  properties?: Record<string, string>,
): string {
  const elapsedNs = Math.round((performance.now() - start) * 1e6);
  const e: MonitorEvent = {
    timestamp: { secs: Math.floor(elapsedNs / 1e9), nanos: elapsedNs % 1e9 },
    source,
    event,
    properties: properties ?? null,
  };
  return JSON.stringify(e);
}

/**
 * Every event, formatted once, to every consumer: the `--event-monitor` file and the D-Bus `Event`
 * signal. Events raised before a consumer is attached (the VMM's `starting`) are kept for it, as
 * Cloud Hypervisor replays them to a D-Bus service that comes up after them.
 */
export class EventHub implements EventSink {
  readonly #start = performance.now();
  readonly #consumers: ((json: string) => void)[] = [];
  readonly #early: string[] = [];

  emit(source: string, event: string, properties?: Record<string, string>): void {
    const json = formatEvent(this.#start, source, event, properties);
    if (this.#early.length < 64) this.#early.push(json);
    for (const c of this.#consumers) {
      try {
        c(json);
      } catch {
        // A consumer going away must not stop the VMM.
      }
    }
  }

  /** Attach a consumer; it first receives the events raised so far (up to 64). */
  attach(consumer: (json: string) => void): void {
    for (const json of this.#early) consumer(json);
    this.#consumers.push(consumer);
  }
}

const encoder = new TextEncoder();

/** Writes events synchronously so each is on its way before the next action starts. */
export class EventMonitor implements EventSink {
  readonly #out: { writeSync(p: Uint8Array): number; close?(): void };
  readonly #start = performance.now();

  constructor(out: { writeSync(p: Uint8Array): number; close?(): void }) {
    this.#out = out;
  }

  /** Open the target named by an `--event-monitor` value: `path=FILE` or `fd=N`. */
  static open(spec: string): EventMonitor {
    const { path, fd } = parseEventMonitorOption(spec);
    if (fd !== undefined) {
      // Deno has no way to adopt a raw descriptor; re-opening it through /proc works for files, pipes
      // and terminals (not for sockets).
      try {
        return new EventMonitor(Deno.openSync(`/proc/self/fd/${fd}`, { write: true }));
      } catch (e) {
        throw new Error(
          `--event-monitor fd=${fd}: cannot open inherited descriptor ${fd} (${(e as Error).message}); ` +
            `only files, pipes and terminals can be used by descriptor, or pass path=FILE`,
        );
      }
    }
    // As Cloud Hypervisor: the file is created afresh for this run.
    return new EventMonitor(Deno.openSync(path!, { write: true, create: true, truncate: true }));
  }

  emit(source: string, event: string, properties?: Record<string, string>): void {
    this.write(formatEvent(this.#start, source, event, properties));
  }

  /** Write one already formatted event. */
  write(json: string): void {
    const bytes = encoder.encode(json + "\n");
    try {
      let off = 0;
      while (off < bytes.length) off += this.#out.writeSync(bytes.subarray(off));
    } catch {
      // A monitor reader going away must not stop the VMM.
    }
  }

  close(): void {
    try {
      this.#out.close?.();
    } catch {
      // already closed
    }
  }
}

/** Split `path=FILE` / `fd=N` (Cloud Hypervisor takes nothing else). */
export function parseEventMonitorOption(spec: string): { path?: string; fd?: number } {
  if (spec.startsWith("fd=")) {
    const text = spec.slice(3);
    const fd = Number(text);
    if (!/^\d{1,9}$/.test(text) || !Number.isSafeInteger(fd)) {
      throw new Error(`--event-monitor: fd must be a file descriptor number`);
    }
    return { fd };
  }
  if (!spec.startsWith("path=")) {
    throw new Error(`--event-monitor: expected path=FILE or fd=N, got '${spec}'`);
  }
  const path = spec.slice(5);
  if (path === "" || path.includes(",")) throw new Error(`--event-monitor: expected path=FILE or fd=N`);
  return { path };
}
