//! The usage ledger's write path. The request path drops a [`UsageEvent`] into a shared in-memory
//! buffer (a short mutex push, never an await, never the database) and moves on; one background task
//! takes the buffer whenever it fills ([`UsageConfig::batch_size`] events wake it) and folds the events
//! into the open batch ([`UsageBatch`]): per (key, UTC day, endpoint) the counts, tokens, cost and
//! latency histogram they add to the rollups, per quota counter the units they spent, and whole only
//! the events that keep a raw row ([`UsageConfig::raw_events`]). Every flush
//! ([`UsageConfig::flush_interval`], 1 s by default) seals the open batch and writes it in one store
//! transaction ([`keyward_store::UsageStore::record_batch`]: its id, its raw rows, the quota counters
//! and one pending rollup row per (key, day, endpoint)), so what the store writes grows with the keys
//! in use per flush, not with the requests. A batch that gathers [`UsageConfig::batch_size`] raw events
//! is sealed and written at once. Up to [`UsageConfig::concurrent_batches`] batches are written at once
//! (after an outage): batches commute (quota counters and pending rows add), and each store locks
//! quota rows in subject order so two of them cannot deadlock. Every [`UsageConfig::fold_interval`]
//! (10 s by default), and on every flush the caller asks for, the writer folds the pending rows into
//! the daily rollups and the keys' counters ([`keyward_store::UsageStore::fold_usage`]), in key order:
//! with many keys in use, one fold touches each rollup page once for ten flushes.
//!
//! Nothing is dropped silently:
//! - **Store errors**: the sealed batch stays in memory and is retried with exponential backoff
//!   ([`UsageConfig::retry_initial`] doubling up to [`UsageConfig::retry_max`]).
//! - **Long outages**: past [`UsageConfig::max_buffered`] events in memory, the oldest batches are
//!   appended to a local append-only file ([`UsageConfig::spill_path`], a JSON line per batch, fsynced)
//!   and replayed once the store answers again, also by the next process that starts with the same file.
//! - **Counted once**: a batch, once sealed, is never split nor merged with another: retried whole,
//!   spilled whole with its id and replayed as it was. Its id is made when the batch is started
//!   (random) and the store records it with the batch, in the same transaction, and skips a batch it
//!   has seen, so a retry after a commit whose answer was lost, or a replay after a crash mid-replay,
//!   counts nothing twice, with or without raw event rows. A raw event stored already (a report's
//!   idempotency id) is not counted again either.
//! - **Graceful shutdown** ([`UsageWorker::shutdown`], after axum's graceful shutdown) writes
//!   everything; if the store cannot be reached within [`UsageConfig::shutdown_timeout`], what is left
//!   goes to the spill file.
//! - **A crash** (`kill -9`) loses what was recorded since the last flush: at most one flush interval
//!   (plus, during an outage, the batches held in memory below the spill bound).
//! - **Export**: every event drained is offered to [`crate::export`] before it is folded, whatever the
//!   store keeps of it.
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
use keyward_store::usage::{BATCH_ID_WINDOW, RawEvents, UsageBatch, UsageEvent, month_of};
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
    /// Every event drained since the batch before was sealed, folded ([`UsageBatch`]): sealed at each
    /// flush, or earlier once it holds [`UsageConfig::batch_size`] raw events.
    open: UsageBatch,
    /// Sealed batches not written yet, oldest first (some may have been attempted): each written (or
    /// spilled) whole under its id, so that it counts once whatever became of an attempt.
    sealed: VecDeque<UsageBatch>,
    uses: HashMap<KeyId, KeyUse>,
    /// Whether the spill file may hold batches not yet replayed.
    spilled: bool,
    /// After a failure: no attempt before this, and the next delay.
    retry_at: Option<Instant>,
    delay: Duration,
    /// No fold before this, unless asked for one.
    next_fold: Instant,
    /// Every event drained is offered to it ([`crate::export`]), whatever the store keeps.
    export: Option<crate::export::Exporter>,
}

