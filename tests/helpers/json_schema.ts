/**
 * A small JSON-schema checker for the keywords dvmm's OpenAPI document uses (type, properties,
 * required, additionalProperties, items, enum, minimum, maximum, $ref into #/components/schemas).
 * Returns the list of violations, each with its JSON path; empty means valid.
 */

// deno-lint-ignore no-explicit-any
type Schema = Record<string, any>;

function typeOf(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (typeof v === "number") return Number.isInteger(v) ? "integer" : "number";
  return typeof v;
}

export function checkSchema(schema: Schema, value: unknown, doc: Schema, path = "$"): string[] {
  if (schema.$ref) {
    const name = String(schema.$ref).replace("#/components/schemas/", "");
    const target = doc.components?.schemas?.[name];
    if (!target) return [`${path}: unresolved ${schema.$ref}`];
    return checkSchema(target, value, doc, path);
  }
  const errors: string[] = [];
  const t = typeOf(value);
  if (schema.type) {
    const ok = schema.type === t || (schema.type === "number" && t === "integer") ||
      (schema.nullable === true && t === "null");
    if (!ok) return [`${path}: expected ${schema.type}, got ${t}`];
  }
  if (schema.enum && !schema.enum.includes(value)) {
    errors.push(`${path}: ${JSON.stringify(value)} not in enum`);
  }
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) {
      errors.push(`${path}: below ${schema.minimum}`);
    }
    if (schema.maximum !== undefined && value > schema.maximum) {
      errors.push(`${path}: above ${schema.maximum}`);
    }
  }
  if (t === "array" && schema.items) {
    (value as unknown[]).forEach((v, i) =>
      errors.push(...checkSchema(schema.items, v, doc, `${path}[${i}]`))
    );
  }
  if (t === "object") {
    const obj = value as Record<string, unknown>;
    for (const r of schema.required ?? []) if (!(r in obj)) errors.push(`${path}: missing required ${r}`);
    const props: Schema = schema.properties ?? {};
    for (const [k, v] of Object.entries(obj)) {
      if (k in props) errors.push(...checkSchema(props[k], v, doc, `${path}.${k}`));
      else if (schema.additionalProperties === false) errors.push(`${path}: unexpected property ${k}`);
      else if (typeof schema.additionalProperties === "object") {
        errors.push(...checkSchema(schema.additionalProperties, v, doc, `${path}.${k}`));
      }
    }
  }
  return errors;
}
