#!/usr/bin/env node
// Self-check: which TimescaleDB features meterd relies on work through the
// PGlite (WASM) JavaScript API on this machine, and how fast it is.
//
//   node tests/timescaledb/smoke.mjs            # human-readable report on stdout
//   node tests/timescaledb/smoke.mjs --json     # plus a JSON report as the last line
//
// Exits 1 if a core check fails (extension, hypertable, continuous aggregates,
// refresh correctness); probes of optional features never change the exit code.

import { openDb, versions, describeError, toJson } from './run.mjs';

const wantJson = process.argv.includes('--json');
const report = { checks: [], timings_ms: {} };
let coreFailed = 0;

function line(s) {
  process.stdout.write(s + '\n');
}

async function check(name, fn, { core = false } = {}) {
  const t0 = performance.now();
  try {
    const info = await fn();
    const ms = Math.round(performance.now() - t0);
    report.checks.push({ name, ok: true, core, ms, info: info ?? null });
    line(`OK    ${name} (${ms} ms)${info !== undefined ? ' -> ' + toJson(info) : ''}`);
    return true;
  } catch (e) {
    const ms = Math.round(performance.now() - t0);
    const error = describeError(e);
    report.checks.push({ name, ok: false, core, ms, error });
    line(`FAIL  ${name} (${ms} ms)${core ? ' [core]' : ''}\n      ${error.replace(/\n/g, '\n    ')}`);
    if (core) coreFailed++;
    return false;
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error('assertion failed: ' + msg);
}

// Deterministic pseudo-random generator (LCG) so runs are reproducible.
function rng(seed) {
  let s = BigInt(seed);
  return () => {
    s = (s * 6364136223846793005n + 1442695040888963407n) & 0xffffffffffffffffn;
    return Number(s >> 33n) / 2 ** 31;
  };
}

const BASE = Date.UTC(2024, 0, 1); // 2024-01-01T00:00:00Z
const TENANTS = ['acme', 'globex', 'initech', 'umbrella', 'hooli'];
const MODELS = ['gpt-a', 'gpt-b', null];

function makeEvents(n, { seed = 1, prefix = 'e', spanHours = 72, startMs = BASE } = {}) {
  const r = rng(seed);
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = startMs + Math.floor(r() * spanHours * 3600 * 1000);
    out.push({
      tenant: TENANTS[Math.floor(r() * TENANTS.length)],
      id: `${prefix}${i}`,
      time: new Date(t).toISOString(),
      model: MODELS[Math.floor(r() * MODELS.length)],
      input_tokens: r() < 0.05 ? null : Math.floor(r() * 5000),
      output_tokens: Math.floor(r() * 2000),
      latency_ms: 1 + Math.floor(r() * 300),
      status: r() < 0.1 ? 'error' : 'ok',
    });
  }
  return out;
}

const sqlLit = (v) => (v === null ? 'NULL' : typeof v === 'number' ? String(v) : `'${String(v).replace(/'/g, "''")}'`);

function multiRowInsert(rows) {
  const cols = ['tenant', 'id', 'time', 'model', 'input_tokens', 'output_tokens', 'latency_ms', 'status'];
  return (
    `INSERT INTO meterd.events (${cols.join(', ')}) VALUES\n` +
    rows.map((r) => '(' + cols.map((c) => sqlLit(r[c])).join(', ') + ')').join(',\n')
  );
}

const JSON_INSERT = `INSERT INTO meterd.events
  SELECT * FROM json_populate_recordset(NULL::meterd.events, $1::json)`;

const SCHEMA = `
CREATE SCHEMA IF NOT EXISTS meterd;
CREATE TABLE meterd.events (
  tenant        text        NOT NULL,
  id            text        NOT NULL,
  time          timestamptz NOT NULL,
  model         text,
  input_tokens  bigint,
  output_tokens bigint,
  latency_ms    bigint,
  status        text,
  PRIMARY KEY (tenant, id, time)
);`;

