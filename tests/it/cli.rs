//! The command line: bad configuration exits with code 2 before anything starts, configuration
//! precedence, and `meterd gen` output.

use crate::common;

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

/// The quickstart section of the README: its `sh` code blocks, in order.
fn readme_quickstart_blocks() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("## Quickstart")
        .expect("README has a Quickstart section");
    let section = &readme[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let section = &section[..end];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("```").expect("closed code block");
        blocks.push(body[..close].to_owned());
        rest = &body[close + 3..];
    }
    blocks
}

/// Splits a code block into its commands, each with the output the README shows for it (the
/// `# ...` lines after it; `...` stands for text left out).
fn commands_and_outputs(block: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut command = String::new();
    for line in block.lines() {
        if let Some(expected) = line.strip_prefix("# ") {
            assert!(
                !command.trim().is_empty(),
                "an output with no command before it"
            );
            out.push((std::mem::take(&mut command), expected.to_owned()));
        } else {
            command.push_str(line);
            command.push('\n');
        }
    }
    assert!(
        command.trim().is_empty(),
        "a command without its output: {command}"
    );
    out
}

/// Whether `output` is what the README shows: equal, or with each `...` standing for anything.
fn matches_shown(output: &str, shown: &str) -> bool {
    let mut rest = output.trim();
    for (i, piece) in shown.split("...").enumerate() {
        match rest.find(piece) {
            Some(at) if i > 0 || at == 0 => rest = &rest[at + piece.len()..],
            _ => return false,
        }
    }
    shown.ends_with("...") || rest.is_empty()
}

