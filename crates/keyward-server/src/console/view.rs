//! What every console page shares: the layout (product name, stylesheet, script, sign-out), the
//! embedded stylesheet and script, and the pages that say why a request was refused.

use std::sync::LazyLock;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use sha2::{Digest, Sha256};

use crate::auth::{Admin, AuditRead, Caller, Grant, KeysReadOrSelf, KeysWrite, KeysWriteOrSelf, Permission};
use crate::error::ApiError;
use crate::state::AppState;

/// One embedded file, served under a name that carries a hash of its content, so it may be cached for
/// a year and a new build is fetched anew.
pub(super) struct Asset {
    pub(super) path: String,
    pub(super) body: &'static str,
    pub(super) mime: &'static str,
}

impl Asset {
    fn new(stem: &str, ext: &str, body: &'static str, mime: &'static str) -> Self {
        let hash = keyward_core::hex(&Sha256::digest(body.as_bytes())[..6]);
        Self { path: format!("/console/static/{stem}.{hash}.{ext}"), body, mime }
    }
}

pub(super) static CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("console", "css", include_str!("console.css"), "text/css; charset=utf-8"));
pub(super) static JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("console", "js", include_str!("console.js"), "text/javascript; charset=utf-8"));

/// A link of the header, shown only to the keys its page's permission `P` admits
/// ([`NavLink::to`]), so a session never sees a link that would answer 403.
pub(super) struct NavLink {
    href: &'static str,
    label: &'static str,
    grants: &'static [Grant],
}

impl NavLink {
    /// A link to `href`, whose handler declares `Signed<P>`.
    const fn to<P: Permission>(href: &'static str, label: &'static str) -> Self {
        Self { href, label, grants: P::GRANTS }
    }
}

/// The header's links, in order: one line per page, with the permission its handler declares (a test
/// opens each link with keys it is shown to, and with keys it is not).
pub(super) const NAV: &[NavLink] = &[
    NavLink::to::<KeysReadOrSelf>("/console/keys", "Keys"),
    NavLink::to::<KeysWriteOrSelf>("/console/keys/new", "New key"),
    NavLink::to::<KeysReadOrSelf>("/console/usage", "Usage"),
    NavLink::to::<AuditRead>("/console/audit", "Audit log"),
    NavLink::to::<Admin>("/console/organizations", "Organizations"),
    NavLink::to::<KeysWrite>("/console/webhooks", "Webhooks"),
];

/// Who a page is shown to: the session's CSRF token (for sign-out and every form) and the links of
/// [`NAV`] its key may open.
pub struct Viewer {
    pub csrf: String,
    links: Vec<&'static NavLink>,
}

impl Viewer {
    pub(super) fn of<P>(caller: &Caller<P>, csrf: String) -> Self {
        Self { csrf, links: NAV.iter().filter(|link| caller.admits(link.grants)).collect() }
    }
}

/// Every page: the product's name, and for a signed-in user (`viewer`) the links their key may open
/// and sign-out.
pub(super) fn layout(state: &AppState, viewer: Option<&Viewer>, title: &str, body: Markup) -> Markup {
    let product = &state.console.settings.product_name;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · " (product) }
                link rel="stylesheet" href=(CSS.path);
                script src=(JS.path) defer {}
            }
            body {
                header {
                    a.brand href="/console/keys" { (product) }
                    @if let Some(viewer) = viewer {
                        nav {
                            @for link in &viewer.links { a href=(link.href) { (link.label) } }
                            form method="post" action="/console/sign-out" {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// What a page handler answers: the page, or the page said in its place.
pub(super) type PageResult = Result<Response, Response>;

pub(super) fn page(status: StatusCode, markup: Markup) -> Response {
    (status, axum::response::Html(markup.into_string())).into_response()
}

/// A page saying only `text`, for a visitor who may not be signed in.
pub(super) fn message(state: &AppState, status: StatusCode, text: &str) -> Response {
    page(
        status,
        layout(state, None, status.canonical_reason().unwrap_or("Error"), html! { p.error role="alert" { (text) } }),
    )
}

/// A refusal for a signed-in user.
pub(super) fn refused<P>(caller: &Caller<P>, status: StatusCode, text: &str) -> Response {
    message(caller.state(), status, text)
}

/// What an API error says, as a page: the status and message the API would answer (a 5xx says no more
/// than "internal error"; its cause is logged as the API logs it).
pub(super) fn failed(state: &AppState, error: ApiError) -> Response {
    let text = error.message.clone();
    let logged = error.into_response();
    let status = logged.status();
    let text = if status.is_server_error() { "Internal error: try again later.".to_owned() } else { text };
    let mut response = message(state, status, &text);
    if let Some(retry) = logged.headers().get(axum::http::header::RETRY_AFTER) {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, retry.clone());
    }
    response
}
