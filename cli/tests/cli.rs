//! Runs the `instastate` binary against real stores written with the library.
//!
//! Tests run in parallel in one binary, so each one uses its own temp dir and its
//! own uniquely named cells.

use std::{
    error::Error,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use instastate::{EncryptionKey, StateCell, Store};

#[path = "../../tests/common/tree.rs"]
mod tree;
use serde::{Deserialize, Serialize};
use tree::tree;

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// What one run of the tool did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the tool with `args`.
fn instastate<I, S>(args: I) -> TestResult<Run>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = Command::new(env!("CARGO_BIN_EXE_instastate")).args(args).output()?;
    Ok(Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8(output.stderr)?,
    })
}

/// Runs `command` on the store in `dir`, with any `extra` arguments after it.
fn check(command: &str, dir: &Path, extra: &[&OsStr]) -> TestResult<Run> {
    let mut args = vec![OsStr::new(command), dir.as_os_str()];
    args.extend_from_slice(extra);
    instastate(args)
}

/// The value files of the store in `dir`.
fn value_files(dir: &Path) -> TestResult<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir.join("values"))? {
        files.push(entry?.path());
    }
    files.sort();
    Ok(files)
}

/// The NAME, TYPE, SCHEMA and SIZE columns of `list` output, without the header.
fn listed(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip(1)
        .take_while(|line| !line.is_empty())
        .map(|line| line.split_whitespace().take(5).collect::<Vec<_>>().join(" "))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    volume: u8,
}

#[test]
fn list_shows_every_value_with_its_details() -> TestResult {
    static COUNT: StateCell<u64> = StateCell::new("cli::list::COUNT", || 0);
    static SETTINGS: StateCell<Settings> =
        StateCell::new("cli::list::SETTINGS", || Settings { theme: "dark".into(), volume: 3 });
    static BLOB: StateCell<Vec<u8>> = StateCell::new("cli::list::BLOB", Vec::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&COUNT).cell(&SETTINGS).cell(&BLOB).open(dir.path())?;
        store.save_all()?;
        COUNT.set(7);
        store.save_all()?;
        BLOB.set(vec![1; 10_000]);
        store.save_all()?;
    }
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let mut lines = run.stdout.lines();
    let header = lines.next().ok_or("no output")?;
    assert!(header.starts_with("NAME"), "{header}");
    for column in ["TYPE", "SCHEMA", "SIZE", "SAVE", "SAVED AT (UTC)", "NOTE"] {
        assert!(header.contains(column), "no {column} in {header}");
    }
    let row = |name: &str| {
        run.stdout.lines().find(|line| line.starts_with(name)).unwrap_or_default().to_owned()
    };
    let blob = row("cli::list::BLOB ");
    assert!(blob.contains("alloc::vec::Vec<u8>"), "{blob}");
    // postcard writes the length (2 bytes for 10 000) and then the bytes.
    assert!(blob.contains("9.8 KiB"), "{blob}");
    let fields: Vec<&str> = blob.split_whitespace().collect();
    assert_eq!(fields.get(5), Some(&"3"), "BLOB was last written by save 3: {blob}");
    let date = fields.get(6).ok_or("no date")?;
    let time = fields.get(7).ok_or("no time")?;
    assert!(date.len() == 10 && date.starts_with("20") && date.matches('-').count() == 2, "{blob}");
    assert!(time.len() == 8 && time.matches(':').count() == 2, "{blob}");
    let count = row("cli::list::COUNT ");
    assert!(count.contains(" u64 ") && count.contains(" 1 B "), "{count}");
    assert_eq!(count.split_whitespace().nth(5), Some("2"), "{count}");
    let settings = row("cli::list::SETTINGS ");
    assert!(settings.contains("cli::Settings"), "{settings}");
    assert!(!run.stdout.contains("orphan "), "{}", run.stdout);
    assert!(run.stdout.contains("3 values at save 3; 0 orphans, 0 damaged"), "{}", run.stdout);
    Ok(())
}

#[test]
fn list_of_an_empty_store_says_so() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(Store::builder().open(dir.path())?);
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("holds no values"), "{run:?}");
    Ok(())
}

