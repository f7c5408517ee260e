//! `mailroom saga`: operators' view of saga instances, straight on their store (the embedded store's
//! directory, or PostgreSQL): list them by status, show one, read its history, retry or abandon a
//! stuck one.
//!
//! Retry and abandon are versioned transitions written to the store, like any other: a running
//! orchestrator's deadline scan sees a retried instance due now and re-sends its compensation; an
//! abandoned one is never touched again. The embedded store may be open in the orchestrator's
//! process at the same time (its log is shared under a file lock).

use clap::{Args, Subcommand};
use mailroom::saga::{ops, EmbeddedSagaStore, HistoryEntry, ListFilter, PgSagaStore, SagaRow, SagaStore, Status};
use serde_json::{json, Value};
use std::path::PathBuf;

type BoxError = Box<dyn std::error::Error>;

/// Longest error text shown in a `list` table cell (the full text is in `show` and `--json`).
const ERROR_COLUMN: usize = 60;

/// Flags of `mailroom saga`.
#[derive(Args)]
pub struct SagaArgs {
    /// The embedded saga store's directory.
    #[arg(
        long,
        env = "MAILROOM_SAGA_STORE",
        conflicts_with = "database_url",
        required_unless_present = "database_url"
    )]
    store: Option<PathBuf>,
    /// PostgreSQL database holding `saga_instances` and `saga_history` (postgres://user@host:port/db).
    #[arg(long, env = "MAILROOM_SAGA_DATABASE_URL")]
    database_url: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SagaCommand,
}

#[derive(Subcommand)]
enum SagaCommand {
    /// List instances, oldest first.
    List {
        /// Only this status (running, compensating, done, failed, stuck, abandoned).
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Only this saga (by name).
        #[arg(long)]
        name: Option<String>,
        /// Show at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One instance: status, step, version, attempts, error and data.
    Show {
        /// The instance id.
        id: String,
    },
    /// An instance's history, oldest first.
    History {
        /// The instance id.
        id: String,
    },
    /// Retry a stuck saga's compensation (its orchestrator re-sends it on its next deadline scan).
    Retry {
        /// The instance id.
        id: String,
    },
    /// Give up on a stuck saga: it ends Abandoned and nothing more is sent.
    Abandon {
        /// The instance id.
        id: String,
    },
}

fn parse_status(s: &str) -> Result<Status, String> {
    let all = [Status::Running, Status::Compensating, Status::Done, Status::Failed, Status::Stuck, Status::Abandoned];
    all.into_iter().find(|st| st.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
        format!("unknown status {s:?} (one of {})", all.map(|st| st.as_str().to_ascii_lowercase()).join(", "))
    })
}

/// Runs one `mailroom saga` command.
pub async fn run(args: SagaArgs) -> Result<(), BoxError> {
    let store: Box<dyn SagaStore> = match (&args.store, &args.database_url) {
        (Some(dir), _) => {
            if !dir.join(mailroom::saga::embedded::LOG_FILE).exists() {
                return Err(
                    format!("no saga store in {} (no {})", dir.display(), mailroom::saga::embedded::LOG_FILE).into()
                );
            }
            Box::new(EmbeddedSagaStore::open(dir)?)
        }
        (None, Some(url)) => Box::new(PgSagaStore::connect(url).await?),
        (None, None) => return Err("give --store DIR or --database-url URL".into()),
    };
    let store = &*store;
    match args.command {
        SagaCommand::List { status, name, limit } => {
            let rows = ops::list(store, &ListFilter { name, status, limit }).await?;
            if args.json {
                print_json(&Value::Array(rows.iter().map(row_json).collect()))?;
            } else {
                print!("{}", list_table(&rows));
            }
        }
        SagaCommand::Show { id } => {
            let row = ops::show(store, &id).await?;
            if args.json {
                print_json(&row_json(&row))?;
            } else {
                print!("{}", show_text(&row));
            }
        }
        SagaCommand::History { id } => {
            ops::show(store, &id).await?; // "no saga X" rather than an empty history
            let history = store.history(&id).await?;
            if args.json {
                print_json(&Value::Array(history.iter().map(history_json).collect()))?;
            } else {
                print!("{}", history_table(&history));
            }
        }
        SagaCommand::Retry { id } => {
            ops::retry(store, &id).await?;
            report(store, &id, args.json, "its orchestrator re-sends the compensation on its next deadline scan")
                .await?;
        }
        SagaCommand::Abandon { id } => {
            ops::abandon(store, &id).await?;
            report(store, &id, args.json, "nothing more will be sent for it").await?;
        }
    }
    Ok(())
}

