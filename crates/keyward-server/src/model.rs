//! Wire JSON: what the API answers. Records become responses here and nowhere else, so the hash can
//! never slip into a body.

use chrono::{DateTime, Utc};
use keyward_core::{Environment, KeyId, KeyStatus, OrgId};
use keyward_store::{ApiKey, AuditEntry, Organization, Page};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};

/// `live` or `test`: how the API spells [`Environment`].
#[derive(ToSchema)]
#[schema(as = Environment, rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the values are `keyward_core::Environment`
pub enum EnvironmentName {
    Live,
    Test,
}

/// A key's derived status: how the API spells [`KeyStatus`].
#[derive(ToSchema)]
#[schema(as = KeyStatus, rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the values are `keyward_core::KeyStatus`
pub enum KeyStatusName {
    Active,
    Disabled,
    Expired,
    Revoked,
}

/// A string schema for the documentation-only types below.
pub(crate) fn text_schema(
    min_length: usize,
    max_length: usize,
    pattern: &str,
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .min_length(Some(min_length))
        .max_length(Some(max_length))
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

/// A scope as `keyward_core::Scope::parse` takes it.
pub struct ScopeName;

impl utoipa::PartialSchema for ScopeName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        text_schema(
            1,
            128,
            r"^(\*|keyward:(keys:read|keys:write|verify|audit:read|self|admin)|(?!keyward:)[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)*:([A-Za-z0-9_.\-]+|\*))$",
            "`action:resource` (`:`-separated segments of letters, digits, `_`, `-` and `.`; the last one \
             may be `*`), `*`, or one of Keyward's own `keyward:` scopes; at most 128 characters.",
        )
    }
}

impl ToSchema for ScopeName {
    fn name() -> std::borrow::Cow<'static, str> {
        "Scope".into()
    }
}

/// An IPv4 or IPv6 address (no block).
pub struct IpAddress;

impl utoipa::PartialSchema for IpAddress {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        ip_schema(&[], "An IPv4 or IPv6 address.")
    }
}

impl ToSchema for IpAddress {}

/// `anyOf` an IPv4 address, an IPv6 address and a string matching each of `patterns`: what
/// [`IpAddress`] and [`IpEntry`] share.
fn ip_schema(patterns: &[&str], description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, SchemaFormat, Type};
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let any = AnyOfBuilder::new()
        .item(string().format(Some(SchemaFormat::Custom("ipv4".to_owned()))))
        .item(string().format(Some(SchemaFormat::Custom("ipv6".to_owned()))));
    patterns.iter().fold(any, |any, p| any.item(string().pattern(Some(*p)))).description(Some(description)).into()
}

/// A name as `service::Validator::name` takes it.
pub struct Name;

impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        // Not only whitespace, as Rust's `str::trim` sees it (Unicode White_Space), character by character.
        text_schema(
            1,
            200,
            r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]",
            "1-200 characters, not only whitespace; surrounding whitespace is trimmed.",
        )
    }
}

impl ToSchema for Name {}

/// An entry of an IP allow-list: an IPv4 or IPv6 address, or a CIDR block of either.
pub struct IpEntry;

/// `a.b.c.d/n`, without leading zeros.
const IPV4_CIDR: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])$";
/// An IPv6 address in any of its compressed forms, `/n`.
const IPV6_CIDR: &str = concat!(
    r"^(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}:){1,7}:|([0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}",
    r"|([0-9A-Fa-f]{1,4}:){1,5}(:[0-9A-Fa-f]{1,4}){1,2}|([0-9A-Fa-f]{1,4}:){1,4}(:[0-9A-Fa-f]{1,4}){1,3}",
    r"|([0-9A-Fa-f]{1,4}:){1,3}(:[0-9A-Fa-f]{1,4}){1,4}|([0-9A-Fa-f]{1,4}:){1,2}(:[0-9A-Fa-f]{1,4}){1,5}",
    r"|[0-9A-Fa-f]{1,4}:(:[0-9A-Fa-f]{1,4}){1,6}|:((:[0-9A-Fa-f]{1,4}){1,7}|:))",
    r"/(12[0-8]|1[01][0-9]|[1-9]?[0-9])$"
);

impl utoipa::PartialSchema for IpEntry {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        ip_schema(&[IPV4_CIDR, IPV6_CIDR], "An IPv4 or IPv6 address, or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`).")
    }
}

impl ToSchema for IpEntry {}

/// An API key as the API shows it: never the key, never its hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyResponse {
    #[schema(value_type = String, format = Uuid)]
    pub id: KeyId,
    #[schema(value_type = String, format = Uuid)]
    pub organization_id: OrgId,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: Option<String>,
    #[schema(value_type = EnvironmentName)]
    pub environment: Environment,
    /// The visible start of the key.
    #[schema(example = "sk_live_")]
    pub prefix: String,
    /// The last four characters of the key.
    pub hint: String,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = KeyStatusName)]
    pub status: KeyStatus,
    pub is_active: bool,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_reason: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub plan: Option<String>,
    pub rate_limit_per_minute: Option<i64>,
    pub rate_limit_per_hour: Option<i64>,
    pub rate_limit_per_day: Option<i64>,
    pub monthly_request_limit: Option<i64>,
    pub total_requests: i64,
    pub last_used_at: Option<DateTime<Utc>>,
    pub last_used_ip: Option<String>,
    #[schema(value_type = Option<String>)]
    pub rotated_from: Option<KeyId>,
    #[schema(value_type = Option<String>)]
    pub replaced_by: Option<KeyId>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The limits in force (key override, else organization override, else plan; `null`: none), on
    /// `GET /v1/keys/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub effective_limits: Option<keyward_core::Limits>,
}

