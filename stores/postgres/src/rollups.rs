//! The PostgreSQL forms of the rollups.
//!
//! - TimescaleDB: each rollup is a continuous aggregate `meterd.<name>_agg` with real-time
//!   aggregation (`materialized_only = false`), the coarser ones hierarchical (on the finer
//!   aggregate), refreshed by TimescaleDB's own policies.
//! - Plain PostgreSQL: each rollup is a table `meterd.<name>_mat` kept by
//!   `meterd.refresh_rollups()`, meterd's incremental refresher. Statement triggers on
//!   `meterd.events_data` record which hourly buckets changed (an invalidation log, as TimescaleDB
//!   keeps one); a refresh moves each rollup's watermark up to the last closed bucket and
//!   re-materialises exactly the invalidated buckets below it, so a late event costs one bucket,
//!   not a rebuild. Above the watermark the rollup is computed from its source at query time
//!   (real-time aggregation).
//!
//! Either way users query the view `meterd.<name>`: the same columns in the same order, filtered
//! so tenant-scoped database roles see only their rows. Migrations 3 and 4 rendered the filter
//! as `meterd.tenant_visible(tenant)`; migration 7 rewrote it in the views as two scalar
//! subqueries evaluated once per query, and a migration rendering these views again must
//! write it that way.
//!
//! The rendered SQL is committed under `stores/postgres/migrations/`; a test keeps the files
//! and this renderer in step.

use std::fmt::Write as _;

use meterd_rollups::sql::{dimension_sql, predicate_sql};
use meterd_rollups::{Aggregate, DIMENSIONS, ROLLUPS, Rollup, Source, measures};

pub use crate::migrations::Flavor;

/// The origin of plain PostgreSQL's `date_bin` buckets: a UTC midnight, so hourly and daily
/// buckets start where TimescaleDB's `time_bucket` starts them.
const ORIGIN: &str = "TIMESTAMPTZ '2000-01-01 00:00:00+00'";

/// How a summed measure is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sums {
    /// Migration 0003: sums saturating at the largest `bigint`. Rendered only so the applied
    /// migration keeps its checksum; migration 0004 replaces it.
    Saturating,
    /// Since migration 0004: exact `numeric(38, 0)` sums, as PostgreSQL sums `bigint` and as
    /// meterd's SQL answers `sum`. Counts stay `bigint` (a count cannot pass 2^63).
    Exact,
}

/// The saturation bound of [`Sums::Saturating`].
const SUM_MAX: i64 = i64::MAX;

/// The SQL type of exact sums.
pub const SUM_TYPE: &str = "numeric(38, 0)";

/// The column type of a measure.
fn measure_type(aggregate: &Aggregate, sums: Sums) -> &'static str {
    match (aggregate, sums) {
        (Aggregate::Sum(_), Sums::Exact) => SUM_TYPE,
        _ => "bigint",
    }
}

/// The advisory lock key that serialises refreshes across meterd nodes (`'mtrdrfsh'` as bytes).
pub const REFRESH_LOCK_KEY: i64 = 0x6d74_7264_7266_7368;

/// The expression of the bucket holding `column`, for a rollup of `width`.
pub fn bucket_expr(flavor: Flavor, rollup: &Rollup, column: &str) -> String {
    let interval = rollup.width.interval();
    match flavor {
        Flavor::Postgres => format!("date_bin(INTERVAL '{interval}', {column}, {ORIGIN})"),
        Flavor::TimescaleDb => format!("time_bucket(INTERVAL '{interval}', {column})"),
    }
}

/// The aggregate of one measure over raw events, never NULL, of [`measure_type`].
fn measure_over_events(aggregate: &Aggregate, sums: Sums) -> String {
    match aggregate {
        Aggregate::Count => "count(*)".to_owned(),
        Aggregate::Sum(c) => match sums {
            Sums::Saturating => format!("least(coalesce(sum({c}), 0), {SUM_MAX})::bigint"),
            Sums::Exact => format!("coalesce(sum({c}), 0)::{SUM_TYPE}"),
        },
        Aggregate::CountIf(p) => {
            format!(
                "sum(CASE WHEN {} THEN 1 ELSE 0 END)::bigint",
                predicate_sql(p)
            )
        }
    }
}

