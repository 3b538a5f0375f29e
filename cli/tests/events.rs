//! Runs the `instastate` binary against event stores written with the library:
//! `list`, `read`, `follow` and `verify`, while the store's program is stopped and
//! while it runs.
//!
//! Tests run in parallel in one binary, so each one uses its own temp dir. The
//! follow test runs this binary again as the program that appends (see `APPEND_TO`).

use std::{
    env,
    error::Error,
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use instastate::{
    EncryptionKey,
    events::{Append, Durability, EventId, EventStore, Expected, NewEvent},
};
use serde::{Deserialize, Serialize};

#[path = "../../tests/common/tree.rs"]
mod tree;
use tree::tree;

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// Set in the child the follow test starts: the store it appends to.
const APPEND_TO: &str = "INSTASTATE_CLI_APPEND_TO";
/// How many events that child appends.
const CHILD_EVENTS: usize = 150;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Bank {
    Opened { owner: String },
    Deposited { amount: i64 },
    Closed,
    Noted(String, Option<u32>),
}

/// What one run of the tool did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

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

/// Runs `command` on the store in `dir`, with `extra` arguments after it.
fn check(command: &str, dir: &Path, extra: &[&str]) -> TestResult<Run> {
    let mut args = vec![OsStr::new(command), dir.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    instastate(args)
}

/// The events `fill` appends, in position order: stream, version, event.
fn filled() -> Vec<(&'static str, u64, Bank)> {
    vec![
        ("account-1", 0, Bank::Opened { owner: "alice".into() }),
        ("account-1", 1, Bank::Deposited { amount: 100 }),
        ("account-2", 0, Bank::Opened { owner: "bob".into() }),
        ("account-1", 2, Bank::Deposited { amount: -30 }),
        ("account-2", 1, Bank::Noted("vip \"gold\"".into(), Some(7))),
        ("audit", 0, Bank::Noted("two streams at once".into(), None)),
        ("account-2", 2, Bank::Closed),
    ]
}

/// Appends `filled()` to the store in `dir`, with a checkpoint (so a second
/// journal file) in the middle; returns the id of the event at position 1.
fn fill(dir: &Path, key: Option<&[u8; 32]>) -> TestResult<EventId> {
    let mut builder = EventStore::<Bank>::builder();
    if let Some(key) = key {
        builder = builder.encryption_key(EncryptionKey::from_bytes(*key));
    }
    let store = builder.open(dir)?;
    let cause = EventId::new();
    store.append("account-1", Expected::NoStream, [Bank::Opened { owner: "alice".into() }])?;
    store.append(
        "account-1",
        Expected::Exact(0),
        [NewEvent::new(Bank::Deposited { amount: 100 }).with_id(cause).tagged(["money"])],
    )?;
    store.append("account-2", Expected::NoStream, [Bank::Opened { owner: "bob".into() }])?;
    store.checkpoint()?;
    store.append(
        "account-1",
        Expected::Exact(1),
        [NewEvent::new(Bank::Deposited { amount: -30 }).caused_by(cause).correlated_with(cause)],
    )?;
    store.append_all([
        Append::new("account-2", Expected::Exact(0), [Bank::Noted("vip \"gold\"".into(), Some(7))]),
        Append::new("audit", Expected::NoStream, [Bank::Noted("two streams at once".into(), None)]),
    ])?;
    store.append("account-2", Expected::Any, [Bank::Closed])?;
    store.close()?;
    Ok(cause)
}

/// The JSON objects of `stdout`, one per line.
fn json_lines(stdout: &str) -> TestResult<Vec<serde_json::Value>> {
    stdout.lines().map(|line| Ok(serde_json::from_str(line)?)).collect()
}

/// A JSON event's position, stream, version and data.
fn summary(event: &serde_json::Value) -> (u64, String, u64, serde_json::Value) {
    (
        event["position"].as_u64().unwrap_or(u64::MAX),
        event["stream"].as_str().unwrap_or_default().to_owned(),
        event["version"].as_u64().unwrap_or(u64::MAX),
        event["data"].clone(),
    )
}

/// What `summary` should give for `filled()[position]`.
fn expected(position: usize) -> TestResult<(u64, String, u64, serde_json::Value)> {
    let (stream, version, event) = filled().get(position).cloned().ok_or("no such event")?;
    Ok((position as u64, stream.to_owned(), version, serde_json::to_value(event)?))
}

#[test]
fn list_shows_the_streams_and_the_head() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    let run = check("list", &dir, &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let first = run.stdout.lines().next().unwrap_or_default();
    for part in ["7 events in 3 streams", "head position 7", "6 appends", "Bank`"] {
        assert!(first.contains(part), "no {part} in {first}");
    }
    assert!(first.contains("last checkpoint after 3 appends"), "{first}");
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .skip_while(|line| !line.starts_with("STREAM"))
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [vec!["account-1", "3", "2"], vec!["account-2", "3", "2"], vec!["audit", "1", "0"]],
        "{}",
        run.stdout
    );
    Ok(())
}

#[test]
fn read_prints_every_event_with_its_details_and_json_that_other_tools_read() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    let cause = fill(&dir, None)?;

    let run = check("read", &dir, &["$all", "--json"])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let events = json_lines(&run.stdout)?;
    assert_eq!(events.len(), filled().len(), "{}", run.stdout);
    for (position, event) in events.iter().enumerate() {
        // The data reads back as serde_json writes the program's own type.
        assert_eq!(summary(event), expected(position)?, "{event}");
        let time = event["time"].as_str().unwrap_or_default();
        assert!(time.starts_with("20") && time.ends_with('Z') && time.len() == 27, "{time}");
        assert_eq!(event["id"].as_str().map(str::len), Some(36), "{event}");
    }
    let types: Vec<&str> = events.iter().filter_map(|it| it["type"].as_str()).collect();
    assert_eq!(
        types,
        ["Opened", "Deposited", "Opened", "Deposited", "Noted", "Noted", "Closed"],
        "{}",
        run.stdout
    );
    let with_meta = events.get(3).ok_or("no event 3")?;
    assert_eq!(with_meta["causation"].as_str(), Some(cause.to_string().as_str()));
    assert_eq!(with_meta["correlation"].as_str(), Some(cause.to_string().as_str()));
    let tagged = events.get(1).ok_or("no event 1")?;
    assert_eq!(tagged["id"].as_str(), Some(cause.to_string().as_str()));
    assert_eq!(tagged["tags"], serde_json::json!(["money"]));
    assert_eq!(events.first().map(|it| it["causation"].is_null()), Some(true));

    // Text: one line per event, the data Rust-like.
    let text = check("read", &dir, &[])?;
    assert_eq!(text.code, Some(0), "{text:?}");
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", text.stdout);
    let line = lines.get(4).copied().unwrap_or_default();
    assert!(line.starts_with("4  account-2 v1  20"), "{line}");
    assert!(
        line.contains("Noted  ") && line.contains(r#"Noted("vip \"gold\"", Some(7))"#),
        "{line}"
    );
    let line = lines.get(3).copied().unwrap_or_default();
    assert!(line.contains("Deposited { amount: -30 }"), "{line}");
    assert!(line.contains(&format!("causation={cause}  correlation={cause}")), "{line}");
    assert!(lines.get(1).is_some_and(|line| line.ends_with("tags=money")), "{}", text.stdout);

    // One stream, backward, from a version, with a limit; filters.
    let run = check("read", &dir, &["account-1", "--json", "--backward", "--limit", "2"])?;
    let got: Vec<(u64, String, u64, serde_json::Value)> =
        json_lines(&run.stdout)?.iter().map(summary).collect();
    assert_eq!(got, [expected(3)?, expected(1)?], "{run:?}");
    let run = check("read", &dir, &["account-2", "--json", "--from", "1"])?;
    let got: Vec<u64> = json_lines(&run.stdout)?.iter().map(|it| summary(it).0).collect();
    assert_eq!(got, [4, 6], "{run:?}");
    let run =
        check("read", &dir, &["$all", "--json", "--backward", "--from", "4", "--limit", "3"])?;
    let got: Vec<u64> = json_lines(&run.stdout)?.iter().map(|it| summary(it).0).collect();
    assert_eq!(got, [4, 3, 2], "{run:?}");
    let run = check("read", &dir, &["$all", "--json", "--type", "Opened"])?;
    let got: Vec<u64> = json_lines(&run.stdout)?.iter().map(|it| summary(it).0).collect();
    assert_eq!(got, [0, 2], "{run:?}");
    let run = check("read", &dir, &["$all", "--json", "--prefix", "account-2"])?;
    let got: Vec<u64> = json_lines(&run.stdout)?.iter().map(|it| summary(it).0).collect();
    assert_eq!(got, [2, 4, 6], "{run:?}");
    let run = check("read", &dir, &["nobody"])?;
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), ""), "{run:?}");
    Ok(())
}