/// The README's quickstart exactly as a newcomer runs it: `meterd serve` with no flags in an
/// empty directory (so data in `./meterd-data`, listening on 127.0.0.1:8080), the README's curl
/// commands run by a shell as written, and the query again after the first flush to Parquet.
#[test]
fn the_readme_quickstart_works_as_written() {
    let blocks = readme_quickstart_blocks();
    assert!(blocks.len() >= 2, "{blocks:?}");
    assert_eq!(
        blocks[0].trim(),
        "cargo run --release -- serve",
        "the test runs the binary cargo built with these same arguments"
    );
    let commands = commands_and_outputs(&blocks[1]);
    assert_eq!(commands.len(), 2, "{commands:?}");

    let dir = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempfile().expect("stderr log");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_meterd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("METERD_") {
            serve.env_remove(k);
        }
    }
    let mut child = serve
        .arg("serve")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(logs)
        .spawn()
        .expect("start meterd serve");
    let killer = KillOnDrop(child.id());
    let stdout = child.stdout.take().expect("stdout");
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first)
        .expect("read the listening line");
    assert_eq!(
        first.trim(),
        "meterd listening on http://127.0.0.1:8080",
        "the default address (is another program on port 8080?)"
    );

    let run = |command: &str| -> String {
        let out = Command::new("bash")
            .arg("-c")
            .arg(command)
            .current_dir(dir.path())
            .output()
            .expect("run the README command");
        assert!(
            out.status.success(),
            "{command} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    };
    for (command, shown) in &commands {
        let output = run(command);
        assert!(
            matches_shown(&output, shown),
            "the README shows\n  {shown}\nfor\n{command}\nbut meterd answered\n  {output}"
        );
    }

    // Past the first flush (every 5 s by default) the event is read from Parquet under the
    // relative ./meterd-data.
    let events = dir.path().join("meterd-data").join("events");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while common::files_ending_with(&events, ".parquet").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no Parquet file under ./meterd-data/events after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (query, shown) = &commands[1];
    let output = run(query);
    assert!(
        matches_shown(&output, shown),
        "after the flush the README's query answered\n  {output}\ninstead of\n  {shown}"
    );

    drop(killer);
    let status = child.wait().expect("wait for meterd");
    assert!(status.success(), "meterd exited with {status} on SIGTERM");
}

/// SIGTERM on drop, so a failing test does not leave meterd holding port 8080.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

#[test]
fn output_matching_follows_the_readme_convention() {
    assert!(matches_shown("{\"a\":1}\n", "{\"a\":1}"));
    assert!(!matches_shown("{\"a\":2}", "{\"a\":1}"));
    assert!(matches_shown(
        "{\"columns\":[1,2],\"rows\":[[3]]}",
        "{\"columns\":[1,...],\"rows\":[[3]]}"
    ));
    assert!(!matches_shown(
        "{\"columns\":[1,2],\"rows\":[[4]]}",
        "{\"columns\":[1,...],\"rows\":[[3]]}"
    ));
}

/// A second meterd on a data directory in use says so and names the process using it.
#[test]
fn a_second_meterd_on_the_same_data_directory_names_the_first() {
    let server = Server::start(&[]);
    let data = server.data_dir();
    let out = meterd(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by another meterd")
            && stderr.contains(&format!("pid {}", server.pid())),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "the second one never listened");
}

/// Generated events in `out`, `n` of them over the last two days.
fn gen_file(out: &std::path::Path, seed: &str, n: &str) {
    let end = chrono::Utc::now() - chrono::Duration::minutes(1);
    let start = end - chrono::Duration::days(2);
    let (start, end) = (common::rfc3339(start), common::rfc3339(end));
    let run = meterd(
        &[
            "gen",
            "--seed",
            seed,
            "--events",
            n,
            "--tenants",
            "5",
            "--duplicates",
            "0",
            "--start",
            &start,
            "--end",
            &end,
            "--out",
            out.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// `meterd load` on a blocking thread (it waits for the server this test also talks to).
async fn load(args: Vec<String>, stdin: Option<Vec<u8>>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meterd"));
        cmd.arg("load").args(&args);
        for (k, _) in std::env::vars() {
            if k.starts_with("METERD_") {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("run meterd load");
        let input = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || {
            let mut input = input;
            if let Some(bytes) = stdin {
                std::io::Write::write_all(&mut input, &bytes).expect("write stdin");
            }
        });
        let out = child.wait_with_output().expect("meterd load");
        writer.join().expect("stdin writer");
        out
    })
    .await
    .expect("load task")
}

/// A file far larger than the body limit, plain or gzipped, goes in by `meterd load`; loading
/// it again stores nothing twice; standard input works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_sends_a_file_larger_than_the_body_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("events.ndjson");
    gen_file(&file, "31", "60000");
    let size = std::fs::metadata(&file).expect("file").len();
    // 2 MiB limit: the file is many times that.
    let server = Server::start(&["--max-body-bytes", "2097152"]);
    assert!(size > 5 * 2_097_152, "{size} bytes");
    let whole = server
        .post_events(std::fs::read(&file).expect("read"), common::NDJSON, false)
        .await;
    assert_eq!(whole.status, reqwest::StatusCode::PAYLOAD_TOO_LARGE);

    let path = file.to_str().expect("utf-8").to_owned();
    let out = load(
        vec![
            path.clone(),
            "--url".into(),
            server.url.clone(),
            "--batch-bytes".into(),
            "1000000".into(),
        ],
        None,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("sent 60000 events") && stderr.contains("accepted 60000, duplicates 0"),
        "{stderr}"
    );
    assert_eq!(server.count("true").await, 60_000);

    // Gzipped, again: every event is already there.
    let gz = dir.path().join("events.ndjson.gz");
    std::fs::write(
        &gz,
        common::gzip_bytes(&std::fs::read(&file).expect("read")),
    )
    .expect("gz");
    let out = load(
        vec![
            gz.to_str().expect("utf-8").into(),
            "--url".into(),
            format!("{}/v1/events", server.url),
        ],
        None,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("accepted 0, duplicates 60000"), "{stderr}");

    // Standard input.
    let more: Vec<serde_json::Value> = (0..10)
        .map(|i| common::llm_event("stdin", &format!("s{i}"), 1, 1))
        .collect();
    let out = load(
        vec!["-".into(), "--url".into(), server.url.clone()],
        Some(common::ndjson(&more)),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.count("tenant = 'stdin'").await, 10);
    assert_eq!(server.count("true").await, 60_010);
}

/// An invalid event stops `meterd load` with the server's reason and the line it is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_names_the_line_of_an_invalid_event() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("events.ndjson");
    let mut lines: Vec<serde_json::Value> = (0..5)
        .map(|i| common::llm_event("acme", &format!("ok-{i}"), 1, 1))
        .collect();
    lines[3]["data"]["input_tokens"] = serde_json::json!(-1);
    let mut body = b"\n".to_vec();
    body.extend(common::ndjson(&lines));
    std::fs::write(&file, body).expect("write");
    let out = load(
        vec![
            file.to_str().expect("utf-8").into(),
            "--url".into(),
            server.url.clone(),
        ],
        None,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Line 5: a blank first line, then events 0..3.
    assert!(
        stderr.contains("line 5: data.input_tokens: -1 is negative"),
        "{stderr}"
    );
    assert_eq!(server.count("true").await, 0, "the batch is all or nothing");
}

/// `meterd gen --url` shows a progress bar on a terminal (run under `script`, which gives it
/// one) and progress lines in a log, not only the totals at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_shows_progress_while_it_sends() {
    let server = Server::start(&[]);
    let end = chrono::Utc::now() - chrono::Duration::minutes(1);
    let start = common::rfc3339(end - chrono::Duration::days(1));
    let end = common::rfc3339(end);
    let gen_args = format!(
        "gen --events 3000 --tenants 3 --duplicates 0 --start {start} --end {end} --url {} \
         --batch 100 --rate 400",
        server.url
    );
    let bin = env!("CARGO_BIN_EXE_meterd");
    let (tty, log) = tokio::task::spawn_blocking(move || {
        // `script` runs the command on a pseudo-terminal and copies what it wrote.
        let tty = Command::new("script")
            .args(["-qec", &format!("{bin} {gen_args} --seed 4"), "/dev/null"])
            .output()
            .expect("run script (util-linux)");
        let log = Command::new("sh")
            .args(["-c", &format!("{bin} {gen_args} --seed 3")])
            .output()
            .expect("run gen");
        (tty, log)
    })
    .await
    .expect("gen task");
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{tty_out}");
    assert!(
        tty_out.contains("events (") && tty_out.contains("eta"),
        "no progress bar on a terminal:\n{tty_out}"
    );
    let log_err = String::from_utf8_lossy(&log.stderr);
    assert!(log.status.success(), "{log_err}");
    assert!(
        log_err.contains("events of 3,000 sent after"),
        "no progress lines in a log:\n{log_err}"
    );
    assert!(log_err.contains("sent 3000 events"), "{log_err}");
    assert_eq!(server.count("true").await, 6000);
}