/// One measure summed over a finer rollup's rows, of [`measure_type`].
fn measure_over_rollup(name: &str, aggregate: &Aggregate, sums: Sums) -> String {
    match sums {
        Sums::Saturating => format!("least(sum({name}), {SUM_MAX})::bigint"),
        Sums::Exact => format!("sum({name})::{}", measure_type(aggregate, sums)),
    }
}

/// `SELECT bucket, dimensions, measures FROM <from> [WHERE ...] GROUP BY ...` computing `rollup`
/// from its source. `from` is the source relation; over another rollup every measure is summed.
pub fn select_sql(
    flavor: Flavor,
    sums: Sums,
    rollup: &Rollup,
    from: &str,
    filter: Option<&str>,
) -> String {
    let time_column = match rollup.source {
        Source::Events => "time",
        Source::Rollup(_) => "bucket",
    };
    let mut sql = format!(
        "SELECT {} AS bucket",
        bucket_expr(flavor, rollup, time_column)
    );
    for d in DIMENSIONS {
        let expr = match rollup.source {
            Source::Events => dimension_sql(&d.expr),
            Source::Rollup(_) => d.name.to_owned(),
        };
        let _ = write!(sql, ",\n       {expr} AS {}", d.name);
    }
    for m in measures() {
        let expr = match rollup.source {
            Source::Events => measure_over_events(&m.aggregate, sums),
            Source::Rollup(_) => measure_over_rollup(&m.name, &m.aggregate, sums),
        };
        let _ = write!(sql, ",\n       {expr} AS {}", m.name);
    }
    let _ = write!(sql, "\nFROM {from}");
    if let Some(f) = filter {
        let _ = write!(sql, "\nWHERE {f}");
    }
    let group: Vec<String> = (1..=DIMENSIONS.len() + 1).map(|i| i.to_string()).collect();
    let _ = write!(sql, "\nGROUP BY {}", group.join(", "));
    sql
}

/// The relation a rollup reads when it is materialised.
fn materialisation_source(flavor: Flavor, rollup: &Rollup) -> String {
    match (rollup.source, flavor) {
        (Source::Events, _) => "meterd.events_data".to_owned(),
        (Source::Rollup(src), Flavor::Postgres) => format!("meterd.{src}_mat"),
        (Source::Rollup(src), Flavor::TimescaleDb) => format!("meterd.{src}_agg"),
    }
}

fn column_list() -> String {
    meterd_rollups::columns().join(", ")
}

/// The user-facing view `meterd.<name>` over `relation`, filtered by tenant visibility.
fn user_view(rollup: &Rollup, body: &str) -> String {
    format!(
        "CREATE VIEW meterd.{name} WITH (security_barrier) AS\n{body};\n\
         COMMENT ON VIEW meterd.{name} IS 'meterd rollup by {width} bucket (UTC); \
         see the rollups crate for the columns';\n\n",
        name = rollup.name,
        width = rollup.width.interval(),
    )
}

const GENERATED: &str = "-- Rollups: generated from the definitions in the rollups crate. Do not edit by hand;\n\
     -- run `METERD_BLESS=1 cargo test --workspace --lib -- migrations_match` to regenerate.\n\n";

/// Migration 0003, the rollups as first created (saturating sums), for `flavor`.
pub fn migration(flavor: Flavor) -> String {
    let mut sql = String::from(GENERATED);
    match flavor {
        Flavor::TimescaleDb => timescaledb(&mut sql),
        Flavor::Postgres => plain(&mut sql),
    }
    sql
}

