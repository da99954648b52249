/**
 * Landlock confinement, as Cloud Hypervisor's `--landlock` / `landlock_enable` and `--landlock-rules`:
 * when a VM with Landlock enabled is created, the VMM gives up access to every file except the ones its
 * config names (payload, disks, pmem, memory-zone files, consoles, sockets, the rng source), the ones
 * `landlock_rules` adds (paths a later hotplug, snapshot or restore will use), and what dvmm itself needs
 * to go on running (/dev/kvm, its own code for the workers it starts, /proc for its own state).
 *
 * Filesystem rights are Landlock ABI 3's (as Cloud Hypervisor's): `r` = execute, read files, list
 * directories; `w` = write, truncate, create and remove entries. The domain is put on the thread that
 * creates the VM (the control loop's) and is inherited by every thread started after it (vCPUs, devices,
 * Deno's I/O pool threads that start later); like Cloud Hypervisor, threads that exist already (Deno's own
 * runtime threads) are not changed. A second VM in the same process adds its own, stacked domain.
 */
import { cstr, shim } from "../ffi/shim.ts";
import type { VmConfig } from "./vm_config.ts";

/** The directory part of a path, as POSIX dirname(1) gives it (a local one: node:path costs start-up). */
export function dirname(path: string): string {
  const p = path.replace(/\/+$/, "");
  if (p === "") return path.startsWith("/") ? "/" : ".";
  const i = p.lastIndexOf("/");
  if (i < 0) return ".";
  const d = p.slice(0, i).replace(/\/+$/, "");
  return d === "" ? "/" : d;
}

const CREATE_RULESET_VERSION = 1;
const RULE_PATH_BENEATH = 1;
const O_PATH = 0o10000000;
const O_CLOEXEC = 0o2000000;

// LANDLOCK_ACCESS_FS_* bits.
const EXECUTE = 1 << 0;
const WRITE_FILE = 1 << 1;
const READ_FILE = 1 << 2;
const READ_DIR = 1 << 3;
const REMOVE_DIR = 1 << 4;
const REMOVE_FILE = 1 << 5;
const MAKE_CHAR = 1 << 6;
const MAKE_DIR = 1 << 7;
const MAKE_REG = 1 << 8;
const MAKE_SOCK = 1 << 9;
const MAKE_FIFO = 1 << 10;
const MAKE_BLOCK = 1 << 11;
const MAKE_SYM = 1 << 12;
const REFER = 1 << 13; // ABI 2
const TRUNCATE = 1 << 14; // ABI 3

const READ = EXECUTE | READ_FILE | READ_DIR;
const WRITE = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK |
  MAKE_FIFO |
  MAKE_BLOCK | MAKE_SYM | REFER | TRUNCATE;
/** The rights that apply to a file (the others only to directories). */
const FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE;

/** One path and its access, `r`, `w` or `rw` (Cloud Hypervisor's `--landlock-rules path=,access=`). */
export interface LandlockRule {
  path: string;
  access: string;
  /** Where the rule comes from, for errors ("--disk path", "dvmm's code"). */
  why: string;
}

/** Landlock's ABI version on this kernel (0: not available). */
export function landlockAbi(): number {
  const r = Number(shim().kvs_landlock_create_ruleset(null, 0n, CREATE_RULESET_VERSION));
  return r > 0 ? r : 0;
}

