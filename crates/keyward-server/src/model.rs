//! Wire JSON: what the API answers. A record whose serde form is what the API shows is served as it is
//! (`keyward_store` derives its schema with the `utoipa` feature); here are the answers that add to a
//! record, or that no record holds. The hash cannot slip into a body: `ApiKey` skips it, and
//! `KeyHash` has no `Serialize`.

use chrono::{DateTime, Utc};
use keyward_core::KeyStatus;
use keyward_store::{ApiKey, Page};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};

pub use keyward_store::openapi::EnvironmentName;

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

/// An API key as the API shows it: the stored record and its status at the time of the answer.
// SECURITY: the record is served as it is, and `ApiKey` serializes neither its hash nor how it was made
// (`KeyHash` has no `Serialize`, so a field that would show it does not compile; the tests below hold
// the body to that).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyResponse {
    #[serde(flatten)]
    pub key: ApiKey,
    #[schema(value_type = KeyStatusName)]
    pub status: KeyStatus,
    /// The limits in force (key override, else organization override, else plan; `null`: none), on
    /// `GET /v1/keys/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub effective_limits: Option<keyward_core::Limits>,
}

impl KeyResponse {
    pub fn new(key: ApiKey, now: DateTime<Utc>) -> Self {
        Self { status: key.status(now), key, effective_limits: None }
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

#[cfg(test)]
mod tests {
    use keyward_core::{Environment, IpAllowList, KeyHash, KeyId, OrgId, ScopeSet};
    use keyward_store::LimitOverrides;
    use serde_json::json;

    use super::*;

    /// The fields of a key's body, as clients have always read them: serving the record keeps them.
    const KEY_FIELDS: &[&str] = &[
        "id",
        "organization_id",
        "owner_id",
        "name",
        "description",
        "environment",
        "prefix",
        "hint",
        "scopes",
        "allowed_ips",
        "expires_at",
        "status",
        "is_active",
        "revoked_at",
        "revoke_reason",
        "metadata",
        "plan",
        "rate_limit_per_minute",
        "rate_limit_per_hour",
        "rate_limit_per_day",
        "monthly_request_limit",
        "total_requests",
        "last_used_at",
        "last_used_ip",
        "rotated_from",
        "replaced_by",
        "created_by",
        "created_at",
        "updated_at",
    ];

    fn key() -> ApiKey {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        ApiKey {
            environment: Environment::Test,
            key_hash: KeyHash([0xab; 32]),
            scopes: ScopeSet::parse(&["read:x", "keyward:self"]).unwrap_or_default(),
            allowed_ips: IpAllowList::parse(&["10.0.0.0/8"]).unwrap_or_default(),
            limits: LimitOverrides { rate_limit_per_day: Some(9), ..Default::default() },
            lineage_id: Some(KeyId::new()),
            ..keyward_store::testing::key(OrgId::new(), at)
        }
    }

    #[test]
    fn a_key_body_has_its_fields_and_never_its_hash() {
        let key = key();
        let hash_hex = key.key_hash.to_hex();
        let body = serde_json::to_value(KeyResponse::new(key.clone(), key.created_at)).unwrap_or_default();
        let mut fields: Vec<&str> =
            body.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        fields.sort_unstable();
        let mut expected = KEY_FIELDS.to_vec();
        expected.sort_unstable();
        assert_eq!(fields, expected);
        let text = body.to_string();
        assert!(!text.contains("hash") && !text.contains(&hash_hex) && !text.contains("lineage"), "{text}");
        assert_eq!(body["scopes"], json!(key.scopes.to_strings()));
        assert_eq!(body["allowed_ips"], json!(["10.0.0.0/8"]));
        assert_eq!((body["environment"].clone(), body["status"].clone()), (json!("test"), json!("active")));
        assert_eq!((body["rate_limit_per_day"].clone(), body["rate_limit_per_hour"].clone()), (json!(9), json!(null)));
    }
}
