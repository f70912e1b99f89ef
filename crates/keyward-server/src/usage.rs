//! The usage ledger's write path. The request path drops a [`UsageEvent`] into a shared in-memory
//! buffer (a short mutex push, never an await, never the database) and moves on; one background task
//! writes the buffer in batches, by size ([`UsageConfig::batch_size`] wakes it early) and by time
//! ([`UsageConfig::flush_interval`], 1 s by default), one store transaction per batch
//! ([`keyward_store::UsageStore::record_usage_batch`]: events, quota counters and the batch's pending
//! rollup rows together). Up to [`UsageConfig::concurrent_batches`] batches are written at once: batches
//! commute (they append, and quota counters add), each store locks quota rows in subject order so two
//! of them cannot deadlock, and one batch gets its statements ready while the other holds the
//! database. Every [`UsageConfig::fold_interval`] (10 s by default), and on every flush, the writer
//! folds the pending rows into the daily rollups and the keys' counters
//! ([`keyward_store::UsageStore::fold_usage`]): with many keys in use, one fold in key order costs a
//! fraction of what upserting each batch's keys in place did.
//!
//! Nothing is dropped silently:
//! - **Store errors**: the batch stays in memory and is retried with exponential backoff
//!   ([`UsageConfig::retry_initial`] doubling up to [`UsageConfig::retry_max`]).
//! - **Long outages**: past [`UsageConfig::max_buffered`] events in memory, the oldest are appended to
//!   a local append-only file ([`UsageConfig::spill_path`], JSON lines, fsynced) and replayed once the
//!   store answers again, also by the next process that starts with the same file.
//! - **Counted once**: a batch, once formed, is never split nor merged with other events: retried whole,
//!   spilled as one group of lines (each tagged with the batch's id) and replayed as that group. The
//!   store records each batch's id ([`keyward_store::usage::batch_id`], made from its events' ids) with
//!   the batch and skips a batch it has seen, so a retry after a commit whose answer was lost, or a
//!   replay after a crash mid-replay, counts nothing twice, with or without raw event rows
//!   ([`UsageConfig::raw_events`]).
//! - **Graceful shutdown** ([`UsageWorker::shutdown`], after axum's graceful shutdown) writes
//!   everything; if the store cannot be reached within [`UsageConfig::shutdown_timeout`], what is left
//!   goes to the spill file.
//! - **A crash** (`kill -9`) loses what was recorded since the last flush: at most one flush interval
//!   (plus, during an outage, the events held in memory below the spill bound).
//!
//! Keys' use as *callers* of Keyward's own API (`total_requests`, `last_used_*` of a management key)
//! is merged per key ([`UsageRecorder::record_key_use`]) and written after each batch, outside the
//! ledger: it is not a billable event.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyward_core::{Clock, KeyId};
use keyward_limit::{LimitError, QuotaSeed};
use keyward_store::usage::{BATCH_ID_WINDOW, RawEvents, UsageEvent, batch_id, month_of};
use keyward_store::{KeyUsage, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use crate::settings::UsageConfig;

enum Control {
    Flush(oneshot::Sender<bool>),
    Shutdown(oneshot::Sender<()>),
}

/// What the request path hands the writer. Events go into chunks of [`CHUNK`]: a full chunk is set
/// aside whole and the next one is a chunk the writer emptied before, so recording never moves the
/// events already buffered. (One growing vector did: when the writer fell behind, the request that
/// found it full copied every buffered event to a larger one, megabytes, holding the lock.)
#[derive(Debug, Default)]
struct Buffer {
    /// The chunk being filled.
    events: Vec<UsageEvent>,
    /// Full chunks, oldest first.
    full: Vec<Vec<UsageEvent>>,
    /// Empty chunks, handed back by the writer.
    free: Vec<Vec<UsageEvent>>,
    uses: HashMap<KeyId, KeyUse>,
}

impl Buffer {
    /// Events recorded since the writer last took them: every full chunk holds exactly [`CHUNK`].
    fn len(&self) -> usize {
        self.full.len() * CHUNK + self.events.len()
    }
}

/// Events per chunk of the buffer.
const CHUNK: usize = 1_024;
/// Empty chunks kept for reuse: room for a few default batches, not for a burst's worth (hundreds of
/// MB), which is freed.
const SPARE_CHUNKS: usize = 20;

/// A caller key's use, merged: no text (the address is formatted when it is written).
#[derive(Debug, Clone, Copy, PartialEq)]
struct KeyUse {
    requests: i64,
    last_used_at: DateTime<Utc>,
    last_used_ip: Option<IpAddr>,
}

impl KeyUse {
    /// Adds `requests` uses, the last at `at` from `ip`: the newest use (with an address) wins.
    fn add(&mut self, requests: i64, at: DateTime<Utc>, ip: Option<IpAddr>) {
        self.requests = self.requests.saturating_add(requests);
        if at >= self.last_used_at {
            self.last_used_at = at;
            if ip.is_some() {
                self.last_used_ip = ip;
            }
        }
    }

    fn to_store(self, key_id: KeyId) -> KeyUsage {
        KeyUsage {
            key_id,
            requests: self.requests,
            last_used_at: self.last_used_at,
            last_used_ip: self.last_used_ip.map(|ip| ip.to_string()),
        }
    }
}

#[derive(Debug)]
struct Shared {
    buffer: Mutex<Buffer>,
    wake: Notify,
    batch_size: usize,
}

/// The request path's handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct UsageRecorder {
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
}