/// Migration 0004: the rollups' sums become exact `numeric(38, 0)`, keeping every rollup row
/// and every grant on the rollup views.
///
/// Plain PostgreSQL changes the materialised tables' column types in place. A TimescaleDB
/// continuous aggregate cannot change a column's type, so its aggregates are created again
/// (real-time aggregation answers from the raw events until the refresh policy has
/// materialised them); buckets whose raw events retention has already dropped are kept first
/// in `meterd.<rollup>_history`, which the view adds back.
pub fn exact_sums_migration(flavor: Flavor) -> String {
    let mut sql = String::from(GENERATED);
    sql.push_str(REFUSE_DEPENDENT_VIEWS);
    if flavor == Flavor::TimescaleDb {
        // No chunk may be dropped between keeping the buckets without raw events and the
        // new aggregates' first refresh, which meterd runs right after this migration
        // (`Migration::timescaledb_after`) before it sets the retention policy again.
        sql.push_str(
            "SELECT remove_retention_policy('meterd.events_data', if_exists => true);\n\n",
        );
    }
    sql.push_str(SAVE_GRANTS);
    for r in ROLLUPS.iter().rev() {
        let _ = writeln!(sql, "DROP VIEW meterd.{};", r.name);
    }
    sql.push('\n');
    match flavor {
        Flavor::TimescaleDb => {
            for r in ROLLUPS {
                let history_cols: Vec<String> = std::iter::once("bucket".to_owned())
                    .chain(DIMENSIONS.iter().map(|d| d.name.to_owned()))
                    .chain(measures().iter().map(|m| {
                        format!(
                            "{name}::{ty} AS {name}",
                            name = m.name,
                            ty = measure_type(&m.aggregate, Sums::Exact)
                        )
                    }))
                    .collect();
                let _ = write!(
                    sql,
                    "CREATE TABLE meterd.{name}_history AS\n\
                     SELECT {cols}\n\
                     FROM meterd.{name}_agg\n\
                     WHERE bucket < coalesce((SELECT {first} FROM meterd.events_data), 'infinity');\n\
                     CREATE INDEX ON meterd.{name}_history (tenant, bucket);\n\
                     COMMENT ON TABLE meterd.{name}_history IS 'meterd rollup buckets whose raw events were dropped before sums became exact';\n\n",
                    name = r.name,
                    cols = history_cols.join(", "),
                    first = bucket_expr(Flavor::TimescaleDb, r, "min(time)"),
                );
            }
            for r in ROLLUPS.iter().rev() {
                let _ = writeln!(sql, "DROP MATERIALIZED VIEW meterd.{}_agg;", r.name);
            }
            sql.push('\n');
            for r in ROLLUPS {
                continuous_aggregate(
                    &mut sql,
                    r,
                    Sums::Exact,
                    Some(&format!("meterd.{}_history", r.name)),
                );
            }
        }
        Flavor::Postgres => {
            for r in ROLLUPS {
                let alters: Vec<String> = measures()
                    .iter()
                    .filter(|m| measure_type(&m.aggregate, Sums::Exact) != "bigint")
                    .map(|m| format!("    ALTER COLUMN {} TYPE {SUM_TYPE}", m.name))
                    .collect();
                let _ = write!(
                    sql,
                    "ALTER TABLE meterd.{}_mat\n{};\n\n",
                    r.name,
                    alters.join(",\n")
                );
            }
            // Buckets materialised with a saturated sum are computed again, exactly, by the
            // next refresh (the daily ones from the hourly table); but only while their raw
            // events are still there: past retention the saturated row is all there is.
            for r in ROLLUPS {
                let saturated: Vec<String> = measures()
                    .iter()
                    .filter(|m| matches!(m.aggregate, Aggregate::Sum(_)))
                    .map(|m| format!("m.{} = {SUM_MAX}", m.name))
                    .collect();
                let _ = write!(
                    sql,
                    "INSERT INTO meterd.rollup_invalidations (rollup, bucket)\n\
                     SELECT DISTINCT '{name}', m.bucket FROM meterd.{name}_mat m\n\
                     WHERE ({saturated})\n  \
                     AND EXISTS (SELECT 1 FROM meterd.events_data e\n              \
                     WHERE e.tenant = m.tenant AND e.time >= m.bucket\n                \
                     AND e.time < m.bucket + INTERVAL '{width}');\n\n",
                    name = r.name,
                    saturated = saturated.join(" OR "),
                    width = r.width.interval(),
                );
            }
            for r in ROLLUPS {
                plain_view(&mut sql, r, Sums::Exact);
            }
            refresh_function(&mut sql, Sums::Exact);
            sql.push('\n');
        }
    }
    sql.push_str(RESTORE_GRANTS);
    sql
}

