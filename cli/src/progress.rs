//! Progress on stderr for work that takes more than a moment, on a
//! terminal or not: a line per step, and a line every few seconds while a
//! step lasts.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mmu_vmm::units;

/// How often a step that goes on is reported again.
const EVERY: Duration = Duration::from_secs(5);

/// Reports what is going on until dropped.
#[derive(Debug)]
pub(crate) struct Ticker {
    label: String,
    step: Arc<Mutex<String>>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts reporting on `label`.
    pub(crate) fn start(label: &str) -> Ticker {
        let step = Arc::new(Mutex::new(String::from("running")));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = {
            let (label, step) = (label.to_string(), Arc::clone(&step));
            std::thread::spawn(move || {
                let started = Instant::now();
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY) {
                    let now = step.lock().map(|s| s.clone()).unwrap_or_default();
                    eprintln!(
                        "mmu-vmm: {label}: {now} ({} so far)",
                        units::duration(started.elapsed())
                    );
                }
            })
        };
        Ticker {
            label: label.to_string(),
            step,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Reports a new step now.
    pub(crate) fn step(&self, what: &str) {
        if let Ok(mut step) = self.step.lock() {
            what.clone_into(&mut step);
        }
        eprintln!("mmu-vmm: {}: {what}", self.label);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
