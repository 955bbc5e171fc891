//! Test hooks, so that tests decide when the engine steps instead of racing it: a gate that
//! holds every step until a test allows it, and an injected step failure. The server's hidden
//! `--test-step-delay-ms` throttle (for tests of the real process) is `EngineConfig::step_delay`.
//! A server configured by its command line never has a gate.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Holds engine steps until a test allows them. Clone it to keep a handle after giving it to
/// [`EngineConfig::step_gate`](super::EngineConfig::step_gate).
#[derive(Clone, Default)]
pub struct StepGate {
    inner: Arc<(Mutex<GateState>, Condvar)>,
}

#[derive(Default)]
struct GateState {
    /// Steps still allowed; `None`: open.
    permits: Option<u64>,
    /// Steps that passed the gate.
    passed: u64,
    /// The next step fails with this message instead of running.
    fault: Option<String>,
}

impl std::fmt::Debug for StepGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("StepGate")
            .field("permits", &st.permits)
            .field("passed", &st.passed)
            .finish()
    }
}

impl StepGate {
    /// A gate that lets no step through until [`allow`](Self::allow) or [`open`](Self::open).
    pub fn closed() -> Self {
        let g = Self::default();
        g.state().permits = Some(0);
        g
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Let `n` more steps through.
    pub fn allow(&self, n: u64) {
        let mut st = self.state();
        if let Some(p) = st.permits.as_mut() {
            *p += n;
        }
        self.inner.1.notify_all();
    }

    /// Let every step through from now on.
    pub fn open(&self) {
        self.state().permits = None;
        self.inner.1.notify_all();
    }

    /// Hold every step from now on.
    pub fn close(&self) {
        self.state().permits = Some(0);
    }

    /// The next step fails with `msg` (as a failed forward would): its sequences end with an
    /// internal error and the engine keeps serving.
    pub fn fail_next_step(&self, msg: &str) {
        self.state().fault = Some(msg.to_string());
    }

    /// Steps that have passed the gate so far.
    pub fn passed(&self) -> u64 {
        self.state().passed
    }

    /// Wait until `passed() >= n` (true) or `timeout` runs out (false).
    pub fn wait_passed(&self, n: u64, timeout: Duration) -> bool {
        self.wait_until(Instant::now() + timeout, |st| st.passed >= n)
            .1
    }

    /// The worker asks to step: true when a permit came within `wait`. The worker goes back
    /// to its commands (new requests, cancellations, stats) between asks.
    pub(super) fn pass(&self, wait: Duration) -> bool {
        let (mut st, got) = self.wait_until(Instant::now() + wait, |st| match st.permits {
            None => true,
            Some(p) if p > 0 => {
                st.permits = Some(p - 1);
                true
            }
            Some(_) => false,
        });
        if got {
            st.passed += 1;
            self.inner.1.notify_all();
        }
        got
    }

    /// Wait on the gate until `done` (which may take what it waited for) or `deadline`.
    fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&mut GateState) -> bool,
    ) -> (std::sync::MutexGuard<'_, GateState>, bool) {
        let mut st = self.state();
        loop {
            if done(&mut st) {
                return (st, true);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return (st, false);
            };
            st = self
                .inner
                .1
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The injected failure for this step, if any.
    pub(super) fn take_fault(&self) -> Option<String> {
        self.state().fault.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_and_open_lets_everything_through() {
        let g = StepGate::closed();
        assert!(!g.pass(Duration::from_millis(1)));
        g.allow(2);
        assert!(g.pass(Duration::ZERO) && g.pass(Duration::ZERO));
        assert!(!g.pass(Duration::from_millis(1)));
        assert_eq!(g.passed(), 2);
        assert!(g.wait_passed(2, Duration::ZERO));
        assert!(!g.wait_passed(3, Duration::from_millis(1)));
        let h = g.clone();
        let t = std::thread::spawn(move || h.pass(Duration::from_secs(30)));
        g.open();
        assert!(t.join().unwrap());
        assert!(g.pass(Duration::ZERO));
        g.close();
        assert!(!g.pass(Duration::ZERO));
        g.fail_next_step("boom");
        assert_eq!(g.take_fault().as_deref(), Some("boom"));
        assert_eq!(g.take_fault(), None);
    }
}
