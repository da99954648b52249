/**
 * A small AML (ACPI Machine Language) encoder: enough to build a DSDT with names, integers,
 * strings, packages, devices, scopes, methods, operation regions, fields and resource templates.
 *
 * Every builder returns the encoded bytes (`Uint8Array`); composite builders take their children's
 * bytes. Encodings follow the ACPI specification, section 20 (AML grammar) and 6.4 (resources).
 */

export type Aml = Uint8Array;

// Opcodes (ACPI 6.x, 20.3).
const ZERO_OP = 0x00;
const ONE_OP = 0x01;
const NAME_OP = 0x08;
const BYTE_PREFIX = 0x0a;
const WORD_PREFIX = 0x0b;
const DWORD_PREFIX = 0x0c;
const STRING_PREFIX = 0x0d;
const QWORD_PREFIX = 0x0e;
const SCOPE_OP = 0x10;
const BUFFER_OP = 0x11;
const PACKAGE_OP = 0x12;
const METHOD_OP = 0x14;
const DUAL_NAME_PREFIX = 0x2e;
const MULTI_NAME_PREFIX = 0x2f;
const EXT_OP_PREFIX = 0x5b;
const ROOT_CHAR = 0x5c;
const PARENT_PREFIX_CHAR = 0x5e;
const LOCAL0_OP = 0x60;
const ARG0_OP = 0x68;
const STORE_OP = 0x70;
const AND_OP = 0x7b;
const OR_OP = 0x7d;
const NOTIFY_OP = 0x86;
const LEQUAL_OP = 0x93;
const IF_OP = 0xa0;
const ELSE_OP = 0xa1;
const RETURN_OP = 0xa4;
const ONES_OP = 0xff;
// Extended (0x5B-prefixed) opcodes.
const OP_REGION_OP = 0x80;
const FIELD_OP = 0x81;
const DEVICE_OP = 0x82;

/** Concatenates AML fragments. */
export function cat(...parts: Aml[]): Aml {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function bytes(...b: number[]): Aml {
  return Uint8Array.from(b);
}

function le(value: number | bigint, size: number): number[] {
  let v = BigInt(value);
  const out: number[] = [];
  for (let i = 0; i < size; i++) {
    out.push(Number(v & 0xffn));
    v >>= 8n;
  }
  return out;
}

/**
 * PkgLength encoding (20.2.4) of a package whose contents (after the PkgLength) are `contentLen`
 * bytes. The encoded length counts the PkgLength bytes themselves. One byte holds up to 63; otherwise
 * the lead byte gives the count of following bytes (bits 7:6) and the low nibble, each following byte
 * the next 8 bits.
 */
export function pkgLength(contentLen: number): Aml {
  if (!Number.isInteger(contentLen) || contentLen < 0) {
    throw new RangeError(`bad package length ${contentLen}`);
  }
  for (let extra = 0; extra <= 3; extra++) {
    const total = contentLen + 1 + extra;
    if (total < lengthLimit(extra)) return encodeLength(total, extra);
  }
  throw new RangeError(`package length ${contentLen} exceeds the 2^28 AML limit`);
}

/** Largest value (exclusive) that a PkgLength with `extra` follow bytes can hold. */
function lengthLimit(extra: number): number {
  return extra === 0 ? 0x40 : 2 ** (4 + 8 * extra);
}

function encodeLength(value: number, extra: number): Aml {
  if (extra === 0) return bytes(value);
  const out = [(extra << 6) | (value & 0x0f)];
  for (let i = 0; i < extra; i++) out.push(Math.floor(value / 2 ** (4 + 8 * i)) & 0xff);
  return Uint8Array.from(out);
}

/**
 * A value in PkgLength format that does not count its own bytes (field unit bit widths in a
 * FieldList are encoded this way).
 */
export function lengthValue(value: number): Aml {
  if (!Number.isInteger(value) || value < 0) throw new RangeError(`bad length ${value}`);
  for (let extra = 0; extra <= 3; extra++) if (value < lengthLimit(extra)) return encodeLength(value, extra);
  throw new RangeError(`length ${value} exceeds the 2^28 AML limit`);
}

/** Wraps contents in PkgLength, preceded by `op` bytes. */
function pkg(op: number[], ...contents: Aml[]): Aml {
  const body = cat(...contents);
  return cat(Uint8Array.from(op), pkgLength(body.length), body);
}

/** An integer with the shortest encoding: Zero, One, Ones (all bits), Byte/Word/DWord/QWordConst. */
export function int(value: number | bigint): Aml {
  const v = BigInt(value);
  if (v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new RangeError(`AML integer out of range: ${value}`);
  if (v === 0n) return bytes(ZERO_OP);
  if (v === 1n) return bytes(ONE_OP);
  if (v === 0xffff_ffff_ffff_ffffn) return bytes(ONES_OP);
  if (v <= 0xffn) return bytes(BYTE_PREFIX, Number(v));
  if (v <= 0xffffn) return bytes(WORD_PREFIX, ...le(v, 2));
  if (v <= 0xffff_ffffn) return bytes(DWORD_PREFIX, ...le(v, 4));
  return bytes(QWORD_PREFIX, ...le(v, 8));
}

/** A DWordConst regardless of value (for values a later writer patches, e.g. addresses). */
export function dword(value: number): Aml {
  return bytes(DWORD_PREFIX, ...le(value >>> 0, 4));
}

/** A NUL-terminated ASCII string constant. */
export function str(s: string): Aml {
  const out = [STRING_PREFIX];
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 1 || c > 0x7f) throw new RangeError(`AML strings are ASCII without NUL: ${JSON.stringify(s)}`);
    out.push(c);
  }
  out.push(0);
  return Uint8Array.from(out);
}

