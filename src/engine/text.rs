//! Incremental detokenisation with stop strings: turns the growing list of generated ids
//! into text deltas that never split a UTF-8 character and never leak the start of a stop
//! string that may still complete.

use crate::model::{ModelError, Tokenizer};

#[derive(Debug, Default)]
pub struct TextState {
    /// Characters of the output text already emitted.
    emitted: usize,
    pub text: String,
}

/// What one more token did to the text.
#[derive(Debug, PartialEq, Eq)]
pub struct TextStep {
    /// New text to emit (possibly empty).
    pub delta: String,
    /// A stop string was completed; the text ends just before it.
    pub stopped: bool,
}

impl TextState {
    /// Re-decode `ids` (all generated ids so far) and return what can be emitted now.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        ids: &[u32],
        stops: &[String],
    ) -> Result<TextStep, ModelError> {
        let full = tok.decode(ids, true)?;
        if let Some(cut) = stops.iter().filter_map(|s| full.find(s.as_str())).min() {
            let text = full[..cut].to_string();
            let delta = char_suffix(&text, self.emitted);
            self.emitted = text.chars().count();
            self.text = text;
            return Ok(TextStep {
                delta,
                stopped: true,
            });
        }
        // Hold back an incomplete character, and any tail that could still become a stop string.
        let complete = full.trim_end_matches('\u{FFFD}').len();
        let hold = stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| full[..complete].ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let safe_text = &full[..floor_char_boundary(&full, complete - hold)];
        let n = safe_text.chars().count();
        let delta = if n > self.emitted {
            char_suffix(safe_text, self.emitted)
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(n);
        self.text = full;
        Ok(TextStep {
            delta,
            stopped: false,
        })
    }

    /// Whatever is still held back, when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        let delta = char_suffix(&self.text, self.emitted);
        self.emitted = self.text.chars().count();
        delta
    }
}

fn char_suffix(s: &str, skip_chars: usize) -> String {
    s.chars().skip(skip_chars).collect()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
