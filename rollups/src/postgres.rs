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
//! by `meterd.tenant_visible(tenant)` so tenant-scoped database roles see only their rows.
//!
//! The rendered SQL is committed under `schemas/migrations/postgres/`; a test keeps the files
//! and this renderer in step.

use std::fmt::Write as _;

use crate::{Aggregate, DIMENSIONS, DimensionExpr, Predicate, ROLLUPS, Rollup, Source, measures};

/// Which PostgreSQL form to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Plain PostgreSQL: tables kept by `meterd.refresh_rollups()`.
    Postgres,
    /// PostgreSQL with the TimescaleDB extension: continuous aggregates.
    TimescaleDb,
}

/// The origin of plain PostgreSQL's `date_bin` buckets: a UTC midnight, so hourly and daily
/// buckets start where TimescaleDB's `time_bucket` starts them.
const ORIGIN: &str = "TIMESTAMPTZ '2000-01-01 00:00:00+00'";

/// Sums saturate at the largest `bigint` instead of failing the refresh: PostgreSQL sums
/// `bigint` as `numeric`, and one absurd value must not stop every tenant's rollups.
const SUM_MAX: i64 = i64::MAX;

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

fn predicate_sql(p: &Predicate) -> String {
    match p {
        Predicate::IsError => "(type = 'api.request' AND status_code >= 500) \
             OR (type = 'llm.usage' AND status = 'error') \
             OR (type = 'agent.run' AND status IN ('failed', 'timeout'))"
            .to_owned(),
        Predicate::NotNull(c) => format!("{c} IS NOT NULL"),
        Predicate::AtMost(c, bound) => format!("{c} <= {bound}"),
    }
}

fn dimension_sql(expr: &DimensionExpr) -> String {
    match expr {
        DimensionExpr::Column(c) => (*c).to_owned(),
        DimensionExpr::OrEmpty(c) => format!("coalesce({c}, '')"),
        DimensionExpr::StatusClass => "CASE WHEN type = 'api.request' \
             THEN (status_code / 100)::text || 'xx' ELSE coalesce(status, '') END"
            .to_owned(),
    }
}

/// The aggregate of one measure over raw events. Every form yields a non-NULL `bigint`.
fn measure_over_events(aggregate: &Aggregate) -> String {
    match aggregate {
        Aggregate::Count => "count(*)".to_owned(),
        Aggregate::Sum(c) => format!("least(coalesce(sum({c}), 0), {SUM_MAX})::bigint"),
        Aggregate::CountIf(p) => {
            format!(
                "sum(CASE WHEN {} THEN 1 ELSE 0 END)::bigint",
                predicate_sql(p)
            )
        }
    }
}

/// `SELECT bucket, dimensions, measures FROM <from> [WHERE ...] GROUP BY ...` computing `rollup`
/// from its source. `from` is the source relation; over another rollup every measure is summed.
pub fn select_sql(flavor: Flavor, rollup: &Rollup, from: &str, filter: Option<&str>) -> String {
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
            Source::Events => measure_over_events(&m.aggregate),
            Source::Rollup(_) => format!("least(sum({}), {SUM_MAX})::bigint", m.name),
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
    crate::columns().join(", ")
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

/// The whole rollups migration for `flavor`.
pub fn migration(flavor: Flavor) -> String {
    let mut sql = String::from(
        "-- Rollups: generated from the definitions in the rollups crate. Do not edit by hand;\n\
         -- run `METERD_BLESS=1 cargo test --workspace --lib -- migrations_match` to regenerate.\n\n",
    );
    match flavor {
        Flavor::TimescaleDb => timescaledb(&mut sql),
        Flavor::Postgres => plain(&mut sql),
    }
    sql
}

fn timescaledb(sql: &mut String) {
    for r in ROLLUPS {
        let agg = format!("meterd.{}_agg", r.name);
        let _ = write!(
            sql,
            "CREATE MATERIALIZED VIEW {agg}\n\
             WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS\n\
             {select}\n\
             WITH NO DATA;\n\n",
            select = select_sql(
                Flavor::TimescaleDb,
                r,
                &materialisation_source(Flavor::TimescaleDb, r),
                None
            ),
        );
        let body = format!(
            "SELECT {cols}\nFROM {agg}\nWHERE meterd.tenant_visible(tenant)",
            cols = column_list()
        );
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
            let _ = write!(sql, ",\n    {} bigint NOT NULL", m.name);
        }
        let _ = write!(
            sql,
            "\n);\nCREATE INDEX ON meterd.{name}_mat (bucket);\n\
             CREATE INDEX ON meterd.{name}_mat (tenant, bucket);\n\
             INSERT INTO meterd.rollup_watermarks VALUES ('{name}', '-infinity');\n\n",
            name = r.name
        );
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

    refresh_function(sql);
}

/// `meterd.refresh_rollups(p_now)`: for each rollup, finer first, move the watermark to the
/// start of the bucket holding `p_now` (never backwards, never past the source's watermark) and
/// re-materialise every invalidated bucket below it, then invalidate the coarser rollups'
/// buckets that changed. One transaction, serialised across nodes by an advisory lock; returns
/// how many buckets were re-materialised.
fn refresh_function(sql: &mut String) {
    let _ = write!(
        sql,
        "CREATE FUNCTION meterd.refresh_rollups(p_now timestamptz DEFAULT now()) RETURNS bigint\n\
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
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/migrations/postgres");
        for (flavor, file) in [
            (Flavor::Postgres, "0003_rollups.postgres.sql"),
            (Flavor::TimescaleDb, "0003_rollups.timescaledb.sql"),
        ] {
            let path = dir.join(file);
            let rendered = migration(flavor);
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
        let daily = crate::rollup("usage_daily").expect("defined");
        let sql = select_sql(Flavor::TimescaleDb, daily, "meterd.usage_hourly_agg", None);
        assert!(sql.contains("time_bucket(INTERVAL '1 day', bucket) AS bucket"));
        assert!(sql.contains("least(sum(events), 9223372036854775807)::bigint AS events"));
        assert!(sql.contains(
            "least(sum(latency_le_60000), 9223372036854775807)::bigint AS latency_le_60000"
        ));
        assert!(!sql.contains("count(*)"));
    }

    #[test]
    fn plain_buckets_use_a_utc_origin() {
        let hourly = crate::rollup("usage_hourly").expect("defined");
        assert_eq!(
            bucket_expr(Flavor::Postgres, hourly, "time"),
            "date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
        );
    }
}
