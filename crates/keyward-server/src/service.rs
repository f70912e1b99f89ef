//! Operations shared by the HTTP handlers and the CLI, so both validate and audit the same way:
//! creating keys and organizations, seeding an empty database, and importing keys ([`import`]).

pub mod import;

use chrono::{DateTime, Datelike, Duration, Utc};
use keyward_core::{Environment, IpAllowList, KeyId, KeyPrefix, OrgId, PlainKey, ScopeSet};
use keyward_store::{
    Actor, ApiKey, LimitOverrides, NewKey, NewOrganization, Organization, OrganizationPatch, Rotation, Store,
    StoreError,
};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::extract::double_option;
use crate::model::{EnvironmentName, IpEntry, Name, ScopeName};
use crate::state::AppState;

const MAX_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 2_000;
const MAX_OWNER_ID: usize = 255;
const MAX_SCOPES: usize = 100;
const MAX_EXPIRES_IN_DAYS: i64 = 3_650;

// The request schemas below state every rule `validate` enforces that JSON Schema can express (the
// numbers are the constants above); what it cannot (a date in the future, `expires_at` and
// `expires_in_days` together) is said in the field's description. `scripts/schemathesis.sh` checks
// the two agree.

/// The body of `POST /v1/keys`, also built by `keyward keys create`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    #[schema(value_type = Name)]
    pub name: String,
    /// At most 2,000 characters; blank: none.
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    /// The customer's user id (free text, at most 255 characters; blank: none).
    #[schema(max_length = 255)]
    pub owner_id: Option<String>,
    /// `live` (default) or `test`.
    #[schema(value_type = Option<EnvironmentName>)]
    pub environment: Option<String>,
    /// 1-16 lowercase letters or digits; `sk` by default.
    #[schema(min_length = 1, max_length = 16, pattern = "^[a-z0-9]+$")]
    pub prefix: Option<String>,
    /// At most 100.
    #[serde(default)]
    #[schema(value_type = Vec<ScopeName>, max_items = 100)]
    pub scopes: Vec<String>,
    /// IP addresses and CIDR blocks, v4 and v6; at most 256. Empty: any address.
    #[serde(default)]
    #[schema(value_type = Vec<IpEntry>, max_items = 256)]
    pub allowed_ips: Vec<String>,
    /// RFC 3339, in the future, before the year 10000 (UTC). Not together with `expires_in_days`.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<String>,
    /// 1-3650. Not together with `expires_at`.
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<i64>,
    /// A JSON object (email, company, ...).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Per-key tier override.
    pub plan: Option<String>,
    /// Only with `keyward:admin`; default: the caller's organization.
    #[schema(format = Uuid)]
    pub organization_id: Option<String>,
}

/// The body of `PATCH /v1/keys/{id}`: absent fields stay, `null` clears.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyRequest {
    #[schema(value_type = Option<Name>)]
    pub name: Option<String>,
    /// At most 2,000 characters; blank or `null`: none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub description: Option<Option<String>>,
    /// At most 100.
    #[schema(value_type = Option<Vec<ScopeName>>, max_items = 100)]
    pub scopes: Option<Vec<String>>,
    /// IP addresses and CIDR blocks, v4 and v6; at most 256. Empty: any address.
    #[schema(value_type = Option<Vec<IpEntry>>, max_items = 256)]
    pub allowed_ips: Option<Vec<String>>,
    /// RFC 3339, in the future, before the year 10000 (UTC); `null`: never.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Option<String>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub plan: Option<Option<String>>,
    pub is_active: Option<bool>,
}

/// Everything a validation needs to know beyond the request.
pub struct Validator<'a> {
    pub plans: &'a keyward_core::Plans,
    pub now: DateTime<Utc>,
}

