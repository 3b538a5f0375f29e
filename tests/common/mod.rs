//! What the child-process tests share: a watched child process and a small random
//! number generator. Included by `tests/crash.rs`, `tests/prevalence_crash.rs` and
//! `tests/fault_shim.rs` as `mod common;`.

use std::{
    env,
    error::Error,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// What the tests return: any error fails the test with its message.
pub(crate) type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;
/// A test of a `harness = false` binary: its name and its function.
pub(crate) type Test = (&'static str, fn() -> TestResult);

/// Runs `tests` one after another, reporting like libtest; `--list` lists them.
/// The exit code says whether all passed.
pub(crate) fn run(tests: &[Test]) -> ExitCode {
    if env::args().any(|arg| arg == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    println!("\nrunning {} tests", tests.len());
    let started = Instant::now();
    let (mut passed, mut failed) = (0_u32, 0_u32);
    for &(name, test) in tests {
        let test_started = Instant::now();
        match test() {
            Ok(()) => {
                passed += 1;
                println!("    took {:.1} s", test_started.elapsed().as_secs_f64());
                println!("test {name} ... ok");
            }
            Err(err) => {
                failed += 1;
                println!("    took {:.1} s", test_started.elapsed().as_secs_f64());
                println!("test {name} ... FAILED");
                println!("---- {name} ----\n{err}");
            }
        }
    }
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
    println!("{passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// A child process whose stdout the parent receives line by line, and whose stderr
/// it collects; killed when dropped.
pub(crate) struct Watched {
    child: Child,
    /// How long `next_line` waits.
    patience: Duration,
    lines: Receiver<String>,
    stdout_reader: Option<JoinHandle<TestResult>>,
    stderr_reader: Option<JoinHandle<String>>,
}

impl Watched {
    /// Starts `command` with its stdout and stderr piped; `next_line` waits up to
    /// `patience` for each line.
    pub(crate) fn spawn(mut command: Command, patience: Duration) -> TestResult<Watched> {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout is not piped")?;
        let mut stderr = child.stderr.take().ok_or("child stderr is not piped")?;
        let (sender, lines) = mpsc::channel();
        let stdout_reader = thread::spawn(move || -> TestResult {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                if stdout.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                // A line cut short by the kill is not a report.
                let Some(whole) = line.strip_suffix('\n') else { return Ok(()) };
                if sender.send(whole.to_owned()).is_err() {
                    return Ok(());
                }
            }
        });
        let stderr_reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Watched {
            child,
            patience,
            lines,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
        })
    }

    /// Waits for the next whole line the child prints.
    pub(crate) fn next_line(&self) -> TestResult<String> {
        match self.lines.recv_timeout(self.patience) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("the child printed nothing for {:?}", self.patience).into())
            }
            Err(RecvTimeoutError::Disconnected) => Err("the child closed its stdout".into()),
        }
    }

    /// Sends the child the signal `name` (`STOP`, `CONT`, ...).
    #[allow(dead_code)] // Only some of the binaries that include this module use it.
    pub(crate) fn signal(&self, name: &str) -> TestResult {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            return Err(format!("kill -{name} {} failed: {status}", self.child.id()).into());
        }
        Ok(())
    }

    /// The child's exit status if it has exited, without waiting.
    pub(crate) fn exited(&mut self) -> TestResult<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Kills the child, which must still be running, with `SIGKILL`.
    pub(crate) fn kill(&mut self) -> TestResult {
        if let Some(status) = self.exited()? {
            return Err(format!("the child exited before it was killed: {status}").into());
        }
        // On Unix, `Child::kill` sends SIGKILL.
        self.child.kill()?;
        let status = self.child.wait()?;
        if status.success() {
            return Err(format!("the killed child exited with {status}").into());
        }
        Ok(())
    }

    /// Makes sure the child is dead, then returns the lines it printed that were not
    /// received yet, and everything it wrote to stderr.
    pub(crate) fn finish(&mut self) -> (TestResult<Vec<String>>, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = match self.stderr_reader.take().map(JoinHandle::join) {
            Some(Ok(stderr)) => stderr,
            Some(Err(_)) => "<stderr reader panicked>".to_owned(),
            None => String::new(),
        };
        let read = match self.stdout_reader.take().map(JoinHandle::join) {
            Some(Ok(read)) => read,
            Some(Err(_)) => Err("stdout reader panicked".into()),
            None => Ok(()),
        };
        (read.map(|()| self.lines.try_iter().collect()), stderr)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// xorshift64*: plenty for picking kill times.
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> XorShift {
        // splitmix64's finalizer, so that close seeds (the clock's) start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        (self.next() >> 32) % bound
    }
}

/// Copies the directory tree `from` to `to`.
#[allow(dead_code)] // The fault shim and the corruption sweep use it; the crash tests do not.
pub(crate) fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
