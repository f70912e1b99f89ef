//! Keyward's storage: the [`Store`] trait every backend implements, the records it reads and writes,
//! and the backends themselves: SQLite ([`sqlite`]) and PostgreSQL ([`postgres`]), chosen by the URL
//! given to [`open`].
//!
//! A change that touches several rows is one method, run in one transaction; every change to a key or
//! an organization writes its audit row (and its outbox event) inside that same transaction.
//!
//! The store is written once for both databases (`sql`): its statements, the rows they read, and what
//! each change does besides its rows (`effects`: the record after it, its audit rows, its event),
//! decided in plain Rust. A backend gives only its connections, its error mapping and how it encodes
//! the column types the two databases store differently, plus the usage ledger's bulk SQL; so both
//! backends behave the same by construction, and the conformance suite runs against each.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use keyward_core::{Environment, HashAlgorithm, IpAllowList, KeyHash, KeyId, KeyState, KeyStatus, OrgId, ScopeSet};
use serde::Serialize;
use serde_json::{Value, json};

// The columns every backend reads into its rows, always named, never `*`: a prepared statement whose
// result columns changed (a migration ran while the pool was open) fails in PostgreSQL ("cached plan
// must not change result type") and confuses sqlx's SQLite statement cache. Both backends have the same
// columns, so the lists live here once.
macro_rules! org_columns {
    () => {
        concat!("id, ", org_settings_columns!())
    };
}

// Every column of an organization's row but its id, in the order [`sql`] binds them: an update writes
// them all (the slug and `created_at` as they were).
macro_rules! org_settings_columns {
    () => {
        concat!("name, slug, email, plan, is_active, ", limit_columns!(), ", max_api_keys, created_at, updated_at")
    };
}

// The limit override columns of keys and organizations alike, in the one order they are bound.
macro_rules! limit_columns {
    () => {
        "rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, monthly_request_limit"
    };
}

macro_rules! key_columns {
    () => {
        concat!(
            "id, organization_id, owner_id, name, description, environment, prefix, key_hint, key_hash, \
             hash_algorithm, scopes, allowed_ips, expires_at, is_active, revoked_at, revoke_reason, plan, ",
            limit_columns!(),
            ", metadata, total_requests, last_used_at, last_used_ip, rotated_from, replaced_by, created_by, \
             created_at, updated_at, lineage_id"
        )
    };
}

macro_rules! audit_columns {
    () => {
        "id, action, key_id, organization_id, actor, actor_ip, details, created_at"
    };
}

// An audit row with its chain hashes (see keyward_core::audit_chain).
macro_rules! chained_audit_columns {
    () => {
        "id, action, key_id, organization_id, actor, actor_ip, details, created_at, prev_hash, row_hash"
    };
}

pub mod changed;
#[doc(hidden)]
pub mod conformance;
#[doc(hidden)]
pub mod conformance_lifecycle;
mod effects;
pub mod lifecycle;
pub mod lookup;
#[cfg(feature = "utoipa")]
pub mod openapi;
pub mod postgres;
pub mod record;
mod sql;
pub mod sqlite;
#[doc(hidden)]
pub mod testing;
pub mod usage;
pub mod webhook;

pub use changed::{Changed, Invalidation, Invalidator, NoCache, Write};
pub use lookup::KeyLookup;
pub use record::{KeyExtras, KeyRecord, OrgRecord};
pub use usage::UsageStore;

/// What went wrong in storage, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A unique value is taken (slug, key hash); the message names which.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The organization already holds `max_api_keys` keys.
    #[error("the organization has reached its limit of {0} API keys")]
    KeyLimitReached(i64),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A stored value that does not parse: the database was edited by hand or by a newer version.
pub(crate) fn corrupt(column: &str, what: impl fmt::Display) -> StoreError {
    StoreError::Internal(format!("invalid value in column `{column}`: {what}"))
}

/// Who made a change, from where, and when; written into the audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// A key id, `cli` or `system`.
    pub actor: String,
    pub ip: Option<String>,
    pub at: DateTime<Utc>,
}

