//! Key usage (`total_requests`, `last_used_at`, `last_used_ip`) is recorded after the answer: the
//! request path only drops a note into a bounded channel and never waits; a background task merges
//! notes per key and writes them in one transaction per batch.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keyward_core::KeyId;
use keyward_store::{KeyUsage, Store};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Notes that may wait in the channel before the request path starts dropping them.
const CHANNEL_CAPACITY: usize = 65_536;
/// A batch is written early once it covers this many keys.
const MAX_BATCH_KEYS: usize = 1_000;

enum Note {
    Used { key_id: KeyId, at: DateTime<Utc>, ip: Option<IpAddr> },
    Flush(oneshot::Sender<()>),
}

/// The request path's handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct UsageRecorder {
    tx: mpsc::Sender<Note>,
}

/// The background writer; await [`UsageWorker::shutdown`] to write everything pending.
#[derive(Debug)]
pub struct UsageWorker {
    recorder: UsageRecorder,
    handle: JoinHandle<()>,
}

impl UsageRecorder {
    /// Starts the writer. `interval` is how often pending usage is written.
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> (UsageRecorder, UsageWorker) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let recorder = UsageRecorder { tx };
        let handle = tokio::spawn(run(store, rx, interval));
        (recorder.clone(), UsageWorker { recorder, handle })
    }

    /// Never waits. When the writer is far behind the note is dropped and said so in the log.
    pub fn record(&self, key_id: KeyId, at: DateTime<Utc>, ip: Option<IpAddr>) {
        if self.tx.try_send(Note::Used { key_id, at, ip }).is_err() {
            metrics::counter!("keyward_usage_dropped_total").increment(1);
            tracing::warn!(%key_id, "usage channel full; a usage note was dropped");
        }
    }

    /// Writes everything recorded so far; returns when it is in the store (or the write failed and
    /// will be retried).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Note::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }
}

impl UsageWorker {
    /// Flushes pending usage and stops the writer (graceful shutdown).
    pub async fn shutdown(self) {
        self.recorder.flush().await;
        drop(self.recorder);
        self.handle.abort();
        let _ = self.handle.await;
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Note>, interval: Duration) {
    let mut pending: HashMap<KeyId, KeyUsage> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = rx.recv() => match note {
                Some(Note::Used { key_id, at, ip }) => {
                    merge(&mut pending, key_id, at, ip);
                    if pending.len() >= MAX_BATCH_KEYS {
                        write(&*store, &mut pending).await;
                    }
                }
                Some(Note::Flush(ack)) => {
                    // Everything sent before the flush request is already merged: the channel is FIFO.
                    write(&*store, &mut pending).await;
                    let _ = ack.send(());
                }
                None => {
                    write(&*store, &mut pending).await;
                    return;
                }
            },
            _ = tick.tick() => write(&*store, &mut pending).await,
        }
    }
}

fn merge(pending: &mut HashMap<KeyId, KeyUsage>, key_id: KeyId, at: DateTime<Utc>, ip: Option<IpAddr>) {
    let ip = ip.map(|ip| ip.to_canonical().to_string());
    let entry = pending.entry(key_id).or_insert_with(|| KeyUsage {
        key_id,
        requests: 0,
        last_used_at: at,
        last_used_ip: ip.clone(),
    });
    entry.requests += 1;
    if at >= entry.last_used_at {
        entry.last_used_at = at;
        if ip.is_some() {
            entry.last_used_ip = ip;
        }
    }
}

async fn write(store: &dyn Store, pending: &mut HashMap<KeyId, KeyUsage>) {
    if pending.is_empty() {
        return;
    }
    let batch: Vec<KeyUsage> = pending.values().cloned().collect();
    let started = std::time::Instant::now();
    match store.record_key_usage(&batch).await {
        Ok(()) => {
            metrics::histogram!("keyward_usage_flush_duration_seconds").record(started.elapsed().as_secs_f64());
            metrics::counter!("keyward_usage_flushed_keys_total").increment(batch.len() as u64);
            pending.clear();
        }
        // Kept and retried at the next tick; pending is bounded by the number of keys in use.
        Err(e) => tracing::error!(error = %e, keys = batch.len(), "writing key usage failed; will retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_counts_and_keeps_the_newest_use() {
        let key = KeyId::new();
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mut pending = HashMap::new();
        merge(&mut pending, key, t0, Some([10, 0, 0, 1].into()));
        merge(&mut pending, key, t0 + chrono::Duration::seconds(5), Some([10, 0, 0, 2].into()));
        merge(&mut pending, key, t0 + chrono::Duration::seconds(1), Some([10, 0, 0, 3].into()));
        let usage = &pending[&key];
        assert_eq!(usage.requests, 3);
        assert_eq!(usage.last_used_at, t0 + chrono::Duration::seconds(5));
        assert_eq!(usage.last_used_ip.as_deref(), Some("10.0.0.2"));
    }
}
