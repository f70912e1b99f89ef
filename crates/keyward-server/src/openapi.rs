//! The parts of the OpenAPI 3 document that routes share: the error answers every route that takes a
//! key, a JSON body, a query or an id may give, and the bearer scheme (required by the document as a
//! whole; a route that takes no key says so). The document itself is assembled in
//! [`crate::routes::openapi`], from the routes.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify};

use crate::error::ErrorBody;

/// The `bearer` security scheme the document requires of every route that takes a key.
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// What every route that takes a key may answer besides its own statuses (the `Caller` extractor
/// and the management API's per-address limit). The codes named are those of `error::ErrorCode`
/// with that status (a test holds them to it).
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: the errors themselves are `ApiError`s
pub enum KeyErrors {
    /// No key (`missing_credentials`), or one that is malformed (`malformed_key`), unknown
    /// (`unknown_key`), revoked (`key_revoked`), disabled (`key_disabled`) or expired (`key_expired`),
    /// or whose organization is disabled (`organization_disabled`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key lacks a scope the route needs (`insufficient_scope`), may not act on this target
    /// (`forbidden`), or may not be used from this address (`ip_not_allowed`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `rate_limited`: too many requests, or too many failed authentications, from this address
    /// (with `Retry-After`).
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// `store_unavailable`: the store cannot be reached; try again.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// What every route that reads a JSON body may answer about the body itself (`extract::JsonBody`).
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: the errors themselves are `ApiError`s
pub enum JsonBodyErrors {
    /// `invalid_json`: the body is not JSON.
    #[response(status = 400)]
    InvalidJson(ErrorBody),
    /// `request_timeout`: the body did not arrive within the server's body read timeout.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// `payload_too_large`: the body is larger than 64 KiB.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// `unsupported_media_type`: the body is not sent as `Content-Type: application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `invalid_request` (an unknown, missing or mistyped field) or `validation_failed` (a value the
    /// schema cannot express, such as a date in the past or an IP list entry); `field` names it.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
}

/// What every route that names a resource by id in its path answers when it cannot reach it.
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: the errors themselves are `ApiError`s
pub enum NotFoundErrors {
    /// `not_found`: no such resource, or one the caller may not see (the two answer alike).
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// What every route that reads a query string may answer about it (`extract::ApiQuery`).
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: the errors themselves are `ApiError`s
pub enum QueryErrors {
    /// `invalid_query`: a parameter is unknown, malformed or out of range.
    #[response(status = 400)]
    InvalidQuery(ErrorBody),
}
