//! The `model` label: a configured model name, a well-known one (a dated snapshot counts as
//! its model), or `other`. Never free text from a request.

/// Models that get their own `model` label value without being named in the config.
pub(super) const WELL_KNOWN_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o1",
    "o1-mini",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "claude-3-5-sonnet",
    "claude-3-7-sonnet",
    "claude-sonnet-4",
    "gemini-2.0-flash",
    "gemini-2.5-pro",
    "deepseek-chat",
    "deepseek-reasoner",
];

/// The model's place in the label table: `names` (the config's, sorted), then the
/// well-known ones, then `other`.
pub(super) fn index(names: &[String], model: Option<&str>) -> usize {
    let other = names.len() + WELL_KNOWN_MODELS.len();
    let Some(m) = model else { return other };
    if let Ok(i) = names.binary_search_by(|n| n.as_str().cmp(m)) {
        return i;
    }
    let base = strip_snapshot_date(m);
    WELL_KNOWN_MODELS
        .iter()
        .position(|k| *k == base)
        .map_or(other, |i| names.len() + i)
}

/// The label at place `i` of the table [`index`] reads.
pub(super) fn label_at(names: &[String], i: usize) -> &str {
    match names.get(i) {
        Some(m) => m,
        None => WELL_KNOWN_MODELS
            .get(i - names.len())
            .copied()
            .unwrap_or("other"),
    }
}

/// `gpt-4o-2024-08-06` → `gpt-4o`. Model names come from requests and responses: any
/// string, so every slice is checked.
pub(super) fn strip_snapshot_date(m: &str) -> &str {
    let Some(split) = m.len().checked_sub(11) else {
        return m;
    };
    match (m.get(..split), m.get(split..)) {
        (Some(base), Some(tail)) if is_date_suffix(tail.as_bytes()) => base,
        _ => m,
    }
}

/// `-YYYY-MM-DD`
fn is_date_suffix(t: &[u8]) -> bool {
    t.len() == 11
        && t[0] == b'-'
        && t[1..].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}
