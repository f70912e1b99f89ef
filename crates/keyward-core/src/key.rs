//! The key format `<prefix>_<env>_<secret><checksum>` and the only type that holds a full key.
//!
//! The secret is 32 bytes from the OS generator written in base62 (43 characters); the checksum is the
//! CRC32 of everything before it, in base62, 6 characters. A mistyped or truncated key is refused here,
//! without touching storage, and secret scanners can recognise keyward keys by shape.

use std::fmt;

use serde::{Deserialize, Serialize};

/// SECURITY: changing any of these constants changes which strings parse as keys, which in effect
/// revokes every key ever issued. Don't.
const SECRET_BYTES: usize = 32;
const SECRET_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;
const BODY_LEN: usize = SECRET_LEN + CHECKSUM_LEN;
const MAX_PREFIX_LEN: usize = 16;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Characters of a key shown in records and logs (the end of the checksum, never the secret).
pub const HINT_LEN: usize = 4;

/// Why a string is not a keyward key. Never carries the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("key is empty")]
    Empty,
    #[error("key is too long")]
    TooLong,
    #[error("key prefix must be 1-16 lowercase letters or digits")]
    BadPrefix,
    #[error("key environment must be `live` or `test`")]
    BadEnvironment,
    #[error("key has the wrong length")]
    BadLength,
    #[error("key contains a character outside base62")]
    BadCharacter,
    #[error("key checksum does not match")]
    BadChecksum,
}

/// `live` or `test`: test keys let customers build against the API without touching real data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Result<Self, KeyFormatError> {
        match s {
            "live" => Ok(Self::Live),
            "test" => Ok(Self::Test),
            _ => Err(KeyFormatError::BadEnvironment),
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first part of a key: `sk` by default, `pk` or any 1-16 lowercase letters and digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn parse(s: &str) -> Result<Self, KeyFormatError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_PREFIX_LEN
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok { Ok(Self(s.to_owned())) } else { Err(KeyFormatError::BadPrefix) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("sk".to_owned())
    }
}

/// A full API key. The only type that holds one: it has no `Display`, its `Debug` shows the visible
/// prefix and the hint only, and the plaintext comes out only through [`PlainKey::expose_secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct PlainKey {
    full: String,
    /// Byte length of `<prefix>_<env>_`.
    head_len: usize,
    environment: Environment,
}

impl PlainKey {
    /// A new key with 32 bytes from the operating system's generator.
    pub fn generate(prefix: &KeyPrefix, environment: Environment) -> Result<Self, getrandom::Error> {
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut secret)?;
        let mut full = format!("{}_{}_", prefix.as_str(), environment.as_str());
        let head_len = full.len();
        full.push_str(&base62_fixed(&secret, SECRET_LEN));
        let checksum = checksum(&full);
        full.extend(checksum.iter().map(|&b| char::from(b)));
        Ok(Self { full, head_len, environment })
    }

    /// Checks charset, lengths and checksum; no storage is touched.
    pub fn parse(s: &str) -> Result<Self, KeyFormatError> {
        if s.is_empty() {
            return Err(KeyFormatError::Empty);
        }
        if s.len() > MAX_PREFIX_LEN + 1 + 4 + 1 + BODY_LEN {
            return Err(KeyFormatError::TooLong);
        }
        let mut parts = s.splitn(3, '_');
        let prefix = parts.next().unwrap_or_default();
        KeyPrefix::parse(prefix)?;
        let environment = Environment::parse(parts.next().ok_or(KeyFormatError::BadEnvironment)?)?;
        let body = parts.next().ok_or(KeyFormatError::BadLength)?;
        if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyFormatError::BadCharacter);
        }
        if body.len() != BODY_LEN {
            return Err(KeyFormatError::BadLength);
        }
        let (signed, sum) = s.split_at(s.len() - CHECKSUM_LEN);
        if checksum(signed) != sum.as_bytes() {
            return Err(KeyFormatError::BadChecksum);
        }
        Ok(Self { full: s.to_owned(), head_len: s.len() - BODY_LEN, environment })
    }

    /// The visible start of the key, e.g. `sk_live_`. Safe to show and log.
    pub fn prefix(&self) -> &str {
        &self.full[..self.head_len]
    }

    /// The last four characters. Safe to show and log.
    pub fn hint(&self) -> &str {
        &self.full[self.full.len() - HINT_LEN..]
    }

    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// SECURITY: the full key. Call only to hash it or to hand it to its owner once.
    pub fn expose_secret(&self) -> &str {
        &self.full
    }

    /// `sk_live_…abcd`: what logs and messages may say about a key.
    pub fn redacted(&self) -> String {
        format!("{}…{}", self.prefix(), self.hint())
    }

    /// `text` with every key in it replaced: a well-formed key (its checksum holds) by its redacted form,
    /// and any other run of at least [`SECRET_LEN`] letters and digits that is not hex (a key respelled — `SK_LIVE_…`, `sk-live-…`, another environment — or another system's
    /// token) by `[redacted]`. Percent-encoding hides nothing: a text whose decoded form holds a key is
    /// recorded decoded and redacted (control characters as `?`).
    /// SECURITY: for what a client chose to record (a path, an endpoint), which may carry a key
    /// however unwise: a key in `/hooks/sk_live_…` must not reach the usage rows nor their exports.
    pub fn redact_in(text: &str) -> std::borrow::Cow<'_, str> {
        if !could_hide_secret(text) {
            return std::borrow::Cow::Borrowed(text);
        }
        redact_decoded(text)
    }
}

