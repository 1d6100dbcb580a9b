//! The engine's scheduling decisions, as pure functions: how much prompt to
//! prefill in one iteration, which waiting requests to admit, and which
//! decode group a new sequence joins. `engine.rs` measures and acts; this
//! decides (and is unit-tested).
//!
//! Memory is counted in padded token slots: a decode group of `rows` rows
//! whose longest may reach `reach` tokens holds `rows * reach` slots at
//! most (rows are left-padded to the longest). Two upper bounds of what the
//! groups can grow to hold at once, and admission needs only one of them
//! to fit: (1) all sequences, grouped or not, times the longest reach
//! (whatever the grouping, it holds no more); (2) the groups' slots plus
//! `2 * reach` for each sequence not yet in a group: it joins a group only
//! if that grows the group's slots by at most that much (or it starts a
//! group of its own, `reach` slots). Neither bound grows between
//! admissions (joins stay within (2), leaves shrink both).

/// Smallest prefill piece while others decode. A forward pass has a fixed
/// cost (measured with int4 SmolLM2 on 2 busy CPUs: 8 prompt tokens of one
/// row take about as long as a decode step of 8 rows), so smaller pieces
/// would lengthen the prefill without shortening the running streams' wait;
/// 32 made that wait longer than 16 (docs/llm.md).
pub(crate) const MIN_PIECE: usize = 16;

/// Piece size before any prefill was measured, while others decode.
const FIRST_PIECE: usize = 32;

/// Share of a decode step's time a prefill piece may take: a running
/// stream's inter-token latency is then about twice its steady value while
/// a prompt is prefilled.
const PREFILL_SHARE: f64 = 1.0;

/// A row joins a group only while the group's padded size (tokens the step
/// copies and attends over) stays within this factor of its real size.
pub(crate) const MAX_PADDING: usize = 2;

/// Slots a sequence holds from admission until it joins a group.
pub(crate) fn reservation(reach: usize) -> u64 {
    2 * reach as u64
}

/// An exponentially weighted moving average of a duration, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ewma(Option<f64>);

impl Ewma {
    /// Weight of the newest sample.
    const ALPHA: f64 = 0.25;

    pub(crate) fn observe(&mut self, sample: f64) {
        self.0 = Some(match self.0 {
            None => sample,
            Some(mean) => mean + Self::ALPHA * (sample - mean),
        });
    }

    pub(crate) fn get(&self) -> Option<f64> {
        self.0
    }
}

/// Prompt tokens (padded) to prefill in this iteration: with nothing
/// decoding, a whole `chunk`; otherwise as many as cost about one decode
/// step of the running groups (`step` seconds, times [`PREFILL_SHARE`]) at
/// `per_token` seconds per prefilled token (measured on pieces, so their
/// fixed cost counts), so the running streams' inter-token latency about
/// doubles at most while a prompt is prefilled.
pub(crate) fn piece_budget(chunk: usize, decoding: bool, step: Option<f64>, per_token: Option<f64>) -> usize {
    let chunk = chunk.max(1);
    if !decoding {
        return chunk;
    }
    let tokens = match (step, per_token) {
        (Some(step), Some(per_token)) if per_token > 0.0 => (PREFILL_SHARE * step / per_token) as usize,
        _ => FIRST_PIECE,
    };
    tokens.clamp(MIN_PIECE.min(chunk), chunk)
}

/// What the engine holds when it admits: sequences generating or being
/// prefilled, and the KV slots they hold or reserve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Occupancy {
    /// Sequences generating or being prefilled (each takes a slot of
    /// `max_running`).
    pub live: usize,
    /// Padded KV slots of the decode groups (finished rows riding along
    /// included) plus the reservations of sequences not yet in a group.
    pub slots: u64,
    /// Rows of the groups (finished rows riding along included) and
    /// sequences not yet in a group.
    pub rows: usize,
    /// The longest reach among them.
    pub longest_reach: usize,
    /// What a prefill under way (resumable, in pieces) leaves to new arrivals.
    pub prefilling: Prefilling,
}

/// Whether a prompt is being prefilled in pieces, and whose turn it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Prefilling {
    /// None is: new arrivals may start.
    #[default]
    No,
    /// Its next piece runs in this iteration: arrivals wait.
    PieceTurn,
    /// Arrivals whose prompts fit this iteration's budget may be prefilled
    /// (together) instead, so a long prompt does not hold short ones back
    /// for its whole prefill; a long arrival waits for its own turn.
    ArrivalsTurn,
}

/// A waiting request as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waiting {
    pub prompt: usize,
    pub reach: usize,
}

/// The result of [`admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    /// How many requests from the front of the queue to take now.
    pub take: usize,
    /// The next request waits for KV memory.
    pub blocked: bool,
}