#[test]
fn history_shows_each_save_and_the_cells_it_wrote() -> TestResult {
    static A: StateCell<u32> = StateCell::new("cli::history::A", || 1);
    static B: StateCell<String> = StateCell::new("cli::history::B", String::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&A).cell(&B).open(dir.path())?;
        store.save_all()?;
        A.set(2);
        store.save_all()?;
        B.set("b".into());
        store.save_all()?;
    }
    let run = check("history", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three saves: {}", run.stdout);
    let header = lines.first().ok_or("no header")?;
    assert!(header.starts_with("SAVE") && header.contains("CELLS CHANGED"), "{header}");
    let saves: Vec<Vec<&str>> =
        lines.iter().skip(1).map(|it| it.split_whitespace().collect()).collect();
    let first = saves.first().ok_or("no first save")?;
    assert_eq!(first.first(), Some(&"1"));
    assert_eq!(first.get(3..), Some(&["cli::history::A,", "cli::history::B"][..]));
    let second = saves.get(1).ok_or("no second save")?;
    assert_eq!((second.first(), second.get(3..)), (Some(&"2"), Some(&["cli::history::A"][..])));
    let third = saves.get(2).ok_or("no third save")?;
    assert_eq!((third.first(), third.get(3..)), (Some(&"3"), Some(&["cli::history::B"][..])));
    Ok(())
}

#[test]
fn verify_of_a_sound_store_exits_0() -> TestResult {
    static BIG: StateCell<Vec<u8>> = StateCell::new("cli::sound::BIG", || vec![5; 8000]);
    static SMALL: StateCell<bool> = StateCell::new("cli::sound::SMALL", || true);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BIG).cell(&SMALL).open(dir.path())?;
        store.save_all()?;
    }
    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("is sound: 2 values at save 1"), "{run:?}");
    Ok(())
}

#[test]
fn verify_finds_a_damaged_value_file_and_exits_1() -> TestResult {
    static BIG: StateCell<Vec<u8>> = StateCell::new("cli::flipped::BIG", || vec![5; 8000]);
    static SMALL: StateCell<u16> = StateCell::new("cli::flipped::SMALL", || 9);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BIG).cell(&SMALL).open(dir.path())?;
        store.save_all()?;
    }
    let files = value_files(dir.path())?;
    let [file] = files.as_slice() else { return Err(format!("{files:?}").into()) };
    let mut bytes = fs::read(file)?;
    let middle = bytes.len() / 2;
    let byte = bytes.get_mut(middle).ok_or("empty value file")?;
    *byte ^= 0x40;
    fs::write(file, bytes)?;

    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("cli::flipped::BIG"), "the damaged cell is named: {run:?}");
    assert!(!run.stdout.contains("cli::flipped::SMALL"), "{run:?}");
    assert!(run.stdout.contains("is NOT sound: 1 problem"), "{run:?}");
    // A reader that went away (`verify | head -1`) takes the report, not the status.
    let mut child = Command::new(env!("CARGO_BIN_EXE_instastate"))
        .args([OsStr::new("verify"), dir.path().as_os_str()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let status = child.wait()?;
    assert_eq!(status.code(), Some(1), "verify into a closed pipe: {status}");
    Ok(())
}

#[test]
fn verify_finds_a_missing_value_file_and_exits_1() -> TestResult {
    static BIG: StateCell<String> = StateCell::new("cli::missing::BIG", || "x".repeat(6000));
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BIG).open(dir.path())?;
        store.save_all()?;
    }
    for file in value_files(dir.path())? {
        fs::remove_file(file)?;
    }
    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("cli::missing::BIG"), "{run:?}");
    assert!(run.stdout.contains("NOT sound"), "{run:?}");
    // `list` counts it damaged too, and says why, with the type its record gives.
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("its value file is missing"), "{run:?}");
    assert!(run.stdout.contains("alloc::string::String"), "{run:?}");
    assert!(run.stdout.contains("1 value at save 1; 0 orphans, 1 damaged"), "{run:?}");
    Ok(())
}

