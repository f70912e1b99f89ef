//! The `CheckResponse` of a decision, written by hand into the one buffer that goes out as the call's
//! DATA frame, its 5-byte gRPC prefix included. Built as prost messages, an answer cost a `String` per
//! header name and value, a `Struct` of `Value`s in a hash map for the identity, and `encoded_len`
//! walked again at every level of nesting, all dropped once encoded; here the header maps are read
//! where they are, each length is counted once, and an answer is one allocation of its exact size.
//!
//! Field numbers are those of `envoy.service.auth.v3` and the messages it holds
//! (`envoy.config.core.v3.HeaderValueOption`, `envoy.type.v3.HttpStatus`, `google.rpc.Status`,
//! `google.protobuf.Struct`), written in field order as prost writes them; the tests decode both
//! encodings with the prost types and compare.

use std::borrow::Cow;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};
use tonic::Code;

use crate::authz::Allowed;

/// `CheckResponse`'s fields.
const STATUS: u8 = 1;
const DENIED_RESPONSE: u8 = 2;
const OK_RESPONSE: u8 = 3;
const DYNAMIC_METADATA: u8 = 4;
/// `OkHttpResponse`'s.
const OK_HEADERS: u8 = 2;
const OK_HEADERS_TO_REMOVE: u8 = 5;
const OK_RESPONSE_HEADERS_TO_ADD: u8 = 6;
/// `DeniedHttpResponse`'s.
const DENIED_STATUS: u8 = 1;
const DENIED_HEADERS: u8 = 2;
const DENIED_BODY: u8 = 3;
/// `HeaderValueOption.append_action = OVERWRITE_IF_EXISTS_OR_ADD`, as a varint field (3) and value.
const OVERWRITE_IF_EXISTS_OR_ADD: [u8; 2] = [3 << 3, 2];
/// `google.protobuf.Value`'s kinds used here.
const STRING_VALUE: u8 = 3;
const LIST_VALUE: u8 = 6;
/// The identity headers' prefix, left out of the metadata's field names.
const IDENTITY_PREFIX: &str = "x-keyward-";