/// Whether `text` has a run of at least [`SECRET_LEN`] ASCII letters, digits and `%`: what
/// [`PlainKey::redact_in`] replaces is always inside one. SECURITY: both of its redactions need
/// [`SECRET_LEN`] letters and digits in a row (a key's body has more), once decoded; each decoded
/// letter or digit comes from itself or from a `%XX` escape, so from that many bytes of such a run
/// at least. A text without one (most paths) is left as it is without decoding or searching it.
fn could_hide_secret(text: &str) -> bool {
    let mut run = 0;
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'%' {
            run += 1;
            if run >= SECRET_LEN {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

/// [`PlainKey::redact_in`] without the pre-check: decoded when that reveals a key, then redacted.
fn redact_decoded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('%')
        && let std::borrow::Cow::Owned(hidden) = redact_secrets(&percent_decoded(text))
    {
        return std::borrow::Cow::Owned(hidden.chars().map(|c| if c.is_control() { '?' } else { c }).collect());
    }
    redact_secrets(text)
}

/// `text` with its `%XX` escapes decoded (bytes that are not UTF-8 as U+FFFD).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// [`PlainKey::redact_in`] on the text as it stands: well-formed keys, then long mixed runs.
fn redact_secrets(text: &str) -> std::borrow::Cow<'_, str> {
    let keys = redact_keys(text);
    match redact_runs(&keys) {
        std::borrow::Cow::Borrowed(_) => keys,
        std::borrow::Cow::Owned(runs) => std::borrow::Cow::Owned(runs),
    }
}

/// Runs of at least [`SECRET_LEN`] ASCII letters and digits, with digits and letters beyond hex in
/// them, as `[redacted]`: a key's secret is 43 such characters (in any case); hex digests and ids stay.
fn redact_runs(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        if !bytes[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
            i += 1;
        }
        let run = &bytes[start..i];
        let secret_like =
            run.iter().any(u8::is_ascii_digit) && run.iter().any(|b| b.is_ascii_alphabetic() && !b.is_ascii_hexdigit());
        if run.len() >= SECRET_LEN && secret_like {
            out.push_str(&text[copied..start]);
            out.push_str("[redacted]");
            copied = i;
        }
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Every well-formed key in `text` as its redacted form.
fn redact_keys(text: &str) -> std::borrow::Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some(at) = find_environment(text, from) {
        from = at + 1;
        let body_start = at + 6;
        let Some(body) = text.get(body_start..body_start + BODY_LEN) else { continue };
        if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        // The prefix: 1-16 lowercase letters or digits ending just before the environment; the
        // longest that makes a well-formed key (the checksum covers the prefix).
        let head = &text.as_bytes()[copied.max(at.saturating_sub(MAX_PREFIX_LEN))..at];
        let run = head.iter().rev().take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit()).count();
        let end = body_start + BODY_LEN;
        let found = (1..=run)
            .rev()
            .map(|len| at - len)
            .find_map(|start| PlainKey::parse(&text[start..end]).ok().map(|key| (start, key)));
        if let Some((start, key)) = found {
            out.push_str(&text[copied..start]);
            out.push_str(&key.redacted());
            copied = end;
            from = end;
        }
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Where the next `_live_` or `_test_` starts in `text`, from `from` on.
fn find_environment(text: &str, from: usize) -> Option<usize> {
    let rest = text.get(from..)?;
    [rest.find("_live_"), rest.find("_test_")].into_iter().flatten().min().map(|at| from + at)
}

impl fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlainKey({})", self.redacted())
    }
}

