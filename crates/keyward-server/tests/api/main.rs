//! HTTP tests through the router: one module per endpoint, one test per bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod authz;
mod cache;
mod client_ip;
mod errors;
mod escalation;
mod fuzz;
mod gateway;
mod helpers;
mod import;
mod isolation;
mod keys_create;
mod keys_expiry;
mod keys_item;
mod keys_list;
mod keys_rotate;
mod legacy;
mod limits;
mod me_health;
mod openapi;
mod orgs;
mod secrets;
mod usage;
mod verify;
mod webhooks;