/// What woke the writer.
enum Wake {
    /// The flush interval passed: seal the open batch and write.
    Tick,
    /// Events piled up: fold them in (and write batches sealed by size).
    Events,
    Control(Option<Control>),
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
            open: UsageBatch::new(),
            sealed: VecDeque::new(),
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
            let wake = tokio::select! {
                _ = tick.tick() => Wake::Tick,
                _ = self.shared.wake.notified() => Wake::Events,
                c = control.recv() => Wake::Control(c),
            };
            self.drain();
            match wake {
                Wake::Tick => {
                    self.seal();
                    if self.retry_at.is_none_or(|at| Instant::now() >= at) {
                        self.write_all(false).await;
                    }
                }
                // Batches sealed by size (raw events) are written at once, as they fill.
                Wake::Events => {
                    if !self.sealed.is_empty() && self.retry_at.is_none_or(|at| Instant::now() >= at) {
                        self.write_all(false).await;
                    }
                }
                Wake::Control(Some(Control::Flush(ack))) => {
                    self.seal();
                    let ok = self.write_all(true).await;
                    // Before the answer, so a caller that saw the flush fail also sees what was spilled.
                    self.spill_excess().await;
                    let _ = ack.send(ok);
                }
                Wake::Control(Some(Control::Shutdown(ack))) => {
                    self.shutdown().await;
                    let _ = ack.send(());
                    return;
                }
                Wake::Control(None) => {
                    self.shutdown().await;
                    return;
                }
            }
            self.spill_excess().await;
            self.gauge();
        }
    }

    /// Takes the recorded events and folds them into the open batch.
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
            for event in chunk.drain(..) {
                self.open.add(event, self.config.raw_events);
                if self.open.raw.len() >= self.shared.batch_size {
                    self.seal();
                }
            }
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

    /// Closes the open batch (its id is kept from now on) and starts the next one.
    fn seal(&mut self) {
        if !self.open.is_empty() {
            self.sealed.push_back(std::mem::take(&mut self.open));
        }
    }

    /// Events held in memory: sealed and open.
    fn buffered(&self) -> u64 {
        self.sealed.iter().map(UsageBatch::events).sum::<u64>() + self.open.events()
    }

    fn gauge(&self) {
        metrics::gauge!("keyward_usage_buffer_events").set(self.buffered() as f64);
    }

    /// Replays the spill file, then writes the sealed batches and the callers' key use, then folds the
    /// rollups if the fold interval has passed (at once with `fold_now`). Stops at the first failure
    /// (kept, retried after the backoff). `true` when nothing sealed is left.
    async fn write_all(&mut self, fold_now: bool) -> bool {
        if self.spilled && !self.replay().await {
            return self.failed();
        }
        if !self.write_sealed().await {
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

    /// Writes the sealed batches, [`UsageConfig::concurrent_batches`] at a time. After a failure no
    /// batch starts; those under way finish, and every failed batch goes back to `sealed`, whole and
    /// in order (a batch is one transaction: all of it was written, or none, and written again it must
    /// be the same batch). `true` when every batch was written.
    async fn write_sealed(&mut self) -> bool {
        let mut under_way = JoinSet::new();
        // Each batch under way, kept here too: a batch whose task panicked is not lost.
        let mut batches: HashMap<tokio::task::Id, (usize, Arc<UsageBatch>)> = HashMap::new();
        // Batches that failed, in the order they were sealed.
        let mut failed: Vec<(usize, UsageBatch)> = Vec::new();
        let mut started = 0;
        let mut ok = true;
        loop {
            while ok && under_way.len() < self.config.concurrent_batches.max(1) {
                let Some(batch) = self.sealed.pop_front() else { break };
                let batch = Arc::new(batch);
                let (store, task_batch) = (self.store.clone(), batch.clone());
                let task = under_way.spawn(async move { write_batch(&*store, &task_batch).await });
                batches.insert(task.id(), (started, batch));
                started += 1;
            }
            let (id, written) = match under_way.join_next_with_id().await {
                None => {
                    failed.sort_by_key(|(n, _)| *n);
                    for (_, batch) in failed.into_iter().rev() {
                        self.sealed.push_front(batch);
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
                if let Some((n, batch)) = batch {
                    failed.push((n, Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone())));
                }
            }
        }
    }

    /// Moves the oldest batches past the memory bound to the spill file, whole: the sealed ones first,
    /// then the open one (sealed for it).
    async fn spill_excess(&mut self) {
        let mut excess = self.buffered().saturating_sub(self.config.max_buffered as u64);
        let mut batches = Vec::new();
        while excess > 0 {
            if self.sealed.is_empty() {
                self.seal();
            }
            let Some(batch) = self.sealed.pop_front() else { break };
            excess = excess.saturating_sub(batch.events());
            batches.push(batch);
        }
        if !batches.is_empty() {
            self.spill(batches).await;
        }
    }

    /// Everything in memory, as batches: the sealed ones, then the open one.
    fn take_all(&mut self) -> Vec<UsageBatch> {
        self.seal();
        std::mem::take(&mut self.sealed).into()
    }

    async fn spill(&mut self, batches: Vec<UsageBatch>) {
        let n: u64 = batches.iter().map(UsageBatch::events).sum();
        let path = self.config.spill_path.clone();
        let written =
            tokio::task::spawn_blocking(move || append_spill(&path, &batches).map_err(|e| (e, batches))).await;
        match written {
            Ok(Ok(())) => {
                self.spilled = true;
                metrics::counter!("keyward_usage_spilled_events_total").increment(n);
                tracing::warn!(events = n, path = %self.config.spill_path.display(), "store behind: usage events spilled to disk");
            }
            // The disk failed too: the batches go back to memory (never dropped), said loudly.
            Ok(Err((e, batches))) => {
                tracing::error!(error = %e, events = n, "spilling usage events failed; keeping them in memory");
                for batch in batches.into_iter().rev() {
                    self.sealed.push_front(batch);
                }
            }
            Err(e) => tracing::error!(error = %e, events = n, "spill task failed; events lost"),
        }
    }

    /// Writes the spill file's batches; on success empties the file.
    async fn replay(&mut self) -> bool {
        let (path, chunk, keep) = (self.config.spill_path.clone(), self.shared.batch_size, self.config.raw_events);
        let read = tokio::task::spawn_blocking(move || read_spill(&path, chunk, keep)).await;
        let batches = match read {
            Ok(Ok(batches)) => batches,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the usage spill file failed; will retry");
                return false;
            }
            Err(_) => return false,
        };
        for batch in &batches {
            if !write_batch(&*self.store, batch).await {
                return false;
            }
        }
        let path = self.config.spill_path.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::File::create(&path).map(drop)).await {
            tracing::error!(error = %e, "emptying the usage spill file failed");
            return false;
        }
        let events: u64 = batches.iter().map(UsageBatch::events).sum();
        metrics::counter!("keyward_usage_replayed_events_total").increment(events);
        if events > 0 {
            tracing::info!(events, "usage spill file replayed");
        }
        self.spilled = false;
        true
    }

    async fn shutdown(&mut self) {
        self.drain();
        self.seal();
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
            self.seal();
        }
        let left = self.take_all();
        let events: u64 = left.iter().map(UsageBatch::events).sum();
        tracing::error!(events, "store unreachable at shutdown: usage events spilled to disk");
        self.spill(left).await;
        self.gauge();
    }
}

