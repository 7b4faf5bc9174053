//! Records the git commit the binary is built from, for `scramjet --version`.
//!
//! `SCRAMJET_GIT_COMMIT` in the build's environment wins (a build from a
//! tarball or a Docker context without `.git`: `docker build --build-arg
//! SCRAMJET_GIT_COMMIT=$(git rev-parse HEAD)`); otherwise `git` is asked;
//! otherwise the commit is `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SCRAMJET_GIT_COMMIT");
    let commit = std::env::var("SCRAMJET_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().to_owned())
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SCRAMJET_GIT_COMMIT={commit}");
}

/// The commit of `HEAD` (12 hex digits). Rebuilt when `HEAD` moves: its
/// file, its reflog (written at every commit, checkout or reset), the branch
/// it names and the packed refs (only those that exist: a missing one would
/// rerun this at every build).
fn from_git() -> Option<String> {
    let git_dir = git(&["rev-parse", "--git-dir"])?;
    let mut watched = vec![
        "HEAD".to_owned(),
        "logs/HEAD".to_owned(),
        "packed-refs".to_owned(),
    ];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for file in watched {
        let path = format!("{git_dir}/{file}");
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}

/// What `git args` prints, trimmed; `None` when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
