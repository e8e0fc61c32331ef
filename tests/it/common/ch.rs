//! ClickHouse for the integration tests: a server of the test's own (`clickhouse-server` from
//! Debian's package, installed by scripts/test.sh), in a temporary directory on free ports, so
//! a test can kill and restart it without disturbing other tests. Queries go over the HTTP
//! interface with reqwest, independently of meterd's own client.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Whether the server on `port` answers `GET /ping` with `Ok.`.
fn pings(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

/// `clickhouse-server`: `METERD_TEST_CLICKHOUSE_SERVER`, else Debian's `/usr/sbin` one (not
/// always on a non-root `PATH`), else whatever `PATH` finds.
fn server_binary() -> String {
    std::env::var("METERD_TEST_CLICKHOUSE_SERVER").unwrap_or_else(|_| {
        let debian = "/usr/sbin/clickhouse-server";
        if std::path::Path::new(debian).exists() {
            debian.to_owned()
        } else {
            "clickhouse-server".to_owned()
        }
    })
}

/// A private `clickhouse-server`.
#[derive(Debug)]
pub struct PrivateClickHouse {
    dir: tempfile::TempDir,
    pub http_port: u16,
    child: Option<Child>,
}

impl PrivateClickHouse {
    /// Writes a configuration and starts the server, waiting until it answers.
    pub fn start() -> PrivateClickHouse {
        let dir = tempfile::Builder::new()
            .prefix("meterd-ch-")
            .tempdir()
            .expect("tempdir");
        let http_port = free_port();
        let tcp_port = free_port();
        let path = dir.path().display();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{path}/server.log</log>
        <errorlog>{path}/server.err.log</errorlog>
        <console>0</console>
    </logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{path}/data/</path>
    <tmp_path>{path}/data/tmp/</tmp_path>
    <user_files_path>{path}/data/user_files/</user_files_path>
    <format_schema_path>{path}/data/format_schemas/</format_schema_path>
    <users_config>/etc/clickhouse-server/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#
        );
        std::fs::write(dir.path().join("config.xml"), config).expect("write config");
        let mut ch = PrivateClickHouse {
            dir,
            http_port,
            child: None,
        };
        ch.start_server();
        ch
    }

    /// Starts the (stopped) server on the same data and waits until it answers.
    pub fn start_server(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let out = std::fs::File::create(self.dir.path().join("stdout.log")).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(server_binary())
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting clickhouse-server: {e}. The tests need a real ClickHouse; \
                     `bash scripts/test.sh` installs Debian's clickhouse-server"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if pings(self.http_port) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "clickhouse-server exited with {status}: {}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "clickhouse-server did not answer within 60 s: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        for name in ["stdout.log", "server.err.log"] {
            if let Ok(t) = std::fs::read_to_string(self.dir.path().join(name)) {
                let start = t.len().saturating_sub(2_000);
                text.push_str(t.get(start..).unwrap_or(&t));
            }
        }
        text
    }

    /// Kills the server with SIGKILL: a crash, whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The HTTP interface, for meterd's `--clickhouse-url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A database name of the test's own.
pub fn database(test: &str) -> String {
    format!("meterd_{test}_{}", std::process::id())
}

async fn post(url: &str, sql: &str) -> Result<String, String> {
    let response = reqwest::Client::new()
        .post(format!("{url}/?output_format_json_quote_64bit_integers=0"))
        .body(sql.to_owned())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| format!("{e}"))?;
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("{status}: {text}"))
    }
}

/// Runs a statement, failing the test on an error.
/// Runs a statement; the server's error, if any.
pub async fn try_exec(url: &str, sql: &str) -> Result<String, String> {
    post(url, sql).await
}

pub async fn exec(url: &str, sql: &str) {
    if let Err(e) = post(url, sql).await {
        panic!("{sql}: {e}");
    }
}

