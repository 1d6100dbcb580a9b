//! Stop strings, matched on the text (not on tokens), so a stop string that
//! spans several tokens is found, and none of it reaches the client: text
//! that could be the start of a stop string is held back until the next
//! token settles it.

/// What a piece of new text produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Text that is safe to send.
    pub text: String,
    /// A stop string was found: `text` is everything before it, and
    /// generation ends.
    pub stopped: bool,
}

/// Finds stop strings in a stream of text pieces.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Text held back because it may begin a stop string.
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub(crate) fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    /// Adds new text; returns what may be sent now.
    pub(crate) fn push(&mut self, text: &str) -> Scanned {
        if self.stops.is_empty() {
            return Scanned { text: text.to_string(), stopped: false };
        }
        self.pending.push_str(text);
        let earliest = self.stops.iter().filter_map(|stop| self.pending.find(stop.as_str())).min();
        if let Some(at) = earliest {
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(at);
            return Scanned { text, stopped: true };
        }
        let hold = self.held_suffix_len();
        let send = self.pending.len() - hold;
        let text = self.pending[..send].to_string();
        self.pending.drain(..send);
        Scanned { text, stopped: false }
    }

    /// The text still held back, when generation ends for another reason.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of
    /// some stop string.
    fn held_suffix_len(&self) -> usize {
        let pending = self.pending.as_str();
        let mut longest = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(pending.len());
            for len in (longest + 1..=max).rev() {
                let start = pending.len() - len;
                if pending.is_char_boundary(start) && stop.starts_with(&pending[start..]) {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let scanned = matcher.push(piece);
            out.push_str(&scanned.text);
            if scanned.stopped {
                return (out, true);
            }
        }
        out.push_str(&matcher.flush());
        (out, false)
    }

    #[test]
    fn stop_inside_one_piece() {
        assert_eq!(run(&["\n\n"], &["Paris.\n\nThe", " end"]), ("Paris.".into(), true));
    }

    #[test]
    fn stop_across_pieces_is_never_sent() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("the E").text, "the ");
        assert_eq!(matcher.push("N").text, "");
        let last = matcher.push("D and more");
        assert_eq!(last, Scanned { text: String::new(), stopped: true });
    }

    #[test]
    fn false_starts_are_released() {
        assert_eq!(run(&["END"], &["E", "N", "x", " done"]), ("ENx done".into(), false));
        assert_eq!(run(&["abc"], &["ab", "ab", "c"]), ("ab".into(), true));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["world", "lo"], &["hello world"]), ("hel".into(), true));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a"]), ("a".into(), false));
    }
}