#[test]
fn export_then_import_copies_every_value() -> TestResult {
    static NUMBERS: StateCell<Vec<u64>> = StateCell::new("cli::copy::NUMBERS", Vec::new);
    static SETTINGS: StateCell<Settings> =
        StateCell::new("cli::copy::SETTINGS", || Settings { theme: "light".into(), volume: 1 });
    let dir = tempfile::tempdir()?;
    let (from, to) = (dir.path().join("from"), dir.path().join("to"));
    let export = dir.path().join("state.export");
    let numbers: Vec<u64> = (0..2000).collect();
    let settings = Settings { theme: "solarized".into(), volume: 11 };
    {
        let store = Store::builder().cell(&NUMBERS).cell(&SETTINGS).open(&from)?;
        NUMBERS.set(numbers.clone());
        SETTINGS.set(settings.clone());
        store.save_all()?;
    }

    let run = check("export", &from, &[export.as_os_str()])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("exported 2 values from save 1"), "{run:?}");
    assert!(export.is_file());

    let refused = check("import", &to, &[export.as_os_str()])?;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("--create"), "the message tells how: {refused:?}");
    assert!(!to.exists(), "import created a store without --create");

    let run = check("import", &to, &[export.as_os_str(), OsStr::new("--create")])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("2 values written"), "{run:?}");

    let (listed_from, listed_to) = (check("list", &from, &[])?, check("list", &to, &[])?);
    assert_eq!(listed_to.code, Some(0), "{listed_to:?}");
    assert_eq!(listed(&listed_from.stdout), listed(&listed_to.stdout));
    assert_eq!(listed(&listed_to.stdout).len(), 2, "{}", listed_to.stdout);

    NUMBERS.set(Vec::new());
    SETTINGS.set(Settings { theme: String::new(), volume: 0 });
    let _store = Store::builder().cell(&NUMBERS).cell(&SETTINGS).open(&to)?;
    assert_eq!(NUMBERS.get(), numbers);
    assert_eq!(SETTINGS.get(), settings);
    Ok(())
}

#[test]
fn import_into_an_existing_store_is_one_new_save() -> TestResult {
    static LEVEL: StateCell<u8> = StateCell::new("cli::reimport::LEVEL", || 1);
    let dir = tempfile::tempdir()?;
    let export = dir.path().join("level.export");
    let store_dir = dir.path().join("store");
    {
        let store = Store::builder().cell(&LEVEL).open(&store_dir)?;
        store.save_all()?;
        store.export_to(&export)?;
        LEVEL.set(2);
        store.save_all()?;
    }
    let run = check("import", &store_dir, &[export.as_os_str()])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("as save 3"), "{run:?}");
    let _store = Store::builder().cell(&LEVEL).open(&store_dir)?;
    assert_eq!(LEVEL.get(), 1);
    Ok(())
}

#[test]
fn a_failed_import_with_create_leaves_no_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("garbage.export");
    fs::write(&garbage, b"not an export file")?;
    let to = dir.path().join("new");
    let run = check("import", &to, &[garbage.as_os_str(), OsStr::new("--create")])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.starts_with("error: cannot import"), "{run:?}");
    assert!(!to.exists(), "the failed import left {}", to.display());
    // Nor the parents it made for it; a parent that was there stays.
    let deep = dir.path().join("a").join("b").join("new");
    let run = check("import", &deep, &[garbage.as_os_str(), OsStr::new("--create")])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(!dir.path().join("a").exists(), "the failed import left {}", deep.display());
    assert!(garbage.exists() && dir.path().exists());
    Ok(())
}

#[test]
fn prune_orphans_removes_values_no_cell_claims() -> TestResult {
    static KEPT: StateCell<u32> = StateCell::new("cli::prune::KEPT", || 1);
    static GONE: StateCell<String> = StateCell::new("cli::prune::GONE", || "old".into());
    static OTHER: StateCell<u32> = StateCell::new("cli::prune::OTHER", || 3);
    let dir = tempfile::tempdir()?;
    let elsewhere = tempfile::tempdir()?;
    let file = elsewhere.path().join("gone.export");
    {
        let store = Store::builder().cell(&GONE).open(elsewhere.path().join("store"))?;
        store.save_all()?;
        store.export_to(&file)?;
    }
    {
        let store = Store::builder().cell(&KEPT).cell(&OTHER).open(dir.path())?;
        store.save_all()?;
    }
    {
        // A later version of the program has no OTHER: a store over fewer cells
        // keeps the names of the others claimed, so the tool leaves OTHER alone.
        let store = Store::builder().cell(&KEPT).open(dir.path())?;
        KEPT.set(2);
        store.save_all()?;
        // A value imported under a name no program has is an orphan.
        store.import_from(&file)?;
    }
    let run = check("list", dir.path(), &[])?;
    let gone = run.stdout.lines().find(|line| line.starts_with("cli::prune::GONE"));
    assert!(gone.is_some_and(|line| line.ends_with("orphan")), "{run:?}");
    for name in ["cli::prune::KEPT", "cli::prune::OTHER"] {
        let line = run.stdout.lines().find(|line| line.starts_with(name));
        assert!(line.is_some_and(|line| !line.contains("orphan")), "{name}: {run:?}");
    }
    assert!(run.stdout.contains("1 orphan,"), "{run:?}");

    let run = check("prune-orphans", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("removed 1 orphan from"), "{run:?}");
    assert!(run.stdout.lines().any(|line| line.trim() == "cli::prune::GONE"), "{run:?}");

    let run = check("list", dir.path(), &[])?;
    assert!(!run.stdout.contains("cli::prune::GONE"), "{run:?}");
    assert!(run.stdout.contains("cli::prune::KEPT"), "{run:?}");
    let run = check("prune-orphans", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("has no orphans"), "{run:?}");
    Ok(())
}