/// Which requests from the front of the queue start their prefill now,
/// first come first served. While a prompt is prefilled in pieces, none on
/// its turns, and on the others only prompts that fit the budget (the
/// engine alternates while arrivals wait). Otherwise the longest run that has free slots (`max_running`),
/// fits the KV capacity (`capacity` slots, see the module doc) and whose
/// padded prompts fit `budget` tokens, prefilled together in one forward;
/// the first request goes even if its prompt alone is longer (it is then
/// prefilled in pieces). On an idle engine the first request is always
/// taken (the server refuses one that could never fit alone).
pub(crate) fn admit(
    queue: impl IntoIterator<Item = Waiting>,
    occupancy: Occupancy,
    max_running: usize,
    capacity: u64,
    budget: usize,
) -> Admission {
    let mut admission = Admission { take: 0, blocked: false };
    if occupancy.prefilling == Prefilling::PieceTurn {
        return admission;
    }
    let short_only = occupancy.prefilling == Prefilling::ArrivalsTurn;
    let idle = occupancy.live == 0 && occupancy.slots == 0;
    let (mut slots, mut longest) = (occupancy.slots, 0);
    let mut reach = occupancy.longest_reach;
    for next in queue {
        if occupancy.live + admission.take >= max_running {
            break;
        }
        let padded = (admission.take + 1).saturating_mul(longest.max(next.prompt));
        if (admission.take > 0 || short_only) && padded > budget {
            break;
        }
        let wanted = slots.saturating_add(reservation(next.reach));
        let rows = (occupancy.rows + admission.take + 1) as u64;
        let padded_all = rows.saturating_mul(reach.max(next.reach) as u64);
        if wanted.min(padded_all) > capacity && !(idle && admission.take == 0) {
            admission.blocked = true;
            break;
        }
        slots = wanted;
        reach = reach.max(next.reach);
        longest = longest.max(next.prompt);
        admission.take += 1;
        if next.prompt > budget {
            // Prefilled alone, in pieces.
            break;
        }
    }
    admission
}

/// A decode group as [`choose_group`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupShape {
    pub rows: usize,
    /// Cached positions of the longest row, and of all rows together.
    pub longest_len: usize,
    pub total_len: usize,
    /// The most tokens the longest row may reach.
    pub longest_reach: usize,
}

impl GroupShape {
    /// Padded KV slots the group may grow to.
    pub(crate) fn slots(&self) -> u64 {
        self.rows as u64 * self.longest_reach as u64
    }

    /// The group with one more row.
    pub(crate) fn with(&self, len: usize, reach: usize) -> GroupShape {
        GroupShape {
            rows: self.rows + 1,
            longest_len: self.longest_len.max(len),
            total_len: self.total_len + len,
            longest_reach: self.longest_reach.max(reach),
        }
    }
}

