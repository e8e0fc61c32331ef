//! The command line: bad configuration exits with code 2 before anything starts, configuration
//! precedence, and `meterd gen` output.

mod common;

use std::process::{Command, Output};

use common::Server;

fn meterd(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meterd"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("METERD_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run meterd")
}

fn assert_bad_config(out: &Output, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(message),
        "expected {message:?} in stderr:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is listening, so nothing on stdout"
    );
}

#[test]
fn bad_configuration_exits_with_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");

    let out = meterd(&["serve", "--listen", "0.0.0.0:0", "--data-dir", data], &[]);
    assert_bad_config(&out, "API keys");

    let config = dir.path().join("meterd.toml");
    std::fs::write(&config, "listn = \"127.0.0.1:0\"\n").expect("write config");
    let out = meterd(
        &[
            "serve",
            "--config",
            config.to_str().expect("utf-8"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert_bad_config(&out, "listn");

    let out = meterd(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--query-timeout-secs",
            "0",
        ],
        &[],
    );
    assert_bad_config(&out, "query_timeout_secs");

    let out = meterd(
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", data],
        &[("METERD_QUERY_MAX_ROWS", "0")],
    );
    assert_bad_config(&out, "query_max_rows");

    let missing = dir.path().join("no-such.toml");
    let out = meterd(
        &[
            "serve",
            "--config",
            missing.to_str().expect("utf-8"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert_bad_config(&out, "no-such.toml");

    std::fs::write(
        &config,
        "[[api_keys]]\nname = \"k\"\nkey_env = \"METERD_TEST_UNSET_KEY\"\n",
    )
    .expect("write config");
    let out = meterd(
        &[
            "serve",
            "--config",
            config.to_str().expect("utf-8"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert_bad_config(&out, "METERD_TEST_UNSET_KEY");
}

#[tokio::test]
async fn flags_beat_environment_beat_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("meterd.toml");
    std::fs::write(
        &config,
        "query_max_rows = 1\nmax_body_bytes = 100\nquery_timeout_secs = 20.0\n",
    )
    .expect("write config");
    // Row cap: file 1, environment 2, flag 3, so the flag wins. Body limit: file 100,
    // environment 150, so the environment wins.
    let server = Server::start_with_env(
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--query-max-rows",
            "3",
        ],
        &[
            ("METERD_QUERY_MAX_ROWS", "2"),
            ("METERD_MAX_BODY_BYTES", "150"),
        ],
    );
    let capped = server
        .sql_reply("SELECT * FROM generate_series(1, 4)")
        .await;
    assert_eq!(
        capped.status,
        reqwest::StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        capped.text
    );
    assert!(
        capped.error().contains("more than 3 rows"),
        "{}",
        capped.text
    );
    let three = server.sql("SELECT * FROM generate_series(1, 3)").await;
    assert_eq!(three["rows"].as_array().map(Vec::len), Some(3));
    let big = server
        .post_events(vec![b' '; 200], common::JSON, false)
        .await;
    assert_eq!(
        big.status,
        reqwest::StatusCode::PAYLOAD_TOO_LARGE,
        "{big:?}"
    );
    assert_eq!(big.error(), "body is larger than 150 bytes");
}

#[test]
fn gen_is_deterministic() {
    let end = chrono::Utc::now() - chrono::Duration::hours(1);
    let start = end - chrono::Duration::days(3);
    let (start, end) = (common::rfc3339(start), common::rfc3339(end));
    let args = [
        "gen",
        "--seed",
        "42",
        "--events",
        "2000",
        "--tenants",
        "5",
        "--start",
        start.as_str(),
        "--end",
        end.as_str(),
        "--duplicates",
        "0.1",
        "--out",
        "-",
    ];
    let a = meterd(&args, &[]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = meterd(&args, &[]);
    assert_eq!(a.stdout, b.stdout, "same seed and range, same events");

    let text = String::from_utf8(a.stdout).expect("utf-8");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON event"))
        .collect();
    assert_eq!(events.len(), 2000);
    let keys = common::distinct_keys(&events);
    assert!(
        keys.len() < events.len() && keys.len() > 1_500,
        "about 10% re-sends: {} distinct",
        keys.len()
    );
    let tenants: std::collections::HashSet<&str> =
        events.iter().filter_map(|e| e["tenant"].as_str()).collect();
    assert!(tenants.len() <= 5, "{tenants:?}");

    let other_seed: Vec<&str> = args
        .iter()
        .map(|a| if *a == "42" { "43" } else { *a })
        .collect();
    let c = meterd(&other_seed, &[]);
    assert!(c.status.success());
    assert_ne!(c.stdout, b.stdout, "another seed, other events");
}

#[tokio::test]
async fn gen_output_is_accepted_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("events.ndjson");
    let end = chrono::Utc::now() - chrono::Duration::minutes(1);
    let start = end - chrono::Duration::days(30);
    let (start, end) = (common::rfc3339(start), common::rfc3339(end));
    let generator_run = meterd(
        &[
            "gen",
            "--seed",
            "9",
            "--events",
            "3000",
            "--tenants",
            "3",
            "--start",
            start.as_str(),
            "--end",
            end.as_str(),
            "--duplicates",
            "0.05",
            "--out",
            out.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(
        generator_run.status.success(),
        "{}",
        String::from_utf8_lossy(&generator_run.stderr)
    );
    let body = std::fs::read(&out).expect("gen wrote the file");
    let events: Vec<serde_json::Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("JSON"))
        .collect();
    assert_eq!(events.len(), 3000);

    let server = Server::start(&[]);
    let reply = server.post_events(body, common::NDJSON, false).await;
    let distinct = common::distinct_keys(&events).len() as u64;
    assert_eq!(
        reply.accepted(),
        distinct,
        "every generated event is valid: {reply:?}"
    );
    assert_eq!(reply.duplicates(), 3000 - distinct);
    assert_eq!(server.count("true").await, distinct);
}

#[tokio::test]
async fn gen_posts_to_a_running_server() {
    let server = Server::start(&[]);
    let end = chrono::Utc::now() - chrono::Duration::minutes(1);
    let start = end - chrono::Duration::days(2);
    let (start, end) = (common::rfc3339(start), common::rfc3339(end));
    let args: Vec<String> = [
        "gen",
        "--seed",
        "5",
        "--events",
        "2500",
        "--tenants",
        "4",
        "--start",
        start.as_str(),
        "--end",
        end.as_str(),
        "--duplicates",
        "0",
        "--url",
        server.url.as_str(),
        "--batch",
        "300",
        "--concurrency",
        "3",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        meterd(&args, &[])
    })
    .await
    .expect("gen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.count("true").await, 2500);
}
