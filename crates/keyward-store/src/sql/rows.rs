//! The rows both backends read, with the columns whose SQL types differ left to the backend
//! ([`Dialect`]'s `Id`, `Time`, `Json` and `List`), and the one conversion of each into its record. A
//! stored value that does not parse (the database was edited by hand, or by a newer version) is an
//! `Internal` error naming its column.

use chrono::{DateTime, Utc};
use keyward_core::audit_chain::{AuditContent, ChainBreak, ChainWalker};
use keyward_core::{Environment, HashAlgorithm, IpAllowList, KeyHash, KeyId, OrgId, ScopeSet};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Dialect, Reads};
use crate::{
    ApiKey, Attempt, AuditEntry, Delivery, Event, EventKind, KeyWithOrg, LimitOverrides, Organization, StoreResult,
    Webhook, WebhookSecret, corrupt,
};

fn id<D: Dialect>(v: D::Id, column: &str) -> StoreResult<Uuid> {
    D::read_id(v, column)
}

fn opt_id<D: Dialect>(v: Option<D::Id>, column: &str) -> StoreResult<Option<Uuid>> {
    v.map(|v| D::read_id(v, column)).transpose()
}

fn time<D: Dialect>(v: D::Time, column: &str) -> StoreResult<DateTime<Utc>> {
    D::read_time(v, column)
}

fn opt_time<D: Dialect>(v: Option<D::Time>, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
    v.map(|v| D::read_time(v, column)).transpose()
}

/// The limit override columns of a key's or an organization's row (`limit_columns!()`).
#[derive(FromRow)]
struct LimitColumns {
    rate_limit_per_minute: Option<i64>,
    rate_limit_per_hour: Option<i64>,
    rate_limit_per_day: Option<i64>,
    monthly_request_limit: Option<i64>,
}

impl From<LimitColumns> for LimitOverrides {
    fn from(row: LimitColumns) -> Self {
        let LimitColumns { rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, monthly_request_limit } =
            row;
        Self { rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, monthly_request_limit }
    }
}

#[derive(FromRow)]
pub(crate) struct OrgRow<D: Dialect> {
    id: D::Id,
    name: String,
    slug: String,
    email: Option<String>,
    plan: String,
    is_active: bool,
    #[sqlx(flatten)]
    limits: LimitColumns,
    max_api_keys: Option<i64>,
    created_at: D::Time,
    updated_at: D::Time,
}