#[test]
fn data_whose_structure_is_not_recorded_is_shown_in_hex_with_a_note() -> TestResult {
    // serde cannot trace an untagged enum: the journal records no structure.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Loose {
        Number(u32),
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    {
        let store = EventStore::<Loose>::open(&dir)?;
        store.append("loose", Expected::Any, [Loose::Number(5)])?;
    }
    let run = check("read", &dir, &["$all", "--json"])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let events = json_lines(&run.stdout)?;
    let event = events.first().ok_or("no event")?;
    assert!(event["data"].is_null(), "{event}");
    assert_eq!(event["data_hex"].as_str(), Some("05"), "{event}");
    assert!(event["data_note"].as_str().is_some_and(|it| it.contains("no structure")), "{event}");
    let text = check("read", &dir, &[])?;
    assert!(text.stdout.contains("0x05 (not decoded: "), "{text:?}");
    Ok(())
}

#[test]
fn verify_exits_0_for_a_sound_store_and_names_the_file_and_offset_of_damage() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    let run = check("verify", &dir, &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("is sound: 7 events in 3 streams, 6 appends, 1 checkpoint checked"),
        "{run:?}"
    );

    // A byte flipped in the middle of the first journal file.
    let files = journal_files(&dir)?;
    assert_eq!(files.len(), 2, "a checkpoint starts a second file: {files:?}");
    let first = files.first().ok_or("no journal file")?;
    let mut bytes = fs::read(first)?;
    let flip = bytes.len() / 2 + 40;
    if let Some(byte) = bytes.get_mut(flip) {
        *byte ^= 0x08;
    }
    let damaged = tmp.path().join("damaged");
    copy_dir(&dir, &damaged)?;
    let damaged_file = damaged.join(first.file_name().ok_or("no name")?);
    fs::write(&damaged_file, &bytes)?;
    let run = check("verify", &damaged, &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    let line = run.stdout.lines().find(|line| line.contains(" at byte ")).ok_or("no damage")?;
    assert!(line.starts_with(&format!("{} at byte ", damaged_file.display())), "{line}");
    let offset: usize = line
        .split(" at byte ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .ok_or("no offset")?
        .parse()?;
    // The offset is the start of the frame holding the flipped byte.
    let len = bytes.get(offset..offset + 4).ok_or("offset out of range")?;
    let len = u32::from_le_bytes(len.try_into()?) as usize;
    assert!(offset <= flip && flip < offset + 8 + len, "{offset} {flip} {len}: {line}");
    assert!(run.stdout.contains("is NOT sound: 1 problem"), "{run:?}");

    // A torn last write: a note, and sound. (Only a crash tears a write: in a copy
    // without the lock file, which says the store was closed cleanly, it is taken
    // for one, as in a copy of a store whose program crashed.)
    let torn = tmp.path().join("torn");
    copy_dir(&dir, &torn)?;
    fs::remove_file(torn.join("instastate.lock"))?;
    let last = journal_files(&torn)?.pop().ok_or("no journal file")?;
    let mut bytes = fs::read(&last)?;
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 0, 5]);
    fs::write(&last, bytes)?;
    let run = check("verify", &torn, &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("note: the last write was torn by a crash (11 B"), "{run:?}");
    let listed = check("list", &torn, &[])?;
    assert!(listed.stdout.contains("torn last write of 11 B"), "{listed:?}");
    let read = check("read", &torn, &["--json"])?;
    assert_eq!(json_lines(&read.stdout)?.len(), 7, "{read:?}");

    // A damaged checkpoint is named.
    let bad_checkpoint = tmp.path().join("bad-checkpoint");
    copy_dir(&dir, &bad_checkpoint)?;
    let snapshot = fs::read_dir(&bad_checkpoint)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|it| it == "snap"))
        .ok_or("no checkpoint")?;
    let mut bytes = fs::read(&snapshot)?;
    let at = bytes.len() - 3;
    if let Some(byte) = bytes.get_mut(at) {
        *byte ^= 0x01;
    }
    fs::write(&snapshot, bytes)?;
    let run = check("verify", &bad_checkpoint, &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains(&format!("{} at byte 0: ", snapshot.display())), "{run:?}");
    Ok(())
}