/// The background writer; await [`UsageWorker::shutdown`] to write everything pending.
#[derive(Debug)]
pub struct UsageWorker {
    control: mpsc::UnboundedSender<Control>,
    handle: JoinHandle<()>,
}

impl UsageRecorder {
    /// Starts the writer with the default settings, flushing every `interval`, spilling (only if ever
    /// needed) to a file of its own in the temp directory.
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> (UsageRecorder, UsageWorker) {
        Self::spawn_with(store, UsageConfig { flush_interval: interval, ..UsageConfig::default() })
    }

    pub fn spawn_with(store: Arc<dyn Store>, config: UsageConfig) -> (UsageRecorder, UsageWorker) {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            wake: Notify::new(),
            batch_size: config.batch_size.max(1),
        });
        let (control, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(Writer::new(store, shared.clone(), config).run(rx));
        (UsageRecorder { shared, control: control.clone() }, UsageWorker { control, handle })
    }

    /// Never waits on I/O. SECURITY: an event holds a key id, never a key.
    pub fn record(&self, event: UsageEvent) {
        let len = {
            let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            if buffer.events.capacity() == 0 {
                buffer.events = buffer.free.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
            }
            buffer.events.push(event);
            if buffer.events.len() >= CHUNK {
                let chunk = std::mem::take(&mut buffer.events);
                buffer.full.push(chunk);
            }
            buffer.len()
        };
        if len % self.shared.batch_size == 0 {
            self.shared.wake.notify_one();
        }
    }

    /// A key used as a caller of Keyward's own API: counted in `total_requests`/`last_used_*` only.
    pub fn record_key_use(&self, key_id: KeyId, at: DateTime<Utc>, ip: Option<IpAddr>) {
        let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
        merge(&mut buffer.uses, key_id, at, ip);
    }

    /// Writes everything recorded so far (and any spilled events); `true` when all of it is in the
    /// store, `false` when the store failed (the events are kept and retried).
    pub async fn flush(&self) -> bool {
        let (ack, done) = oneshot::channel();
        if self.control.send(Control::Flush(ack)).is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }
}

impl UsageWorker {
    /// Writes everything pending and stops the writer (graceful shutdown). Past the shutdown timeout,
    /// what the store did not take is in the spill file.
    pub async fn shutdown(self) {
        let (ack, done) = oneshot::channel();
        if self.control.send(Control::Shutdown(ack)).is_ok() {
            let _ = done.await;
        }
        let _ = self.handle.await;
    }
}

