//! The usage ledger's storage: the [`UsageStore`] trait (a supertrait of [`crate::Store`]), the events
//! it records, the daily rollups it keeps and reads, and the durable monthly quota counters.
//!
//! What a batch changes is computed here, once, from the events the backend actually inserted
//! ([`BatchEffects::of`]): the rollup deltas per key and day (and per endpoint), the key counters, and
//! the quota deltas. Each backend only writes them, in one transaction, so both backends count the same
//! way by construction; the conformance suite proves the SQL.
//!
//! # p95 latency
//!
//! Each rollup row keeps a fixed-bucket histogram of latencies ([`LATENCY_BUCKETS_MS`], 16 integer
//! columns). Buckets only add, so rows written by several batches and nodes merge exactly; p95 is the
//! upper bound of the bucket that holds the 95th percentile ([`Histogram::p95_ms`]). It is exact to the
//! bucket, never interpolated.
//!
//! # Bounds and saturation
//!
//! What one event may count is bounded where it enters ([`MAX_TOKENS_PER_EVENT`],
//! [`MAX_COST_MICROS_PER_EVENT`], [`MAX_RESPONSE_TIME_MS`], [`MAX_QUOTA_COST`]), and every sum of
//! counters saturates at `i64::MAX` instead of failing: in memory ([`DailyCounts`], [`BatchEffects`])
//! and in both backends' SQL ([`daily_add_set`], each backend's saturating `SUM`). SECURITY: the fold
//! is one transaction for every organization, so a sum that could fail would let one tenant's row
//! (or a row an older version wrote without bounds) stop every tenant's rollups.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use keyward_core::{KeyId, OrgId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::StoreResult;

/// Upper bounds (inclusive, milliseconds) of the latency histogram's buckets; the last is `+inf`.
/// Changing them changes the meaning of stored rows: add a migration.
pub const LATENCY_BUCKETS_MS: [i64; 16] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, i64::MAX];

/// Most tokens one event may count (a report's `tokens_used`): a thousand times the largest context
/// window of today's language models, yet 9 billion such events still fit a counter.
pub const MAX_TOKENS_PER_EVENT: i64 = 1_000_000_000;
/// Most micro-dollars one event may cost (a report's `cost_micros`): $1,000,000.
pub const MAX_COST_MICROS_PER_EVENT: i64 = 1_000_000_000_000;
/// Longest latency one event may report, in ms: one hour.
pub const MAX_RESPONSE_TIME_MS: i64 = 3_600_000;
/// Most quota units one request may spend (`cost` of `/v1/verify`, a gateway route's `cost`): as many
/// as a report's tokens, since the quota often counts tokens.
pub const MAX_QUOTA_COST: u64 = 1_000_000_000;

/// Longest endpoint kept; a longer one is cut (endpoints are a rollup dimension, not free text).
pub const MAX_ENDPOINT_LEN: usize = 200;

/// What produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageKind {
    /// A verification (`POST /v1/verify`, the tower layer).
    Verify,
    /// A request proxied in gateway mode, with the upstream's status and latency.
    Gateway,
    /// A backend's report (`POST /v1/usage`) about a request it verified earlier.
    Report,
}

impl UsageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Gateway => "gateway",
            Self::Report => "report",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "verify" => Some(Self::Verify),
            "gateway" => Some(Self::Gateway),
            "report" => Some(Self::Report),
            _ => None,
        }
    }

    /// Whether the event is a request to the customer's API (a report describes one already counted).
    pub fn is_request(self) -> bool {
        matches!(self, Self::Verify | Self::Gateway)
    }
}

/// The monthly quota counter a request spent from: a key's own (shared by the keys of one rotation
/// lineage) or its organization's. Written as the limiters name it (`quota:key:<lineage id>`,
/// `quota:org:<organization id>`), the `subject` of `quota_usage`; a value here, so that recording an
/// event formats nothing on the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuotaSubject {
    Key(KeyId),
    Org(OrgId),
}

impl std::fmt::Display for QuotaSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(id) => write!(f, "quota:key:{id}"),
            Self::Org(id) => write!(f, "quota:org:{id}"),
        }
    }
}

impl std::str::FromStr for QuotaSubject {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = |rest: &str| Uuid::parse_str(rest).map_err(|e| format!("invalid quota subject `{s}`: {e}"));
        if let Some(rest) = s.strip_prefix("quota:key:") {
            Ok(Self::Key(KeyId(id(rest)?)))
        } else if let Some(rest) = s.strip_prefix("quota:org:") {
            Ok(Self::Org(OrgId(id(rest)?)))
        } else {
            Err(format!("invalid quota subject `{s}`"))
        }
    }
}

