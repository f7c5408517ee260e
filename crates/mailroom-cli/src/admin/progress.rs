//! Progress of long admin operations on stderr: a spinner with the elapsed time (definitions import), and
//! for a redrive the messages moved so far, read from the dead-letter queue's depth while the request
//! runs (the API answers a redrive only when it is done). On a terminal one line is redrawn; elsewhere
//! (`--progress` into a file or pipe) a line is printed every [`LINE_INTERVAL`].

use super::client::Client;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a terminal line is redrawn.
const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// How often the queue's depth is read, and a line printed when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_millis(500);

/// Where progress goes: redrawn on a terminal, line by line when asked for elsewhere, or nowhere.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// stderr is a terminal: one line, redrawn.
    Terminal,
    /// `--progress` without a terminal: a line every [`LINE_INTERVAL`].
    Lines,
    /// Nothing.
    Off,
}

impl Mode {
    /// The mode for this run: `--progress` forces lines when stderr is no terminal.
    pub fn detect(forced: bool) -> Mode {
        if std::io::stderr().is_terminal() {
            Mode::Terminal
        } else if forced {
            Mode::Lines
        } else {
            Mode::Off
        }
    }
}

/// Runs `work`, showing `what` and the elapsed time while it runs.
pub async fn spinner<T>(mode: Mode, what: &str, work: impl Future<Output = T>) -> T {
    if mode == Mode::Off {
        return work.await;
    }
    let started = Instant::now();
    tokio::pin!(work);
    let mut tick = tokio::time::interval(if mode == Mode::Terminal { REDRAW_INTERVAL } else { LINE_INTERVAL });
    let spinner = ['|', '/', '-', '\\'];
    let mut turn = 0;
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => {
                turn += 1;
                let secs = started.elapsed().as_secs_f64();
                show(mode, &format!("{} {what}... {secs:.1} s", spinner[turn % spinner.len()]));
            }
        }
    };
    finish(mode);
    out
}

/// Runs a redrive request (`work`) from the queue at `queue_path` (`/api/queues/{vhost}/{name}`), showing
/// how many messages have left the queue of the `limit` (or all) it held when the redrive began.
pub async fn redrive<T>(
    mode: Mode,
    client: &Client,
    queue_path: &str,
    limit: Option<usize>,
    work: impl Future<Output = T>,
) -> T {
    if mode == Mode::Off {
        return work.await;
    }
    let depth = || async {
        let answer = client.request("GET", queue_path, None).await.ok().flatten();
        answer.and_then(|q| q.get("messages").and_then(|m| m.as_u64()))
    };
    let Some(initial) = depth().await else { return spinner(mode, "redriving", work).await };
    let total = limit.map_or(initial, |l| initial.min(l as u64));
    let started = Instant::now();
    tokio::pin!(work);
    let mut tick = tokio::time::interval(LINE_INTERVAL);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => {
                // Messages published to the queue meanwhile make this an underestimate, never more.
                let moved = depth().await.map_or(0, |now| initial.saturating_sub(now)).min(total);
                let secs = started.elapsed().as_secs_f64();
                let rate = if secs > 0.0 { moved as f64 / secs } else { 0.0 };
                show(mode, &format!("redriving: {moved}/{total} moved, {secs:.1} s, {rate:.0} msg/s"));
            }
        }
    };
    finish(mode);
    out
}

fn show(mode: Mode, line: &str) {
    match mode {
        Mode::Terminal => eprint!("\r\x1b[2K{line}"),
        Mode::Lines => eprintln!("{line}"),
        Mode::Off => {}
    }
    let _ = std::io::stderr().flush();
}

fn finish(mode: Mode) {
    if mode == Mode::Terminal {
        // Clear the line (carriage return, erase to end of line).
        eprint!("\r\x1b[2K");
    }
}
