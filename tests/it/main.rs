//! meterd's integration tests, one module per area, in one binary: each test binary links
//! DataFusion, and linking it once instead of ten times is most of CI's build time.
//!
//! Every test starts the real `meterd` binary (and the real databases it talks to) on its own
//! port, data directory and database, so the tests run in parallel.

mod common;

mod bad_input;
mod billing;
mod cli;
mod clickhouse_migrations;
mod clickhouse_modern;
mod clickhouse_store;
mod crash;
mod dashboards;
mod ingest;
mod metrics;
mod postgres_store;
mod rollups;
mod slo;
mod sql;
mod timescaledb;