const HOURLY = `
CREATE MATERIALIZED VIEW meterd.usage_hourly_agg
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       tenant,
       count(*) AS events,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       count(*) FILTER (WHERE latency_ms <= 100) AS latency_le_100,
       count(*) FILTER (WHERE status = 'error') AS errors
FROM meterd.events
GROUP BY 1, 2
WITH NO DATA;`;

const DAILY = `
CREATE MATERIALIZED VIEW meterd.usage_daily_agg
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket,
       tenant,
       sum(events) AS events,
       sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(latency_le_100) AS latency_le_100,
       sum(errors) AS errors
FROM meterd.usage_hourly_agg
GROUP BY 1, 2
WITH NO DATA;`;

const RAW_HOURLY = `
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant,
       count(*)::numeric AS events, sum(input_tokens)::numeric AS input_tokens,
       sum(output_tokens)::numeric AS output_tokens,
       (count(*) FILTER (WHERE latency_ms <= 100))::numeric AS latency_le_100,
       (count(*) FILTER (WHERE status = 'error'))::numeric AS errors
FROM meterd.events GROUP BY 1, 2`;
const RAW_DAILY = RAW_HOURLY.replace("INTERVAL '1 hour'", "INTERVAL '1 day'");
const CAGG_COLS = `bucket, tenant, events::numeric, input_tokens::numeric, output_tokens::numeric,
       latency_le_100::numeric, errors::numeric`;

// Symmetric difference (row count) between a cagg and the raw GROUP BY.
async function diffCount(db, view, raw) {
  const r = await db.query(`
    SELECT (SELECT count(*) FROM (SELECT ${CAGG_COLS} FROM ${view} EXCEPT ALL ${raw}) a)
         + (SELECT count(*) FROM (${raw} EXCEPT ALL SELECT ${CAGG_COLS} FROM ${view}) b) AS diff,
           (SELECT count(*) FROM ${view}) AS cagg_rows,
           (SELECT sum(input_tokens) FROM ${view}) AS cagg_input_tokens,
           (SELECT sum(input_tokens) FROM meterd.events) AS raw_input_tokens`);
  const row = r.rows[0];
  return {
    diff: Number(row.diff.text),
    cagg_rows: Number(row.cagg_rows.text),
    cagg_input_tokens: row.cagg_input_tokens,
    raw_input_tokens: row.raw_input_tokens,
  };
}

async function materializedRows(db, view) {
  const r = await db.query(
    `SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name) AS t
       FROM timescaledb_information.continuous_aggregates WHERE view_schema = 'meterd' AND view_name = $1`,
    [view],
  );
  const t = r.rows[0].t;
  const c = await db.query(`SELECT count(*) AS c FROM ${t}`);
  return Number(c.rows[0].c.text);
}

async function insertJsonChunks(db, rows, chunk) {
  for (let i = 0; i < rows.length; i += chunk) {
    await db.query(JSON_INSERT, [JSON.stringify(rows.slice(i, i + chunk))]);
  }
}

// ---------------------------------------------------------------------------