impl Actor {
    pub fn cli(at: DateTime<Utc>) -> Self {
        Self { actor: "cli".to_owned(), ip: None, at }
    }

    pub fn system(at: DateTime<Utc>) -> Self {
        Self { actor: "system".to_owned(), ip: None, at }
    }

    pub fn key(id: KeyId, ip: Option<String>, at: DateTime<Utc>) -> Self {
        Self { actor: id.to_string(), ip, at }
    }
}

/// Rate limits and quota overrides; `None` (`null`) means "from the plan".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct LimitOverrides {
    pub rate_limit_per_minute: Option<i64>,
    pub rate_limit_per_hour: Option<i64>,
    pub rate_limit_per_day: Option<i64>,
    pub monthly_request_limit: Option<i64>,
}

impl LimitOverrides {
    /// As the limiter reads them (a negative value, which the API never writes, inherits).
    pub fn core(&self) -> keyward_core::LimitOverrides {
        keyward_core::LimitOverrides::from_signed(
            self.rate_limit_per_minute,
            self.rate_limit_per_hour,
            self.rate_limit_per_day,
            self.monthly_request_limit,
        )
    }
}

/// A partial update of [`LimitOverrides`], in a key's or an organization's patch: `None` leaves a
/// limit alone; `Some(None)` clears it (back to the plan's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitPatch {
    pub rate_limit_per_minute: Option<Option<i64>>,
    pub rate_limit_per_hour: Option<Option<i64>>,
    pub rate_limit_per_day: Option<Option<i64>>,
    pub monthly_request_limit: Option<Option<i64>>,
}

impl LimitPatch {
    pub fn apply_to(&self, limits: &mut LimitOverrides) {
        // Destructured so that a limit added to the patch fails to compile here until it is handled.
        let Self { rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, monthly_request_limit } = *self;
        set(&mut limits.rate_limit_per_minute, rate_limit_per_minute);
        set(&mut limits.rate_limit_per_hour, rate_limit_per_hour);
        set(&mut limits.rate_limit_per_day, rate_limit_per_day);
        set(&mut limits.monthly_request_limit, monthly_request_limit);
    }
}

// Serialized, this is the API's organization: its serde form is its wire form (and its audit form).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(as = OrganizationResponse))]
pub struct Organization {
    #[cfg_attr(feature = "utoipa", schema(value_type = String, format = Uuid))]
    pub id: OrgId,
    pub name: String,
    pub slug: String,
    pub email: Option<String>,
    pub plan: String,
    pub is_active: bool,
    #[serde(flatten)]
    pub limits: LimitOverrides,
    /// `null`: no limit.
    pub max_api_keys: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewOrganization {
    pub id: OrgId,
    pub name: String,
    pub slug: String,
    pub email: Option<String>,
    pub plan: String,
    pub is_active: bool,
    pub limits: LimitOverrides,
    pub max_api_keys: Option<i64>,
}

impl NewOrganization {
    /// The organization as stored when it is created at `at`.
    pub(crate) fn created(self, at: DateTime<Utc>) -> Organization {
        let Self { id, name, slug, email, plan, is_active, limits, max_api_keys } = self;
        let at = stored_time(at);
        Organization { id, name, slug, email, plan, is_active, limits, max_api_keys, created_at: at, updated_at: at }
    }
}

/// A partial update: `None` leaves a field alone; `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrganizationPatch {
    pub name: Option<String>,
    pub email: Option<Option<String>>,
    pub plan: Option<String>,
    pub is_active: Option<bool>,
    pub limits: LimitPatch,
    pub max_api_keys: Option<Option<i64>>,
}

