//! Importing the keys another system issued, so their customers keep the keys they have: shared by
//! `keyward import` and `POST /v1/keys/import`.
//!
//! Rows come as JSON Lines or CSV. Each has `key` (the plaintext) or `key_sha256` (hex SHA-256 of the
//! plaintext), plus optional `name`, `owner_id`, `environment`, `scopes`, `allowed_ips`, `expires_at`,
//! `created_at`, `is_active`, `metadata`. Every row is validated with the validators of key creation;
//! a bad row is reported with its line number and the reason, and the others are imported.
//!
//! - A plaintext in Keyward's format becomes an ordinary key (prefix, hint and environment from the
//!   key; HMAC-SHA256 when a pepper is configured).
//! - Any other plaintext, and every `key_sha256`, becomes a *legacy* key, found at verification by the
//!   hash of whatever string the customer sends (see `state::LegacyKeys`): plaintexts are hashed with
//!   the configured algorithm; `key_sha256` is stored as `sha256`, which verification always tries.
//!   Verification looks up only strings of [`MIN_LEGACY_LEN`]-[`MAX_LEGACY_LEN`] visible ASCII
//!   characters, the only legacy plaintexts accepted here; a `key_sha256` of a shorter one never matches.
//! - A key whose hash is already stored is left as it is, so running the same file again changes
//!   nothing; a hash that belongs to another organization is refused.
//! - Keys go to the store in chunks of [`CHUNK_ROWS`], one transaction each; a dry run checks
//!   everything in one transaction that is rolled back. One audit row records the import, with counts.
//!
//! SECURITY: a rejection reason never quotes a key, a hash or any value that could be one.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use keyward_core::{Environment, HashAlgorithm, KeyFormatError, KeyHash, KeyHasher, KeyId, OrgId, PlainKey};
use keyward_store::{Actor, ImportOutcome, KeyImport, LimitOverrides, NewKey, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{MAX_OWNER_ID, Validator};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::state::AppState;

/// Rows per store transaction.
pub const CHUNK_ROWS: usize = 1_000;
/// Rows `POST /v1/keys/import` takes in one call; the CLI takes any number.
pub const MAX_ROWS_PER_CALL: usize = 10_000;
/// SECURITY: a legacy key shorter than this is too easy to guess to be worth keeping; verification
/// does not even look such strings up.
pub const MIN_LEGACY_LEN: usize = 16;
pub const MAX_LEGACY_LEN: usize = 512;
const DEFAULT_NAME: &str = "imported key";
const HINT_LEN: usize = 4;

/// The two file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImportFormat {
    /// One JSON object per line.
    Jsonl,
    /// A header line naming the columns, then one row per line.
    Csv,
}

impl ImportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }

    /// From a file name's extension: `.jsonl`, `.ndjson`, `.json`, `.csv`.
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        path.extension().and_then(|e| e.to_str()).and_then(Self::parse)
    }

    /// From a request's `Content-Type`.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let mime = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match mime.as_str() {
            "text/csv" | "application/csv" => Some(Self::Csv),
            "application/x-ndjson" | "application/jsonl" | "application/x-jsonlines" | "application/json" => {
                Some(Self::Jsonl)
            }
            _ => None,
        }
    }
}

/// A list field: a JSON array, or (in CSV, or for convenience) one string of items separated by
/// commas or spaces.
#[derive(Deserialize)]
#[serde(untagged)]
enum List {
    Items(Vec<String>),
    Text(String),
}