/// The bytes of a length-delimited field of `len` bytes: every field number here is below 16, so
/// its key is one byte.
fn delimited(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn put_key(buf: &mut BytesMut, field: u8, len: usize) {
    buf.put_u8(field << 3 | 2);
    encode_varint(len as u64, buf);
}

fn put_bytes(buf: &mut BytesMut, field: u8, bytes: &[u8]) {
    put_key(buf, field, bytes.len());
    buf.put_slice(bytes);
}

/// A buffer for a message of `len` bytes, its gRPC prefix (not compressed, length) written.
fn framed(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    // An answer is a few KiB at most: far below the 4 GiB a prefix can announce.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    buf
}

fn finished(buf: BytesMut, len: usize) -> Bytes {
    debug_assert_eq!(buf.len(), 5 + len, "an answer's length was miscounted");
    buf.freeze()
}

/// `OK`, with `OkHttpResponse` (the upstream's headers, the headers to remove, the client's
/// headers) and the identity as dynamic metadata.
pub(super) fn allow(allowed: &Allowed) -> Bytes {
    let Allowed { upstream_headers, remove_headers, response_headers, .. } = allowed;
    let ok = options_len(upstream_headers)
        + remove_headers.iter().map(|h| delimited(h.as_str().len())).sum::<usize>()
        + options_len(response_headers);
    let metadata = identity_len(upstream_headers);
    // `status` is an empty `google.rpc.Status`: code 0 is its default, so not written.
    let len = delimited(0) + delimited(ok) + if metadata == 0 { 0 } else { delimited(metadata) };
    let mut buf = framed(len);
    put_key(&mut buf, STATUS, 0);
    put_key(&mut buf, OK_RESPONSE, ok);
    put_options(&mut buf, OK_HEADERS, upstream_headers);
    for name in remove_headers {
        put_bytes(&mut buf, OK_HEADERS_TO_REMOVE, name.as_str().as_bytes());
    }
    put_options(&mut buf, OK_RESPONSE_HEADERS_TO_ADD, response_headers);
    if metadata != 0 {
        put_key(&mut buf, DYNAMIC_METADATA, metadata);
        put_identity(&mut buf, upstream_headers);
    }
    finished(buf, len)
}

/// A refusal: the gRPC code of `status` and its description, with `DeniedHttpResponse` (the HTTP
/// status, the headers and the body Envoy sends the client).
pub(super) fn deny(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Bytes {
    let code = grpc_code(status);
    let message = code.description().as_bytes();
    let code = u64::try_from(i32::from(code)).unwrap_or_default();
    let rpc_status = 1 + encoded_len_varint(code) + delimited(message.len());
    let http_status = 1 + encoded_len_varint(u64::from(status.as_u16()));
    // A protobuf string: as it is when it is UTF-8 (Keyward's own always are), else with U+FFFD.
    let body = String::from_utf8_lossy(body);
    let denied =
        delimited(http_status) + options_len(headers) + if body.is_empty() { 0 } else { delimited(body.len()) };
    let len = delimited(rpc_status) + delimited(denied);
    let mut buf = framed(len);
    put_key(&mut buf, STATUS, rpc_status);
    buf.put_u8(1 << 3);
    encode_varint(code, &mut buf);
    put_bytes(&mut buf, 2, message);
    put_key(&mut buf, DENIED_RESPONSE, denied);
    put_key(&mut buf, DENIED_STATUS, http_status);
    buf.put_u8(1 << 3);
    encode_varint(u64::from(status.as_u16()), &mut buf);
    put_options(&mut buf, DENIED_HEADERS, headers);
    if !body.is_empty() {
        put_bytes(&mut buf, DENIED_BODY, body.as_bytes());
    }
    finished(buf, len)
}

/// The gRPC status beside a refusal: Envoy only tells `OK` from the rest (the HTTP status is what
/// the client sees), but logs, the network filter and other callers read it.
pub(super) fn grpc_code(status: StatusCode) -> Code {
    match status {
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::NOT_FOUND => Code::NotFound,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

/// A header to set, replacing what the request (or response) already had by that name: a client
/// cannot add a value of its own beside Keyward's. `HeaderValueOption { header: HeaderValue { key,
/// value }, append_action }`.
struct HeaderOption<'a> {
    name: &'a str,
    value: Cow<'a, str>,
    /// The `HeaderValue`'s bytes (an empty value is its default, not written).
    header_len: usize,
}

impl<'a> HeaderOption<'a> {
    fn new(name: &'a HeaderName, value: &'a HeaderValue) -> Self {
        let (name, value) = (name.as_str(), String::from_utf8_lossy(value.as_bytes()));
        let header_len = delimited(name.len()) + if value.is_empty() { 0 } else { delimited(value.len()) };
        Self { name, value, header_len }
    }

    fn len(&self) -> usize {
        delimited(self.header_len) + OVERWRITE_IF_EXISTS_OR_ADD.len()
    }

    fn put(&self, buf: &mut BytesMut, field: u8) {
        put_key(buf, field, self.len());
        put_key(buf, 1, self.header_len);
        put_bytes(buf, 1, self.name.as_bytes());
        if !self.value.is_empty() {
            put_bytes(buf, 2, self.value.as_bytes());
        }
        buf.put_slice(&OVERWRITE_IF_EXISTS_OR_ADD);
    }
}

fn options(headers: &HeaderMap) -> impl Iterator<Item = HeaderOption<'_>> {
    headers.iter().map(|(name, value)| HeaderOption::new(name, value))
}

/// The bytes of `headers` as a repeated field.
fn options_len(headers: &HeaderMap) -> usize {
    options(headers).map(|o| delimited(o.len())).sum()
}

fn put_options(buf: &mut BytesMut, field: u8, headers: &HeaderMap) {
    for option in options(headers) {
        option.put(buf, field);
    }
}

/// One field of the identity for later filters (`envoy.filters.http.ext_authz` namespace): an
/// `x-keyward-*` header the upstream gets, named without the prefix and with `_` for `-`
/// (`key_id`, `organization_id`, `owner_id`, `environment`), a string; `scopes` as a list of them.
/// Read from the same headers, so the two never disagree.
struct IdentityField<'a> {
    /// Without the prefix, `-` not yet replaced.
    name: &'a str,
    /// The header's value as UTF-8, as it went into the header (an owner id in any script); a value
    /// that is not UTF-8 (Keyward's never are) is left out.
    text: &'a str,
    /// `Some(the ListValue's bytes)` for `scopes`.
    list: Option<usize>,
    /// The `google.protobuf.Value`'s bytes: `string_value`, or `list_value` of `string_value`s.
    value_len: usize,
}

impl<'a> IdentityField<'a> {
    fn new(name: &'a str, text: &'a str) -> Self {
        let list = (name == "scopes")
            .then(|| text.split_ascii_whitespace().map(|s| delimited(delimited(s.len()))).sum::<usize>());
        let value_len = delimited(list.unwrap_or(text.len()));
        Self { name, text, list, value_len }
    }

    /// The map entry's bytes: `{1: name, 2: value}`.
    fn len(&self) -> usize {
        delimited(self.name.len()) + delimited(self.value_len)
    }

    /// As a `Struct.fields` (field 1) entry.
    fn put(&self, buf: &mut BytesMut) {
        put_key(buf, 1, self.len());
        put_key(buf, 1, self.name.len());
        buf.extend(self.name.bytes().map(|b| if b == b'-' { b'_' } else { b }));
        put_key(buf, 2, self.value_len);
        match self.list {
            Some(list) => {
                put_key(buf, LIST_VALUE, list);
                for scope in self.text.split_ascii_whitespace() {
                    put_key(buf, 1, delimited(scope.len()));
                    put_bytes(buf, STRING_VALUE, scope.as_bytes());
                }
            }
            None => put_bytes(buf, STRING_VALUE, self.text.as_bytes()),
        }
    }
}

fn identity(headers: &HeaderMap) -> impl Iterator<Item = IdentityField<'_>> {
    headers.iter().filter_map(|(name, value)| {
        let text = std::str::from_utf8(value.as_bytes()).ok()?;
        Some(IdentityField::new(name.as_str().strip_prefix(IDENTITY_PREFIX)?, text))
    })
}

