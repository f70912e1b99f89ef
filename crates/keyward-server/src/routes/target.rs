//! The object a route names by the `{id}` of its path, loaded for its caller: [`Visible`] when the
//! caller may see it (else 404, exactly like an id that does not exist), [`Writable`] when it may also
//! change it (else 403). A handler that takes one declares in its signature what it acts on and
//! which rule admits the caller to it, as `Caller<P>` declares the permission.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiPath;
use crate::state::AppState;

/// A kind of object a route can name by id, with the object-level rules that admit a caller to it.
pub trait Target: Sized + Send + 'static {
    type Id: DeserializeOwned + Send;

    /// Loads the object for `caller`: one it may not see answers 404.
    fn visible<P>(caller: &Caller<P>, id: Self::Id) -> impl Future<Output = ApiResult<Self>> + Send;

    /// Whether `caller` may change the object (403 when it may not).
    fn may_change<P>(&self, caller: &Caller<P>) -> ApiResult<()>;
}

/// The object of the route's path, which the caller may see.
pub struct Visible<P, T> {
    pub caller: Caller<P>,
    pub target: T,
}

/// The object of the route's path, which the caller may see and change.
pub struct Writable<P, T> {
    pub caller: Caller<P>,
    pub target: T,
}

/// The caller (admitted by `P`, as [`Caller`] does), then the id of the path, in that order.
async fn caller_and_id<P: Permission, T: Target>(parts: &mut Parts, state: &AppState) -> ApiResult<(Caller<P>, T::Id)> {
    let caller = Caller::<P>::from_request_parts(parts, state).await?;
    let ApiPath(id) = ApiPath::<T::Id>::from_request_parts(parts, state).await?;
    Ok((caller, id))
}

/// The object `id` names, which `caller` may see (else 404) and change (else 403): what [`Writable`]
/// loads, for a route whose path names more than the object.
pub async fn writable<P, T: Target>(caller: &Caller<P>, id: T::Id) -> ApiResult<T> {
    let target = T::visible(caller, id).await?;
    target.may_change(caller)?;
    Ok(target)
}

impl<P: Permission, T: Target> FromRequestParts<AppState> for Visible<P, T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let (caller, id) = caller_and_id::<P, T>(parts, state).await?;
        let target = T::visible(&caller, id).await?;
        Ok(Self { caller, target })
    }
}

impl<P: Permission, T: Target> FromRequestParts<AppState> for Writable<P, T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let (caller, id) = caller_and_id::<P, T>(parts, state).await?;
        let target = writable(&caller, id).await?;
        Ok(Self { caller, target })
    }
}