/// Stops the migration, naming them, when views of the database's users are built on the rollup
/// views: those would have to be dropped with them.
const REFUSE_DEPENDENT_VIEWS: &str = "DO $$\n\
     DECLARE\n    \
     v_dependents text;\n\
     BEGIN\n    \
     SELECT string_agg(DISTINCT v.oid::regclass::text, ', ') INTO v_dependents\n    \
     FROM pg_catalog.pg_depend d\n    \
     JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid\n    \
     JOIN pg_catalog.pg_class v ON v.oid = r.ev_class\n    \
     WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass\n      \
     AND d.refobjid IN ('meterd.usage_hourly'::regclass, 'meterd.usage_daily'::regclass)\n      \
     AND v.oid NOT IN ('meterd.usage_hourly'::regclass, 'meterd.usage_daily'::regclass);\n    \
     IF v_dependents IS NOT NULL THEN\n        \
     RAISE EXCEPTION 'meterd''s migration 4 (exact sums) re-creates meterd.usage_hourly and meterd.usage_daily; drop the views built on them first: %', v_dependents;\n    \
     END IF;\n\
     END\n\
     $$;\n\n";

/// Keeps the privileges granted on the rollup views (to Grafana or BI roles) across their
/// re-creation, in a temporary table of the migration's transaction.
const SAVE_GRANTS: &str = "CREATE TEMPORARY TABLE meterd_rollup_grants ON COMMIT DROP AS\n\
     SELECT c.relname AS relation, a.grantee, a.privilege_type, a.is_grantable\n\
     FROM pg_catalog.pg_class c\n\
     CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a\n\
     WHERE c.relnamespace = 'meterd'::regnamespace\n  \
     AND c.relname IN ('usage_hourly', 'usage_daily')\n  \
     AND a.grantee <> c.relowner;\n\n";

const RESTORE_GRANTS: &str = "DO $$\n\
     DECLARE\n    \
     g record;\n\
     BEGIN\n    \
     FOR g IN SELECT * FROM meterd_rollup_grants LOOP\n        \
     EXECUTE format('GRANT %s ON meterd.%I TO %s%s', g.privilege_type, g.relation,\n            \
     CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,\n            \
     CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);\n    \
     END LOOP;\n\
     END\n\
     $$;\n";

/// A continuous aggregate `meterd.<name>_agg`, the user view over it (and over `history`, the
/// buckets kept from before), and its refresh policy.
fn continuous_aggregate(sql: &mut String, r: &Rollup, sums: Sums, history: Option<&str>) {
    let agg = format!("meterd.{}_agg", r.name);
    let _ = write!(
        sql,
        "CREATE MATERIALIZED VIEW {agg}\n\
         WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS\n\
         {select}\n\
         WITH NO DATA;\n\n",
        select = select_sql(
            Flavor::TimescaleDb,
            sums,
            r,
            &materialisation_source(Flavor::TimescaleDb, r),
            None
        ),
    );
    let mut body = format!(
        "SELECT {cols}\nFROM {agg}\nWHERE meterd.tenant_visible(tenant)",
        cols = column_list()
    );
    if let Some(history) = history {
        let _ = write!(
            body,
            "\nUNION ALL\nSELECT {cols}\nFROM {history}\nWHERE meterd.tenant_visible(tenant)",
            cols = column_list()
        );
    }
    sql.push_str(&user_view(r, &body));
    // Refresh everything invalidated (late events included: no start offset) up to the
    // last closed bucket; real-time aggregation covers the rest.
    let interval = r.width.interval();
    let _ = write!(
        sql,
        "SELECT add_continuous_aggregate_policy('{agg}',\n    \
         start_offset => NULL,\n    end_offset => INTERVAL '{interval}',\n    \
         schedule_interval => INTERVAL '1 minute');\n\n"
    );
}

fn timescaledb(sql: &mut String) {
    for r in ROLLUPS {
        continuous_aggregate(sql, r, Sums::Saturating, None);
    }
}

