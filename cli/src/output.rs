//! Output paths, checked before any work starts: a bad path must not throw
//! away a finished measurement.

use std::fs::OpenOptions;
use std::path::Path;

/// Creates and removes a probe file in `dir`: proves it is a writable
/// directory.
fn probe(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".mmu-vmm-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("cannot write into {}: {e}", dir.display()))?;
    std::fs::remove_file(&probe)
        .map_err(|e| format!("cannot remove the probe file {}: {e}", probe.display()))
}

/// The directory a file named `path` goes into.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `path` can be written as a file: its directory exists and is writable,
/// and `path` is not a directory.
pub(crate) fn check_file(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a directory, not a file", path.display()));
    }
    let dir = parent(path);
    if !dir.is_dir() {
        return Err(format!(
            "cannot write {}: the directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    probe(dir)
}

/// `path` is a writable directory, or one that can be created in a
/// writable directory.
pub(crate) fn check_dir(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return probe(path);
    }
    if path.exists() {
        return Err(format!("{} exists and is not a directory", path.display()));
    }
    let dir = parent(path);
    if !dir.is_dir() {
        return Err(format!(
            "cannot create {}: the directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    probe(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        let dir = std::env::temp_dir();
        assert!(check_file(&dir.join("plot.svg")).is_ok());
        assert!(check_file(&dir).is_err());
        assert!(check_file(Path::new("/nonexistent/x.svg")).is_err());
        assert!(check_dir(&dir).is_ok());
        assert!(check_dir(&dir.join("new-report")).is_ok());
        assert!(check_dir(Path::new("/nonexistent/a/b")).is_err());
    }
}
