//! Secret references, resolved each time the config is read (at startup and on every
//! reload, so a rotated secret is picked up by SIGHUP): `${VAR}` from the environment,
//! `${file:/path}` from a file such as a mounted Kubernetes Secret. Problems name the key
//! and the variable or file, never the value.

use std::io::Read;
use std::path::Path;

use super::units::{Secret, SecretRef};

/// The largest secret file ezgate reads: a key or a URL, not a document.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Replaces a `${VAR}` or `${file:/path}` reference in `secret` (at config key `key`) by its
/// value. Returns where the value came from ("the value of VAR", "the file /path"), for
/// later messages about it; `None` for a literal.
pub fn resolve(
    key: &str,
    secret: &mut Secret,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    match secret.reference() {
        None if secret.expose().contains("${") => Err(format!(
            "{key}: write a secret reference as exactly \"${{VAR}}\" (an environment variable) or \"${{file:/path}}\" (a file)"
        )),
        None => Ok(None),
        Some(SecretRef::Env(var)) => match env(var) {
            Some(v) if !v.is_empty() => {
                let origin = format!("the value of {var}");
                *secret = Secret::new(v);
                Ok(Some(origin))
            }
            _ => Err(format!(
                "{key}: environment variable {var} is not set; export it, or read the secret from a file with \"${{file:/path}}\""
            )),
        },
        Some(SecretRef::File(path)) => {
            let value = read_secret_file(Path::new(path))
                .map_err(|why| format!("{key}: the secret file {path} {why}"))?;
            let origin = format!("the file {path}");
            *secret = Secret::new(value);
            Ok(Some(origin))
        }
    }
}

/// A secret file's content without its one trailing newline (`\n` or `\r\n`), or why it
/// cannot be one (the reason follows "the secret file /path"; it never quotes the content).
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    if !path.is_absolute() {
        return Err(
            "is not an absolute path; write ${file:/absolute/path} (a relative path would depend on the directory ezgate was started in)"
                .to_owned(),
        );
    }
    // A FIFO or a device would block or never end: only a regular file (a symlink to one,
    // as Kubernetes mounts a Secret's keys, is followed).
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be read ({e})"))?;
    if !meta.is_file() {
        return Err("is not a regular file".to_owned());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot be read ({e})"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read ({e})"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "is larger than {} KiB; it must hold the secret alone",
            MAX_SECRET_FILE / 1024
        ));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_owned())?;
    if text.ends_with("\r\n") {
        text.truncate(text.len() - 2);
    } else if text.ends_with('\n') {
        text.truncate(text.len() - 1);
    }
    if text.is_empty() {
        return Err("is empty; write the secret into it".to_owned());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn temp(name: &str, content: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ezgate-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn from_file(path: &str) -> Result<String, String> {
        let mut s = Secret::new(format!("${{file:{path}}}"));
        resolve("upstream.api_key", &mut s, &no_env).map(|_| s.expose().to_owned())
    }

    #[test]
    fn a_file_secret_drops_one_trailing_newline() {
        for (name, content, want) in [
            ("lf", &b"sk-file\n"[..], "sk-file"),
            ("crlf", b"sk-file\r\n", "sk-file"),
            ("bare", b"sk-file", "sk-file"),
            ("two", b"sk-file\n\n", "sk-file\n"),
        ] {
            let p = temp(name, content);
            assert_eq!(from_file(p.to_str().unwrap()).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn file_problems_name_the_key_and_the_file_never_the_content() {
        let empty = temp("empty", b"\n");
        let binary = temp("binary", b"sk-\xff-secretbytes");
        let big = temp("big", &vec![b'k'; 65 * 1024]);
        let dir = empty.parent().unwrap().to_owned();
        let missing = dir.join("missing");
        for (path, why) in [
            (empty.to_str().unwrap(), "is empty"),
            (binary.to_str().unwrap(), "is not UTF-8 text"),
            (big.to_str().unwrap(), "is larger than 64 KiB"),
            (missing.to_str().unwrap(), "cannot be read"),
            (dir.to_str().unwrap(), "is not a regular file"),
            ("secrets/key", "is not an absolute path"),
            ("", "is not an absolute path"),
        ] {
            let e = from_file(path).unwrap_err();
            assert!(
                e.starts_with(&format!("upstream.api_key: the secret file {path} ")),
                "{e}"
            );
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("secretbytes") && !e.contains("kkkk"), "{e}");
        }
    }

    #[test]
    fn references_are_read_from_the_environment_or_a_file() {
        let env = |k: &str| (k == "K").then(|| "sk-env".to_owned());
        let mut s = Secret::new("${K}".into());
        assert_eq!(
            resolve("k", &mut s, &env).unwrap().as_deref(),
            Some("the value of K")
        );
        assert_eq!(s.expose(), "sk-env");
        // A literal stays; a half-written reference is refused, a file is not an env var.
        let mut s = Secret::new("sk-literal".into());
        assert_eq!(resolve("k", &mut s, &env).unwrap(), None);
        assert_eq!(s.expose(), "sk-literal");
        for bad in ["${K", "x${K}", "$${file:/x}y"] {
            let e = resolve("k", &mut Secret::new(bad.into()), &env).unwrap_err();
            assert!(e.contains("${file:/path}"), "{e}");
        }
        let asked = std::cell::Cell::new(false);
        let spy = |_: &str| {
            asked.set(true);
            None
        };
        assert!(resolve("k", &mut Secret::new("${file:/nonexistent/k}".into()), &spy).is_err());
        assert!(
            !asked.get(),
            "a file reference is never looked up in the environment"
        );
    }
}
