//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz
//! targets' entry points, so that every test run checks the inputs the fuzzer
//! kept, without libFuzzer or a nightly compiler. Needs the `fuzz` feature, which
//! the README's test command (`--all-features`) turns on.
//!
//! A fuzz run (see `fuzz/README.md`) adds inputs to the corpus; a crash it finds
//! becomes a file in `fuzz/corpus/<target>/` once fixed, and is replayed here.
//! `INSTASTATE_WRITE_SEEDS=1` makes the test first write the seeds the library
//! makes (`instastate::fuzz::seeds`) into the corpus.

use std::{fs, path::Path};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

/// Every target, by its name in `fuzz/`, and its entry point.
const TARGETS: [(&str, Target); 7] = [
    ("record", instastate::fuzz::record),
    ("manifest", instastate::fuzz::manifest),
    ("store_meta", instastate::fuzz::store_meta),
    ("journal", instastate::fuzz::journal),
    ("snapshot", instastate::fuzz::snapshot),
    ("export", instastate::fuzz::export),
    ("event_batch", instastate::fuzz::event_batch),
];

#[test]
fn every_input_of_the_committed_corpus_passes_its_target() -> TestResult {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    if std::env::var_os("INSTASTATE_WRITE_SEEDS").is_some() {
        for (target, bytes) in instastate::fuzz::seeds() {
            let dir = corpus.join(target);
            fs::create_dir_all(&dir)?;
            fs::write(dir.join(format!("seed-{:08x}", crc32fast::hash(&bytes))), bytes)?;
        }
    }
    for (target, run) in TARGETS {
        let dir = corpus.join(target);
        let mut inputs = 0;
        for entry in fs::read_dir(&dir).map_err(|err| format!("{}: {err}", dir.display()))? {
            let path = entry?.path();
            let data = fs::read(&path)?;
            let res = std::panic::catch_unwind(|| run(&data));
            if res.is_err() {
                return Err(format!("fuzz target {target} fails on {}", path.display()).into());
            }
            inputs += 1;
        }
        assert!(10 <= inputs, "the corpus of {target} holds only {inputs} inputs");
    }
    Ok(())
}
