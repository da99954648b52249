/**
 * Live migration (vm.send-migration / vm.receive-migration): dvmm's own stream protocol over a UNIX or
 * TCP socket, pre-copy with dirty tracking (vmm/dirty.ts), then the paused VM's state; the receiver brings
 * the VM back with the restore path (vmm/snapshot.ts) and answers; only then does the source let go.
 *
 * Frames: a 16-byte header (u32 type, u32 zero, u64 payload length, little-endian) and the payload.
 *
 *   HELLO   {format: "dvmm-migration", version: 1}        CONFIG  the VM config (JSON)
 *   RANGES  [{name, size}] the memory pieces               PAGES   u32 piece, u32 0, u64 offset, bytes
 *   MEMFDS  [name] + one SCM_RIGHTS message (local=true)   STATE   the saved state (JSON, no memory)
 *   COMPLETE                                               ABORT   the sender gave up
 *   ACK     {ok, error?} from the receiver once its VM runs (or could not be started)
 *
 * The receiver writes memory into a memfd laid out as a snapshot's memory file; with local=true the
 * sender's own memfds arrive instead and become the receiver's RAM (no copy).
 */
import type { SendMigrationData } from "./vm_config.ts";
import type { DirtyTracker } from "./dirty.ts";
import type { SnapshotState } from "./snapshot.ts";
import { log } from "./log.ts";
import { workerUrl } from "./worker_pool.ts";

export const FRAME_HEADER = 16;
export const FRAME = {
  HELLO: 1,
  CONFIG: 2,
  RANGES: 3,
  PAGES: 4,
  MEMFDS: 5,
  STATE: 6,
  COMPLETE: 7,
  ACK: 8,
  ABORT: 9,
} as const;

/** Where to connect or listen. */
export type MigrationUrl =
  | { kind: "unix"; path: string; text: string }
  | { kind: "tcp"; host: string; port: number; text: string };

/** `unix:PATH` or `tcp:HOST:PORT` (Cloud Hypervisor's spellings); `field` names the option in errors. */
export function parseMigrationUrl(url: string, field: string): MigrationUrl {
  if (url.startsWith("unix:")) {
    const path = url.slice(5).replace(/^\/\/(?=\/)/, "");
    if (path === "") throw new Error(`${field} '${url}' names no socket path`);
    return { kind: "unix", path, text: url };
  }
  const m = url.match(/^tcp:(?:\/\/)?(\[[^\]]+\]|[^:]*):(\d+)$/);
  if (m) {
    const port = Number(m[2]);
    if (port < 1 || port > 65535) throw new Error(`${field} '${url}': port ${port} is out of range`);
    return { kind: "tcp", host: m[1].replace(/^\[|\]$/g, ""), port, text: url };
  }
  throw new Error(`${field} '${url}': use unix:PATH or tcp:HOST:PORT`);
}

/** A piece of guest memory as the sender's worker reads it. */
export interface PieceLayout {
  hostAddr: bigint;
  size: number;
}

export type WorkerCommand =
  | { op: "connect"; url: MigrationUrl }
  | { op: "json"; type: number; value: unknown }
  | { op: "pages"; pieces: PieceLayout[]; runs: number[]; skipZero: boolean }
  | { op: "memfds"; names: string[]; fds: number[] }
  | { op: "complete" }
  | { op: "abort" }
  | { op: "listen"; url: MigrationUrl }
  | { op: "receive-config" }
  | { op: "receive" }
  | { op: "ack"; ok: boolean; error?: string };

export interface WorkerReply {
  ok: boolean;
  error?: string;
  bytes?: number;
  ms?: number;
  config?: unknown;
  state?: unknown;
  memfd?: number;
  layout?: { name: string; size: number; offset: number }[];
  memfds?: Record<string, number>;
}

/** The migration worker, one command at a time. */
/** Why a migration ended when the VMM was shut down (vmm.shutdown, SIGTERM, SIGINT) during it. */
export const CANCELLED = "cancelled: the VMM is shutting down";

export class MigrationChannel {
  readonly #w: Worker;
  #pending: ((r: WorkerReply) => void) | null = null;
  #dead: string | null = null;
  /** Word 0 set: the worker gives up what it waits for or moves (within a second). */
  readonly #cancel = new Int32Array(new SharedArrayBuffer(4));