/// The rows of a query, as JSON values (64-bit integers as numbers).
pub async fn rows(url: &str, sql: &str) -> Vec<Vec<Value>> {
    try_rows(url, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Like [`rows`], with the server's error instead of a panic.
pub async fn try_rows(url: &str, sql: &str) -> Result<Vec<Vec<Value>>, String> {
    let text = post(url, &format!("{sql} FORMAT JSONCompact")).await?;
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    Ok(body["data"]
        .as_array()
        .ok_or_else(|| format!("no data in {text}"))?
        .iter()
        .map(|r| r.as_array().cloned().unwrap_or_default())
        .collect())
}

/// A single integer.
pub async fn int(url: &str, sql: &str) -> i64 {
    let rows = rows(url, sql).await;
    rows.first()
        .and_then(|r| r.first())
        .and_then(|v| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .unwrap_or_else(|| panic!("{sql}: not an integer: {rows:?}"))
}

/// Waits until `sql` gives `want`, failing after `timeout`. Errors (a restarting server) count
/// as not yet.
pub async fn wait_for(url: &str, sql: &str, want: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match post(url, &format!("{sql} FORMAT TabSeparated")).await {
            Ok(text) if text.trim().parse::<i64>().ok() == Some(want) => return,
            Ok(text) => last = text.trim().to_owned(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql}: wanted {want} within {timeout:?}, last saw {last:?}");
}

pub const BOUNDS: [i64; 13] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// A raw GROUP BY over `events`, written here independently of meterd's views, in the rollup
/// relations' column order.
pub fn raw_group_by(db: &str, bucket: &str) -> String {
    let mut cols = vec![
        format!("toString({bucket}(toDateTime(time, 'UTC'))) AS b"),
        "tenant AS t".to_owned(),
        "type AS ty".to_owned(),
        "ifNull(provider, '') AS p".to_owned(),
        "ifNull(model, '') AS m".to_owned(),
        "ifNull(agent, '') AS a".to_owned(),
        "ifNull(route, '') AS r".to_owned(),
        "multiIf(type = 'api.request', concat(toString(intDiv(assumeNotNull(status_code), 100)), \
         'xx'), isNull(status), '', assumeNotNull(status)) AS sc"
            .to_owned(),
        "count()".to_owned(),
    ];
    for c in [
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
    ] {
        cols.push(format!("sum(ifNull({c}, 0))"));
    }
    cols.push(
        "countIf(type = 'api.request' AND ifNull(status_code, 0) >= 500 \
         OR type = 'llm.usage' AND ifNull(status, '') = 'error' \
         OR type = 'agent.run' AND ifNull(status, '') IN ('failed', 'timeout'))"
            .to_owned(),
    );
    cols.push("countIf(isNotNull(latency_ms))".to_owned());
    cols.push("sum(ifNull(latency_ms, 0))".to_owned());
    cols.push("countIf(isNotNull(duration_ms))".to_owned());
    cols.push("sum(ifNull(duration_ms, 0))".to_owned());
    for b in BOUNDS {
        cols.push(format!(
            "countIf(isNotNull(latency_ms) AND assumeNotNull(latency_ms) <= {b})"
        ));
    }
    format!(
        "SELECT {} FROM {db}.events GROUP BY b, t, ty, p, m, a, r, sc",
        cols.join(", ")
    )
}

/// Every row of a rollup relation, bucket as text.
pub fn rollup_rows(db: &str, relation: &str) -> String {
    let mut cols = vec![
        "toString(bucket)",
        "tenant",
        "type",
        "provider",
        "model",
        "agent",
        "route",
        "status_class",
        "events",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "errors",
        "latency_count",
        "latency_ms_sum",
        "duration_count",
        "duration_ms_sum",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    cols.extend(BOUNDS.iter().map(|b| format!("latency_le_{b}")));
    format!("SELECT {} FROM {db}.{relation}", cols.join(", "))
}

pub fn normalised(rows: Vec<Vec<Value>>) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    rows.sort();
    rows
}
