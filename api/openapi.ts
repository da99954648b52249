/**
 * dvmm's OpenAPI 3.0 document, built from the route table and the zod request schemas so the served
 * API and its description cannot drift apart. `deno run api/openapi.ts > api/openapi.json` refreshes
 * the committed copy; tests/api_openapi_test.ts checks that copy against the server.
 */
import { z } from "zod";
import type { RequestKind } from "../vmm/control.ts";
import { ROUTES } from "./routes.ts";
import * as S from "../vmm/vm_config.ts";
import { DVMM_VERSION } from "../vmm/version.ts";

type Json = Record<string, unknown>;

/** Named schemas: every `$ref` in the document points at one of these. */
const NAMED: [string, z.ZodTypeAny][] = [
  ["VmConfig", S.VmConfigSchema],
  ["CpusConfig", S.CpusConfigSchema],
  ["CpuTopology", S.CpuTopologySchema],
  ["CpuAffinity", S.CpuAffinitySchema],
  ["CpuFeatures", S.CpuFeaturesSchema],
  ["MemoryConfig", S.MemoryConfigSchema],
  ["MemoryZoneConfig", S.MemoryZoneConfigSchema],
  ["PayloadConfig", S.PayloadConfigSchema],
  ["RateLimitGroupConfig", S.RateLimitGroupConfigSchema],
  ["RateLimiterConfig", S.RateLimiterConfigSchema],
  ["TokenBucket", S.TokenBucketSchema],
  ["VirtQueueAffinity", S.VirtQueueAffinitySchema],
  ["DiskConfig", S.DiskConfigSchema],
  ["NetConfig", S.NetConfigSchema],
  ["RngConfig", S.RngConfigSchema],
  ["RtcConfig", S.RtcConfigSchema],
  ["BalloonConfig", S.BalloonConfigSchema],
  ["FsConfig", S.FsConfigSchema],
  ["GenericVhostUserConfig", S.GenericVhostUserConfigSchema],
  ["PmemConfig", S.PmemConfigSchema],
  ["ConsoleConfig", S.ConsoleConfigSchema],
  ["SerialConfig", S.SerialConfigSchema],
  ["DebugConsoleConfig", S.DebugConsoleConfigSchema],
  ["ConsoleMode", S.ConsoleModeSchema],
  ["DeviceConfig", S.DeviceConfigSchema],
  ["UserDeviceConfig", S.UserDeviceConfigSchema],
  ["VmAddUserDevice", S.VmAddUserDeviceSchema],
  ["TpmConfig", S.TpmConfigSchema],
  ["VdpaConfig", S.VdpaConfigSchema],
  ["VsockConfig", S.VsockConfigSchema],
  ["NumaConfig", S.NumaConfigSchema],
  ["NumaDistance", S.NumaDistanceSchema],
  ["PciSegmentConfig", S.PciSegmentConfigSchema],
  ["PlatformConfig", S.PlatformConfigSchema],
  ["LandlockConfig", S.LandlockConfigSchema],
  ["VmResize", S.VmResizeSchema],
  ["VmResizeZone", S.VmResizeZoneSchema],
  ["VmResizeDisk", S.VmResizeDiskSchema],
  ["VmRemoveDevice", S.VmRemoveDeviceSchema],
  ["VmSnapshotConfig", S.VmSnapshotConfigSchema],
  ["VmCoredumpData", S.VmCoredumpDataSchema],
  ["RestoreConfig", S.RestoreConfigSchema],
  ["VmMemoryZoneUpdateData", S.VmMemoryZoneUpdateDataSchema],
  ["ReceiveMigrationData", S.ReceiveMigrationDataSchema],
  ["SendMigrationData", S.SendMigrationDataSchema],
];

function unwrap(t: z.ZodTypeAny): { inner: z.ZodTypeAny; optional: boolean; dflt?: unknown } {
  let optional = false;
  let dflt: unknown;
  for (;;) {
    if (t instanceof z.ZodOptional) {
      optional = true;
      t = t.unwrap();
    } else if (t instanceof z.ZodDefault) {
      optional = true;
      dflt = t._def.defaultValue();
      t = t._def.innerType;
    } else if (t instanceof z.ZodEffects) {
      t = t.innerType();
    } else {
      return { inner: t, optional, dflt };
    }
  }
}

