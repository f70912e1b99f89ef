//! Raw usage events exported to files analytics engines read directly: gzip-compressed newline-delimited
//! JSON (`*.ndjson.gz`), one object per event ([`ExportRecord`]). DuckDB, ClickHouse, BigQuery,
//! Snowflake and Spark all read that format as it is, and it needs no columnar library to write.
//!
//! The ledger's writer hands every event it takes from the request path's buffer to an [`Exporter`]
//! ([`Exporter::offer`]: a clone into a bounded queue, never a wait). One thread of its own compresses
//! and writes them, so a slow disk holds up neither the request path nor the store's writes. When the
//! queue holds [`QUEUE_EVENTS`] events the new ones are dropped and counted
//! (`keyward_usage_export_dropped_total`): the export is for analytics, the store keeps the counts.
//!
//! A segment is written as `NAME.ndjson.gz.part`; once it is [`ExportConfig::rotate_after`] old or
//! [`ExportConfig::rotate_bytes`] big (and at shutdown) its gzip stream is finished, the file and the
//! directory are fsynced and it is renamed to `NAME.ndjson.gz`: readers that take `*.ndjson.gz` only
//! ever see complete files. Names start with the segment's opening time (UTC), then the node, then a
//! sequence number, so they sort by time and never collide between nodes sharing a directory or a
//! bucket. Past [`ExportConfig::max_bytes`] in the directory the oldest complete segments are deleted.
//! A crash leaves its `.part` behind, never renamed (its gzip stream has no end).

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;
use keyward_core::{KeyId, OrgId};
use keyward_store::usage::UsageEvent;
use serde::Serialize;
use uuid::Uuid;

use crate::settings::ExportConfig;

/// Events waiting for the export thread, at most: about as many as the ledger holds in memory.
pub const QUEUE_EVENTS: usize = 100_000;
/// How often the export thread looks at the clock when no event comes (time rotation).
const TICK: Duration = Duration::from_secs(1);
const COMPLETE: &str = ".ndjson.gz";
const PART: &str = ".ndjson.gz.part";

/// One line of a segment. The field names are the export's contract with the queries written
/// against it: add fields, never rename one. SECURITY: a key id, never a key or its hash.
#[derive(Debug, Serialize)]
pub struct ExportRecord<'a> {
    pub event_id: Uuid,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// `verify`, `gateway` or `report`.
    pub kind: &'static str,
    pub org_id: OrgId,
    pub key_id: KeyId,
    pub endpoint: Option<&'a str>,
    pub method: Option<&'a str>,
    /// The verify outcome (`VALID`, `RATE_LIMITED`, ...); `null` for reports.
    pub outcome: Option<&'a str>,
    pub status: Option<i32>,
    pub latency_ms: Option<i64>,
    pub tokens: i64,
    pub cost_micros: i64,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<&'a str>,
    pub error_code: Option<&'a str>,
}

impl<'a> ExportRecord<'a> {
    pub fn of(e: &'a UsageEvent) -> Self {
        Self {
            event_id: e.id,
            time: e.at.to_rfc3339_opts(SecondsFormat::Micros, true),
            kind: e.kind.as_str(),
            org_id: e.organization_id,
            key_id: e.key_id,
            endpoint: e.endpoint.as_deref(),
            method: e.method.as_deref(),
            outcome: e.outcome.as_deref(),
            status: e.status_code,
            latency_ms: e.response_time_ms,
            tokens: e.tokens_used,
            cost_micros: e.cost_micros,
            client_ip: e.ip,
            user_agent: e.user_agent.as_deref(),
            error_code: e.error_code.as_deref(),
        }
    }
}

/// The ledger writer's handle on the export thread.
#[derive(Debug)]
pub struct Exporter {
    queue: SyncSender<Vec<UsageEvent>>,
    queued: Arc<AtomicUsize>,
    /// The most events `queued` may reach.
    limit: usize,
    thread: std::thread::JoinHandle<()>,
}

impl Exporter {
    /// Starts the export thread (the directory is created if missing).
    pub fn start(config: ExportConfig) -> std::io::Result<Self> {
        Self::start_bounded(config, QUEUE_EVENTS)
    }

    fn start_bounded(config: ExportConfig, limit: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        // The bound that matters is `queued` (events); this one only caps the number of handovers.
        let (queue, rx) = std::sync::mpsc::sync_channel(limit / 64 + 1);
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = queued.clone();
        let thread = std::thread::Builder::new()
            .name("keyward-usage-export".to_owned())
            .spawn(move || run(Segments::new(config), rx, &counter))?;
        Ok(Self { queue, queued, limit, thread })
    }

