//! TOML text → [`Config`], reporting every problem serde finds rather than the first, each
//! with its line.
//!
//! serde stops at the first error. [`read`] records it (key path and line), removes the value
//! it was about from the document and deserializes again, up to [`MAX_PROBLEMS`] times. Later
//! problems keep the key paths and lines of the file as written: when a whole `[[limits]]`
//! table is removed, the indices of the tables after it are mapped back. Validation problems
//! found afterwards get a line from their key path too ([`Read::locate`]), and those that
//! only follow from a removed value are left out ([`Read::follows_from_removed`]).

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, TableLike, Value};

use super::Config;

/// Reading stops after this many problems; a file with more has bigger trouble.
pub const MAX_PROBLEMS: usize = 20;

/// One step of a key path: `limits[2].requests` is `limits`, `[2]`, `requests`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A key path, printed as `limits[2].requests`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KeyPath(Vec<Seg>);

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl KeyPath {
    fn from_serde(p: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment;
        KeyPath(
            p.iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(Seg::Index(*index)),
                    Segment::Map { key } => Some(Seg::Key(key.clone())),
                    Segment::Enum { .. } | Segment::Unknown => None,
                })
                .collect(),
        )
    }

    /// The key path a problem message starts with: `limits[2] ("b").name: duplicate …` →
    /// `limits[2].name`. The quoted policy name is dropped.
    fn of_problem(problem: &str) -> Option<KeyPath> {
        let mut plain = String::new();
        let mut rest = problem;
        while let Some(at) = rest.find(" (\"") {
            plain.push_str(&rest[..at]);
            rest = rest[at..].split_once("\")").map_or("", |(_, after)| after);
        }
        plain.push_str(rest);
        let plain = plain.split(": ").next()?;
        let mut segs = Vec::new();
        for part in plain.split('.') {
            let (key, mut idx) = part.split_once('[').map_or((part, ""), |(k, i)| (k, i));
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None;
            }
            segs.push(Seg::Key(key.to_owned()));
            while !idx.is_empty() {
                let (n, after) = idx.split_once(']')?;
                segs.push(Seg::Index(n.parse().ok()?));
                idx = after.strip_prefix('[').unwrap_or(after);
            }
        }
        Some(KeyPath(segs))
    }

    fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// Up to and including the last index: the `[[limits]]` table a key belongs to.
    fn owner(&self) -> KeyPath {
        let end = self
            .0
            .iter()
            .rposition(|s| matches!(s, Seg::Index(_)))
            .map_or(self.0.len().saturating_sub(1), |i| i + 1);
        KeyPath(self.0[..end].to_vec())
    }
}

/// What [`read`] found.
pub struct Read {
    pub config: Config,
    /// Deserialization problems, `key.path: what is wrong (line N)`.
    pub problems: Vec<String>,
    doc: ImDocument<String>,
    /// Values removed to read on, as written in the file (original indices).
    removed: Vec<KeyPath>,
}

/// Reads the text. `Err` holds the one problem when the text is not TOML at all.
pub fn read(text: &str) -> Result<Read, String> {
    let doc = ImDocument::parse(text.to_owned()).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!(" (line {})", line_at(text, s.start)))
            .unwrap_or_default();
        let msg = e.message().trim().replace('\n', "; ");
        format!("not valid TOML: {msg}{at}")
    })?;
    let mut root = Item::Table(doc.as_table().clone());
    let mut read = Read {
        config: Config::default(),
        problems: Vec::new(),
        doc,
        removed: Vec::new(),
    };
    for _ in 0..MAX_PROBLEMS {
        let table = match &root {
            Item::Table(t) => t.clone(),
            _ => Table::new(),
        };
        let de = toml_edit::de::Deserializer::from(toml_edit::DocumentMut::from(table));
        let err = match serde_path_to_error::deserialize::<_, Config>(de) {
            Ok(config) => {
                read.config = config;
                return Ok(read);
            }
            Err(e) => e,
        };
        let current = KeyPath::from_serde(err.path());
        let inner = err.into_inner();
        let msg = inner.message().trim().to_owned();
        let original = read.to_original(&current);
        let line = inner
            .span()
            .map(|s| line_at(text, s.start))
            .or_else(|| read.line_of(&original));
        // A value removed for its type is then missing: that is the same problem again.
        let echo = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
            .is_some_and(|field| {
                let mut p = original.clone();
                p.0.push(Seg::Key(field.to_owned()));
                read.removed.contains(&p)
            });
        if !echo {
            read.problems.push(problem(&original, &msg, line));
        }
        if original.0.is_empty() || !remove(&mut root, &current.0) {
            return Ok(read);
        }
        read.removed.push(original);
    }
    read.problems.push(format!(
        "more than {MAX_PROBLEMS} problems; fix these and check again"
    ));
    Ok(read)
}