#[test]
fn verify_finds_a_checkpoint_that_disagrees_with_the_journal_and_an_id_used_twice() -> TestResult {
    let tmp = tempfile::tempdir()?;
    // Two stores of three appends each, checkpointed: their checkpoints have the
    // same name, and each reads back soundly, but holds other streams.
    let (mine, theirs) = (tmp.path().join("mine"), tmp.path().join("theirs"));
    for (dir, streams) in [(&mine, ["a", "a", "a"]), (&theirs, ["b", "c", "d"])] {
        let store = EventStore::<Bank>::open(dir)?;
        for stream in streams {
            store.append(stream, Expected::Any, [Bank::Closed])?;
        }
        store.checkpoint()?;
    }
    let checkpoint = |dir: &Path| -> TestResult<PathBuf> {
        let found = fs::read_dir(dir)?.filter_map(Result::ok).map(|entry| entry.path());
        Ok(found
            .filter(|path| path.extension().is_some_and(|it| it == "snap"))
            .last()
            .ok_or("none")?)
    };
    let (ours, other) = (checkpoint(&mine)?, checkpoint(&theirs)?);
    assert_eq!(check("verify", &mine, &[])?.code, Some(0));
    fs::copy(&other, &ours)?;
    let run = check("verify", &mine, &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "{} at byte 0: the checkpoint disagrees with the journal",
            ours.display()
        )),
        "{run:?}"
    );

    // Without a window of recent ids the store does not see an id come again;
    // verify does.
    let twice = tmp.path().join("twice");
    let id = EventId::new();
    {
        let store = EventStore::<Bank>::builder().recent_ids(0).open(&twice)?;
        store.append("a", Expected::Any, [NewEvent::new(Bank::Closed).with_id(id)])?;
        store.append("b", Expected::Any, [NewEvent::new(Bank::Closed).with_id(id)])?;
    }
    let run = check("verify", &twice, &[])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.contains(&format!("event id {id} comes twice: at positions 0 and 1")),
        "{run:?}"
    );
    assert!(run.stdout.contains("journal-00000000000000000000.log at byte "), "{run:?}");
    Ok(())
}

