//! Request-path normalization for the gateway: one canonical spelling of a path, computed once, so
//! the path Keyward matches routes on is exactly the path the upstream receives.
//!
//! The model is Envoy's `normalize_path` + `merge_slashes` with `path_with_escaped_slashes_action:
//! REJECT_REQUEST` (RFC 3986 §6.2.2): percent-encoded unreserved characters are decoded, other escapes
//! keep their encoding with upper-case hex, dot segments are resolved (also when encoded), and runs of
//! slashes become one. What has no safe single reading is refused instead of guessed at:
//!
//! - an encoded `/` or `\` (`%2F`, `%5C`) and a raw `\`: upstreams disagree on whether they separate
//!   segments, so a route check and an upstream could see different paths;
//! - an encoded NUL, an invalid escape, bytes that are not UTF-8 once decoded;
//! - a dot segment carrying `;` parameters (`..;`): Tomcat-style servers strip the parameters and then
//!   climb, a path Keyward would otherwise match as an ordinary segment;
//! - `..` that climbs above the root. RFC 3986 clamps it; browsers and HTTP libraries resolve dot
//!   segments before sending, so only a hand-made request carries one, and refusing makes it visible;
//! - anything that is not an absolute path (`*`, a `?` or `#` inside the path, control characters).
//!
//! A path the upstream receives as sent, not in canonical form (a proxy hook's proxy forwards its
//! client's path), has stricter rules ([`NormalizedPath::parse_as_sent`]).

use std::fmt;

/// Why a path cannot be normalized safely. Messages never echo the path: it is client input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path contains an encoded or raw `/` or `\\` that upstreams read differently (%2F, %5C, \\)")]
    AmbiguousSeparator,
    #[error("the path contains an encoded NUL (%00)")]
    Nul,
    #[error("the path contains a `%` that is not followed by two hex digits")]
    InvalidEscape,
    #[error("the path is not UTF-8 once percent-decoded")]
    InvalidUtf8,
    #[error("the path contains a character that is not allowed in a path")]
    ForbiddenCharacter,
    #[error("the path contains a `.` or `..` segment with `;` parameters")]
    DotSegmentWithParameters,
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
    #[error("the path contains a `..` segment, which the upstream receives unresolved")]
    UnresolvedDotSegment,
    #[error("the path starts with `//`, which some upstreams read as a host name")]
    LeadingDoubleSlash,
}

/// A path in canonical form: starts with `/`, no empty, `.` or `..` segment (a trailing `/` is kept),
/// no percent-encoded unreserved character, every escape in upper-case hex. Built only by [`parse`].
///
/// [`parse`]: NormalizedPath::parse
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalizedPath(String);

impl NormalizedPath {
    /// Normalizes a raw request path (without its query string).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        normalize(raw).map(Self)
    }

    /// Normalizes a path that reaches the upstream as sent rather than in this canonical form (a proxy
    /// hook's proxy forwards its client's path): besides what [`parse`] refuses, a `..` segment (also
    /// encoded) and a leading `//`.
    ///
    /// SECURITY: the route is chosen for the canonical path, the upstream reads the sent one. One that
    /// does not resolve `..` routes `/v1/projects/../../public` under `/v1/projects`, and one that
    /// reads the path as a URL (`urlsplit`, `new URL(path, base)`) takes `//public/v1/projects` for
    /// host `public` and path `/v1/projects`; either would reach a route Keyward did not judge. A `.`
    /// segment and inner runs of slashes move no path under another prefix, and stay.
    ///
    /// [`parse`]: NormalizedPath::parse
    pub fn parse_as_sent(raw: &str) -> Result<Self, PathError> {
        let path = Self::parse(raw)?;
        if raw.starts_with("//") {
            return Err(PathError::LeadingDoubleSlash);
        }
        // After `parse`, every escape is valid and `..;` is refused: a `..` is two dots, each raw or
        // `%2E` in either case.
        if raw.split('/').any(is_dot_dot) {
            return Err(PathError::UnresolvedDotSegment);
        }
        Ok(path)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for NormalizedPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Whether `segment` is two dots, each raw or `%2E` in either case.
fn is_dot_dot(segment: &str) -> bool {
    let dot = |s: &str| s == "." || s.eq_ignore_ascii_case("%2e");
    match segment.len() {
        2 | 6 => segment.split_at_checked(segment.len() / 2).is_some_and(|(a, b)| dot(a) && dot(b)),
        4 => [1, 3].iter().any(|&at| segment.split_at_checked(at).is_some_and(|(a, b)| dot(a) && dot(b))),
        _ => false,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Kept as they are: RFC 3986 gives them a meaning inside a segment, so encoding or decoding them
/// could change what the upstream reads.
fn is_kept_raw(b: u8) -> bool {
    matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0F)]));
}

