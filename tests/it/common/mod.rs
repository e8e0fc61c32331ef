//! Shared harness of the integration tests: runs the real `meterd` binary on port 0 with its own
//! data directory, and talks to it over HTTP like any client would.
//!
//! Every test starts its own server, so tests run in parallel and never share state.

pub mod ch;
pub mod pg;
pub mod rollups;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use meterd::loadgen::{GenConfig, Generator};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap};
use serde_json::{Value, json};

/// How long a server may take to print its listening line. Generous: CI machines are shared.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful shutdown may take before the test fails.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request timeout of the test client, so a hung server fails the test instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub const NDJSON: &str = "application/x-ndjson";
pub const JSON: &str = "application/json";
pub const CLOUDEVENT: &str = "application/cloudevents+json";
pub const CLOUDEVENTS_BATCH: &str = "application/cloudevents-batch+json";

/// A running (or stopped) `meterd serve` with its own data directory.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` of the current process.
    pub url: String,
    /// Holds the data directory and the stderr logs; removed when the server is dropped.
    root: tempfile::TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    starts: usize,
    pub client: reqwest::Client,
}

/// What `POST /v1/events` answered.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as JSON (`Value::Null` if it was not JSON).
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// `accepted` of a 200 answer; panics with the whole answer otherwise.
    pub fn accepted(&self) -> u64 {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {self:?}");
        self.json["accepted"]
            .as_u64()
            .unwrap_or_else(|| panic!("no accepted in {self:?}"))
    }

    /// `duplicates` of a 200 answer.
    pub fn duplicates(&self) -> u64 {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {self:?}");
        self.json["duplicates"]
            .as_u64()
            .unwrap_or_else(|| panic!("no duplicates in {self:?}"))
    }

    /// `conflicts` of a 200 answer, as strings.
    pub fn conflicts(&self) -> Vec<String> {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {self:?}");
        self.json["conflicts"]
            .as_array()
            .unwrap_or_else(|| panic!("no conflicts in {self:?}"))
            .iter()
            .map(|c| c.as_str().expect("conflict ids are strings").to_owned())
            .collect()
    }

    /// The `error` text of an error answer.
    pub fn error(&self) -> &str {
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text in {self:?}"))
    }

    /// Asserts the answer lists `field` with a reason containing `reason_part`.
    pub fn assert_field_error(&self, field: &str, reason_part: &str) {
        let errors = self.json["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors list in {self:?}"));
        assert!(
            errors.iter().any(|e| e["field"] == field
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(reason_part))),
            "expected an error on {field:?} containing {reason_part:?}, got {}",
            self.text
        );
    }
}

