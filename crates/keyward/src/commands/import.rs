//! `keyward import`: the keys another system issued, from a JSON Lines or CSV file, into an
//! organization, through the same validation and store method as `POST /v1/keys/import` (see
//! `keyward_server::service::import`), but with no limit on the number of rows.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;
use keyward_server::service::{self, import::ImportFormat};
use keyward_store::Actor;

use keyward_server::App;

use super::open;
use crate::config::Config;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file: `.jsonl`/`.ndjson` (one JSON object per line) or `.csv` (a header line, then rows);
    /// `-` reads standard input (then give --format).
    file: PathBuf,
    /// Organization slug or id.
    #[arg(long, default_value = "default")]
    org: String,
    /// jsonl or csv (default: from the file's extension).
    #[arg(long)]
    format: Option<String>,
    /// Check every row and report what would happen; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON (the same document as `POST /v1/keys/import`).
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Config, args: ImportArgs) -> anyhow::Result<()> {
    let format = match &args.format {
        Some(f) => ImportFormat::parse(f).ok_or_else(|| anyhow!("--format must be jsonl or csv"))?,
        None => ImportFormat::from_path(&args.file)
            .ok_or_else(|| anyhow!("cannot tell the format from the file name: give --format jsonl or csv"))?,
    };
    let mut bytes = Vec::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut bytes).context("reading standard input")?;
    } else {
        bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    }
    let file = service::import::parse(format, &bytes)?;
    drop(bytes);
    let App { state, tasks } = open(&config).await?;
    let result = async {
        let org = service::find_org(&*state.store, &args.org).await?;
        let actor = Actor::cli(state.clock.now());
        let mut progress = Progress::new(!args.json && std::io::stderr().is_terminal());
        let report = service::import::run(&state, org.id, file, &actor, args.dry_run, &mut |done, total| {
            progress.show(done, total)
        })
        .await;
        progress.finish();
        let report = report?;
        if report.imported > 0 {
            // A large import leaves the planner's statistics behind until autovacuum catches up; a
            // search planned meanwhile may read every key.
            state.store.analyze_keys().await?;
        }
        anyhow::Ok((org, report))
    }
    .await;
    tasks.shutdown().await;
    let (org, report) = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run { "Would import" } else { "Imported" };
    println!(
        "{verb} {} keys into {}: {} unchanged (already there), {} rejected, of {} rows.",
        report.imported,
        org.slug,
        report.unchanged,
        report.rejected.len(),
        report.rows
    );
    for row in &report.rejected {
        println!("  line {}: {}", row.line, row.reason);
    }
    if report.dry_run {
        println!("Dry run: nothing was changed.");
    }
    Ok(())
}

/// A one-line progress display on stderr, drawn only on a terminal (never into a log or a pipe).
struct Progress {
    enabled: bool,
    drawn: bool,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self { enabled, drawn: false }
    }

    fn show(&mut self, done: usize, total: usize) {
        if !self.enabled || total == 0 {
            return;
        }
        const WIDTH: usize = 30;
        let filled = done.min(total) * WIDTH / total;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {done}/{total} rows ({}%)",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            done * 100 / total
        );
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}
