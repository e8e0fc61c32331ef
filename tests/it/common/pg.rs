//! PostgreSQL for the integration tests: a database of the test's own on the shared server
//! (`METERD_TEST_POSTGRES_URL`, started by scripts/test.sh), or a private server the test can
//! stop and start.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

/// The shared server's administrative URL.
pub fn admin_url() -> String {
    std::env::var("METERD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://meterd:meterd@127.0.0.1:5432/postgres".to_owned())
}

/// Connects or fails the test with a message that says what is missing.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url}: {e}. The tests need a real PostgreSQL 15; \
             `bash scripts/test.sh` installs and starts it (or set METERD_TEST_POSTGRES_URL)"
            )
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Replaces the database name of a `postgres://` URL.
fn with_database(url: &str, database: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").map_or(0, |j| j + 2) => {
            let rest = &url[i + 1..];
            let query = rest.find('?').map_or("", |q| &rest[q..]);
            format!("{}/{database}{query}", &url[..i])
        }
        _ => format!("{url}/{database}"),
    }
}

/// A database of the test's own, dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    /// Creates `meterd_<test>_<pid>` on the shared server (dropping a leftover first).
    pub async fn create(test: &str) -> TestDb {
        Self::create_on(&admin_url(), test).await
    }

    /// Creates the database on the server of `admin` (a URL with any database).
    pub async fn create_on(admin: &str, test: &str) -> TestDb {
        let name = format!("meterd_{test}_{}", std::process::id());
        let client = connect(admin).await;
        // Two statements: CREATE DATABASE cannot run in the implicit transaction of a batch.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
        TestDb {
            url: with_database(admin, &name),
            name,
            admin: admin.to_owned(),
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs outside any runtime guarantee: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Every row of `sql` as a JSON array of objects (column order kept by name).
pub async fn rows(client: &Client, sql: &str) -> Vec<Value> {
    let wrapped =
        format!("SELECT coalesce(jsonb_agg(to_jsonb(x.*)), '[]'::jsonb) FROM ({sql}) AS x");
    let v: Value = client
        .query_one(&wrapped, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0);
    match v {
        Value::Array(a) => a,
        other => panic!("{sql}: expected an array, got {other}"),
    }
}

/// An integer query result.
pub async fn int(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// Polls until `sql` (an integer query) returns `want`, or panics after `timeout`.
pub async fn wait_for(client: &Client, sql: &str, want: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match client.query_one(sql, &[]).await {
            Ok(row) => {
                let v: i64 = row.get(0);
                if v == want {
                    return;
                }
                last = Some(Ok(v));
            }
            Err(e) => last = Some(Err(e.to_string())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql}: wanted {want} within {timeout:?}, last saw {last:?}");
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory, a free port), so the
/// test can stop and start it without disturbing other tests.
#[derive(Debug)]
pub struct PrivatePg {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn pg_bin(tool: &str) -> PathBuf {
    let base = std::env::var("METERD_TEST_PG_BIN")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned());
    Path::new(&base).join(tool)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs a PostgreSQL tool, as the `postgres` user when the tests run as root (PostgreSQL
/// refuses to run as root).
fn run_pg_tool(tool: &str, args: &[&str]) {
    let bin = pg_bin(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let out = cmd.args(args).output().unwrap_or_else(|e| {
        panic!(
            "running {}: {e} (is PostgreSQL 15 installed?)",
            bin.display()
        )
    });
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PrivatePg {
    /// initdb and start a server on a free port, with user `meterd` (trust authentication on
    /// loopback).
    pub fn start() -> PrivatePg {
        let dir = tempfile::Builder::new()
            .prefix("meterd-pg-")
            .tempdir()
            .expect("tempdir");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown of the private PostgreSQL directory"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let data = dir.path().join("data");
        let data_s = data.to_string_lossy().into_owned();
        run_pg_tool(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "meterd",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let pg = PrivatePg { dir, port };
        pg.start_server();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        run_pg_tool(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server the hard way (`immediate`: like a crash, no checkpoint).
    pub fn stop_server(&self) {
        run_pg_tool(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// The administrative URL.
    pub fn url(&self) -> String {
        format!("postgres://meterd@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let bin = pg_bin("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&bin)
                .args(args)
                .output()
        } else {
            Command::new(&bin).args(args).output()
        };
    }
}
