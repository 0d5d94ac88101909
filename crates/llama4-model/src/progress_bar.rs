//! A load-progress bar on stderr (feature `progress-bar`): the [`LoadProgress`] observer that
//! `generate` and the server hand to the loaders. The bar is hidden when stderr is not a
//! terminal (a pipe, a log file, a test harness, CI), so their output carries no escape codes.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use llama4_core::LoadProgress;

/// A byte-count bar on stderr, redrawn at most 10 times a second; nothing is drawn unless
/// stderr is a terminal, nor before the first report.
#[derive(Debug)]
pub struct TerminalProgress {
    bar: ProgressBar,
}

impl TerminalProgress {
    /// A bar labelled `label` (`"loading"`, `"loading + quantising q8"`).
    pub fn new(label: &str) -> Self {
        // Hidden until the first report gives the total (a bar of 0 of 0 bytes draws as full).
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        // The template is a constant: a parse failure would be a bug here, so fall back to the
        // default style rather than fail a load over it.
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        TerminalProgress { bar }
    }

    /// Removes the bar from the terminal (call when loading has ended, well or not).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl LoadProgress for TerminalProgress {
    fn update(&self, done: u64, total: u64) {
        if self.bar.length() != Some(total) || self.bar.is_finished() {
            // The first report of a load (a second file, the projector, starts over): from now
            // on the rate and ETA tick on even while one large tensor is being quantised.
            self.bar.reset();
            self.bar.set_length(total);
            self.bar.set_position(done);
            self.bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
            self.bar.enable_steady_tick(Duration::from_millis(200));
        }
        self.bar.set_position(done);
        if done == total {
            // A completed load: clear the line for what the program prints next.
            self.bar.finish_and_clear();
        }
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
