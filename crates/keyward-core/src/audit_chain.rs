//! The tamper-evident audit chain: the canonical form of an audit row and the hash that links it to
//! the row before it.
//!
//! Each row stores `prev_hash` (the `row_hash` of the row before it in the chain, [`GENESIS`] for the
//! first) and `row_hash = SHA-256(prev_hash || canonical content)`. Changing any field of a row changes
//! its hash; deleting or reordering rows breaks the `prev_hash` link of the row that follows. The
//! canonical form is defined here once, so both storage backends (and `keyward audit verify`) compute
//! the same bytes: fields in a fixed order, each length-prefixed, JSON with object keys sorted, times
//! in one fixed-width UTC form at microsecond precision (what both backends store).

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first row of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The content of one audit row that the chain covers. The row's database id is deliberately not part
/// of it (PostgreSQL assigns it on insert); order is proven by the links instead.
#[derive(Debug, Clone, Copy)]
pub struct AuditContent<'a> {
    pub action: &'a str,
    /// Hyphenated lowercase UUID, as stored.
    pub key_id: Option<&'a str>,
    pub organization_id: Option<&'a str>,
    pub actor: &'a str,
    pub actor_ip: Option<&'a str>,
    pub details: &'a Value,
    pub created_at: DateTime<Utc>,
}

impl AuditContent<'_> {
    /// The bytes that are hashed: every field, length-prefixed, in a fixed order; `None` and `Some("")`
    /// differ.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        field(&mut out, Some(self.action));
        field(&mut out, self.key_id);
        field(&mut out, self.organization_id);
        field(&mut out, Some(self.actor));
        field(&mut out, self.actor_ip);
        field(&mut out, Some(&canonical_json(self.details)));
        field(&mut out, Some(&canonical_time(self.created_at)));
        out
    }

    /// `SHA-256(prev_hash || canonical())`, lowercase hex.
    pub fn row_hash(&self, prev_hash: &str) -> String {
        let mut h = Sha256::new();
        h.update(prev_hash.as_bytes());
        h.update(self.canonical());
        crate::hex(&h.finalize())
    }
}

fn field(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u64).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
}

/// A time as both backends store it: microseconds, UTC, fixed width.
pub fn canonical_time(at: DateTime<Utc>) -> String {
    at.trunc_subsecs(6).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// JSON with object keys sorted at every depth and no insignificant whitespace, so the same document
/// read back from PostgreSQL's `jsonb` (which reorders keys) or SQLite's text gives the same bytes.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, value);
    out
}

fn write_json(out: &mut String, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_json(out, v);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, v);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Why a row breaks the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainBreak {
    /// The row's content does not hash to its `row_hash`: it was changed.
    ContentChanged,
    /// The row's `prev_hash` is not the hash of the row before it: a row before it was deleted or the
    /// rows were reordered.
    LinkBroken,
    /// A row without hashes after the chain started: inserted behind Keyward's back.
    Unhashed,
    /// The chain head (last row written) is missing: rows at the end were deleted.
    Truncated,
}

impl ChainBreak {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ContentChanged => "content_changed",
            Self::LinkBroken => "link_broken",
            Self::Unhashed => "unhashed_row",
            Self::Truncated => "truncated",
        }
    }
}

/// Walks rows in chain order; feed each stored row, then [`ChainWalker::finish`] with the chain head.
#[derive(Debug, Clone)]
pub struct ChainWalker {
    prev: Option<String>,
    /// Rows written before the chain existed (no hashes, at the start): not covered.
    pub unchained: u64,
    pub checked: u64,
    last_id: Option<i64>,
}

impl Default for ChainWalker {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainWalker {
    pub fn new() -> Self {
        Self { prev: None, unchained: 0, checked: 0, last_id: None }
    }

    /// Checks one row; `Err` names why it breaks the chain.
    pub fn check(
        &mut self,
        id: i64,
        content: &AuditContent<'_>,
        prev_hash: Option<&str>,
        row_hash: Option<&str>,
    ) -> Result<(), ChainBreak> {
        let (Some(prev_hash), Some(row_hash)) = (prev_hash, row_hash) else {
            if self.prev.is_none() {
                self.unchained += 1;
                return Ok(());
            }
            return Err(ChainBreak::Unhashed);
        };
        let expected_prev = self.prev.as_deref().unwrap_or(GENESIS);
        if content.row_hash(prev_hash) != row_hash {
            return Err(ChainBreak::ContentChanged);
        }
        if prev_hash != expected_prev {
            return Err(ChainBreak::LinkBroken);
        }
        self.prev = Some(row_hash.to_owned());
        self.checked += 1;
        self.last_id = Some(id);
        Ok(())
    }

