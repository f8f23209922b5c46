//! Capturing what the code under test logs, to check that an operator would see it.

use std::sync::{Arc, Mutex, OnceLock};
pub use tracing_subscriber::fmt::format::FmtSpan;

/// Everything logged at `WARN` and above in this test binary, once [`captured_logs`] installed
/// the subscriber.
#[derive(Debug, Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Captures what this thread logs at `level` and above, with the span events `spans` asks for
/// (`FmtSpan::CLOSE`: a line per closed span), until the guard drops. For code that logs on the
/// test's own thread (a current-thread runtime, a drop): the other tests of the binary, which run
/// at the same time and log into the global subscriber, cannot mix their lines in.
pub fn this_thread_logs(
    level: tracing::Level,
    spans: FmtSpan,
) -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_span_events(spans)
        .with_writer(logs.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (logs, guard)
}

/// Installs (once) a global subscriber that keeps what is logged, fred's `log` records included.
pub fn captured_logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(logs.clone())
            .init();
        logs
    })
}