/// One segment in canonical spelling, and its fully decoded bytes (for the UTF-8 check).
fn normalize_segment(raw: &str, decoded: &mut Vec<u8>) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let value = match (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) {
                    (Some(hi), Some(lo)) => (hi << 4) | lo,
                    _ => return Err(PathError::InvalidEscape),
                };
                // SECURITY: an encoded separator or NUL has no reading every upstream agrees on.
                match value {
                    b'/' | b'\\' => return Err(PathError::AmbiguousSeparator),
                    0 => return Err(PathError::Nul),
                    v if is_unreserved(v) => out.push(char::from(v)),
                    v => push_escaped(&mut out, v),
                }
                decoded.push(value);
                i += 3;
            }
            b'\\' => return Err(PathError::AmbiguousSeparator),
            b'?' | b'#' => return Err(PathError::ForbiddenCharacter),
            b if b.is_ascii_control() || b == b' ' => return Err(PathError::ForbiddenCharacter),
            b if is_unreserved(b) || is_kept_raw(b) => {
                out.push(char::from(b));
                decoded.push(b);
                i += 1;
            }
            // Other ASCII (`"`, `{`, `|`, `[`, ...) and UTF-8 bytes: the canonical form encodes them.
            b => {
                push_escaped(&mut out, b);
                decoded.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The canonical form of `raw` (see the module documentation), or why there is none.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    if is_canonical(raw) {
        return Ok(raw.to_owned());
    }
    normalize_segments(raw)
}

/// Whether `raw` is in canonical form already, by a look that refuses more than it must (every escape,
/// every segment that starts with `.`): then [`normalize_segments`] would give it back unchanged, and
/// most request paths are spared its copies.
fn is_canonical(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else { return false };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        if (segment.is_empty() && !is_last) || segment.starts_with('.') {
            return false;
        }
        if !segment.bytes().all(|b| is_unreserved(b) || is_kept_raw(b)) {
            return false;
        }
    }
    true
}