    /// Queues a copy of `events` for the files; never waits. Dropped (and counted) when the thread is
    /// [`QUEUE_EVENTS`] behind.
    pub fn offer(&self, events: &[UsageEvent]) {
        if events.is_empty() {
            return;
        }
        let n = events.len();
        let dropped = if self.queued.fetch_add(n, Ordering::AcqRel) + n > self.limit {
            true
        } else {
            self.queue.try_send(events.to_vec()).is_err()
        };
        if dropped {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            metrics::counter!("keyward_usage_export_dropped_total").increment(n as u64);
        }
    }

    /// Writes what is queued, completes the open segment and stops the thread.
    pub async fn close(self) {
        drop(self.queue);
        let thread = self.thread;
        if tokio::task::spawn_blocking(move || thread.join()).await.map_or(true, |joined| joined.is_err()) {
            tracing::error!("the usage export thread failed; its last segment may be left as .part");
        }
    }
}

fn run(mut segments: Segments, rx: Receiver<Vec<UsageEvent>>, queued: &AtomicUsize) {
    loop {
        let done = match rx.recv_timeout(TICK) {
            Ok(events) => {
                queued.fetch_sub(events.len(), Ordering::AcqRel);
                segments.append(&events, Utc::now())
            }
            Err(RecvTimeoutError::Timeout) => segments.tick(Utc::now()),
            Err(RecvTimeoutError::Disconnected) => {
                if let Err(e) = segments.close() {
                    export_failed(&e);
                }
                return;
            }
        };
        if let Err(e) = done {
            export_failed(&e);
        }
    }
}

fn export_failed(e: &std::io::Error) {
    metrics::counter!("keyward_usage_export_errors_total").increment(1);
    tracing::error!(error = %e, "writing the usage export failed");
}

/// Counts the bytes written through it: the compressed size of a segment.
#[derive(Debug)]
struct Counting {
    file: File,
    bytes: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[derive(Debug)]
struct Segment {
    /// The name without its suffix.
    name: String,
    opened: DateTime<Utc>,
    out: GzEncoder<Counting>,
}

/// The segment files of one directory, written by one thread; time is passed in.
#[derive(Debug)]
pub struct Segments {
    config: ExportConfig,
    current: Option<Segment>,
    seq: u64,
    /// One batch's lines, compressed in one call.
    lines: Vec<u8>,
}

impl Segments {
    pub fn new(config: ExportConfig) -> Self {
        Self { config, current: None, seq: 0, lines: Vec::new() }
    }

    /// Appends `events` to the open segment (opening one at `now` if none is), then completes it if
    /// it is old enough or big enough.
    pub fn append(&mut self, events: &[UsageEvent], now: DateTime<Utc>) -> std::io::Result<()> {
        // A segment that could not be completed stays a .part; these events still go to a new one.
        if let Err(e) = self.tick(now) {
            export_failed(&e);
        }
        if events.is_empty() {
            return Ok(());
        }
        self.lines.clear();
        for e in events {
            serde_json::to_writer(&mut self.lines, &ExportRecord::of(e))?;
            self.lines.push(b'\n');
        }
        let opened = match self.current.take() {
            Some(segment) => Ok(segment),
            None => self.open(now),
        };
        let written = opened.and_then(|segment| {
            let segment = self.current.insert(segment);
            segment.out.write_all(&self.lines)
        });
        if let Err(e) = written {
            // A segment that failed is left as it is (.part); the next batch starts a new one.
            self.current = None;
            metrics::counter!("keyward_usage_export_dropped_total").increment(events.len() as u64);
            return Err(e);
        }
        let Some(segment) = &self.current else { return Ok(()) };
        metrics::counter!("keyward_usage_export_events_total").increment(events.len() as u64);
        if segment.out.get_ref().bytes >= self.config.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Completes the open segment if it has been open [`ExportConfig::rotate_after`] at `now`.
    pub fn tick(&mut self, now: DateTime<Utc>) -> std::io::Result<()> {
        let age = chrono::Duration::from_std(self.config.rotate_after).unwrap_or(chrono::TimeDelta::MAX);
        match &self.current {
            Some(segment) if now - segment.opened >= age => self.rotate(),
            _ => Ok(()),
        }
    }

    /// Completes the open segment, if any (graceful shutdown).
    pub fn close(&mut self) -> std::io::Result<()> {
        self.rotate()
    }

    fn open(&mut self, now: DateTime<Utc>) -> std::io::Result<Segment> {
        self.seq += 1;
        let name = format!("usage-{}-{}-{:06}", now.format("%Y%m%dT%H%M%S%.6fZ"), self.config.node, self.seq);
        let file = File::create_new(self.config.dir.join(format!("{name}{PART}")))?;
        Ok(Segment { name, opened: now, out: GzEncoder::new(Counting { file, bytes: 0 }, Compression::default()) })
    }

    /// Finishes the gzip stream, fsyncs, renames `.part` to complete, fsyncs the directory, prunes.
    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(segment) = self.current.take() else { return Ok(()) };
        let file = segment.out.finish()?.file;
        file.sync_all()?;
        drop(file);
        let dir = &self.config.dir;
        std::fs::rename(dir.join(format!("{}{PART}", segment.name)), dir.join(format!("{}{COMPLETE}", segment.name)))?;
        File::open(dir)?.sync_all()?;
        metrics::counter!("keyward_usage_export_segments_total").increment(1);
        self.prune()
    }

