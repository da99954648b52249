/**
 * Configs as Cloud Hypervisor's clients send them and as Cloud Hypervisor itself reports them:
 * Kata Containers' CreateVM body is accepted, and CH's own `vm.info` config, fed back to dvmm's
 * `vm.create`, comes out of dvmm's `vm.info` unchanged (the fixtures follow CH's serialization: absent
 * options left out, `iommu` only when on, `pci_segment` always, nulls only inside rate limiters).
 */
import assert from "node:assert/strict";
import { apiRequest } from "../api/client.ts";
import { startTestServer } from "../api/testing.ts";

const V1 = "/api/v1/";

/** Kata Containers' CreateVM body (its Cloud Hypervisor driver), as the client-compatibility issue gives it. */
const KATA_CREATE = {
  console: { iommu: false, mode: "Off" },
  cpus: {
    boot_vcpus: 1,
    kvm_hyperv: false,
    max_vcpus: 2,
    nested: true,
    topology: { cores_per_die: 2, dies_per_package: 1, packages: 1, threads_per_core: 1 },
  },
  disks: [{
    backing_files: false,
    direct: false,
    image_type: "Raw",
    iommu: false,
    num_queues: 1,
    path: "/kata/image.img",
    queue_size: 128,
    readonly: true,
    sparse: true,
    vhost_user: false,
  }],
  fs: [{ num_queues: 1, pci_segment: 1, queue_size: 1024, socket: "/run/kata/vfsd.sock", tag: "kataShared" }],
  iommu: false,
  landlock_enable: false,
  memory: {
    hotplug_method: "Acpi",
    hotplug_size: 25275924480,
    hugepages: false,
    mergeable: false,
    prefault: false,
    shared: true,
    size: 2147483648,
    thp: true,
  },
  payload: {
    cmdline:
      "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 panic=1 no_timer_check noreplace-smp quiet",
    kernel: "/kata/vmlinux",
  },
  platform: { num_pci_segments: 2, sev_snp: false, tdx: false },
  pvpanic: false,
  rng: { iommu: false, src: "/dev/urandom" },
  serial: { iommu: false, mode: "Off" },
  vsock: { cid: 3, iommu: false, socket: "/run/kata/vsock.sock" },
  watchdog: false,
};

/** What Cloud Hypervisor reports after booting `--cpus boot=2 --memory size=512M --disk path=D --net tap=tap0 --serial tty --console off`. */
const CH_INFO_BASIC = {
  cpus: {
    boot_vcpus: 2,
    max_vcpus: 2,
    kvm_hyperv: false,
    max_phys_bits: 46,
    features: { amx: false },
    nested: true,
    core_scheduling: "Vm",
    profile: "Host",
  },
  memory: {
    size: 536870912,
    mergeable: false,
    hotplug_method: "Acpi",
    shared: false,
    hugepages: false,
    prefault: false,
    reserve: false,
    thp: true,
  },
  payload: { kernel: "/k/vmlinux", cmdline: "console=ttyS0" },
  disks: [{
    id: "_disk0",
    pci_segment: 0,
    path: "/images/disk.raw",
    readonly: false,
    direct: false,
    num_queues: 1,
    queue_size: 128,
    vhost_user: false,
    disable_io_uring: false,
    disable_aio: false,
    backing_files: false,
    sparse: true,
    image_type: "Raw",
    lock_granularity: "ByteRange",
  }],
  net: [{
    id: "_net1",
    pci_segment: 0,
    tap: "tap0",
    mac: "2e:5f:a1:0c:93:d7",
    num_queues: 2,
    queue_size: 256,
    vhost_user: false,
    vhost_mode: "Client",
    offload_tso: true,
    offload_ufo: true,
    offload_csum: true,
  }],
  rng: { pci_segment: 0, src: "/dev/urandom" },
  serial: { mode: "Tty" },
  console: { mode: "Off", pci_segment: 0 },
  debug_console: { mode: "Off", iobase: 233 },
  pvpanic: false,
  iommu: false,
  watchdog: false,
  landlock_enable: false,
};

/** A fuller one: rate limiters (with CH's nulls), iommu on, pmem, vsock, platform, hotplug, zones-less memory. */
const CH_INFO_FULL = {
  ...CH_INFO_BASIC,
  cpus: {
    ...CH_INFO_BASIC.cpus,
    boot_vcpus: 2,
    max_vcpus: 4,
    topology: { threads_per_core: 1, cores_per_die: 4, dies_per_package: 1, packages: 1 },
    affinity: [{ vcpu: 0, host_cpus: [0, 1] }],
  },
  memory: { ...CH_INFO_BASIC.memory, shared: true, hotplug_size: 1073741824, hotplug_method: "VirtioMem" },
  disks: [{
    ...CH_INFO_BASIC.disks[0],
    iommu: true,
    serial: "disk-serial",
    rate_limiter_config: { bandwidth: { size: 1048576, one_time_burst: null, refill_time: 100 }, ops: null },
  }],
  pmem: [{ id: "_pmem2", pci_segment: 0, file: "/images/pmem.img", discard_writes: true }],
  vsock: { id: "_vsock3", pci_segment: 0, cid: 3, socket: "/run/vsock.sock" },
  platform: {
    num_pci_segments: 2,
    iommu_address_width_bits: 64,
    system_serial_number: "abc",
    oem_strings: ["x"],
    tdx: false,
    sev_snp: false,
    iommufd: false,
    vfio_p2p_dma: true,
  },
  iommu: true,
};