  /** `signal` aborts the migration: the command under way fails with {@link CANCELLED}, and so do later ones. */
  constructor(signal?: AbortSignal) {
    this.#w = new Worker(workerUrl("./migration_worker.ts", import.meta.url), { type: "module" });
    this.#w.postMessage({ op: "init", cancel: this.#cancel.buffer });
    if (signal) {
      const cancel = () => Atomics.store(this.#cancel, 0, 1);
      if (signal.aborted) cancel();
      else signal.addEventListener("abort", cancel, { once: true });
    }
    this.#w.onmessage = (ev: MessageEvent<WorkerReply>) => {
      const p = this.#pending;
      this.#pending = null;
      p?.(ev.data);
    };
    this.#w.onerror = (ev) => {
      ev.preventDefault();
      this.#dead = ev.message;
      const p = this.#pending;
      this.#pending = null;
      p?.({ ok: false, error: `the migration thread failed: ${ev.message}` });
    };
  }

  /** Runs one command; throws with the worker's error. */
  async run(cmd: WorkerCommand): Promise<WorkerReply> {
    if (this.#dead) throw new Error(`the migration thread failed: ${this.#dead}`);
    if (Atomics.load(this.#cancel, 0) !== 0 && cmd.op !== "ack") throw new Error(CANCELLED);
    const r = await new Promise<WorkerReply>((resolve) => {
      this.#pending = resolve;
      this.#w.postMessage(cmd);
    });
    if (!r.ok) throw new Error(r.error ?? "migration failed");
    return r;
  }

  close(): void {
    this.#w.terminate();
  }
}

/** What the sender needs from the VM. */
export interface MigrationSource {
  pieces(): { name: string; hostAddr: bigint; size: number; fd?: number }[];
  dirtyTracker(): DirtyTracker;
  /** Checks that every device can be saved (throws naming one that cannot). */
  checkSavable(): void;
  pause(): Promise<void>;
  resume(): Promise<void>;
  quiesceDevices(): Promise<void>;
  releaseDevices(): void;
  saveState(): SnapshotState;
  releaseImages(): void;
  retakeImages(): void;
}

/** What a finished migration measured. */
export interface MigrationStats {
  rounds: number;
  bytes: number;
  totalMs: number;
  downtimeMs: number;
}

const MAX_ROUNDS = 30;

/**
 * Sends the running VM to `opts.destination_url`. On success the destination runs the VM and the caller
 * ends this one; on any failure (or a timeout with Cancel) the VM is left running here, unharmed.
 */
/** What the caller of a migration hears and may do while it runs. */
export interface MigrationHooks {
  /** Aborts the migration (the VMM shuts down): see {@link CANCELLED}. */
  signal?: AbortSignal;
  /** Sender: each pre-copy round of dirty memory starts (1, 2, …). */
  onIteration?(round: number): void;
  /** Receiver: listening for the sender. */
  onReady?(): void;
  /** Receiver: the sender is connected and its VM's config has arrived, before the memory. */
  onConfig?(config: unknown): void;
}

export async function sendMigration(
  vm: MigrationSource,
  config: unknown,
  opts: SendMigrationData,
  hooks: MigrationHooks = {},
): Promise<MigrationStats> {
  const url = parseMigrationUrl(opts.destination_url, "destination_url");
  vm.checkSavable();
  const pieces = vm.pieces();
  if (opts.local) {
    if (url.kind !== "unix") throw new Error("local=true hands memory over a UNIX socket (unix:PATH)");
    const without = pieces.filter((p) => p.fd === undefined).map((p) => p.name);
    if (without.length > 0) {
      throw new Error(
        `local=true hands the guest memory itself over, which needs shared memory (memory shared=on); ` +
          `not shared: ${without.join(", ")}`,
      );
    }
  }
  const started = performance.now();
  const ch = new MigrationChannel(hooks.signal);
  let tracker: DirtyTracker | null = null;
  let paused = false;
  let pausedAt = 0;
  let rounds = 0;
  let bytes = 0;
  let released = false;
  try {
    await ch.run({ op: "connect", url });
    await ch.run({ op: "json", type: FRAME.CONFIG, value: config });
    await ch.run({
      op: "json",
      type: FRAME.RANGES,
      value: pieces.map((p) => ({ name: p.name, size: p.size })),
    });
    const layout = pieces.map((p) => ({ hostAddr: p.hostAddr, size: p.size }));
    if (opts.local) {
      await vm.pause();
      paused = true;
      pausedAt = performance.now();
      await ch.run({ op: "memfds", names: pieces.map((p) => p.name), fds: pieces.map((p) => p.fd!) });
    } else {
      tracker = vm.dirtyTracker();
      tracker.start();
      // Round 0: everything the guest has touched (never-touched memory is zero at the receiver too).
      const all = pieces.flatMap((p, i) => [i, 0, p.size]);
      let r = await ch.run({ op: "pages", pieces: layout, runs: all, skipZero: true });
      bytes += r.bytes!;
      let rate = r.bytes! / Math.max(r.ms!, 1); // bytes per ms
      for (;;) {
        rounds++;
        hooks.onIteration?.(rounds);
        const dirty = await tracker.collect(() => vm.quiesceDevices(), () => vm.releaseDevices());
        const expected = dirty.bytes / Math.max(rate, 1);
        log.debug(
          `migration round ${rounds}: ${dirty.bytes} bytes dirty, ~${expected.toFixed(0)} ms to send`,
        );
        if (expected <= opts.downtime_ms) {
          // Converged: the rest is sent with the VM paused (below), with what gets dirty meanwhile.
          if (dirty.bytes > 0) {
            r = await ch.run({ op: "pages", pieces: layout, runs: dirty.runs, skipZero: false });
            bytes += r.bytes!;
          }
          break;
        }
        const late = (performance.now() - started) / 1000 > opts.timeout_s || rounds >= MAX_ROUNDS;
        if (late && opts.timeout_strategy === "Cancel") {
          throw new Error(
            `the guest dirties memory faster than it can be sent (${rounds} rounds, ${dirty.bytes} bytes ` +
              `still dirty); migration cancelled (timeout_strategy Cancel)`,
          );
        }
        r = await ch.run({ op: "pages", pieces: layout, runs: dirty.runs, skipZero: false });
        bytes += r.bytes!;
        if (r.bytes! > 0) rate = r.bytes! / Math.max(r.ms!, 1);
        if (late) break; // Ignore: stop iterating, finish with the VM paused
      }
      await vm.pause();
      paused = true;
      pausedAt = performance.now();
      const last = await tracker.collect(() => Promise.resolve(), () => {});
      if (last.bytes > 0) {
        r = await ch.run({ op: "pages", pieces: layout, runs: last.runs, skipZero: false });
        bytes += r.bytes!;
      }
    }
    await ch.run({ op: "json", type: FRAME.STATE, value: vm.saveState() });
    // The destination opens (and locks) the disk images while it starts the VM.
    vm.releaseImages();
    released = true;
    await ch.run({ op: "complete" });
    const now = performance.now();
    return { rounds, bytes, totalMs: now - started, downtimeMs: now - pausedAt };
  } catch (e) {
    await ch.run({ op: "abort" }).catch(() => {});
    if (released) vm.retakeImages();
    tracker?.stop();
    if (paused) await vm.resume();
    throw e;
  } finally {
    ch.close();
  }
}

/** What a received migration holds: the restore path takes it from here. */
export interface ReceivedMigration {
  config: unknown;
  state: SnapshotState;
  /** Guest memory as a snapshot's memory file would hold it (-1 with memfds). */
  memfd: number;
  /** local=true: the sender's own memory, by piece name. */
  memfds?: Record<string, number>;
  /** Tells the sender how it went (then the channel closes). */
  answer(ok: boolean, error?: string): Promise<void>;
}

/**
 * Listens on `url` and receives one migration (the returned promise settles when it is complete);
 * `hooks` hear when it listens and the VM's config as soon as it arrives, before the memory; their signal
 * gives up waiting for (or receiving from) the sender.
 */
export async function receiveMigration(
  url: MigrationUrl,
  hooks: MigrationHooks = {},
): Promise<ReceivedMigration> {
  const ch = new MigrationChannel(hooks.signal);
  try {
    await ch.run({ op: "listen", url });
    hooks.onReady?.();
    const c = await ch.run({ op: "receive-config" });
    try {
      hooks.onConfig?.(c.config);
    } catch { /* only a head start */ }
    const r = await ch.run({ op: "receive" });
    const state = r.state as SnapshotState;
    state.memory = r.layout ?? [];
    return {
      config: r.config,
      state,
      memfd: r.memfd ?? -1,
      memfds: r.memfds,
      answer: async (ok, error) => {
        try {
          await ch.run({ op: "ack", ok, error });
        } finally {
          ch.close();
        }
      },
    };
  } catch (e) {
    ch.close();
    throw e;
  }
}