struct Writer {
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    config: UsageConfig,
    /// Batches that were attempted and failed, oldest first: written (or spilled) whole, before
    /// `pending`, so that each keeps the id it may already be stored under.
    retry: VecDeque<Vec<UsageEvent>>,
    /// Oldest first; batches are taken from the front.
    pending: VecDeque<UsageEvent>,
    uses: HashMap<KeyId, KeyUse>,
    /// Whether the spill file may hold events not yet replayed.
    spilled: bool,
    /// After a failure: no attempt before this, and the next delay.
    retry_at: Option<Instant>,
    delay: Duration,
    /// No fold before this, unless asked for one.
    next_fold: Instant,
    /// Every event drained is offered to it ([`crate::export`]), whatever the store keeps.
    export: Option<crate::export::Exporter>,
}

impl Writer {
    fn new(store: Arc<dyn Store>, shared: Arc<Shared>, config: UsageConfig) -> Self {
        let spilled = std::fs::metadata(&config.spill_path).is_ok_and(|m| m.len() > 0);
        if spilled {
            tracing::warn!(path = %config.spill_path.display(), "usage spill file found; replaying it");
        }
        let delay = config.retry_initial;
        let next_fold = Instant::now() + config.fold_interval;
        let export = config.export.clone().and_then(|c| {
            crate::export::Exporter::start(c).map_err(|e| tracing::error!(error = %e, "usage export off")).ok()
        });
        Self {
            store,
            shared,
            config,
            retry: VecDeque::new(),
            pending: VecDeque::new(),
            uses: HashMap::new(),
            spilled,
            retry_at: None,
            delay,
            next_fold,
            export,
        }
    }

    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) {
        let mut tick = tokio::time::interval(self.config.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let request = tokio::select! {
                _ = tick.tick() => None,
                _ = self.shared.wake.notified() => None,
                c = control.recv() => Some(c),
            };
            self.drain();
            match request {
                None => {
                    if self.retry_at.is_none_or(|at| Instant::now() >= at) {
                        self.write_all(false).await;
                    }
                }
                Some(Some(Control::Flush(ack))) => {
                    let ok = self.write_all(true).await;
                    // Before the answer, so a caller that saw the flush fail also sees what was spilled.
                    self.spill_excess().await;
                    let _ = ack.send(ok);
                }
                Some(Some(Control::Shutdown(ack))) => {
                    self.shutdown().await;
                    let _ = ack.send(());
                    return;
                }
                Some(None) => {
                    self.shutdown().await;
                    return;
                }
            }
            self.spill_excess().await;
            self.gauge();
        }
    }

    fn drain(&mut self) {
        let (full, filling, uses) = {
            let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut buffer.full), std::mem::take(&mut buffer.events), std::mem::take(&mut buffer.uses))
        };
        let mut emptied = Vec::new();
        for mut chunk in full.into_iter().chain(std::iter::once(filling)) {
            if let Some(export) = &self.export {
                export.offer(&chunk);
            }
            self.pending.extend(chunk.drain(..));
            if chunk.capacity() >= CHUNK {
                emptied.push(chunk);
            }
        }
        if !emptied.is_empty() {
            let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let room = SPARE_CHUNKS.saturating_sub(buffer.free.len());
            buffer.free.extend(emptied.into_iter().take(room));
        }
        for (key_id, u) in uses {
            self.uses.entry(key_id).or_insert(KeyUse { requests: 0, ..u }).add(
                u.requests,
                u.last_used_at,
                u.last_used_ip,
            );
        }
    }

    /// Events held in memory: in batches to retry and not yet batched.
    fn buffered(&self) -> usize {
        self.pending.len() + self.retry.iter().map(Vec::len).sum::<usize>()
    }

    fn gauge(&self) {
        metrics::gauge!("keyward_usage_buffer_events").set(self.buffered() as f64);
    }

    /// Replays the spill file, then writes the pending events batch by batch and the callers' key use,
    /// then folds the rollups if the fold interval has passed (at once with `fold_now`). Stops at the
    /// first failure (kept, retried after the backoff). `true` when nothing is left.
    async fn write_all(&mut self, fold_now: bool) -> bool {
        if self.spilled && !self.replay().await {
            return self.failed();
        }
        if !self.write_pending().await {
            return self.failed();
        }
        if !self.uses.is_empty() {
            let uses: Vec<KeyUsage> = self.uses.iter().map(|(id, u)| u.to_store(*id)).collect();
            if let Err(e) = self.store.record_key_usage(&uses).await {
                tracing::warn!(error = %e, "writing callers' key use failed; will retry");
                return self.failed();
            }
            self.uses.clear();
        }
        if fold_now || Instant::now() >= self.next_fold {
            match self.store.fold_usage().await {
                Ok(rows) => {
                    metrics::counter!("keyward_usage_folded_rows_total").increment(rows);
                    self.next_fold = Instant::now() + self.config.fold_interval;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "folding usage into the rollups failed; will retry");
                    return self.failed();
                }
            }
        }
        self.retry_at = None;
        self.delay = self.config.retry_initial;
        self.gauge();
        true
    }

    fn failed(&mut self) -> bool {
        metrics::counter!("keyward_usage_flush_errors_total").increment(1);
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(self.config.retry_max);
        self.gauge();
        false
    }

    /// Writes the batches to retry, then the pending events in batches, [`UsageConfig::concurrent_batches`]
    /// at a time. After a failure no batch starts; those under way finish, and every failed batch goes
    /// to `retry`, whole and in order (a batch is one transaction: all of it was written, or none, and
    /// written again it must be the same batch). `true` when every batch was written.
    async fn write_pending(&mut self) -> bool {
        let mut under_way = JoinSet::new();
        // The events of each batch under way, kept here too: a batch whose task panicked is not lost.
        let mut batches: HashMap<tokio::task::Id, Arc<Vec<UsageEvent>>> = HashMap::new();
        // Batches that failed, in the order they were formed.
        let mut failed: Vec<(usize, Vec<UsageEvent>)> = Vec::new();
        let mut order: HashMap<tokio::task::Id, usize> = HashMap::new();
        let mut formed = 0;
        let mut ok = true;
        loop {
            while ok
                && under_way.len() < self.config.concurrent_batches.max(1)
                && (!self.retry.is_empty() || !self.pending.is_empty())
            {
                let batch: Arc<Vec<UsageEvent>> = Arc::new(match self.retry.pop_front() {
                    Some(batch) => batch,
                    None => {
                        let n = self.pending.len().min(self.shared.batch_size);
                        self.pending.drain(..n).collect()
                    }
                });
                let (store, events, raw) = (self.store.clone(), batch.clone(), self.config.raw_events);
                let task = under_way.spawn(async move { write_events(&*store, &events, raw).await });
                batches.insert(task.id(), batch);
                order.insert(task.id(), formed);
                formed += 1;
            }
            let (id, written) = match under_way.join_next_with_id().await {
                None => {
                    failed.sort_by_key(|(n, _)| *n);
                    for (_, batch) in failed.into_iter().rev() {
                        self.retry.push_front(batch);
                    }
                    return ok;
                }
                Some(Ok((id, written))) => (id, written),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a usage batch's write task failed; the batch is kept for retry");
                    (e.id(), false)
                }
            };
            let batch = batches.remove(&id);
            if !written {
                ok = false;
                if let Some(batch) = batch {
                    let events = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
                    failed.push((order.get(&id).copied().unwrap_or_default(), events));
                }
            }
        }
    }

    /// Moves the oldest events past the memory bound to the spill file: the batches to retry first
    /// (whole), then pending events, in batches.
    async fn spill_excess(&mut self) {
        let mut excess = self.buffered().saturating_sub(self.config.max_buffered);
        let mut batches = Vec::new();
        while excess > 0 {
            let batch = match self.retry.pop_front() {
                Some(batch) => batch,
                None => {
                    let n = self.pending.len().min(self.shared.batch_size).min(excess);
                    self.pending.drain(..n).collect()
                }
            };
            excess = excess.saturating_sub(batch.len());
            batches.push(batch);
        }
        if !batches.is_empty() {
            self.spill(batches).await;
        }
    }

    /// Everything in memory, as batches: those to retry, then the pending events.
    fn take_all(&mut self) -> Vec<Vec<UsageEvent>> {
        let mut batches: Vec<Vec<UsageEvent>> = std::mem::take(&mut self.retry).into();
        let pending: Vec<UsageEvent> = std::mem::take(&mut self.pending).into();
        batches.extend(pending.chunks(self.shared.batch_size).map(<[UsageEvent]>::to_vec));
        batches
    }

    async fn spill(&mut self, batches: Vec<Vec<UsageEvent>>) {
        let n: usize = batches.iter().map(Vec::len).sum();
        let path = self.config.spill_path.clone();
        let written =
            tokio::task::spawn_blocking(move || append_spill(&path, &batches).map_err(|e| (e, batches))).await;
        match written {
            Ok(Ok(())) => {
                self.spilled = true;
                metrics::counter!("keyward_usage_spilled_events_total").increment(n as u64);
                tracing::warn!(events = n, path = %self.config.spill_path.display(), "store behind: usage events spilled to disk");
            }
            // The disk failed too: the events go back to memory (never dropped), said loudly.
            Ok(Err((e, batches))) => {
                tracing::error!(error = %e, events = n, "spilling usage events failed; keeping them in memory");
                for batch in batches.into_iter().rev() {
                    self.retry.push_front(batch);
                }
            }
            Err(e) => tracing::error!(error = %e, events = n, "spill task failed; events lost"),
        }
    }

    /// Writes the spill file's events; on success empties the file.
    async fn replay(&mut self) -> bool {
        let (path, chunk) = (self.config.spill_path.clone(), self.shared.batch_size);
        let read = tokio::task::spawn_blocking(move || read_spill(&path, chunk)).await;
        let batches = match read {
            Ok(Ok(batches)) => batches,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the usage spill file failed; will retry");
                return false;
            }
            Err(_) => return false,
        };
        for batch in &batches {
            if !write_events(&*self.store, batch, self.config.raw_events).await {
                return false;
            }
        }
        let path = self.config.spill_path.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::File::create(&path).map(drop)).await {
            tracing::error!(error = %e, "emptying the usage spill file failed");
            return false;
        }
        let events: usize = batches.iter().map(Vec::len).sum();
        metrics::counter!("keyward_usage_replayed_events_total").increment(events as u64);
        if events > 0 {
            tracing::info!(events, "usage spill file replayed");
        }
        self.spilled = false;
        true
    }

    async fn shutdown(&mut self) {
        self.drain();
        if let Some(export) = self.export.take() {
            export.close().await;
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        loop {
            if self.write_all(true).await {
                self.gauge();
                return;
            }
            if Instant::now() + self.delay > deadline {
                break;
            }
            tokio::time::sleep(self.delay).await;
            self.drain();
        }
        let left = self.take_all();
        let events: usize = left.iter().map(Vec::len).sum();
        tracing::error!(events, "store unreachable at shutdown: usage events spilled to disk");
        self.spill(left).await;
        self.gauge();
    }
}