async function createThenInfo(body: unknown): Promise<{ create: number; info: Record<string, unknown> }> {
  const t = await startTestServer();
  try {
    const c = await apiRequest(t.socket, "PUT", V1 + "vm.create", body);
    assert.equal(c.status, 204, c.body);
    const i = await apiRequest(t.socket, "GET", V1 + "vm.info");
    return { create: c.status, info: JSON.parse(i.body) };
  } finally {
    await t.close();
  }
}

Deno.test("Kata Containers' CreateVM body is accepted (204) and reported back", async () => {
  const { info } = await createThenInfo(KATA_CREATE);
  const config = info.config as typeof KATA_CREATE & Record<string, unknown>;
  assert.equal(info.state, "Created");
  assert.equal(config.fs[0].pci_segment, 1);
  assert.equal(config.memory.hotplug_size, 25275924480);
  assert.deepEqual(config.cpus.topology, KATA_CREATE.cpus.topology);
  assert.equal(config.vsock.cid, 3);
  assert.deepEqual(config.serial, { mode: "Off" }, "serial has no iommu in CH: Kata's is ignored");
  assert.deepEqual(config.console, { mode: "Off", pci_segment: 0 });
});

for (const [name, fixture] of [["basic", CH_INFO_BASIC], ["full", CH_INFO_FULL]] as const) {
  Deno.test(`Cloud Hypervisor's vm.info config (${name}) → vm.create → vm.info round-trips unchanged`, async () => {
    const { info } = await createThenInfo(fixture);
    assert.deepEqual(info.config, fixture);
    // And dvmm's own report, fed back, is again the same.
    const again = await createThenInfo(info.config);
    assert.deepEqual(again.info.config, fixture);
  });
}

Deno.test("nulls are absent and unknown fields ignored, everywhere but the rate limiter (as CH)", async () => {
  const t = await startTestServer();
  try {
    const body = {
      ...CH_INFO_BASIC,
      balloon: null,
      vsock: null,
      future_option: { x: 1 },
      disks: [{ ...CH_INFO_BASIC.disks[0], rate_limit_group: null, brand_new: true }],
    };
    assert.equal((await apiRequest(t.socket, "PUT", V1 + "vm.create", body)).status, 204);
    const info = JSON.parse((await apiRequest(t.socket, "GET", V1 + "vm.info")).body);
    assert.deepEqual(info.config, CH_INFO_BASIC);
    await apiRequest(t.socket, "PUT", V1 + "vm.delete");
    const strict = {
      ...CH_INFO_BASIC,
      disks: [{ ...CH_INFO_BASIC.disks[0], rate_limiter_config: { bandwidth: null, ops: null, burst: 1 } }],
    };
    const r = await apiRequest(t.socket, "PUT", V1 + "vm.create", strict);
    assert.equal(r.status, 400);
    assert.match(r.body, /unknown field 'burst'/);
    // Real errors still name the field.
    const bad = await apiRequest(t.socket, "PUT", V1 + "vm.create", {
      ...CH_INFO_BASIC,
      cpus: { ...CH_INFO_BASIC.cpus, boot_vcpus: 4 },
    });
    assert.equal(bad.status, 400);
    assert.match(bad.body, /boot_vcpus \(4\) must not exceed max_vcpus \(2\)/);
    const dup = await apiRequest(t.socket, "PUT", V1 + "vm.create", {
      ...CH_INFO_BASIC,
      net: [{ ...CH_INFO_BASIC.net[0], id: "_disk0" }],
    });
    assert.equal(dup.status, 400);
    assert.match(dup.body, /identifier '_disk0' is used by both/);
  } finally {
    await t.close();
  }
});

Deno.test("boot fills in device identifiers and MACs as CH does: one counter, creation order", async () => {
  const t = await startTestServer();
  try {
    const body = {
      payload: { kernel: "/k" },
      disks: [{ path: "/a.img" }, { path: "/b.img", id: "mine" }, { path: "/c.img" }],
      net: [{ tap: "t0" }],
      pmem: [{ file: "/p.img" }],
    };
    await apiRequest(t.socket, "PUT", V1 + "vm.create", body);
    let c = JSON.parse((await apiRequest(t.socket, "GET", V1 + "vm.info")).body).config;
    assert.equal(c.disks[0].id, undefined, "no identifiers before boot");
    assert.equal((await apiRequest(t.socket, "PUT", V1 + "vm.boot")).status, 204);
    c = JSON.parse((await apiRequest(t.socket, "GET", V1 + "vm.info")).body).config;
    assert.deepEqual(c.disks.map((d: { id: string }) => d.id), ["_disk0", "mine", "_disk1"]);
    assert.equal(c.net[0].id, "_net2");
    assert.match(c.net[0].mac, /^2e(:[0-9a-f]{2}){5}$/);
    assert.equal(c.pmem[0].id, "_pmem3");
    assert.equal(c.rng.id, undefined, "the rng's __rng stays out of the config");
    // remove-device finds what vm.info calls _disk0.
    assert.equal((await apiRequest(t.socket, "PUT", V1 + "vm.shutdown")).status, 204);
    assert.equal((await apiRequest(t.socket, "PUT", V1 + "vm.remove-device", { id: "_disk0" })).status, 204);
  } finally {
    await t.close();
  }
});
