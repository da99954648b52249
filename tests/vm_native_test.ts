/**
 * The whole VM path on this machine's real /dev/kvm with tiny PVH guests: loader, vCPU workers,
 * the 16550 over shared state, the ACPI sleep register (poweroff), pause/resume and shutdown.
 */
import assert from "node:assert/strict";
import {
  DiskConfigSchema,
  NetConfigSchema,
  PmemConfigSchema,
  VmConfigSchema,
  VsockConfigSchema,
} from "../vmm/vm_config.ts";
import { openTap } from "../devices/virtio/tap.ts";
import { shim } from "../ffi/shim.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { Vm } from "../vmm/vm.ts";
import { printAndPoweroffCode, pvhElf, serialConsoleCode } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { fdDiff, openFds, threadNames } from "./helpers/host.ts";

const ignore = !kvmAvailable();

async function guestVm(
  code: Uint8Array,
  vcpus = 1,
  maxVcpus = vcpus,
  extra: (dir: string) => Record<string, unknown> = () => ({}),
) {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-vm-test-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(code));
  const config = VmConfigSchema.parse({
    cpus: { boot_vcpus: vcpus, max_vcpus: maxVcpus },
    memory: { size: 64 << 20 },
    payload: { kernel: `${dir}/guest.elf` },
    serial: { mode: "File", file: `${dir}/serial.out` },
    console: { mode: "Off" },
    ...extra(dir),
  });
  const vm = new Vm(config);
  const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
  return { vm, event, dir, output: () => Deno.readTextFile(`${dir}/serial.out`) };
}

Deno.test(
  { name: "guest prints on the serial port and powers off through the ACPI sleep register", ignore },
  async () => {
    const g = await guestVm(printAndPoweroffCode("hello from a PVH guest\n"));
    await g.vm.boot();
    assert.equal(await g.event, "poweroff");
    await g.vm.shutdown();
    assert.equal(await g.output(), "hello from a PVH guest\n");
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  {
    name:
      "serial: polled THR writes are coalesced (one exit per byte, not two); interrupt-driven ones are not",
    ignore,
  },
  async () => {
    const line = (c: string, n: number) => Array.from({ length: n }, (_, i) => c + String(i % 10)).join("");
    const polled: [string, string, string] = [
      line("a", 100) + "\n",
      line("b", 40) + "\n",
      line("c", 100) + "\n",
    ];
    // 500 bytes with no status read between them: more than KVM's ring holds (170), so it fills and the
    // write that finds it full exits; that exit replays the ring first, and the order holds.
    const burst = line("d", 250) + "\n";
    const g = await guestVm(serialConsoleCode(polled, burst));
    await g.vm.boot();
    assert.equal(await g.event, "poweroff");
    const exits = g.vm.vcpuExits()[0];
    await g.vm.shutdown();
    assert.equal(await g.output(), polled.join("") + burst, "every byte, in order");
    const n = polled.map((m) => m.length);
    // Uncoalesced: a status read and a write per byte, 2 × (n0 + n1 + n2) + the burst + 3.
    const coalesced = n[0] + 2 * n[1] + n[2];
    const uncoalesced = 2 * (n[0] + n[1] + n[2]) + burst.length;
    if (Deno.env.get("DVMM_COALESCED_PIO") === "0") {
      assert.ok(exits >= uncoalesced, `${exits} exits; ${uncoalesced} expected without coalescing`);
    } else {
      // The polled phases: one exit per byte (the status read), but while THRI is on both exit; the
      // burst: an exit each time the ring fills; 3 register writes and the poweroff.
      assert.ok(
        exits >= coalesced && exits <= coalesced + 20,
        `${exits} exits, ${coalesced}..${coalesced + 20} expected`,
      );
    }
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  { name: "a VM with memory hotplug_size (ACPI) boots: the region is kept, nothing refused", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-vm-test-" });
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(printAndPoweroffCode("hotplug-ready\n")));
    const vm = new Vm(VmConfigSchema.parse({
      // Kata sends this hotplug_size, which is not a multiple of 128 MiB.
      memory: { size: 64 << 20, hotplug_size: 25275924480, hotplug_method: "Acpi" },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "File", file: `${dir}/serial.out` },
      console: { mode: "Off" },
    }));
    const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
    await vm.boot();
    assert.equal(await event, "poweroff");
    await vm.shutdown();
    assert.equal(await Deno.readTextFile(`${dir}/serial.out`), "hotplug-ready\n");
    await Deno.remove(dir, { recursive: true });
  },
);