impl OrganizationPatch {
    /// The audit action, as for keys ([`KeyPatch::action`]): a change of `is_active` alone is an
    /// activation or a deactivation; anything else is an update.
    pub fn action(&self) -> &'static str {
        let only_active = Self { is_active: None, ..self.clone() } == Self::default();
        activation_action(only_active, self.is_active)
    }

    /// The organization as it is after the patch (nothing is written).
    pub fn apply_to(&self, org: &Organization) -> Organization {
        // Destructured so that a field added to the patch fails to compile here until it is handled.
        let Self { name, email, plan, is_active, limits, max_api_keys } = self.clone();
        let mut out = org.clone();
        set(&mut out.name, name);
        set(&mut out.email, email);
        set(&mut out.plan, plan);
        set(&mut out.is_active, is_active);
        limits.apply_to(&mut out.limits);
        set(&mut out.max_api_keys, max_api_keys);
        out
    }
}

fn activation_action(only_active: bool, is_active: Option<bool>) -> &'static str {
    match (only_active, is_active) {
        (true, Some(false)) => "deactivate",
        (true, Some(true)) => "activate",
        _ => "update",
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

/// A time as every backend stores it: microseconds (SQLite's fixed-width text, PostgreSQL's
/// `timestamptz`), so an in-memory record compares equal to the one read back.
pub fn stored_time(at: DateTime<Utc>) -> DateTime<Utc> {
    at.trunc_subsecs(6)
}

/// A JSON document as every backend gives it back. PostgreSQL's `jsonb` keeps numbers as `numeric`,
/// which has no negative zero and writes an exponent out as digits (`1e16` comes back
/// `10000000000000000`, read as an integer when it fits one); SQLite keeps the text. Audit details are
/// written and hashed in this form, so that a row read back hashes as it did when it was written.
pub fn stored_json(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), stored_json(v))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(stored_json).collect()),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            let text = n.to_string();
            let written_out = text.split_once('e').is_some_and(|(_, exponent)| !exponent.starts_with('-'));
            // Bounds as f64: 2^64 and -2^63, each exact.
            match () {
                _ if f == 0.0 => json!(0.0),
                _ if written_out && f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => {
                    json!(f as u64)
                }
                _ if written_out && f.fract() == 0.0 && (-9_223_372_036_854_775_808.0..0.0).contains(&f) => {
                    json!(f as i64)
                }
                _ => value.clone(),
            }
        }
        other => other.clone(),
    }
}

/// A stored API key. Holds the hash (never the key); [`ApiKey::audit_json`] is what an audit row shows.
// Serialized, it is the API's key record (the server adds the derived status). SECURITY: the hash and
// how it was made are `serde(skip)`; `KeyHash` has no `Serialize`, so no body can carry it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(
    feature = "utoipa",
    derive(utoipa::ToSchema),
    schema(description = "An API key as the API shows it: never the key, never its hash.")
)]
pub struct ApiKey {
    #[cfg_attr(feature = "utoipa", schema(value_type = String, format = Uuid))]
    pub id: KeyId,
    #[cfg_attr(feature = "utoipa", schema(value_type = String, format = Uuid))]
    pub organization_id: OrgId,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: Option<String>,
    #[cfg_attr(feature = "utoipa", schema(value_type = openapi::EnvironmentName))]
    pub environment: Environment,
    /// The visible start of the key.
    #[cfg_attr(feature = "utoipa", schema(example = "sk_live_"))]
    pub prefix: String,
    /// The last four characters of the key.
    pub hint: String,
    #[serde(skip)]
    pub hash_algorithm: HashAlgorithm,
    #[serde(skip)]
    pub key_hash: KeyHash,
    #[cfg_attr(feature = "utoipa", schema(value_type = Vec<String>))]
    pub scopes: ScopeSet,
    #[cfg_attr(feature = "utoipa", schema(value_type = Vec<String>))]
    pub allowed_ips: IpAllowList,
    pub expires_at: Option<DateTime<Utc>>,
    pub is_active: bool,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_reason: Option<String>,
    /// Per-key tier override; `null`: the organization's plan.
    pub plan: Option<String>,
    #[serde(flatten)]
    pub limits: LimitOverrides,
    /// A JSON object (email, company, ...).
    #[cfg_attr(feature = "utoipa", schema(value_type = Object))]
    pub metadata: Value,
    pub total_requests: i64,
    pub last_used_at: Option<DateTime<Utc>>,
    pub last_used_ip: Option<String>,
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>))]
    pub rotated_from: Option<KeyId>,
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>))]
    pub replaced_by: Option<KeyId>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The first key of this key's rotation chain; `None`: the key itself (never rotated from another).
    /// Internal bookkeeping of the counters, not shown.
    #[serde(skip)]
    pub lineage_id: Option<KeyId>,
}