#[test]
fn compact_reports_the_size_before_and_after() -> TestResult {
    static DATA: StateCell<Vec<u32>> = StateCell::new("cli::compact::DATA", Vec::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&DATA).open(dir.path())?;
        for round in 0..20 {
            DATA.set(vec![round; 500]);
            store.save_all()?;
        }
    }
    let run = check("compact", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("compacted "), "{run:?}");
    assert!(run.stdout.contains(" before, ") && run.stdout.contains(" after"), "{run:?}");
    assert!(run.stdout.contains("iB"), "sizes are in human units: {run:?}");
    let _store = Store::builder().cell(&DATA).open(dir.path())?;
    assert_eq!(DATA.get(), vec![19; 500], "compaction kept the last save");
    Ok(())
}

#[test]
fn a_store_in_use_is_refused_politely() -> TestResult {
    static HELD: StateCell<u8> = StateCell::new("cli::locked::HELD", || 4);
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&HELD).open(dir.path())?;
    store.save_all()?;
    for command in ["list", "verify", "prune-orphans"] {
        // Returning at all is the point: a locked store must not make the tool hang.
        let run = check(command, dir.path(), &[])?;
        assert_eq!(run.code, Some(2), "{command}: {run:?}");
        assert!(run.stderr.contains("is in use by a running program; stop it first"), "{run:?}");
        assert!(run.stderr.contains("backup_to"), "{run:?}");
    }
    drop(store);
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    Ok(())
}

#[test]
fn a_missing_store_is_refused_and_not_created() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nothing here");
    for command in ["list", "history", "verify", "prune-orphans", "compact"] {
        let run = check(command, &missing, &[])?;
        assert_eq!(run.code, Some(2), "{command}: {run:?}");
        assert!(run.stderr.contains("no store at"), "{run:?}");
        assert!(run.stderr.contains("does not exist"), "{run:?}");
    }
    let export = dir.path().join("out.export");
    let run = check("export", &missing, &[export.as_os_str()])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(!missing.exists() && !export.exists());

    // A directory that exists but holds no store is not turned into one either.
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("holds no instastate store"), "{run:?}");
    assert!(!dir.path().join("sled").exists());
    Ok(())
}

#[test]
fn an_encrypted_store_needs_its_key_file() -> TestResult {
    static SECRET: StateCell<String> = StateCell::new("cli::encrypted::SECRET", String::new);
    let dir = tempfile::tempdir()?;
    let store_dir = dir.path().join("store");
    let key = [0x5a; 32];
    {
        let builder = Store::builder().cell(&SECRET);
        let store = builder.encryption_key(EncryptionKey::from_bytes(key)).open(&store_dir)?;
        SECRET.set("hunter2".into());
        store.save_all()?;
    }
    let hex_file = dir.path().join("key.hex");
    fs::write(&hex_file, format!("{}\n", "5a".repeat(32)))?;
    let raw_file = dir.path().join("key.bin");
    fs::write(&raw_file, key)?;
    let wrong_file = dir.path().join("wrong.bin");
    fs::write(&wrong_file, [1; 32])?;
    let bad_file = dir.path().join("bad.key");
    fs::write(&bad_file, "not a key")?;

    let run = check("list", &store_dir, &[])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("is encrypted; open it with its key"), "{run:?}");

    for file in [&hex_file, &raw_file] {
        let run = check("list", &store_dir, &[OsStr::new("--key-file"), file.as_os_str()])?;
        assert_eq!(run.code, Some(0), "{run:?}");
        assert!(run.stdout.contains("cli::encrypted::SECRET"), "{run:?}");
        assert!(run.stdout.contains("alloc::string::String"), "{run:?}");
        let run = check("verify", &store_dir, &[OsStr::new("--key-file"), file.as_os_str()])?;
        assert_eq!(run.code, Some(0), "{run:?}");
    }

    let run = check("list", &store_dir, &[OsStr::new("--key-file"), wrong_file.as_os_str()])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("wrong key"), "{run:?}");
    let run = check("list", &store_dir, &[OsStr::new("--key-file"), bad_file.as_os_str()])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("32 raw bytes or 64 hex digits"), "{run:?}");
    // A device or an endless file is refused at once, never read whole.
    let huge = dir.path().join("huge.key");
    fs::write(&huge, vec![b'0'; 1 << 20])?;
    for (file, reason) in
        [(huge.as_os_str(), "more than 4096 bytes"), (OsStr::new("/dev/zero"), "regular file")]
    {
        let run = check("list", &store_dir, &[OsStr::new("--key-file"), file])?;
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains(reason), "{reason}: {run:?}");
    }
    Ok(())
}

