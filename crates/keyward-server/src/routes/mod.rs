//! One module per resource.

pub mod audit;
pub mod health;
pub mod import;
pub mod keys;
pub mod me;
pub mod openapi;
pub mod orgs;
pub mod usage;
pub mod verify;
pub mod webhooks;