impl ApiKey {
    /// The id rate-limit and quota counters are kept under: shared by every key of a rotation chain,
    /// so a rotation never doubles an allowance.
    pub fn lineage(&self) -> KeyId {
        self.lineage_id.unwrap_or(self.id)
    }

    pub fn state(&self) -> KeyState {
        KeyState { is_active: self.is_active, revoked_at: self.revoked_at, expires_at: self.expires_at }
    }

    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        self.state().status(now)
    }

    /// The fields an audit diff compares. SECURITY: no hash, no key; timestamps that change on every
    /// write and usage counters are left out so a diff shows only what the actor changed.
    pub fn audit_json(&self) -> Value {
        json!({
            "name": self.name,
            "description": self.description,
            "owner_id": self.owner_id,
            "environment": self.environment,
            "prefix": self.prefix,
            "hint": self.hint,
            "scopes": self.scopes,
            "allowed_ips": self.allowed_ips,
            "expires_at": self.expires_at,
            "is_active": self.is_active,
            "revoked_at": self.revoked_at,
            "revoke_reason": self.revoke_reason,
            "plan": self.plan,
            "rate_limit_per_minute": self.limits.rate_limit_per_minute,
            "rate_limit_per_hour": self.limits.rate_limit_per_hour,
            "rate_limit_per_day": self.limits.rate_limit_per_day,
            "monthly_request_limit": self.limits.monthly_request_limit,
            "metadata": self.metadata,
        })
    }
}

impl Organization {
    /// The fields an audit diff compares (all but the timestamps).
    pub fn audit_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(map) = v.as_object_mut() {
            map.remove("created_at");
            map.remove("updated_at");
            map.remove("id");
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewKey {
    pub id: KeyId,
    pub organization_id: OrgId,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub environment: Environment,
    pub prefix: String,
    pub hint: String,
    pub hash_algorithm: HashAlgorithm,
    pub key_hash: KeyHash,
    pub scopes: ScopeSet,
    pub allowed_ips: IpAllowList,
    pub expires_at: Option<DateTime<Utc>>,
    pub is_active: bool,
    pub plan: Option<String>,
    pub limits: LimitOverrides,
    pub metadata: Value,
    pub rotated_from: Option<KeyId>,
}

/// A partial update of a key: `None` leaves a field alone; `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub scopes: Option<ScopeSet>,
    pub allowed_ips: Option<IpAllowList>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub metadata: Option<Value>,
    pub plan: Option<Option<String>>,
    pub is_active: Option<bool>,
    pub limits: LimitPatch,
}

impl KeyPatch {
    /// The audit action a patch is recorded as: a change of `is_active` alone is an activation or a
    /// deactivation; anything else is an update.
    pub fn action(&self) -> &'static str {
        let only_active = Self { is_active: None, ..self.clone() } == Self::default();
        activation_action(only_active, self.is_active)
    }

    /// The key as it is after the patch (nothing is written). Times are cut to what storage keeps.
    pub fn apply_to(&self, key: &ApiKey) -> ApiKey {
        // Destructured so that a field added to KeyPatch fails to compile here until it is handled.
        let Self { name, description, scopes, allowed_ips, expires_at, metadata, plan, is_active, limits } =
            self.clone();
        let mut out = key.clone();
        set(&mut out.name, name);
        set(&mut out.description, description);
        set(&mut out.scopes, scopes);
        set(&mut out.allowed_ips, allowed_ips);
        set(&mut out.expires_at, expires_at.map(|at| at.map(stored_time)));
        set(&mut out.metadata, metadata);
        set(&mut out.plan, plan);
        set(&mut out.is_active, is_active);
        limits.apply_to(&mut out.limits);
        out
    }
}

