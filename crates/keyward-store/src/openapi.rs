//! What the OpenAPI document says of the records the API serves as they are (with the `utoipa`
//! feature): schemas for the values whose types live in `keyward-core`, which knows nothing of OpenAPI.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::EventKind;

/// `live` or `test`: how the API spells [`keyward_core::Environment`].
#[derive(ToSchema)]
#[schema(as = Environment, rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the values are `keyward_core::Environment`
pub enum EnvironmentName {
    Live,
    Test,
}

impl PartialSchema for EventKind {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(EventKind::ALL.map(EventKind::as_str)))
            .description(Some("A webhook event."))
            .into()
    }
}

impl ToSchema for EventKind {
    fn name() -> std::borrow::Cow<'static, str> {
        "WebhookEvent".into()
    }
}