// As a string, as before it was a type: spill files written before still read.
impl Serialize for QuotaSubject {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for QuotaSubject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One usage event. SECURITY: holds the key's id, never the key.
///
/// Built on the request path, so its parts are cheap to make: the outcome is a static code, the
/// address a value (written as text by the writer), the quota subject a value. The JSON form (the spill
/// file) is the same as when they were strings, so a spill file left by an older version still replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// UUIDv7 made where the request was seen ([`event_id`]): inserting the same event twice (a replay)
    /// is a no-op.
    pub id: Uuid,
    pub key_id: KeyId,
    pub organization_id: OrgId,
    pub at: DateTime<Utc>,
    pub kind: UsageKind,
    /// The verify outcome code (`VALID`, `RATE_LIMITED`, ...); `None` for reports.
    pub outcome: Option<Cow<'static, str>>,
    pub endpoint: Option<String>,
    pub method: Option<String>,
    pub status_code: Option<i32>,
    pub response_time_ms: Option<i64>,
    pub tokens_used: i64,
    /// Integer micro-dollars.
    pub cost_micros: i64,
    /// The client's address, canonical (an IPv4-mapped IPv6 address as IPv4).
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// A reporting backend's id: unique per organization, so a retried report counts once.
    pub idempotency_id: Option<String>,
    /// The monthly quota counter this request spent from, and how much (not stored in the event row:
    /// applied to `quota_usage` when the event is inserted).
    pub quota_subject: Option<QuotaSubject>,
    pub quota_units: i64,
}

impl UsageEvent {
    /// A bare event of `kind` for a key, at `at`; fill in the rest.
    pub fn new(kind: UsageKind, key_id: KeyId, organization_id: OrgId, at: DateTime<Utc>) -> Self {
        let at = crate::stored_time(at);
        Self {
            id: event_id(at),
            key_id,
            organization_id,
            at,
            kind,
            outcome: None,
            endpoint: None,
            method: None,
            status_code: None,
            response_time_ms: None,
            tokens_used: 0,
            cost_micros: 0,
            ip: None,
            user_agent: None,
            error_code: None,
            error_message: None,
            idempotency_id: None,
            quota_subject: None,
            quota_units: 0,
        }
    }

    fn is_valid_request(&self) -> bool {
        self.kind.is_request() && self.outcome.as_deref().is_none_or(|o| o == "VALID")
    }

    fn endpoint_key(&self) -> &str {
        let endpoint = self.endpoint.as_deref().unwrap_or_default();
        match endpoint.char_indices().nth(MAX_ENDPOINT_LEN) {
            Some((cut, _)) => &endpoint[..cut],
            None => endpoint,
        }
    }
}

/// A fresh event id: a UUIDv7 of `at`'s millisecond whose other 74 bits are a random value drawn once
/// per process plus a process-wide counter. Unique within the process by the counter (2^62 ids before
/// it wraps), across processes by the random part; time-ordered like any UUIDv7, so the ids' index
/// grows at its end. Costs an atomic increment instead of `Uuid::now_v7`'s clock read, lock and
/// system-call random bytes per id: it runs once per verification.
pub fn event_id(at: DateTime<Utc>) -> Uuid {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<(u16, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (high, low) = *SEED.get_or_init(|| {
        let b = Uuid::new_v4().into_bytes();
        (u16::from_be_bytes([b[0], b[1]]), u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]))
    });
    let n = low.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut rest = [0u8; 10];
    rest[..2].copy_from_slice(&high.to_be_bytes());
    rest[2..].copy_from_slice(&n.to_be_bytes());
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &rest).into_uuid()
}

/// Which verifications and reports keep a raw row in `usage_events` (`usage.raw_events`). Counts never
/// depend on it: every event is in the rollups and the quota counters whatever is kept raw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEvents {
    /// No raw rows, except reports that carry an idempotency id: their row is what makes a retried
    /// report count once.
    Off,
    /// A row for every refused request (not `VALID`) and every report: the security-relevant refusals
    /// and the billing detail, not the allowed verifications that make up nearly all of the traffic.
    #[default]
    Denied,
    /// A row for every event.
    All,
}

impl RawEvents {
    /// Whether `e` keeps a raw row.
    pub fn keeps(self, e: &UsageEvent) -> bool {
        match self {
            Self::All => true,
            Self::Denied => !e.is_valid_request(),
            Self::Off => e.kind == UsageKind::Report && e.idempotency_id.is_some(),
        }
    }
}

impl std::str::FromStr for RawEvents {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "denied" => Ok(Self::Denied),
            "all" => Ok(Self::All),
            _ => Err(format!("`{s}` is not one of off, denied, all")),
        }
    }
}

/// How long a written batch's id is kept ([`UsageStore::prune_usage_batches`]): a batch written again
/// within it counts nothing twice. A retry comes within seconds and a spill file is replayed when the
/// store answers again or the node restarts; thirty days is far past either.
pub const BATCH_ID_WINDOW: chrono::Duration = chrono::Duration::days(30);