/// After an operator action: the instance's new status and version.
async fn report(store: &dyn SagaStore, id: &str, json: bool, what_next: &str) -> Result<(), BoxError> {
    let row = ops::show(store, id).await?;
    if json {
        print_json(&json!({ "id": row.id, "status": row.status.as_str(), "version": row.version }))?;
    } else {
        println!("saga {}: {} (version {}); {what_next}", row.id, row.status, row.version);
    }
    Ok(())
}

fn print_json(v: &Value) -> Result<(), BoxError> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn row_json(r: &SagaRow) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "status": r.status.as_str(),
        "step": r.step,
        "version": r.version,
        "attempts": r.attempts,
        "pending": r.pending,
        "error": r.error,
        "deadline": r.deadline_ms.map(timestamp),
        "created": timestamp(r.created_ms),
        "updated": timestamp(r.updated_ms),
        // The saga's own JSON data, as an object where it parses.
        "data": serde_json::from_str::<Value>(&r.data).unwrap_or_else(|_| Value::String(r.data.clone())),
    })
}

fn history_json(h: &HistoryEntry) -> Value {
    json!({ "at": timestamp(h.at_ms), "at_ms": h.at_ms, "event": h.event })
}

fn list_table(rows: &[SagaRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.name.clone(),
                r.status.to_string(),
                r.step.to_string(),
                r.version.to_string(),
                r.attempts.to_string(),
                timestamp(r.updated_ms),
                r.error.as_deref().map(|e| short(e, ERROR_COLUMN)).unwrap_or_default(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATUS", "STEP", "VERSION", "ATTEMPTS", "UPDATED", "ERROR"], &body)
}

fn history_table(history: &[HistoryEntry]) -> String {
    let body: Vec<Vec<String>> = history.iter().map(|h| vec![timestamp(h.at_ms), h.event.clone()]).collect();
    table(&["TIME", "EVENT"], &body)
}

fn show_text(r: &SagaRow) -> String {
    let lines = [
        ("id", r.id.clone()),
        ("name", r.name.clone()),
        ("status", r.status.to_string()),
        ("step", r.step.to_string()),
        ("version", r.version.to_string()),
        ("attempts", r.attempts.to_string()),
        ("pending", r.pending.clone().unwrap_or_else(|| "-".into())),
        ("deadline", r.deadline_ms.map(timestamp).unwrap_or_else(|| "-".into())),
        ("created", timestamp(r.created_ms)),
        ("updated", timestamp(r.updated_ms)),
        ("error", r.error.clone().unwrap_or_else(|| "-".into())),
        ("data", r.data.clone()),
    ];
    lines.iter().map(|(k, v)| format!("{:<9} {v}\n", format!("{k}:"))).collect()
}

/// Left-aligned columns separated by two spaces, a header line first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `text` cut to `max` characters (an ellipsis marks the cut), on one line.
fn short(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-11-25T21:05:27.123Z`).
fn timestamp(ms: i64) -> String {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(timestamp(1_795_036_527_456), "2026-11-18T21:15:27.456Z");
    }

    #[test]
    fn statuses_parse_in_any_case() {
        assert_eq!(parse_status("stuck"), Ok(Status::Stuck));
        assert_eq!(parse_status("Compensating"), Ok(Status::Compensating));
        assert!(parse_status("lost").unwrap_err().contains("one of running, compensating"));
    }

    #[test]
    fn tables_align_columns_and_cut_long_errors() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
        assert_eq!(short("abcdef", 4), "abc…");
        assert_eq!(short("a\nb", 10), "a b");
    }
}