async fn write_events(store: &dyn Store, batch: &[UsageEvent], raw: RawEvents) -> bool {
    let started = Instant::now();
    match store.record_usage(batch, raw).await {
        Ok(recorded) => {
            metrics::histogram!("keyward_usage_flush_duration_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("keyward_usage_batch_events").record(batch.len() as f64);
            metrics::counter!("keyward_usage_events_written_total").increment(recorded.inserted);
            metrics::counter!("keyward_usage_duplicates_total").increment(recorded.duplicates);
            true
        }
        Err(e) => {
            crate::telemetry::store_error("usage");
            tracing::warn!(error = %e, events = batch.len(), "writing usage failed; kept for retry");
            false
        }
    }
}

/// A spill file line: an event, tagged with the id of the batch it belongs to. Lines written before
/// batches had ids carry no tag.
#[derive(Serialize)]
struct SpillLine<'a> {
    batch: Uuid,
    #[serde(flatten)]
    event: &'a UsageEvent,
}

#[derive(Deserialize)]
struct SpilledLine {
    #[serde(default)]
    batch: Option<Uuid>,
    #[serde(flatten)]
    event: UsageEvent,
}

/// One line per event, so a torn write loses at most the line it cut.
fn append_spill(path: &Path, batches: &[Vec<UsageEvent>]) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut out = std::io::BufWriter::new(file);
    for events in batches {
        let batch = batch_id(events);
        for event in events {
            serde_json::to_writer(&mut out, &SpillLine { batch, event })?;
            out.write_all(b"\n")?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_data()
}

/// The spill file's batches, in order: consecutive lines of one batch id make a batch; untagged lines
/// (from a version before batch ids) make batches of at most `chunk`, the same ones at every read.
fn read_spill(path: &Path, chunk: usize) -> std::io::Result<Vec<Vec<UsageEvent>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut batches: Vec<(Option<Uuid>, Vec<UsageEvent>)> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<SpilledLine>(line) {
            Ok(SpilledLine { batch, event }) => match batches.last_mut() {
                Some((tag, events)) if *tag == batch && (batch.is_some() || events.len() < chunk.max(1)) => {
                    events.push(event)
                }
                _ => batches.push((batch, vec![event])),
            },
            // Only a line cut short by a crash mid-write can be broken; it was never acknowledged.
            Err(e) => tracing::error!(error = %e, "skipping a broken line of the usage spill file"),
        }
    }
    Ok(batches.into_iter().map(|(_, events)| events).collect())
}