impl List {
    fn items(self) -> Vec<String> {
        match self {
            Self::Items(items) => items,
            Self::Text(text) => split_list(&text),
        }
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// One row as read, before validation. No `Debug`: it may hold a key.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    key: Option<String>,
    key_sha256: Option<String>,
    name: Option<String>,
    owner_id: Option<String>,
    environment: Option<String>,
    scopes: Option<List>,
    allowed_ips: Option<List>,
    expires_at: Option<String>,
    created_at: Option<String>,
    is_active: Option<bool>,
    metadata: Option<Value>,
}

const COLUMNS: [&str; 11] = [
    "key",
    "key_sha256",
    "name",
    "owner_id",
    "environment",
    "scopes",
    "allowed_ips",
    "expires_at",
    "created_at",
    "is_active",
    "metadata",
];

/// A file read into rows, each with its line number; a row that cannot even be read carries why.
pub struct ParsedFile {
    pub format: ImportFormat,
    rows: Vec<(usize, Result<Row, String>)>,
}

impl ParsedFile {
    /// Rows, not counting blank lines.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Reads a whole file. Fails only when the file as a whole is unusable (a CSV header naming an unknown
/// column, or naming neither `key` nor `key_sha256`); a bad row is a rejection, not a failure.
pub fn parse(format: ImportFormat, bytes: &[u8]) -> ApiResult<ParsedFile> {
    let rows = match format {
        ImportFormat::Jsonl => parse_jsonl(bytes),
        ImportFormat::Csv => parse_csv(bytes)?,
    };
    Ok(ParsedFile { format, rows })
}

fn parse_jsonl(bytes: &[u8]) -> Vec<(usize, Result<Row, String>)> {
    let mut rows = Vec::new();
    for (index, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // SECURITY: parse_json cuts quoted values out of serde's messages; names in backticks (an
        // unknown field) are cut too when they could be a key.
        // The message already names the field.
        let row = crate::extract::parse_json::<Row>(line)
            .map_err(|e| redact_backticked(&e.message.replace("the body is not valid JSON", "not valid JSON")));
        rows.push((index + 1, row));
    }
    rows
}

fn parse_csv(bytes: &[u8]) -> ApiResult<Vec<(usize, Result<Row, String>)>> {
    let file_error = |message: String| ApiError::validation("file", message);
    let mut reader =
        csv::ReaderBuilder::new().has_headers(true).flexible(false).trim(csv::Trim::All).from_reader(bytes);
    let headers: Vec<String> = reader
        .byte_headers()
        .map_err(|e| file_error(format!("the CSV header cannot be read: {}", csv_reason(&e))))?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_ascii_lowercase())
        .collect();
    for header in &headers {
        if !COLUMNS.contains(&header.as_str()) {
            return Err(file_error(format!(
                "unknown CSV column {}; the columns are {}",
                keyward_core::key::quote_if_not_key(header),
                COLUMNS.join(", ")
            )));
        }
    }
    if !headers.iter().any(|h| h == "key" || h == "key_sha256") {
        return Err(file_error("the CSV header must name a `key` or a `key_sha256` column".to_owned()));
    }
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    let mut lines = LineCounter::new(bytes);
    loop {
        let start = reader.position().byte();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = lines.first_line_at(record.position().map_or(start, csv::Position::byte));
                if record.iter().all(|f| f.is_empty()) {
                    continue;
                }
                rows.push((line, csv_row(&headers, &record)));
            }
            // A row the reader cannot make sense of (a stray quote, a wrong number of fields): that
            // row is rejected and reading goes on at the next line.
            Err(e) => {
                let line = lines.first_line_at(e.position().map_or(start, csv::Position::byte));
                rows.push((line, Err(csv_reason(&e))));
                if !matches!(e.kind(), csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }) {
                    break;
                }
            }
        }
    }
    Ok(rows)
}

/// Every `name` in backticks that could be a key becomes `…`.
fn redact_backticked(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, part) in message.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        let quoted = i % 2 == 1;
        if quoted && keyward_core::key::quote_if_not_key(part) != format!("`{part}`") {
            out.push('…');
        } else {
            out.push_str(part);
        }
    }
    out
}

/// Line numbers from byte offsets, moving forward only (so a whole file costs one pass).
struct LineCounter<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, offset: 0, line: 1 }
    }

    /// The 1-based line of the first character at or after `offset` that is not a line break: the
    /// reader's record position points at the blank lines it skipped before the record.
    fn first_line_at(&mut self, offset: u64) -> usize {
        let mut target = usize::try_from(offset).unwrap_or(usize::MAX).min(self.bytes.len());
        while target < self.bytes.len() && matches!(self.bytes[target], b'\n' | b'\r') {
            target += 1;
        }
        if target > self.offset {
            self.line += self.bytes[self.offset..target].iter().filter(|b| **b == b'\n').count();
            self.offset = target;
        }
        self.line
    }
}

/// csv's message without the position (we say the line ourselves) and never a field's content.
fn csv_reason(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("the row has {len} fields, the header {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8".to_owned(),
        csv::ErrorKind::Io(_) => "the file cannot be read".to_owned(),
        _ => "the row is not valid CSV".to_owned(),
    }
}

fn csv_row(headers: &[String], record: &csv::ByteRecord) -> Result<Row, String> {
    let mut row = Row::default();
    for (header, field) in headers.iter().zip(record.iter()) {
        if field.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(field).map_err(|_| format!("`{header}` is not valid UTF-8"))?.to_owned();
        match header.as_str() {
            "key" => row.key = Some(text),
            "key_sha256" => row.key_sha256 = Some(text),
            "name" => row.name = Some(text),
            "owner_id" => row.owner_id = Some(text),
            "environment" => row.environment = Some(text),
            "scopes" => row.scopes = Some(List::Text(text)),
            "allowed_ips" => row.allowed_ips = Some(List::Text(text)),
            "expires_at" => row.expires_at = Some(text),
            "created_at" => row.created_at = Some(text),
            "is_active" => {
                row.is_active = Some(match text.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err("`is_active` must be true or false".to_owned()),
                })
            }
            "metadata" => {
                row.metadata =
                    Some(serde_json::from_str(&text).map_err(|_| "`metadata` must be a JSON object".to_owned())?)
            }
            _ => {}
        }
    }
    Ok(row)
}

