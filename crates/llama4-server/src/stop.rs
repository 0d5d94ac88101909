//! Stop strings over streamed text: text is released only once it cannot be the start of a stop
//! string, so a stop string split across tokens is still found and never shown.

/// Finds the first stop string in text that arrives piece by piece.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received and not yet released (it may begin a stop string).
    held: String,
}

/// What a piece of text released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// Text that is certain to be output.
    pub text: String,
    /// A stop string was found: `text` ends just before it, and generation ends.
    pub stopped: bool,
}

impl StopStrings {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that can be shown now.
    pub fn push(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released { text, stopped: true };
        }
        // Hold back the longest tail that some stop string starts with.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_tail_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released { text, stopped: false }
    }

    /// Releases what is held (generation ended for another reason).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest proper suffix of `text` that is a prefix of `stop`.
fn longest_tail_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn finds_a_stop_split_across_pieces() {
        assert_eq!(run(&["END"], &["ab", "cE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // The earliest of several stops wins.
        assert_eq!(run(&["zz", "b"], &["abzz"]), ("a".into(), true));
    }

    #[test]
    fn holds_back_only_a_possible_start() {
        let mut m = StopStrings::new(vec!["<end>".into()]);
        assert_eq!(m.push("x <e").text, "x ");
        assert_eq!(m.push("q").text, "<eq");
        // Multi-byte characters are never split.
        let mut m = StopStrings::new(vec!["éé".into()]);
        assert_eq!(m.push("aé").text, "a");
        assert_eq!(m.finish(), "é");
    }
}