function accessBits(access: string, why: string): number {
  if (!/^[rw]+$/.test(access)) throw new Error(`${why}: Landlock access "${access}" is not r, w or rw`);
  return (access.includes("r") ? READ : 0) | (access.includes("w") ? WRITE : 0);
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The rules a VM config needs: its files (as Cloud Hypervisor grants them), `landlock_rules`, and what
 * dvmm's own process needs. Paths that do not exist (yet) are left out, except that a socket dvmm
 * creates gets its directory.
 */
export function landlockRules(cfg: VmConfig): LandlockRule[] {
  const rules: LandlockRule[] = [];
  const add = (path: string | undefined, access: string, why: string) => {
    if (path) rules.push({ path, access, why });
  };
  // dvmm itself: its code and Deno's cache (workers load modules when they start), KVM, its own /proc.
  const code = decodeURIComponent(new URL("..", import.meta.url).pathname);
  if (exists(code)) add(code, "r", "dvmm's code");
  const denoDir = Deno.env.get("DENO_DIR");
  if (denoDir && exists(denoDir)) add(denoDir, "r", "Deno's cache (DENO_DIR)");
  const shimPath = Deno.env.get("DVMM_SHIM");
  if (shimPath && exists(shimPath)) add(shimPath, "r", "the shim (DVMM_SHIM)");
  add("/dev/kvm", "rw", "KVM");
  add("/dev/null", "rw", "/dev/null");
  add(`/proc/${Deno.pid}`, "rw", "dvmm's /proc entries");
  add("/proc/meminfo", "r", "/proc/meminfo");
  add("/sys/devices/system/cpu", "r", "the host's CPU list");

  const p = cfg.payload;
  add(p?.kernel, "r", "--kernel");
  add(p?.initramfs, "r", "--initramfs");
  add(p?.firmware, "r", "--firmware");
  for (const z of cfg.memory.zones ?? []) add(z.file, "rw", `--memory-zone id=${z.id},file`);
  for (const d of cfg.disks ?? []) add(d.path, d.readonly ? "r" : "rw", `--disk path`);
  add(cfg.rng.src, "r", "--rng src");
  for (const f of cfg.fs ?? []) add(f.socket, "rw", "--fs socket");
  for (const g of cfg.generic_vhost_user ?? []) add(g.socket, "rw", "--generic-vhost-user socket");
  for (const d of cfg.disks ?? []) add(d.vhost_socket, "rw", "--disk socket");
  for (const n of cfg.net ?? []) add(n.vhost_socket, "rw", "--net socket");
  for (const m of cfg.pmem ?? []) add(m.file, m.discard_writes ? "r" : "rw", "--pmem file");
  if ((cfg.net ?? []).some((n) => !n.vhost_user)) add("/dev/net/tun", "rw", "--net (taps)");
  for (const [opt, c] of [["--serial", cfg.serial], ["--console", cfg.console]] as const) {
    if (!c) continue;
    if (c.mode === "Pty") {
      add("/dev/pts", "rw", `${opt} pty`);
      add("/dev/ptmx", "rw", `${opt} pty`);
    }
    if (c.mode === "Tty") add("/dev/tty", "rw", `${opt} tty`);
    add(c.file, "rw", `${opt} file`);
    if (c.socket) add(dirname(c.socket), "w", `${opt} socket's directory`);
  }
  if (cfg.vsock) add(dirname(cfg.vsock.socket), "rw", "--vsock socket's directory");
  add(cfg.tpm?.socket, "rw", "--tpm socket");
  for (const r of cfg.landlock_rules ?? []) add(r.path, r.access, "--landlock-rules");
  return rules.filter((r) => r.why === "--landlock-rules" || exists(r.path));
}

/**
 * Restricts the calling thread (and every thread it starts later) to `rules`. Throws, naming the rule,
 * when Landlock is not available or a path cannot be opened.
 */
export function restrictToRules(rules: LandlockRule[]): void {
  const abi = landlockAbi();
  if (abi === 0) {
    throw new Error(
      "Landlock is not available on this host kernel (enable CONFIG_SECURITY_LANDLOCK and lsm=landlock)",
    );
  }
  const handled = READ | (WRITE & ~(abi < 2 ? REFER : 0) & ~(abi < 3 ? TRUNCATE : 0));
  const attr = new BigUint64Array([BigInt(handled)]);
  const ruleset = Number(shim().kvs_landlock_create_ruleset(new Uint8Array(attr.buffer), 8n, 0));
  if (ruleset < 0) throw new Error(`Landlock: creating the ruleset failed (errno ${-ruleset})`);
  try {
    const beneath = new Uint8Array(12);
    const v = new DataView(beneath.buffer);
    for (const rule of rules) {
      const fd = Number(shim().kvs_open(cstr(rule.path), O_PATH | O_CLOEXEC, 0));
      if (fd < 0) throw new Error(`${rule.why}: Landlock cannot open ${rule.path} (errno ${-fd})`);
      try {
        const isDir = Deno.statSync(rule.path).isDirectory;
        const rights = accessBits(rule.access, rule.why) & handled & (isDir ? ~0 : FILE_RIGHTS);
        if (rights === 0) continue;
        v.setBigUint64(0, BigInt(rights), true);
        v.setInt32(8, fd, true);
        const r = Number(shim().kvs_landlock_add_rule(ruleset, RULE_PATH_BENEATH, beneath));
        if (r < 0) throw new Error(`${rule.why}: Landlock refused the rule for ${rule.path} (errno ${-r})`);
      } finally {
        shim().kvs_close(fd);
      }
    }
    const r = Number(shim().kvs_landlock_restrict_self(ruleset));
    if (r < 0) throw new Error(`Landlock: restricting the VMM failed (errno ${-r})`);
  } finally {
    shim().kvs_close(ruleset);
  }
}

const applied = new Set<string>();

/**
 * Applies a VM config's Landlock rules when it asks for them (`landlock_enable`). The same rules are
 * applied once per process (a reboot or a second boot of the same config adds no layer; the kernel allows
 * 16). Returns true when this call restricted the process (threads started before are not covered:
 * idle pooled workers should be ended).
 */
export function applyLandlock(cfg: VmConfig): boolean {
  if (!cfg.landlock_enable) return false;
  const rules = landlockRules(cfg);
  const key = JSON.stringify(rules.map((r) => [r.path, r.access]).sort());
  if (applied.has(key)) return false;
  restrictToRules(rules);
  applied.add(key);
  return true;
}