async fn write_batch(store: &dyn Store, batch: &UsageBatch) -> bool {
    let started = Instant::now();
    match store.record_batch(batch).await {
        Ok(recorded) => {
            metrics::histogram!("keyward_usage_flush_duration_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("keyward_usage_batch_events").record(batch.events() as f64);
            metrics::counter!("keyward_usage_events_written_total").increment(recorded.inserted);
            metrics::counter!("keyward_usage_duplicates_total").increment(recorded.duplicates);
            true
        }
        Err(e) => {
            crate::telemetry::store_error("usage");
            tracing::warn!(error = %e, events = batch.events(), "writing usage failed; kept for retry");
            false
        }
    }
}

/// A spill file line: one batch, whole (its folded counts, its raw events, its id). A line cut short
/// by a crash mid-write is skipped whole: its batch was still in memory, never acknowledged.
#[derive(Serialize, Deserialize)]
struct SpillLine<B> {
    fold: B,
}

/// A line of a spill file written before batches were folded: an event, tagged with the id of the
/// batch it belongs to (untagged before batches had ids).
#[derive(Deserialize)]
struct SpilledEvent {
    #[serde(default)]
    batch: Option<Uuid>,
    #[serde(flatten)]
    event: UsageEvent,
}

fn append_spill(path: &Path, batches: &[UsageBatch]) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut out = std::io::BufWriter::new(file);
    for batch in batches {
        serde_json::to_writer(&mut out, &SpillLine { fold: batch })?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_data()
}

/// The spill file's batches, in order. Lines of an older version: consecutive events of one batch id
/// make a batch, untagged ones batches of at most `chunk`, the same ones at every read, each under
/// the id made from its events ([`UsageBatch::of`]), as that version wrote them.
fn read_spill(path: &Path, chunk: usize, keep: RawEvents) -> std::io::Result<Vec<UsageBatch>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    enum Read {
        Batch(UsageBatch),
        Events(Option<Uuid>, Vec<UsageEvent>),
    }
    let mut read: Vec<Read> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(SpillLine { fold }) = serde_json::from_str::<SpillLine<UsageBatch>>(line) {
            read.push(Read::Batch(fold));
            continue;
        }
        match serde_json::from_str::<SpilledEvent>(line) {
            Ok(SpilledEvent { batch, event }) => match read.last_mut() {
                Some(Read::Events(tag, events))
                    if *tag == batch && (batch.is_some() || events.len() < chunk.max(1)) =>
                {
                    events.push(event)
                }
                _ => read.push(Read::Events(batch, vec![event])),
            },
            // Only a line cut short by a crash mid-write can be broken; it was never acknowledged.
            Err(e) => tracing::error!(error = %e, "skipping a broken line of the usage spill file"),
        }
    }
    Ok(read
        .into_iter()
        .map(|r| match r {
            Read::Batch(batch) => batch,
            Read::Events(_, events) => UsageBatch::of(&events, keep),
        })
        .collect())
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

    /// A recorder and its writer on an in-memory store, the writer driven by the test (no task).
    async fn writer_at_hand(
        batch_size: usize,
        raw_events: RawEvents,
    ) -> (tempfile::TempDir, Arc<Shared>, UsageRecorder, Writer) {
        let store = keyward_store::open("sqlite::memory:", true).await.unwrap_or_else(|e| panic!("{e}"));
        let shared = Arc::new(Shared { buffer: Mutex::new(Buffer::default()), wake: Notify::new(), batch_size });
        let (control, _rx) = mpsc::unbounded_channel();
        let recorder = UsageRecorder { shared: shared.clone(), control };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = UsageConfig { raw_events, ..UsageConfig::new(Duration::from_secs(1), dir.path().join("spill")) };
        let writer = Writer::new(store, shared.clone(), config);
        (dir, shared, recorder, writer)
    }

    /// Recording fills chunks and never moves what it buffered; the writer takes every event in the
    /// order it was recorded and hands the emptied chunks back for the next events.
    #[tokio::test]
    async fn the_buffer_hands_over_events_in_order_and_reuses_its_chunks() {
        // Every event kept raw, so the batches hold them whole, in order.
        let (_dir, shared, recorder, mut writer) = writer_at_hand(5_000, RawEvents::All).await;
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
        writer.seal();
        // Sealed at 5,000 raw events (the batch size), then at the seal.
        assert_eq!(writer.sealed.iter().map(|b| b.raw.len()).collect::<Vec<_>>(), vec![5_000, CHUNK * 5 - 5_000]);
        let taken: Vec<_> = writer.sealed.iter().flat_map(|b| b.raw.iter().map(|e| e.id)).collect();
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

    /// A whole flush interval of events over a few keys is one batch of a row per (key, day,
    /// endpoint), however many times the writer was woken to fold them in: what the store writes
    /// grows with the keys, not with the events.
    #[tokio::test]
    async fn a_flush_folds_its_events_into_one_batch_of_a_row_per_key() {
        let (_dir, _shared, recorder, mut writer) = writer_at_hand(100, RawEvents::Denied).await;
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let (keys, org) = ([KeyId::new(), KeyId::new(), KeyId::new()], keyward_core::OrgId::new());
        for round in 0..30 {
            for i in 0..100 {
                let mut e = UsageEvent::new(keyward_store::usage::UsageKind::Verify, keys[i % 3], org, at);
                e.outcome = Some(if i == 0 { "RATE_LIMITED" } else { "VALID" }.into());
                recorder.record(e);
            }
            writer.drain();
            assert!(writer.sealed.is_empty(), "round {round}: sealed only by the flush, or by raw events");
        }
        writer.seal();
        let batch = writer.sealed.pop_front().unwrap_or_default();
        assert!(writer.sealed.is_empty());
        assert_eq!((batch.events(), batch.raw.len()), (3_000, 30), "the refused ones keep a raw row (the default)");
        let fx = batch.effects(&batch.raw);
        assert_eq!(fx.pending.len(), 3, "one row per key");
        assert_eq!(fx.pending.iter().map(|p| p.counts.requests).sum::<i64>(), 3_000);
        assert_eq!(fx.pending.iter().map(|p| p.counts.denied).sum::<i64>(), 30);
    }

    /// Batches of `n` verifications each, of one key and organization.
    fn batches(n: usize, count: usize) -> Vec<UsageBatch> {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let (key, org) = (KeyId::new(), keyward_core::OrgId::new());
        (0..count)
            .map(|b| {
                let mut batch = UsageBatch::new();
                for i in 0..n {
                    let mut e = UsageEvent::new(keyward_store::usage::UsageKind::Verify, key, org, at);
                    e.outcome = Some(if i % 2 == 0 { "VALID" } else { "EXPIRED" }.into());
                    e.endpoint = Some(format!("/e{}", (b + i) % 3));
                    e.quota_subject = Some(keyward_store::usage::QuotaSubject::Org(org));
                    e.quota_units = 2;
                    e.response_time_ms = Some(i as i64);
                    batch.add(e, RawEvents::Denied);
                }
                batch
            })
            .collect()
    }

    #[test]
    fn spilled_batches_read_back_whole_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("spill.jsonl");
        let written = batches(7, 3);
        append_spill(&path, &written[..2]).unwrap_or_else(|e| panic!("{e}"));
        append_spill(&path, &written[2..]).unwrap_or_else(|e| panic!("{e}"));
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap_or_else(|e| panic!("{e}"));
        f.write_all(b"{\"fold\":{\"id\":\"trunc").unwrap_or_else(|e| panic!("{e}"));
        let read = read_spill(&path, 1, RawEvents::Denied).unwrap_or_default();
        assert_eq!(read, written, "each batch comes back whole, with its id, whatever the chunk size");
        assert_eq!(
            read.iter().map(|b| b.effects(&b.raw)).collect::<Vec<_>>(),
            written.iter().map(|b| b.effects(&b.raw)).collect::<Vec<_>>()
        );
        assert!(read_spill(&dir.path().join("none"), 10, RawEvents::Denied).unwrap_or_default().is_empty());
    }

    /// Spill files of versions before the fold (an event a line, tagged with its batch's id, or
    /// untagged before batches had ids) replay as the batches that version would have written.
    #[test]
    fn spill_lines_of_older_versions_replay_in_the_same_batches_every_time() {
        let (_dir, path, events) = spill_fixture(6);
        let mut text: String =
            events[..5].iter().map(|e| serde_json::to_string(e).unwrap_or_default() + "\n").collect();
        let tag = keyward_store::usage::batch_id(&events[5..]);
        let mut tagged = serde_json::to_value(&events[5]).unwrap_or_default();
        tagged["batch"] = serde_json::json!(tag);
        text.push_str(&format!("{tagged}\n"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let folded = batches(2, 1);
        append_spill(&path, &folded).unwrap_or_else(|e| panic!("{e}"));
        let read = read_spill(&path, 2, RawEvents::All).unwrap_or_default();
        let of = |e: &[UsageEvent]| UsageBatch::of(e, RawEvents::All);
        let expected =
            vec![of(&events[..2]), of(&events[2..4]), of(&events[4..5]), of(&events[5..]), folded[0].clone()];
        assert_eq!(read, expected);
        assert_eq!(read[3].id, tag, "a tagged batch keeps the id it may be stored under");
    }
}
