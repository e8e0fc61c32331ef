//! The `meterd` binary: parses the command line and hands over to [`meterd::run`].

fn main() -> std::process::ExitCode {
    meterd::run()
}
