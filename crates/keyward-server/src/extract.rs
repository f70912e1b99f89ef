//! Wrapped extractors, so that even a JSON syntax error or a malformed id answers in our error format.

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};
use crate::listen::BodyReadTimeout;

/// The largest request body accepted anywhere.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body, read but not yet parsed: 415 without a JSON content type, 413 past
/// [`MAX_BODY_BYTES`]. Handlers parse it with [`JsonBody::parse`] *after* checking permissions, so a
/// caller without the scope learns nothing about what the body should look like.
pub struct JsonBody(axum::body::Bytes);

impl JsonBody {
    /// The body a JSON client would send as `value`: what a console form becomes before it is parsed
    /// and checked exactly as the API parses and checks it.
    pub(crate) fn of(value: &serde_json::Value) -> Self {
        Self(value.to_string().into())
    }

    /// 400 `invalid_json` for broken JSON, 422 `invalid_request` naming the field for an unknown,
    /// missing or mistyped field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(&self.0)
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "expected a body with `Content-Type: application/json`",
            ));
        }
        let timeout = req.extensions().get::<BodyReadTimeout>().copied();
        Ok(JsonBody(read_body(req.into_body(), MAX_BODY_BYTES, timeout).await?))
    }
}

/// Reads a whole body of at most `limit` bytes: 413 past it, 408 when it has not all arrived within
/// the listener's body deadline (none when the request came from elsewhere, e.g. a test's `oneshot`).
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: Option<BodyReadTimeout>,
) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || ApiError::new(ErrorCode::PayloadTooLarge, format!("the body is larger than {limit} bytes"));
    let read = axum::body::to_bytes(body, limit);
    match timeout {
        None => read.await.map_err(|_| too_large()),
        Some(BodyReadTimeout(within)) => match tokio::time::timeout(within, read).await {
            Ok(bytes) => bytes.map_err(|_| too_large()),
            Err(_) => Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!("the body did not arrive within {} ms", within.as_millis()),
            )),
        },
    }
}

/// Deserialize with the path of the failing field. SECURITY: serde quotes the offending string value
/// in its messages, which may be a key sent in the wrong field; quoted parts are cut out.
///
/// Every body and row Keyward reads is a JSON object: serde would also build a struct from an array
/// of its fields in order (`[null, null]`), which no schema admits, so anything but an object is 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // A body that parses is parsed once, without the path tracking (which only an error needs and
    // which costs as much as the parse itself); any other is parsed again below, exactly as before, for
    // the answer that names the field.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(parsed) = serde_json::from_slice(bytes)
    {
        return Ok(parsed);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        serde_path_to_error::deserialize::<_, serde::de::IgnoredAny>(de).map_err(refusal)?;
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object"));
    }
    serde_path_to_error::deserialize(de).map_err(refusal)
}

/// 400 `invalid_json` for broken JSON, 422 `invalid_request` naming the field for a data error.
fn refusal(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = redact_path(&e.path().to_string());
    let inner = e.into_inner();
    let message = redact_backticked(&redact_quoted(&inner.to_string()));
    match inner.classify() {
        serde_json::error::Category::Data => {
            let message = if path == "." { message } else { format!("field `{path}`: {message}") };
            ApiError { field: (path != ".").then_some(path), ..ApiError::new(ErrorCode::InvalidRequest, message) }
        }
        _ => ApiError::new(ErrorCode::InvalidJson, format!("the body is not valid JSON: {message}")),
    }
}

/// SECURITY: a field *name* is echoed too (`unknown field `x``); one that could be a key is not.
fn redact_path(path: &str) -> String {
    path.split('.')
        .map(|segment| {
            let name = segment.split('[').next().unwrap_or_default();
            if could_be_key(name) { segment.replacen(name, "…", 1) } else { segment.to_owned() }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// SECURITY: a name that merely *holds* a key (`my sk_live_…`) counts too.
fn could_be_key(s: &str) -> bool {
    keyward_core::key::could_hold_key(s)
}

/// serde names fields in backticks; a name that could be a key is cut out.
fn redact_backticked(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, part) in message.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        out.push_str(if i % 2 == 1 && could_be_key(part) { "…" } else { part });
    }
    out
}

fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            inside = !inside;
            out.push('"');
            if inside {
                out.push('…');
            }
        } else if !inside {
            out.push(c);
        }
    }
    // serde's own "at line 1 column 5" suffix is kept; it points at the problem without echoing it.
    out
}

/// Query parameters: 400 `invalid_query` naming the problem.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::new(ErrorCode::InvalidQuery, redact_quoted(&e.body_text())))
    }
}

/// A path parameter; one that does not parse (a malformed id) is simply not found.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(v)| ApiPath(v)).map_err(|_| ApiError::not_found())
    }
}

/// `PATCH` semantics: an absent field is `None`, an explicit `null` is `Some(None)`.
pub fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_that_could_be_keys_are_cut() {
        let key = "sk_live_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLM";
        let e = parse_json::<Probe>(format!("{{\"{key}\": 1}}").as_bytes()).err().unwrap();
        assert!(!e.message.contains("abcdefghij"), "{}", e.message);
        assert!(!e.field.unwrap_or_default().contains("abcdefghij"));
        let e = parse_json::<Probe>(format!("{{\"my {key}\": 1}}").as_bytes()).err().unwrap();
        assert!(!e.message.contains("abcdefghij"), "{}", e.message);
        assert!(!e.field.unwrap_or_default().contains("abcdefghij"));
        let e = parse_json::<Probe>(b"{\"colour\": 1}").err().unwrap();
        assert!(e.message.contains("`colour`"), "{}", e.message);
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        name: Option<String>,
    }

    #[test]
    fn only_an_object_is_a_body() {
        for body in ["[null]", "[]", " [\"name\"]", "null", "1", "\"x\"", "true"] {
            let e = parse_json::<Probe>(body.as_bytes()).err().unwrap();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{body}: {}", e.message);
        }
        for body in ["[1,", "", "nul"] {
            assert_eq!(parse_json::<Probe>(body.as_bytes()).err().unwrap().code, ErrorCode::InvalidJson, "{body}");
        }
        assert!(parse_json::<Probe>(b" {\"name\": null}").is_ok());
    }

    #[test]
    fn quoted_values_are_cut_from_messages() {
        assert_eq!(
            redact_quoted(r#"invalid type: string "sk_live_secret", expected a sequence"#),
            r#"invalid type: string "…", expected a sequence"#
        );
        assert_eq!(redact_quoted("no quotes"), "no quotes");
    }
}