/// A batch's id: SHA-256 of its events' ids, in order, cut to 128 bits. The same events in the same
/// order (a retry, a spill replay) give the same id; event ids are unique, so two different batches
/// of any nodes never share one.
pub fn batch_id(events: &[UsageEvent]) -> Uuid {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in events {
        h.update(e.id.as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

/// A latency histogram over [`LATENCY_BUCKETS_MS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Histogram(pub [i64; 16]);

impl Histogram {
    pub fn bucket_of(ms: i64) -> usize {
        LATENCY_BUCKETS_MS.iter().position(|&upper| ms <= upper).unwrap_or(LATENCY_BUCKETS_MS.len() - 1)
    }

    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    pub fn count(&self) -> i64 {
        self.0.iter().fold(0, |n, b| n.saturating_add(*b))
    }

    /// The upper bound (ms) of the bucket holding the 95th percentile; for the last, open bucket its
    /// lower bound. `None` without samples.
    pub fn p95_ms(&self) -> Option<i64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the 95th percentile, rounded up: at least 95 % of samples are at or below it.
        // In i128: `total * 95` of a saturated count does not fit an i64.
        let rank = ((i128::from(total) * 95 + 99) / 100).max(1);
        let mut seen: i128 = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += i128::from(*n);
            if seen >= rank {
                let last = LATENCY_BUCKETS_MS.len() - 1;
                return Some(if i == last { LATENCY_BUCKETS_MS[last - 1] } else { LATENCY_BUCKETS_MS[i] });
            }
        }
        None
    }
}

/// What a batch adds to one key's day (a rollup row), or what a day holds when read back.
// Serialized, these are the counters the API shows; the latency parts are shown as what they make (a
// mean and a percentile, computed by the server), not as they are summed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(description = "Counters of a day, or of a span."))]
pub struct DailyCounts {
    /// Verifications and gateway requests.
    pub requests: i64,
    /// Requests that were refused (not `VALID`).
    pub denied: i64,
    /// Reports received through `POST /v1/usage`.
    pub reports: i64,
    pub errors_4xx: i64,
    pub errors_5xx: i64,
    pub tokens_used: i64,
    /// Integer micro-dollars.
    pub cost_micros: i64,
    #[serde(skip)]
    pub latency_count: i64,
    #[serde(skip)]
    pub latency_sum_ms: i64,
    #[serde(skip)]
    pub latency: Histogram,
}

impl DailyCounts {
    /// Saturating, like every sum of counters: an event stored or spilled by a version without
    /// bounds (i64::MAX tokens) must not wrap, nor panic a debug build.
    fn add_event(&mut self, e: &UsageEvent) {
        let one = |n: &mut i64| *n = n.saturating_add(1);
        if e.kind.is_request() {
            one(&mut self.requests);
            if !e.is_valid_request() {
                one(&mut self.denied);
            }
        } else {
            one(&mut self.reports);
        }
        match e.status_code {
            Some(400..=499) => one(&mut self.errors_4xx),
            Some(500..=599) => one(&mut self.errors_5xx),
            _ => {}
        }
        self.tokens_used = self.tokens_used.saturating_add(e.tokens_used);
        self.cost_micros = self.cost_micros.saturating_add(e.cost_micros);
        if let Some(ms) = e.response_time_ms {
            one(&mut self.latency_count);
            self.latency_sum_ms = self.latency_sum_ms.saturating_add(ms);
            one(&mut self.latency.0[Histogram::bucket_of(ms)]);
        }
    }

    /// Saturating at i64::MAX, like the rollups.
    pub fn add(&mut self, o: &DailyCounts) {
        let mut v = self.values();
        for (a, b) in v.iter_mut().zip(o.values()) {
            *a = a.saturating_add(b);
        }
        *self = Self::from_values(&v);
    }

    /// Mean latency in ms, `None` without samples.
    pub fn mean_latency_ms(&self) -> Option<f64> {
        (self.latency_count > 0).then(|| self.latency_sum_ms as f64 / self.latency_count as f64)
    }
}

/// The rollup columns, in the order of [`DailyCounts::values`], as both backends name them.
pub(crate) const DAILY_COLUMNS: [&str; 25] = [
    "requests",
    "denied",
    "reports",
    "errors_4xx",
    "errors_5xx",
    "tokens_used",
    "cost_micros",
    "latency_count",
    "latency_sum_ms",
    "lat_b00",
    "lat_b01",
    "lat_b02",
    "lat_b03",
    "lat_b04",
    "lat_b05",
    "lat_b06",
    "lat_b07",
    "lat_b08",
    "lat_b09",
    "lat_b10",
    "lat_b11",
    "lat_b12",
    "lat_b13",
    "lat_b14",
    "lat_b15",
];

/// A backend's saturating `a + b` of two bigint SQL expressions (clamped to the i64 range).
pub(crate) type SqlAdd = fn(&str, &str) -> String;

/// `c = add(table.c, excluded.c)` for every rollup column: the upsert that adds a batch to a row.
pub(crate) fn daily_add_set(table: &str, add: SqlAdd) -> String {
    DAILY_COLUMNS
        .iter()
        .map(|c| format!("{c} = {}", add(&format!("{table}.{c}"), &format!("excluded.{c}"))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same for an endpoint rollup row (`usage_daily_endpoints`), as both backends' folds write it.
pub(crate) fn endpoint_add_set(add: SqlAdd) -> String {
    ["requests", "errors", "tokens_used", "cost_micros"]
        .iter()
        .map(|c| format!("{c} = {}", add(&format!("usage_daily_endpoints.{c}"), &format!("excluded.{c}"))))
        .collect::<Vec<_>>()
        .join(", ")
}

impl DailyCounts {
    /// The values in [`DAILY_COLUMNS`] order.
    pub(crate) fn values(&self) -> [i64; 25] {
        let mut v = [0; 25];
        v[..9].copy_from_slice(&[
            self.requests,
            self.denied,
            self.reports,
            self.errors_4xx,
            self.errors_5xx,
            self.tokens_used,
            self.cost_micros,
            self.latency_count,
            self.latency_sum_ms,
        ]);
        v[9..].copy_from_slice(&self.latency.0);
        v
    }

    pub(crate) fn from_values(v: &[i64; 25]) -> Self {
        let mut latency = Histogram::default();
        latency.0.copy_from_slice(&v[9..]);
        Self {
            requests: v[0],
            denied: v[1],
            reports: v[2],
            errors_4xx: v[3],
            errors_5xx: v[4],
            tokens_used: v[5],
            cost_micros: v[6],
            latency_count: v[7],
            latency_sum_ms: v[8],
            latency,
        }
    }
}

/// Per endpoint of one key's day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct EndpointCounts {
    pub requests: i64,
    pub errors: i64,
    pub tokens_used: i64,
    pub cost_micros: i64,
}

impl EndpointCounts {
    /// 1 when the event counts as an endpoint error: a status of 400 or more, or a request that was
    /// not VALID. The endpoint's requests, tokens and cost are the day's ([`DailyCounts`]).
    fn errors_of(e: &UsageEvent) -> i64 {
        i64::from(e.status_code.is_some_and(|s| s >= 400) || (e.kind.is_request() && !e.is_valid_request()))
    }
}

/// What a batch adds to one (key, UTC day, endpoint): a row of `usage_pending`, folded later into the
/// day's rollup, the endpoint's rollup and the key's counters ([`UsageStore::fold_usage`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUsage {
    pub key_id: KeyId,
    pub organization_id: OrgId,
    pub day: NaiveDate,
    /// Cut to [`MAX_ENDPOINT_LEN`]; `""` for events that named none.
    pub endpoint: String,
    pub counts: DailyCounts,
    /// The endpoint rollup's `errors` ([`EndpointCounts`]); its other columns are in `counts`.
    pub endpoint_errors: i64,
    /// The newest VALID request's time and last known address (`api_keys.last_used_*`); `None` when
    /// the row holds no VALID request. VALID requests are `counts.requests - counts.denied`.
    pub last_used_at: Option<DateTime<Utc>>,
    pub last_used_ip: Option<String>,
}

/// Everything one batch changes besides the event rows, computed from the events actually inserted.
#[derive(Debug, Default, PartialEq)]
pub struct BatchEffects {
    /// Per (key, UTC day, endpoint), appended to `usage_pending`.
    pub pending: Vec<PendingUsage>,
    /// Per (quota subject, `YYYY-MM`): units spent, added to `quota_usage` by the batch itself (the
    /// limiters seed from it after a restart, so it never lags).
    pub quota: Vec<(String, String, i64)>,
}

impl BatchEffects {
    /// Sorted by key (then day and endpoint), so that writers lock rows in one order (no deadlock
    /// between nodes, nor between the batches one node writes side by side).
    pub fn of<'a>(events: impl IntoIterator<Item = &'a UsageEvent>) -> Self {
        let mut fold = UsageFold::default();
        for e in events {
            fold.add(e);
        }
        fold.effects()
    }
}

/// One (key, UTC day, endpoint) of a [`UsageFold`]: what its events add to the rollups.
#[derive(Debug, Clone, PartialEq)]
struct FoldRow {
    organization_id: OrgId,
    counts: DailyCounts,
    endpoint_errors: i64,
    /// The newest VALID request's time and last known address.
    used: Option<(DateTime<Utc>, Option<IpAddr>)>,
}

/// Events folded in memory: per (key, UTC day, endpoint) the counts they add to the rollups, per
/// (quota subject, month) the units they spent. What it takes grows with the keys, days and endpoints
/// in use, not with the events: the usage writer folds a whole flush interval into one, and the store
/// writes it as one row per (key, day, endpoint) ([`BatchEffects`]). Folding is exact: sums (saturating,
/// as everywhere) and the newest use, so any split of a run of events into folds adds up to the fold of
/// the whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "FoldForm", from = "FoldForm")]
pub struct UsageFold {
    /// Nested so that a lookup by endpoint borrows the event's (no allocation per event).
    rows: HashMap<(KeyId, NaiveDate), HashMap<String, FoldRow>>,
    quota: HashMap<(QuotaSubject, (i32, u32)), i64>,
    events: u64,
}

impl UsageFold {
    /// Folds one event in.
    pub fn add(&mut self, e: &UsageEvent) {
        self.events = self.events.saturating_add(1);
        let endpoints = self.rows.entry((e.key_id, e.at.date_naive())).or_default();
        let row = match endpoints.get_mut(e.endpoint_key()) {
            Some(row) => row,
            None => endpoints.entry(e.endpoint_key().to_owned()).or_insert(FoldRow {
                organization_id: e.organization_id,
                counts: DailyCounts::default(),
                endpoint_errors: 0,
                used: None,
            }),
        };
        row.counts.add_event(e);
        row.endpoint_errors = row.endpoint_errors.saturating_add(EndpointCounts::errors_of(e));
        if e.is_valid_request() {
            newest_use(&mut row.used, e.at, e.ip);
            if let Some(subject) = e.quota_subject
                && e.quota_units > 0
            {
                let used = self.quota.entry((subject, (e.at.year(), e.at.month()))).or_default();
                *used = used.saturating_add(e.quota_units);
            }
        }
    }

    /// Events folded in.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Rows it writes: one per (key, day, endpoint) and one per quota counter.
    pub fn rows(&self) -> usize {
        self.rows.values().map(HashMap::len).sum::<usize>() + self.quota.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// What the fold changes in the store, sorted by key (then day and endpoint) and quota subject.
    pub fn effects(&self) -> BatchEffects {
        let mut pending: Vec<PendingUsage> = self
            .rows
            .iter()
            .flat_map(|(&(key_id, day), endpoints)| {
                endpoints.iter().map(move |(endpoint, row)| PendingUsage {
                    key_id,
                    organization_id: row.organization_id,
                    day,
                    endpoint: endpoint.clone(),
                    counts: row.counts.clone(),
                    endpoint_errors: row.endpoint_errors,
                    last_used_at: row.used.map(|u| u.0),
                    last_used_ip: row.used.and_then(|u| u.1).map(|ip| ip.to_string()),
                })
            })
            .collect();
        pending.sort_by(|a, b| (a.key_id, a.day, &a.endpoint).cmp(&(b.key_id, b.day, &b.endpoint)));
        let mut quota: Vec<_> =
            self.quota.iter().map(|((s, (y, m)), u)| (s.to_string(), format!("{y:04}-{m:02}"), *u)).collect();
        quota.sort();
        BatchEffects { pending, quota }
    }
}

/// The newest VALID use `(at, ip)` so far; an unknown address keeps the last known one.
fn newest_use(used: &mut Option<(DateTime<Utc>, Option<IpAddr>)>, at: DateTime<Utc>, ip: Option<IpAddr>) {
    let used = used.get_or_insert((at, ip));
    if at >= used.0 {
        used.0 = at;
        if ip.is_some() {
            used.1 = ip;
        }
    }
}

/// [`UsageFold`] as the spill file holds it: a row's counters in [`DAILY_COLUMNS`] order.
#[derive(Serialize, Deserialize)]
struct FoldForm {
    events: u64,
    rows: Vec<FoldRowForm>,
    quota: Vec<(QuotaSubject, i32, u32, i64)>,
}

#[derive(Serialize, Deserialize)]
struct FoldRowForm {
    key_id: KeyId,
    organization_id: OrgId,
    day: NaiveDate,
    endpoint: String,
    counts: Vec<i64>,
    endpoint_errors: i64,
    last_used_at: Option<DateTime<Utc>>,
    last_used_ip: Option<IpAddr>,
}

impl From<UsageFold> for FoldForm {
    fn from(fold: UsageFold) -> Self {
        let rows = fold
            .rows
            .into_iter()
            .flat_map(|((key_id, day), endpoints)| {
                endpoints.into_iter().map(move |(endpoint, row)| FoldRowForm {
                    key_id,
                    organization_id: row.organization_id,
                    day,
                    endpoint,
                    counts: row.counts.values().to_vec(),
                    endpoint_errors: row.endpoint_errors,
                    last_used_at: row.used.map(|u| u.0),
                    last_used_ip: row.used.and_then(|u| u.1),
                })
            })
            .collect();
        let quota = fold.quota.into_iter().map(|((s, (y, m)), u)| (s, y, m, u)).collect();
        Self { events: fold.events, rows, quota }
    }
}

impl From<FoldForm> for UsageFold {
    /// Counters missing from a row read as 0, extra ones are ignored.
    fn from(form: FoldForm) -> Self {
        let mut fold = UsageFold { events: form.events, ..UsageFold::default() };
        for r in form.rows {
            let mut values = [0i64; 25];
            for (v, c) in values.iter_mut().zip(r.counts) {
                *v = c;
            }
            let row = FoldRow {
                organization_id: r.organization_id,
                counts: DailyCounts::from_values(&values),
                endpoint_errors: r.endpoint_errors,
                used: r.last_used_at.map(|at| (at, r.last_used_ip)),
            };
            let endpoints = fold.rows.entry((r.key_id, r.day)).or_default();
            match endpoints.get_mut(r.endpoint.as_str()) {
                // Only a hand-edited file repeats a row: its counts add up.
                Some(mine) => {
                    mine.counts.add(&row.counts);
                    mine.endpoint_errors = mine.endpoint_errors.saturating_add(row.endpoint_errors);
                    if let Some((at, ip)) = row.used {
                        newest_use(&mut mine.used, at, ip);
                    }
                }
                None => {
                    endpoints.insert(r.endpoint, row);
                }
            }
        }
        for (s, y, m, u) in form.quota {
            let used = fold.quota.entry((s, (y, m))).or_default();
            *used = used.saturating_add(u);
        }
        fold
    }
}

/// What the usage writer hands the store at once: a run of events, those without a raw row folded
/// ([`UsageFold`]), those with one ([`RawEvents::keeps`]) whole, under one id. The store writes it once
/// ([`UsageStore::record_batch`]): a batch written again under its id (a retry after a commit whose
/// answer was lost, a spill file replayed) counts nothing twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageBatch {
    /// Made once when the batch is started ([`UsageBatch::new`]: random), or from its events' ids
    /// ([`UsageBatch::of`]), and kept with it through retries and the spill file.
    pub id: Uuid,
    /// The newest event's time (how long the id is kept: [`BATCH_ID_WINDOW`]).
    pub newest: DateTime<Utc>,
    /// The events that keep no raw row.
    pub folded: UsageFold,
    /// The events that keep a raw row: counted only if their row is new (an event, or a report's
    /// idempotency id, stored before is not counted again).
    pub raw: Vec<UsageEvent>,
}

impl UsageBatch {
    /// An empty batch with a fresh random id.
    pub fn new() -> Self {
        Self::with_id(Uuid::new_v4())
    }

    fn with_id(id: Uuid) -> Self {
        Self { id, newest: DateTime::<Utc>::MIN_UTC, folded: UsageFold::default(), raw: Vec::new() }
    }

    /// `events` as one batch, its id made from their ids ([`batch_id`]): the same events give the same
    /// batch (what batches and spill lines of versions before the fold were).
    pub fn of(events: &[UsageEvent], keep: RawEvents) -> Self {
        let mut batch = Self::with_id(batch_id(events));
        for e in events {
            batch.add(e.clone(), keep);
        }
        batch
    }

    /// Adds an event: folded, or kept whole when `keep` keeps its raw row.
    pub fn add(&mut self, e: UsageEvent, keep: RawEvents) {
        self.newest = self.newest.max(e.at);
        if keep.keeps(&e) {
            self.raw.push(e);
        } else {
            self.folded.add(&e);
        }
    }

    /// Events in the batch.
    pub fn events(&self) -> u64 {
        self.folded.events().saturating_add(self.raw.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.folded.is_empty() && self.raw.is_empty()
    }

    /// The effects of the folded events and of the raw events in `fresh` (those whose row is new).
    pub fn effects<'a>(&self, fresh: impl IntoIterator<Item = &'a UsageEvent>) -> BatchEffects {
        let mut fold = self.folded.clone();
        for e in fresh {
            fold.add(e);
        }
        fold.effects()
    }
}

impl Default for UsageBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Most pending rows one fold transaction takes: bounds how long it holds SQLite's write lock (about a
/// second on the project's machine) while batches queue behind it.
pub const FOLD_ROWS: i64 = 200_000;

/// `YYYY-MM` of a time's UTC month: the `month` of a quota counter.
pub fn month_of(at: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", at.year(), at.month())
}

/// What a batch write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordedBatch {
    pub inserted: u64,
    /// Events already stored (same id, or same idempotency id in the organization): not counted again.
    pub duplicates: u64,
}

