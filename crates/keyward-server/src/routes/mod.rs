//! One module per resource, and [`RouteTable`]: how `lib.rs` declares the routes, each with the
//! permission it needs, so that the route table reads like the authorization matrix.

use axum::handler::Handler;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use axum::{Json, Router};

use keyward_store::Page;

use crate::auth::{Caller, Grant, Permission};
use crate::error::ApiResult;
use crate::model::PageResponse;
use crate::routes::target::{Visible, Writable};
use crate::state::AppState;

pub mod audit;
pub mod authz;
pub mod health;
pub mod import;
pub mod keys;
pub mod me;
pub mod openapi;
pub mod orgs;
pub mod target;
pub mod usage;
pub mod verify;
pub mod webhooks;

/// A `201` whose body carries a secret shown this once (a key, a webhook's signing secret), with
/// `headers`.
// SECURITY: no cache may store a response that carries a secret.
fn created_with_secret(headers: HeaderMap, body: impl serde::Serialize) -> Response {
    (StatusCode::CREATED, headers, [(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(body)).into_response()
}

/// What a list route answers: one page of `T`, and the cursor of the next.
pub type Listed<T> = ApiResult<Json<PageResponse<T>>>;

/// A page from the store as a list route answers it, each item turned into its response by `f`.
fn listed<R, C: ToString, T>(page: Page<R, C>, f: impl FnMut(R) -> T) -> Listed<T> {
    Ok(Json(PageResponse::from_page(page, f)))
}

/// The methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Self::Get => MethodFilter::GET,
            Self::Post => MethodFilter::POST,
            Self::Patch => MethodFilter::PATCH,
            Self::Delete => MethodFilter::DELETE,
        }
    }
}

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Anyone, without a key.
    Nothing,
    /// A key its permission admits: [`Permission::GRANTS`].
    Key(&'static [Grant]),
}

/// One row of the route table.
#[derive(Debug, Clone, Copy)]
pub struct RouteRow {
    pub verb: Verb,
    pub path: &'static str,
    pub needs: Needs,
}

/// A handler whose first argument is a `Caller<P>`, or a [`Visible`] or [`Writable`] object of one:
/// admitted by the permission `P`.
/// The route table names `P` beside the path and the compiler holds the handler to it, so the table
/// cannot say one thing while the handler checks another.
pub trait Guarded<P, T> {}

macro_rules! guarded {
    ($($rest:ident),*) => {
        impl<H, M, P: Permission, $($rest,)*> Guarded<P, (M, Caller<P>, $($rest,)*)> for H {}
        impl<H, M, P: Permission, T, $($rest,)*> Guarded<P, (M, Visible<P, T>, $($rest,)*)> for H {}
        impl<H, M, P: Permission, T, $($rest,)*> Guarded<P, (M, Writable<P, T>, $($rest,)*)> for H {}
    };
}

guarded!();
guarded!(A);
guarded!(A, B);
guarded!(A, B, C);
guarded!(A, B, C, D);

/// Routes and, for each, what it needs; [`RouteTable::router`] is the axum router.
#[derive(Default)]
pub struct RouteTable {
    router: Router<AppState>,
    rows: Vec<RouteRow>,
}

impl RouteTable {
    /// A route for the callers `needs` admits: its handler takes a `Caller` of that permission.
    pub fn route<P, H, T>(self, verb: Verb, path: &'static str, needs: P, handler: H) -> Self
    where
        P: Permission,
        H: Handler<T, AppState> + Guarded<P, T>,
        T: 'static,
    {
        let _ = needs;
        self.add(verb, path, Needs::Key(P::GRANTS), handler)
    }

    /// A route anyone may call without a key.
    pub fn public<H, T>(self, verb: Verb, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(verb, path, Needs::Nothing, handler)
    }

    fn add<H, T>(mut self, verb: Verb, path: &'static str, needs: Needs, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.rows.push(RouteRow { verb, path, needs });
        self.router = self.router.route(path, on(verb.filter(), handler));
        self
    }

    pub fn rows(&self) -> &[RouteRow] {
        &self.rows
    }

    pub fn router(self) -> Router<AppState> {
        self.router
    }
}