function nameSeg(seg: string): number[] {
  if (!/^[A-Z_][A-Z0-9_]{0,3}$/.test(seg)) {
    throw new RangeError(`bad AML name segment ${JSON.stringify(seg)}`);
  }
  const s = seg.padEnd(4, "_");
  return [...s].map((c) => c.charCodeAt(0));
}

/**
 * A NameString: optional root (`\`) or parent (`^`) prefixes, then dot-separated segments of up to
 * four characters (padded with `_`). Examples: `_S5`, `\_SB.COM1`, `^PCI0`.
 */
export function nameString(path: string): Aml {
  let i = 0;
  const prefix: number[] = [];
  if (path.startsWith("\\")) {
    prefix.push(ROOT_CHAR);
    i = 1;
  } else {
    while (path[i] === "^") {
      prefix.push(PARENT_PREFIX_CHAR);
      i++;
    }
  }
  const rest = path.slice(i);
  const segs = rest === "" ? [] : rest.split(".");
  const out = [...prefix];
  if (segs.length === 0) out.push(0x00); // NullName
  else if (segs.length === 1) out.push(...nameSeg(segs[0]));
  else if (segs.length === 2) out.push(DUAL_NAME_PREFIX, ...nameSeg(segs[0]), ...nameSeg(segs[1]));
  else {
    if (segs.length > 255) throw new RangeError("AML name path too long");
    out.push(MULTI_NAME_PREFIX, segs.length);
    for (const s of segs) out.push(...nameSeg(s));
  }
  return Uint8Array.from(out);
}

/** Name(path, value). */
export function name(path: string, value: Aml): Aml {
  return cat(bytes(NAME_OP), nameString(path), value);
}

/** Package { elements } (fixed NumElements up to 255). */
export function pkgOf(...elements: Aml[]): Aml {
  if (elements.length > 255) throw new RangeError("Package with more than 255 elements");
  return pkg([PACKAGE_OP], bytes(elements.length), ...elements);
}

/** Scope(path) { body }. */
export function scope(path: string, ...body: Aml[]): Aml {
  return pkg([SCOPE_OP], nameString(path), ...body);
}

/** Device(path) { body }. */
export function device(path: string, ...body: Aml[]): Aml {
  return pkg([EXT_OP_PREFIX, DEVICE_OP], nameString(path), ...body);
}

/** Method(path, argCount, serialized) { body }. */
export function method(path: string, argCount: number, serialized: boolean, ...body: Aml[]): Aml {
  if (argCount < 0 || argCount > 7) throw new RangeError("AML methods take 0..7 arguments");
  const flags = argCount | (serialized ? 0x08 : 0);
  return pkg([METHOD_OP], nameString(path), bytes(flags), ...body);
}

/** Buffer { bytes } with its size as an integer. */
export function buffer(data: Uint8Array): Aml {
  return pkg([BUFFER_OP], int(data.length), data);
}

/** EisaId("PNP0501"): the compressed 32-bit EISA id, as an integer (DWordConst). */
export function eisaId(id: string): Aml {
  return dword(eisaIdValue(id));
}