/// One key of an import ([`Store::import_keys`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyImport {
    pub key: NewKey,
    /// The key is not in Keyward's format (or only its SHA-256 is known): verification finds it by
    /// the plain hash of whatever string the customer sends. See [`Store::has_legacy_keys`].
    pub legacy: bool,
    /// When the old system issued it; `None`: the time of the import.
    pub created_at: Option<DateTime<Utc>>,
}

/// Decides what becomes of each key of an import, the same way in every backend: `known` maps the
/// hashes already stored to their organization, `held` is the organization's count against
/// `max_api_keys`. Returns the outcome of every key and the indexes of the keys to insert.
pub(crate) fn plan_import(
    org: &Organization,
    mut held: i64,
    keys: &[KeyImport],
    known: &HashMap<KeyHash, OrgId>,
) -> (Vec<ImportOutcome>, Vec<usize>) {
    let mut outcomes = Vec::with_capacity(keys.len());
    let mut inserts = Vec::new();
    let mut seen = HashSet::new();
    for (index, import) in keys.iter().enumerate() {
        let hash = import.key.key_hash;
        let outcome = match (known.get(&hash), org.max_api_keys) {
            (Some(owner), _) if *owner == org.id => ImportOutcome::Unchanged,
            (Some(_), _) => ImportOutcome::HashInOtherOrganization,
            // A hash given twice in one import is imported once.
            (None, _) if seen.contains(&hash) => ImportOutcome::Unchanged,
            (None, Some(max)) if held >= max => ImportOutcome::KeyLimitReached(max),
            (None, _) => {
                seen.insert(hash);
                held += 1;
                inserts.push(index);
                ImportOutcome::Imported
            }
        };
        outcomes.push(outcome);
    }
    (outcomes, inserts)
}

/// What became of one key of an import, in the order the keys were given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported,
    /// A key with this hash is already in the organization: left as it is (re-running an import
    /// changes nothing).
    Unchanged,
    /// A key with this hash belongs to another organization.
    HashInOtherOrganization,
    /// The organization holds `max_api_keys` keys.
    KeyLimitReached(i64),
}

/// A key found by hash, with what verification needs of its organization.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyWithOrg {
    pub key: ApiKey,
    pub org_is_active: bool,
    /// The organization's plan and overrides: with the key's own, they decide the key's limits.
    pub org_plan: String,
    pub org_limits: LimitOverrides,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyFilter {
    /// `None`: every organization (admin only).
    pub organization_id: Option<OrgId>,
    pub owner_id: Option<String>,
    pub environment: Option<Environment>,
    /// Derived status at `now`. When given, it alone decides which keys are listed.
    pub status: Option<KeyStatus>,
    /// Without it (and without `status`), disabled and revoked keys are left out.
    pub include_inactive: bool,
    /// Keys whose name or owner id contains it (ASCII letters in any case; every other character as
    /// it is), or whose hint is exactly it. At most [`MAX_KEY_SEARCH_CHARS`] characters; `%` and `_`
    /// are plain characters.
    pub search: Option<String>,
    /// Only keys not yet expired at `now` that expire at or before this time.
    pub expires_by: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// Longest [`KeyFilter::search`] the API accepts, in characters: longer than any name worth typing,
/// short enough that a pattern costs nothing to match.
pub const MAX_KEY_SEARCH_CHARS: usize = 100;

/// A page request: up to `limit` items strictly after the cursor, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest<C> {
    pub after: Option<C>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_cursor: Option<C>,
}

// Serialized, this is the API's audit row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(as = AuditEntryResponse))]
pub struct AuditEntry {
    pub id: i64,
    pub action: String,
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>))]
    pub key_id: Option<KeyId>,
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<String>))]
    pub organization_id: Option<OrgId>,
    /// A key id, `cli` or `system`.
    pub actor: String,
    pub actor_ip: Option<String>,
    /// `{"before": {...}, "after": {...}}` of the changed fields.
    #[cfg_attr(feature = "utoipa", schema(value_type = Object))]
    pub details: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    /// `None`: every organization (admin only).
    pub organization_id: Option<OrgId>,
    pub key_id: Option<KeyId>,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Requests a key made since the last flush, merged per key by the batch writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: KeyId,
    pub requests: i64,
    pub last_used_at: DateTime<Utc>,
    pub last_used_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