impl<D: Dialect> OrgRow<D> {
    pub(crate) fn into_org(self) -> StoreResult<Organization> {
        Ok(Organization {
            id: OrgId(id::<D>(self.id, "organizations.id")?),
            name: self.name,
            slug: self.slug,
            email: self.email,
            plan: self.plan,
            is_active: self.is_active,
            limits: self.limits.into(),
            max_api_keys: self.max_api_keys,
            created_at: time::<D>(self.created_at, "organizations.created_at")?,
            updated_at: time::<D>(self.updated_at, "organizations.updated_at")?,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct KeyRow<D: Dialect> {
    id: D::Id,
    organization_id: D::Id,
    owner_id: Option<String>,
    name: String,
    description: Option<String>,
    environment: String,
    prefix: String,
    key_hint: String,
    key_hash: Vec<u8>,
    hash_algorithm: String,
    scopes: D::List,
    allowed_ips: D::List,
    expires_at: Option<D::Time>,
    is_active: bool,
    revoked_at: Option<D::Time>,
    revoke_reason: Option<String>,
    plan: Option<String>,
    #[sqlx(flatten)]
    limits: LimitColumns,
    metadata: D::Json,
    total_requests: i64,
    last_used_at: Option<D::Time>,
    last_used_ip: Option<String>,
    rotated_from: Option<D::Id>,
    replaced_by: Option<D::Id>,
    created_by: Option<String>,
    created_at: D::Time,
    updated_at: D::Time,
    lineage_id: Option<D::Id>,
}

impl<D: Dialect> KeyRow<D> {
    pub(crate) fn into_key(self) -> StoreResult<ApiKey> {
        let scopes = D::read_list(self.scopes, "api_keys.scopes")?;
        let allowed_ips = D::read_list(self.allowed_ips, "api_keys.allowed_ips")?;
        Ok(ApiKey {
            id: KeyId(id::<D>(self.id, "api_keys.id")?),
            organization_id: OrgId(id::<D>(self.organization_id, "api_keys.organization_id")?),
            owner_id: self.owner_id,
            name: self.name,
            description: self.description,
            environment: Environment::parse(&self.environment).map_err(|e| corrupt("api_keys.environment", e))?,
            prefix: self.prefix,
            hint: self.key_hint,
            hash_algorithm: HashAlgorithm::parse(&self.hash_algorithm)
                .ok_or_else(|| corrupt("api_keys.hash_algorithm", &self.hash_algorithm))?,
            // SECURITY: the error names the length only, never the bytes.
            key_hash: KeyHash::from_slice(&self.key_hash)
                .ok_or_else(|| corrupt("api_keys.key_hash", format!("{} bytes", self.key_hash.len())))?,
            scopes: ScopeSet::parse(&scopes).map_err(|e| corrupt("api_keys.scopes", e))?,
            allowed_ips: IpAllowList::parse(&allowed_ips).map_err(|e| corrupt("api_keys.allowed_ips", e))?,
            expires_at: opt_time::<D>(self.expires_at, "api_keys.expires_at")?,
            is_active: self.is_active,
            revoked_at: opt_time::<D>(self.revoked_at, "api_keys.revoked_at")?,
            revoke_reason: self.revoke_reason,
            plan: self.plan,
            limits: self.limits.into(),
            metadata: D::read_json(self.metadata, "api_keys.metadata")?,
            total_requests: self.total_requests,
            last_used_at: opt_time::<D>(self.last_used_at, "api_keys.last_used_at")?,
            last_used_ip: self.last_used_ip,
            rotated_from: opt_id::<D>(self.rotated_from, "api_keys.rotated_from")?.map(KeyId),
            replaced_by: opt_id::<D>(self.replaced_by, "api_keys.replaced_by")?.map(KeyId),
            created_by: self.created_by,
            created_at: time::<D>(self.created_at, "api_keys.created_at")?,
            updated_at: time::<D>(self.updated_at, "api_keys.updated_at")?,
            lineage_id: opt_id::<D>(self.lineage_id, "api_keys.lineage_id")?.map(KeyId),
        })
    }
}

/// A key with what verification needs of its organization (`o.org_*`).
#[derive(FromRow)]
pub(crate) struct KeyWithOrgRow<D: Dialect> {
    #[sqlx(flatten)]
    key: KeyRow<D>,
    org_is_active: bool,
    org_plan: String,
    org_rate_limit_per_minute: Option<i64>,
    org_rate_limit_per_hour: Option<i64>,
    org_rate_limit_per_day: Option<i64>,
    org_monthly_request_limit: Option<i64>,
}

impl<D: Dialect> KeyWithOrgRow<D> {
    pub(crate) fn into_found(self) -> StoreResult<KeyWithOrg> {
        Ok(KeyWithOrg {
            key: self.key.into_key()?,
            org_is_active: self.org_is_active,
            org_plan: self.org_plan,
            org_limits: LimitOverrides {
                rate_limit_per_minute: self.org_rate_limit_per_minute,
                rate_limit_per_hour: self.org_rate_limit_per_hour,
                rate_limit_per_day: self.org_rate_limit_per_day,
                monthly_request_limit: self.org_monthly_request_limit,
            },
        })
    }
}

#[derive(FromRow)]
pub(crate) struct AuditRow<D: Dialect> {
    id: i64,
    action: String,
    key_id: Option<D::Id>,
    organization_id: Option<D::Id>,
    actor: String,
    actor_ip: Option<String>,
    details: D::Json,
    created_at: D::Time,
}

impl<D: Dialect> AuditRow<D> {
    pub(crate) fn into_entry(self) -> StoreResult<AuditEntry> {
        Ok(AuditEntry {
            id: self.id,
            action: self.action,
            key_id: opt_id::<D>(self.key_id, "audit_log.key_id")?.map(KeyId),
            organization_id: opt_id::<D>(self.organization_id, "audit_log.organization_id")?.map(OrgId),
            actor: self.actor,
            actor_ip: self.actor_ip,
            details: D::read_json(self.details, "audit_log.details")?,
            created_at: time::<D>(self.created_at, "audit_log.created_at")?,
        })
    }
}

/// An audit row as the chain hashes it (see `keyward_core::audit_chain`), with the hashes it was
/// written with.
#[derive(FromRow)]
pub(crate) struct ChainRow<D: Dialect> {
    #[sqlx(flatten)]
    row: AuditRow<D>,
    prev_hash: Option<String>,
    row_hash: Option<String>,
}

impl<D: Dialect> ChainRow<D> {
    pub(crate) fn id(&self) -> i64 {
        self.row.id
    }

    /// Feeds the row to `walker` with its content as it was hashed: the ids as the stored text, not
    /// parsed, so that an edited id reads as a changed row. The inner `Err` says why the chain breaks.
    pub(crate) fn check(self, walker: &mut ChainWalker) -> StoreResult<Result<(), ChainBreak>> {
        let row = self.row;
        let key_id = row.key_id.as_ref().map(D::id_text);
        let organization_id = row.organization_id.as_ref().map(D::id_text);
        let details = D::read_json(row.details, "audit_log.details")?;
        let content = AuditContent {
            action: &row.action,
            key_id: key_id.as_deref(),
            organization_id: organization_id.as_deref(),
            actor: &row.actor,
            actor_ip: row.actor_ip.as_deref(),
            details: &details,
            created_at: time::<D>(row.created_at, "audit_log.created_at")?,
        };
        Ok(walker.check(row.id, &content, self.prev_hash.as_deref(), self.row_hash.as_deref()))
    }
}

#[derive(FromRow)]
pub(crate) struct EventRow<D: Dialect> {
    id: D::Id,
    event: String,
    organization_id: Option<D::Id>,
    key_id: Option<D::Id>,
    payload: D::Json,
    created_at: D::Time,
}

impl<D: Dialect> EventRow<D> {
    pub(crate) fn into_event(self) -> StoreResult<Event> {
        Ok(Event {
            id: id::<D>(self.id, "events.id")?,
            event: EventKind::stored(&self.event, "events.event")?,
            organization_id: opt_id::<D>(self.organization_id, "events.organization_id")?.map(OrgId),
            key_id: opt_id::<D>(self.key_id, "events.key_id")?.map(KeyId),
            payload: D::read_json(self.payload, "events.payload")?,
            created_at: time::<D>(self.created_at, "events.created_at")?,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct WebhookRow<D: Dialect> {
    id: D::Id,
    organization_id: D::Id,
    url: String,
    events: D::List,
    is_active: bool,
    secret: String,
    description: Option<String>,
    created_at: D::Time,
    updated_at: D::Time,
}

impl<D: Dialect> WebhookRow<D> {
    pub(crate) fn into_webhook(self) -> StoreResult<Webhook> {
        Ok(Webhook {
            id: id::<D>(self.id, "webhook_endpoints.id")?,
            organization_id: OrgId(id::<D>(self.organization_id, "webhook_endpoints.organization_id")?),
            url: self.url,
            events: D::read_list(self.events, "webhook_endpoints.events")?
                .iter()
                .map(|name| EventKind::stored(name, "webhook_endpoints.events"))
                .collect::<StoreResult<_>>()?,
            is_active: self.is_active,
            secret: WebhookSecret(self.secret),
            description: self.description,
            created_at: time::<D>(self.created_at, "webhook_endpoints.created_at")?,
            updated_at: time::<D>(self.updated_at, "webhook_endpoints.updated_at")?,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct DeliveryRow<D: Dialect> {
    id: D::Id,
    endpoint_id: D::Id,
    event_id: D::Id,
    event: String,
    payload: D::Json,
    status: String,
    attempts: i64,
    next_attempt_at: Option<D::Time>,
    give_up_at: D::Time,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    created_at: D::Time,
    updated_at: D::Time,
}

impl<D: Dialect> DeliveryRow<D> {
    pub(crate) fn into_delivery(self) -> StoreResult<Delivery> {
        Ok(Delivery {
            id: id::<D>(self.id, "webhook_deliveries.id")?,
            endpoint_id: id::<D>(self.endpoint_id, "webhook_deliveries.endpoint_id")?,
            event_id: id::<D>(self.event_id, "webhook_deliveries.event_id")?,
            event: EventKind::stored(&self.event, "webhook_deliveries.event")?,
            payload: D::read_json(self.payload, "webhook_deliveries.payload")?,
            status: self.status,
            attempts: self.attempts,
            next_attempt_at: opt_time::<D>(self.next_attempt_at, "webhook_deliveries.next_attempt_at")?,
            give_up_at: time::<D>(self.give_up_at, "webhook_deliveries.give_up_at")?,
            last_status_code: self.last_status_code,
            last_error: self.last_error,
            created_at: time::<D>(self.created_at, "webhook_deliveries.created_at")?,
            updated_at: time::<D>(self.updated_at, "webhook_deliveries.updated_at")?,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct AttemptRow<D: Dialect> {
    attempted_at: D::Time,
    status_code: Option<i64>,
    latency_ms: i64,
    error: Option<String>,
}

impl<D: Dialect> AttemptRow<D> {
    pub(crate) fn into_attempt(self) -> StoreResult<Attempt> {
        Ok(Attempt {
            attempted_at: time::<D>(self.attempted_at, "webhook_attempts.attempted_at")?,
            status_code: self.status_code,
            latency_ms: self.latency_ms,
            error: self.error,
        })
    }
}

/// An attempt and the delivery it was made for: the attempts of a page of deliveries, read at once.
#[derive(FromRow)]
pub(crate) struct DeliveryAttemptRow<D: Dialect> {
    delivery_id: D::Id,
    attempted_at: D::Time,
    status_code: Option<i64>,
    latency_ms: i64,
    error: Option<String>,
}

/// A delivery's id and one of its attempts.
pub(crate) struct DeliveryAttempt(pub Uuid, pub Attempt);

impl<D: Dialect> DeliveryAttemptRow<D> {
    pub(crate) fn into_pair(self) -> StoreResult<DeliveryAttempt> {
        let Self { delivery_id, attempted_at, status_code, latency_ms, error } = self;
        let attempt = AttemptRow::<D> { attempted_at, status_code, latency_ms, error }.into_attempt()?;
        Ok(DeliveryAttempt(id::<D>(delivery_id, "webhook_attempts.delivery_id")?, attempt))
    }
}

/// A stored key hash and the organization holding it.
pub(crate) struct HashOwner(pub KeyHash, pub OrgId);

/// The audit chain's head: the id and hash of the newest chained row.
pub(crate) struct ChainHead(pub Option<i64>, pub String);

/// `Reads<$record> for every D` whose shape `$shape` decodes from its rows, by `$convert`.
macro_rules! reads {
    ($($record:ty: $shape:ty => $convert:expr;)*) => {
        $(impl<D: Dialect> Reads<$record> for D
        where
            $shape: for<'r> FromRow<'r, D::Row> + Send + Unpin,
        {
            type Shape = $shape;

            fn record(row: $shape) -> StoreResult<$record> {
                $convert(row)
            }
        })*
    };
}

reads! {
    Organization: OrgRow<D> => OrgRow::into_org;
    ApiKey: KeyRow<D> => KeyRow::into_key;
    KeyWithOrg: KeyWithOrgRow<D> => KeyWithOrgRow::into_found;
    AuditEntry: AuditRow<D> => AuditRow::into_entry;
    ChainRow<D>: ChainRow<D> => Ok;
    Event: EventRow<D> => EventRow::into_event;
    Webhook: WebhookRow<D> => WebhookRow::into_webhook;
    Delivery: DeliveryRow<D> => DeliveryRow::into_delivery;
    Attempt: AttemptRow<D> => AttemptRow::into_attempt;
    DeliveryAttempt: DeliveryAttemptRow<D> => DeliveryAttemptRow::into_pair;
    i64: (i64,) => |(n,)| Ok(n);
    bool: (bool,) => |(b,)| Ok(b);
    Uuid: (D::Id,) => |(v,)| id::<D>(v, "id");
    ChainHead: (Option<i64>, String) => |(id, hash)| Ok(ChainHead(id, hash));
    HashOwner: (Vec<u8>, D::Id) => |(hash, owner): (Vec<u8>, D::Id)| {
        let hash = KeyHash::from_slice(&hash).ok_or_else(|| corrupt("api_keys.key_hash", "not 32 bytes"))?;
        Ok(HashOwner(hash, OrgId(id::<D>(owner, "api_keys.organization_id")?)))
    };
}
