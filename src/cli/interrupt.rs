//! Ctrl-C (SIGINT) and SIGTERM during `tcd-ort run`.
//!
//! What a signal does depends on what the run is doing, so that it never leaves a partial file:
//! - loading the model: nothing is written yet, the process exits at once;
//! - generating: the engine stops at the next step (the progress callback returns false), and
//!   the run ends with no output written; a second signal exits at once (still nothing to
//!   clean: outputs exist only once generation is over);
//! - writing: outputs are staged as temporaries; the run removes them instead of committing,
//!   and further signals wait for that (it takes a moment, and exiting half way would leave
//!   temporaries behind).
//!
//! Either way the process exits with 128 + the signal's number (130 for SIGINT, 143 for
//! SIGTERM), as a shell reports a command the signal ended. Signals are watched on Unix only;
//! elsewhere the system's default applies (outputs are still written atomically).

use std::sync::{Mutex, MutexGuard};

/// What the run is doing, which decides what a signal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Resolving and loading the model: no file is being written.
    Loading,
    /// Inside the engine: it polls [`requested`] between steps.
    Generating,
    /// Staging and committing outputs.
    Writing,
}

struct State {
    phase: Phase,
    /// The first signal received.
    signal: Option<i32>,
}

static STATE: Mutex<State> = Mutex::new(State {
    phase: Phase::Loading,
    signal: None,
});

fn state() -> MutexGuard<'static, State> {
    // The state stays consistent whatever panicked while holding it: two plain fields.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The run stopped on a signal; `cli::main` exits with [`Interrupted::exit_code`].
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}: stopped before writing any output", signal_name(*.signal))]
pub struct Interrupted {
    /// The signal's number.
    pub signal: i32,
}

impl Interrupted {
    /// 128 + the signal's number, as shells report a process a signal ended.
    pub fn exit_code(&self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(1)
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        2 => "SIGINT (Ctrl-C)".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// Starts watching SIGINT and SIGTERM for the rest of the process.
pub fn install() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    on_signal(signal);
                }
            })?;
    }
    Ok(())
}

/// Runs on the watching thread, not in a signal handler: it may lock, print and exit.
#[cfg(unix)]
fn on_signal(signal: i32) {
    let mut state = state();
    let first = state.signal.is_none();
    if first {
        state.signal = Some(signal);
    }
    let name = signal_name(signal);
    match state.phase {
        Phase::Loading => exit_now(signal, &format!("interrupted by {name} while loading")),
        Phase::Generating if !first => exit_now(signal, &format!("interrupted again by {name}")),
        Phase::Generating => {
            eprintln!("\n{name}: stopping after the current step (once more to quit at once)")
        }
        Phase::Writing if first => eprintln!("\n{name}: removing the outputs not yet in place"),
        Phase::Writing => eprintln!("\n{name}: already stopping"),
    }
}

/// Ends the process without running exit handlers, where ONNX Runtime's threads may still be
/// at work (its static destructors would race them). No output file exists yet: nothing is lost.
#[cfg(unix)]
fn exit_now(signal: i32, message: &str) -> ! {
    eprintln!("\nerror: {message}: exiting, no output written");
    signal_hook::low_level::exit(128 + signal)
}

/// Enters `phase`; held against the watching thread, so a signal sees either phase, never a
/// half-made change.
pub fn enter(phase: Phase) {
    state().phase = phase;
}

/// Whether a signal asked the run to stop.
pub fn requested() -> bool {
    state().signal.is_some()
}

/// The [`Interrupted`] error for the signal received, if any.
pub fn stopped() -> Option<Interrupted> {
    state().signal.map(|signal| Interrupted { signal })
}