pub use lifecycle::{AuditChainReport, BrokenLink, Event, EventKind, LifecycleStore, Rotation};
pub use webhook::{
    Attempt, AttemptOutcome, Delivery, DeliveryJob, NewWebhook, Webhook, WebhookPatch, WebhookSecret, WebhookStore,
};

/// The storage every Keyward node talks to. Held as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: KeyLookup + LifecycleStore + WebhookStore + UsageStore + Send + Sync + fmt::Debug {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    async fn migrate_up(&self) -> StoreResult<Vec<MigrationInfo>>;
    /// Reverts the newest `steps` applied migrations.
    async fn migrate_down(&self, steps: u32) -> StoreResult<Vec<MigrationInfo>>;
    async fn migration_status(&self) -> StoreResult<Vec<MigrationInfo>>;

    async fn insert_org(&self, org: NewOrganization, actor: &Actor) -> StoreResult<Organization>;
    async fn get_org(&self, id: OrgId) -> StoreResult<Organization>;
    async fn find_org_by_slug(&self, slug: &str) -> StoreResult<Option<Organization>>;
    async fn list_orgs(&self, page: PageRequest<OrgId>) -> StoreResult<Page<Organization, OrgId>>;
    async fn update_org(
        &self,
        id: OrgId,
        patch: OrganizationPatch,
        actor: &Actor,
    ) -> StoreResult<Changed<Organization>>;
    async fn count_orgs(&self) -> StoreResult<i64>;

    /// Inserts a key and its audit row; refuses with `KeyLimitReached` when the organization already
    /// holds `max_api_keys` keys that are not revoked (checked in the same transaction).
    async fn insert_key(&self, key: NewKey, actor: &Actor) -> StoreResult<Changed<ApiKey>>;
    /// The whole key and its organization's part (verification reads [`KeyLookup::find_key_record`]).
    async fn find_key_by_hash(&self, hash: &KeyHash) -> StoreResult<Option<KeyWithOrg>>;
    async fn get_key(&self, id: KeyId) -> StoreResult<ApiKey>;
    async fn list_keys(&self, filter: &KeyFilter, page: PageRequest<KeyId>) -> StoreResult<Page<ApiKey, KeyId>>;
    /// Applies the patch and writes an audit row with the diff; a patch that changes nothing writes no row.
    async fn update_key(&self, id: KeyId, patch: KeyPatch, actor: &Actor) -> StoreResult<Changed<ApiKey>>;
    /// Permanent; keeps the row. `revoked_at` is `at` (may be in the future: a grace period).
    /// Revoking a revoked key changes nothing and writes no row.
    async fn revoke_key(
        &self,
        id: KeyId,
        reason: &str,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Changed<ApiKey>>;
    /// Adds requests and moves `last_used_*` forward (never back), for many keys in one transaction.
    async fn record_key_usage(&self, usage: &[KeyUsage]) -> StoreResult<()>;

    /// Imports keys issued by another system into `organization_id`, in one transaction, with the same
    /// `max_api_keys` check as [`Store::insert_key`]. A key whose hash is already stored is not
    /// touched. Every key must name `organization_id`. No audit row per key: the caller writes one for
    /// the whole import with [`Store::append_audit`]. With `dry_run` everything is checked and rolled
    /// back, so the outcomes say what a real run would do.
    async fn import_keys(
        &self,
        organization_id: OrgId,
        keys: Vec<KeyImport>,
        actor: &Actor,
        dry_run: bool,
    ) -> StoreResult<Changed<Vec<ImportOutcome>>>;
    /// Brings the database's statistics on the keys up to date, after many were written at once (an
    /// import): where the database plans a search by them, one planned without them may read every
    /// key. Nothing, where the database plans without them.
    async fn analyze_keys(&self) -> StoreResult<()>;
    /// Whether any key was imported as a legacy key (any organization). Cheap: a partial index.
    async fn has_legacy_keys(&self) -> StoreResult<bool>;

    /// An audit row of its own, for changes that span several transactions (an import).
    async fn append_audit(
        &self,
        action: &str,
        organization_id: OrgId,
        details: Value,
        actor: &Actor,
    ) -> StoreResult<AuditEntry>;
    async fn list_audit(&self, filter: &AuditFilter, page: PageRequest<i64>) -> StoreResult<Page<AuditEntry, i64>>;
}

