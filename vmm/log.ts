/**
 * Process-wide logging. Verbosity follows Cloud Hypervisor's `-v` convention: errors and warnings
 * always, `-v` adds info, `-vv` debug, `-vvv` trace. Lines go to stderr, or to `--log-file`.
 */

export type LogLevel = "error" | "warn" | "info" | "debug" | "trace";
const RANK: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3, trace: 4 };

const encoder = new TextEncoder();
let threshold = RANK.warn;
let sink: { writeSync(p: Uint8Array): number } = Deno.stderr;
const start = performance.now();

/** Set the verbosity from the number of `-v` flags. */
export function setVerbosity(count: number): void {
  threshold = Math.min(RANK.warn + Math.max(0, count), RANK.trace);
}

/** Send log lines to a file (appending) instead of stderr. */
export function setLogFile(path: string): void {
  sink = Deno.openSync(path, { create: true, append: true, write: true });
}

export function enabled(level: LogLevel): boolean {
  return RANK[level] <= threshold;
}

function write(level: LogLevel, source: string, msg: string): void {
  if (RANK[level] > threshold) return;
  const t = ((performance.now() - start) / 1000).toFixed(6);
  const line = `dvmm: ${t}s: <${source}> ${level.toUpperCase()}: ${msg}\n`;
  try {
    const bytes = encoder.encode(line);
    let off = 0;
    while (off < bytes.length) off += sink.writeSync(bytes.subarray(off));
  } catch {
    // Logging must never take the VMM down.
  }
}

/** A logger tagged with the part of dvmm it speaks for. */
export interface Logger {
  error(msg: string): void;
  warn(msg: string): void;
  info(msg: string): void;
  debug(msg: string): void;
  trace(msg: string): void;
}

export function logger(source: string): Logger {
  return {
    error: (m) => write("error", source, m),
    warn: (m) => write("warn", source, m),
    info: (m) => write("info", source, m),
    debug: (m) => write("debug", source, m),
    trace: (m) => write("trace", source, m),
  };
}

/** The general-purpose VMM logger. */
export const log: Logger = logger("vmm");