/// [`normalize`], segment by segment.
fn normalize_segments(raw: &str) -> Result<String, PathError> {
    let Some(rest) = raw.strip_prefix('/') else { return Err(PathError::NotAbsolute) };
    let mut decoded = Vec::with_capacity(raw.len());
    let mut stack: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = rest.split('/').peekable();
    while let Some(raw_segment) = segments.next() {
        let is_last = segments.peek().is_none();
        let segment = normalize_segment(raw_segment, &mut decoded)?;
        decoded.push(b'/');
        let dir_like = match segment.as_str() {
            "" | "." => true,
            ".." => {
                // SECURITY: refuse rather than clamp (module documentation).
                if stack.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                true
            }
            s => {
                if matches!(s.split(';').next(), Some("." | "..")) {
                    return Err(PathError::DotSegmentWithParameters);
                }
                stack.push(segment);
                false
            }
        };
        if is_last {
            trailing_slash = dir_like;
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    let mut out = String::with_capacity(raw.len());
    for segment in &stack {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalize_table() {
        let ok = [
            ("/", "/"),
            ("//", "/"),
            ("/v1/projects", "/v1/projects"),
            ("//v1/projects", "/v1/projects"),
            ("/v1//projects///7", "/v1/projects/7"),
            ("/v1/projects/", "/v1/projects/"),
            ("/v1/projects//", "/v1/projects/"),
            ("/v1/%70rojects", "/v1/projects"),
            ("/%76%31/%50%52%4f%4A%45%43%54%53", "/v1/PROJECTS"),
            ("/a/%7e%2d%5f%2E", "/a/~-_."),
            ("/./v1/./projects/.", "/v1/projects/"),
            ("/health/../v1/projects", "/v1/projects"),
            ("/health/%2e%2e/v1/projects", "/v1/projects"),
            ("/health/%2E./v1/projects", "/v1/projects"),
            ("/health/.%2e/v1/projects", "/v1/projects"),
            ("/health/%2e/v1", "/health/v1"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/a/b/../../c", "/c"),
            ("/a/...", "/a/..."),
            ("/a/..b/.c", "/a/..b/.c"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/%25", "/%25"),
            ("/%252e%252e", "/%252e%252e"),
            ("/a;b=c/d:e@f!$&'()*+,", "/a;b=c/d:e@f!$&'()*+,"),
            ("/{\"x\"}|[y]^`", "/%7B%22x%22%7D%7C%5By%5D%5E%60"),
        ];
        for (raw, want) in ok {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
        let bad = [
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("v1/projects", PathError::NotAbsolute),
            ("/v1%2fprojects", PathError::AmbiguousSeparator),
            ("/v1%2Fprojects", PathError::AmbiguousSeparator),
            ("/public/..%2fprojects", PathError::AmbiguousSeparator),
            ("/v1%5cprojects", PathError::AmbiguousSeparator),
            ("/v1%5Cprojects", PathError::AmbiguousSeparator),
            ("/public\\..\\projects", PathError::AmbiguousSeparator),
            ("/a%00", PathError::Nul),
            ("/a%", PathError::InvalidEscape),
            ("/a%2", PathError::InvalidEscape),
            ("/a%zz", PathError::InvalidEscape),
            ("/a%%41", PathError::InvalidEscape),
            ("/a%ff", PathError::InvalidUtf8),
            ("/a%c3", PathError::InvalidUtf8),
            ("/a%c3/%a9", PathError::InvalidUtf8),
            ("/a?b", PathError::ForbiddenCharacter),
            ("/a#b", PathError::ForbiddenCharacter),
            ("/a b", PathError::ForbiddenCharacter),
            ("/a\tb", PathError::ForbiddenCharacter),
            ("/a\u{7f}", PathError::ForbiddenCharacter),
            ("/public/..;/projects", PathError::DotSegmentWithParameters),
            ("/public/.;x/projects", PathError::DotSegmentWithParameters),
            ("/public/%2e%2e;/projects", PathError::DotSegmentWithParameters),
            ("/..", PathError::AboveRoot),
            ("/../v1", PathError::AboveRoot),
            ("/a/../../v1", PathError::AboveRoot),
            ("/%2e%2e/v1", PathError::AboveRoot),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn parse_as_sent_refuses_what_an_upstream_may_read_as_another_path() {
        use PathError::{LeadingDoubleSlash as Host, UnresolvedDotSegment as DotDot};
        // `None`: what `parse` answers.
        let table: [(&str, Option<PathError>); 17] = [
            ("/a/b", None),
            ("/a/./b", None),
            ("/a//b", None),
            ("/a/b/", None),
            ("/a/...", None),
            ("/a/..b", None),
            ("/a/%2e", None),
            ("/", None),
            ("/../a", None),
            ("/a/..;/b", None),
            ("/a/../b", Some(DotDot)),
            ("/a/b/..", Some(DotDot)),
            ("/a/%2e%2E/b", Some(DotDot)),
            ("/a/.%2E/b", Some(DotDot)),
            ("/a/%2e./b", Some(DotDot)),
            ("//a/b", Some(Host)),
            ("///a", Some(Host)),
        ];
        for (raw, refused) in table {
            let want = refused.map_or_else(|| NormalizedPath::parse(raw), Err);
            assert_eq!(NormalizedPath::parse_as_sent(raw), want, "{raw}");
        }
    }

    fn is_percent_encoded_unreserved(s: &str) -> bool {
        s.as_bytes().windows(3).any(|w| {
            w[0] == b'%'
                && matches!((hex_value(w[1]), hex_value(w[2])), (Some(hi), Some(lo)) if is_unreserved((hi << 4) | lo))
        })
    }

    /// Paths built from the pieces attacks are made of, so the properties see many valid paths
    /// rather than mostly refused noise.
    fn pathish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => Just("/".to_owned()),
            2 => Just("//".to_owned()),
            2 => Just(".".to_owned()),
            2 => Just("..".to_owned()),
            2 => Just("%2e".to_owned()),
            1 => Just("%2E".to_owned()),
            1 => Just(";".to_owned()),
            1 => Just("%c3%a9".to_owned()),
            2 => "%[0-9a-fA-F]{2}",
            8 => "[a-zA-Z0-9_~-]{1,4}",
            2 => "[!$&'()*+,;=:@\"{}|\\[\\]^`]",
            1 => "\\PC",
            // Each of these is refused wherever it appears.
            1 => prop_oneof![Just("%2f"), Just("%5C"), Just("\\"), Just("%00"), Just("%"), Just("%ff")].prop_map(str::to_owned),
        ];
        proptest::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn normalized_paths_are_canonical_and_stable(raw in pathish()) {
            if let Ok(once) = normalize(&raw) {
                prop_assert_eq!(normalize(&once), Ok(once.clone()), "idempotent");
                prop_assert!(once.starts_with('/'));
                for bad in ["//", "/./", "/../"] {
                    prop_assert!(!once.contains(bad), "{} contains {}", once, bad);
                }
                prop_assert!(!once.ends_with("/.") && !once.ends_with("/.."), "{}", once);
                prop_assert!(!is_percent_encoded_unreserved(&once), "{}", once);
                // Only characters every HTTP stack accepts raw in a path, so forwarding cannot fail.
                prop_assert!(once.bytes().all(|b| is_unreserved(b) || is_kept_raw(b) || b == b'/' || b == b'%'), "{}", once);
            }
        }

        /// The shortcut for paths already canonical answers what the full normalization does.
        #[test]
        fn the_canonical_shortcut_changes_nothing(raw in pathish()) {
            prop_assert_eq!(normalize(&raw), normalize_segments(&raw));
            if is_canonical(&raw) {
                prop_assert_eq!(normalize_segments(&raw), Ok(raw.clone()));
            }
        }

        #[test]
        fn dot_dot_segments_in_every_spelling(segment in "(\\.|%2[eE]|[a-z2%;]){0,4}") {
            let slow = segment.to_ascii_lowercase().replace("%2e", ".") == "..";
            prop_assert_eq!(is_dot_dot(&segment), slow, "{}", segment);
        }

        #[test]
        fn normalize_never_panics(raw in ".{0,200}") {
            if let Ok(once) = normalize(&raw) {
                prop_assert_eq!(normalize(&once), Ok(once.clone()));
            }
        }
    }
}