/// The group a new sequence of `len` cached positions that may reach
/// `reach` tokens joins, or `None` to start a group of its own. It may join
/// a group whose padded size stays within [`MAX_PADDING`] of the real one
/// (a long prompt does not make every short row copy and attend over its
/// length) and whose KV slots grow by at most its reservation; of those, the
/// one that adds the least padding.
pub(crate) fn choose_group(groups: &[GroupShape], len: usize, reach: usize) -> Option<usize> {
    groups
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            let joined = g.with(len, reach);
            let padded = joined.rows * joined.longest_len;
            let fits_padding = padded <= MAX_PADDING * joined.total_len;
            let fits_memory = joined.slots() - g.slots() <= reservation(reach);
            (g.rows > 0 && fits_padding && fits_memory).then_some((i, padded - joined.total_len))
        })
        .min_by_key(|&(_, waste)| waste)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cost_about_one_decode_step() {
        assert_eq!(piece_budget(512, false, Some(0.05), Some(0.001)), 512, "nothing decodes: a whole chunk");
        assert_eq!(piece_budget(512, true, Some(0.05), Some(0.001)), 50, "one step's worth");
        assert_eq!(piece_budget(512, true, None, None), FIRST_PIECE, "not measured yet");
        assert_eq!(piece_budget(512, true, Some(0.05), Some(0.01)), MIN_PIECE, "never below the minimum");
        assert_eq!(piece_budget(512, true, Some(0.1), Some(0.002)), 50);
        assert_eq!(piece_budget(512, true, Some(5.0), Some(0.001)), 512, "never above a chunk");
        assert_eq!(piece_budget(4, true, Some(0.0), Some(0.001)), 4, "a chunk below the minimum wins");
    }

    #[test]
    fn ewma_follows_its_samples() {
        let mut e = Ewma::default();
        assert_eq!(e.get(), None);
        e.observe(1.0);
        assert_eq!(e.get(), Some(1.0));
        e.observe(2.0);
        assert_eq!(e.get(), Some(1.25));
    }

    fn w(prompt: usize, reach: usize) -> Waiting {
        Waiting { prompt, reach }
    }

    const EMPTY: Occupancy = Occupancy { live: 0, slots: 0, rows: 0, longest_reach: 0, prefilling: Prefilling::No };

    #[test]
    fn arrivals_are_prefilled_together_within_the_budget() {
        let queue = [w(30, 100), w(40, 100), w(20, 100), w(100, 200)];
        // 3 rows padded to 40 = 120 tokens fit; the fourth would pad to 4 x 100.
        assert_eq!(admit(queue, EMPTY, 32, u64::MAX, 128), Admission { take: 3, blocked: false });
        assert_eq!(admit(queue, EMPTY, 2, u64::MAX, 128), Admission { take: 2, blocked: false }, "slots");
        let busy = Occupancy { live: 31, ..EMPTY };
        assert_eq!(admit(queue, busy, 32, u64::MAX, 128).take, 1);
    }

    #[test]
    fn a_long_prompt_goes_alone_and_holds_the_queue_until_prefilled() {
        let queue = [w(1500, 1800), w(10, 20)];
        assert_eq!(admit(queue, EMPTY, 32, u64::MAX, 64), Admission { take: 1, blocked: false });
        let short_first = [w(10, 20), w(1500, 1800)];
        assert_eq!(admit(short_first, EMPTY, 32, u64::MAX, 64).take, 1, "the long one waits for its own turn");
        let piece = Occupancy { live: 1, slots: 3600, rows: 1, longest_reach: 1800, prefilling: Prefilling::PieceTurn };
        assert_eq!(admit([w(10, 20)], piece, 32, u64::MAX, 64).take, 0, "the prefill's turn");
        let arrivals = Occupancy { prefilling: Prefilling::ArrivalsTurn, ..piece };
        assert_eq!(admit([w(10, 20), w(20, 30), w(40, 50)], arrivals, 32, u64::MAX, 64).take, 2, "short ones go");
        assert_eq!(admit([w(100, 120), w(10, 20)], arrivals, 32, u64::MAX, 64).take, 0, "a long one waits");
    }

    #[test]
    fn admission_counts_reservations_against_the_capacity() {
        // Two groups of 4 x 100 slots (some rows longer than 100).
        let busy = Occupancy { live: 2, slots: 800, rows: 8, longest_reach: 150, prefilling: Prefilling::No };
        // Each waiting request reserves 2 x 100 slots; all rows padded to 150 would take more.
        assert_eq!(admit([w(10, 100), w(10, 100)], busy, 32, 1000, 512), Admission { take: 1, blocked: true });
        assert_eq!(admit([w(10, 100), w(10, 100)], busy, 32, 1200, 512), Admission { take: 2, blocked: false });
        assert_eq!(admit([w(10, 300)], busy, 32, 1000, 512), Admission { take: 0, blocked: true });
        // Rows alike: padding all of them to the longest is the smaller bound.
        let alike = Occupancy { live: 2, slots: 200, rows: 2, longest_reach: 100, prefilling: Prefilling::No };
        assert_eq!(admit([w(10, 100), w(10, 100)], alike, 32, 400, 512), Admission { take: 2, blocked: false });
        assert_eq!(admit([w(10, 100)], alike, 32, 299, 512), Admission { take: 0, blocked: true });
        // An idle engine always takes its first request.
        assert_eq!(admit([w(10, 600), w(10, 10)], EMPTY, 32, 1000, 512), Admission { take: 1, blocked: true });
    }

    fn g(lens: &[usize], reaches: &[usize]) -> GroupShape {
        GroupShape {
            rows: lens.len(),
            longest_len: lens.iter().copied().max().unwrap_or(0),
            total_len: lens.iter().sum(),
            longest_reach: reaches.iter().copied().max().unwrap_or(0),
        }
    }

    #[test]
    fn a_long_row_starts_its_own_group() {
        let short = g(&[100; 8], &[300; 8]);
        assert_eq!(choose_group(&[short], 1500, 1532), None);
        assert_eq!(choose_group(&[short], 40, 296), Some(0), "a short one joins");
        let long = g(&[1500], &[1532]);
        assert_eq!(choose_group(&[short, long], 1400, 1450), Some(1));
        assert_eq!(choose_group(&[short, long], 60, 300), Some(0));
        assert_eq!(choose_group(&[], 60, 300), None);
    }

    #[test]
    fn joining_never_grows_memory_beyond_the_reservation() {
        // Same lengths now, but the newcomer may reach far more.
        let group = g(&[100; 4], &[150; 4]);
        assert_eq!(choose_group(&[group], 100, 1000), None, "5 x 1000 - 4 x 150 > 2 x 1000");
        assert_eq!(choose_group(&[group], 100, 160), Some(0));
        for (lens, reaches, len, reach) in [(&[10, 20][..], &[50, 60][..], 15, 70), (&[500][..], &[900][..], 300, 400)]
        {
            let before = g(lens, reaches);
            if choose_group(&[before], len, reach).is_some() {
                assert!(before.with(len, reach).slots() - before.slots() <= reservation(reach));
            }
        }
    }

    #[test]
    fn joins_the_group_that_wastes_least() {
        let a = g(&[100, 100], &[400, 400]);
        let b = g(&[130, 120], &[400, 400]);
        assert_eq!(choose_group(&[a, b], 125, 400), Some(1));
        assert_eq!(choose_group(&[a, b], 95, 400), Some(0));
    }
}