impl Validator<'_> {
    /// The length counts the whitespace around the name too, as the schema's `maxLength` does.
    pub fn name(&self, field: &str, name: &str) -> ApiResult<String> {
        let too_long = name.chars().count() > MAX_NAME;
        let name = name.trim();
        if name.is_empty() || too_long {
            return Err(ApiError::validation(field, format!("`{field}` must be 1-{MAX_NAME} characters")));
        }
        Ok(name.to_owned())
    }

    pub fn optional_text(&self, field: &str, value: Option<String>, max: usize) -> ApiResult<Option<String>> {
        match value {
            Some(v) if v.chars().count() > max => {
                Err(ApiError::validation(field, format!("`{field}` must be at most {max} characters")))
            }
            Some(v) if v.trim().is_empty() => Ok(None),
            v => Ok(v),
        }
    }

    pub fn scopes(&self, field: &str, scopes: &[String]) -> ApiResult<ScopeSet> {
        if scopes.len() > MAX_SCOPES {
            return Err(ApiError::validation(field, format!("at most {MAX_SCOPES} scopes")));
        }
        for (i, s) in scopes.iter().enumerate() {
            keyward_core::Scope::parse(s).map_err(|e| ApiError::validation(format!("{field}[{i}]"), e.to_string()))?;
        }
        ScopeSet::parse(scopes).map_err(|e| ApiError::validation(field, e.to_string()))
    }

    pub fn allowed_ips(&self, field: &str, ips: &[String]) -> ApiResult<IpAllowList> {
        IpAllowList::parse(ips).map_err(|e| ApiError::validation(field, e.to_string()))
    }

    pub fn plan(&self, field: &str, plan: &str) -> ApiResult<String> {
        if self.plans.get(plan).is_some() {
            Ok(plan.to_owned())
        } else {
            let known: Vec<&str> = self.plans.names().collect();
            // SECURITY: the name is client input, and could be a key pasted in the wrong place.
            let plan = keyward_core::key::quote_if_not_key(plan);
            Err(ApiError::validation(field, format!("unknown plan {plan}; known plans: {}", known.join(", "))))
        }
    }

    pub fn expires_at(&self, field: &str, value: &str) -> ApiResult<DateTime<Utc>> {
        let at = DateTime::parse_from_rfc3339(value)
            .map_err(|_| ApiError::validation(field, format!("`{field}` must be an RFC 3339 date-time")))?
            .with_timezone(&Utc);
        if at <= self.now {
            return Err(ApiError::validation(field, format!("`{field}` must be in the future")));
        }
        // What both stores keep (a four-digit year): `9999-12-31T23:59:59-14:00` is in year 10000 in UTC.
        if at.year() > 9999 {
            return Err(ApiError::validation(field, format!("`{field}` must be before the year 10000 (UTC)")));
        }
        Ok(at)
    }

    pub fn metadata(&self, field: &str, value: Option<Value>) -> ApiResult<Value> {
        match value {
            None | Some(Value::Null) => Ok(Value::Object(Default::default())),
            Some(v @ Value::Object(_)) => Ok(v),
            Some(_) => Err(ApiError::validation(field, format!("`{field}` must be a JSON object"))),
        }
    }
}

/// A validated key creation, ready for the store.
pub struct KeyDraft {
    pub organization_id: OrgId,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub environment: Environment,
    pub prefix: KeyPrefix,
    pub scopes: ScopeSet,
    pub allowed_ips: IpAllowList,
    pub expires_at: Option<DateTime<Utc>>,
    pub metadata: Value,
    pub plan: Option<String>,
}

impl CreateKeyRequest {
    /// Validates every field, naming the first bad one. The organization is decided by the caller.
    pub fn validate(self, v: &Validator<'_>, organization_id: OrgId) -> ApiResult<KeyDraft> {
        let environment = match self.environment.as_deref() {
            None => Environment::Live,
            Some(e) => {
                Environment::parse(e).map_err(|_| ApiError::validation("environment", "must be `live` or `test`"))?
            }
        };
        let prefix = match self.prefix.as_deref() {
            None => KeyPrefix::default(),
            Some(p) => KeyPrefix::parse(p)
                .map_err(|_| ApiError::validation("prefix", "must be 1-16 lowercase letters or digits"))?,
        };
        let expires_at = match (self.expires_at, self.expires_in_days) {
            (Some(_), Some(_)) => {
                return Err(ApiError::validation(
                    "expires_in_days",
                    "give `expires_at` or `expires_in_days`, not both",
                ));
            }
            (Some(at), None) => Some(v.expires_at("expires_at", &at)?),
            (None, Some(days)) if (1..=MAX_EXPIRES_IN_DAYS).contains(&days) => Some(v.now + Duration::days(days)),
            (None, Some(_)) => {
                return Err(ApiError::validation("expires_in_days", format!("must be 1-{MAX_EXPIRES_IN_DAYS}")));
            }
            (None, None) => None,
        };
        Ok(KeyDraft {
            organization_id,
            owner_id: v.optional_text("owner_id", self.owner_id, MAX_OWNER_ID)?,
            name: v.name("name", &self.name)?,
            description: v.optional_text("description", self.description, MAX_DESCRIPTION)?,
            environment,
            prefix,
            scopes: v.scopes("scopes", &self.scopes)?,
            allowed_ips: v.allowed_ips("allowed_ips", &self.allowed_ips)?,
            expires_at,
            metadata: v.metadata("metadata", self.metadata)?,
            plan: self.plan.as_deref().map(|p| v.plan("plan", p)).transpose()?,
        })
    }
}