/// A user-supplied value, quoted for an error message, unless it could hold a key. SECURITY: keys are
/// made of ASCII letters, digits and `_` only, so a value in which every run of those is too short to
/// carry a secret is safe to echo; anything else is not repeated, including a key inside other text
/// (`{"key":"sk_live_…"}`, `my sk_live_…`), which a message cut to 64 characters would still mostly show.
pub fn quote_if_not_key(value: &str) -> String {
    if could_hold_key(value) {
        "(value not repeated: it looks like it could be a key)".to_owned()
    } else {
        format!("`{}`", value.chars().take(64).collect::<String>())
    }
}

/// Whether `value` has a run of more than 16 key characters (ASCII letters, digits, `_`): enough to
/// carry a key's secret, or most of one.
pub fn could_hold_key(value: &str) -> bool {
    const SHORT: usize = 16;
    value.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|run| run.len() > SHORT)
}

/// The CRC32 of `signed` in base62, left-padded with `0` (six digits hold any `u32`). On the stack:
/// every verification checks one.
fn checksum(signed: &str) -> [u8; CHECKSUM_LEN] {
    let mut digits = [0; CHECKSUM_LEN];
    base62_into(&mut crc32fast::hash(signed.as_bytes()).to_be_bytes(), &mut digits);
    digits
}

/// Big-endian bytes as a base62 number, left-padded with `0` to `width` characters.
fn base62_fixed(bytes: &[u8], width: usize) -> String {
    let mut digits = vec![0; width];
    base62_into(&mut bytes.to_vec(), &mut digits);
    digits.into_iter().map(char::from).collect()
}