/// The user view of a plain-PostgreSQL rollup: materialised buckets below the watermark, a
/// live GROUP BY above it.
fn plain_view(sql: &mut String, r: &Rollup, sums: Sums) {
    let live_source = match r.source {
        Source::Events => "meterd.events_data".to_owned(),
        Source::Rollup(src) => format!("meterd.{src}"),
    };
    let time_column = match r.source {
        Source::Events => "time",
        Source::Rollup(_) => "bucket",
    };
    let live = select_sql(
        Flavor::Postgres,
        sums,
        r,
        &live_source,
        Some(&format!(
            "{time_column} >= meterd.rollup_watermark('{name}')\n  \
             AND meterd.tenant_visible(tenant)",
            name = r.name
        )),
    );
    let body = format!(
        "SELECT {cols}\nFROM meterd.{name}_mat\n\
         WHERE bucket < meterd.rollup_watermark('{name}')\n  \
         AND meterd.tenant_visible(tenant)\nUNION ALL\n{live}",
        cols = column_list(),
        name = r.name,
    );
    sql.push_str(&user_view(r, &body));
}

fn plain(sql: &mut String) {
    sql.push_str(
        "CREATE TABLE meterd.rollup_watermarks (\n    \
         rollup text PRIMARY KEY,\n    \
         watermark timestamptz NOT NULL\n);\n\
         -- Read by the rollup views with the querying role's rights; it holds no tenant data.\n\
         GRANT SELECT ON meterd.rollup_watermarks TO PUBLIC;\n\n\
         -- Buckets whose source rows changed since they were last materialised. Append-only (no\n\
         -- unique key, so a writer never skips its row because another transaction's row is\n\
         -- there): a refresh deletes the rows it can see, and the rows of transactions that\n\
         -- commit later stay for the next one.\n\
         CREATE TABLE meterd.rollup_invalidations (\n    \
         rollup text NOT NULL,\n    \
         bucket timestamptz NOT NULL\n);\n\
         CREATE INDEX ON meterd.rollup_invalidations (rollup, bucket);\n\n\
         CREATE FUNCTION meterd.rollup_watermark(p_rollup text) RETURNS timestamptz\n\
         LANGUAGE sql STABLE\n\
         BEGIN ATOMIC\n    \
         SELECT coalesce((SELECT watermark FROM meterd.rollup_watermarks WHERE rollup = p_rollup),\n                    \
         '-infinity'::timestamptz);\n\
         END;\n\n",
    );

    // Materialised tables and user views.
    for r in ROLLUPS {
        let _ = write!(
            sql,
            "CREATE TABLE meterd.{}_mat (\n    bucket timestamptz NOT NULL",
            r.name
        );
        for d in DIMENSIONS {
            let _ = write!(sql, ",\n    {} text NOT NULL", d.name);
        }
        for m in measures() {
            let _ = write!(
                sql,
                ",\n    {} {} NOT NULL",
                m.name,
                measure_type(&m.aggregate, Sums::Saturating)
            );
        }
        let _ = write!(
            sql,
            "\n);\nCREATE INDEX ON meterd.{name}_mat (bucket);\n\
             CREATE INDEX ON meterd.{name}_mat (tenant, bucket);\n\
             INSERT INTO meterd.rollup_watermarks VALUES ('{name}', '-infinity');\n\n",
            name = r.name
        );
        plain_view(sql, r, Sums::Saturating);
    }

    // Invalidation triggers: every statement that changes events records the buckets it touched
    // for the rollups that read events directly.
    let direct: Vec<&Rollup> = ROLLUPS
        .iter()
        .filter(|r| r.source == Source::Events)
        .collect();
    sql.push_str(
        "CREATE FUNCTION meterd.invalidate_rollups() RETURNS trigger\n\
         LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$\nBEGIN\n",
    );
    for r in &direct {
        let _ = write!(
            sql,
            "    INSERT INTO meterd.rollup_invalidations (rollup, bucket)\n    \
             SELECT DISTINCT '{name}', {bucket} FROM changed;\n",
            name = r.name,
            bucket = bucket_expr(Flavor::Postgres, r, "time"),
        );
    }
    sql.push_str("    RETURN NULL;\nEND\n$$;\n\n");
    for (name, event, table) in [
        ("events_invalidate_insert", "INSERT", "NEW"),
        ("events_invalidate_update_old", "UPDATE", "OLD"),
        ("events_invalidate_update_new", "UPDATE", "NEW"),
        ("events_invalidate_delete", "DELETE", "OLD"),
    ] {
        let _ = write!(
            sql,
            "CREATE TRIGGER {name} AFTER {event} ON meterd.events_data\n    \
             REFERENCING {table} TABLE AS changed\n    \
             FOR EACH STATEMENT EXECUTE FUNCTION meterd.invalidate_rollups();\n"
        );
    }
    sql.push('\n');

    refresh_function(sql, Sums::Saturating);
}