/** The 32-bit value of an EISA id as stored in AML/tables (byte-swapped compressed form). */
export function eisaIdValue(id: string): number {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new RangeError(`bad EISA id ${JSON.stringify(id)}`);
  const c = (i: number) => id.charCodeAt(i) - 0x40;
  const v = ((c(0) << 26) | (c(1) << 21) | (c(2) << 16) | parseInt(id.slice(3), 16)) >>> 0;
  // Stored most significant byte first.
  return (((v & 0xff) << 24) | ((v & 0xff00) << 8) | ((v >>> 8) & 0xff00) | (v >>> 24)) >>> 0;
}

// ---- Terms used in method bodies ----

/** Local0..Local7. */
export function local(n: number): Aml {
  if (n < 0 || n > 7) throw new RangeError("Local0..Local7");
  return bytes(LOCAL0_OP + n);
}

/** Arg0..Arg6. */
export function arg(n: number): Aml {
  if (n < 0 || n > 6) throw new RangeError("Arg0..Arg6");
  return bytes(ARG0_OP + n);
}

/** A reference to a named object (a NameString used as a term). */
export function ref(path: string): Aml {
  return nameString(path);
}

/** Store(source, target). */
export function store(source: Aml, target: Aml): Aml {
  return cat(bytes(STORE_OP), source, target);
}

/** And(a, b, target) (target defaults to none). */
export function and(a: Aml, b: Aml, target: Aml = bytes(0)): Aml {
  return cat(bytes(AND_OP), a, b, target);
}

/** Or(a, b, target). */
export function or(a: Aml, b: Aml, target: Aml = bytes(0)): Aml {
  return cat(bytes(OR_OP), a, b, target);
}

/** LEqual(a, b). */
export function lequal(a: Aml, b: Aml): Aml {
  return cat(bytes(LEQUAL_OP), a, b);
}

/** If(predicate) { body }. */
export function ifThen(predicate: Aml, ...body: Aml[]): Aml {
  return pkg([IF_OP], predicate, ...body);
}

/** Else { body } (directly after an If). */
export function elseDo(...body: Aml[]): Aml {
  return pkg([ELSE_OP], ...body);
}

/** Notify(object, value). */
export function notify(object: Aml, value: Aml): Aml {
  return cat(bytes(NOTIFY_OP), object, value);
}

/** A method invocation: the method's path followed by its arguments. */
export function call(path: string, ...args: Aml[]): Aml {
  return cat(nameString(path), ...args);
}

/** Return(value). */
export function ret(value: Aml): Aml {
  return cat(bytes(RETURN_OP), value);
}

// ---- Operation regions and fields ----

export const RegionSpace = { SystemMemory: 0, SystemIO: 1, PciConfig: 2 } as const;

/** OperationRegion(name, space, offset, length). */
export function opRegion(path: string, space: number, offset: number | bigint, length: number): Aml {
  return cat(bytes(EXT_OP_PREFIX, OP_REGION_OP), nameString(path), bytes(space), int(offset), int(length));
}

/** Field access types and update rules. */
export const FieldAccess = { Any: 0, Byte: 1, Word: 2, DWord: 3, QWord: 4, Buffer: 5 } as const;
export const FieldUpdate = { Preserve: 0, WriteAsOnes: 1, WriteAsZeros: 2 } as const;

/** One field unit: a named run of bits, or a reserved gap (name ""). */
export interface FieldUnit {
  name: string;
  bits: number;
}

/** Field(region, access, NoLock/Lock, update) { units }. */
export function field(
  region: string,
  access: number,
  lock: boolean,
  update: number,
  units: FieldUnit[],
): Aml {
  const flags = (access & 0x0f) | (lock ? 0x10 : 0) | ((update & 3) << 5);
  const list: Aml[] = [];
  for (const u of units) {
    const head = u.name === "" ? bytes(0x00) : Uint8Array.from(nameSeg(u.name));
    list.push(cat(head, lengthValue(u.bits)));
  }
  return pkg([EXT_OP_PREFIX, FIELD_OP], nameString(region), bytes(flags), ...list);
}

// ---- Resource templates (6.4) ----

/** ResourceTemplate() { descriptors }: a Buffer ending with the End Tag (checksum 0). */
export function resourceTemplate(...descriptors: Uint8Array[]): Aml {
  return buffer(cat(...descriptors, bytes(0x79, 0x00)));
}

/** IO(Decode16, min, max, alignment, length): small I/O port descriptor. */
export function ioPort(
  min: number,
  max: number,
  alignment: number,
  length: number,
  decode16 = true,
): Uint8Array {
  return bytes(0x47, decode16 ? 1 : 0, ...le(min, 2), ...le(max, 2), alignment, length);
}

