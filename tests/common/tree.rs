//! A directory tree's every byte and modification time, to show that something
//! left it alone. Shared by the test binaries through `#[path]`.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// Every entry under a directory, by its path: a directory as `None`, a file as
/// its bytes and modification time.
pub(crate) type Tree = BTreeMap<PathBuf, Option<(Vec<u8>, SystemTime)>>;

/// Reads the tree under `dir`.
pub(crate) fn tree(dir: &Path) -> io::Result<Tree> {
    let mut found = Tree::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in fs::read_dir(&at)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                found.insert(path.clone(), None);
                stack.push(path);
            } else {
                let modified = entry.metadata()?.modified()?;
                found.insert(path.clone(), Some((fs::read(&path)?, modified)));
            }
        }
    }
    Ok(found)
}
