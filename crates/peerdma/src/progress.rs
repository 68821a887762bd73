//! The progress bar of a long run: shown on stderr only when it is a terminal and the run has lasted over a
//! second of wall time, with simulated time and events per second (`indicatif`). Host-side display only:
//! nothing it does reaches the report, so output stays byte-identical.

use std::io::IsTerminal as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use peerdma_core::SimDuration;
use peerdma_scenario::Progress;

/// The spinner, cleared from the terminal when the run's callback goes away.
struct Bar(ProgressBar);

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Returns a progress callback when stderr is a terminal, else `None` (silent).
pub(crate) fn for_terminal() -> Option<Progress> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "the progress display measures wall time; it never reaches the simulation"
    )]
    let start = Instant::now();
    let bar: Arc<Mutex<Option<Bar>>> = Arc::new(Mutex::new(None));
    Some(Progress(Arc::new(move |now, events| {
        let elapsed = start.elapsed();
        if elapsed < Duration::from_secs(1) {
            return;
        }
        let Ok(mut slot) = bar.lock() else { return };
        let Bar(pb) = slot.get_or_insert_with(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(Duration::from_millis(200));
            Bar(pb)
        });
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let rate = events as f64 / elapsed.as_secs_f64();
        pb.set_message(format!(
            "simulated {}  events {events}  {rate:.0} events/s",
            SimDuration::from_nanos(now.as_nanos())
        ));
    })))
}