Deno.test(
  { name: "PCI segments: a device on segment 1 gets its slot there; the guest still boots", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-vm-test-" });
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(printAndPoweroffCode("segments\n")));
    const vm = new Vm(VmConfigSchema.parse({
      memory: { size: 64 << 20 },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "File", file: `${dir}/serial.out` },
      console: { mode: "Null", pci_segment: 1 },
      rng: { src: "/dev/urandom", pci_segment: 1 },
      platform: { num_pci_segments: 2 },
    }));
    const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
    await vm.boot();
    const tree = vm.deviceTree() as Record<string, { pci_bdf?: string }>;
    assert.equal(tree["_virtio-pci-__console"].pci_bdf, "0001:00:01.0");
    assert.equal(tree["_virtio-pci-__rng"].pci_bdf, "0001:00:02.0");
    assert.equal(await event, "poweroff");
    await vm.shutdown();
    assert.equal(await Deno.readTextFile(`${dir}/serial.out`), "segments\n");
    await Deno.remove(dir, { recursive: true });
  },
);

Deno.test(
  { name: "a 2-vCPU VM boots on the BSP while the AP waits for SIPI, and shuts down", ignore },
  async () => {
    const g = await guestVm(printAndPoweroffCode("two cpus\n"), 2);
    await g.vm.boot();
    assert.equal(await g.event, "poweroff");
    await g.vm.shutdown();
    assert.equal(await g.output(), "two cpus\n");
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  { name: "vm.nmi reaches the guest: without an IDT the NMI triple-faults it into a reset", ignore },
  async () => {
    // jmp $ with the boot IDT empty (limit 0): an NMI cannot be delivered, the CPU shuts down.
    const g = await guestVm(new Uint8Array([0xeb, 0xfe]), 2);
    await g.vm.boot();
    await g.vm.nmi();
    assert.equal(await g.event, "reboot");
    await g.vm.shutdown();
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  { name: "the light devices share one device thread; a disk keeps its own", ignore },
  async () => {
    const g = await guestVm(new Uint8Array([0xeb, 0xfe]), 1, 1, (dir) => {
      Deno.writeFileSync(`${dir}/disk.img`, new Uint8Array(1 << 20));
      return {
        console: { mode: "File", file: `${dir}/console.out` },
        balloon: { size: 0 },
        disks: [{ path: `${dir}/disk.img` }],
      };
    });
    await g.vm.boot();
    let names: string[] = [];
    for (let i = 0; i < 200 && !(names.includes("virtio-shared") && names.includes("_disk0")); i++) {
      names = threadNames();
      await new Promise((r) => setTimeout(r, 20));
    }
    // rng, console and balloon: one isolate between them; the disk's data plane stays apart.
    assert.equal(names.filter((n) => n === "virtio-shared").length, 1, names.join(", "));
    assert.ok(names.includes("_disk0"), names.join(", "));
    assert.ok(!names.includes("__rng") && !names.includes("__console"), names.join(", "));
    await g.vm.pause();
    await g.vm.resume();
    await g.vm.shutdown();
    for (let i = 0; i < 100 && threadNames().includes("virtio-shared"); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(!threadNames().includes("virtio-shared"), "the shared device thread ends with the VM");
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  { name: "a spinning guest can be paused, resumed and shut down from the host", ignore },
  async () => {
    // jmp $ : the vCPU never exits on its own, so pause and shutdown must kick it out of KVM_RUN.
    const g = await guestVm(new Uint8Array([0xeb, 0xfe]), 2);
    await g.vm.boot();
    // Threads are named as Cloud Hypervisor names them (orchestrators find vCPUs by name): vCPUs
    // `vcpuN`, device threads after their device.
    let names: string[] = [];
    for (let i = 0; i < 100 && !names.includes("__rng"); i++) {
      names = threadNames();
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.deepEqual(names.filter((n) => /^vcpu\d+$/.test(n)).sort(), ["vcpu0", "vcpu1"]);
    assert.ok(names.includes("__rng"), `device thread named after its device: ${names.join(", ")}`);
    await g.vm.pause();
    await g.vm.resume();
    await g.vm.pause();
    await g.vm.shutdown();
    await g.vm.shutdown(); // idempotent
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  { name: "a guest that jumps to the reset vector (BIOS reboot path) resets the VM", ignore },
  async () => {
    // mov eax, 0xffff0 ; jmp eax — what Linux's BIOS reboot does (from real mode) when ACPI is reduced.
    const g = await guestVm(new Uint8Array([0xb8, 0xf0, 0xff, 0x0f, 0x00, 0xff, 0xe0]));
    await g.vm.boot();
    assert.equal(await g.event, "reboot");
    await g.vm.shutdown();
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  { name: "writes to the ACPI reset register, the i8042 reset command and 0xCF9 reboot the VM", ignore },
  async () => {
    for (
      const code of [
        [0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd], // mov dx,0x602; mov al,1; out dx,al
        [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd], // mov al,0xfe; out 0x64,al
        [0x66, 0xba, 0xf9, 0x0c, 0xb0, 0x06, 0xee, 0xf4, 0xeb, 0xfd], // mov dx,0xcf9; mov al,6; out dx,al
      ]
    ) {
      const g = await guestVm(new Uint8Array(code));
      await g.vm.boot();
      assert.equal(await g.event, "reboot");
      await g.vm.shutdown();
      await Deno.remove(g.dir, { recursive: true });
    }
  },
);

Deno.test(
  { name: "a kernel that does not exist fails boot with a clear error and releases the VM", ignore },
  async () => {
    const config = VmConfigSchema.parse({
      payload: { kernel: "/nonexistent/vmlinuz" },
      console: { mode: "Off" },
    });
    const vm = new Vm(config);
    await assert.rejects(vm.boot(), /--kernel: cannot use kernel \/nonexistent\/vmlinuz: no such file/);
  },
);

Deno.test(
  { name: "options dvmm has not built yet fail the boot with a message naming them", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-vm-test-" });
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(printAndPoweroffCode("x\n")));
    const base = { payload: { kernel: `${dir}/guest.elf` }, console: { mode: "Off" } };
    for (
      const [extra, what] of [
        [{ watchdog: true }, /virtio watchdog is not implemented in dvmm yet/],
        [{ pvpanic: true }, /pvpanic device is not implemented/],
        [{ numa: [{ guest_numa_id: 0 }] }, /guest NUMA nodes is not implemented/],
        [
          { memory: { size: 64 << 20, hotplug_size: 256 << 20, hotplugged_size: 128 << 20 } },
          /ACPI memory plugged at boot is not implemented/,
        ],
        [{ cpus: { boot_vcpus: 1, max_vcpus: 1, affinity: [{ vcpu: 0, host_cpus: [0] }] } }, /vCPU affinity/],
        [{ cpus: { boot_vcpus: 1, max_vcpus: 1, max_phys_bits: 40 } }, /address width other than 46/],
        [
          {
            platform: { num_pci_segments: 2 },
            pci_segments: [{ pci_segment: 1, mmio32_aperture_weight: 3 }],
          },
          /PCI aperture weights other than 1/,
        ],
        [{ rng: { src: "/dev/urandom", pci_device_id: 5 } }, /choosing a device's PCI slot/],
        [{ platform: { system_uuid: "x" } }, /SMBIOS tables/],
        [
          { disks: [{ path: "/x", rate_limiter_config: { ops: { size: 1, refill_time: 1 } } }] },
          /rate limiting/,
        ],
      ] as [Record<string, unknown>, RegExp][]
    ) {
      const vm = new Vm(VmConfigSchema.parse({ ...base, ...extra }));
      await assert.rejects(vm.boot(), what);
    }
    await Deno.remove(dir, { recursive: true });
  },
);

Deno.test(
  {
    name: "PCI hotplug: add-disk and remove-device on a running VM, 20 cycles leave no fd or thread behind",
    ignore,
  },
  async () => {
    // The guest plays acpiphp's part: it polls the hotplug controller's eject-request register (PCID,
    // port 0xAE04) and acknowledges each request through B0EJ (0xAE08), as the slots' _EJ0 do.
    //   0: mov dx,0xae04; in eax,dx; test eax,eax; jz 0; mov dx,0xae08; out dx,eax; jmp 0
    const code = new Uint8Array([
      0x66,
      0xba,
      0x04,
      0xae,
      0xed,
      0x85,
      0xc0,
      0x74,
      0xf7,
      0x66,
      0xba,
      0x08,
      0xae,
      0xef,
      0xeb,
      0xf0,
    ]);
    const g = await guestVm(code, 2);
    const image = `${g.dir}/hp.img`;
    await Deno.writeFile(image, new Uint8Array(1 << 20));
    const disk = DiskConfigSchema.parse({ id: "hp0", path: image });
    const settle = async (want: (names: string[]) => boolean) => {
      for (let i = 0; i < 3000 && !want(threadNames()); i++) await new Promise((r) => setTimeout(r, 10));
    };
    await g.vm.boot();
    await settle((n) => n.includes("__rng"));
    let before = { fds: new Map<number, string>(), threads: [] as string[] };
    // Cycle 0 warms up what the runtime creates once (its first timer, its first worker's plumbing).
    for (let cycle = 0; cycle <= 20; cycle++) {
      if (cycle === 1) {
        // A worker's own event loop descriptors go when its thread has ended, shortly after removal.
        await settle((n) => !n.includes("hp0"));
        await new Promise((r) => setTimeout(r, 200));
        before = { fds: openFds(), threads: threadNames() };
      }
      const info = await g.vm.addDevice("disk", structuredClone(disk));
      assert.equal(info.id, "hp0");
      assert.match(info.bdf, /^0000:00:0[0-9a-f]\.0$/);
      const tree = g.vm.deviceTree() as Record<string, { pci_bdf?: string }>;
      assert.equal(tree["_virtio-pci-hp0"]?.pci_bdf, info.bdf);
      await settle((n) => n.includes("hp0"));
      assert.ok(threadNames().includes("hp0"), "the device's worker thread runs");
      if (cycle === 0) assert.equal(g.vm.counters()["hp0"]?.read_ops, 0);
      await g.vm.removeDevice("hp0");
      assert.equal((g.vm.deviceTree() as Record<string, unknown>)["_virtio-pci-hp0"], undefined);
      assert.equal(g.vm.counters()["hp0"], undefined);
    }
    await settle((n) => !n.includes("hp0"));
    for (let i = 0; i < 1500 && fdDiff(before.fds, openFds()) !== ""; i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(fdDiff(before.fds, openFds()), "", "descriptors after 20 add/remove cycles");
    assert.deepEqual(threadNames(), before.threads, "threads after 20 add/remove cycles");
    // The slot and the identifier are free again; a kind dvmm cannot hot-add says so.
    await g.vm.addDevice("disk", structuredClone(disk));
    await assert.rejects(g.vm.addDevice("vdpa", {}), /hot-adding vdpa devices is not implemented/);
    // vm.resize-disk grows the image; shrinking and odd sizes are refused by name.
    await g.vm.resizeDisk("hp0", 2 << 20);
    assert.equal((await Deno.stat(image)).size, 2 << 20);
    await assert.rejects(g.vm.resizeDisk("hp0", 1 << 20), /shrinking a disk is not supported/);
    await assert.rejects(g.vm.resizeDisk("hp0", 3000), /not a positive multiple of 512/);
    // A NIC from tap descriptors (Kata's way), hot: the descriptors are the config's, not the device's.
    if (Deno.uid() === 0) {
      const tap = openTap({ name: "dvmmhp%d", queues: 1 });
      try {
        const net = NetConfigSchema.parse({
          id: "n0",
          fds: tap.fds,
          num_queues: 2,
          mac: "2e:00:00:00:00:09",
        });
        const info = await g.vm.addDevice("net", net);
        assert.equal(info.id, "n0");
        assert.equal(g.vm.counters()["n0"]?.rx_bytes, 0);
        await g.vm.removeDevice("n0");
        assert.equal(g.vm.counters()["n0"], undefined);
        // dvmm did not close them: they are still the caller's.
        for (const fd of tap.fds) assert.ok(Deno.readLinkSync(`/proc/self/fd/${fd}`).includes("tun"));
      } finally {
        tap.fds.forEach((fd) => shim().kvs_close(fd));
      }
    }
    // pmem: the file is mapped into guest memory when added and unmapped when removed, twice over.
    const pfile = `${g.dir}/pm.img`;
    await Deno.writeFile(pfile, new Uint8Array(2 << 20));
    let first = -1;
    for (let i = 0; i < 2; i++) {
      await g.vm.addDevice("pmem", PmemConfigSchema.parse({ id: "pm0", file: pfile }));
      type Node = { resources: { MmioAddressRange: { base: number; size: number } }[] };
      const range = (g.vm.deviceTree() as Record<string, Node>)["pm0"].resources[0].MmioAddressRange;
      assert.equal(range.size, 2 << 20);
      if (i === 0) first = range.base;
      assert.equal(range.base, first, "the same guest address again: the region was given back");
      await g.vm.removeDevice("pm0");
    }
    // vsock (Kata hot-adds none, but Cloud Hypervisor takes it): its worker and its host socket come and go.
    const vsock = `${g.dir}/v.sock`;
    for (let i = 0; i < 2; i++) {
      const info = await g.vm.addDevice(
        "vsock",
        VsockConfigSchema.parse({ id: "vs0", cid: 3, socket: vsock }),
      );
      assert.equal(info.id, "vs0");
      await settle((n) => n.includes("vs0"));
      assert.ok(threadNames().includes("vs0"), "the vsock device's worker runs");
      assert.ok((await Deno.lstat(vsock)).isSocket, "the host side listens");
      await g.vm.removeDevice("vs0");
      await settle((n) => !n.includes("vs0"));
      assert.ok(!threadNames().includes("vs0"), "the worker ends with the device");
    }
    await g.vm.shutdown();
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  {
    name: "hot removal: a guest that never lets go gets an error after the bound; the device and vCPU stay",
    ignore,
  },
  async () => {
    // The guest spins (jmp $) and never answers an eject request.
    const g = await guestVm(new Uint8Array([0xeb, 0xfe]), 2, 3);
    g.vm.ejectTimeoutMs = 300;
    const image = `${g.dir}/hp.img`;
    await Deno.writeFile(image, new Uint8Array(1 << 20));
    await g.vm.boot();
    try {
      await g.vm.addDevice("disk", DiskConfigSchema.parse({ id: "hp0", path: image }));
      let t0 = performance.now();
      await assert.rejects(
        g.vm.removeDevice("hp0"),
        /the guest did not release device 'hp0' within 0\.3 s .*the device stays/,
      );
      assert.ok(performance.now() - t0 < 5000, "answered after the bound, not later");
      assert.ok((g.vm.deviceTree() as Record<string, unknown>)["_virtio-pci-hp0"], "the device stays");
      assert.equal(g.vm.counters()["hp0"]?.read_ops, 0);
      t0 = performance.now();
      await assert.rejects(
        g.vm.resize({ desired_vcpus: 1 }),
        /the guest did not give up vCPU 1 within 0\.3 s; 2 vCPUs stay/,
      );
      assert.ok(performance.now() - t0 < 5000);
      assert.equal(g.vm.vcpuCount(), 2);
    } finally {
      await g.vm.shutdown();
      await Deno.remove(g.dir, { recursive: true });
    }
  },
);

Deno.test(
  { name: "vCPU hotplug: resize 1 → 2 → 1 → 2 → 1 starts and stops the vCPU thread; fds come back", ignore },
  async () => {
    // The guest plays the part of Linux's ACPI processor driver for vCPU 1: it polls vCPU 1's register of
    // the vCPU hotplug controller (port 0xB801) and ejects the vCPU when the VMM asks for it back.
    //   0: mov dx,0xb801; in al,dx; test al,4; jz 0; mov al,8; out dx,al; jmp 0
    const code = new Uint8Array([
      0x66,
      0xba,
      0x01,
      0xb8,
      0xec,
      0xa8,
      0x04,
      0x74,
      0xf7,
      0xb0,
      0x08,
      0xee,
      0xeb,
      0xf2,
    ]);
    const g = await guestVm(code, 1, 2);
    const vcpuThreads = () => threadNames().filter((n) => /^vcpu\d+$/.test(n));
    const until = async (want: () => boolean) => {
      for (let i = 0; i < 3000 && !want(); i++) await new Promise((r) => setTimeout(r, 10));
    };
    await g.vm.boot();
    await assert.rejects(
      g.vm.resize({ desired_vcpus: 3 }),
      /desired_vcpus \(3\) must be between 1 and max_vcpus \(2\)/,
    );
    let before = new Map<number, string>();
    for (let round = 0; round < 2; round++) {
      await g.vm.resize({ desired_vcpus: 2 });
      await until(() => vcpuThreads().length === 2);
      assert.deepEqual(vcpuThreads(), ["vcpu0", "vcpu1"]);
      await g.vm.resize({ desired_vcpus: 2 }); // nothing to change
      await g.vm.resize({ desired_vcpus: 1 });
      await until(() => vcpuThreads().length === 1);
      assert.deepEqual(vcpuThreads(), ["vcpu0"]);
      if (round === 0) {
        await new Promise((r) => setTimeout(r, 200));
        before = openFds();
      }
    }
    await until(() => fdDiff(before, openFds()) === "");
    assert.equal(fdDiff(before, openFds()), "", "descriptors after plugging vCPU 1 in and out again");
    await g.vm.shutdown();
    await Deno.remove(g.dir, { recursive: true });
  },
);

Deno.test(
  {
    name: "ACPI memory hotplug: vm.resize desired_ram maps whole slots into the guest; bad sizes refused",
    ignore,
  },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-vm-test-" });
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xeb, 0xfe])));
    const MiB = 1 << 20;
    const vm = new Vm(VmConfigSchema.parse({
      memory: { size: 64 * MiB, hotplug_size: 512 * MiB },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "Null" },
      console: { mode: "Off" },
    }));
    try {
      await vm.boot();
      assert.equal(vm.memoryActualSize(), 64 * MiB);
      await vm.resize({ desired_ram: 64 * MiB }); // nothing to change
      await assert.rejects(vm.resize({ desired_ram: 100 * MiB }), /multiple of 128 MiB/);
      await assert.rejects(
        vm.resize({ desired_ram: 704 * MiB }),
        /exceeds memory size plus the usable hotplug_size/,
      );
      await vm.resize({ desired_ram: 320 * MiB });
      assert.equal(vm.memoryActualSize(), 320 * MiB);
      // The new memory is guest RAM: the hotplug region starts at 4 GiB (after RAM below the hole).
      const mem = vm.memory!;
      mem.write(2 ** 32 + 200 * MiB, new TextEncoder().encode("hotplugged"));
      assert.equal(new TextDecoder().decode(mem.read(2 ** 32 + 200 * MiB, 10)), "hotplugged");
      await assert.rejects(vm.resize({ desired_ram: 192 * MiB }), /cannot be taken back/);
      await vm.resize({ desired_ram: 576 * MiB });
      assert.equal(vm.memoryActualSize(), 576 * MiB);
    } finally {
      await vm.shutdown();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