/** A JSON schema for a zod type, using `$ref` for the named ones (except at the top). */
function toSchema(t: z.ZodTypeAny, top = false): Json {
  const { inner } = unwrap(t);
  if (!top) {
    const named = NAMED.find(([, s]) => unwrap(s).inner === inner);
    if (named) return { $ref: `#/components/schemas/${named[0]}` };
  }
  if (inner instanceof z.ZodObject) {
    const properties: Json = {};
    const required: string[] = [];
    for (const [key, field] of Object.entries(inner.shape as Record<string, z.ZodTypeAny>)) {
      const u = unwrap(field);
      const prop = toSchema(field);
      if (u.dflt !== undefined && !("$ref" in prop)) prop.default = u.dflt;
      properties[key] = prop;
      if (!u.optional) required.push(key);
    }
    return {
      type: "object",
      ...(required.length ? { required } : {}),
      properties,
      additionalProperties: false,
    };
  }
  if (inner instanceof z.ZodString) return { type: "string" };
  if (inner instanceof z.ZodBoolean) return { type: "boolean" };
  if (inner instanceof z.ZodEnum) return { type: "string", enum: [...inner.options] };
  if (inner instanceof z.ZodArray) return { type: "array", items: toSchema(inner.element) };
  if (inner instanceof z.ZodNumber) {
    const out: Json = { type: inner.isInt ? "integer" : "number" };
    if (inner.minValue !== null && inner.minValue !== -Infinity) out.minimum = inner.minValue;
    if (inner.maxValue !== null && inner.maxValue !== Infinity && inner.maxValue < Number.MAX_SAFE_INTEGER) {
      out.maximum = inner.maxValue;
    }
    if (inner.isInt && (out.maximum === undefined || (out.maximum as number) > 0xffff_ffff)) {
      out.format = "int64";
    }
    return out;
  }
  throw new Error(`no OpenAPI mapping for zod type ${inner.constructor.name}`);
}

const ERR = {
  description: "",
  content: { "application/json": { schema: { $ref: "#/components/schemas/ErrorMessages" } } },
};
const err = (description: string) => ({ ...ERR, description });
const ok = { description: "Success." };
const pciInfo = {
  description: "The device was hot-added to the running VM.",
  content: { "application/json": { schema: { $ref: "#/components/schemas/PciDeviceInfo" } } },
};

/** Documented responses of each endpoint (beyond the 405/413 every endpoint may answer). */
function responses(kind: RequestKind): Json {
  const notCreated = err("The VM is not created.");
  const wrongState = err("The VM is not in a state that allows this action.");
  const bad = err("The request body is not valid.");
  const failed = err("The action failed, or is not implemented in dvmm yet.");
  switch (kind) {
    case "vmm.ping":
      return {
        200: {
          description: "The VMM information.",
          content: { "application/json": { schema: { $ref: "#/components/schemas/VmmPingResponse" } } },
        },
      };
    case "vmm.shutdown":
      return { 204: { description: "The VMM is shutting down (after releasing the VM)." } };
    case "vm.info":
      return {
        200: {
          description: "The VM information.",
          content: { "application/json": { schema: { $ref: "#/components/schemas/VmInfo" } } },
        },
        404: notCreated,
      };
    case "vm.counters":
      return {
        200: {
          description: "The VM counters.",
          content: { "application/json": { schema: { $ref: "#/components/schemas/VmCounters" } } },
        },
        404: notCreated,
        405: wrongState,
      };
    case "vm.create":
      return {
        204: { description: "The VM was created (not booted)." },
        400: bad,
        405: err("A VM already exists."),
      };
    case "vm.delete":
      return { 204: { description: "The VM (if any) was shut down and deleted." }, 500: failed };
    case "vm.boot":
      return {
        204: ok,
        404: notCreated,
        405: err("The VM is already booted."),
        500: err("The VM failed to boot."),
      };
    case "vm.restore":
      return {
        204: ok,
        400: bad,
        404: err("A VM is already created."),
        409: err("A device with the same identifier already exists."),
        500: failed,
      };
    case "vm.receive-migration":
      return { 204: ok, 400: bad, 405: err("A VM is already created."), 500: failed };
    case "vm.resize":
      return {
        204: ok,
        400: bad,
        404: notCreated,
        429: err("A CPU removal is still pending."),
        500: failed,
      };
    case "vm.resize-zone":
    case "vm.resize-disk":
    case "vm.remove-device":
      return {
        204: ok,
        400: bad,
        404: err("The VM is not created, or nothing has that identifier."),
        500: failed,
      };
    default:
      if (kind.startsWith("vm.add-")) {
        return {
          200: pciInfo,
          204: { description: "The device was added to the configuration of the VM (cold plug)." },
          400: bad,
          404: notCreated,
          409: err("A device with the same identifier already exists."),
          500: failed,
        };
      }
      return {
        204: ok,
        ...(ROUTES[kind].body ? { 400: bad } : {}),
        404: notCreated,
        405: wrongState,
        500: failed,
      };
  }
}