/// Everything validation needs beyond the row.
struct Context<'a> {
    validator: Validator<'a>,
    hasher: &'a KeyHasher,
    organization_id: OrgId,
}

fn reason(e: ApiError) -> String {
    e.message
}

/// A row made into a key for the store, or the reason it cannot be.
fn validate(row: Row, cx: &Context<'_>) -> Result<KeyImport, String> {
    let v = &cx.validator;
    let environment = row
        .environment
        .as_deref()
        .map(|e| Environment::parse(e.trim()).map_err(|_| "`environment` must be `live` or `test`".to_owned()))
        .transpose()?;
    // SECURITY: from here on the key is only hashed, cut to its hint, or dropped.
    let (prefix, hint, environment, hash_algorithm, key_hash, legacy) = match (row.key, row.key_sha256) {
        (Some(_), Some(_)) => return Err("give `key` or `key_sha256`, not both".to_owned()),
        (None, None) => return Err("`key` or `key_sha256` is required".to_owned()),
        (Some(key), None) => match PlainKey::parse(&key) {
            Ok(plain) => {
                if environment.is_some_and(|e| e != plain.environment()) {
                    return Err("`environment` does not match the key's own".to_owned());
                }
                let (algorithm, hash) = cx.hasher.hash(&plain);
                (plain.prefix().to_owned(), plain.hint().to_owned(), plain.environment(), algorithm, hash, false)
            }
            Err(KeyFormatError::BadChecksum) => {
                return Err("`key` looks like a Keyward key but its checksum does not match (a typo?)".to_owned());
            }
            Err(_) => {
                if !(MIN_LEGACY_LEN..=MAX_LEGACY_LEN).contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(format!(
                        "`key` is not a Keyward key, and a legacy key must be {MIN_LEGACY_LEN}-{MAX_LEGACY_LEN} \
                         visible ASCII characters"
                    ));
                }
                let algorithm = cx.hasher.algorithm();
                let hint = key[key.len() - HINT_LEN..].to_owned();
                (
                    String::new(),
                    hint,
                    environment.unwrap_or_default(),
                    algorithm,
                    cx.hasher.hash_str(algorithm, &key),
                    true,
                )
            }
        },
        (None, Some(hex)) => {
            let hash = KeyHash::from_hex(hex.trim()).ok_or("`key_sha256` must be 64 hexadecimal digits")?;
            (String::new(), String::new(), environment.unwrap_or_default(), HashAlgorithm::Sha256, hash, true)
        }
    };
    let scopes = v.scopes("scopes", &row.scopes.map(List::items).unwrap_or_default()).map_err(reason)?;
    // SECURITY: a key from another system (a legacy one has no checksum and may be weak) never gets to
    // manage Keyward itself.
    if scopes.iter().any(|s| s.is_reserved()) {
        return Err("imported keys cannot hold `keyward:` scopes".to_owned());
    }
    let created_at = row
        .created_at
        .as_deref()
        .map(|at| {
            let at = DateTime::parse_from_rfc3339(at.trim())
                .map_err(|_| "`created_at` must be an RFC 3339 date-time".to_owned())?
                .with_timezone(&Utc);
            if at > v.now { Err("`created_at` must not be in the future".to_owned()) } else { Ok(at) }
        })
        .transpose()?;
    let key = NewKey {
        id: KeyId::new(),
        organization_id: cx.organization_id,
        owner_id: v.optional_text("owner_id", row.owner_id, MAX_OWNER_ID).map_err(reason)?,
        name: v.name("name", row.name.as_deref().unwrap_or(DEFAULT_NAME)).map_err(reason)?,
        description: None,
        environment,
        prefix,
        hint,
        hash_algorithm,
        key_hash,
        scopes,
        allowed_ips: v
            .allowed_ips("allowed_ips", &row.allowed_ips.map(List::items).unwrap_or_default())
            .map_err(reason)?,
        expires_at: row
            .expires_at
            .as_deref()
            .map(|at| v.expires_at("expires_at", at.trim()))
            .transpose()
            .map_err(reason)?,
        is_active: row.is_active.unwrap_or(true),
        plan: None,
        limits: LimitOverrides::default(),
        metadata: v.metadata("metadata", row.metadata).map_err(reason)?,
        rotated_from: None,
    };
    Ok(KeyImport { key, legacy, created_at })
}