/// Orders problems by their ` (line N)`, those without a line last (stable otherwise).
pub fn by_line(problems: &mut [String]) {
    let line = |p: &String| {
        p.rsplit_once(" (line ")
            .and_then(|(_, n)| n.strip_suffix(')')?.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
    };
    problems.sort_by_key(line);
}

fn problem(path: &KeyPath, msg: &str, line: Option<usize>) -> String {
    let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
    if path.0.is_empty() {
        format!("{msg}{at}")
    } else {
        format!("{path}: {msg}{at}")
    }
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    let before = text.get(..offset).unwrap_or(text);
    before.bytes().filter(|&b| b == b'\n').count() + 1
}

impl Read {
    /// A path in the current (shortened) document as it is written in the file: indices of
    /// array elements after removed ones shift back up.
    fn to_original(&self, current: &KeyPath) -> KeyPath {
        let mut out = KeyPath::default();
        for seg in &current.0 {
            match seg {
                Seg::Key(k) => out.0.push(Seg::Key(k.clone())),
                Seg::Index(c) => {
                    let gone: Vec<usize> = self
                        .removed
                        .iter()
                        .filter_map(|r| match r.0.split_last() {
                            Some((Seg::Index(i), parent)) if parent == out.0.as_slice() => Some(*i),
                            _ => None,
                        })
                        .collect();
                    let mut left = *c;
                    let mut i = 0;
                    loop {
                        if !gone.contains(&i) {
                            if left == 0 {
                                break;
                            }
                            left -= 1;
                        }
                        i += 1;
                    }
                    out.0.push(Seg::Index(i));
                }
            }
        }
        out
    }

    /// The line of a key path in the file: the key's own line, else its value's, else the
    /// nearest enclosing table's.
    fn line_of(&self, path: &KeyPath) -> Option<usize> {
        let span = span_of(self.doc.as_item(), &path.0)?;
        Some(line_at(self.doc.raw(), span.start))
    }

    /// `problem` (a validation message starting with its key path, as written in the
    /// current document) with ` (line N)` appended when the path is found in the file.
    /// Paths in `not_from_file` (set by a flag or the environment) get no line.
    pub fn locate(&self, problem: String, not_from_file: &[&str]) -> String {
        let Some(path) = KeyPath::of_problem(&problem) else {
            return problem;
        };
        let path = self.to_original(&path);
        if not_from_file.contains(&path.to_string().as_str()) {
            return problem;
        }
        match self.line_of(&path) {
            Some(line) => format!("{problem} (line {line})"),
            None => problem,
        }
    }

    /// Whether a validation problem only follows from a value [`read`] removed (a policy
    /// whose bad rate was removed "sets no limit"): such problems are not reported.
    pub fn follows_from_removed(&self, problem: &str) -> bool {
        let path = KeyPath::of_problem(problem).map(|p| self.to_original(&p));
        self.removed.iter().any(|r| {
            let owner = r.owner();
            let key = match r.0.last() {
                Some(Seg::Key(k)) => Some(k.as_str()),
                _ => None,
            };
            mentions(problem, &r.to_string())
                || path.as_ref().is_some_and(|p| {
                    p.starts_with(r)
                        || (p.starts_with(&owner)
                            && (p == &owner || key.is_some_and(|k| mentions(problem, k))))
                })
        })
    }
}

/// Whether `text` names `key` as a whole key (`upstream.api` is not in `upstream.api_key`).
fn mentions(text: &str, key: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(key).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + key.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// A read-only position in the document.
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn table_like(&self) -> Option<&'a dyn TableLike> {
        match *self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    fn span(&self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }

    /// The child at `seg` and the span of its key, if it is a key.
    fn child(&self, seg: &Seg) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match seg {
            Seg::Key(k) => {
                let (key, item) = self.table_like()?.get_key_value(k)?;
                Some((Node::Item(item), key.span()))
            }
            Seg::Index(i) => match *self {
                Node::Item(Item::ArrayOfTables(a)) => Some((Node::Table(a.get(*i)?), None)),
                Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                    Some((Node::Value(a.get(*i)?), None))
                }
                _ => None,
            },
        }
    }
}