export function buildOpenApi(): Json {
  const paths: Json = {};
  for (const [kind, route] of Object.entries(ROUTES) as [RequestKind, (typeof ROUTES)[RequestKind]][]) {
    const op: Json = { operationId: kind, responses: responses(kind) };
    if (route.body) {
      op.requestBody = {
        required: true,
        content: { "application/json": { schema: { $ref: `#/components/schemas/${route.bodyName}` } } },
      };
    }
    paths[`/${kind}`] = { [route.method.toLowerCase()]: op };
  }
  const schemas: Json = {};
  for (const [name, schema] of NAMED) schemas[name] = toSchema(schema, true);
  Object.assign(schemas, {
    ErrorMessages: {
      type: "array",
      items: { type: "string" },
      description: "What went wrong, outermost first.",
    },
    VmmPingResponse: {
      type: "object",
      required: ["version"],
      properties: {
        build_version: { type: "string" },
        version: { type: "string" },
        pid: { type: "integer", format: "int64" },
        features: { type: "array", items: { type: "string" } },
      },
    },
    VmState: { type: "string", enum: ["Created", "Running", "Shutdown", "Paused", "BreakPoint"] },
    VmInfo: {
      type: "object",
      required: ["config", "state"],
      properties: {
        config: { $ref: "#/components/schemas/VmConfig" },
        state: { $ref: "#/components/schemas/VmState" },
        memory_actual_size: { type: "integer", format: "int64" },
        device_tree: { type: "object", additionalProperties: { $ref: "#/components/schemas/DeviceNode" } },
      },
    },
    DeviceNode: {
      type: "object",
      properties: {
        id: { type: "string" },
        resources: { type: "array", items: { type: "object" } },
        children: { type: "array", items: { type: "string" } },
        pci_bdf: { type: "string" },
      },
    },
    VmCounters: {
      type: "object",
      additionalProperties: { type: "object", additionalProperties: { type: "integer", format: "int64" } },
    },
    PciDeviceInfo: {
      type: "object",
      required: ["id", "bdf"],
      properties: { id: { type: "string" }, bdf: { type: "string" } },
    },
  });
  return {
    openapi: "3.0.1",
    info: {
      title: "dvmm API",
      description: "Cloud Hypervisor-compatible REST API of dvmm, served over a local UNIX socket. " +
        "Every endpoint also answers 405 to a wrong HTTP method, 413 to a body over 1 MiB, and errors " +
        "as a JSON array of messages (ErrorMessages).",
      version: DVMM_VERSION,
    },
    servers: [{ url: "http://localhost/api/v1" }],
    paths,
    components: { schemas },
  };
}

if (import.meta.main) {
  console.log(JSON.stringify(buildOpenApi(), null, 2));
}