impl Server {
    /// Starts `meterd serve --listen 127.0.0.1:0 --data-dir <fresh dir>` plus `args`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with `METERD_*` variables set for the process.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::start_in(None, args, envs)
    }

    /// Like [`Server::start`], on a copy of the data directory `data` (a fixture: the copy is
    /// what the server changes).
    pub fn start_from(data: &Path, args: &[&str]) -> Server {
        Server::start_in(Some(data), args, &[])
    }

    fn start_in(from: Option<&Path>, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let root = tempfile::Builder::new()
            .prefix("meterd-test-")
            .tempdir()
            .expect("temp dir");
        match from {
            Some(data) => copy_dir(data, &root.path().join("data")),
            None => std::fs::create_dir(root.path().join("data")).expect("data dir"),
        }
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("http client");
        let mut server = Server {
            child: None,
            url: String::new(),
            root,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            starts: 0,
            client,
        };
        server.spawn();
        server
    }

    /// The data directory, the same across restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn stderr_path(&self, start: usize) -> PathBuf {
        self.root.path().join(format!("stderr-{start}.log"))
    }

    /// Replaces the arguments the next (re)start passes.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Starts the process again on the same data directory (after [`Server::kill`] or
    /// [`Server::stop`]); the port may change.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart needs a stopped server");
        self.spawn();
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let stderr = std::fs::File::create(self.stderr_path(self.starts)).expect("stderr log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_meterd"));
        // Only what the test sets: a developer's own METERD_* settings must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("METERD_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("METERD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn meterd");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            // The receiver may be gone after a timeout; then nobody needs the line.
            let _ = tx.send(first);
            // Keep draining so a chatty server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                // Still running after the timeout, or exited: either way it did not start.
                let _ = child.kill();
                let status = child.wait().expect("wait for meterd");
                panic!(
                    "meterd did not print its listening line ({other:?}, {status}); stderr:\n{}",
                    self.stderr_tail(self.starts)
                );
            }
        };
        let url = line
            .strip_prefix("meterd listening on ")
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "unexpected listening address in {line:?}"
        );
        self.url = url.to_owned();
        self.child = Some(child);
    }

    /// The last lines the current (or last) process wrote to stderr, for failure messages.
    pub fn stderr_tail(&self, start: usize) -> String {
        let text = std::fs::read_to_string(self.stderr_path(start)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The whole stderr of the current (or last) process.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path(self.starts)).unwrap_or_default()
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server is running");
        // Child::kill sends SIGKILL on unix.
        child.kill().expect("SIGKILL meterd");
        child.wait().expect("wait for meterd");
    }

    /// SIGTERM, then waits for the process to exit; returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM meterd");
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for meterd") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "meterd did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr_tail(self.starts)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Whether the process is still running (it has not crashed).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// `POST /v1/events` with `content_type`, gzip-compressing the body if asked.
    pub async fn post_events(
        &self,
        body: impl Into<Vec<u8>>,
        content_type: &str,
        gzip: bool,
    ) -> Reply {
        self.try_post_events(body, content_type, gzip)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "POST /v1/events failed: {e}; stderr:\n{}",
                    self.stderr_tail(self.starts)
                )
            })
    }

    /// Like [`Server::post_events`], but a transport error (server gone) is returned.
    pub async fn try_post_events(
        &self,
        body: impl Into<Vec<u8>>,
        content_type: &str,
        gzip: bool,
    ) -> reqwest::Result<Reply> {
        let mut body = body.into();
        let mut request = self
            .client
            .post(format!("{}/v1/events", self.url))
            .header(CONTENT_TYPE, content_type);
        if gzip {
            body = gzip_bytes(&body);
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        reply(request.body(body).send().await?).await
    }

    /// Sends `body` as is, with the given `Content-Encoding` (nothing is compressed here).
    pub async fn try_post_events_raw(
        &self,
        body: impl Into<Vec<u8>>,
        content_type: &str,
        content_encoding: Option<&str>,
    ) -> reqwest::Result<Reply> {
        let mut request = self
            .client
            .post(format!("{}/v1/events", self.url))
            .header(CONTENT_TYPE, content_type);
        if let Some(encoding) = content_encoding {
            request = request.header(CONTENT_ENCODING, encoding);
        }
        reply(request.body(body.into()).send().await?).await
    }

    /// Posts events as one JSON array.
    pub async fn post_json(&self, events: &[Value]) -> Reply {
        self.post_events(serde_json::to_vec(events).expect("serialize"), JSON, false)
            .await
    }

    /// Posts events as NDJSON.
    pub async fn post_ndjson(&self, events: &[Value]) -> Reply {
        self.post_events(ndjson(events), NDJSON, false).await
    }

    /// `POST /v1/sql`; returns the raw response (any status).
    pub async fn sql_response(&self, query: &str, format: Option<&str>) -> reqwest::Response {
        let mut url = format!("{}/v1/sql", self.url);
        if let Some(f) = format {
            url.push_str("?format=");
            url.push_str(f);
        }
        self.client
            .post(url)
            .header(CONTENT_TYPE, JSON)
            .json(&json!({ "sql": query }))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "POST /v1/sql failed: {e}; stderr:\n{}",
                    self.stderr_tail(self.starts)
                )
            })
    }

    /// `POST /v1/sql` returning the status and the JSON body.
    pub async fn sql_reply(&self, query: &str) -> Reply {
        reply(self.sql_response(query, None).await)
            .await
            .expect("read the SQL answer")
    }

    /// Runs `query`, which must succeed; returns `{"columns": ..., "rows": ...}`.
    pub async fn sql(&self, query: &str) -> Value {
        let r = self.sql_reply(query).await;
        assert_eq!(r.status, StatusCode::OK, "SQL {query:?} failed: {}", r.text);
        r.json
    }

    /// The rows of `query`.
    pub async fn rows(&self, query: &str) -> Vec<Vec<Value>> {
        let v = self.sql(query).await;
        serde_json::from_value(v["rows"].clone()).expect("rows are arrays")
    }

    /// The single value of a one-row, one-column query.
    pub async fn scalar(&self, query: &str) -> Value {
        let rows = self.rows(query).await;
        assert_eq!(rows.len(), 1, "{query:?} returned {rows:?}");
        assert_eq!(rows[0].len(), 1, "{query:?} returned {rows:?}");
        rows[0][0].clone()
    }

    /// `SELECT count(*) FROM events WHERE <filter>` (`"true"` for all).
    pub async fn count(&self, filter: &str) -> u64 {
        let v = self
            .scalar(&format!("SELECT count(*) FROM events WHERE {filter}"))
            .await;
        v.as_u64()
            .unwrap_or_else(|| panic!("count is not an integer: {v}"))
    }

    /// `GET path`, returning the status.
    pub async fn get_status(&self, path: &str) -> StatusCode {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET")
            .status()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- meterd stderr (last start) ---\n{}",
                self.stderr_tail(self.starts)
            );
        }
    }
}

