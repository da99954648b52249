/**
 * Workers started ahead of need. A Worker is a V8 isolate that loads its own module graph, which takes
 * long on a slow host (seconds in the KVM lab): a migration's receiver starts the vCPU and device workers
 * while memory is still arriving, so bringing the VM up at the switch-over does not wait for them.
 */
export class WorkerPool {
  readonly #idle = new Map<string, Worker[]>();

  /** Starts `n` more workers of module `url` to be taken later. */
  prewarm(url: string, n: number): void {
    const list = this.#idle.get(url) ?? [];
    for (let i = 0; i < n; i++) list.push(new Worker(url, { type: "module" }));
    this.#idle.set(url, list);
  }

  /** A started worker of module `url`: a prewarmed one if there is one, else a new one. */
  take(url: string): Worker {
    return this.#idle.get(url)?.shift() ?? new Worker(url, { type: "module" });
  }

  /** Workers of module `url` started and not taken yet. */
  idle(url: string): number {
    return this.#idle.get(url)?.length ?? 0;
  }

  /** Ends the workers nobody took. */
  drain(): void {
    for (const list of this.#idle.values()) for (const w of list) w.terminate();
    this.#idle.clear();
  }
}

/**
 * The URL of a worker module given relative to the calling module (`./vcpu_worker.ts`). Under the bundled
 * build (build/js, made by `make`), modules are .js files laid out as the sources are: the same relative
 * path with .js.
 */
export function workerUrl(relative: string, base: string): string {
  return new URL(base.endsWith(".js") ? relative.replace(/\.ts$/, ".js") : relative, base).href;
}

/** The process's pool. */
export const workerPool: WorkerPool = new WorkerPool();