#[test]
fn every_command_has_help() -> TestResult {
    let run = instastate(["--help"])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let commands = ["list", "history", "verify", "export", "import", "prune-orphans", "compact"];
    for command in commands {
        let line = run.stdout.lines().find(|line| line.trim_start().starts_with(command));
        let described = line.is_some_and(|line| line.split_whitespace().count() > 2);
        assert!(described, "{command} has no one-line description: {}", run.stdout);
        let help = instastate([command, "--help"])?;
        assert_eq!(help.code, Some(0), "{help:?}");
        assert!(help.stdout.contains("Usage: instastate"), "{help:?}");
    }
    let import = instastate(["import", "--help"])?;
    assert!(import.stdout.contains("--create"), "{import:?}");
    Ok(())
}

#[test]
fn errors_show_their_causes() -> TestResult {
    static ANY: StateCell<u8> = StateCell::new("cli::causes::ANY", || 0);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&ANY).open(dir.path())?;
        store.save_all()?;
    }
    let missing = dir.path().join("no such file.export");
    let run = check("import", dir.path(), &[missing.as_os_str()])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.starts_with("error: "), "{run:?}");
    // The cause is in the message itself, once.
    assert!(run.stderr.contains("No such file or directory"), "{run:?}");
    assert_eq!(run.stderr.matches("No such file or directory").count(), 1, "{run:?}");
    Ok(())
}

#[test]
fn verify_of_a_store_too_damaged_to_open_exits_1() -> TestResult {
    static NOTE: StateCell<String> = StateCell::new("cli::unopenable::NOTE", String::new);
    let dir = tempfile::tempdir()?;
    for session in 0..2 {
        let store = Store::builder().cell(&NOTE).open(dir.path())?;
        for round in 0..3 {
            NOTE.set(format!("session {session}, round {round}"));
            store.save_all()?;
        }
    }
    // Damage the engine's log where the first save wrote the cell's name. The
    // engine recovers what precedes its last snapshot (taken at the second open)
    // from that snapshot, and reports damage there; damage after it reads as a torn
    // write, which the engine quietly cuts off.
    let log = dir.path().join("sled").join("db");
    let mut bytes = fs::read(&log)?;
    let name = NOTE.name().as_bytes();
    let at = bytes.windows(name.len()).position(|it| it == name).ok_or("name not in the log")?;
    let byte = bytes.get_mut(at + 3).ok_or("log too short")?;
    *byte ^= 0x01;
    fs::write(&log, bytes)?;

    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("cannot open the store: "), "{run:?}");
    assert!(run.stdout.contains("is NOT sound"), "{run:?}");
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(2), "other commands fail as usual: {run:?}");
    assert!(run.stderr.starts_with("error: "), "{run:?}");
    Ok(())
}

fn add(total: &mut u64, by: u64, _: instastate::Timestamp) -> u64 {
    *total += by;
    *total
}

/// The journal files of the journal in `dir`, in order.
fn journal_files(dir: &Path) -> TestResult<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|it| it == "log"));
    files.sort();
    Ok(files)
}