impl UpdateKeyRequest {
    pub fn validate(self, v: &Validator<'_>) -> ApiResult<keyward_store::KeyPatch> {
        Ok(keyward_store::KeyPatch {
            name: self.name.as_deref().map(|n| v.name("name", n)).transpose()?,
            description: self.description.map(|d| v.optional_text("description", d, MAX_DESCRIPTION)).transpose()?,
            scopes: self.scopes.as_deref().map(|s| v.scopes("scopes", s)).transpose()?,
            allowed_ips: self.allowed_ips.as_deref().map(|s| v.allowed_ips("allowed_ips", s)).transpose()?,
            expires_at: self
                .expires_at
                .map(|e| e.as_deref().map(|e| v.expires_at("expires_at", e)).transpose())
                .transpose()?,
            metadata: match self.metadata {
                None => None,
                Some(Value::Null) => Some(Value::Object(Default::default())),
                some => Some(v.metadata("metadata", some)?),
            },
            plan: self.plan.map(|p| p.as_deref().map(|p| v.plan("plan", p)).transpose()).transpose()?,
            is_active: self.is_active,
            ..Default::default()
        })
    }
}

/// Generates the key, stores its hash and the audit row; the plaintext is returned to be shown once.
pub async fn create_key(state: &AppState, draft: KeyDraft, actor: &Actor) -> ApiResult<(PlainKey, ApiKey)> {
    let plain = PlainKey::generate(&draft.prefix, draft.environment)
        .map_err(|e| ApiError::internal(format!("the OS random generator failed: {e}")))?;
    let (hash_algorithm, key_hash) = state.hasher.hash(&plain);
    let new = NewKey {
        id: KeyId::new(),
        organization_id: draft.organization_id,
        owner_id: draft.owner_id,
        name: draft.name,
        description: draft.description,
        environment: draft.environment,
        prefix: plain.prefix().to_owned(),
        hint: plain.hint().to_owned(),
        hash_algorithm,
        key_hash,
        scopes: draft.scopes,
        allowed_ips: draft.allowed_ips,
        expires_at: draft.expires_at,
        is_active: true,
        plan: draft.plan,
        limits: LimitOverrides::default(),
        metadata: draft.metadata,
        rotated_from: None,
    };
    let record = state.store.insert_key(new, actor).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::validation("organization_id", "no such organization"),
        e => e.into(),
    })?;
    Ok((plain, record.apply(&state.keys)))
}

/// The longest grace period a rotation may give the old key: 7 days.
pub const MAX_GRACE_PERIOD_SECONDS: i64 = 604_800;

/// The body of `POST /v1/keys/{id}/rotate`, also built by `keyward keys rotate`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyRequest {
    /// How long the old key keeps working, 0-604800 seconds (7 days); default 0: it stops at once.
    #[schema(minimum = 0, maximum = 604800)]
    pub grace_period_seconds: Option<i64>,
    /// The new key's name; default: the old key's.
    #[schema(value_type = Option<Name>)]
    pub name: Option<String>,
}

/// A validated rotation.
pub struct RotationDraft {
    pub grace: Duration,
    pub name: Option<String>,
}

impl RotateKeyRequest {
    pub fn validate(self, v: &Validator<'_>) -> ApiResult<RotationDraft> {
        let seconds = self.grace_period_seconds.unwrap_or(0);
        if !(0..=MAX_GRACE_PERIOD_SECONDS).contains(&seconds) {
            return Err(ApiError::validation(
                "grace_period_seconds",
                format!("must be 0-{MAX_GRACE_PERIOD_SECONDS} seconds (7 days)"),
            ));
        }
        Ok(RotationDraft {
            grace: Duration::seconds(seconds),
            name: self.name.as_deref().map(|n| v.name("name", n)).transpose()?,
        })
    }
}

