//! [`KeyRecord`]: what verifying a key needs of it and of its organization, and nothing else. A node's
//! verify cache holds up to a million of them, so it is kept small: rare or per-organization parts are
//! boxed or shared behind an `Arc` (the cache shares equal organization parts and scope sets between
//! keys), and the full [`ApiKey`] (name, description, counters, ...) stays in the store.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use keyward_core::{
    Environment, HashAlgorithm, IpAllowList, KeyId, KeyState, LimitOverrides, OrgId, ScopeSet, VerifyOutcome,
    VerifyRequest, check_found_key,
};
use serde_json::Value;

use crate::{ApiKey, KeyWithOrg};

/// What verification needs of a key's organization; equal for every key of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgRecord {
    pub is_active: bool,
    pub plan: Box<str>,
    pub limits: LimitOverrides,
}

/// What verification needs of a key, shared (`Arc`) between the cache and every request using it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub organization_id: OrgId,
    /// The first key of its rotation chain (itself when never rotated): rate and quota counters are
    /// kept under it.
    pub lineage: KeyId,
    pub hash_algorithm: HashAlgorithm,
    pub environment: Environment,
    pub state: KeyState,
    /// Whether the key has its own monthly quota (else it draws from its organization's pool).
    pub own_quota: bool,
    /// When it was read from the store: the system clock here; a cache that keeps the record sets it
    /// from its own (injected) clock, and its TTL counts from it.
    pub fetched_at: DateTime<Utc>,
    pub owner_id: Option<Box<str>>,
    pub scopes: Arc<ScopeSet>,
    pub org: Arc<OrgRecord>,
    /// What most keys do not have (allow-list, metadata, a plan or limits of their own), boxed so they
    /// cost one pointer.
    pub extras: Option<Box<KeyExtras>>,
}

/// The rarer parts of a [`KeyRecord`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyExtras {
    /// Empty: any address.
    pub allowed_ips: IpAllowList,
    /// `None`: the empty object.
    pub metadata: Option<Value>,
    /// Per-key tier override; `None`: the organization's plan.
    pub plan: Option<Box<str>>,
    pub limits: LimitOverrides,
}

static NO_EXTRAS: KeyExtras =
    KeyExtras { allowed_ips: IpAllowList::EMPTY, metadata: None, plan: None, limits: LimitOverrides::NONE };

impl KeyRecord {
    fn extras(&self) -> &KeyExtras {
        self.extras.as_deref().unwrap_or(&NO_EXTRAS)
    }

    /// Status, organization, address and scopes, as a verification checks them.
    pub fn check(&self, request: &VerifyRequest<'_>) -> VerifyOutcome {
        check_found_key(&self.state, self.org.is_active, self.allowed_ips(), &self.scopes, request)
    }

    pub fn allowed_ips(&self) -> &IpAllowList {
        &self.extras().allowed_ips
    }

    pub fn plan(&self) -> Option<&str> {
        self.extras().plan.as_deref()
    }

    pub fn limits(&self) -> LimitOverrides {
        self.extras().limits
    }

    /// The key's metadata (the empty object when it has none).
    pub fn metadata(&self) -> Value {
        self.metadata_ref().clone()
    }

    pub fn metadata_ref(&self) -> &Value {
        static EMPTY: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Default::default()));
        self.extras().metadata.as_ref().unwrap_or(&EMPTY)
    }
}

impl From<KeyWithOrg> for KeyRecord {
    fn from(found: KeyWithOrg) -> Self {
        let org = OrgRecord {
            is_active: found.org_is_active,
            plan: found.org_plan.into_boxed_str(),
            limits: found.org_limits.core(),
        };
        let key: ApiKey = found.key;
        let empty_metadata = key.metadata.as_object().is_some_and(|m| m.is_empty()) || key.metadata.is_null();
        let extras = KeyExtras {
            allowed_ips: key.allowed_ips,
            metadata: (!empty_metadata).then_some(key.metadata),
            plan: key.plan.map(String::into_boxed_str),
            limits: key.limits.core(),
        };
        Self {
            id: key.id,
            organization_id: key.organization_id,
            lineage: key.lineage_id.unwrap_or(key.id),
            hash_algorithm: key.hash_algorithm,
            environment: key.environment,
            state: KeyState { is_active: key.is_active, revoked_at: key.revoked_at, expires_at: key.expires_at },
            own_quota: key.limits.monthly_request_limit.is_some(),
            fetched_at: Utc::now(),
            owner_id: key.owner_id.map(String::into_boxed_str),
            scopes: Arc::new(key.scopes),
            org: Arc::new(org),
            extras: (extras != NO_EXTRAS).then(|| Box::new(extras)),
        }
    }
}

#[cfg(test)]
mod tests {
    use keyward_core::{KeyHash, Scope};
    use serde_json::json;

    use super::*;

    fn found(metadata: Value, limits: crate::LimitOverrides, allowed_ips: IpAllowList) -> KeyWithOrg {
        let at = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let key = ApiKey {
            owner_id: Some("customer-7".into()),
            name: "a long name that the record does not keep".into(),
            description: Some("nor this".into()),
            key_hash: KeyHash([3; 32]),
            scopes: ScopeSet::new(vec![Scope::parse("read:projects").unwrap_or_else(|e| panic!("{e}"))]),
            allowed_ips,
            expires_at: Some(at),
            plan: Some("pro".into()),
            limits,
            metadata,
            total_requests: 9,
            last_used_at: Some(at),
            last_used_ip: Some("10.0.0.1".into()),
            lineage_id: Some(KeyId::new()),
            ..crate::fixtures::key(OrgId::new(), at)
        };
        KeyWithOrg { key, org_is_active: true, org_plan: "free".into(), org_limits: crate::LimitOverrides::default() }
    }

    #[test]
    fn a_record_keeps_what_verification_needs() {
        let limits = crate::LimitOverrides { monthly_request_limit: Some(50), ..Default::default() };
        let ips = IpAllowList::parse(&["10.0.0.0/8"]).unwrap_or_else(|e| panic!("{e}"));
        let found = found(json!({"tier": "gold"}), limits, ips.clone());
        let key = found.key.clone();
        let record = KeyRecord::from(found);
        assert_eq!((record.id, record.organization_id, record.lineage), (key.id, key.organization_id, key.lineage()));
        assert_eq!(record.state, key.state());
        assert_eq!(record.owner_id.as_deref(), Some("customer-7"));
        assert_eq!(*record.scopes, key.scopes);
        assert_eq!(record.allowed_ips(), &ips);
        assert_eq!(record.metadata(), json!({"tier": "gold"}));
        assert_eq!(record.plan(), Some("pro"));
        assert_eq!(record.limits().0.per_month, Some(50));
        assert!(record.own_quota);
        assert_eq!(*record.org, OrgRecord { is_active: true, plan: "free".into(), limits: LimitOverrides::NONE });
    }

    #[test]
    fn empty_parts_take_no_heap() {
        let mut bare = found(json!({}), crate::LimitOverrides::default(), IpAllowList::default());
        bare.key.plan = None;
        let record = KeyRecord::from(bare);
        assert!(record.extras.is_none());
        assert_eq!(record.metadata(), json!({}));
        assert!(record.allowed_ips().is_empty());
        assert!(!record.own_quota);
        // The cache holds a million of these (plus the `Arc` header and the cache's own entry).
        assert!(std::mem::size_of::<KeyRecord>() <= 144, "{}", std::mem::size_of::<KeyRecord>());
    }
}