/// Opens the store a URL names, migrating it up when asked: `sqlite://path`, `sqlite::memory:`, or
/// `postgres://user@host/db` (also `postgresql://`). The scheme decides the backend here, once.
pub async fn open(url: &str, migrate: bool) -> StoreResult<Arc<dyn Store>> {
    let store: Arc<dyn Store> = if url.starts_with("sqlite:") {
        Arc::new(sqlite::SqliteStore::connect(url).await?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Arc::new(postgres::PostgresStore::connect(url).await?)
    } else {
        return Err(StoreError::Internal(format!(
            "unsupported database URL scheme in `{}` (expected sqlite: or postgres://)",
            url.split(':').next().unwrap_or_default()
        )));
    };
    if migrate {
        store.migrate_up().await?;
    }
    Ok(store)
}

/// Records as a store returns them, for unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) fn org(at: DateTime<Utc>) -> Organization {
        Organization {
            id: OrgId::new(),
            name: "a".into(),
            slug: "a".into(),
            email: Some("a@b.c".into()),
            plan: "free".into(),
            is_active: true,
            limits: LimitOverrides::default(),
            max_api_keys: Some(3),
            created_at: at,
            updated_at: at,
        }
    }

    pub(crate) use crate::testing::key;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_action_names_activation_alone() {
        let deactivate = KeyPatch { is_active: Some(false), ..Default::default() };
        assert_eq!(deactivate.action(), "deactivate");
        let activate = KeyPatch { is_active: Some(true), ..Default::default() };
        assert_eq!(activate.action(), "activate");
        let mixed = KeyPatch { is_active: Some(true), name: Some("x".into()), ..Default::default() };
        assert_eq!(mixed.action(), "update");
        assert_eq!(KeyPatch::default().action(), "update");
    }

    #[test]
    fn org_patch_action_names_activation_alone() {
        let only = |is_active| OrganizationPatch { is_active: Some(is_active), ..Default::default() };
        assert_eq!(only(false).action(), "deactivate");
        assert_eq!(only(true).action(), "activate");
        let mixed = OrganizationPatch { name: Some("x".into()), ..only(true) };
        assert_eq!(mixed.action(), "update");
        assert_eq!(OrganizationPatch::default().action(), "update");
    }

    #[test]
    fn patches_set_only_what_they_name_and_cut_times_to_microseconds() {
        let at = DateTime::from_timestamp(1_800_000_000, 123_456_789).unwrap_or_default();
        let org = fixtures::org(at);
        let patch = OrganizationPatch { email: Some(None), max_api_keys: Some(None), ..Default::default() };
        let after = patch.apply_to(&org);
        assert_eq!(after, Organization { email: None, max_api_keys: None, ..org.clone() });
        assert_eq!(OrganizationPatch::default().apply_to(&org), org);

        let key = ApiKey { description: Some("d".into()), ..fixtures::key(org.id, at) };
        let patch = KeyPatch {
            description: Some(None),
            expires_at: Some(Some(at)),
            limits: LimitPatch { rate_limit_per_day: Some(Some(9)), ..Default::default() },
            ..Default::default()
        };
        let after = patch.apply_to(&key);
        assert_eq!(after.description, None);
        assert_eq!(after.expires_at, Some(DateTime::from_timestamp(1_800_000_000, 123_456_000).unwrap_or_default()));
        assert_eq!(after.limits.rate_limit_per_day, Some(9));
        assert_eq!(after.name, "k");
        assert_eq!(KeyPatch::default().apply_to(&key), key);
    }
}
