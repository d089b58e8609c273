//! Amounts per VM that fade: each halves every `half_life`, so what a VM
//! did lately weighs and what it did long ago does not. The bulk pool's
//! usage (`bulk`) and the staging intake (`staging::intake`) keep theirs
//! here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Fading amounts, one per VM.
pub struct Fading {
    half_life: f64,
    /// Entries kept before those faded to `floor` or below are dropped.
    max_entries: usize,
    floor: f64,
    values: HashMap<String, (f64, Instant)>,
}

impl Fading {
    /// Amounts halving every `half_life`; beyond `max_entries` VMs, those
    /// faded to `floor` or below are forgotten.
    pub fn new(half_life: Duration, max_entries: usize, floor: f64) -> Self {
        Fading {
            half_life: half_life.as_secs_f64(),
            max_entries,
            floor,
            values: HashMap::new(),
        }
    }

    /// `vm`'s amount at `now` (0 if none).
    pub fn get(&self, vm: &str, now: Instant) -> f64 {
        self.values
            .get(vm)
            .map_or(0.0, |&(amount, at)| fade(amount, at, now, self.half_life))
    }

    /// Adds `n` to `vm`'s amount at `now`; returns the amount before.
    pub fn add(&mut self, vm: &str, n: f64, now: Instant) -> f64 {
        let before = self.get(vm, now);
        match self.values.get_mut(vm) {
            Some(v) => *v = (before + n, now),
            None => {
                self.values.insert(vm.to_string(), (n, now));
            }
        }
        if self.values.len() > self.max_entries {
            let (half_life, floor) = (self.half_life, self.floor);
            self.values
                .retain(|_, &mut (amount, at)| fade(amount, at, now, half_life) > floor);
        }
        before
    }
}

/// `amount` as of `at`, faded to `now`.
fn fade(amount: f64, at: Instant, now: Instant, half_life: f64) -> f64 {
    let halves = now.saturating_duration_since(at).as_secs_f64() / half_life;
    amount * 0.5f64.powf(halves)
}