#[test]
fn verify_reports_on_a_store_a_running_program_has_open() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    let store = EventStore::<Bank>::open(&dir)?;
    store.append("account-3", Expected::NoStream, [Bank::Opened { owner: "carol".into() }])?;
    let run = check("verify", &dir, &[])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("is open in a running program"), "{run:?}");
    assert!(run.stdout.contains("is sound: 8 events in 4 streams"), "{run:?}");
    let listed = check("list", &dir, &[])?;
    assert!(listed.stdout.contains("open in a running program"), "{listed:?}");
    let read = check("read", &dir, &["account-3", "--json"])?;
    assert_eq!(json_lines(&read.stdout)?.len(), 1, "{read:?}");
    drop(store);
    Ok(())
}

#[test]
fn other_directories_and_wrong_keys_are_refused_clearly() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let prevayler = tmp.path().join("prevayler");
    {
        let counter = instastate::Prevayler::open(&prevayler, 0u64, |n: &mut u64, by: u64, _| {
            *n += by;
        })?;
        counter.handle(1)?;
    }
    let run = check("read", &prevayler, &[])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("no event store at"), "{run:?}");
    assert!(run.stderr.contains("journal of a `Prevayler`"), "{run:?}");
    // The other commands still take it as a Prevayler directory.
    assert_eq!(check("verify", &prevayler, &[])?.code, Some(0));
    let missing = check("follow", &tmp.path().join("nothing"), &[])?;
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(missing.stderr.contains("does not exist"), "{missing:?}");

    let key = [7u8; 32];
    let dir = tmp.path().join("sealed");
    fill(&dir, Some(&key))?;
    let key_file = tmp.path().join("key");
    fs::write(&key_file, key)?;
    let wrong_file = tmp.path().join("wrong");
    fs::write(&wrong_file, [8u8; 32])?;
    let key_arg = key_file.to_str().ok_or("path")?;
    let run = check("read", &dir, &["--json", "--key-file", key_arg])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(json_lines(&run.stdout)?.len(), 7, "{run:?}");
    assert_eq!(summary(json_lines(&run.stdout)?.get(4).ok_or("no event")?), expected(4)?);
    let listed = check("list", &dir, &["--key-file", key_arg])?;
    assert!(listed.stdout.contains("encrypted"), "{listed:?}");
    assert_eq!(check("verify", &dir, &["--key-file", key_arg])?.code, Some(0));
    let without = check("read", &dir, &[])?;
    assert_eq!(without.code, Some(2), "{without:?}");
    assert!(without.stderr.contains("is encrypted; open it with its key"), "{without:?}");
    let wrong = check("verify", &dir, &["--key-file", wrong_file.to_str().ok_or("path")?])?;
    assert_eq!(wrong.code, Some(2), "{wrong:?}");
    assert!(wrong.stderr.contains("wrong key"), "{wrong:?}");
    Ok(())
}

