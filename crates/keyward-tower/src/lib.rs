//! Keyward as a [`tower::Layer`]: put it in front of any axum (or tower) service and every request's
//! key is verified — in-process against the same store as a Keyward server ([`InProcess`]), or
//! against a remote Keyward over HTTP ([`Remote`]) with the same interface. The verified identity
//! lands in the request's extensions as [`Identity`]; a refused request is answered from Keyward's
//! error table exactly as the gateway answers it (`401 {"error": {"code": "key_revoked", ...}}`,
//! with the rate-limit headers and `Retry-After` where they apply) and never reaches the service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Extension, Router, routing::get};
//! use keyward_server::settings::Settings;
//! use keyward_tower::{Identity, InProcess, KeywardLayer};
//!
//! let settings = Settings { database_url: "sqlite://keyward.db".to_owned(), ..Settings::default() };
//! let (verifier, tasks) = InProcess::build(settings).await?;
//! let app: Router = Router::new()
//!     .route("/projects", get(|Extension(who): Extension<Identity>| async move { who.key_id }))
//!     .layer(KeywardLayer::new(verifier).require(&["read:projects"])?);
//! // ... serve `app`; then write the usage recorded:
//! tasks.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, Request, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::{Scope, ScopeError, VerifyOutcome};
use keyward_server::app::{App, BuildError, Tasks};
use keyward_server::auth::presented_key;
use keyward_server::settings::Settings;
use keyward_server::telemetry::Via;
use keyward_server::verifier::{self, Check};
use keyward_server::{ApiError, AppState, ErrorCode};
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

/// Who is calling, once verified. Read it with `Extension<Identity>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub key_id: String,
    pub organization_id: String,
    pub owner_id: Option<String>,
    pub environment: String,
    pub scopes: Vec<String>,
    pub metadata: serde_json::Value,
}

/// The answer of a verifier: the identity, or the error to answer the request with: a refusal of the
/// key (`key_revoked`, `rate_limited`, ...), or a failure to check it at all (`store_unavailable`,
/// `verification_unavailable`, ...). Either way the code comes from Keyward's one error table.
pub type Decision = Result<Identity, ApiError>;

/// Something that verifies keys: in-process or remote.
#[async_trait]
pub trait Verify: Send + Sync + 'static {
    async fn verify(&self, key: &str, client_ip: Option<IpAddr>, required: &[Scope]) -> Decision;
}

/// Verifies in this process, exactly as a Keyward server node does: through its verify cache,
/// against its store, counted by its limiter, with usage recorded by its writer.
#[derive(Clone, Debug)]
pub struct InProcess {
    state: AppState,
}

impl InProcess {
    /// Verifies with `state`, a node's state built by [`App`] (shared, for instance, with Keyward's
    /// own router in the same process).
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// A verifier on a node of its own, built from `settings` as `keyward serve` builds one
    /// ([`App::build`]): with Redis (`settings.redis_url`) it shares limits and cache invalidations
    /// with the servers. Keep the [`Tasks`] and await [`Tasks::shutdown`] before the process exits,
    /// so that the usage recorded is written.
    pub async fn build(settings: Settings) -> Result<(Self, Tasks), BuildError> {
        let App { state, tasks } = App::build(settings).await?;
        Ok((Self::new(state), tasks))
    }
}

#[async_trait]
impl Verify for InProcess {
    async fn verify(&self, key: &str, client_ip: Option<IpAddr>, required: &[Scope]) -> Decision {
        let check = Check {
            presented: key,
            client_ip,
            required_scopes: required,
            organization: None,
            user_agent: "",
            via: Via::Layer,
            cost: 1,
            failures: keyward_server::limits::FailureScope::Edge,
        };
        let verdict = verifier::verify(&self.state, check).await?;
        if let Some(refusal) = verdict.refusal(self.state.clock.now()) {
            return Err(refusal);
        }
        let k = verdict.key.ok_or_else(|| ApiError::internal("a valid key without a record"))?;
        Ok(Identity {
            key_id: k.id.to_string(),
            organization_id: k.organization_id.to_string(),
            owner_id: k.owner_id.as_deref().map(str::to_owned),
            environment: k.environment.to_string(),
            scopes: k.scopes.to_strings(),
            metadata: k.metadata(),
        })
    }
}

