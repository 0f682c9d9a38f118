//! Progress of long work (backup, restore, verify) on a terminal: bytes done, rate and ETA.
//!
//! The binary switches drawing on once, at start, when stderr is a terminal and the output is
//! not `--json` ([`enable`]); everywhere else (systemd, the agent, pipes, tests) a
//! [`Progress`] is a hidden bar that only counts. Logs go through [`LogWriter`], which lifts the
//! bars off the screen for each line, so a log line never tears a bar.
//!
//! Units are raw (uncompressed) bytes everywhere, so a rate means the same for a backup and its
//! restore.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pipeline::Inspect;

static ENABLED: AtomicBool = AtomicBool::new(false);
static MULTI: OnceLock<MultiProgress> = OnceLock::new();

/// Switches drawing on or off for the whole process. Call before any [`Progress`] is made.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)))
}

/// Clears the bar when the last clone of a [`Progress`] goes, also on an error path.
struct Clear(ProgressBar);

impl Drop for Clear {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// One bar. Clones share it: parallel copy tasks each hold one.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    _clear: Arc<Clear>,
}

impl Progress {
    /// A byte counter for `what` ("backup 2026...-F"). With a known `total` it shows a bar with
    /// the percentage and ETA; with `None` (a dump whose size is not known ahead), bytes, rate
    /// and elapsed time.
    pub fn bytes(what: &str, total: Option<u64>) -> Progress {
        let bar = if !enabled() {
            ProgressBar::hidden()
        } else {
            let bar = match total {
                Some(t) => ProgressBar::new(t).with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::no_length().with_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} {bytes} {binary_bytes_per_sec} {elapsed}",
                    )
                    .expect("valid template"),
                ),
            };
            let bar = multi().add(bar);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        };
        bar.set_message(what.to_string());
        if let Some(t) = total {
            bar.set_length(t);
        }
        Progress {
            _clear: Arc::new(Clear(bar.clone())),
            bar,
        }
    }

    /// Counts `n` more bytes done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Bytes counted so far.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// A reader that counts what passes through it.
    pub fn reader<R>(&self, inner: R) -> Inspect<R, impl FnMut(&[u8]) + Send + Unpin + use<R>> {
        let bar = self.bar.clone();
        Inspect::new(inner, move |new: &[u8]| bar.inc(new.len() as u64))
    }
}

/// The log writer: stderr, with the bars lifted off the screen while a line is written.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // tracing's formatter hands over one whole event per write_all.
        match MULTI.get() {
            Some(m) if enabled() => m.suspend(|| std::io::stderr().write_all(buf))?,
            _ => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn counts_bytes_through_readers_and_clones() {
        let p = Progress::bytes("test", Some(10));
        let mut r = p.reader(&b"hello"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        let q = p.clone();
        q.inc(3);
        assert_eq!(p.position(), 8);
    }
}