#[test]
fn a_stream_id_no_stream_can_have_is_refused_not_read_as_empty() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    for (bad, why) in [("account-1 ", "whitespace"), ("", "empty"), ("$alll", "`$`")] {
        for (command, extra) in [("read", vec![bad]), ("follow", vec!["--stream", bad])] {
            let run = check(command, &dir, &extra)?;
            assert_eq!(run.code, Some(2), "{command} {bad:?}: {run:?}");
            assert!(run.stdout.is_empty(), "{command} {bad:?}: {run:?}");
            assert!(run.stderr.contains(&format!("`{bad}`")), "{command} {bad:?}: {run:?}");
            assert!(run.stderr.contains(why), "{command} {bad:?}: {run:?}");
        }
    }
    Ok(())
}

#[test]
fn reading_commands_change_no_file_of_an_event_store() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    // A torn write, which opening the store would cut, and a checkpoint left half
    // written, which opening would delete. (Without the lock file, which says the
    // store was closed cleanly, the bad end is taken for a crash's torn write.)
    fs::remove_file(dir.join("instastate.lock"))?;
    let last = journal_files(&dir)?.pop().ok_or("no journal file")?;
    let mut bytes = fs::read(&last)?;
    bytes.extend_from_slice(&[50, 0, 0, 0, 9, 9]);
    fs::write(&last, bytes)?;
    fs::write(dir.join("snapshot-00000000000000000009.snap.part"), b"half")?;
    let before = tree::tree(&dir)?;
    for args in [vec![], vec!["--json"], vec!["account-1", "--backward"]] {
        let run = check("read", &dir, &args)?;
        assert_eq!(run.code, Some(0), "{run:?}");
    }
    for command in ["list", "verify", "history"] {
        let run = check(command, &dir, &[])?;
        assert_eq!(run.code, Some(0), "{command}: {run:?}");
        if command == "history" {
            // An event store, not taken for a Prevayler journal.
            assert!(run.stdout.starts_with("event store"), "{}", run.stdout);
        }
    }
    let export = check("export", &dir, &["out.export"])?;
    assert_eq!(export.code, Some(2), "{export:?}");
    assert!(export.stderr.contains("holds an event store"), "{}", export.stderr);
    let mut follower = spawn_follow(&dir, &["--from", "0"])?;
    let lines = collect(&mut follower, 7, Duration::from_secs(20))?;
    stop(&mut follower.child)?;
    assert_eq!(lines.len(), 7);
    assert!(tree(&dir)? == before, "a reading command changed the store");
    Ok(())
}

/// A follower: its process, and the lines it prints.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn spawn_follow(dir: &Path, extra: &[&str]) -> TestResult<Follower> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_instastate"))
        .arg("follow")
        .arg(dir)
        .args(["--json", "--poll-ms", "10"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Follower { child, lines })
}

/// The first `n` lines the follower prints, waiting at most `patience`.
fn collect(follower: &mut Follower, n: usize, patience: Duration) -> TestResult<Vec<String>> {
    let deadline = Instant::now() + patience;
    let mut lines = Vec::new();
    while lines.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = follower.lines.recv_timeout(left) else {
            stop(&mut follower.child)?;
            let mut stderr = String::new();
            if let Some(mut pipe) = follower.child.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
            }
            let got = lines.len();
            return Err(format!("{got} of {n} lines in time: {lines:?}; {stderr}").into());
        };
        lines.push(line);
    }
    Ok(lines)
}

