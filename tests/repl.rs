//! End-to-end tests of `examples/repl.rs`: each runs the compiled example as a child
//! process on its own temp dir, feeds it commands on stdin and reads its answers.

use std::{
    error::Error,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// A session that runs longer than this is killed and fails its test.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn revert_to_an_older_generation_brings_back_its_values() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = run(
        dir.path(),
        "set name first\nset count 1\nset tags a,b\nsave\n\
         set name second\nset count 2\nset tags c\nsave\n\
         history\nrevert 1\nget\n",
    )?;
    assert!(out.contains("saved generation 1\n"), "{out}");
    assert!(out.contains("saved generation 2\n"), "{out}");
    assert!(out.contains("\ngeneration 1  saved at "), "{out}");
    // Cells are listed in registration order, which the linker decides.
    let changed: Vec<&str> =
        out.lines().filter_map(|line| line.split_once("changed: ")).map(|it| it.1).collect();
    for line in &changed {
        let mut names: Vec<&str> = line.split(", ").collect();
        names.sort_unstable();
        assert_eq!(names, ["count", "name", "tags"], "{out}");
    }
    assert_eq!(changed.len(), 2, "{out}");
    assert!(out.contains("\ngeneration 2  saved at "), "{out}");
    assert!(out.contains("reverted every cell to generation 1;"), "{out}");
    assert!(out.contains("name = \"first\"\ncount = 1\ntags = [\"a\", \"b\"]\n"), "{out}");
    Ok(())
}

#[test]
fn revert_without_a_generation_restores_the_last_save() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = run(
        dir.path(),
        "set name kept\nsave\nset name changed\nset count 5\nrevert\nget\nset count 6\nquit\n",
    )?;
    assert!(out.contains("reverted every cell to generation 1, the last save\n"), "{out}");
    assert!(out.contains("name = \"kept\"\ncount = 0\ntags = []\n"), "{out}");
    assert!(out.ends_with("quitting without saving the changes since generation 1\n"), "{out}");
    Ok(())
}

#[test]
fn saved_state_survives_into_the_next_session() -> TestResult {
    let dir = tempfile::tempdir()?;
    let first = run(dir.path(), "set count 42\nset tags x, y\nsave\nquit\n")?;
    assert!(first.ends_with("saved generation 1\n"), "quit after a save said more: {first}");
    // End of input ends the session like `quit`.
    let second = run(dir.path(), "get count tags\nhistory")?;
    assert!(
        second.starts_with("count = 42\ntags = [\"x\", \"y\"]\ngeneration 1  saved at "),
        "{second}"
    );
    Ok(())
}

#[test]
fn bad_input_is_an_error_and_the_session_goes_on() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = run(
        dir.path(),
        "set colour red\nset count many\nrevert 7\nfrobnicate\nset count 3\nsave\nrevert 99\nget count\n",
    )?;
    let errors: Vec<&str> = out.lines().filter(|line| line.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 5, "{out}");
    let expected = [
        "unknown cell `colour`",
        "`many` is not a whole number",
        "no generation 7",
        "unknown command `frobnicate`",
        "no generation 99",
    ];
    for (error, expected) in errors.iter().zip(expected) {
        assert!(error.contains(expected), "{error:?} does not say {expected:?}");
    }
    assert!(out.ends_with("count = 3\n"), "the session stopped early: {out}");
    Ok(())
}

/// Runs one REPL session over the store in `dir` with `input` on stdin, checks that it
/// exits successfully with nothing on stderr, and returns its stdout.
fn run(dir: &Path, input: &str) -> TestResult<String> {
    let mut child = Command::new(repl()?)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The input is far smaller than a pipe's buffer, so writing it all before reading
    // cannot block; dropping the handle is the end of input.
    child.stdin.take().ok_or("no stdin")?.write_all(input.as_bytes())?;
    let stdout = read_all(child.stdout.take().ok_or("no stdout")?);
    let stderr = read_all(child.stderr.take().ok_or("no stderr")?);

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if SESSION_TIMEOUT < started.elapsed() {
            child.kill()?;
            child.wait()?;
            return Err(format!("the session did not end within {SESSION_TIMEOUT:?}").into());
        }
        thread::sleep(Duration::from_millis(10));
    };
    let out = stdout.join().map_err(|_| "the stdout reader panicked")??;
    let err = stderr.join().map_err(|_| "the stderr reader panicked")??;
    if !status.success() || !err.is_empty() {
        return Err(format!("the session failed ({status})\nstdout:\n{out}\nstderr:\n{err}").into());
    }
    Ok(out)
}

/// Reads `pipe` to its end on another thread, so that a child never blocks on a full pipe.
fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<io::Result<String>> {
    thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text)?;
        Ok(text)
    })
}

/// The example's binary, built (once per test run) if missing or out of date.
fn repl() -> TestResult<PathBuf> {
    static REPL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    REPL.get_or_init(|| build().map_err(|err| err.to_string())).clone().map_err(Into::into)
}

fn build() -> TestResult<PathBuf> {
    // This binary is `<target>/<profile>/deps/repl-<hash>` and cargo puts examples in
    // `<target>/<profile>/examples/`.
    let exe = std::env::current_exe()?;
    let profile_dir =
        exe.parent().and_then(Path::parent).ok_or("test binary has no profile dir")?;
    let target_dir = profile_dir.parent().ok_or("profile dir has no parent")?;
    let repl = profile_dir.join("examples").join(format!("repl{}", std::env::consts::EXE_SUFFIX));
    // A plain `cargo test` builds the examples first, but `cargo test --test repl` does
    // not, and would run a missing or stale binary; building with this binary's target
    // dir, profile and features is a no-op when the example is up to date.
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--example", "repl"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.ends_with("release") {
        cargo.arg("--release");
    }
    if cfg!(feature = "encryption") {
        cargo.args(["--features", "encryption"]);
    }
    let status = cargo.status()?;
    if !status.success() {
        return Err(format!("`cargo build --example repl` failed: {status}").into());
    }
    if !repl.is_file() {
        return Err(format!("`cargo build --example repl` did not make {}", repl.display()).into());
    }
    Ok(repl)
}