/// The identity `Struct`'s bytes; 0 when it has no field (then no metadata is sent). A name seen
/// twice is written twice and read as the last, as a protobuf map is.
fn identity_len(headers: &HeaderMap) -> usize {
    identity(headers).map(|f| delimited(f.len())).sum()
}

fn put_identity(buf: &mut BytesMut, headers: &HeaderMap) {
    for field in identity(headers) {
        field.put(buf);
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::ext_authz::v3::pb::{
        CheckResponse, DeniedHttpResponse, HeaderAppendAction, HttpResponse, HttpStatus, OkHttpResponse,
    };
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue as EnvoyHeader, HeaderValueOption};
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
    use envoy_types::pb::google::rpc;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    /// The answers as prost messages, as the listener built them before they were written by hand
    /// (but for the identity, read as UTF-8 where it was read as visible ASCII and so lost an owner
    /// id in any other script): what the hand encoding must decode to.
    mod reference {
        use super::*;

        pub fn allow(allowed: &Allowed) -> CheckResponse {
            let Allowed { upstream_headers, remove_headers, response_headers, .. } = allowed;
            let ok = OkHttpResponse {
                headers: options(upstream_headers),
                headers_to_remove: remove_headers.iter().map(|h| h.as_str().to_owned()).collect(),
                response_headers_to_add: options(response_headers),
                ..OkHttpResponse::default()
            };
            CheckResponse {
                status: Some(rpc::Status { code: Code::Ok.into(), ..rpc::Status::default() }),
                http_response: Some(HttpResponse::OkResponse(ok)),
                dynamic_metadata: identity_metadata(upstream_headers),
            }
        }

        pub fn deny(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> CheckResponse {
            let denied = DeniedHttpResponse {
                status: Some(HttpStatus { code: i32::from(status.as_u16()) }),
                headers: options(headers),
                body: String::from_utf8_lossy(body).into_owned(),
            };
            let code = grpc_code(status);
            CheckResponse {
                status: Some(rpc::Status {
                    code: code.into(),
                    message: code.description().to_owned(),
                    details: Vec::new(),
                }),
                http_response: Some(HttpResponse::DeniedResponse(denied)),
                dynamic_metadata: None,
            }
        }

        fn options(headers: &HeaderMap) -> Vec<HeaderValueOption> {
            headers
                .iter()
                .map(|(name, value)| HeaderValueOption {
                    header: Some(EnvoyHeader {
                        key: name.as_str().to_owned(),
                        value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        raw_value: Vec::new(),
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
                    ..HeaderValueOption::default()
                })
                .collect()
        }

        fn identity_metadata(headers: &HeaderMap) -> Option<Struct> {
            let fields: std::collections::BTreeMap<String, Value> = headers
                .iter()
                .filter_map(|(name, value)| {
                    let field = name.as_str().strip_prefix("x-keyward-")?.replace('-', "_");
                    let text = std::str::from_utf8(value.as_bytes()).ok()?;
                    let kind = if field == "scopes" {
                        let scopes = text
                            .split_ascii_whitespace()
                            .map(|s| Value { kind: Some(Kind::StringValue(s.to_owned())) });
                        Kind::ListValue(ListValue { values: scopes.collect() })
                    } else {
                        Kind::StringValue(text.to_owned())
                    };
                    Some((field, Value { kind: Some(kind) }))
                })
                .collect();
            (!fields.is_empty()).then(|| Struct { fields: fields.into_iter().collect() })
        }
    }

    /// The message of a framed answer, its prefix checked.
    fn decoded(framed: &Bytes) -> CheckResponse {
        assert_eq!(framed[0], 0, "compressed flag");
        let length = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        assert_eq!(length, framed.len() - 5, "the prefix's length");
        CheckResponse::decode(&framed[5..]).unwrap()
    }

    fn map(headers: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    fn allowed(upstream: &[(&str, &[u8])], remove: &[&str], response: &[(&str, &[u8])]) -> Allowed {
        Allowed {
            key: None,
            upstream_headers: map(upstream),
            remove_headers: remove.iter().map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap()).collect(),
            response_headers: map(response),
        }
    }

    fn assert_allow_as_prost(allowed: &Allowed) {
        let ours = decoded(&allow(allowed));
        assert_eq!(ours, reference::allow(allowed));
        // Without a repeated identity field, byte for byte as prost writes it too (the metadata's
        // map aside, which prost writes in hash order).
        if ours.dynamic_metadata.as_ref().is_none_or(|m| m.fields.len() <= 1) {
            assert_eq!(allow(allowed)[5..], reference::allow(allowed).encode_to_vec()[..]);
        }
    }

    #[test]
    fn an_allow_decodes_to_what_prost_wrote() {
        let identity: &[(&str, &[u8])] = &[
            ("x-keyward-key-id", b"0193e0c4-5f8e-7c3a-9d2b-1a2b3c4d5e6f"),
            ("x-keyward-organization-id", b"0193e0c4-0000-7c3a-9d2b-1a2b3c4d5e6f"),
            ("x-keyward-owner-id", b"customer-7"),
            ("x-keyward-environment", b"live"),
            ("x-keyward-scopes", b"read:projects  write:projects"),
            ("x-keyward-identity", b"v1.eyJ.abc"),
        ];
        let limits: &[(&str, &[u8])] = &[
            ("x-ratelimit-limit", b"60"),
            ("x-ratelimit-remaining", b"59"),
            ("ratelimit", b"\"minute\";r=59;t=60"),
            ("ratelimit-policy", b"\"minute\";q=60;w=60"),
        ];
        let remove = ["authorization", "x-api-key", "x-keyward-key-id"];
        assert_allow_as_prost(&allowed(identity, &remove, limits));
        // A public route: no identity, no metadata, and an empty `OkHttpResponse`.
        assert_allow_as_prost(&allowed(&[], &[], &[]));
        // No scopes (an empty list), an empty owner, a value that is not UTF-8, a header seen twice,
        // and a 200-byte value (lengths past one varint byte).
        let long = "k".repeat(200);
        let odd: &[(&str, &[u8])] = &[
            ("x-keyward-scopes", b""),
            ("x-keyward-owner-id", b""),
            ("x-keyward-environment", b"caf\xe9"),
            ("x-keyward-key-id", b"one"),
            ("x-keyward-key-id", b"two"),
            ("x-keyward-metadata", long.as_bytes()),
        ];
        assert_allow_as_prost(&allowed(odd, &["authorization"], &[("x-other", b"caf\xe9")]));
    }

    #[test]
    fn a_deny_decodes_to_what_prost_wrote() {
        let body = br#"{"error":{"code":"rate_limited","message":"rate limit exceeded"}}"#;
        let headers = map(&[("content-type", b"application/json"), ("retry-after", b"12"), ("ratelimit", b"r=0")]);
        for status in [401, 403, 404, 413, 429, 400, 500, 503] {
            let status = StatusCode::from_u16(status).unwrap();
            let ours = deny(status, &headers, body);
            assert_eq!(decoded(&ours), reference::deny(status, &headers, body), "{status}");
            assert_eq!(ours[5..], reference::deny(status, &headers, body).encode_to_vec()[..], "{status}");
        }
        // No headers, no body, and a body that is not UTF-8.
        for body in [&b""[..], b"\xff\xfe{}"] {
            let ours = deny(StatusCode::UNAUTHORIZED, &HeaderMap::new(), body);
            assert_eq!(decoded(&ours), reference::deny(StatusCode::UNAUTHORIZED, &HeaderMap::new(), body));
        }
    }

    /// Every length from one varint byte to three, at every level of nesting: a value, its
    /// `HeaderValue`, its option, the `OkHttpResponse` or `DeniedHttpResponse`, the metadata's
    /// `Value`, `ListValue`, map entry and `Struct`; each crosses 127 and 16,383 somewhere in the sweep.
    /// The values are what a tenant can put in a key (an owner id in any script, quotes, a tab, a
    /// signed identity past 16 KiB), and the deny is a 429 with `Retry-After` and rate limits.
    #[test]
    fn lengths_of_every_varint_width_decode_to_what_prost_wrote() {
        let sweep = (100..140).chain(16_340..16_400).chain([0, 1, 65_536]);
        for len in sweep {
            let owner = format!("\"caf\u{e9}\t\u{1F511}'{}", "o".repeat(len));
            let scopes: String = (0..len / 8).map(|i| format!("read:r{i} ")).collect();
            let token = "t".repeat(len);
            let upstream: &[(&str, &[u8])] = &[
                ("x-keyward-key-id", b"0193e0c4-5f8e-7c3a-9d2b-1a2b3c4d5e6f"),
                ("x-keyward-owner-id", owner.as_bytes()),
                ("x-keyward-scopes", scopes.as_bytes()),
                ("x-keyward-identity", token.as_bytes()),
            ];
            let limits: &[(&str, &[u8])] = &[("ratelimit", token.as_bytes())];
            let allowed = allowed(upstream, &["authorization"], limits);
            assert_eq!(decoded(&allow(&allowed)), reference::allow(&allowed), "{len}");
            let body = format!(r#"{{"error":{{"code":"rate_limited","message":"{}"}}}}"#, "\u{e9}".repeat(len));
            let headers = map(&[("retry-after", b"12"), ("ratelimit", token.as_bytes()), ("x-ratelimit-limit", b"60")]);
            let status = StatusCode::TOO_MANY_REQUESTS;
            let ours = deny(status, &headers, body.as_bytes());
            assert_eq!(decoded(&ours), reference::deny(status, &headers, body.as_bytes()), "{len}");
            assert_eq!(ours[5..], reference::deny(status, &headers, body.as_bytes()).encode_to_vec()[..], "{len}");
        }
    }

    /// Header names, among them the identity's, and values of any bytes a header value may hold.
    fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        let name = prop_oneof![
            Just("x-keyward-key-id".to_owned()),
            Just("x-keyward-scopes".to_owned()),
            Just("x-keyward-owner-id".to_owned()),
            "x-keyward-[a-z-]{1,12}",
            "[a-z][a-z0-9-]{0,20}",
        ];
        let value = prop_oneof![
            proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..300),
            "[a-z:*]{1,10}( [a-z:*]{1,10}){0,4}".prop_map(String::into_bytes),
        ];
        proptest::collection::vec((name, value), 0..8)
    }

    fn header_map(headers: &[(String, Vec<u8>)]) -> HeaderMap {
        let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        map(&pairs)
    }

    proptest! {
        #[test]
        fn any_answer_decodes_to_what_prost_wrote(
            upstream in headers(),
            response in headers(),
            remove in proptest::collection::vec("[a-z][a-z0-9-]{0,20}", 0..4),
            status in prop_oneof![Just(400u16), Just(401), Just(403), Just(429), Just(503), 400u16..600],
            body in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let remove: Vec<&str> = remove.iter().map(String::as_str).collect();
            let mut allowed = allowed(&[], &remove, &[]);
            allowed.upstream_headers = header_map(&upstream);
            allowed.response_headers = header_map(&response);
            prop_assert_eq!(decoded(&allow(&allowed)), reference::allow(&allowed));
            let status = StatusCode::from_u16(status).unwrap();
            let headers = header_map(&upstream);
            prop_assert_eq!(decoded(&deny(status, &headers, &body)), reference::deny(status, &headers, &body));
        }
    }
}