    /// After the last row: the chain head must be the last row seen. Returns the id the head names
    /// when it is not.
    pub fn finish(&self, head_id: Option<i64>, head_hash: &str) -> Result<(), Option<i64>> {
        let last_hash = self.prev.as_deref().unwrap_or(GENESIS);
        if head_id == self.last_id && head_hash == last_hash { Ok(()) } else { Err(head_id) }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 123_456_789).unwrap_or_default()
    }

    fn content(details: &Value) -> AuditContent<'_> {
        AuditContent {
            action: "create",
            key_id: Some("0190c0de-0000-7000-8000-000000000001"),
            organization_id: None,
            actor: "cli",
            actor_ip: None,
            details,
            created_at: at(),
        }
    }

    #[test]
    fn json_keys_are_sorted_at_every_depth() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": 2, "x": null}], "c": "é\"q"}});
        assert_eq!(canonical_json(&v), r#"{"a":{"c":"é\"q","z":[1,{"x":null,"y":2}]},"b":1}"#);
    }

    #[test]
    fn times_are_cut_to_microseconds() {
        assert_eq!(canonical_time(at()), "2027-01-15T08:00:00.123456Z");
    }

    #[test]
    fn every_field_changes_the_hash() {
        let details = json!({"after": {"name": "a"}});
        let base = content(&details).row_hash(GENESIS);
        assert_eq!(base.len(), 64);
        assert_eq!(base, content(&details).row_hash(GENESIS), "deterministic");
        let other = json!({"after": {"name": "b"}});
        let variants = [
            AuditContent { action: "update", ..content(&details) },
            AuditContent { key_id: None, ..content(&details) },
            AuditContent { organization_id: Some(""), ..content(&details) },
            AuditContent { actor: "system", ..content(&details) },
            AuditContent { actor_ip: Some("192.0.2.1"), ..content(&details) },
            AuditContent { created_at: at() + chrono::Duration::microseconds(1), ..content(&details) },
            content(&other),
        ];
        for v in variants {
            assert_ne!(v.row_hash(GENESIS), base, "{v:?}");
        }
        assert_ne!(content(&details).row_hash(&base), base, "the link is hashed too");
    }

    #[test]
    fn walker_names_the_first_broken_row() {
        let d = json!({});
        let c = content(&d);
        let h1 = c.row_hash(GENESIS);
        let h2 = c.row_hash(&h1);
        let h3 = c.row_hash(&h2);
        // Intact, after two rows from before the chain.
        let mut w = ChainWalker::new();
        assert_eq!(w.check(1, &c, None, None), Ok(()));
        assert_eq!(w.check(2, &c, None, None), Ok(()));
        assert_eq!(w.check(3, &c, Some(GENESIS), Some(&h1)), Ok(()));
        assert_eq!(w.check(4, &c, Some(&h1), Some(&h2)), Ok(()));
        assert_eq!((w.unchained, w.checked), (2, 2));
        assert_eq!(w.finish(Some(4), &h2), Ok(()));
        assert_eq!(w.finish(Some(5), &h3), Err(Some(5)), "the head names a row that is gone");
        // Changed content.
        let changed = AuditContent { actor: "x", ..c };
        let mut w = ChainWalker::new();
        assert_eq!(w.check(1, &changed, Some(GENESIS), Some(&h1)), Err(ChainBreak::ContentChanged));
        // A row deleted: the next one's link breaks.
        let mut w = ChainWalker::new();
        assert_eq!(w.check(1, &c, Some(GENESIS), Some(&h1)), Ok(()));
        assert_eq!(w.check(3, &c, Some(&h2), Some(&h3)), Err(ChainBreak::LinkBroken));
        // A row without hashes inside the chain.
        let mut w = ChainWalker::new();
        assert_eq!(w.check(1, &c, Some(GENESIS), Some(&h1)), Ok(()));
        assert_eq!(w.check(2, &c, None, None), Err(ChainBreak::Unhashed));
        // An empty chain is intact with the genesis head.
        assert_eq!(ChainWalker::new().finish(None, GENESIS), Ok(()));
    }
}
