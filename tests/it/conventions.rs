//! The conventions of a command-line tool: `--version` with the commit,
//! shell completions, a manual page, and colours only on a terminal.

use std::process::{Command, Output};

use crate::cli::scramjet;

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What git says of the checkout the test binary was built in, if anything.
fn git_head() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn version_prints_the_version_and_the_commit_built_from() {
    let out = scramjet().arg("--version").output().unwrap();
    assert!(out.status.success());
    let commit = git_head().unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        stdout_of(&out).trim(),
        format!("scramjet {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_are_printed_for_each_shell_and_bash_parses_its_script() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = scramjet().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = stdout_of(&out);
        for word in ["scramjet", "ingest", "replay", "full-set"] {
            assert!(script.contains(word), "{shell} completes {word}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scramjet.bash");
    let out = scramjet().args(["completions", "bash"]).output().unwrap();
    std::fs::write(&path, &out.stdout).unwrap();
    let parsed = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(parsed.status.success(), "bash -n: {parsed:?}");
    // Sourced, it registers the completion function for the command.
    let registered = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p scramjet", path.display()))
        .output()
        .unwrap();
    assert!(registered.status.success(), "{registered:?}");
    assert!(stdout_of(&registered).contains("scramjet"));

    let out = scramjet().args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn completions_and_the_manual_need_no_valid_configuration() {
    let out = scramjet()
        .args(["completions", "bash"])
        .env("SCRAMJET__PIPELINE__BATCH_SIZE", "not a number")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = scramjet()
        .arg("man")
        .env("SCRAMJET__PIPELINE__BATCH_SIZE", "not a number")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn the_manual_page_names_the_command_and_lists_every_subcommand() {
    let out = scramjet().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = stdout_of(&out);
    assert!(page.contains(".TH scramjet 1"), "{page}");
    assert!(page.contains(".SH NAME"));
    for sub in [
        "run",
        "migrate",
        "relay",
        "send",
        "bench",
        "status",
        "revalidate",
        "replay",
        "ingest",
        "delete",
        "tail",
        "completions",
        "man",
    ] {
        assert!(
            page.contains(&format!("scramjet\\-{sub}(1)")),
            "the page lists {sub}"
        );
    }
    assert!(
        page.contains(env!("CARGO_PKG_VERSION")),
        "the page carries the version"
    );

    // With --dir, the pages it names are written beside it.
    let dir = tempfile::tempdir().unwrap();
    let out = scramjet()
        .arg("man")
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("scramjet.1")).unwrap(),
        page
    );
    let ingest = std::fs::read_to_string(dir.path().join("scramjet-ingest.1")).unwrap();
    assert!(ingest.contains(".TH scramjet-ingest 1"), "{ingest}");
    assert!(ingest.contains("\\-\\-full\\-set"), "{ingest}");
    for sub in ["run", "replay", "completions", "man"] {
        assert!(
            dir.path().join(format!("scramjet-{sub}.1")).exists(),
            "scramjet-{sub}.1"
        );
    }
}

/// A command that logs a warning and exits at once, with no service: the
/// first start-up attempt at a port where nothing listens.
fn warns() -> Command {
    let mut cmd = scramjet();
    cmd.arg("migrate")
        .env(
            "SCRAMJET__POSTGRES__URL",
            "postgres://postgres@127.0.0.1:1/none",
        )
        .env("SCRAMJET__STARTUP__CONNECT_ATTEMPTS", "2")
        .env("SCRAMJET__STARTUP__CONNECT_BACKOFF_MS", "10")
        .env_remove("NO_COLOR");
    cmd
}

/// `cmd` run with its stdout on a pseudo-terminal, through util-linux's
/// `script`; returns what the terminal showed.
fn on_a_terminal(cmd: &Command) -> String {
    let mut line = vec![cmd.get_program().to_string_lossy().into_owned()];
    line.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
        .env_clear();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            script.env(key, value);
        }
    }
    for key in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(key) {
            script.env(key, value);
        }
    }
    let out = script
        .output()
        .expect("util-linux's script runs (it gives the command a terminal)");
    stdout_of(&out)
}

#[test]
fn text_logs_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    let piped = warns().output().unwrap();
    let piped = stdout_of(&piped);
    assert!(piped.contains("WARN"), "it logged a warning: {piped}");
    assert!(
        !piped.contains('\u{1b}'),
        "no escape codes into a pipe: {piped:?}"
    );

    let shown = on_a_terminal(&warns());
    assert!(shown.contains("WARN"), "it logged a warning: {shown}");
    assert!(
        shown.contains("\u{1b}["),
        "colours on a terminal: {shown:?}"
    );

    let mut plain = warns();
    plain.env("NO_COLOR", "1");
    let shown = on_a_terminal(&plain);
    assert!(shown.contains("WARN"), "it logged a warning: {shown}");
    assert!(
        !shown.contains('\u{1b}'),
        "NO_COLOR: no escape codes: {shown:?}"
    );
}
