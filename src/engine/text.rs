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

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny fixture's byte-level BPE: characters it never saw are one token per byte.
    fn tokenizer() -> Tokenizer {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-llama/tokenizer.json");
        Tokenizer::from_file(&p).expect("the fixture tokenizer")
    }

    /// Feed `ids` one at a time; the deltas (and what flush adds) in order.
    fn run(tok: &Tokenizer, ids: &[u32], stops: &[String]) -> (Vec<String>, bool, String) {
        let mut st = TextState::default();
        let mut deltas = Vec::new();
        for n in 1..=ids.len() {
            let step = st.push(tok, &ids[..n], stops).unwrap();
            deltas.push(step.delta);
            if step.stopped {
                return (deltas, true, st.text);
            }
        }
        deltas.push(st.flush());
        (deltas, false, st.text)
    }

    #[test]
    fn a_character_split_over_tokens_is_held_back_until_whole() {
        let tok = tokenizer();
        let ids = tok.encode("a€b").unwrap();
        // '€' is three bytes the fixture tokenizer never merged: three tokens of its own.
        let euro = tok.encode("€").unwrap();
        assert_eq!(
            euro.len(),
            3,
            "the test needs a character split over tokens"
        );
        let (deltas, stopped, _) = run(&tok, &ids, &[]);
        assert!(!stopped);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas.concat(), "a€b");
        // Nothing is emitted while only part of the character is there.
        let at = ids.iter().position(|t| *t == euro[0]).unwrap();
        assert_eq!(deltas[at], "");
        assert_eq!(deltas[at + 1], "");
        assert_eq!(deltas[at + 2], "€");
    }

    #[test]
    fn a_possible_stop_string_is_held_back_then_released_or_cut() {
        let tok = tokenizer();
        let ids = tok.encode("abcXYd").unwrap();
        // A stop string that starts like the text but never completes: held, then released.
        let (deltas, stopped, text) = run(&tok, &ids, &["XYZ".to_string()]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), "abcXYd");
        assert_eq!(text, "abcXYd");
        // While the text ends in "X" or "XY" (prefixes of "XYZ"), that tail is not emitted.
        let mut emitted = String::new();
        for d in &deltas {
            emitted.push_str(d);
            assert!(
                !emitted.ends_with('X') && !emitted.ends_with("XY"),
                "{deltas:?}"
            );
        }
        // A stop string that completes: the text ends right before it, and nothing of it leaks.
        let (deltas, stopped, text) = run(&tok, &ids, &["XY".to_string()]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "abc");
        assert_eq!(text, "abc");
        // The earliest of several stop strings wins.
        let (deltas, stopped, _) = run(&tok, &ids, &["Yd".to_string(), "cX".to_string()]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "ab");
    }
}