/// One day of one key, read from the rollups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DailyUsage {
    pub day: NaiveDate,
    #[serde(flatten)]
    pub counts: DailyCounts,
}

/// One endpoint of a key over a span of days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(as = EndpointUsageResponse))]
pub struct EndpointUsage {
    /// `""`: requests that named no endpoint.
    pub endpoint: String,
    #[serde(flatten)]
    pub counts: EndpointCounts,
}

/// A span of UTC days, first and last included.
pub type Days = std::ops::RangeInclusive<NaiveDate>;

/// Ids one statement of [`UsageStore::keys_by_id`] looks up: few enough placeholders for any database,
/// enough that a CSV of 100,000 lines needs 200 statements, not 100,000.
pub const KEY_LOOKUP_CHUNK: usize = 500;

/// One key's totals over a span of days (a billing line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyTotals {
    pub key_id: KeyId,
    #[serde(flatten)]
    pub counts: DailyCounts,
}

/// Sums over raw events (what the rollups must agree with; for tests and audits, not for dashboards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventTotals {
    pub events: i64,
    pub requests: i64,
    pub tokens_used: i64,
    pub cost_micros: i64,
    pub latency_sum_ms: i64,
}

/// The usage ledger's storage. Every backend implements it; [`crate::Store`] requires it.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// [`UsageStore::record_usage`] keeping a raw row for every event.
    async fn record_usage_batch(&self, events: &[UsageEvent]) -> StoreResult<RecordedBatch> {
        self.record_usage(events, RawEvents::All).await
    }

    /// Writes a batch once: its id ([`batch_id`]) goes into `usage_batches` in the same transaction,
    /// and a batch whose id is there already is skipped whole. Inserts a raw row for each event `raw`
    /// keeps, unless it is stored already (by id, and by idempotency id per organization: such an
    /// event is not counted again); adds the counted events to the monthly quota counters and appends
    /// what they change in the rollups and the keys' `total_requests`/`last_used_*` to
    /// `usage_pending` ([`BatchEffects`]). All or nothing. The rollups show the batch after the next
    /// [`UsageStore::fold_usage`].
    async fn record_usage(&self, events: &[UsageEvent], raw: RawEvents) -> StoreResult<RecordedBatch> {
        self.record_batch(&UsageBatch::of(events, raw)).await
    }

    /// Writes a batch once, as [`UsageStore::record_usage`] does: its id into `usage_batches` (a batch
    /// whose id is there already is skipped whole), a raw row for each of its raw events not stored
    /// already, the quota counters and one `usage_pending` row per (key, day, endpoint) of its folded
    /// events and its new raw events. All or nothing.
    async fn record_batch(&self, batch: &UsageBatch) -> StoreResult<RecordedBatch>;

    /// Forgets the ids of batches whose newest event is older than `before`; returns how many.
    async fn prune_usage_batches(&self, before: DateTime<Utc>) -> StoreResult<u64>;

    /// Folds the pending rows into `usage_daily`, `usage_daily_endpoints`, the billing rollups
    /// (`usage_org_daily`, `usage_key_monthly`, `usage_owner_daily`) and `api_keys`, and deletes them, in transactions of at most [`FOLD_ROWS`] rows each, in key order; returns how many rows
    /// it folded. Each row is folded exactly once, whatever folds other nodes run at the same time.
    async fn fold_usage(&self) -> StoreResult<u64>;

    /// A key's rollup rows for `from..=to` (UTC days), oldest first; days without use have no row.
    async fn key_usage_daily(&self, key_id: KeyId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<DailyUsage>>;

    /// A key's endpoints over `from..=to`, most requested first, at most `limit`.
    async fn key_usage_endpoints(
        &self,
        key_id: KeyId,
        from: NaiveDate,
        to: NaiveDate,
        limit: u32,
    ) -> StoreResult<Vec<EndpointUsage>>;

    /// Every key of an organization that has usage in `from..=to`, with its totals, by key id.
    async fn org_usage_by_key(&self, org: OrgId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<KeyTotals>>;

    /// An organization's rollups for `from..=to` (UTC days), every key's summed per day, oldest first;
    /// days without use have no row. Read from the organization's own daily rollup, which the fold keeps
    /// equal to the sum of its keys' days: at most a row a day, however many keys.
    async fn org_usage_daily(&self, org: OrgId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<DailyUsage>>;

    /// The keys of an organization with usage in the UTC month that starts on `month` (its first day),
    /// with their month's totals, costliest first (cost, then requests, descending; then key id), at
    /// most `limit` (none: every one). Read from the keys' monthly rollup, which the fold keeps equal to
    /// the sums of their days, along an index in that order: the top of a month is an index walk.
    async fn org_month_by_cost(&self, org: OrgId, month: NaiveDate, limit: Option<u32>) -> StoreResult<Vec<KeyTotals>>;

    /// How many keys of an organization have usage in the UTC month that starts on `month`.
    async fn org_month_keys(&self, org: OrgId, month: NaiveDate) -> StoreResult<u64>;

    /// The keys of one owner in an organization with usage in the UTC month that starts on `month`
    /// (its first day), with their month's totals, by key id: a self-service customer's billing month
    /// (any status: a revoked key's usage is still billed). Read from the keys' monthly rollup, one row
    /// per key of the owner, found through the owner's keys.
    async fn owner_month_by_key(&self, org: OrgId, owner: &str, month: NaiveDate) -> StoreResult<Vec<KeyTotals>>;

    /// The rollups of one owner's keys in an organization on `days` (UTC), summed per day, oldest
    /// first; days without use have no row. Read from the owner's own daily rollup, which the fold
    /// keeps equal to the sum of those keys' days: at most a row a day, however many keys.
    async fn owner_usage_daily(&self, org: OrgId, owner: &str, days: Days) -> StoreResult<Vec<DailyUsage>>;

    /// The keys among `ids` that exist (of any organization: the caller already decided what it may
    /// see), in no particular order, read [`KEY_LOOKUP_CHUNK`] ids per statement: the names of a
    /// month's billing lines without a query per line.
    async fn keys_by_id(&self, ids: &[KeyId]) -> StoreResult<Vec<crate::ApiKey>>;

    /// Units spent from a quota subject in a `YYYY-MM` month (0 when never used).
    async fn quota_used(&self, subject: &str, month: &str) -> StoreResult<i64>;

    /// Sums over a key's raw events in `[from, until)`, to reconcile them with the rollups (tests, the
    /// ingest benchmark). Raw events are indexed by time only (migration 0005): this reads every event
    /// of the range.
    async fn usage_event_totals(
        &self,
        key_id: KeyId,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<EventTotals>;

    /// Deletes raw events older than `before`, at most `limit` of them; returns how many. Rollups stay.
    async fn prune_usage_events(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_bucket_that_holds_the_95th_percentile() {
        let mut h = Histogram::default();
        assert_eq!(h.p95_ms(), None);
        // 95 fast (≤ 1 ms) and 5 slow (≤ 500 ms): p95 is the 95th sample, fast.
        h.0[0] = 95;
        h.0[Histogram::bucket_of(400)] = 5;
        assert_eq!(h.p95_ms(), Some(1));
        h.0[0] = 94;
        assert_eq!(h.p95_ms(), Some(500));
        assert_eq!(Histogram::bucket_of(0), 0);
        assert_eq!(Histogram::bucket_of(3), 2);
        assert_eq!(Histogram::bucket_of(90_000), 15);
        let mut open = Histogram::default();
        open.0[15] = 1;
        assert_eq!(open.p95_ms(), Some(60_000));
    }

    #[test]
    fn event_ids_are_distinct_time_ordered_v7() {
        let t = DateTime::from_timestamp(1_893_456_000, 0).unwrap_or_default();
        let ids: Vec<Uuid> = (0..10_000).map(|i| event_id(t + chrono::Duration::milliseconds(i / 100))).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), ids.len());
        let (first, last) = (ids[0].get_timestamp(), ids[9_999].get_timestamp());
        assert_eq!(first.map(|ts| ts.to_unix()), Some((1_893_456_000, 0)));
        assert_eq!(last.map(|ts| ts.to_unix()), Some((1_893_456_000, 99_000_000)));
    }

    #[test]
    fn quota_subjects_read_back_from_their_text() {
        let (key, org) = (KeyId::new(), OrgId::new());
        for s in [QuotaSubject::Key(key), QuotaSubject::Org(org)] {
            assert_eq!(s.to_string().parse::<QuotaSubject>(), Ok(s));
        }
        assert_eq!(QuotaSubject::Org(org).to_string(), format!("quota:org:{org}"));
        assert!("quota:team:x".parse::<QuotaSubject>().is_err());
        assert!("quota:key:nope".parse::<QuotaSubject>().is_err());
    }

    /// A VALID verification of a new key, in 2030.
    fn valid_verification() -> UsageEvent {
        let t = DateTime::from_timestamp(1_893_456_000, 0).unwrap_or_default();
        let mut e = UsageEvent::new(UsageKind::Verify, KeyId::new(), OrgId::new(), t);
        e.outcome = Some("VALID".into());
        e
    }

    #[test]
    fn effects_count_requests_reports_and_quota_once() {
        let mut valid = valid_verification();
        let (key, org, t) = (valid.key_id, valid.organization_id, valid.at);
        valid.quota_subject = Some(QuotaSubject::Org(org));
        valid.quota_units = 3;
        valid.ip = Some([10, 0, 0, 1].into());
        let mut limited = UsageEvent::new(UsageKind::Verify, key, org, t);
        limited.outcome = Some("RATE_LIMITED".into());
        let mut report = UsageEvent::new(UsageKind::Report, key, org, t);
        report.status_code = Some(503);
        report.response_time_ms = Some(12);
        report.tokens_used = 7;
        report.cost_micros = 250;
        report.endpoint = Some("/v1/chat".into());
        let fx = BatchEffects::of([&valid, &limited, &report]);
        // Two endpoints: none (the verifications) and /v1/chat (the report).
        assert_eq!(fx.pending.len(), 2);
        let (none, chat) = (&fx.pending[0], &fx.pending[1]);
        assert_eq!((none.endpoint.as_str(), chat.endpoint.as_str()), ("", "/v1/chat"));
        let c = &none.counts;
        assert_eq!((c.requests, c.denied, c.reports, none.endpoint_errors), (2, 1, 0, 1));
        assert_eq!(none.last_used_at, Some(t));
        assert_eq!(none.last_used_ip.as_deref(), Some("10.0.0.1"));
        let c = &chat.counts;
        assert_eq!((c.requests, c.reports, c.errors_5xx, chat.endpoint_errors), (0, 1, 1, 1));
        assert_eq!((c.tokens_used, c.cost_micros, c.latency_count, c.latency_sum_ms), (7, 250, 1, 12));
        assert_eq!(chat.last_used_at, None);
        assert_eq!(fx.quota, vec![(format!("quota:org:{org}"), "2030-01".to_owned(), 3)]);
    }

    #[test]
    fn effects_saturate_instead_of_overflowing() {
        let mut e = valid_verification();
        let key = e.key_id;
        (e.tokens_used, e.cost_micros, e.response_time_ms) = (i64::MAX, i64::MAX, Some(i64::MAX));
        e.quota_subject = Some(QuotaSubject::Key(key));
        e.quota_units = i64::MAX;
        let fx = BatchEffects::of([&e, &e.clone(), &e.clone()]);
        let c = &fx.pending[0].counts;
        assert_eq!((c.tokens_used, c.cost_micros, c.latency_sum_ms), (i64::MAX, i64::MAX, i64::MAX));
        assert_eq!((c.requests, c.latency_count, c.latency.0[15]), (3, 3, 3));
        assert_eq!(fx.quota[0].2, i64::MAX);
        let mut total = c.clone();
        total.add(c);
        assert_eq!((total.tokens_used, total.requests), (i64::MAX, 6));
        let mut full = Histogram::default();
        full.0[15] = i64::MAX;
        full.add(&Histogram([1; 16]));
        assert_eq!((full.0[15], full.count()), (i64::MAX, i64::MAX));
        assert_eq!(full.p95_ms(), Some(60_000), "no overflow in the rank either");
    }
}