/// Stops a process this test started.
fn stop(child: &mut Child) -> TestResult {
    child.kill()?;
    child.wait()?;
    Ok(())
}

#[test]
fn follow_prints_every_event_once_and_in_order_while_a_child_appends() -> TestResult {
    if let Some(dir) = env::var_os(APPEND_TO) {
        return append_as_child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    let initial = filled().len();
    // From position 2: the events already there, then the child's as they come.
    let mut follower = spawn_follow(&dir, &["--from", "2"])?;
    let early = collect(&mut follower, initial - 2, Duration::from_secs(20))?;
    let appender = Command::new(env::current_exe()?)
        .args(["--exact", "follow_prints_every_event_once_and_in_order_while_a_child_appends"])
        .env(APPEND_TO, &dir)
        .stdout(Stdio::null())
        .spawn();
    let mut appender = match appender {
        Ok(child) => child,
        Err(err) => {
            stop(&mut follower.child)?;
            return Err(err.into());
        }
    };
    let later = collect(&mut follower, CHILD_EVENTS, Duration::from_mins(1));
    let status = appender.wait()?;
    // Nothing more comes: the follower prints each event once.
    thread::sleep(Duration::from_millis(200));
    let extra: Vec<String> = follower.lines.try_iter().collect();
    stop(&mut follower.child)?;
    assert!(status.success(), "the appender failed: {status}");
    let lines: Vec<String> = early.into_iter().chain(later?).collect();
    assert!(extra.is_empty(), "printed more than once: {extra:?}");
    let events: Vec<serde_json::Value> =
        lines.iter().map(|line| serde_json::from_str(line)).collect::<Result<_, _>>()?;
    let positions: Vec<u64> = events.iter().map(|it| summary(it).0).collect();
    let want: Vec<u64> = (2..(initial + CHILD_EVENTS) as u64).collect();
    assert_eq!(positions, want, "every position once, in order");
    for event in events.iter().skip(initial - 2) {
        let (position, stream, version, data) = summary(event);
        let n = position - initial as u64;
        assert_eq!(stream, format!("live-{}", n % 3), "{event}");
        assert_eq!(version, n / 3, "{event}");
        assert_eq!(data, serde_json::to_value(Bank::Deposited { amount: n.try_into()? })?);
    }
    // The appender's checkpoints started new journal files while it was followed.
    assert!(3 < journal_files(&dir)?.len(), "{:?}", journal_files(&dir)?);
    Ok(())
}

/// The child of the follow test: appends `CHILD_EVENTS` events to three streams,
/// one or two at a time, with checkpoints (so new journal files) every few appends.
fn append_as_child(dir: &Path) -> TestResult {
    let store = EventStore::<Bank>::builder()
        .durability(Durability::GroupCommit)
        .checkpoint_every(10)
        .open(dir)?;
    let mut n = 0;
    let total = CHILD_EVENTS as u64;
    while n < total {
        let event = |n: u64| -> TestResult<Append<Bank>> {
            let amount = i64::try_from(n)?;
            Ok(Append::new(format!("live-{}", n % 3), Expected::Any, [Bank::Deposited { amount }]))
        };
        if n % 4 == 0 && n + 1 < total {
            store.append_all([event(n)?, event(n + 1)?])?;
            n += 2;
        } else {
            store.append_all([event(n)?])?;
            n += 1;
        }
        thread::sleep(Duration::from_millis(2));
    }
    store.close()?;
    Ok(())
}

#[test]
fn follow_fails_clearly_when_a_journal_file_disappears() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    fill(&dir, None)?;
    let mut follower = spawn_follow(&dir, &["--from", "0"])?;
    collect(&mut follower, 7, Duration::from_secs(20))?;
    let last = journal_files(&dir)?.pop().ok_or("no journal file")?;
    fs::rename(&last, tmp.path().join("moved.log"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = follower.child.try_wait()? {
            break status;
        }
        if deadline < Instant::now() {
            stop(&mut follower.child)?;
            return Err("the follower did not notice".into());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = follower.child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
    }
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("disappeared") && stderr.contains(&last.display().to_string()),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn the_event_commands_have_help() -> TestResult {
    for command in ["read", "follow"] {
        let help = instastate([command, "--help"])?;
        assert_eq!(help.code, Some(0), "{help:?}");
        assert!(help.stdout.contains("--json") && help.stdout.contains("--from"), "{help:?}");
    }
    let top = instastate(["--help"])?;
    assert!(top.stdout.contains("read") && top.stdout.contains("follow"), "{top:?}");
    Ok(())
}

/// The journal files in `dir`, in order.
fn journal_files(dir: &Path) -> TestResult<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|it| it == "log"));
    files.sort();
    Ok(files)
}