/// Rotates `old`: a new key with the same settings (scopes, IP list, owner, plan and limits,
/// metadata, environment and prefix, and the same lifetime when the old one expires), and the old key
/// revoked (reason `rotated`) when the grace period ends. The plaintext is returned to be shown once.
///
/// "The same expiry policy": a key that expires gets the same lifetime it was given (`expires_at -
/// created_at`), counted from the rotation, so rotating never shortens or extends a key's policy.
pub async fn rotate_key(
    state: &AppState,
    old: &ApiKey,
    draft: RotationDraft,
    actor: &Actor,
) -> ApiResult<(PlainKey, Rotation)> {
    // A legacy key's prefix is not Keyward's: its successor gets the default.
    let prefix = old.prefix.split('_').next().and_then(|p| KeyPrefix::parse(p).ok()).unwrap_or_default();
    let plain = PlainKey::generate(&prefix, old.environment)
        .map_err(|e| ApiError::internal(format!("the OS random generator failed: {e}")))?;
    let (hash_algorithm, key_hash) = state.hasher.hash(&plain);
    let expires_at = old.expires_at.map(|at| actor.at + (at - old.created_at).max(Duration::seconds(1)));
    let new = NewKey {
        id: KeyId::new(),
        organization_id: old.organization_id,
        owner_id: old.owner_id.clone(),
        name: draft.name.unwrap_or_else(|| old.name.clone()),
        description: old.description.clone(),
        environment: old.environment,
        prefix: plain.prefix().to_owned(),
        hint: plain.hint().to_owned(),
        hash_algorithm,
        key_hash,
        scopes: old.scopes.clone(),
        allowed_ips: old.allowed_ips.clone(),
        expires_at,
        is_active: old.is_active,
        plan: old.plan.clone(),
        limits: old.limits,
        metadata: old.metadata.clone(),
        rotated_from: Some(old.id),
    };
    let rotation = state.store.rotate_key(old.id, new, actor.at + draft.grace, actor).await.map_err(|e| match e {
        StoreError::Conflict(what) => ApiError::new(ErrorCode::Conflict, what),
        e => e.into(),
    })?;
    Ok((plain, rotation.apply(&state.keys)))
}

/// The body of `POST /v1/organizations`, also built by `keyward orgs create`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganizationRequest {
    #[schema(value_type = Name)]
    pub name: String,
    /// Unique; 1-63 lowercase letters, digits and dashes, not starting or ending with a dash.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
    pub slug: String,
    /// At most 254 characters, with an `@` that is neither first nor last.
    #[schema(max_length = 254, pattern = r"^[^@][\s\S]*@[\s\S]*[^@]$")]
    pub email: Option<String>,
    /// `free` (default), `pro`, `enterprise` or a configured plan.
    pub plan: Option<String>,
    pub is_active: Option<bool>,
    /// `null`: the plan's.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub monthly_request_limit: Option<i64>,
    /// `null`: the plan's.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub rate_limit_per_minute: Option<i64>,
    /// `null`: the plan's.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub rate_limit_per_hour: Option<i64>,
    /// `null`: the plan's.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub rate_limit_per_day: Option<i64>,
    /// `null`: no limit.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub max_api_keys: Option<i64>,
}

/// The body of `PATCH /v1/organizations/{id}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrganizationRequest {
    #[schema(value_type = Option<Name>)]
    pub name: Option<String>,
    /// At most 254 characters, with an `@` that is neither first nor last; `null`: none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 254, pattern = r"^[^@][\s\S]*@[\s\S]*[^@]$")]
    pub email: Option<Option<String>>,
    pub plan: Option<String>,
    pub is_active: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807_i64)]
    pub monthly_request_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807_i64)]
    pub rate_limit_per_minute: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807_i64)]
    pub rate_limit_per_hour: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807_i64)]
    pub rate_limit_per_day: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807_i64)]
    pub max_api_keys: Option<Option<i64>>,
}

fn slug(value: &str) -> ApiResult<String> {
    let ok = (1..=63).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(ApiError::validation("slug", "must be 1-63 lowercase letters, digits and dashes"))
    }
}