/// Flips a byte 12 bytes before the end of `path`: inside its last event.
fn flip_near_end(path: &Path) -> TestResult {
    let mut bytes = fs::read(path)?;
    let at = bytes.len().checked_sub(12).ok_or("file too short")?;
    if let Some(byte) = bytes.get_mut(at) {
        *byte ^= 0x40;
    }
    fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn list_history_and_verify_understand_a_prevayler_directory() -> TestResult {
    let dir = tempfile::tempdir()?;
    let counter = instastate::Prevayler::open(dir.path(), 0u64, add)?;
    for by in 1..=5 {
        counter.handle(by)?;
    }
    counter.snapshot()?;
    counter.handle(6)?;
    counter.close()?;

    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("is sound: 6 events"), "{}", run.stdout);
    let run = check("list", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("u64") && run.stdout.contains(" 6 "), "{}", run.stdout);
    let run = check("history", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("holds 6 events") && run.stdout.contains("first 5"), "{run:?}");

    // Commands for stores say what the directory is instead.
    let run = check("export", dir.path(), &[dir.path().join("out").as_os_str()])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("Prevayler directory"), "{}", run.stderr);

    // The last acknowledged event damaged: opening refuses it, and so does verify.
    let journal = journal_files(dir.path())?.pop().ok_or("no journal file")?;
    flip_near_end(&journal)?;
    let damaged = fs::read(&journal)?;
    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("NOT sound"), "{}", run.stdout);
    assert_eq!(fs::read(&journal)?, damaged, "verify changed the journal");
    let opened = instastate::Prevayler::open(dir.path(), 0u64, add).map(drop);
    assert!(matches!(opened, Err(instastate::Error::JournalCorrupt { .. })), "{opened:?}");
    Ok(())
}

#[derive(Default, Serialize, Deserialize)]
struct Tally(u64);

impl instastate::Prevalent for Tally {
    type Event = u64;
    type Output = ();
    fn apply(&mut self, by: u64, _: instastate::Timestamp) {
        self.0 += by;
    }
}

#[test]
fn verify_checks_the_journals_of_journaled_cells() -> TestResult {
    static TALLY: StateCell<Tally> = StateCell::with_options(
        "cli::journaled::TALLY",
        Tally::default,
        instastate::CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    {
        let _store = Store::builder().cell(&TALLY).open(dir.path())?;
        for by in 1..=4 {
            TALLY.handle(by)?;
        }
    }
    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");

    let journals = dir.path().join("journals");
    let cell_dir = fs::read_dir(&journals)?.next().ok_or("no journal directory")??.path();
    let journal = journal_files(&cell_dir)?.pop().ok_or("no journal file")?;
    flip_near_end(&journal)?;
    let run = check("verify", dir.path(), &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("cli::journaled::TALLY"), "{}", run.stdout);
    let opened = Store::builder().cell(&TALLY).open(dir.path()).map(drop);
    assert!(matches!(opened, Err(instastate::Error::JournalCorrupt { .. })), "{opened:?}");
    Ok(())
}

#[test]
fn reading_commands_write_create_and_delete_nothing() -> TestResult {
    static NOTE: StateCell<String> = StateCell::new("cli::untouched::NOTE", String::new);
    static TALLY: StateCell<Tally> = StateCell::with_options(
        "cli::untouched::TALLY",
        Tally::default,
        instastate::CellOptions::new().journaled(),
    );
    let tmp = tempfile::tempdir()?;
    let store_dir = tmp.path().join("store");
    {
        let store = Store::builder().cell(&NOTE).cell(&TALLY).open(&store_dir)?;
        NOTE.set("x".repeat(100_000));
        TALLY.handle(3)?;
        store.save_all()?;
        TALLY.handle(4)?;
    }
    // Left by an open interrupted while the engine wrote its snapshot: opening to
    // write deletes it, and an engine opened in place writes a new snapshot.
    fs::write(store_dir.join("sled/snap.00000000FFFFFFFF.generating"), b"torn")?;
    let prevayler_dir = tmp.path().join("prevayler");
    {
        let counter = instastate::Prevayler::open(&prevayler_dir, 0u64, add)?;
        counter.handle(1)?;
        counter.snapshot()?;
        counter.handle(2)?;
    }
    let export = tmp.path().join("out.export");
    for dir in [&store_dir, &prevayler_dir] {
        let before = tree(dir)?;
        for command in ["list", "history", "verify", "export"] {
            let run = if command == "export" {
                if dir == &prevayler_dir {
                    continue;
                }
                check(command, dir, &[export.as_os_str()])?
            } else {
                check(command, dir, &[])?
            };
            assert_eq!(run.code, Some(0), "{command} {}: {run:?}", dir.display());
            assert!(tree(dir)? == before, "{command} changed {}", dir.display());
            if command == "export" {
                // Said, not left out silently: the journaled cell is not in it.
                let note = "not in the export: the journaled cell `cli::untouched::TALLY`";
                assert!(run.stdout.contains(note), "{}", run.stdout);
            }
        }
    }
    Ok(())
}