/// Copies the files of directory `from` into the new directory `to`.
fn copy_dir(from: &Path, to: &Path) -> TestResult {
    fs::create_dir(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

#[test]
fn removed_events_are_left_out_unless_asked_for_and_commands_verify() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<Bank>::open(dir.path())?;
        events.append("cart-1", Expected::NoStream, [Bank::Deposited { amount: 1 }])?;
        events.append("cart-2", Expected::NoStream, [Bank::Deposited { amount: 2 }])?;
        let linked = NewEvent::new(Bank::Closed).tagged(["cart-2"]).linked_to(["key-1"]);
        events.append("cart-2", Expected::Exact(0), [linked])?;
        events.delete_stream("cart-1", Expected::Exact(0))?;
        events.truncate_stream("cart-2", 1)?;
        events.set_retention("cart-2", instastate::events::Retention::default().max_count(5))?;
        events.append_effect("key-1", "expired")?;
        events.checkpoint()?;
        events.append("cart-3", Expected::Any, [Bank::Closed])?;
    }
    let read = check("read", dir.path(), &[])?;
    assert_eq!(read.code, Some(0), "{read:?}");
    let lines: Vec<&str> = read.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", read.stdout);
    let first = lines.first().copied().unwrap_or_default();
    assert!(first.contains("cart-2 v1") && first.contains("triggers=key-1"), "{first}");
    let all = check("read", dir.path(), &["--removed", "--json"])?;
    let json = json_lines(&all.stdout)?;
    let removed: Vec<bool> = json.iter().map(|it| it["removed"] == true).collect();
    assert_eq!(removed, [true, true, false, false], "{}", all.stdout);
    // A limit counts the events shown, not the removed ones passed over.
    let limited = check("read", dir.path(), &["--limit", "1"])?;
    assert_eq!(limited.stdout.lines().collect::<Vec<_>>(), [first], "{limited:?}");
    let stream = check("read", dir.path(), &["cart-2", "--limit", "1"])?;
    assert_eq!(stream.stdout.lines().collect::<Vec<_>>(), [first], "{stream:?}");
    let verify = check("verify", dir.path(), &[])?;
    assert_eq!(verify.code, Some(0), "{verify:?}");
    // Once compaction dropped the removed events' data, that is what is shown,
    // not data that fails to decode.
    EventStore::<Bank>::open(dir.path())?.compact()?;
    let text = check("read", dir.path(), &["--removed"])?;
    let dropped =
        text.stdout.lines().filter(|it| it.contains("(its data was dropped by compaction)"));
    assert_eq!(dropped.count(), 2, "{text:?}");
    assert!(!text.stdout.contains("not decoded"), "{text:?}");
    let json = json_lines(&check("read", dir.path(), &["--removed", "--json"])?.stdout)?;
    let notes: Vec<&serde_json::Value> = json.iter().map(|it| &it["data_note"]).collect();
    let note = serde_json::Value::from("its data was dropped by compaction");
    assert_eq!(notes, [&note, &note, &serde_json::Value::Null, &serde_json::Value::Null]);
    assert!(json.iter().all(|it| it.get("data_hex").is_none()), "{json:?}");
    Ok(())
}

/// Data JSON cannot hold (an integer past 64 bits) is not given as `null` without
/// a word: the line carries its bytes in hex and why.
#[test]
fn data_that_json_cannot_hold_is_given_in_hex_with_why() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<u128>::open(dir.path())?;
        events.append("big", Expected::NoStream, [u128::MAX, 7])?;
    }
    let read = check("read", dir.path(), &["big", "--json"])?;
    assert_eq!(read.code, Some(0), "{read:?}");
    let json = json_lines(&read.stdout)?;
    let [huge, small] = json.as_slice() else { return Err(read.stdout.into()) };
    assert!(huge["data_note"].as_str().is_some_and(|it| it.contains("JSON")), "{huge}");
    assert!(huge["data_hex"].is_string(), "{huge}");
    assert_eq!(small["data"], 7, "{small}");
    Ok(())
}