/// `number` (big-endian bytes, used up) in base62 into `out`, left-padded with `0`.
fn base62_into(number: &mut [u8], out: &mut [u8]) {
    for digit in out.iter_mut().rev() {
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            remainder = acc % 62;
        }
        *digit = BASE62[remainder as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_text_are_redacted_wherever_they_stand() {
        let live = PlainKey::generate(&KeyPrefix::default(), Environment::Live).unwrap();
        let test = PlainKey::generate(&KeyPrefix::parse("acme2").unwrap(), Environment::Test).unwrap();
        let (l, t) = (live.expose_secret(), test.expose_secret());
        let cases = [
            (format!("/hooks/{l}"), format!("/hooks/{}", live.redacted())),
            (format!("/a/{l}/b/{t}"), format!("/a/{}/b/{}", live.redacted(), test.redacted())),
            (format!("/x_{l}y"), format!("/x_{}y", live.redacted())),
            (format!("{l}{l}"), format!("{}{}", live.redacted(), live.redacted())),
            (format!("/é/{t}/é"), format!("/é/{}/é", test.redacted())),
        ];
        for (text, want) in cases {
            assert_eq!(PlainKey::redact_in(&text), want);
        }
        // Respelled, encoded or mistyped, the secret is hidden all the same.
        let body = &l[8..];
        let mut typo = l.to_owned();
        typo.replace_range(10..11, if &typo[10..11] == "a" { "b" } else { "a" });
        let encoded_body: String = body.chars().map(|c| format!("%{:02X}", c as u32)).collect();
        for respelled in [
            l.to_uppercase(),
            format!("SK_LIVE_{body}"),
            format!("sk-live-{body}"),
            format!("sk_test_{body}"),
            typo.clone(),
            format!("/a/sk%5Flive%5F{body}"),
            format!("/u/sk_live_%{:02X}{}", body.as_bytes()[0], &body[1..]),
            format!("/e/{encoded_body}%0A"),
        ] {
            let recorded = PlainKey::redact_in(&respelled);
            let upper = body.to_uppercase();
            assert!(!recorded.contains(&body[..20]) && !recorded.contains(&body[25..]), "{respelled} -> {recorded}");
            assert!(!recorded.contains(&upper[..20]) && !recorded.contains(&upper[25..]), "{respelled} -> {recorded}");
            assert!(!recorded.chars().any(char::is_control), "{recorded}");
        }
        assert_eq!(PlainKey::redact_in(&format!("/a/sk%5Flive%5F{body}")), format!("/a/{}", live.redacted()));
        let digest = "/blobs/sha256/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let uuid = "/v1/keys/0192a8f0c3b47e1a9d2f6b8c4e1a7d3f0192a8f0c3b4";
        for untouched in ["/v1/projects", "/sk_live_", "sk_live_short", "/é_live_é", "", digest, uuid, "/a%2Fb%20c"] {
            assert!(matches!(PlainKey::redact_in(untouched), std::borrow::Cow::Borrowed(_)), "{untouched}");
        }
    }

    /// The pre-check lets no key through: every spelling the redaction tests use, and any text built
    /// from keys, their escapes and other runs, is redacted exactly as without it.
    #[test]
    fn the_pre_check_skips_only_texts_without_a_secret() {
        let live = PlainKey::generate(&KeyPrefix::default(), Environment::Live).unwrap();
        let l = live.expose_secret();
        let body = &l[8..];
        let encoded: String = body.chars().map(|c| format!("%{:02X}", c as u32)).collect();
        for text in [
            l.to_owned(),
            l.to_uppercase(),
            format!("/hooks/{l}"),
            format!("SK_LIVE_{body}"),
            format!("sk-live-{body}"),
            format!("/a/sk%5Flive%5F{body}"),
            format!("/u/sk_live_%{:02X}{}", body.as_bytes()[0], &body[1..]),
            format!("/e/{encoded}%0A"),
            body[..SECRET_LEN].to_owned(),
        ] {
            assert!(could_hide_secret(&text), "{text}");
            assert_eq!(PlainKey::redact_in(&text), redact_decoded(&text), "{text}");
        }
        for short in ["/v1/projects/7", "/a%2Fb%20c", &body[..SECRET_LEN - 1], "/x/sk_live_abc/é"] {
            assert!(!could_hide_secret(short), "{short}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn the_pre_check_changes_no_redaction(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("sk_live_"),
                    Just("_test_"),
                    Just("%5F"),
                    Just("%41"),
                    Just("%"),
                    Just("/"),
                    Just("-"),
                    Just("\u{e9}"),
                    Just("0123456789abcdefghij"),
                    Just("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
                    Just("9f86d081884c7d659a2feaa0"),
                ],
                0..12,
            ),
            with_key in proptest::option::of(0usize..12),
        ) {
            let key = PlainKey::generate(&KeyPrefix::default(), Environment::Test).unwrap();
            let mut text: String = pieces.concat();
            if let Some(at) = with_key {
                let at = text.char_indices().map(|(i, _)| i).nth(at).unwrap_or(text.len());
                text.insert_str(at, key.expose_secret());
            }
            prop_assert_eq!(PlainKey::redact_in(&text), redact_decoded(&text), "{}", text);
            if with_key.is_some() {
                prop_assert!(!PlainKey::redact_in(&text).contains(&key.expose_secret()[8..]), "{}", text);
            }
        }
    }
    use proptest::prelude::*;

    fn key(prefix: &str, env: Environment) -> PlainKey {
        let prefix = KeyPrefix::parse(prefix).unwrap_or_default();
        PlainKey::generate(&prefix, env).unwrap_or_else(|e| panic!("generate: {e}"))
    }

    #[test]
    fn generated_key_has_the_documented_shape() {
        let k = key("sk", Environment::Live);
        let s = k.expose_secret();
        assert!(s.starts_with("sk_live_"));
        assert_eq!(s.len(), "sk_live_".len() + 43 + 6);
        assert_eq!(k.prefix(), "sk_live_");
        assert_eq!(k.hint(), &s[s.len() - 4..]);
        assert_eq!(PlainKey::parse(s), Ok(k));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = key("pk", Environment::Test);
        let debug = format!("{k:?}");
        assert!(!debug.contains(&k.expose_secret()[8..40]));
        assert!(debug.contains("pk_test_"));
        assert!(debug.contains(k.hint()));
    }

    #[test]
    fn values_that_could_be_keys_are_not_repeated() {
        let k = key("sk", Environment::Live);
        assert!(!quote_if_not_key(k.expose_secret()).contains(&k.expose_secret()[8..]));
        assert!(!quote_if_not_key(&k.expose_secret()[..30]).contains("sk_live_"));
        assert_eq!(quote_if_not_key("read projects"), "`read projects`");
        assert_eq!(quote_if_not_key("10.0.0.300"), "`10.0.0.300`");
        assert_eq!(quote_if_not_key("short"), "`short`");
        // A key inside other text is not repeated either.
        for wrapped in [format!("{{\"key\":\"{}\"", k.expose_secret()), format!("my {}", k.expose_secret())] {
            assert!(!quote_if_not_key(&wrapped).contains(&k.expose_secret()[8..24]), "{wrapped}");
        }
        assert_eq!(quote_if_not_key("read:projects.archive-2024"), "`read:projects.archive-2024`");
    }

    #[test]
    fn base62_pads_and_encodes_known_values() {
        assert_eq!(base62_fixed(&[0, 0, 0, 0], 6), "000000");
        assert_eq!(base62_fixed(&[0, 0, 0, 61], 6), "00000z");
        assert_eq!(base62_fixed(&[0, 0, 0, 62], 6), "000010");
        assert_eq!(base62_fixed(&u32::MAX.to_be_bytes(), 6), "4gfFC3");
        // The checksum of keys already issued must not change.
        for signed in ["", "sk_live_", "sk_live_0123456789abcdefghijABCDEFGHIJ0123456789abc"] {
            let expected = base62_fixed(&crc32fast::hash(signed.as_bytes()).to_be_bytes(), CHECKSUM_LEN);
            assert_eq!(std::str::from_utf8(&checksum(signed)).ok(), Some(expected.as_str()));
        }
        assert_eq!(base62_fixed(&[0xff; 32], 43).len(), 43);
    }

    #[test]
    fn parse_rejects_each_kind_of_bad_input() {
        let good = key("sk", Environment::Live);
        let s = good.expose_secret().to_owned();
        let cases: Vec<(String, KeyFormatError)> = vec![
            (String::new(), KeyFormatError::Empty),
            ("x".repeat(200), KeyFormatError::TooLong),
            (s.replacen("sk", "SK", 1), KeyFormatError::BadPrefix),
            (format!("_live_{}", &s[8..]), KeyFormatError::BadPrefix),
            (format!("abcdefghijklmnopq_live_{}", &s[8..s.len() - 2]), KeyFormatError::BadPrefix),
            (s.replacen("live", "prod", 1), KeyFormatError::BadEnvironment),
            ("sk".to_owned(), KeyFormatError::BadEnvironment),
            ("sk_live".to_owned(), KeyFormatError::BadLength),
            (s[..s.len() - 1].to_owned(), KeyFormatError::BadLength),
            (format!("{s}a"), KeyFormatError::BadLength),
            (format!("{}-", &s[..s.len() - 1]), KeyFormatError::BadCharacter),
            (format!("{}_", &s[..s.len() - 1]), KeyFormatError::BadCharacter),
            (s.replacen("sk_live_", "pk_live_", 1), KeyFormatError::BadChecksum),
        ];
        for (input, want) in cases {
            assert_eq!(PlainKey::parse(&input), Err(want), "input of length {}", input.len());
        }
    }

    /// `key` with the character at `position` replaced by `replacement`; a case where it is that
    /// character already is rejected (it would not be a change).
    fn substituted(key: &PlainKey, position: prop::sample::Index, replacement: char) -> Result<String, TestCaseError> {
        let mut chars: Vec<char> = key.expose_secret().chars().collect();
        let at = position.index(chars.len());
        if chars[at] == replacement {
            return Err(TestCaseError::reject("the same character"));
        }
        chars[at] = replacement;
        Ok(chars.into_iter().collect())
    }

    proptest! {
        #[test]
        fn generate_then_parse_round_trips(prefix in "[a-z0-9]{1,16}", test in any::<bool>()) {
            let env = if test { Environment::Test } else { Environment::Live };
            let k = key(&prefix, env);
            let parsed = PlainKey::parse(k.expose_secret());
            prop_assert_eq!(parsed.as_ref(), Ok(&k));
            let parsed = parsed.unwrap_or_else(|_| k.clone());
            prop_assert_eq!(parsed.environment(), env);
            prop_assert_eq!(parsed.prefix(), format!("{prefix}_{}_", env.as_str()));
        }

        #[test]
        fn any_one_character_change_is_rejected(
            position in any::<prop::sample::Index>(),
            replacement in any::<char>(),
        ) {
            let changed = substituted(&key("sk", Environment::Live), position, replacement)?;
            prop_assert!(PlainKey::parse(&changed).is_err());
        }

        #[test]
        fn any_alphanumeric_substitution_is_rejected(
            position in any::<prop::sample::Index>(),
            replacement in proptest::char::ranges(vec!['0'..='9', 'A'..='Z', 'a'..='z'].into()),
        ) {
            let changed = substituted(&key("sk", Environment::Test), position, replacement)?;
            prop_assert!(PlainKey::parse(&changed).is_err());
        }

        #[test]
        fn parse_never_panics(input in ".{0,100}") {
            let _ = PlainKey::parse(&input);
        }
    }
}
