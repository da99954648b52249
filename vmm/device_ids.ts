/**
 * The identifiers of every device in a VM config, with where each one sits: for duplicate checks when a
 * config is read and when a device is added. Kept apart from the config schemas (vm_config.ts) so that the
 * modules a vCPU worker loads do not pull in the schema library.
 */

/** Anything that may carry an `id`. */
interface Named {
  id?: string;
}

/** The parts of a VM config that hold devices. */
export interface DeviceLists {
  disks?: Named[];
  net?: Named[];
  fs?: Named[];
  pmem?: Named[];
  devices?: Named[];
  user_devices?: Named[];
  vdpa?: Named[];
  generic_vhost_user?: Named[];
  vsock?: Named;
  rng: Named;
  balloon?: Named;
  console: Named;
  memory: { zones?: Named[] };
  rate_limit_groups?: Named[];
}

/** Identifiers of every device in a config, with where each one sits (`disks[1]`, `rng`…). */
export function deviceIds(c: DeviceLists): { id: string; where: string }[] {
  const out: { id: string; where: string }[] = [];
  const add = (list: Named[] | undefined, where: string) =>
    list?.forEach((d, i) => d.id !== undefined && out.push({ id: d.id, where: `${where}[${i}]` }));
  add(c.disks, "disks");
  add(c.net, "net");
  add(c.fs, "fs");
  add(c.pmem, "pmem");
  add(c.devices, "devices");
  add(c.user_devices, "user_devices");
  add(c.vdpa, "vdpa");
  add(c.generic_vhost_user, "generic_vhost_user");
  add(c.vsock ? [c.vsock] : undefined, "vsock");
  add([c.rng], "rng");
  add(c.balloon ? [c.balloon] : undefined, "balloon");
  add([c.console], "console");
  add(c.memory.zones, "memory.zones");
  add(c.rate_limit_groups, "rate_limit_groups");
  return out;
}