    /// Deletes the oldest complete segments while the directory's segments hold more than
    /// [`ExportConfig::max_bytes`].
    fn prune(&self) -> std::io::Result<()> {
        let mut complete: Vec<(String, u64)> = Vec::new();
        let mut total: u64 = 0;
        for entry in std::fs::read_dir(&self.config.dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if !name.ends_with(COMPLETE) && !name.ends_with(PART) {
                continue;
            }
            let len = entry.metadata()?.len();
            total = total.saturating_add(len);
            if name.ends_with(COMPLETE) {
                complete.push((name, len));
            }
        }
        complete.sort();
        let mut deleted: u64 = 0;
        for (name, len) in complete {
            if total <= self.config.max_bytes {
                break;
            }
            remove(&self.config.dir.join(&name))?;
            total = total.saturating_sub(len);
            deleted += 1;
        }
        if deleted > 0 {
            metrics::counter!("keyward_usage_export_deleted_segments_total").increment(deleted);
            tracing::info!(segments = deleted, "usage export: oldest segments deleted past export_max_bytes");
        }
        Ok(())
    }
}

/// A file another node's pruning may have deleted first is gone either way.
fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The complete segments of `dir`, oldest first (what a reader or a shipper takes).
pub fn complete_segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(COMPLETE)))
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use keyward_store::usage::UsageKind;

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    fn config(dir: &Path) -> ExportConfig {
        ExportConfig {
            rotate_after: Duration::from_secs(60),
            rotate_bytes: 1 << 30,
            max_bytes: 1 << 40,
            node: "test-1".to_owned(),
            ..ExportConfig::new(dir.to_path_buf())
        }
    }

    fn events(n: usize) -> Vec<UsageEvent> {
        (0..n)
            .map(|i| {
                let mut e = UsageEvent::new(UsageKind::Verify, KeyId::new(), OrgId::new(), t(0));
                e.outcome = Some("VALID".into());
                e.endpoint = Some(format!("/e{i}"));
                e
            })
            .collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(path).unwrap_or_else(|e| panic!("{e}")))
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{e}"));
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}"))).collect()
    }

    #[test]
    fn a_segment_is_a_part_until_it_is_old_enough_then_complete() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut segments = Segments::new(config(dir.path()));
        segments.append(&events(3), t(0)).unwrap_or_else(|e| panic!("{e}"));
        segments.append(&events(2), t(59)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(dir.path()), ["usage-20270115T080000.000000Z-test-1-000001.ndjson.gz.part"]);
        segments.tick(t(59)).unwrap_or_else(|e| panic!("{e}"));
        assert!(complete_segments(dir.path()).unwrap_or_default().is_empty(), "59 s: still open");
        segments.tick(t(60)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(dir.path()), ["usage-20270115T080000.000000Z-test-1-000001.ndjson.gz"]);
        assert_eq!(lines(&dir.path().join(&names(dir.path())[0])).len(), 5);
        // No event, no segment: idle time opens nothing.
        segments.tick(t(200)).unwrap_or_else(|e| panic!("{e}"));
        segments.close().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(dir.path()).len(), 1);
        // The next events open a segment named for their time, after the first one.
        segments.append(&events(1), t(300)).unwrap_or_else(|e| panic!("{e}"));
        segments.append(&events(1), t(361)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            names(dir.path()),
            [
                "usage-20270115T080000.000000Z-test-1-000001.ndjson.gz",
                "usage-20270115T080500.000000Z-test-1-000002.ndjson.gz",
                "usage-20270115T080601.000000Z-test-1-000003.ndjson.gz.part",
            ]
        );
    }

    #[test]
    fn a_segment_is_completed_once_it_reaches_the_size() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut segments = Segments::new(ExportConfig { rotate_bytes: 1, ..config(dir.path()) });
        for i in 0..3 {
            segments.append(&events(4), t(i)).unwrap_or_else(|e| panic!("{e}"));
        }
        let complete = complete_segments(dir.path()).unwrap_or_default();
        assert_eq!(complete.len(), 3, "{:?}", names(dir.path()));
        assert_eq!(names(dir.path()).len(), 3, "no .part left");
        assert!(complete.iter().all(|p| lines(p).len() == 4));
    }

    #[test]
    fn past_the_directory_bound_the_oldest_complete_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut one = Segments::new(ExportConfig { rotate_bytes: 1, ..config(dir.path()) });
        one.append(&events(10), t(0)).unwrap_or_else(|e| panic!("{e}"));
        let size = std::fs::metadata(&complete_segments(dir.path()).unwrap_or_default()[0]).map_or(0, |m| m.len());
        assert!(size > 0);
        // Room for about two segments of that size: each rotation keeps the newest that fit.
        let mut segments =
            Segments::new(ExportConfig { rotate_bytes: 1, max_bytes: size * 5 / 2, ..config(dir.path()) });
        for i in 1..6 {
            segments.append(&events(10), t(i)).unwrap_or_else(|e| panic!("{e}"));
        }
        let left = names(dir.path());
        assert_eq!(
            left,
            [
                "usage-20270115T080004.000000Z-test-1-000004.ndjson.gz",
                "usage-20270115T080005.000000Z-test-1-000005.ndjson.gz"
            ]
        );
    }

    #[test]
    fn closing_completes_the_open_segment() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut segments = Segments::new(config(dir.path()));
        segments.append(&events(7), t(0)).unwrap_or_else(|e| panic!("{e}"));
        segments.close().unwrap_or_else(|e| panic!("{e}"));
        let complete = complete_segments(dir.path()).unwrap_or_default();
        assert_eq!(names(dir.path()).len(), 1);
        assert_eq!(lines(&complete[0]).len(), 7);
    }

    /// The exporter's thread writes what it was offered and completes its segment when closed.
    #[tokio::test]
    async fn the_exporter_writes_what_it_is_offered_and_completes_on_close() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let exporter = Exporter::start(config(&dir.path().join("new"))).unwrap_or_else(|e| panic!("{e}"));
        let sent = events(25);
        exporter.offer(&sent[..20]);
        exporter.offer(&sent[20..]);
        exporter.close().await;
        let complete = complete_segments(&dir.path().join("new")).unwrap_or_default();
        assert_eq!(complete.len(), 1);
        let ids: Vec<String> =
            lines(&complete[0]).iter().map(|l| l["event_id"].as_str().unwrap_or_default().to_owned()).collect();
        assert_eq!(ids, sent.iter().map(|e| e.id.to_string()).collect::<Vec<_>>());
    }

    /// Past the queue's bound the export drops what it is offered; what fits is still written.
    #[tokio::test]
    async fn the_exporter_drops_past_its_bound_and_keeps_what_fits() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let exporter = Exporter::start_bounded(config(dir.path()), 10).unwrap_or_else(|e| panic!("{e}"));
        exporter.offer(&events(11));
        exporter.offer(&events(6));
        exporter.close().await;
        let complete = complete_segments(dir.path()).unwrap_or_default();
        assert_eq!(complete.iter().map(|p| lines(p).len()).sum::<usize>(), 6);
    }

    /// The field names are the export's contract; a key's secret or hash is never one of them.
    #[test]
    fn a_line_has_the_documented_fields_and_nothing_else() {
        let mut e = events(1).remove(0);
        e.ip = Some([203, 0, 113, 7].into());
        e.status_code = Some(200);
        let line = serde_json::to_value(ExportRecord::of(&e)).unwrap_or_default();
        let mut fields: Vec<&str> =
            line.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "client_ip",
                "cost_micros",
                "endpoint",
                "error_code",
                "event_id",
                "key_id",
                "kind",
                "latency_ms",
                "method",
                "org_id",
                "outcome",
                "status",
                "time",
                "tokens",
                "user_agent",
            ]
        );
        assert_eq!(line["time"], "2027-01-15T08:00:00.000000Z");
        assert_eq!(line["client_ip"], "203.0.113.7");
        assert_eq!(line["kind"], "verify");
    }
}