/// Verifies through a remote Keyward's `POST /v1/verify`, with a service key holding `keyward:verify`.
#[derive(Clone)]
pub struct Remote {
    verify_url: Uri,
    service_key: Arc<str>,
    client: Client<HttpConnector, Body>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("verify_url", &self.verify_url).finish_non_exhaustive()
    }
}

impl Remote {
    /// `base` is the Keyward server, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str, service_key: &str) -> Result<Self, String> {
        let verify_url = format!("{}/v1/verify", base.trim_end_matches('/'))
            .parse()
            .map_err(|_| format!("`{base}` is not a URL"))?;
        Ok(Self {
            verify_url,
            service_key: service_key.into(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }
}

#[derive(Deserialize)]
struct RemoteAnswer {
    code: VerifyOutcome,
    key_id: Option<String>,
    organization_id: Option<String>,
    owner_id: Option<String>,
    environment: Option<String>,
    scopes: Option<Vec<String>>,
    metadata: Option<serde_json::Value>,
}

/// The headers of a remote verification's answer that go with a refusal: the verified key's
/// rate-limit headers and `Retry-After`, as the gateway sends them.
const REFUSAL_HEADERS: [&str; 6] =
    ["ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after"];

/// The remote Keyward could not check the key: 503, never a pass.
fn unavailable(cause: String) -> ApiError {
    ApiError {
        source: Some(cause),
        ..ApiError::new(ErrorCode::VerificationUnavailable, "the key cannot be checked right now")
    }
}

#[async_trait]
impl Verify for Remote {
    async fn verify(&self, key: &str, client_ip: Option<IpAddr>, required: &[Scope]) -> Decision {
        let body = serde_json::json!({
            "key": key,
            "required_scopes": required.iter().map(Scope::as_str).collect::<Vec<_>>(),
            "ip": client_ip.map(|ip| ip.to_string()),
        });
        let request = Request::post(self.verify_url.clone())
            .header(AUTHORIZATION, format!("Bearer {}", self.service_key))
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .map_err(|e| unavailable(e.to_string()))?;
        let response =
            self.client.request(request).await.map_err(|e| unavailable(format!("keyward unreachable: {e}")))?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.map_err(|e| unavailable(e.to_string()))?.to_bytes();
        if parts.status != StatusCode::OK {
            return Err(unavailable(format!("keyward answered {}", parts.status)));
        }
        let a: RemoteAnswer =
            serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("unexpected answer: {e}")))?;
        match (a.code, a.key_id, a.organization_id, a.environment) {
            (VerifyOutcome::Valid, Some(key_id), Some(organization_id), Some(environment)) => Ok(Identity {
                key_id,
                organization_id,
                owner_id: a.owner_id,
                environment,
                scopes: a.scopes.unwrap_or_default(),
                metadata: a.metadata.unwrap_or_default(),
            }),
            (VerifyOutcome::Valid, ..) => Err(unavailable("incomplete answer from keyward".to_owned())),
            (outcome, ..) => {
                let mut headers = HeaderMap::new();
                for name in REFUSAL_HEADERS {
                    if let Some(value) = parts.headers.get(name) {
                        headers.insert(name, value.clone());
                    }
                }
                Err(ApiError::refused(outcome).with_headers(headers))
            }
        }
    }
}

/// The layer. Cheap to clone.
#[derive(Clone)]
pub struct KeywardLayer {
    verifier: Arc<dyn Verify>,
    required: Arc<[Scope]>,
}

impl KeywardLayer {
    pub fn new(verifier: impl Verify) -> Self {
        Self { verifier: Arc::new(verifier), required: Arc::new([]) }
    }

    /// Scopes every request through this layer needs.
    pub fn require(mut self, scopes: &[&str]) -> Result<Self, ScopeError> {
        self.required = scopes.iter().map(|s| Scope::parse(s)).collect::<Result<Vec<_>, _>>()?.into();
        Ok(self)
    }
}

impl<S> Layer<S> for KeywardLayer {
    type Service = KeywardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeywardService { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct KeywardService<S> {
    inner: S,
    layer: KeywardLayer,
}

impl<S, B> Service<Request<B>> for KeywardService<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The ready inner service handles this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let key = match presented_key(request.headers()) {
                Ok(key) => key.to_owned(),
                Err(missing) => return Ok(missing.into_response()),
            };
            let ip = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip().to_canonical());
            match layer.verifier.verify(&key, ip, &layer.required).await {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Err(error) => Ok(error.into_response()),
            }
        })
    }
}