async function featureChecks() {
  line('== feature checks ==');
  let db;
  const t0 = performance.now();
  const ok = await check(
    'startup: PGlite.create({extensions: {timescaledb}}) (cold: includes WASM compile)',
    async () => {
      db = await openDb({ createExtension: false });
    },
    { core: true },
  );
  report.timings_ms.cold_pglite_create = Math.round(performance.now() - t0);
  if (!ok) return;
  const t1 = performance.now();
  await check('CREATE EXTENSION IF NOT EXISTS timescaledb', async () => {
    await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb;');
    return await versions(db);
  }, { core: true });
  report.timings_ms.create_extension = Math.round(performance.now() - t1);

  await check(
    "SELECT extversion FROM pg_extension WHERE extname='timescaledb'",
    async () => (await db.query(`SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'`)).rows[0],
    { core: true },
  );

  await check('create schema meterd + table meterd.events', async () => void await db.exec(SCHEMA), { core: true });

  await check(
    "create_hypertable('meterd.events', by_range('time', INTERVAL '1 day'))",
    async () =>
      (await db.query(`SELECT create_hypertable('meterd.events', by_range('time', INTERVAL '1 day')) AS r`)).rows[0],
    { core: true },
  );

  await check(
    "old form: create_hypertable('meterd.events_old', 'time', chunk_time_interval => INTERVAL '1 day')",
    async () => {
      await db.exec(`CREATE TABLE meterd.events_old (LIKE meterd.events INCLUDING ALL)`);
      const r = await db.query(
        `SELECT create_hypertable('meterd.events_old', 'time', chunk_time_interval => INTERVAL '1 day') AS r`,
      );
      return r.rows[0];
    },
  );

  await check('continuous aggregate usage_hourly_agg (count(*) FILTER (WHERE ...))', async () => void await db.exec(HOURLY), {
    core: true,
  });

  await check('cagg probe: sum(CASE WHEN latency_ms <= 100 THEN 1 ELSE 0 END)', async () =>
    void await db.exec(`
      CREATE MATERIALIZED VIEW meterd.probe_case_agg
      WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
      SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant,
             sum(CASE WHEN latency_ms <= 100 THEN 1 ELSE 0 END) AS latency_le_100
      FROM meterd.events GROUP BY 1, 2 WITH NO DATA;`),
  );

  await check("cagg probe: coalesce(model, '') in SELECT and GROUP BY", async () =>
    void await db.exec(`
      CREATE MATERIALIZED VIEW meterd.probe_coalesce_agg
      WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
      SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant, coalesce(model, '') AS model,
             count(*) AS events
      FROM meterd.events GROUP BY 1, 2, coalesce(model, '') WITH NO DATA;`),
  );

  await check('hierarchical cagg usage_daily_agg on usage_hourly_agg', async () => void await db.exec(DAILY), { core: true });

  const rows = makeEvents(1000, { seed: 42 });
  await check('multi-row INSERT (500 rows)', async () => void await db.exec(multiRowInsert(rows.slice(0, 500))), { core: true });
  await check(
    'INSERT ... SELECT FROM json_populate_recordset(NULL::meterd.events, $1::json) via query(sql, [param]) (500 rows)',
    async () => {
      await db.query(JSON_INSERT, [JSON.stringify(rows.slice(500))]);
      return (await db.query(`SELECT count(*) AS n FROM meterd.events`)).rows[0];
    },
    { core: true },
  );

  await check('INSERT ... ON CONFLICT DO NOTHING on hypertable (duplicate rows ignored)', async () => {
    await db.query(
      `INSERT INTO meterd.events SELECT * FROM json_populate_recordset(NULL::meterd.events, $1::json)
       ON CONFLICT DO NOTHING`,
      [JSON.stringify(rows.slice(0, 10))],
    );
    const n = (await db.query(`SELECT count(*) AS n FROM meterd.events`)).rows[0].n.text;
    assert(n === '1000', `expected 1000 rows, got ${n}`);
    return { rows: n };
  });

  await check('real-time cagg (materialized_only=false) before any refresh equals raw GROUP BY', async () => {
    const d = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
    assert(d.diff === 0, `diff ${d.diff}`);
    return d;
  });

  await check(
    'multi-statement exec("SELECT 1; CALL refresh_continuous_aggregate(...)") is rejected (so each step must run alone)',
    async () => {
      try {
        await db.exec(`SELECT 1; CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL);`);
      } catch (e) {
        return { rejected_with: e.message };
      }
      throw new Error('unexpectedly accepted');
    },
  );

  await check(
    "exec(\"CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)\")",
    async () => {
      await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)`);
      return { materialized_rows: await materializedRows(db, 'usage_hourly_agg') };
    },
    { core: true },
  );
  await check(
    "query(\"CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)\") (extended protocol)",
    async () => {
      await db.query(`CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)`);
      return { materialized_rows: await materializedRows(db, 'usage_daily_agg') };
    },
    { core: true },
  );
  await check('refresh probe caggs (CASE / coalesce)', async () => {
    await db.exec(`CALL refresh_continuous_aggregate('meterd.probe_case_agg', NULL, NULL)`);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.probe_coalesce_agg', NULL, NULL)`);
    const a = await db.query(`
      SELECT (SELECT sum(latency_le_100) FROM meterd.probe_case_agg) AS case_sum,
             (SELECT count(*) FILTER (WHERE latency_ms <= 100) FROM meterd.events) AS raw_le_100,
             (SELECT count(*) FROM meterd.probe_coalesce_agg WHERE model = '') AS empty_model_groups`);
    const r = a.rows[0];
    assert(String(r.case_sum?.text ?? r.case_sum) === r.raw_le_100.text, `case_sum ${toJson(r.case_sum)} != ${r.raw_le_100.text}`);
    return r;
  });

  await check(
    'hourly cagg == raw GROUP BY after refresh',
    async () => {
      const d = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
      assert(d.diff === 0, `diff ${d.diff}`);
      return d;
    },
    { core: true },
  );
  await check(
    'daily (hierarchical) cagg == raw GROUP BY after refresh',
    async () => {
      const d = await diffCount(db, 'meterd.usage_daily_agg', RAW_DAILY);
      assert(d.diff === 0, `diff ${d.diff}`);
      return d;
    },
    { core: true },
  );

  // Late data: 50 rows into already materialized buckets, 20 into a new day.
  const late = makeEvents(50, { seed: 7, prefix: 'late' });
  const newer = makeEvents(20, { seed: 8, prefix: 'new', startMs: BASE + 3 * 86400e3, spanHours: 24 });
  await check('late inserts into materialized buckets (before re-refresh: cagg shows stale data?)', async () => {
    await insertJsonChunks(db, [...late, ...newer], 1000);
    const h = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
    return { hourly_diff_rows_before_refresh: h.diff, note: 'non-zero = expected staleness until refresh' };
  });
  await check(
    'after re-refresh (hourly then daily) both caggs == raw GROUP BY',
    async () => {
      await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)`);
      await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)`);
      const h = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
      const d = await diffCount(db, 'meterd.usage_daily_agg', RAW_DAILY);
      assert(h.diff === 0 && d.diff === 0, `hourly diff ${h.diff}, daily diff ${d.diff}`);
      return { hourly: h, daily: d };
    },
    { core: true },
  );
  await check('late delete + update, re-refresh, caggs == raw', async () => {
    await db.exec(`DELETE FROM meterd.events WHERE id LIKE 'late1%'`);
    await db.exec(`UPDATE meterd.events SET input_tokens = input_tokens + 1 WHERE id LIKE 'e9%'`);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)`);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)`);
    const h = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
    const d = await diffCount(db, 'meterd.usage_daily_agg', RAW_DAILY);
    assert(h.diff === 0 && d.diff === 0, `hourly diff ${h.diff}, daily diff ${d.diff}`);
    return { hourly_diff: h.diff, daily_diff: d.diff };
  });
  await check('refresh with explicit window (timestamptz bounds)', async () =>
    void await db.exec(
      `CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', '2024-01-01 00:00:00+00', '2024-01-05 00:00:00+00')`,
    ),
  );

  await check('plain view over cagg', async () => {
    await db.exec(`CREATE VIEW meterd.usage_hourly AS
      SELECT bucket, tenant, events, input_tokens FROM meterd.usage_hourly_agg`);
    const r = await db.query(
      `SELECT count(*) AS n, sum(events) AS events FROM meterd.usage_hourly WHERE tenant = 'acme'`,
    );
    return r.rows[0];
  });

  // Row-level security on the hypertable that already has caggs.
  await check('ALTER TABLE meterd.events ENABLE ROW LEVEL SECURITY + CREATE POLICY (hypertable already has caggs)', async () =>
    void await db.exec(`
      ALTER TABLE meterd.events ENABLE ROW LEVEL SECURITY;
      CREATE POLICY tenant_isolation ON meterd.events
        USING (tenant = current_setting('meterd.tenant', true));`),
  );
  await check('insert + refresh existing caggs with RLS enabled, caggs == raw', async () => {
    await insertJsonChunks(db, makeEvents(30, { seed: 9, prefix: 'rls' }), 1000);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)`);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)`);
    const h = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
    const d = await diffCount(db, 'meterd.usage_daily_agg', RAW_DAILY);
    assert(h.diff === 0 && d.diff === 0, `hourly diff ${h.diff}, daily diff ${d.diff}`);
    return { hourly_diff: h.diff, daily_diff: d.diff };
  });
  await check('CREATE new cagg (WITH NO DATA) on hypertable with RLS enabled + refresh', async () => {
    await db.exec(`
      CREATE MATERIALIZED VIEW meterd.probe_rls_agg
      WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
      SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant, count(*) AS events
      FROM meterd.events GROUP BY 1, 2 WITH NO DATA;`);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.probe_rls_agg', NULL, NULL)`);
    return { materialized_rows: await materializedRows(db, 'probe_rls_agg') };
  });
  await check('CREATE cagg WITH DATA on a fresh hypertable that has RLS enabled', async () => {
    await db.exec(`
      CREATE TABLE meterd.rls_fresh (tenant text NOT NULL, time timestamptz NOT NULL, v bigint);
      SELECT create_hypertable('meterd.rls_fresh', by_range('time', INTERVAL '1 day'));
      ALTER TABLE meterd.rls_fresh ENABLE ROW LEVEL SECURITY;
      CREATE POLICY p ON meterd.rls_fresh USING (tenant = current_setting('meterd.tenant', true));
      INSERT INTO meterd.rls_fresh VALUES ('a', '2024-01-01 00:10+00', 1), ('b', '2024-01-01 00:20+00', 2);`);
    await db.exec(`
      CREATE MATERIALIZED VIEW meterd.rls_fresh_agg WITH (timescaledb.continuous) AS
      SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, tenant, sum(v) AS v
      FROM meterd.rls_fresh GROUP BY 1, 2 WITH DATA;`);
    return (await db.query(`SELECT count(*) AS n FROM meterd.rls_fresh_agg`)).rows[0];
  });
  await check('RLS policy is enforced for a non-superuser role (SET ROLE)', async () => {
    await db.exec(`
      CREATE ROLE meterd_reader NOLOGIN;
      GRANT USAGE ON SCHEMA meterd TO meterd_reader;
      GRANT SELECT ON ALL TABLES IN SCHEMA meterd TO meterd_reader;`);
    await db.exec(`SET meterd.tenant = 'acme'; SET ROLE meterd_reader;`);
    try {
      const r = await db.query(`SELECT count(DISTINCT tenant) AS tenants, count(*) AS n FROM meterd.events`);
      const v = await db.query(`SELECT count(DISTINCT tenant) AS tenants FROM meterd.usage_hourly`);
      const row = r.rows[0];
      assert(row.tenants.text === '1', `raw table shows ${row.tenants.text} tenants`);
      return {
        raw_table: row,
        view_over_cagg_tenants: v.rows[0].tenants,
        note: 'caggs are not filtered by the base table RLS policy',
      };
    } finally {
      await db.exec(`RESET ROLE; RESET meterd.tenant;`);
    }
  });

  await check('compression probe: ALTER TABLE ... SET (timescaledb.compress) on a hypertable with RLS enabled', async () => {
    await db.exec(`ALTER TABLE meterd.rls_fresh SET (timescaledb.compress, timescaledb.compress_segmentby = 'tenant')`);
  });
  await check('ALTER TABLE meterd.events DISABLE ROW LEVEL SECURITY (before enabling compression)', async () => {
    await db.exec(`ALTER TABLE meterd.events DISABLE ROW LEVEL SECURITY`);
  });

  await check('add_continuous_aggregate_policy', async () => {
    const r = await db.query(`SELECT add_continuous_aggregate_policy('meterd.usage_hourly_agg',
        start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
        schedule_interval => INTERVAL '1 hour') AS job_id`);
    return r.rows[0];
  });
  await check('CALL run_job(<cagg policy job>)', async () => {
    const j = await db.query(
      `SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate' LIMIT 1`,
    );
    await db.exec(`CALL run_job(${j.rows[0].job_id})`);
    return { job_id: j.rows[0].job_id };
  });
  await check(
    "ALTER TABLE meterd.events SET (timescaledb.compress, timescaledb.compress_segmentby = 'tenant')",
    async () => void await db.exec(`ALTER TABLE meterd.events SET (timescaledb.compress, timescaledb.compress_segmentby = 'tenant')`),
  );
  await check('add_compression_policy', async () => {
    const r = await db.query(`SELECT add_compression_policy('meterd.events', INTERVAL '7 days') AS job_id`);
    return r.rows[0];
  });
  await check('compress_chunk on one chunk, then hourly cagg still == raw', async () => {
    const c = await db.query(`SELECT compress_chunk(c) AS c FROM show_chunks('meterd.events') c ORDER BY 1 LIMIT 1`);
    await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)`);
    const h = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
    assert(h.diff === 0, `diff ${h.diff}`);
    return { compressed: c.rows[0].c, hourly_diff: h.diff };
  });
  await check('add_retention_policy', async () => {
    const r = await db.query(`SELECT add_retention_policy('meterd.events', INTERVAL '90 days') AS job_id`);
    return r.rows[0];
  });
  await check('timescaledb_information.jobs lists the policies', async () => {
    const r = await db.query(`SELECT job_id, proc_name, schedule_interval::text AS schedule_interval
                                FROM timescaledb_information.jobs WHERE job_id >= 1000 ORDER BY job_id`);
    return r.rows;
  });

  await db.close();
}

async function timingChecks() {
  line('== timings (fresh instance) ==');
  let db;
  const t0 = performance.now();
  await check(
    'startup: create PGlite with timescaledb + CREATE EXTENSION',
    async () => {
      db = await openDb();
    },
    { core: true },
  );
  report.timings_ms.startup_fresh = Math.round(performance.now() - t0);
  if (!db) return;
  await check('schema + hypertable + hourly + daily caggs', async () => {
    await db.exec(SCHEMA);
    await db.exec(`SELECT create_hypertable('meterd.events', by_range('time', INTERVAL '1 day'))`);
    await db.exec(HOURLY);
    await db.exec(DAILY);
  });
  const rows = makeEvents(50000, { seed: 123, spanHours: 24 * 30 });
  const t1 = performance.now();
  await check(
    'load 50,000 rows via json_populate_recordset in chunks of 5,000',
    async () => {
      await insertJsonChunks(db, rows, 5000);
      return (await db.query(`SELECT count(*) AS n FROM meterd.events`)).rows[0];
    },
    { core: true },
  );
  report.timings_ms.load_50k_rows = Math.round(performance.now() - t1);
  const t2 = performance.now();
  await check(
    'refresh hourly + daily over 50,000 rows, both == raw',
    async () => {
      await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, NULL)`);
      await db.exec(`CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, NULL)`);
      const h = await diffCount(db, 'meterd.usage_hourly_agg', RAW_HOURLY);
      const d = await diffCount(db, 'meterd.usage_daily_agg', RAW_DAILY);
      assert(h.diff === 0 && d.diff === 0, `hourly diff ${h.diff}, daily diff ${d.diff}`);
      return { hourly_rows: h.cagg_rows, daily_rows: d.cagg_rows };
    },
    { core: true },
  );
  report.timings_ms.refresh_and_verify_50k = Math.round(performance.now() - t2);
  await db.close();
}

const tAll = performance.now();
await featureChecks();
await timingChecks();
report.timings_ms.total = Math.round(performance.now() - tAll);
report.timings_ms.process_uptime = Math.round(process.uptime() * 1000);

const okN = report.checks.filter((c) => c.ok).length;
const failN = report.checks.length - okN;
line(`timings (ms): ${toJson(report.timings_ms)}`);
line(`smoke: ${okN} ok, ${failN} failed (${coreFailed} core failures)`);
if (wantJson) line(toJson(report));
process.exit(coreFailed ? 1 : 0);
