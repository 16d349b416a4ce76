//! The state file of local budgets (`server.state_dir`/`budgets.json`): each budget's spend
//! in its current period, written atomically (a temporary file beside it, flushed to disk,
//! renamed over it, the directory flushed) so a crash leaves the old file or the new one,
//! never half of one. A file that cannot be read or parsed is an error naming it: a budget
//! that silently restarted from zero would be money lost.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ledger::Saved;

/// The file's name inside `server.state_dir`.
pub const FILE: &str = "budgets.json";

const VERSION: u32 = 1;

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// By budget name.
    pub budgets: BTreeMap<String, Saved>,
}

/// Where the state lives: `dir`/[`FILE`].
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// What the file holds; nothing when there is no file yet (a first start).
pub fn load(file: &Path) -> Result<State, String> {
    let text = match fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => {
            return Err(format!(
                "{}: cannot read the budgets' state ({e}); fix its permissions, or move it away to start every budget from zero",
                file.display()
            ))
        }
    };
    let state: State = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{}: the budgets' state is not readable ({e}); restore it from a backup, or move it away to start every budget from zero",
            file.display()
        )
    })?;
    if state.version != VERSION {
        return Err(format!(
            "{}: the budgets' state is of version {}, this ezgate reads version {VERSION}",
            file.display(),
            state.version
        ));
    }
    Ok(state)
}

/// Checks, before ezgate serves, that the state in `dir` can be read and written again:
/// a budget that restarted from zero, or whose spend could not be written down, is money
/// lost.
pub fn check(dir: &Path) -> Result<(), String> {
    load(&path(dir))?;
    let probe = dir.join(format!(".{FILE}.{}.probe", std::process::id()));
    File::create(&probe).map_err(|e| {
        format!(
            "{}: server.state_dir is not writable ({e}); create it for the user ezgate runs as, or point state_dir elsewhere",
            dir.display()
        )
    })?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Writes `budgets` atomically.
pub fn save(file: &Path, budgets: BTreeMap<String, Saved>) -> Result<(), String> {
    let state = State {
        version: VERSION,
        budgets,
    };
    let fail = |what: &str, e: std::io::Error| format!("{}: {what}: {e}", file.display());
    let bytes = serde_json::to_vec(&state).map_err(|e| format!("{}: {e}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp).map_err(|e| fail("cannot create the temporary file", e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| fail("cannot write the temporary file", e))?;
    drop(f);
    fs::rename(&tmp, file).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        fail("cannot replace the state file", e)
    })?;
    // The rename itself survives a crash once the directory is on disk.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ezgate-budget-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn written_atomically_and_read_back() {
        let dir = scratch("roundtrip");
        let file = path(&dir);
        assert_eq!(load(&file).unwrap(), State::default());
        let mut budgets = BTreeMap::new();
        budgets.insert(
            "team-monthly".to_owned(),
            Saved {
                window: "2026-12".into(),
                key: Some("team".into()),
                accounts: vec![("search".into(), 1_250_000_000)],
            },
        );
        save(&file, budgets.clone()).unwrap();
        let back = load(&file).unwrap();
        assert_eq!(back.budgets, budgets);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [FILE]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_named() {
        let dir = scratch("check");
        assert!(check(&dir).is_ok());
        let missing = dir.join("missing");
        let e = check(&missing).unwrap_err();
        assert!(e.contains("missing") && e.contains("not writable"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = scratch("corrupt");
        let file = path(&dir);
        fs::write(&file, b"{\"version\":1,\"budgets\":{\"x\":").unwrap();
        let e = load(&file).unwrap_err();
        assert!(
            e.contains("budgets.json") && e.contains("not readable"),
            "{e}"
        );
        fs::write(&file, b"{\"version\":9,\"budgets\":{}}").unwrap();
        assert!(load(&file).unwrap_err().contains("version 9"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_written_before_budgets_named_their_key_is_read() {
        let dir = scratch("keyless");
        let file = path(&dir);
        fs::write(
            &file,
            r#"{"version":1,"budgets":{"b":{"window":"2026-12","accounts":[["search",5]]}}}"#,
        )
        .unwrap();
        let b = &load(&file).unwrap().budgets["b"];
        assert_eq!((b.key.as_deref(), b.accounts.len()), (None, 1));
        fs::remove_dir_all(&dir).unwrap();
    }
}
