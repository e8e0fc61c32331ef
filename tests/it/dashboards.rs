//! `dashboards/`: the Prometheus rules pass promtool and their unit tests; the Grafana
//! dashboards are well formed; and a real Prometheus scraping a real meterd (fed by `meterd
//! gen`, delivering to PostgreSQL) runs every panel's expression and every rule, each
//! returning data, while the BI dashboard's SQL returns rows from the real rollups.

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use common::pg::{self, TestDb};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn promtool() -> String {
    std::env::var("METERD_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".to_owned())
}

fn prometheus_binary() -> String {
    std::env::var("METERD_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".to_owned())
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir().join("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {program}: {e}. Debian's prometheus package has it; scripts/test.sh \
                 installs it"
            )
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}: {said}");
    said
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    run(&promtool(), &["check", "rules", "meterd.rules.yml"]);
    run(&promtool(), &["test", "rules", "meterd.rules.test.yml"]);
    run(&promtool(), &["check", "config", "prometheus.yml"]);
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(dir().join("prometheus/meterd.rules.yml")).expect("rules");
    let tests =
        std::fs::read_to_string(dir().join("prometheus/meterd.rules.test.yml")).expect("tests");
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir().join("grafana")).expect("dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read");
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.display().to_string(), json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 4, "usage, SLOs, health, BI");
    out
}

fn panels(d: &Value) -> Vec<&Value> {
    d["panels"]
        .as_array()
        .map(|p| p.iter().collect())
        .unwrap_or_default()
}

/// Every panel's PromQL, with the dashboard's variables given the values "All" gives them.
fn promql(d: &Value) -> Vec<String> {
    panels(d)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .map(|e| {
            e.replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$tenant", ".*")
                .replace("$slo", ".*")
        })
        .collect()
}

#[test]
fn the_dashboards_are_well_formed() {
    let mut uids = HashSet::new();
    for (path, d) in dashboards() {
        assert!(
            uids.insert(d["uid"].as_str().expect("uid").to_owned()),
            "{path}: uid"
        );
        assert!(
            d["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{path}"
        );
        let variables: Vec<&str> = d["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        let mut ids = HashSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(
                ids.insert(p["id"].as_u64().expect("id")),
                "{path}: {title}: id"
            );
            assert!(
                p["description"].as_str().is_some_and(|s| !s.is_empty()),
                "{path}: {title}: no description"
            );
            let mut sources = vec![p["datasource"].clone()];
            sources.extend(
                p["targets"]
                    .as_array()
                    .expect("targets")
                    .iter()
                    .map(|t| t["datasource"].clone()),
            );
            for s in sources {
                // Data sources are variables of the dashboard, never a fixed uid.
                let uid = s["uid"].as_str().unwrap_or_default();
                let name = uid.trim_start_matches("${").trim_end_matches('}');
                assert!(
                    uid.starts_with("${") && variables.contains(&name),
                    "{path}: {title}: data source {s}"
                );
            }
        }
    }
}