fn span_of(root: &Item, path: &[Seg]) -> Option<Range<usize>> {
    let mut node = Node::Item(root);
    let mut best = None;
    for seg in path {
        let Some((child, key_span)) = node.child(seg) else {
            break;
        };
        best = key_span.or_else(|| child.span()).or(best);
        node = child;
    }
    best
}

/// A writable position in the document.
enum NodeMut<'a> {
    Item(&'a mut Item),
    Table(&'a mut Table),
    Value(&'a mut Value),
}

impl<'a> NodeMut<'a> {
    fn table_like(self) -> Option<&'a mut dyn TableLike> {
        match self {
            NodeMut::Item(i) => i.as_table_like_mut(),
            NodeMut::Table(t) => Some(t),
            NodeMut::Value(v) => v.as_inline_table_mut().map(|t| t as &mut dyn TableLike),
        }
    }

    fn child(self, seg: &Seg) -> Option<NodeMut<'a>> {
        match seg {
            Seg::Key(k) => self.table_like()?.get_mut(k).map(NodeMut::Item),
            Seg::Index(i) => match self {
                NodeMut::Item(Item::ArrayOfTables(a)) => a.get_mut(*i).map(NodeMut::Table),
                NodeMut::Item(Item::Value(Value::Array(a))) | NodeMut::Value(Value::Array(a)) => {
                    a.get_mut(*i).map(NodeMut::Value)
                }
                _ => None,
            },
        }
    }

    fn remove(self, seg: &Seg) -> bool {
        match seg {
            Seg::Key(k) => self.table_like().is_some_and(|t| t.remove(k).is_some()),
            Seg::Index(i) => match self {
                NodeMut::Item(Item::ArrayOfTables(a)) if *i < a.len() => {
                    a.remove(*i);
                    true
                }
                NodeMut::Item(Item::Value(Value::Array(a))) | NodeMut::Value(Value::Array(a))
                    if *i < a.len() =>
                {
                    a.remove(*i);
                    true
                }
                _ => false,
            },
        }
    }
}

/// Removes the value at `path`; false when there is none.
fn remove(root: &mut Item, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = NodeMut::Item(root);
    for seg in parents {
        match node.child(seg) {
            Some(n) => node = n,
            None => return false,
        }
    }
    node.remove(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_paths() {
        let p = KeyPath::of_problem("limits[2] (\"b\").name: duplicate policy name").unwrap();
        assert_eq!(p.to_string(), "limits[2].name");
        let p = KeyPath::of_problem("limits[0] (\"a: b\").match.routes[3]: x").unwrap();
        assert_eq!(p.to_string(), "limits[0].match.routes[3]");
        assert_eq!(
            KeyPath::of_problem("clients: [[clients]] needs")
                .unwrap()
                .to_string(),
            "clients"
        );
        assert!(KeyPath::of_problem("more than 20 problems; fix").is_none());
    }

    #[test]
    fn mentions_whole_keys_only() {
        assert!(mentions(
            "needs upstream.api_key (managed)",
            "upstream.api_key"
        ));
        assert!(!mentions(
            "needs upstream.api_key (managed)",
            "upstream.api"
        ));
        assert!(mentions(
            "only applies with requests = \"N/unit\"",
            "requests"
        ));
        assert!(!mentions("max_requests", "requests"));
    }

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_at("a\nb\nc", 0), 1);
        assert_eq!(line_at("a\nb\nc", 2), 2);
        assert_eq!(line_at("a\nb\nc", 4), 3);
    }
}
