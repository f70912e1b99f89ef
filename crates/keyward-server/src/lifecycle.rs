//! Key expiry on a schedule: the sweeper deactivates expired keys (one `expire` audit row and one
//! `key.expired` event each, actor `system`) and writes the `key.expiring` notices N days ahead (once
//! per key and threshold). `serve` spawns it; tests call [`sweep`] directly with the injected clock.

use std::time::Duration;

use keyward_store::{Actor, StoreResult};

use crate::state::AppState;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
    pub expiring_notices: usize,
}

/// One run of the sweeper at the clock's `now`, over every organization.
pub async fn sweep(state: &AppState) -> StoreResult<SweepReport> {
    let now = state.clock.now();
    let expired = state.store.expire_keys(None, now, &Actor::system(now)).await?.apply(&state.keys);
    let notices = state.store.record_expiring_events(now, state.lifecycle.expiring_notice_days).await?;
    if !expired.is_empty() || !notices.is_empty() {
        tracing::info!(expired = expired.len(), expiring_notices = notices.len(), "expiry sweep");
        state.events_written();
    }
    Ok(SweepReport { expired: expired.len(), expiring_notices: notices.len() })
}

/// Runs [`sweep`] every `sweep_interval_seconds` until the task is aborted; `None` when turned off.
pub fn spawn_sweeper(state: AppState) -> Option<tokio::task::JoinHandle<()>> {
    let every = state.lifecycle.sweep_interval_seconds;
    if every == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = sweep(&state).await {
                tracing::warn!(error = %e, "expiry sweep failed; will retry");
            }
        }
    }))
}