/// Runs `dashboards/schema-check/check.mjs` (TypeScript's compiler and `@grafana/schema`,
/// installed by `npm ci --prefix dashboards/schema-check`) on `files`.
fn grafana_schema_check(files: &[PathBuf]) -> (bool, String) {
    let check = dir().join("schema-check");
    assert!(
        check.join("node_modules/@grafana/schema").is_dir()
            && check.join("node_modules/typescript").is_dir(),
        "@grafana/schema is not installed: npm ci --prefix dashboards/schema-check (scripts/test.sh \
         does it)"
    );
    let out = Command::new("node")
        .arg(check.join("check.mjs"))
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("running node: {e}; scripts/test.sh installs Node.js"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every dashboard is a `Dashboard` of Grafana's own schema (`@grafana/schema` from npm, checked
/// by TypeScript's compiler); a dashboard with a wrong field fails the same check, named.
#[test]
fn the_dashboards_match_grafanas_schema() {
    let files: Vec<PathBuf> = dashboards()
        .into_iter()
        .map(|(path, _)| PathBuf::from(path))
        .collect();
    assert_eq!(files.len(), 4, "{files:?}");
    let (ok, said) = grafana_schema_check(&files);
    assert!(ok, "{said}");
    let work = tempfile::tempdir().expect("tempdir");
    let (_, mut broken) = dashboards().remove(0);
    broken["panels"][0]["gridPos"]["w"] = Value::from("wide");
    broken["refresh"] = Value::from(30);
    let path = work.path().join("broken.json");
    std::fs::write(&path, broken.to_string()).expect("write");
    let (ok, said) = grafana_schema_check(&[path]);
    assert!(!ok, "{said}");
    // The panel's width (a number) and the refresh interval (a string such as "30s").
    assert!(
        said.contains("broken.json")
            && said.contains("'string' is not assignable to type 'number'")
            && said.contains("'number' is not assignable to type 'string'"),
        "{said}"
    );
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let rules = dir().join("prometheus/meterd.rules.yml");
        let work = tempfile::tempdir().expect("dir");
        let config = work.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: meterd\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .expect("config");
        let port = free_port();
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e}. Debian's prometheus package has it; scripts/test.sh \
                     installs it (or set METERD_TEST_PROMETHEUS)",
                    prometheus_binary()
                )
            });
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: work,
        }
    }

    async fn query(&self, expr: &str) -> Value {
        let response = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await;
        match response {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Waits until `expr` returns data; the last answer otherwise.
    async fn data(&self, expr: &str, within: Duration) -> Value {
        let until = Instant::now() + within;
        loop {
            let answer = self.query(expr).await;
            let has_data = answer["status"] == "success"
                && answer["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty());
            if has_data || Instant::now() > until {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_runs_every_panel_and_rule_with_data() {
    let db = TestDb::create("dashboards").await;
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        "[[slos]]\nname = \"api-availability\"\ntype = \"api.request\"\n\
         good = \"status_code < 500\"\nobjective = 0.99\nwindow = \"1d\"\n\n\
         [[prices]]\nprovider = \"openai\"\nmodel = \"gpt-4o\"\n\
         effective_from = \"2020-01-01T00:00:00Z\"\n\
         input_per_million = \"2.50\"\noutput_per_million = \"10\"\n",
    )
    .expect("write");
    let mut server = Server::start(&[
        "--config",
        &config.path().display().to_string(),
        "--postgres-url",
        &db.url,
    ]);
    // Fed by `meterd gen`, as a user would; restarted so the SLO gauges (counted at startup
    // and every 30 s) count those events, then fed again for the counters of this process.
    let feed = |url: &str, seed: &str| {
        let fed = Command::new(env!("CARGO_BIN_EXE_meterd"))
            .args(["gen", "--seed", seed, "--events", "3000", "--tenants", "30"])
            .args(["--url", url, "--batch", "500"])
            .output()
            .expect("meterd gen");
        assert!(
            fed.status.success(),
            "meterd gen: {}",
            String::from_utf8_lossy(&fed.stderr)
        );
    };
    feed(&server.url, "3");
    server.stop();
    server.restart();
    feed(&server.url, "4");
    let target = server.url.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&target);

    // Every meterd_ name used anywhere in dashboards/ is exported. The SLO gauges appear once
    // an evaluation (at startup, then every 30 s) counts events the store has received: the
    // first one may run before the sink delivered the events of before the restart.
    let mut scrape = String::new();
    for _ in 0..90 {
        scrape = crate::metrics::scrape(&server).await;
        if scrape.contains("# TYPE meterd_slo_sli ") {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut used = BTreeSet::new();
    let mut texts =
        vec![std::fs::read_to_string(dir().join("prometheus/meterd.rules.yml")).expect("rules")];
    texts.extend(dashboards().into_iter().map(|(_, d)| d.to_string()));
    for text in &texts {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("meterd_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| exported.contains(f))
                .map_or(name.clone(), str::to_owned);
            used.insert(family);
        }
    }
    assert!(used.len() > 15, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name.as_str()),
            "{name} is not exported:\n{scrape}"
        );
    }

    // Every panel's expression returns data.
    for (path, d) in dashboards() {
        for expr in promql(&d) {
            let answer = prometheus.data(&expr, Duration::from_secs(60)).await;
            assert_eq!(answer["status"], "success", "{path}: {expr}: {answer}");
            assert!(
                answer["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty()),
                "{path}: {expr} returned no data: {answer}"
            );
        }
    }
    // Every rule is evaluated without error; every recorded series has data.
    let until = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let rules: Value = reqwest::get(format!("{}/api/v1/rules", prometheus.url))
            .await
            .expect("rules")
            .json()
            .await
            .expect("json");
        let all: Vec<Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !all.is_empty()
            && all.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        if evaluated || Instant::now() > until {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(rules.len(), 13, "{rules:?}");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        if rule["type"] == "recording" {
            let name = rule["name"].as_str().expect("name");
            let answer = prometheus.data(name, Duration::from_secs(30)).await;
            assert!(
                answer["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty()),
                "{name} recorded nothing: {answer}"
            );
        }
    }

    // The BI dashboard's SQL returns rows from the real rollups.
    let client = db.client().await;
    let accepted = pg::int(&client, "SELECT count(*) FROM meterd.events").await;
    assert!(accepted > 0);
    for (path, d) in dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(sql) = t["rawSql"].as_str() else {
                    continue;
                };
                let sql = sql.replace(
                    "$__timeFilter(bucket)",
                    "bucket >= now() - interval '30 days'",
                );
                let rows = client
                    .query(&sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{path}: {sql}: {e}"));
                assert!(!rows.is_empty(), "{path}: {sql} returned no rows");
            }
        }
    }
}