fn merge(pending: &mut HashMap<KeyId, KeyUse>, key_id: KeyId, at: DateTime<Utc>, ip: Option<IpAddr>) {
    let ip = ip.map(|ip| ip.to_canonical());
    pending.entry(key_id).or_insert(KeyUse { requests: 0, last_used_at: at, last_used_ip: ip }).add(1, at, ip);
}

/// The durable monthly quota counts, read by the limiters the first time they see a subject's month
/// (after a start, or when Redis has no counter). The usage writer keeps them current.
#[derive(Debug, Clone)]
pub struct StoreQuotaSeed {
    store: Arc<dyn Store>,
}

impl StoreQuotaSeed {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl QuotaSeed for StoreQuotaSeed {
    async fn used_in_month(&self, subject: &str, month_start: DateTime<Utc>) -> Result<u64, LimitError> {
        let used =
            self.store.quota_used(subject, &month_of(month_start)).await.map_err(|e| LimitError::Seed(e.into()))?;
        Ok(u64::try_from(used).unwrap_or(0))
    }
}

/// Deletes raw usage events older than `retention`, every `every`, in steps of 10,000 rows (short
/// write transactions), and the ids of batches older than [`BATCH_ID_WINDOW`]. Rollups stay.
pub fn spawn_pruner(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention: chrono::Duration,
    every: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = clock.now();
            let _ = prune_once(&*store, now - retention).await;
            if let Err(e) = store.prune_usage_batches(now - BATCH_ID_WINDOW).await {
                tracing::warn!(error = %e, "pruning usage batch ids failed; will retry");
            }
        }
    })
}