/// A row that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RejectedRow {
    /// 1-based line of the file (of the row's first line, for a quoted multi-line CSV field).
    pub line: usize,
    pub reason: String,
}

/// What an import did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ImportReport {
    pub dry_run: bool,
    /// Rows read, blank lines not counted.
    pub rows: usize,
    pub imported: usize,
    /// Rows whose key was already in the organization: left as they are.
    pub unchanged: usize,
    /// Every rejected row, in line order.
    pub rejected: Vec<RejectedRow>,
}

/// Validates and imports the rows of a file into `organization_id`. `progress(done, total)` is called
/// after each chunk. Writes one `import` audit row with the counts (none for a dry run, or when nothing
/// was imported: then nothing changed).
pub async fn run(
    state: &AppState,
    organization_id: OrgId,
    file: ParsedFile,
    actor: &Actor,
    dry_run: bool,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> ApiResult<ImportReport> {
    // Fail fast, before validating a large file, when the organization does not exist.
    state.store.get_org(organization_id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::validation("organization_id", "no such organization"),
        e => e.into(),
    })?;
    let cx =
        Context { validator: Validator { plans: &state.plans, now: actor.at }, hasher: &state.hasher, organization_id };
    let format = file.format;
    let total = file.rows.len();
    let mut report = ImportReport { dry_run, rows: total, imported: 0, unchanged: 0, rejected: Vec::new() };
    let mut first_line: HashMap<KeyHash, usize> = HashMap::new();
    let mut valid: Vec<(usize, KeyImport)> = Vec::with_capacity(total);
    for (line, row) in file.rows {
        match row.and_then(|row| validate(row, &cx)) {
            Ok(import) => match first_line.get(&import.key.key_hash) {
                Some(first) => {
                    report.rejected.push(RejectedRow { line, reason: format!("the same key as line {first}") })
                }
                None => {
                    first_line.insert(import.key.key_hash, line);
                    valid.push((line, import));
                }
            },
            Err(reason) => report.rejected.push(RejectedRow { line, reason }),
        }
    }
    drop(first_line);
    // A dry run rolls back, so only one transaction can see all of its own would-be inserts (for the
    // key limit): it checks everything at once.
    let chunk_rows = if dry_run { valid.len().max(1) } else { CHUNK_ROWS };
    let mut done = total - valid.len();
    progress(done, total);
    let mut any_legacy = false;
    let mut failure = None;
    let mut rows = valid.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<(usize, KeyImport)> = rows.by_ref().take(chunk_rows).collect();
        let (lines, keys): (Vec<usize>, Vec<KeyImport>) = chunk.into_iter().unzip();
        let legacy: Vec<bool> = keys.iter().map(|k| k.legacy).collect();
        match state.store.import_keys(organization_id, keys, actor, dry_run).await {
            Ok(outcomes) => {
                let outcomes = outcomes.apply(&state.keys);
                for ((line, outcome), legacy) in lines.iter().zip(outcomes).zip(legacy) {
                    match outcome {
                        ImportOutcome::Imported => {
                            report.imported += 1;
                            any_legacy |= legacy;
                        }
                        ImportOutcome::Unchanged => report.unchanged += 1,
                        ImportOutcome::HashInOtherOrganization => report.rejected.push(RejectedRow {
                            line: *line,
                            reason: "a key with this hash belongs to another organization".to_owned(),
                        }),
                        ImportOutcome::KeyLimitReached(max) => report.rejected.push(RejectedRow {
                            line: *line,
                            reason: format!("the organization has reached its limit of {max} API keys"),
                        }),
                    }
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        done += lines.len();
        progress(done, total);
    }
    report.rejected.sort_by_key(|r| r.line);
    if !dry_run {
        if any_legacy {
            state.legacy.enable();
        }
        if report.imported > 0 {
            // Counts only. SECURITY: no key, no hash, no line of the file.
            let details = json!({
                "format": format.as_str(),
                "rows": report.rows,
                "imported": report.imported,
                "unchanged": report.unchanged,
                "rejected": report.rejected.len(),
                "complete": failure.is_none(),
            });
            state.store.append_audit("import", organization_id, details, actor).await?;
        }
    }
    match failure {
        // Chunks committed before the failure stay (and are audited above); running the file again
        // finishes the job, since known keys are left alone.
        Some(e) => Err(ApiError::from(e)),
        None => Ok(report),
    }
}

/// 413 for a call over [`MAX_ROWS_PER_CALL`].
pub fn check_call_size(file: &ParsedFile) -> ApiResult<()> {
    if file.len() > MAX_ROWS_PER_CALL {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("at most {MAX_ROWS_PER_CALL} rows per call; `keyward import` takes any number"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(format: ImportFormat, text: &str) -> Vec<(usize, Result<(), String>)> {
        match parse(format, text.as_bytes()) {
            Ok(file) => file.rows.into_iter().map(|(line, row)| (line, row.map(|_| ()))).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn formats_are_recognised() {
        assert_eq!(ImportFormat::from_path("keys.CSV".as_ref()), Some(ImportFormat::Csv));
        assert_eq!(ImportFormat::from_path("a/keys.jsonl".as_ref()), Some(ImportFormat::Jsonl));
        assert_eq!(ImportFormat::from_path("keys.txt".as_ref()), None);
        assert_eq!(ImportFormat::from_content_type("text/csv; charset=utf-8"), Some(ImportFormat::Csv));
        assert_eq!(ImportFormat::from_content_type("application/x-ndjson"), Some(ImportFormat::Jsonl));
        assert_eq!(ImportFormat::from_content_type("text/plain"), None);
    }

    #[test]
    fn jsonl_lines_are_numbered_and_blank_lines_skipped() {
        let text = "{\"key_sha256\": \"00\"}\n\n  \r\n{\"key\": 5}\r\n{\"nope\": 1}\n{broken\n";
        let got = rows(ImportFormat::Jsonl, text);
        assert_eq!(got.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [1, 4, 5, 6]);
        assert!(got[0].1.is_ok());
        assert!(got[1].1.as_ref().is_err_and(|e| e.contains("key")), "{:?}", got[1]);
        assert!(got[2].1.as_ref().is_err_and(|e| e.contains("nope")), "{:?}", got[2]);
        assert!(got[3].1.is_err());
    }

    #[test]
    fn a_wrong_type_never_echoes_the_value() {
        let secret = "sk_live_thisisnotreallyakeybutcouldbe";
        let got = rows(ImportFormat::Jsonl, &format!("{{\"name\": [\"{secret}\"]}}\n{{\"key\": [\"{secret}\"]}}"));
        for (_, r) in got {
            let e = r.err().unwrap_or_default();
            assert!(!e.contains(secret), "{e}");
        }
    }

    #[test]
    fn csv_rows_and_bad_rows_carry_their_line() {
        let text = "key_sha256,name,scopes,is_active\n00,a,\"read:a write:b\",true\n01,b,,maybe\n02,c\n\n03,\"multi\nline\",,\n04,d,,false\n";
        let got = rows(ImportFormat::Csv, text);
        assert_eq!(got.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [2, 3, 4, 6, 8]);
        assert!(got[0].1.is_ok());
        assert_eq!(got[1].1, Err("`is_active` must be true or false".to_owned()));
        assert_eq!(got[2].1, Err("the row has 2 fields, the header 4".to_owned()));
        assert!(got[3].1.is_ok() && got[4].1.is_ok());
    }

    #[test]
    fn csv_headers_are_checked() {
        let e = parse(ImportFormat::Csv, b"key,colour\nx,y\n").err().map(|e| e.message).unwrap_or_default();
        assert!(e.contains("unknown CSV column `colour`"), "{e}");
        let e = parse(ImportFormat::Csv, b"name\nx\n").err().map(|e| e.message).unwrap_or_default();
        assert!(e.contains("`key` or a `key_sha256`"), "{e}");
        assert!(parse(ImportFormat::Csv, b"KEY_SHA256 , Name\n").is_ok_and(|f| f.is_empty()));
    }

    #[test]
    fn a_key_used_as_a_field_name_is_not_repeated() {
        let secret = "sk_live_abcdefghijklmnopqrstuvwxyz0123456789";
        let got = rows(ImportFormat::Jsonl, &format!("{{\"{secret}\": 1}}\n{{\"colour\": 1}}"));
        let first = got[0].1.clone().err().unwrap_or_default();
        assert!(first.contains("unknown field `…`"), "{first}");
        assert!(!first.contains(secret), "{first}");
        let second = got[1].1.clone().err().unwrap_or_default();
        assert!(second.contains("unknown field `colour`"), "{second}");
    }

    #[test]
    fn lists_split_on_commas_and_spaces() {
        assert_eq!(split_list(" read:a, write:b  admin:c,"), ["read:a", "write:b", "admin:c"]);
        assert!(split_list("").is_empty());
    }
}