impl KeyResponse {
    pub fn new(k: ApiKey, now: DateTime<Utc>) -> Self {
        Self {
            status: k.status(now),
            id: k.id,
            organization_id: k.organization_id,
            owner_id: k.owner_id,
            name: k.name,
            description: k.description,
            environment: k.environment,
            prefix: k.prefix,
            hint: k.hint,
            scopes: k.scopes.to_strings(),
            allowed_ips: k.allowed_ips.to_strings(),
            expires_at: k.expires_at,
            is_active: k.is_active,
            revoked_at: k.revoked_at,
            revoke_reason: k.revoke_reason,
            metadata: k.metadata,
            plan: k.plan,
            rate_limit_per_minute: k.limits.rate_limit_per_minute,
            rate_limit_per_hour: k.limits.rate_limit_per_hour,
            rate_limit_per_day: k.limits.rate_limit_per_day,
            monthly_request_limit: k.limits.monthly_request_limit,
            total_requests: k.total_requests,
            last_used_at: k.last_used_at,
            last_used_ip: k.last_used_ip,
            rotated_from: k.rotated_from,
            replaced_by: k.replaced_by,
            created_by: k.created_by,
            created_at: k.created_at,
            updated_at: k.updated_at,
            effective_limits: None,
        }
    }
}

/// `201` of `POST /v1/keys`: the only time the full key is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKeyResponse {
    /// The full key. Shown once; store it now.
    pub key: String,
    pub api_key: KeyResponse,
}

/// `201` of `POST /v1/keys/{id}/rotate`: the new key, shown once, and both records.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedKeyResponse {
    /// The new full key. Shown once; store it now.
    pub key: String,
    /// The new key's record (`rotated_from` the old one).
    pub api_key: KeyResponse,
    /// The old key's record: `replaced_by` the new one, `revoked_at` the end of the grace period.
    pub old_api_key: KeyResponse,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationResponse {
    #[schema(value_type = String, format = Uuid)]
    pub id: OrgId,
    pub name: String,
    pub slug: String,
    pub email: Option<String>,
    pub plan: String,
    pub is_active: bool,
    pub monthly_request_limit: Option<i64>,
    pub rate_limit_per_minute: Option<i64>,
    pub rate_limit_per_hour: Option<i64>,
    pub rate_limit_per_day: Option<i64>,
    pub max_api_keys: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Organization> for OrganizationResponse {
    fn from(o: Organization) -> Self {
        Self {
            id: o.id,
            name: o.name,
            slug: o.slug,
            email: o.email,
            plan: o.plan,
            is_active: o.is_active,
            monthly_request_limit: o.limits.monthly_request_limit,
            rate_limit_per_minute: o.limits.rate_limit_per_minute,
            rate_limit_per_hour: o.limits.rate_limit_per_hour,
            rate_limit_per_day: o.limits.rate_limit_per_day,
            max_api_keys: o.max_api_keys,
            created_at: o.created_at,
            updated_at: o.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryResponse {
    pub id: i64,
    pub action: String,
    #[schema(value_type = Option<String>)]
    pub key_id: Option<KeyId>,
    #[schema(value_type = Option<String>)]
    pub organization_id: Option<OrgId>,
    /// A key id, `cli` or `system`.
    pub actor: String,
    pub actor_ip: Option<String>,
    /// `{"before": {...}, "after": {...}}` of the changed fields.
    #[schema(value_type = Object)]
    pub details: Value,
    pub created_at: DateTime<Utc>,
}

impl From<AuditEntry> for AuditEntryResponse {
    fn from(e: AuditEntry) -> Self {
        Self {
            id: e.id,
            action: e.action,
            key_id: e.key_id,
            organization_id: e.organization_id,
            actor: e.actor,
            actor_ip: e.actor_ip,
            details: e.details,
            created_at: e.created_at,
        }
    }
}

/// One page of a list; pass `next_cursor` as `cursor` for the next one.
#[derive(Debug, Serialize, ToSchema)]
pub struct PageResponse<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> PageResponse<T> {
    pub fn from_page<R, C: ToString>(page: Page<R, C>, f: impl FnMut(R) -> T) -> Self {
        Self { items: page.items.into_iter().map(f).collect(), next_cursor: page.next_cursor.map(|c| c.to_string()) }
    }
}

/// `?cursor=&limit=` on every list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    pub cursor: Option<String>,
    /// 1-100, default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 100;

impl PageQuery {
    pub fn request<C: std::str::FromStr>(&self) -> Result<keyward_store::PageRequest<C>, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::new(ErrorCode::InvalidQuery, format!("`limit` must be 1-{MAX_PAGE}")));
        }
        let after = self
            .cursor
            .as_deref()
            .map(|c| c.parse::<C>().map_err(|_| ApiError::new(ErrorCode::InvalidQuery, "`cursor` is not valid")))
            .transpose()?;
        Ok(keyward_store::PageRequest { after, limit })
    }
}
