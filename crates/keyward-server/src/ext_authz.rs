//! Envoy's external authorization over gRPC (`envoy.service.auth.v3.Authorization/Check`) and the
//! standard `grpc.health.v1` service, on a listener of their own. This module only translates: a
//! `CheckRequest` becomes an [`AuthzRequest`], the [`Decision`] of the one decision core
//! ([`authz::decide`]) becomes a `CheckResponse`. Nothing here decides.
//!
//! Envoy allows a request when the response's `status` is `OK` and denies it otherwise, answering the
//! client with the `DeniedHttpResponse` (status, headers, body). A gRPC *error* (Keyward unreachable, a
//! timeout) is what Envoy's `failure_mode_allow` and `status_on_error` apply to; a store outage that
//! Keyward answers is a decision of its own (503 `store_unavailable`, fail closed).

mod answer;
mod check;
mod server;

pub use check::{ExtAuthz, GrpcLimits, MAX_REQUEST_BYTES, wire};
pub use server::serve;