fn email(value: Option<String>) -> ApiResult<Option<String>> {
    match value {
        // Characters, as the schema's `maxLength` counts them.
        Some(e) if e.chars().count() > 254 || !e.contains('@') || e.starts_with('@') || e.ends_with('@') => {
            Err(ApiError::validation("email", "must be an email address"))
        }
        e => Ok(e),
    }
}

fn non_negative(field: &str, value: Option<i64>) -> ApiResult<Option<i64>> {
    match value {
        Some(n) if n < 0 => Err(ApiError::validation(field, format!("`{field}` must not be negative"))),
        n => Ok(n),
    }
}

impl CreateOrganizationRequest {
    pub fn validate(self, v: &Validator<'_>) -> ApiResult<NewOrganization> {
        Ok(NewOrganization {
            id: OrgId::new(),
            name: v.name("name", &self.name)?,
            slug: slug(&self.slug)?,
            email: email(self.email)?,
            plan: v.plan("plan", self.plan.as_deref().unwrap_or("free"))?,
            is_active: self.is_active.unwrap_or(true),
            limits: LimitOverrides {
                rate_limit_per_minute: non_negative("rate_limit_per_minute", self.rate_limit_per_minute)?,
                rate_limit_per_hour: non_negative("rate_limit_per_hour", self.rate_limit_per_hour)?,
                rate_limit_per_day: non_negative("rate_limit_per_day", self.rate_limit_per_day)?,
                monthly_request_limit: non_negative("monthly_request_limit", self.monthly_request_limit)?,
            },
            max_api_keys: non_negative("max_api_keys", self.max_api_keys)?,
        })
    }
}

impl UpdateOrganizationRequest {
    pub fn validate(self, v: &Validator<'_>) -> ApiResult<OrganizationPatch> {
        let nn = |field: &str, value: Option<Option<i64>>| value.map(|n| non_negative(field, n)).transpose();
        Ok(OrganizationPatch {
            name: self.name.as_deref().map(|n| v.name("name", n)).transpose()?,
            email: self.email.map(email).transpose()?,
            plan: self.plan.as_deref().map(|p| v.plan("plan", p)).transpose()?,
            is_active: self.is_active,
            limits: keyward_store::LimitPatch {
                rate_limit_per_minute: nn("rate_limit_per_minute", self.rate_limit_per_minute)?,
                rate_limit_per_hour: nn("rate_limit_per_hour", self.rate_limit_per_hour)?,
                rate_limit_per_day: nn("rate_limit_per_day", self.rate_limit_per_day)?,
                monthly_request_limit: nn("monthly_request_limit", self.monthly_request_limit)?,
            },
            max_api_keys: nn("max_api_keys", self.max_api_keys)?,
        })
    }
}

/// The organization and admin key created on an empty database.
pub struct Seeded {
    pub organization: Organization,
    pub key: PlainKey,
    pub record: ApiKey,
}

/// On an empty database, creates organization `default` and one `keyward:admin` key; otherwise does
/// nothing and returns `None`.
pub async fn seed(state: &AppState, actor: &Actor) -> ApiResult<Option<Seeded>> {
    if state.store.count_orgs().await? > 0 {
        return Ok(None);
    }
    let v = Validator { plans: &state.plans, now: actor.at };
    let org =
        CreateOrganizationRequest { name: "Default".to_owned(), slug: "default".to_owned(), ..Default::default() }
            .validate(&v)?;
    let organization = match state.store.insert_org(org, actor).await {
        Ok(org) => org,
        // Another process seeded at the same moment: theirs stands.
        Err(StoreError::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let draft = CreateKeyRequest {
        name: "bootstrap admin".to_owned(),
        scopes: vec![keyward_core::KeywardScope::Admin.as_str().to_owned()],
        ..Default::default()
    }
    .validate(&v, organization.id)?;
    let (key, record) = create_key(state, draft, actor).await?;
    Ok(Some(Seeded { organization, key, record }))
}

/// Resolve an organization given by id or slug (CLI convenience).
pub async fn find_org(store: &dyn Store, id_or_slug: &str) -> ApiResult<Organization> {
    if let Ok(id) = id_or_slug.parse::<OrgId>() {
        return Ok(store.get_org(id).await?);
    }
    store
        .find_org_by_slug(id_or_slug)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no organization `{id_or_slug}`")))
}
