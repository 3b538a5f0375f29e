//! Random set / save / reload / reopen sequences against a `BTreeMap` model.

use std::collections::BTreeMap;

use instastate::{Error, StateCell, Store};
use proptest::prelude::*;

static SMALL: [StateCell<u64>; 3] = [
    StateCell::new("model::S0", || 0),
    StateCell::new("model::S1", || 0),
    StateCell::new("model::S2", || 0),
];
// Large enough, for big arguments, to be written to a value file.
static LARGE: StateCell<Vec<u16>> = StateCell::new("model::LARGE", Vec::new);

#[derive(Debug, Clone)]
enum Op {
    Set(usize, u16),
    Save,
    Reload,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, any::<u16>()).prop_map(|(cell, value)| Op::Set(cell, value)),
        2 => Just(Op::Save),
        1 => Just(Op::Reload),
        1 => Just(Op::Reopen),
    ]
}

fn large(value: u16) -> Vec<u16> {
    vec![value; usize::from(value % 8) * 1000 + 1]
}

fn set(cell: usize, value: u16) {
    match SMALL.get(cell) {
        Some(small) => small.set(value.into()),
        None => LARGE.set(large(value)),
    }
}

/// What the cells hold now, in the model's terms.
fn observe() -> BTreeMap<usize, u16> {
    let mut seen: BTreeMap<usize, u16> = SMALL
        .iter()
        .enumerate()
        .map(|(idx, cell)| (idx, u16::try_from(cell.get()).unwrap_or(u16::MAX)))
        .collect();
    let large_value = LARGE.with(|it| it.first().copied()).unwrap_or(0);
    seen.insert(3, large_value);
    seen
}

fn open(dir: &std::path::Path) -> instastate::Result<Store> {
    let [s0, s1, s2] = &SMALL;
    Store::builder().cell(s0).cell(s1).cell(s2).cell(&LARGE).open(dir)
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let fail = |err: Error| TestCaseError::fail(err.to_string());
    let dir = tempfile::tempdir().map_err(|err| TestCaseError::fail(err.to_string()))?;
    for cell in 0..4 {
        set(cell, 0);
    }
    // The model: what each cell holds, and what the store holds for it.
    let mut current: BTreeMap<usize, u16> = (0..4).map(|cell| (cell, 0)).collect();
    let mut saved: BTreeMap<usize, u16> = BTreeMap::new();
    let mut store = Some(open(dir.path()).map_err(fail)?);
    for op in ops {
        let live = store.as_ref().ok_or_else(|| TestCaseError::fail("no store"))?;
        match *op {
            Op::Set(cell, value) => {
                set(cell, value);
                current.insert(cell, value);
            }
            Op::Save => {
                live.save_all().map_err(fail)?;
                saved.clone_from(&current);
            }
            Op::Reload => {
                let res = live.reload_all();
                if saved.len() == current.len() {
                    res.map_err(fail)?;
                    current.clone_from(&saved);
                } else {
                    prop_assert!(res.is_err(), "reload succeeded with never-saved cells");
                }
            }
            Op::Reopen => {
                drop(store.take());
                store = Some(open(dir.path()).map_err(fail)?);
                for (cell, value) in &saved {
                    current.insert(*cell, *value);
                }
            }
        }
        prop_assert_eq!(observe(), current.clone(), "after {:?}", op);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cells_and_store_follow_the_model(ops in proptest::collection::vec(op(), 1..24)) {
        run(&ops)?;
    }
}
