/**
 * Cloud Hypervisor's command-line option strings → VmConfig input (vmm/config.ts): the grammar, every
 * option's keys and defaults, CH's syntax examples, and errors that name the option and the key.
 */
import assert from "node:assert/strict";
import {
  type CliVmOptions,
  ConfigError,
  consoleFromOption,
  debugConsoleFromOption,
  dequote,
  genericVhostUserFromOption,
  parseDiskConfig,
  parseIntegerList,
  parseNetConfig,
  parseOptions,
  parseRestoreConfig,
  parseSize,
  parseStringList,
  parseTupleList,
  restoreFromOption,
  splitOptionString,
  VIRTIO_DEVICE_TYPES,
  vmConfigFromCli,
  vmConfigInputFromCli,
} from "../vmm/config.ts";
import { unknownFields, VmConfigSchema } from "../vmm/vm_config.ts";
import { parseApiSocketOption } from "../api/server.ts";
import { parseEventMonitorOption } from "../vmm/events.ts";

/** `actual` contains everything in `expected` (objects member by member, arrays item by item). */
function assertSubset(actual: unknown, expected: unknown, at = "$"): void {
  if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${at}: expected an array, got ${JSON.stringify(actual)}`);
    assert.equal(actual.length, expected.length, `${at}: length`);
    expected.forEach((e, i) => assertSubset(actual[i], e, `${at}[${i}]`));
  } else if (expected !== null && typeof expected === "object" && !Array.isArray(expected)) {
    assert.ok(
      actual !== null && typeof actual === "object",
      `${at}: expected an object, got ${JSON.stringify(actual)}`,
    );
    for (const [k, v] of Object.entries(expected)) {
      if (v === undefined) {
        assert.ok(!(k in (actual as object)), `${at}.${k} should be absent, got ${JSON.stringify(actual)}`);
      } else {
        assertSubset((actual as Record<string, unknown>)[k], v, `${at}.${k}`);
      }
    }
  } else {
    assert.deepEqual(actual, expected, at);
  }
}

const input = (o: CliVmOptions) => vmConfigInputFromCli({ kernel: "/k", ...o });

// ---------------------------------------------------------------------------------------------------
// Grammar

Deno.test("cli config: option-string grammar follows Cloud Hypervisor's", () => {
  // Splitting: commas inside [...] (nested) and "..." do not split; the whole string is trimmed.
  assert.deepEqual(splitOptionString("tap=t0,fd=[3,4],ip=1.2.3.4"), ["tap=t0", "fd=[3,4]", "ip=1.2.3.4"]);
  assert.deepEqual(splitOptionString(' a=[[1,2],[3]],b="x,y" '), ["a=[[1,2],[3]]", 'b="x,y"']);
  assert.throws(() => splitOptionString("fd=[3,4"), /unbalanced/);
  assert.throws(() => splitOptionString("fd=3]"), /unbalanced/);
  assert.throws(() => splitOptionString('cmdline="a'), /unbalanced/);
  // Quotes are removed; a doubled quote after a closing one is a literal quote.
  assert.equal(dequote('"console=ttyS0,9600n8"'), "console=ttyS0,9600n8");
  assert.equal(dequote('"a"""'), 'a"');
  assert.equal(dequote('a="b"'), "a=b");

  const keys = ["a", "b", "t"];
  // The last of a repeated key wins; values are trimmed; `key=` means not given.
  assert.equal(parseOptions("--x", "a=1,a=2", keys).string("a"), "2");
  assert.equal(parseOptions("--x", "a= v ", keys).string("a"), "v");
  const empty = parseOptions("--x", "a=,t=", keys);
  assert.equal(empty.string("a"), undefined);
  assert.equal(empty.toggle("t"), undefined);
  assert.ok(empty.has("a"));
  // An empty string gives no keys at all.
  assert.equal(parseOptions("--x", "", keys).raw.size, 0);
  // Keys are case-sensitive and not trimmed.
  assert.throws(() => parseOptions("--x", "A=1", keys), /--x: unknown parameter 'A'/);
  assert.throws(() => parseOptions("--x", "a=1, b=2", keys), /--x: unknown parameter ' b'/);
  assert.throws(() => parseOptions("--x", "a=1,,b=2", keys), /--x: empty parameter/);
  assert.throws(() => parseOptions("--x", "a", keys), /--x: expected key=value, got 'a'/);
  // Toggles: on/off/true/false in any case, nothing else.
  const t = (s: string) => parseOptions("--x", `t=${s}`, keys).toggle("t");
  assert.deepEqual(["on", "ON", "True", "off", "FALSE"].map(t), [true, true, true, false, false]);
  assert.throws(() => t("yes"), /--x: t: 'yes' is not a boolean/);
  assert.throws(() => t("1"), /--x: t: '1' is not a boolean/);
  // Plain integers are decimal only.
  assert.equal(parseOptions("--x", "a=42", keys).int("a"), 42);
  assert.throws(() => parseOptions("--x", "a=0x10", keys).int("a"), /--x: a: '0x10' is not an integer/);
  assert.throws(() => parseOptions("--x", "a=-1", keys).int("a"), /--x: a: '-1' is not an integer/);
  assert.throws(() => parseOptions("--x", "a=256", keys).int("a", "u8"), /--x: a: '256' is out of range/);
});

Deno.test("cli config: sizes, integer lists, string lists and tuple lists", () => {
  assert.equal(parseSize("512M"), 512 << 20);
  assert.equal(parseSize("1G"), 1 << 30);
  assert.equal(parseSize("4K"), 4096);
  assert.equal(parseSize("4096"), 4096);
  // Upper-case K/M/G only: no lower case, no T, no KiB, no decimals.
  for (const bad of ["1g", "512m", "1T", "1KiB", "1.5G", "12X", "-1M", ""]) {
    assert.throws(() => parseSize(bad), /not a size/, bad);
  }
  assert.deepEqual(parseIntegerList("[0,2-4,6]"), [0, 2, 3, 4, 6]);
  assert.deepEqual(parseIntegerList("3"), [3]);
  assert.deepEqual(parseIntegerList("0-3"), [0, 1, 2, 3]);
  assert.throws(() => parseIntegerList("[3-1]"), /range/);
  assert.throws(() => parseIntegerList("[1,x]"), /not an integer/);
  assert.throws(() => parseIntegerList("[70000]", "u16"), /out of range/);
  assert.deepEqual(parseStringList("[a,b]"), ["a", "b"]);
  assert.deepEqual(parseStringList("amx"), ["amx"]);
  const num = (s: string) => Number(s);
  assert.deepEqual(parseTupleList("[0@[0-3],1@[4,6]]", num, (s) => parseIntegerList(s)), [
    [0, [0, 1, 2, 3]],
    [1, [4, 6]],
  ]);
  assert.deepEqual(parseTupleList("[1@20,2@30]", num, num), [[1, 20], [2, 30]]);
  assert.throws(() => parseTupleList("0@[0-3]", num, num), /bracketed list/);
  assert.throws(() => parseTupleList("[@1]", num, num), /empty key/);
  assert.throws(() => parseTupleList("[1@2@3]", num, num), /more than one '@'/);
  assert.throws(() => parseTupleList("[12]", num, num), /key@value/);
});

// ---------------------------------------------------------------------------------------------------
// Defaults

Deno.test("cli config: defaults equal Cloud Hypervisor's", () => {
  assert.deepEqual(vmConfigInputFromCli({ kernel: "/k" }), {
    cpus: {
      boot_vcpus: 1,
      max_vcpus: 1,
      kvm_hyperv: false,
      max_phys_bits: 46,
      features: { amx: false },
      nested: true,
      core_scheduling: "Vm",
      profile: "Host",
    },
    memory: {
      size: 512 << 20,
      mergeable: false,
      hotplug_method: "Acpi",
      shared: false,
      hugepages: false,
      prefault: false,
      reserve: false,
      thp: true,
    },
    payload: { kernel: "/k" },
    rng: { iommu: false, pci_segment: 0, src: "/dev/urandom" },
    serial: { mode: "Null" },
    console: { mode: "Tty", iommu: false, pci_segment: 0 },
    debug_console: { mode: "Off", iobase: 0xe9 },
    pvpanic: false,
    watchdog: false,
    landlock_enable: false,
    iommu: false,
  });
  // And through the schema.
  const c = vmConfigFromCli({ kernel: "/k" });
  assert.equal(c.cpus.boot_vcpus, 1);
  assert.equal(c.cpus.max_vcpus, 1);
  assert.equal(c.cpus.nested, true);
  assert.equal(c.memory.size, 512 << 20);
  assert.equal(c.memory.thp, true);
  assert.equal(c.serial.mode, "Null");
  assert.equal(c.console.mode, "Tty");
  assert.equal(c.rng.src, "/dev/urandom");
  assert.equal(c.payload.kernel, "/k");
});

Deno.test("cli config: device defaults equal Cloud Hypervisor's", () => {
  const c = input({
    disk: ["path=/d"],
    net: ["tap=t0"],
    fs: ["tag=t,socket=/s"],
    pmem: ["file=/p"],
    vdpa: ["path=/dev/vhost-vdpa-0"],
    device: ["path=/sys/bus/pci/devices/0000:01:00.0"],
    "user-device": ["socket=/u"],
    balloon: "",
    rtc: "",
    "pci-segment": [""],
    platform: "",
  });
  assert.deepEqual((c.disks as unknown[])[0], {
    iommu: false,
    pci_segment: 0,
    path: "/d",
    readonly: false,
    direct: false,
    num_queues: 1,
    queue_size: 128,
    vhost_user: false,
    disable_io_uring: false,
    disable_aio: false,
    backing_files: false,
    sparse: true,
    image_type: "Unknown",
    lock_granularity: "ByteRange",
  });
  assert.deepEqual((c.net as unknown[])[0], {
    iommu: false,
    pci_segment: 0,
    tap: "t0",
    num_queues: 2,
    queue_size: 256,
    vhost_user: false,
    vhost_mode: "Client",
    offload_tso: true,
    offload_ufo: true,
    offload_csum: true,
  });
  assert.deepEqual((c.fs as unknown[])[0], {
    pci_segment: 0,
    tag: "t",
    socket: "/s",
    num_queues: 1,
    queue_size: 1024,
  });
  assert.deepEqual((c.pmem as unknown[])[0], {
    iommu: false,
    pci_segment: 0,
    file: "/p",
    discard_writes: false,
  });
  assert.deepEqual((c.vdpa as unknown[])[0], {
    iommu: false,
    pci_segment: 0,
    path: "/dev/vhost-vdpa-0",
    num_queues: 1,
  });
  assert.deepEqual((c.devices as unknown[])[0], {
    iommu: false,
    pci_segment: 0,
    path: "/sys/bus/pci/devices/0000:01:00.0",
    x_exclude_mmap_bars: [],
  });
  assert.deepEqual((c.user_devices as unknown[])[0], { pci_segment: 0, socket: "/u" });
  assert.deepEqual(c.balloon, {
    iommu: false,
    pci_segment: 0,
    size: 0,
    deflate_on_oom: false,
    free_page_reporting: false,
  });
  assert.deepEqual(c.rtc, { iommu: false, pci_segment: 0 });
  assert.deepEqual(c.pci_segments, [{
    pci_segment: 0,
    mmio32_aperture_weight: 1,
    mmio64_aperture_weight: 1,
  }]);
  assert.deepEqual(c.platform, {
    num_pci_segments: 1,
    iommu_address_width_bits: 64,
    iommufd: false,
    vfio_p2p_dma: true,
  });
});

// ---------------------------------------------------------------------------------------------------
// Every option

/** [what, options, expected subset of the VmConfig input]. */
const OPTION_CASES: [string, CliVmOptions, Record<string, unknown>][] = [
  [
    "--cpus, every key",
    {
      cpus: "boot=2,max=4,topology=1:2:1:2,kvm_hyperv=on,max_phys_bits=40,affinity=[0@[0-3],1@[4,6]]," +
        "features=amx,nested=off,core_scheduling=vcpu,profile=Host",
    },
    {
      cpus: {
        boot_vcpus: 2,
        max_vcpus: 4,
        topology: { threads_per_core: 1, cores_per_die: 2, dies_per_package: 1, packages: 2 },
        kvm_hyperv: true,
        max_phys_bits: 40,
        affinity: [{ vcpu: 0, host_cpus: [0, 1, 2, 3] }, { vcpu: 1, host_cpus: [4, 6] }],
        features: { amx: true },
        nested: false,
        core_scheduling: "Vcpu",
        profile: "Host",
      },
    },
  ],
  ["--cpus max defaults to boot", { cpus: "boot=3" }, { cpus: { boot_vcpus: 3, max_vcpus: 3 } }],
  ["--cpus features=[amx], core_scheduling any case", { cpus: "features=[amx],core_scheduling=OFF" }, {
    cpus: { features: { amx: true }, core_scheduling: "Off" },
  }],
  [
    "--memory, every key",
    {
      memory:
        "size=1G,mergeable=on,hotplug_method=virtio-mem,hotplug_size=2G,hotplugged_size=1G,shared=off," +
        "hugepages=on,hugepage_size=2M,prefault=on,reserve=on,thp=off",
    },
    {
      memory: {
        size: 1 << 30,
        mergeable: true,
        hotplug_method: "VirtioMem",
        hotplug_size: 2 ** 31,
        hotplugged_size: 1 << 30,
        shared: false,
        hugepages: true,
        hugepage_size: 2 << 20,
        prefault: true,
        reserve: true,
        thp: false,
      },
    },
  ],
  ["--memory file= is accepted and ignored", { memory: "size=1G,file=/dev/shm/x" }, {
    memory: { size: 1 << 30, file: undefined },
  }],
  ["--memory hotplug_method any case", { memory: "hotplug_method=ACPI" }, {
    memory: { hotplug_method: "Acpi" },
  }],
  [
    "--memory-zone (repeatable; mergeable defaults to --memory's)",
    {
      memory: "size=0,mergeable=on",
      "memory-zone": [
        "id=z0,size=1G,file=/dev/hugepages/z0,shared=on,hugepages=on,hugepage_size=1G,host_numa_node=1," +
        "hotplug_size=1G,hotplugged_size=512M,prefault=on,reserve=on",
        "id=z1,mergeable=off",
      ],
    },
    {
      memory: {
        size: 0,
        zones: [
          {
            id: "z0",
            size: 1 << 30,
            file: "/dev/hugepages/z0",
            shared: true,
            hugepages: true,
            hugepage_size: 1 << 30,
            host_numa_node: 1,
            hotplug_size: 1 << 30,
            hotplugged_size: 512 << 20,
            prefault: true,
            reserve: true,
            mergeable: true,
          },
          {
            id: "z1",
            size: 512 << 20,
            shared: false,
            hugepages: false,
            prefault: false,
            reserve: false,
            mergeable: false,
          },
        ],
      },
    },
  ],
  [
    "--disk, every key",
    {
      disk: [
        "path=/img/a.raw,readonly=on,direct=on,iommu=on,num_queues=2,queue_size=256,serial=ABC,id=root," +
        "pci_segment=0,pci_device_id=5,backing_files=on,sparse=off,image_type=QCOW2,lock_granularity=full," +
        "_disable_io_uring=on,_disable_aio=on,queue_affinity=[0@[0,1],1@[2-3]]",
      ],
    },
    {
      disks: [{
        path: "/img/a.raw",
        readonly: true,
        direct: true,
        iommu: true,
        num_queues: 2,
        queue_size: 256,
        serial: "ABC",
        id: "root",
        pci_segment: 0,
        pci_device_id: 5,
        backing_files: true,
        sparse: false,
        image_type: "Qcow2",
        lock_granularity: "Full",
        disable_io_uring: true,
        disable_aio: true,
        queue_affinity: [{ queue_index: 0, host_cpus: [0, 1] }, { queue_index: 1, host_cpus: [2, 3] }],
      }],
      iommu: true,
    },
  ],
  [
    "--disk rate limiter keys → rate_limiter_config",
    {
      disk: [
        "path=/a,bw_size=1048576,bw_one_time_burst=4096,bw_refill_time=100,ops_size=100,ops_refill_time=10",
      ],
    },
    {
      disks: [{
        rate_limiter_config: {
          bandwidth: { size: 1048576, one_time_burst: 4096, refill_time: 100 },
          ops: { size: 100, one_time_burst: 0, refill_time: 10 },
        },
      }],
    },
  ],
  ["--disk: a bucket needs size and refill time", { disk: ["path=/a,bw_size=100,ops_refill_time=10"] }, {
    disks: [{ rate_limiter_config: undefined }],
  }],
  ["--disk vhost-user (image_type ignored with a socket)", {
    disk: ["vhost_user=on,socket=/tmp/vu.sock,image_type=raw,rate_limit_group=g0"],
  }, {
    disks: [{
      vhost_user: true,
      vhost_socket: "/tmp/vu.sock",
      image_type: "Unknown",
      rate_limit_group: "g0",
    }],
  }],
  ["--disk image types", {
    disk: ["path=/a,image_type=vhd", "path=/b,image_type=vmdk", "path=/c,image_type=Vhdx"],
  }, {
    disks: [{ image_type: "FixedVhd" }, { image_type: "FlatVmdk" }, { image_type: "Vhdx" }],
  }],
  [
    "--net, every key",
    {
      net: [
        "tap=tap0,ip=192.168.1.1,mask=255.255.255.0,mac=12:34:56:78:90:AB,host_mac=02:00:00:00:00:01,mtu=9000," +
        "iommu=on,num_queues=4,queue_size=512,id=n0,pci_segment=0,pci_device_id=7,offload_tso=off," +
        "offload_ufo=off,offload_csum=off,bw_size=1000,bw_refill_time=10",
      ],
    },
    {
      net: [{
        tap: "tap0",
        ip: "192.168.1.1",
        mask: "255.255.255.0",
        mac: "12:34:56:78:90:ab",
        host_mac: "02:00:00:00:00:01",
        mtu: 9000,
        iommu: true,
        num_queues: 4,
        queue_size: 512,
        id: "n0",
        pci_device_id: 7,
        offload_tso: false,
        offload_ufo: false,
        offload_csum: false,
        rate_limiter_config: { bandwidth: { size: 1000, one_time_burst: 0, refill_time: 10 } },
      }],
      iommu: true,
    },
  ],
  ["--net fd=[...] and vhost-user", {
    net: ["fd=[3,4],num_queues=4", "vhost_user=on,socket=/vu,vhost_mode=SERVER"],
  }, {
    net: [{ fds: [3, 4], num_queues: 4 }, { vhost_user: true, vhost_socket: "/vu", vhost_mode: "Server" }],
  }],
  ["--net IPv6", { net: ["tap=t0,ip=fe80:0:0::1,mask=ffff:ffff::"] }, {
    net: [{ ip: "fe80::1", mask: "ffff:ffff::" }],
  }],
  ["--rng", { rng: "src=/dev/random,iommu=on,id=r0,pci_device_id=3" }, {
    rng: { src: "/dev/random", iommu: true, id: "r0", pci_segment: 0, pci_device_id: 3 },
    iommu: true,
  }],
  ["--rtc bare", { rtc: "" }, { rtc: { iommu: false, pci_segment: 0 } }],
  ["--rtc with options", { rtc: "id=rtc0,pci_device_id=9" }, {
    rtc: { id: "rtc0", iommu: false, pci_segment: 0, pci_device_id: 9 },
  }],
  ["--balloon", { balloon: "size=256M,deflate_on_oom=on,free_page_reporting=on,id=b0" }, {
    balloon: { size: 256 << 20, deflate_on_oom: true, free_page_reporting: true, id: "b0" },
  }],
  [
    "--fs",
    { fs: ["tag=myfs,socket=/tmp/virtiofsd.sock,num_queues=2,queue_size=512,id=fs0,pci_device_id=4"] },
    {
      fs: [{
        tag: "myfs",
        socket: "/tmp/virtiofsd.sock",
        num_queues: 2,
        queue_size: 512,
        id: "fs0",
        pci_segment: 0,
        pci_device_id: 4,
      }],
    },
  ],
  ["--pmem", { pmem: ["file=/pmem.img,size=128M,discard_writes=on,iommu=on,id=p0"] }, {
    pmem: [{ file: "/pmem.img", size: 128 << 20, discard_writes: true, iommu: true, id: "p0" }],
    iommu: true,
  }],
  ["--generic-vhost-user", {
    "generic-vhost-user": ["socket=/gpu.sock,queue_sizes=[256,16],device_type=gpu,id=g0"],
  }, {
    generic_vhost_user: [{
      socket: "/gpu.sock",
      queue_sizes: [256, 16],
      device_type: 16,
      id: "g0",
      pci_segment: 0,
    }],
  }],
  ["--vsock", { vsock: "cid=3,socket=/tmp/vsock.sock,iommu=on,id=v0" }, {
    vsock: { cid: 3, socket: "/tmp/vsock.sock", iommu: true, id: "v0", pci_segment: 0 },
    iommu: true,
  }],
  ["--vdpa", { vdpa: ["path=/dev/vhost-vdpa-0,num_queues=4,iommu=on,id=vd0"] }, {
    vdpa: [{ path: "/dev/vhost-vdpa-0", num_queues: 4, iommu: true, id: "vd0" }],
  }],
  ["--device", {
    device: [
      "path=/sys/bus/pci/devices/0000:01:00.0,iommu=on,id=gpu0,x_nv_gpudirect_clique=1,x_exclude_mmap_bars=[0,2]",
      "fd=7",
    ],
  }, {
    devices: [
      {
        path: "/sys/bus/pci/devices/0000:01:00.0",
        iommu: true,
        id: "gpu0",
        x_nv_gpudirect_clique: 1,
        x_exclude_mmap_bars: [0, 2],
      },
      { fd: 7, path: undefined, x_exclude_mmap_bars: [] },
    ],
    iommu: true,
  }],
  ["--user-device", { "user-device": ["socket=/vfio-user.sock,id=u0,pci_segment=0"] }, {
    user_devices: [{ socket: "/vfio-user.sock", id: "u0", pci_segment: 0 }],
  }],
  ["--serial file=", { serial: "file=/tmp/serial.log" }, {
    serial: { mode: "File", file: "/tmp/serial.log" },
  }],
  ["--serial socket=", { serial: "socket=/tmp/serial.sock" }, {
    serial: { mode: "Socket", socket: "/tmp/serial.sock" },
  }],
  ["--serial pty", { serial: "pty" }, { serial: { mode: "Pty" } }],
  ["--console with device keys", { console: "off,iommu=on,id=con0" }, {
    console: { mode: "Off", iommu: true, id: "con0", pci_segment: 0 },
    iommu: true,
  }],
  ["--console socket= parses (refused later, as CH)", { console: "socket=/c.sock" }, {
    console: { mode: "Socket", socket: "/c.sock" },
  }],
  ["--debug-console", { "debug-console": "file=/tmp/dbg.log,iobase=0x402" }, {
    debug_console: { mode: "File", file: "/tmp/dbg.log", iobase: 0x402 },
  }],
  ["--debug-console without iobase", { "debug-console": "tty" }, {
    debug_console: { mode: "Tty", iobase: undefined },
  }],
  [
    "--numa",
    {
      memory: "size=0",
      "memory-zone": ["id=z0,size=1G", "id=z1,size=1G"],
      numa: [
        "guest_numa_id=0,cpus=[0-1,4],distances=[1@20],memory_zones=[z0],pci_segments=[0]",
        "guest_numa_id=1,cpus=[2,3],distances=[0@20],memory_zones=z1",
        "guest_numa_id=2,device_id=gpu0",
      ],
    },
    {
      numa: [
        {
          guest_numa_id: 0,
          cpus: [0, 1, 4],
          distances: [{ destination: 1, distance: 20 }],
          memory_zones: ["z0"],
          pci_segments: [0],
        },
        {
          guest_numa_id: 1,
          cpus: [2, 3],
          distances: [{ destination: 0, distance: 20 }],
          memory_zones: ["z1"],
        },
        { guest_numa_id: 2, device_id: "gpu0", cpus: undefined },
      ],
    },
  ],
  [
    "--platform, every key",
    {
      platform: "num_pci_segments=2,iommu_segments=[1],iommu_address_width=48,iommufd=off,iommufd_fd=9," +
        "vfio_p2p_dma=off,system_manufacturer=ACME,system_product_name=Box,system_version=1.0," +
        "system_serial_number=SN1,system_uuid=4b4d1a4e-1e9c-4a3f-8f0e-6c1b9d1e2f3a,system_sku_number=SKU," +
        'system_family=Fam,chassis_asset_tag=TAG,oem_strings=[a,"b c"]',
    },
    {
      platform: {
        num_pci_segments: 2,
        iommu_segments: [1],
        iommu_address_width_bits: 48,
        iommufd: false,
        iommufd_fd: 9,
        vfio_p2p_dma: false,
        system_manufacturer: "ACME",
        system_product_name: "Box",
        system_version: "1.0",
        system_serial_number: "SN1",
        system_uuid: "4b4d1a4e-1e9c-4a3f-8f0e-6c1b9d1e2f3a",
        system_sku_number: "SKU",
        system_family: "Fam",
        chassis_asset_tag: "TAG",
        oem_strings: ["a", '"b c"'],
      },
      iommu: true,
    },
  ],
  ["--platform: iommufd_fd implies iommufd; deprecated serial_number/uuid", {
    platform: "iommufd_fd=9,serial_number=OLD,uuid=U1,system_uuid=U2",
  }, {
    platform: { iommufd: true, iommufd_fd: 9, system_serial_number: "OLD", system_uuid: "U2" },
  }],
  ["--pci-segment", { "pci-segment": ["pci_segment=1,mmio32_aperture_weight=2,mmio64_aperture_weight=4"] }, {
    pci_segments: [{ pci_segment: 1, mmio32_aperture_weight: 2, mmio64_aperture_weight: 4 }],
  }],
  ["--rate-limit-group", {
    "rate-limit-group": [
      "id=g0,bw_size=1000,bw_one_time_burst=10,bw_refill_time=100,ops_size=10,ops_refill_time=5",
    ],
  }, {
    rate_limit_groups: [{
      id: "g0",
      rate_limiter_config: {
        bandwidth: { size: 1000, one_time_burst: 10, refill_time: 100 },
        ops: { size: 10, one_time_burst: 0, refill_time: 5 },
      },
    }],
  }],
  ["--tpm", { tpm: "socket=/tmp/swtpm.sock" }, { tpm: { socket: "/tmp/swtpm.sock" } }],
  ["--landlock and --landlock-rules", {
    landlock: true,
    "landlock-rules": ["path=/tmp,access=rw", "path=/a,access=r"],
  }, {
    landlock_enable: true,
    landlock_rules: [{ path: "/tmp", access: "rw" }, { path: "/a", access: "r" }],
  }],
  ["--pvpanic, --watchdog", { pvpanic: true, watchdog: true }, { pvpanic: true, watchdog: true }],
  ["payload", { initramfs: "/i", cmdline: "console=ttyS0 root=/dev/vda1" }, {
    payload: { kernel: "/k", initramfs: "/i", cmdline: "console=ttyS0 root=/dev/vda1" },
  }],
];

Deno.test("cli config: every option parses into its VmConfig fields", () => {
  for (const [what, opts, expected] of OPTION_CASES) {
    let got: Record<string, unknown>;
    try {
      got = input(opts);
    } catch (e) {
      throw new Error(`${what}: ${(e as Error).message}`);
    }
    try {
      assertSubset(got, expected);
    } catch (e) {
      throw new Error(`${what}: ${(e as Error).message}`);
    }
  }
});

Deno.test("cli config: every option together is a VmConfig the schema knows field by field", () => {
  const o: CliVmOptions = {
    kernel: "/k",
    cpus: "boot=2,max=4,topology=1:2:1:2,kvm_hyperv=on,max_phys_bits=40,affinity=[0@[0-3],1@[4,6]]," +
      "features=amx,nested=off,core_scheduling=vcpu,profile=Host",
    memory: "size=0,shared=on",
    "memory-zone": ["id=z0,size=1G,shared=on,host_numa_node=0", "id=z1,size=1G,shared=on"],
    disk: [
      "path=/a,iommu=on,queue_affinity=[0@[0,1]],lock_granularity=full,_disable_io_uring=on,_disable_aio=on," +
      "bw_size=100,bw_refill_time=10,image_type=vmdk,pci_device_id=5",
      "path=/b,rate_limit_group=g0",
    ],
    net: ["tap=t0,ip=1.2.3.4,mask=255.0.0.0,pci_device_id=6,ops_size=5,ops_refill_time=5"],
    rng: "src=/dev/random,id=r0",
    rtc: "",
    balloon: "size=64M",
    fs: ["tag=t,socket=/s"],
    pmem: ["file=/p"],
    "generic-vhost-user": ["socket=/g,queue_sizes=[64],device_type=gpu"],
    vsock: "cid=3,socket=/v",
    vdpa: ["path=/dev/x"],
    device: ["path=/sys/x,x_nv_gpudirect_clique=1,x_exclude_mmap_bars=[1]", "fd=7"],
    "user-device": ["socket=/u"],
    serial: "file=/tmp/s",
    console: "off,id=con0",
    "debug-console": "tty,iobase=0x402",
    numa: [
      "guest_numa_id=0,cpus=[0-1],distances=[1@20],memory_zones=[z0],pci_segments=[0]",
      "guest_numa_id=1,cpus=[2,3],memory_zones=z1",
    ],
    platform: "num_pci_segments=2,iommu_address_width=48,iommufd_fd=9,system_uuid=u,oem_strings=[a]",
    "pci-segment": ["pci_segment=1,mmio32_aperture_weight=2"],
    "rate-limit-group": ["id=g0,bw_size=1,bw_refill_time=1"],
    tpm: "socket=/t",
    landlock: true,
    "landlock-rules": [`path=${Deno.cwd()},access=rw`],
    pvpanic: true,
    watchdog: true,
  };
  assert.deepEqual(unknownFields(VmConfigSchema, vmConfigInputFromCli(o)), []);
  const c = vmConfigFromCli(o);
  assert.equal(c.cpus.profile, "Host");
  assert.equal(c.disks![0].lock_granularity, "Full");
  assert.equal(c.iommu, true);
});

Deno.test("cli config: firmware payload drops cmdline and initramfs (as Cloud Hypervisor)", () => {
  const c = vmConfigInputFromCli({ firmware: "/fw", cmdline: "x", initramfs: "/i" });
  assert.deepEqual(c.payload, { firmware: "/fw" });
});

Deno.test("cli config: generic-vhost-user device_type names and numbers", () => {
  const dt = (t: string) =>
    genericVhostUserFromOption(`socket=/s,queue_sizes=[64],device_type=${t}`).device_type;
  const expected: Record<string, number> = {
    net: 1,
    block: 2,
    console: 3,
    "9p": 9,
    gpu: 16,
    clock: 17,
    vsock: 19,
    sound: 25,
    fs: 26,
    i2c: 34,
    can: 36,
    gpio: 41,
    rdma: 42,
    camera: 43,
    usb: 49,
  };
  for (const [name, id] of Object.entries(expected)) assert.equal(dt(name), id, name);
  assert.equal(Object.keys(VIRTIO_DEVICE_TYPES).length, 47);
  assert.equal(dt("26"), 26);
  assert.equal(dt("4242"), 4242);
  // The deprecated spelling.
  assert.equal(genericVhostUserFromOption("socket=/s,queue_sizes=[64],virtio_id=fs").device_type, 26);
  const bad: [string, RegExp][] = [
    ["device_type=07", /device_type: '07' is not a virtio device type/],
    ["device_type=0", /device_type: '0' is not a virtio device type/],
    ["device_type=GPU", /device_type: 'GPU' is not a virtio device type/],
    ["device_type=constructor", /device_type: 'constructor' is not a virtio device type/],
    ["device_type=iommu", /device_type: 'iommu' devices cannot be implemented with vhost-user/],
    ["device_type=35", /device_type: '35' devices cannot be implemented with vhost-user/],
  ];
  for (const [kv, re] of bad) {
    assert.throws(() => genericVhostUserFromOption(`socket=/s,queue_sizes=[64],${kv}`), re, kv);
  }
});

Deno.test("cli config: serial, console and debug-console spellings", () => {
  assert.deepEqual(consoleFromOption("--serial", "file=/tmp/s.log"), { mode: "File", file: "/tmp/s.log" });
  assert.deepEqual(consoleFromOption("--serial", "socket=/tmp/s.sock"), {
    mode: "Socket",
    socket: "/tmp/s.sock",
  });
  assert.deepEqual(consoleFromOption("--serial", "null"), { mode: "Null" });
  assert.deepEqual(consoleFromOption("--console", "null"), { mode: "Null", iommu: false, pci_segment: 0 });
  // Several mode words: off, pty, tty, null, file, socket in that order of precedence.
  assert.deepEqual(consoleFromOption("--serial", "tty,off"), { mode: "Off" });
  assert.deepEqual(consoleFromOption("--serial", "file=/x,pty"), { mode: "Pty" });
  assert.throws(() => consoleFromOption("--serial", "loud"), /--serial: unknown parameter 'loud'/);
  assert.throws(() => consoleFromOption("--serial", "TTY"), /--serial: unknown parameter 'TTY'/);
  assert.throws(() => consoleFromOption("--serial", "iommu=on"), /--serial: unknown parameter 'iommu'/);
  assert.throws(() => consoleFromOption("--console", "iommu=on"), /--console: no output mode given/);
  assert.throws(() => consoleFromOption("--serial", "file="), /--serial: file: path missing/);
  assert.throws(() => consoleFromOption("--serial", "file"), /--serial: expected key=value, got 'file'/);
  assert.deepEqual(debugConsoleFromOption("off,iobase=0xe9"), { mode: "Off", iobase: 0xe9 });
  assert.throws(
    () => debugConsoleFromOption("tty,iobase=233"),
    /--debug-console: iobase: '233' is not an I\/O port/,
  );
  assert.throws(() => debugConsoleFromOption("socket=/x"), /--debug-console: unknown parameter 'socket'/);
});

Deno.test("cli config: a full command line through the schema", () => {
  const c = vmConfigFromCli({
    kernel: "/boot/vmlinux",
    initramfs: "/boot/initrd",
    cmdline: "console=ttyS0 root=/dev/vda1",
    cpus: "boot=2,max=4",
    memory: "size=1G,shared=on,hugepages=on",
    serial: "tty",
    console: "off",
    disk: [
      "path=/img/a.raw,readonly=on,direct=on,id=root,num_queues=2,queue_size=256,serial=ABC",
      "path=/img/b.raw",
    ],
    net: ["tap=tap0,ip=192.168.1.1,mask=255.255.255.0,mac=12:34:56:78:90:ab,num_queues=4,queue_size=512"],
    rng: "src=/dev/random",
  });
  assert.deepEqual([c.cpus.boot_vcpus, c.cpus.max_vcpus], [2, 4]);
  assert.equal(c.memory.size, 1 << 30);
  assert.ok(c.memory.shared && c.memory.hugepages);
  assert.equal(c.payload.initramfs, "/boot/initrd");
  assert.equal(c.serial.mode, "Tty");
  assert.equal(c.console.mode, "Off");
  assert.equal(c.disks!.length, 2);
  assert.deepEqual(
    [c.disks![0].readonly, c.disks![0].direct, c.disks![0].id, c.disks![0].num_queues, c.disks![0].serial],
    [true, true, "root", 2, "ABC"],
  );
  assert.equal(c.disks![1].queue_size, 128);
  assert.equal(c.net![0].tap, "tap0");
  assert.equal(c.net![0].num_queues, 4);
  assert.equal(c.rng.src, "/dev/random");
});

// ---------------------------------------------------------------------------------------------------
// Errors

Deno.test("cli config: errors name the option and the key", () => {
  const bad: [CliVmOptions, RegExp][] = [
    // Parse errors (Cloud Hypervisor's parser refuses these too).
    [{ cpus: "boot=two" }, /^--cpus: boot: 'two' is not an integer/],
    [{ cpus: "bogus=1" }, /^--cpus: unknown parameter 'bogus'/],
    [{ cpus: "topology=1:2:1" }, /^--cpus: topology: '1:2:1' is not threads_per_core:cores_per_die/],
    [{ cpus: "features=avx" }, /^--cpus: features: unknown CPU feature 'avx'/],
    [{ cpus: "profile=host" }, /^--cpus: profile: 'host' is not one of Host/],
    [{ cpus: "core_scheduling=constructor" }, /^--cpus: core_scheduling: 'constructor' is not one of/],
    [{ cpus: "affinity=0@[1]" }, /^--cpus: affinity: .*bracketed list/],
    [{ cpus: "max_phys_bits=300" }, /^--cpus: max_phys_bits: '300' is out of range/],
    [{ memory: "size=1g" }, /^--memory: size: '1g' is not a size/],
    [{ memory: "size=1G,shared=maybe" }, /^--memory: shared: 'maybe' is not a boolean/],
    [{ memory: "hotplug_method=dimm" }, /^--memory: hotplug_method: 'dimm' is not one of acpi, virtio-mem/],
    [{ "memory-zone": ["size=1G"] }, /^--memory-zone: id is required/],
    [{ disk: ["path"] }, /^--disk: expected key=value/],
    [{ disk: ["path=/a,colour=red"] }, /^--disk: unknown parameter 'colour'/],
    [
      { disk: ["path=/a,lock_granularity=Full"] },
      /^--disk: lock_granularity: 'Full' is not one of byte-range, full/,
    ],
    [{ disk: ["path=/a,image_type=iso"] }, /^--disk: image_type: 'iso' is not one of/],
    [{ disk: ["path=/a,queue_affinity=[x@[1]]"] }, /^--disk: queue_affinity: /],
    [{ disk: ["path=/a,bw_size=1M"] }, /^--disk: bw_size: '1M' is not an integer/],
    [{ net: ["tap=t0,mac=nope"] }, /^--net: mac: 'nope' is not a MAC address/],
    [{ net: ["tap=t0,ip=1.2.3"] }, /^--net: ip: '1.2.3' is not an IPv4 or IPv6 address/],
    [{ net: ["tap=t0,vhost_mode=both"] }, /^--net: vhost_mode: 'both' is not one of client, server/],
    [{ net: ["fd=[3,x]"] }, /^--net: fd: /],
    [{ fs: ["socket=/s"] }, /^--fs: tag is required/],
    [{ fs: ["tag=t"] }, /^--fs: socket is required/],
    [{ fs: [`tag=${"x".repeat(37)},socket=/s`] }, /^--fs: tag: .* longer than 36 bytes/],
    [{ fs: ["tag=t,socket=/s,iommu=on"] }, /^--fs: unknown parameter 'iommu'/],
    [{ pmem: ["size=1G"] }, /^--pmem: file is required/],
    [{ vsock: "cid=3" }, /^--vsock: socket is required/],
    [{ vsock: "socket=/s" }, /^--vsock: cid is required/],
    [{ vdpa: ["num_queues=2"] }, /^--vdpa: path is required/],
    [{ "user-device": ["id=u"] }, /^--user-device: socket is required/],
    [{ "user-device": ["socket=/s,iommu=on"] }, /^--user-device: unknown parameter 'iommu'/],
    [
      { "generic-vhost-user": ["queue_sizes=[1],device_type=net"] },
      /^--generic-vhost-user: socket is required/,
    ],
    [
      { "generic-vhost-user": ["socket=/s,device_type=net"] },
      /^--generic-vhost-user: queue_sizes is required/,
    ],
    [
      { "generic-vhost-user": ["socket=/s,queue_sizes=[1]"] },
      /^--generic-vhost-user: device_type is required/,
    ],
    [{ numa: ["cpus=[0]"] }, /^--numa: guest_numa_id is required/],
    [{ numa: ["guest_numa_id=0,memory_zones=[z],device_id=d"] }, /^--numa: device_id cannot be combined/],
    [{ numa: ["guest_numa_id=0,distances=[1@300]"] }, /^--numa: distances: /],
    [{ platform: "tdx=on" }, /^--platform: unknown parameter 'tdx'/],
    [{ platform: "iommu_address_width=x" }, /^--platform: iommu_address_width: 'x' is not an integer/],
    [{ "pci-segment": ["mmio32_aperture_weight=-1"] }, /^--pci-segment: mmio32_aperture_weight: /],
    [{ "rate-limit-group": ["id=g,bw_size=x"] }, /^--rate-limit-group: bw_size: 'x' is not an integer/],
    [{ tpm: "" }, /^--tpm: socket is required/],
    [{ "landlock-rules": ["path=/tmp"] }, /^--landlock-rules: access is required/],
    [{ "landlock-rules": ["path=/tmp,access=rwx"] }, /^--landlock-rules: access: 'rwx' is not r, w or rw/],
    [{ rtc: "colour=red" }, /^--rtc: unknown parameter 'colour'/],
    [{ balloon: "size=lots" }, /^--balloon: size: 'lots' is not a size/],
    [
      { device: ["path=/x,x_nv_gpudirect_clique=256"] },
      /^--device: x_nv_gpudirect_clique: '256' is out of range/,
    ],
    [{ "debug-console": "iobase=0xe9" }, /^--debug-console: no output mode given/],
    // Schema errors, named after the option the field comes from.
    [{ cpus: "boot=4,max=2" }, /^--cpus: .*boot_vcpus \(4\) must not exceed max_vcpus \(2\)/],
    [{ disk: ["readonly=on"] }, /^--disk: disks\.0\.path: a disk needs a path/],
    [{ disk: ["path=/a,id=x", "path=/b,id=x"] }, /^--disk: .*identifier 'x' is used by both/],
  ];
  for (const [opts, re] of bad) {
    assert.throws(
      () => vmConfigFromCli({ kernel: "/k", ...opts }),
      (e: Error) => e instanceof ConfigError && re.test(e.message),
      `${JSON.stringify(opts)} should fail with ${re.source}`,
    );
  }
  assert.throws(
    () => vmConfigFromCli({ cpus: "boot=1" }),
    (e: Error) => e instanceof ConfigError && /--kernel \(or --firmware\) is required/.test(e.message),
  );
});

Deno.test("cli config: a repeated key keeps its last value (as Cloud Hypervisor)", () => {
  const c = vmConfigInputFromCli({ kernel: "/k", disk: ["path=/a,path=/b"], cpus: "boot=1,boot=2" });
  assert.equal((c.disks as { path: string }[])[0].path, "/b");
  assert.equal((c.cpus as { boot_vcpus: number }).boot_vcpus, 2);
});

// ---------------------------------------------------------------------------------------------------
// dvmm remote, --restore, --api-socket, --event-monitor

Deno.test("cli config: single devices for dvmm remote", () => {
  assert.deepEqual(parseDiskConfig("path=/x.img,id=d1").id, "d1");
  assert.throws(() => parseDiskConfig("id=d1"), /add-disk: .*a disk needs a path/);
  assert.deepEqual(parseNetConfig("fd=[3,4],num_queues=4,mac=12:34:56:78:90:ab").fds, [3, 4]);
  assert.equal(parseRestoreConfig("source_url=file:///tmp/snap,prefault=on").prefault, true);
  assert.throws(() => parseRestoreConfig("prefault=on"), /restore: source_url is required/);
});

Deno.test("cli config: --restore keys", () => {
  assert.deepEqual(
    restoreFromOption(
      "source_url=file:///snap,prefault=on,memory_restore_mode=OnDemand,net_fds=[net0@[3,4],net1@[5]]," +
        "vfio_fds=[gpu0@7],iommufd_fd=8,resume=true,zone_updates=[z0@1]",
    ),
    {
      source_url: "file:///snap",
      prefault: true,
      memory_restore_mode: "OnDemand",
      net_fds: [{ id: "net0", num_fds: 2, fds: [3, 4] }, { id: "net1", num_fds: 1, fds: [5] }],
      vfio_fds: [{ id: "gpu0", fd: 7 }],
      iommufd_fd: 8,
      resume: true,
      zone_updates: [{ id: "z0", host_numa_node: 1 }],
    },
  );
  assert.deepEqual(restoreFromOption("source_url=file:///snap"), {
    source_url: "file:///snap",
    prefault: false,
    memory_restore_mode: "Copy",
    resume: false,
    zone_updates: [],
  });
  assert.throws(
    () => restoreFromOption("source_url=x,memory_restore_mode=lazy"),
    /--restore: memory_restore_mode: /,
  );
});

Deno.test("cli config: --api-socket and --event-monitor values", () => {
  assert.deepEqual(parseApiSocketOption("path=/tmp/a.sock"), { path: "/tmp/a.sock" });
  assert.deepEqual(parseApiSocketOption("/tmp/a.sock"), { path: "/tmp/a.sock" });
  assert.deepEqual(parseApiSocketOption("fd=3"), { fd: 3 });
  assert.throws(() => parseApiSocketOption("fd=x"), /fd must be a file descriptor number/);
  assert.throws(() => parseApiSocketOption("path="), /expected path=PATH or fd=N/);
  assert.deepEqual(parseEventMonitorOption("path=/tmp/e.json"), { path: "/tmp/e.json" });
  assert.deepEqual(parseEventMonitorOption("fd=4"), { fd: 4 });
  assert.throws(
    () => parseEventMonitorOption("/tmp/e.json"),
    /expected path=FILE or fd=N, got '\/tmp\/e.json'/,
  );
});
