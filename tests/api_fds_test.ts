/**
 * File descriptors sent with API requests as SCM_RIGHTS, as Cloud Hypervisor's clients send taps with
 * `vm.add-net` (ch-remote add-net fd=..., Kata Containers): the server takes them for the request they
 * came with, and every descriptor is either used or closed, never leaked and never silently dropped.
 * The server runs in this process, so its descriptors are visible in /proc/self/fd.
 */
import assert from "node:assert/strict";
import { apiRequest } from "../api/client.ts";
import { EXAMPLE_VM, startTestServer } from "../api/testing.ts";
import { closeFd } from "../ffi/socket.ts";
import { check, cstr, shim } from "../ffi/shim.ts";
import { runRemote } from "../api/remote.ts";

const V1 = "/api/v1/";
const openFds = () => [...Deno.readDirSync("/proc/self/fd")].length;
const target = (fd: number) => Deno.readLinkSync(`/proc/self/fd/${fd}`);

/** An open descriptor on a file of its own, to recognise it on the other side. */
function openMarker(dir: string, name: string): number {
  Deno.writeTextFileSync(`${dir}/${name}`, name);
  return check(shim().kvs_open(cstr(`${dir}/${name}`), 2, /* O_RDWR */ 0), `open ${name}`);
}

Deno.test("SCM_RIGHTS: vm.add-net takes the descriptors sent with it as the device's taps", async () => {
  const t = await startTestServer();
  const mine = openMarker(t.dir, "tap-a");
  try {
    assert.equal((await apiRequest(t.socket, "PUT", V1 + "vm.create", EXAMPLE_VM)).status, 204);
    const before = openFds();
    const r = await apiRequest(t.socket, "PUT", V1 + "vm.add-net", { mac: "12:34:56:78:90:02" }, [mine]);
    assert.equal(r.status, 204, r.body);
    const net = JSON.parse((await apiRequest(t.socket, "GET", V1 + "vm.info")).body).config.net;
    assert.equal(net.length, 2);
    assert.equal(net[1].fds.length, 1);
    const theirs = net[1].fds[0];
    assert.notEqual(theirs, mine, "the server holds its own copy of the descriptor");
    assert.equal(target(theirs), target(mine), "the server's descriptor is the one that was sent");
    assert.equal(openFds(), before + 1);
    // The config owns the tap: deleting the VM closes it.
    assert.equal((await apiRequest(t.socket, "PUT", V1 + "vm.delete")).status, 204);
    assert.equal(openFds(), before);
  } finally {
    closeFd(mine);
    await t.close();
  }
});

Deno.test("SCM_RIGHTS: descriptors an endpoint does not take, or a failed request, are closed", async () => {
  const t = await startTestServer();
  const a = openMarker(t.dir, "a");
  const b = openMarker(t.dir, "b");
  try {
    const before = openFds();
    let r = await apiRequest(t.socket, "PUT", V1 + "vm.create", EXAMPLE_VM, [a, b]);
    assert.equal(r.status, 400);
    assert.match(r.body, /vm\.create does not take file descriptors/);
    assert.equal(openFds(), before, "refused descriptors are closed");
    r = await apiRequest(t.socket, "GET", V1 + "vmm.ping", undefined, [a]);
    assert.equal(r.status, 400);
    assert.equal(openFds(), before);
    // add-net before a VM exists: 404, and the taps are not kept.
    r = await apiRequest(t.socket, "PUT", V1 + "vm.add-net", {}, [a]);
    assert.equal(r.status, 404);
    assert.equal(openFds(), before);
    // add-net that the config refuses (an identifier in use): 409, closed.
    await apiRequest(t.socket, "PUT", V1 + "vm.create", EXAMPLE_VM);
    await apiRequest(t.socket, "PUT", V1 + "vm.add-disk", { path: "/tmp/x.img", id: "taken" });
    r = await apiRequest(t.socket, "PUT", V1 + "vm.add-net", { id: "taken" }, [a, b]);
    assert.equal(r.status, 409);
    assert.equal(openFds(), before);
    // Descriptor numbers in a JSON body are refused with the reason (they mean nothing here).
    r = await apiRequest(t.socket, "PUT", V1 + "vm.add-net", { fds: [a] });
    assert.equal(r.status, 400);
    assert.match(r.body, /cannot be given as numbers/);
  } finally {
    closeFd(a);
    closeFd(b);
    await t.close();
  }
});

Deno.test("dvmm remote add-net fd=N sends its descriptor along, as ch-remote does", async () => {
  const t = await startTestServer();
  const mine = openMarker(t.dir, "tap-r");
  try {
    await apiRequest(t.socket, "PUT", V1 + "vm.create", EXAMPLE_VM);
    const err: string[] = [];
    const code = await runRemote(["--api-socket", t.socket, "add-net", `fd=${mine},mac=12:34:56:78:90:03`], {
      out: () => {},
      err: (s) => err.push(s),
      readStdin: () => Promise.resolve(""),
    });
    assert.equal(code, 0, err.join("\n"));
    const net = JSON.parse((await apiRequest(t.socket, "GET", V1 + "vm.info")).body).config.net;
    assert.equal(target(net[1].fds[0]), target(mine));
    assert.equal(net[1].mac, "12:34:56:78:90:03");
  } finally {
    closeFd(mine);
    await t.close();
  }
});
