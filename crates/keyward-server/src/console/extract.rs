//! How a console request is admitted: the session cookie, the key looked up again, the caller its
//! route's permission builds, the CSRF token and the origin of a form.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{COOKIE, LOCATION};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use keyward_core::{VerifyOutcome, VerifyRequest};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::sessions::Session;
use super::view;
use crate::auth::{Caller, Permission};
use crate::error::ApiError;
use crate::state::AppState;

/// The cookie that carries a session's id.
pub const COOKIE_NAME: &str = "keyward_session";

/// A 303 to `to`.
pub(super) fn see_other(to: &str) -> Response {
    let location = HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/console"));
    (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
}

/// The session id in the request's cookie.
pub(super) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

/// Whether the browser reached this server over HTTPS: only a trusted proxy is believed when it says
/// so (`X-Forwarded-Proto`); the listener itself speaks plain HTTP.
pub(super) fn over_https(parts: &Parts, state: &AppState) -> bool {
    let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let trusted = peer.is_some_and(|ip| state.trusted_proxies.iter().any(|net| net.contains(&ip)));
    trusted
        && parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` of a session (`value` empty and `Max-Age=0`: the one that ends it).
/// SECURITY: script cannot read it, no other site's request carries it, only the console gets it.
pub(super) fn cookie(value: &str, secure: bool) -> HeaderValue {
    let end = if value.is_empty() { "; Max-Age=0" } else { "" };
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{COOKIE_NAME}={value}; HttpOnly; SameSite=Strict; Path=/console{secure}{end}"))
        .unwrap_or(HeaderValue::from_static("keyward_session=; Max-Age=0"))
}

/// SECURITY: a state-changing request must come from the console's own pages: a browser that says
/// where it came from must say this origin. `Sec-Fetch-Site` decides when sent (every current
/// browser); else an `Origin` must name this host. `Origin: null` names nothing (browsers send it for
/// our own forms, as the pages ask for no referrer) and is left to the CSRF token, which the handler
/// checks beside this, and to the `SameSite=Strict` cookie.
pub(super) fn same_origin(parts: &Parts) -> bool {
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return true;
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (None | Some("null"), _) => true,
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, authority)| authority == host),
        (Some(_), None) => false,
    }
}

/// A console user whose session is live and whose key still is, as the caller `P` admits: what the
/// API route of the same action would build from the key in its headers.
pub struct Signed<P> {
    pub caller: Caller<P>,
    session: Session,
}

impl<P> Signed<P> {
    pub fn csrf_token(&self) -> String {
        self.session.csrf_token()
    }

    /// Who the page answered is for: the CSRF token and the links the key may open.
    pub(super) fn viewer(&self) -> view::Viewer {
        view::Viewer::of(&self.caller, self.csrf_token())
    }

    /// SECURITY: every state-changing form carries the session's token.
    pub(super) fn check_csrf(&self, presented: &str) -> Result<(), Response> {
        if self.session.csrf_matches(presented) {
            Ok(())
        } else {
            Err(view::refused(
                &self.caller,
                StatusCode::FORBIDDEN,
                "This form has expired. Go back, reload and try again.",
            ))
        }
    }
}

impl<P: Permission> FromRequestParts<AppState> for Signed<P> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if !same_origin(parts) {
            return Err(view::message(state, StatusCode::FORBIDDEN, "This request did not come from the console."));
        }
        let Some(id) = session_cookie(&parts.headers) else { return Err(see_other("/console")) };
        let Some(session) = state.console.sessions.touch(id) else { return Err(see_other("/console")) };
        let ip = crate::auth::request_ip(parts, state);
        let key = match still_usable(state, &session, ip).await {
            Ok(Some(key)) => key,
            Ok(None) => {
                state.console.sessions.end(id);
                return Err(see_other("/console"));
            }
            Err(e) => return Err(view::failed(state, e)),
        };
        let caller = Caller::<P>::admitted(state, key, ip).map_err(|e| view::failed(state, e))?;
        Ok(Signed { caller, session })
    }
}

/// The session's key, looked up again through the verify cache as every API request's key is, if it
/// is still the same key and usable (not revoked, disabled, expired, outside its allowed addresses,
/// nor in a disabled organization).
async fn still_usable(
    state: &AppState,
    session: &Session,
    ip: Option<IpAddr>,
) -> Result<Option<Arc<keyward_store::KeyRecord>>, ApiError> {
    let Some(key) = state.keys.find(&session.key_hash).await? else { return Ok(None) };
    let request = VerifyRequest { now: state.clock.now(), client_ip: ip, required_scopes: &[] };
    Ok((key.id == session.key_id && key.check(&request) == VerifyOutcome::Valid).then_some(key))
}

/// A form's body, of at most [`crate::extract::MAX_BODY_BYTES`], read within the listener's deadline.
async fn form_bytes(req: Request, state: &AppState) -> Result<axum::body::Bytes, Response> {
    let timeout = req.extensions().get::<crate::listen::BodyReadTimeout>().copied();
    crate::extract::read_body(req.into_body(), crate::extract::MAX_BODY_BYTES, timeout)
        .await
        .map_err(|e| view::failed(state, e))
}

/// A `application/x-www-form-urlencoded` body of at most [`crate::extract::MAX_BODY_BYTES`].
pub struct FormBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for FormBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        serde_urlencoded::from_bytes(&form_bytes(req, state).await?)
            .map(FormBody)
            .map_err(|_| view::message(state, StatusCode::BAD_REQUEST, "This form could not be read."))
    }
}

/// The key id of the path: a page saying "No such key" (404) for anything that is not one.
pub struct KeyPath(pub keyward_core::KeyId);

impl FromRequestParts<AppState> for KeyPath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<keyward_core::KeyId>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(id)| KeyPath(id))
            .map_err(|_| view::message(state, StatusCode::NOT_FOUND, "No such key."))
    }
}

/// A form that changes the key its path names: the session's caller admitted by `P`, the form's CSRF
/// token checked, then the key loaded as its API route loads it (404 unseen, 403 unchangeable), and the
/// form's fields `F`.
pub struct KeyForm<P, F> {
    pub key: crate::routes::target::Writable<P, keyward_store::ApiKey>,
    pub state: AppState,
    /// Who the page the answer shows is for.
    pub viewer: view::Viewer,
    pub form: F,
}

impl<P: Permission, F: DeserializeOwned + Send> FromRequest<AppState> for KeyForm<P, F> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let signed = Signed::<P>::from_request_parts(&mut parts, state).await?;
        let KeyPath(id) = KeyPath::from_request_parts(&mut parts, state).await?;
        let bytes = form_bytes(Request::from_parts(parts, body), state).await?;
        let token: CsrfForm = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        signed.check_csrf(&token.csrf)?;
        let form: F = serde_urlencoded::from_bytes(&bytes)
            .map_err(|_| view::message(state, StatusCode::BAD_REQUEST, "This form could not be read."))?;
        let target = crate::routes::target::writable(&signed.caller, id).await.map_err(|e| view::failed(state, e))?;
        let viewer = signed.viewer();
        let key = crate::routes::target::Writable { caller: signed.caller, target };
        Ok(KeyForm { key, state: state.clone(), viewer, form })
    }
}

/// A form field as typed, trimmed; `None` when blank.
pub(super) fn blank(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A form that carries only its CSRF token.
#[derive(Deserialize, Default)]
pub struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::builder().method(method).uri("/console/keys");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_same_origin_posts_pass() {
        let host = ("host", "127.0.0.1:8080");
        type Case<'a> = (Method, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case<'_>] = &[
            (Method::GET, &[("sec-fetch-site", "cross-site")], true),
            (Method::POST, &[host], true),
            (Method::POST, &[host, ("sec-fetch-site", "same-origin"), ("origin", "http://127.0.0.1:8080")], true),
            (Method::POST, &[host, ("sec-fetch-site", "cross-site")], false),
            (Method::POST, &[host, ("sec-fetch-site", "same-site")], false),
            (Method::POST, &[host, ("origin", "http://evil.example")], false),
            (Method::POST, &[host, ("origin", "null")], true),
            (Method::POST, &[host, ("origin", "null"), ("sec-fetch-site", "same-origin")], true),
            (Method::POST, &[host, ("origin", "null"), ("sec-fetch-site", "cross-site")], false),
            (Method::POST, &[host, ("origin", "http://evil.example"), ("sec-fetch-site", "same-origin")], true),
        ];
        for (method, headers, ok) in cases {
            assert_eq!(same_origin(&parts(method.clone(), headers)), *ok, "{method} {headers:?}");
        }
    }

    #[test]
    fn the_session_cookie_is_read_among_others() {
        let p = parts(Method::GET, &[("cookie", "a=b; keyward_session=abc; c=d")]);
        assert_eq!(session_cookie(&p.headers), Some("abc"));
        assert_eq!(session_cookie(&parts(Method::GET, &[("cookie", "xkeyward_session=1")]).headers), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_confined_to_the_console() {
        assert_eq!(cookie("ab", false), "keyward_session=ab; HttpOnly; SameSite=Strict; Path=/console");
        assert_eq!(cookie("ab", true), "keyward_session=ab; HttpOnly; SameSite=Strict; Path=/console; Secure");
        assert_eq!(cookie("", false), "keyward_session=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0");
    }
}