/// One pruning pass; returns how many events were deleted.
pub async fn prune_once(store: &dyn Store, before: DateTime<Utc>) -> u64 {
    let mut total: u64 = 0;
    loop {
        match store.prune_usage_events(before, 10_000).await {
            Ok(0) => break,
            Ok(n) => total = total.saturating_add(n),
            Err(e) => {
                tracing::warn!(error = %e, "pruning usage events failed; will retry");
                break;
            }
        }
    }
    if total > 0 {
        metrics::counter!("keyward_usage_pruned_events_total").increment(total);
        tracing::info!(events = total, "pruned usage events past the retention");
    }
    total
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
        assert_eq!(usage.last_used_ip, Some([10, 0, 0, 2].into()));
    }

    #[test]
    fn a_spill_line_written_before_the_typed_fields_still_reads() {
        // Outcome, address and quota subject were strings; the JSON is the same.
        let line = r#"{"id":"01a208fc-4968-77d5-b584-cf06f1104265","key_id":"01a208fc-4968-77d5-b584-cf06f1104266","organization_id":"01a208fc-4966-7023-bde4-4fb287c73bbd","at":"2026-11-23T15:18:28.325211Z","kind":"verify","outcome":"VALID","endpoint":null,"method":null,"status_code":null,"response_time_ms":null,"tokens_used":0,"cost_micros":0,"ip":"203.0.113.7","user_agent":"curl/8.5","error_code":null,"error_message":null,"idempotency_id":null,"quota_subject":"quota:org:01a208fc-4966-7023-bde4-4fb287c73bbd","quota_units":1}"#;
        let e: UsageEvent = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.outcome.as_deref(), Some("VALID"));
        assert_eq!(e.ip, Some(IpAddr::from([203, 0, 113, 7])));
        assert_eq!(e.quota_subject, Some(keyward_store::usage::QuotaSubject::Org(e.organization_id)));
        let again: UsageEvent =
            serde_json::from_str(&serde_json::to_string(&e).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, e);
    }

    /// Recording fills chunks and never moves what it buffered; the writer takes every event in the
    /// order it was recorded and hands the emptied chunks back for the next events.
    #[tokio::test]
    async fn the_buffer_hands_over_events_in_order_and_reuses_its_chunks() {
        let store = keyward_store::open("sqlite::memory:", true).await.unwrap_or_else(|e| panic!("{e}"));
        let shared = Arc::new(Shared { buffer: Mutex::new(Buffer::default()), wake: Notify::new(), batch_size: 5_000 });
        let (control, _rx) = mpsc::unbounded_channel();
        let recorder = UsageRecorder { shared: shared.clone(), control };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = UsageConfig::new(Duration::from_secs(1), dir.path().join("spill"));
        let mut writer = Writer::new(store, shared.clone(), config);
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let kind = keyward_store::usage::UsageKind::Verify;
        let mut recorded = Vec::new();
        for _ in 0..2 {
            for _ in 0..CHUNK * 5 / 2 {
                let e = UsageEvent::new(kind, KeyId::new(), keyward_core::OrgId::new(), at);
                recorded.push(e.id);
                recorder.record(e);
            }
            {
                let buffer = shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
                assert_eq!((buffer.full.len(), buffer.events.len(), buffer.len()), (2, CHUNK / 2, CHUNK * 5 / 2));
                assert!(buffer.full.iter().all(|c| c.capacity() == CHUNK), "no chunk grew");
                assert!(buffer.free.is_empty(), "the second round filled the chunks the first one emptied");
            }
            writer.drain();
            assert_eq!(shared.buffer.lock().unwrap_or_else(|p| p.into_inner()).free.len(), 3);
        }
        let taken: Vec<_> = writer.pending.iter().map(|e| e.id).collect();
        assert_eq!(taken, recorded);
    }

    /// A temporary directory, a spill file's path in it, and `n` verifications.
    fn spill_fixture(n: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<UsageEvent>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("spill.jsonl");
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let kind = keyward_store::usage::UsageKind::Verify;
        let events = (0..n).map(|_| UsageEvent::new(kind, KeyId::new(), keyward_core::OrgId::new(), at)).collect();
        (dir, path, events)
    }

    #[test]
    fn spilled_events_read_back_and_a_torn_last_line_is_skipped() {
        let (dir, path, events) = spill_fixture(3);
        append_spill(&path, &[events[..2].to_vec()]).unwrap_or_else(|e| panic!("{e}"));
        append_spill(&path, &[events[2..].to_vec()]).unwrap_or_else(|e| panic!("{e}"));
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap_or_else(|e| panic!("{e}"));
        f.write_all(b"{\"id\":\"trunc").unwrap_or_else(|e| panic!("{e}"));
        // Each batch comes back whole, as it was spilled, whatever the chunk size.
        assert_eq!(read_spill(&path, 1).unwrap_or_default(), vec![events[..2].to_vec(), events[2..].to_vec()]);
        assert!(read_spill(&dir.path().join("none"), 10).unwrap_or_default().is_empty());
    }

    #[test]
    fn untagged_spill_lines_replay_in_the_same_chunks_every_time() {
        let (_dir, path, events) = spill_fixture(5);
        let legacy: String = events.iter().map(|e| serde_json::to_string(e).unwrap_or_default() + "\n").collect();
        std::fs::write(&path, legacy).unwrap_or_else(|e| panic!("{e}"));
        append_spill(&path, &[events[..1].to_vec()]).unwrap_or_else(|e| panic!("{e}"));
        let read = read_spill(&path, 2).unwrap_or_default();
        let expected = vec![events[..2].to_vec(), events[2..4].to_vec(), events[4..].to_vec(), events[..1].to_vec()];
        assert_eq!(read, expected);
    }
}
