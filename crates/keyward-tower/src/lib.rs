//! Keyward as a [`tower::Layer`]: put it in front of any axum (or tower) service and every request's
//! key is verified — in-process against the same store as a Keyward server ([`InProcess`]), or
//! against a remote Keyward over HTTP ([`Remote`]) with the same interface. The verified identity
//! lands in the request's extensions as [`Identity`]; a refused request is answered in Keyward's
//! error format (`{"error": {"code": "REVOKED", ...}}`, 401/403/429) and never reaches the service.
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
use keyward_server::AppState;
use keyward_server::app::{App, BuildError, Tasks};
use keyward_server::settings::Settings;
use keyward_server::telemetry::Via;
use keyward_server::verifier::{self, Check};
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

/// The answer of a verifier: the identity, or why not.
pub type Decision = Result<Identity, VerifyOutcome>;

/// Something that verifies keys: in-process or remote.
#[async_trait]
pub trait Verify: Send + Sync + 'static {
    /// `Err(message)` when verification itself failed (store or network down): answered 503.
    async fn verify(&self, key: &str, client_ip: Option<IpAddr>, required: &[Scope]) -> Result<Decision, String>;
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
    async fn verify(&self, key: &str, client_ip: Option<IpAddr>, required: &[Scope]) -> Result<Decision, String> {
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
        let verdict = verifier::verify(&self.state, check).await.map_err(|e| e.to_string())?;
        Ok(match (verdict.outcome, verdict.key) {
            (VerifyOutcome::Valid, Some(k)) => Ok(Identity {
                key_id: k.id.to_string(),
                organization_id: k.organization_id.to_string(),
                owner_id: k.owner_id.as_deref().map(str::to_owned),
                environment: k.environment.to_string(),
                scopes: k.scopes.to_strings(),
                metadata: k.metadata(),
            }),
            (outcome, _) => Err(outcome),
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

#[async_trait]
impl Verify for Remote {
    async fn verify(&self, key: &str, client_ip: Option<IpAddr>, required: &[Scope]) -> Result<Decision, String> {
        let body = serde_json::json!({
            "key": key,
            "required_scopes": required.iter().map(Scope::as_str).collect::<Vec<_>>(),
            "ip": client_ip.map(|ip| ip.to_string()),
        });
        let request = Request::post(self.verify_url.clone())
            .header(AUTHORIZATION, format!("Bearer {}", self.service_key))
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| format!("keyward unreachable: {e}"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status != StatusCode::OK {
            return Err(format!("keyward answered {status}"));
        }
        let a: RemoteAnswer = serde_json::from_slice(&bytes).map_err(|e| format!("unexpected answer: {e}"))?;
        Ok(match (a.code, a.key_id, a.organization_id, a.environment) {
            (VerifyOutcome::Valid, Some(key_id), Some(organization_id), Some(environment)) => Ok(Identity {
                key_id,
                organization_id,
                owner_id: a.owner_id,
                environment,
                scopes: a.scopes.unwrap_or_default(),
                metadata: a.metadata.unwrap_or_default(),
            }),
            (VerifyOutcome::Valid, ..) => return Err("incomplete answer from keyward".to_owned()),
            (outcome, ..) => Err(outcome),
        })
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

fn presented_key(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(|v| v.trim().to_owned()))
}

fn refuse(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

fn outcome_status(outcome: VerifyOutcome) -> StatusCode {
    match outcome {
        VerifyOutcome::IpNotAllowed | VerifyOutcome::InsufficientScope | VerifyOutcome::OrgDisabled => {
            StatusCode::FORBIDDEN
        }
        VerifyOutcome::RateLimited | VerifyOutcome::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        VerifyOutcome::LimiterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    }
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
            let Some(key) = presented_key(request.headers()) else {
                return Ok(refuse(
                    StatusCode::UNAUTHORIZED,
                    "missing_credentials",
                    "send a key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                ));
            };
            let ip = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip().to_canonical());
            match layer.verifier.verify(&key, ip, &layer.required).await {
                Ok(Ok(identity)) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Ok(Err(outcome)) => {
                    let mut response = refuse(outcome_status(outcome), outcome.code(), "the API key was refused");
                    if outcome == VerifyOutcome::LimiterUnavailable {
                        response.headers_mut().insert(axum::http::header::RETRY_AFTER, 1.into());
                    }
                    Ok(response)
                }
                Err(cause) => {
                    tracing::error!(%cause, "key verification failed");
                    Ok(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "verification_unavailable",
                        "the key cannot be checked right now",
                    ))
                }
            }
        })
    }
}