/// `meterd.refresh_rollups(p_now)`: for each rollup, finer first, move the watermark to the
/// start of the bucket holding `p_now` (never backwards, never past the source's watermark) and
/// re-materialise every invalidated bucket below it, then invalidate the coarser rollups'
/// buckets that changed. One transaction, serialised across nodes by an advisory lock; returns
/// how many buckets were re-materialised.
fn refresh_function(sql: &mut String, sums: Sums) {
    // 0003 created it; 0004 replaces its body, signature unchanged.
    let create = match sums {
        Sums::Saturating => "CREATE",
        Sums::Exact => "CREATE OR REPLACE",
    };
    let _ = write!(
        sql,
        "{create} FUNCTION meterd.refresh_rollups(p_now timestamptz DEFAULT now()) RETURNS bigint\n\
         LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$\n\
         DECLARE\n    \
         v_watermark timestamptz;\n    \
         v_buckets timestamptz[];\n    \
         v_lo timestamptz;\n    \
         v_hi timestamptz;\n    \
         v_chunk timestamptz[];\n    \
         v_total bigint := 0;\n\
         BEGIN\n    \
         PERFORM pg_advisory_xact_lock({REFRESH_LOCK_KEY});\n"
    );
    for r in ROLLUPS {
        let name = r.name;
        let now_bucket = bucket_expr(Flavor::Postgres, r, "p_now");
        let limit = match r.source {
            Source::Events => now_bucket,
            Source::Rollup(src) => format!(
                "least({now_bucket}, {})",
                bucket_expr(
                    Flavor::Postgres,
                    r,
                    &format!("meterd.rollup_watermark('{src}')")
                )
            ),
        };
        let (source, time_column) = match r.source {
            Source::Events => ("meterd.events_data".to_owned(), "time"),
            Source::Rollup(src) => (format!("meterd.{src}_mat"), "bucket"),
        };
        let bucket_of_row = bucket_expr(Flavor::Postgres, r, time_column);
        let chunk_of_bucket = format!("date_bin(INTERVAL '1 day', b, {ORIGIN})");
        let select = select_sql(
            Flavor::Postgres,
            sums,
            r,
            &source,
            Some(&format!(
                "{time_column} >= v_lo AND {time_column} < v_hi + INTERVAL '{interval}'\n          \
                 AND {bucket_of_row} = ANY (v_chunk)",
                interval = r.width.interval()
            )),
        );
        let select = select.replace('\n', "\n        ");
        let _ = write!(
            sql,
            "\n    -- {name}\n    \
             v_watermark := greatest(meterd.rollup_watermark('{name}'), {limit});\n    \
             UPDATE meterd.rollup_watermarks SET watermark = v_watermark WHERE rollup = '{name}';\n    \
             WITH done AS (\n        \
             DELETE FROM meterd.rollup_invalidations\n        \
             WHERE rollup = '{name}' AND bucket < v_watermark\n        \
             RETURNING bucket)\n    \
             SELECT coalesce(array_agg(DISTINCT bucket ORDER BY bucket), '{{}}') INTO v_buckets\n    \
             FROM done;\n    \
             IF cardinality(v_buckets) > 0 THEN\n        \
             DELETE FROM meterd.{name}_mat WHERE bucket = ANY (v_buckets);\n        \
             -- One scan per day of source rows, so partitions are pruned and each row is\n        \
             -- checked against that day's buckets only.\n        \
             FOR v_lo, v_hi, v_chunk IN\n            \
             SELECT min(b), max(b), array_agg(b) FROM unnest(v_buckets) AS b\n            \
             GROUP BY {chunk_of_bucket}\n        \
             LOOP\n        \
             INSERT INTO meterd.{name}_mat ({cols})\n        \
             {select};\n        \
             END LOOP;\n        \
             v_total := v_total + cardinality(v_buckets);\n",
            cols = column_list(),
        );
        for coarser in ROLLUPS
            .iter()
            .filter(|c| c.source == Source::Rollup(r.name))
        {
            let _ = write!(
                sql,
                "        INSERT INTO meterd.rollup_invalidations (rollup, bucket)\n        \
                 SELECT DISTINCT '{cname}', {cbucket} FROM unnest(v_buckets) AS b;\n",
                cname = coarser.name,
                cbucket = bucket_expr(Flavor::Postgres, coarser, "b"),
            );
        }
        sql.push_str("    END IF;\n");
    }
    sql.push_str("    RETURN v_total;\nEND\n$$;\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed migration files are the renderer's output. With `METERD_BLESS=1` the test
    /// rewrites them instead.
    #[test]
    fn migrations_match_the_committed_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for (file, rendered) in [
            ("0003_rollups.postgres.sql", migration(Flavor::Postgres)),
            (
                "0003_rollups.timescaledb.sql",
                migration(Flavor::TimescaleDb),
            ),
            (
                "0004_exact_sums.postgres.sql",
                exact_sums_migration(Flavor::Postgres),
            ),
            (
                "0004_exact_sums.timescaledb.sql",
                exact_sums_migration(Flavor::TimescaleDb),
            ),
        ] {
            let path = dir.join(file);
            if std::env::var_os("METERD_BLESS").is_some() {
                std::fs::write(&path, &rendered).expect("write migration");
                continue;
            }
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            assert!(
                committed == rendered,
                "{} differs from the rollup definitions; regenerate with METERD_BLESS=1",
                path.display()
            );
        }
    }

    #[test]
    fn hierarchical_rollups_sum_their_source() {
        let daily = meterd_rollups::rollup("usage_daily").expect("defined");
        let sql = select_sql(
            Flavor::TimescaleDb,
            Sums::Saturating,
            daily,
            "meterd.usage_hourly_agg",
            None,
        );
        assert!(sql.contains("time_bucket(INTERVAL '1 day', bucket) AS bucket"));
        assert!(sql.contains("least(sum(events), 9223372036854775807)::bigint AS events"));
        assert!(sql.contains(
            "least(sum(latency_le_60000), 9223372036854775807)::bigint AS latency_le_60000"
        ));
        assert!(!sql.contains("count(*)"));
        let exact = select_sql(
            Flavor::TimescaleDb,
            Sums::Exact,
            daily,
            "meterd.usage_hourly_agg",
            None,
        );
        assert!(exact.contains("sum(events)::bigint AS events"));
        assert!(exact.contains("sum(input_tokens)::numeric(38, 0) AS input_tokens"));
        assert!(!exact.contains("least("));
    }

    #[test]
    fn exact_sums_are_numeric_from_the_events() {
        let hourly = meterd_rollups::rollup("usage_hourly").expect("defined");
        let sql = select_sql(
            Flavor::Postgres,
            Sums::Exact,
            hourly,
            "meterd.events_data",
            None,
        );
        assert!(sql.contains("coalesce(sum(input_tokens), 0)::numeric(38, 0) AS input_tokens"));
        assert!(sql.contains("count(*) AS events"));
        let migration = exact_sums_migration(Flavor::Postgres);
        assert!(migration.contains("ALTER COLUMN latency_ms_sum TYPE numeric(38, 0)"));
        assert!(!migration.contains("ALTER COLUMN latency_count"));
        assert!(migration.contains("CREATE OR REPLACE FUNCTION meterd.refresh_rollups"));
    }

    #[test]
    fn plain_buckets_use_a_utc_origin() {
        let hourly = meterd_rollups::rollup("usage_hourly").expect("defined");
        assert_eq!(
            bucket_expr(Flavor::Postgres, hourly, "time"),
            "date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
        );
    }
}
