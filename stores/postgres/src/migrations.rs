//! The versioned DDL of meterd's PostgreSQL schema, as committed under
//! `stores/postgres/migrations/`. A migration has one file for both flavors or one per flavor
//! (`NNNN_name.postgres.sql`, `NNNN_name.timescaledb.sql`); the runner applies each in order,
//! once, and records it in `meterd.schema_migrations`.

/// Which form of the schema a database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Plain PostgreSQL: native partitioning and meterd's rollup refresher.
    Postgres,
    /// PostgreSQL with TimescaleDB: a hypertable and continuous aggregates.
    TimescaleDb,
}

impl Flavor {
    /// The name recorded in `meterd.schema_migrations`.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Postgres => "postgres",
            Flavor::TimescaleDb => "timescaledb",
        }
    }

    /// The flavor recorded as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "postgres" => Some(Flavor::Postgres),
            "timescaledb" => Some(Flavor::TimescaleDb),
            _ => None,
        }
    }
}

/// One schema version.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    postgres: &'static str,
    timescaledb: &'static str,
    /// Statements run once, right after this migration committed, on TimescaleDB only and
    /// outside a transaction (refreshing a continuous aggregate cannot run in one).
    pub timescaledb_after: &'static [&'static str],
}

impl Migration {
    /// The SQL of this version for `flavor`.
    pub fn sql(&self, flavor: Flavor) -> &'static str {
        match flavor {
            Flavor::Postgres => self.postgres,
            Flavor::TimescaleDb => self.timescaledb,
        }
    }
}

macro_rules! file {
    ($name:literal) => {
        include_str!(concat!("../migrations/", $name))
    };
}

/// Every PostgreSQL migration, oldest first.
pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "base",
        postgres: file!("0001_base.sql"),
        timescaledb: file!("0001_base.sql"),
        timescaledb_after: &[],
    },
    Migration {
        version: 2,
        name: "events",
        postgres: file!("0002_events.postgres.sql"),
        timescaledb: file!("0002_events.timescaledb.sql"),
        timescaledb_after: &[],
    },
    Migration {
        version: 3,
        name: "rollups",
        postgres: file!("0003_rollups.postgres.sql"),
        timescaledb: file!("0003_rollups.timescaledb.sql"),
        timescaledb_after: &[],
    },
    Migration {
        version: 4,
        name: "exact_sums",
        postgres: file!("0004_exact_sums.postgres.sql"),
        timescaledb: file!("0004_exact_sums.timescaledb.sql"),
        // The aggregates created again, materialised up to their last closed bucket (as their
        // refresh policies leave them) before retention may drop another chunk.
        timescaledb_after: &[
            "CALL refresh_continuous_aggregate('meterd.usage_hourly_agg', NULL, date_trunc('hour', now()))",
            "CALL refresh_continuous_aggregate('meterd.usage_daily_agg', NULL, date_trunc('day', now()))",
        ],
    },
    Migration {
        version: 5,
        name: "cache_write_input_tokens",
        postgres: file!("0005_cache_write_input_tokens.sql"),
        timescaledb: file!("0005_cache_write_input_tokens.sql"),
        timescaledb_after: &[],
    },
    Migration {
        version: 6,
        name: "closed_invoices",
        postgres: file!("0006_closed_invoices.sql"),
        timescaledb: file!("0006_closed_invoices.sql"),
        timescaledb_after: &[],
    },
    Migration {
        version: 7,
        name: "tenant_filter_once",
        postgres: file!("0007_tenant_filter_once.sql"),
        timescaledb: file!("0007_tenant_filter_once.sql"),
        timescaledb_after: &[],
    },
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in POSTGRES.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
    }

    #[test]
    fn every_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let listed: Vec<String> = POSTGRES
            .iter()
            .flat_map(|m| {
                let n = format!("{:04}_{}", m.version, m.name);
                [
                    format!("{n}.sql"),
                    format!("{n}.postgres.sql"),
                    format!("{n}.timescaledb.sql"),
                ]
            })
            .collect();
        for entry in std::fs::read_dir(&dir).expect("migrations dir") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            assert!(listed.iter().any(|l| *l == name), "{name} is not listed");
        }
    }

    /// `(name, type, nullable)` of `meterd.events_data` as the migrations of `flavor` create
    /// it: the columns of its `CREATE TABLE`, then every `ADD COLUMN` after it.
    fn postgres_columns(flavor: Flavor) -> BTreeSet<(String, String, bool)> {
        let mut columns = BTreeSet::new();
        for m in POSTGRES {
            let sql = m.sql(flavor);
            if let Some(start) = sql.find("CREATE TABLE meterd.events_data (") {
                let body = &sql[start..];
                let body = &body[body.find('(').expect("(") + 1..body.find("\n)").expect(")")];
                for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let mut words = line.trim_end_matches(',').split_whitespace();
                    let (Some(name), Some(ty)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let nullable = !line.contains("NOT NULL");
                    columns.insert((name.to_owned(), ty.to_owned(), nullable));
                }
            }
            for line in sql.lines() {
                if let Some(rest) = line.split("ADD COLUMN").nth(1)
                    && line.contains("meterd.events_data")
                {
                    let mut words = rest.trim().trim_end_matches(';').split_whitespace();
                    if let (Some(name), Some(ty)) = (words.next(), words.next()) {
                        columns.insert((
                            name.to_owned(),
                            ty.to_owned(),
                            !rest.contains("NOT NULL"),
                        ));
                    }
                }
            }
        }
        columns
    }

    /// The PostgreSQL migrations are literal SQL: they must create exactly the table's columns.
    #[test]
    fn the_postgres_migrations_create_the_table_columns() {
        let wanted: BTreeSet<(String, String, bool)> = meterd_schemas::columns::COLUMNS
            .iter()
            .map(|c| (c.name.to_owned(), c.postgres_type().to_owned(), c.nullable))
            .collect();
        for flavor in [Flavor::Postgres, Flavor::TimescaleDb] {
            assert_eq!(postgres_columns(flavor), wanted, "{}", flavor.as_str());
        }
    }
}
