//! What the benches share: a `meterd serve` of the release build on a free port.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// A running `meterd serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `meterd serve` on `data_dir` with `args` added, and reads the address it listens on.
pub fn start_server(data_dir: &std::path::Path, args: &[&str]) -> Result<Server> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env("METERD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting meterd serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the listen line")?;
    let url = line
        .trim()
        .strip_prefix("meterd listening on ")
        .context("unexpected first line")?
        .to_owned();
    Ok(Server { child, url })
}