async fn reply(response: reqwest::Response) -> reqwest::Result<Reply> {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        headers,
        json,
        text,
    })
}

/// gzip at the default level.
pub fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// One JSON object per line.
pub fn ndjson(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        serde_json::to_writer(&mut out, e).expect("serialize");
        out.push(b'\n');
    }
    out
}

/// RFC 3339 in UTC with milliseconds, as events carry it.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `now - ago`, truncated to whole milliseconds.
pub fn ago(ago: Duration) -> DateTime<Utc> {
    let t = Utc::now() - chrono::Duration::from_std(ago).expect("duration");
    DateTime::from_timestamp_millis(t.timestamp_millis()).expect("in range")
}

/// A valid `llm.usage` event from a minute ago.
pub fn llm_event(tenant: &str, id: &str, input_tokens: i64, output_tokens: i64) -> Value {
    json!({
        "id": id,
        "tenant": tenant,
        "type": "llm.usage",
        "time": rfc3339(ago(Duration::from_secs(60))),
        "subject": "user-17",
        "source": "support-bot",
        "dimensions": {"department": "customer_service", "agent": "faq"},
        "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": input_tokens,
                 "output_tokens": output_tokens, "cached_input_tokens": 0, "reasoning_tokens": 0,
                 "latency_ms": 830, "status": "ok", "run_id": "run-42"}
    })
}

/// `n` generated events (seeded, so reproducible), spread over the last `span`, with a share
/// `duplicates` of exact re-sends.
pub fn generated(seed: u64, n: usize, tenants: u32, span: Duration, duplicates: f64) -> Vec<Value> {
    // Keep clear of both edges of the accepted window: nothing in the future, nothing that ages
    // out of the 400 days while the test runs.
    let end = Utc::now() - chrono::Duration::seconds(5);
    let start = end - chrono::Duration::from_std(span).expect("span");
    let mut generator = Generator::new(GenConfig {
        seed,
        events: n as u64,
        tenants,
        start,
        end,
        duplicates,
    });
    let mut out = Vec::with_capacity(n);
    while let Some(e) = generator.next_event() {
        out.push(e);
    }
    assert_eq!(
        out.len(),
        n,
        "the generator yields exactly the requested number of events"
    );
    out
}

/// Gives each event an id unique to `prefix`, so batches never collide by accident.
pub fn renamed(events: &mut [Value], prefix: &str) {
    for (i, e) in events.iter_mut().enumerate() {
        e["id"] = Value::String(format!("{prefix}-{i}"));
    }
}

/// What a writer sent and what meterd acknowledged.
#[derive(Debug, Default)]
pub struct Sent {
    pub sent: HashSet<(String, String)>,
    pub acked: HashSet<(String, String)>,
}

/// Posts batches until the server stops answering.
pub async fn post_until_gone(url: String, prefix: String) -> Sent {
    let http = reqwest::Client::new();
    let mut out = Sent::default();
    for round in 0..10_000u64 {
        let mut batch = generated(round, 200, 5, Duration::from_secs(5 * 86_400), 0.0);
        renamed(&mut batch, &format!("{prefix}-{round}"));
        let keys = distinct_keys(&batch);
        // A request cut off by the kill may still have been made durable: sent, not acked.
        out.sent.extend(keys.iter().cloned());
        let answer = http
            .post(format!("{url}/v1/events"))
            .header("content-type", NDJSON)
            .body(ndjson(&batch))
            .send()
            .await;
        match answer {
            Ok(r) if r.status() == StatusCode::OK => out.acked.extend(keys),
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(r) => panic!("unexpected answer {}", r.status()),
            Err(_) => break,
        }
    }
    out
}

/// The `(tenant, id)` keys of `events`, without repeats.
pub fn distinct_keys(events: &[Value]) -> std::collections::HashSet<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["tenant"].as_str().expect("tenant").to_owned(),
                e["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect()
}

/// Files under `dir` (recursively) whose name ends with `suffix`.
pub fn files_ending_with(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                out.push(path);
            }
        }
    }
    out
}

/// The Python interpreter of tests/clients/.venv, where scripts/test.sh installs the third-party
/// clients (CloudEvents SDK, DuckDB, pandas, polars, pyarrow, schemathesis). A test that drives
/// them fails without it rather than skip.
pub fn clients_python() -> String {
    std::env::var("METERD_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/.venv/bin/python"
        );
        assert!(
            Path::new(venv).exists(),
            "no Python with the test clients: run `bash scripts/test.sh` (it creates \
             tests/clients/.venv) or set METERD_TEST_PYTHON"
        );
        venv.to_owned()
    })
}

/// A SQL string literal (PostgreSQL's and DataFusion's quoting).
pub fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Copies the directory `from` to `to`, which must not exist, with everything below it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()))
    {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}