/** IRQNoFlags() { irqs } (edge, active-high, exclusive ISA IRQs). */
export function irqNoFlags(...irqs: number[]): Uint8Array {
  let mask = 0;
  for (const i of irqs) {
    if (i < 0 || i > 15) throw new RangeError("ISA IRQ must be 0..15");
    mask |= 1 << i;
  }
  return bytes(0x22, ...le(mask, 2));
}

/** Memory32Fixed(ReadWrite/ReadOnly, base, length). */
export function memory32Fixed(base: number, length: number, readWrite = true): Uint8Array {
  return bytes(0x86, ...le(9, 2), readWrite ? 1 : 0, ...le(base, 4), ...le(length, 4));
}

export interface InterruptOptions {
  consumer?: boolean;
  edge?: boolean;
  activeLow?: boolean;
  shared?: boolean;
  wake?: boolean;
}

/** Interrupt(ResourceConsumer, Edge/Level, ActiveHigh/Low, Exclusive/Shared) { gsis }: extended IRQ. */
export function extendedInterrupt(gsis: number[], o: InterruptOptions = {}): Uint8Array {
  if (gsis.length < 1 || gsis.length > 255) throw new RangeError("Interrupt() needs 1..255 interrupts");
  const flags = ((o.consumer ?? true) ? 1 : 0) | ((o.edge ?? false) ? 2 : 0) | (o.activeLow ? 4 : 0) |
    (o.shared ? 8 : 0) | (o.wake ? 0x10 : 0);
  const list: number[] = [];
  for (const g of gsis) list.push(...le(g, 4));
  return bytes(0x89, ...le(2 + 4 * gsis.length, 2), flags, gsis.length, ...list);
}

/** General flags of address space descriptors. */
export interface AddressOptions {
  /** ResourceProducer (false, the default for bridges) or ResourceConsumer. */
  consumer?: boolean;
  /** MinFixed / MaxFixed (default true). */
  fixed?: boolean;
  /** Subtractive decode. */
  subtractive?: boolean;
}

function generalFlags(o: AddressOptions): number {
  const fixed = o.fixed ?? true;
  return (o.consumer ? 1 : 0) | (o.subtractive ? 2 : 0) | (fixed ? 0x0c : 0);
}

export const MemCache = { NonCacheable: 0, Cacheable: 1, WriteCombining: 2, Prefetchable: 3 } as const;

/** WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, count). */
export function wordBusNumber(min: number, max: number, o: AddressOptions = {}): Uint8Array {
  const len = max - min + 1;
  return bytes(
    0x88,
    ...le(13, 2),
    2,
    generalFlags(o),
    0,
    ...le(0, 2),
    ...le(min, 2),
    ...le(max, 2),
    ...le(0, 2),
    ...le(len, 2),
  );
}

/** WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, length). */
export function wordIo(min: number, max: number, o: AddressOptions = {}): Uint8Array {
  const len = max - min + 1;
  // Type-specific flags: ISA and non-ISA ranges (EntireRange = 3).
  return bytes(
    0x88,
    ...le(13, 2),
    1,
    generalFlags(o),
    3,
    ...le(0, 2),
    ...le(min, 2),
    ...le(max, 2),
    ...le(0, 2),
    ...le(len, 2),
  );
}

/** DWordMemory(..., cacheable, ReadWrite, 0, min, max, 0, length). */
export function dwordMemory(
  min: number,
  max: number,
  cache: number = MemCache.NonCacheable,
  o: AddressOptions = {},
): Uint8Array {
  const len = max - min + 1;
  const ts = 1 | ((cache & 3) << 1); // ReadWrite
  return bytes(
    0x87,
    ...le(23, 2),
    0,
    generalFlags(o),
    ts,
    ...le(0, 4),
    ...le(min, 4),
    ...le(max, 4),
    ...le(0, 4),
    ...le(len, 4),
  );
}

/** QWordMemory(..., cacheable, ReadWrite, 0, min, max, 0, length). */
export function qwordMemory(
  min: number | bigint,
  max: number | bigint,
  cache: number = MemCache.NonCacheable,
  o: AddressOptions = {},
): Uint8Array {
  const len = BigInt(max) - BigInt(min) + 1n;
  const ts = 1 | ((cache & 3) << 1);
  return bytes(
    0x8a,
    ...le(43, 2),
    0,
    generalFlags(o),
    ts,
    ...le(0, 8),
    ...le(min, 8),
    ...le(max, 8),
    ...le(0, 8),
    ...le(len, 8),
  );
}
