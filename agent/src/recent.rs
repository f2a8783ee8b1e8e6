//! The data of the newest large writes, kept in memory for the shipper, and the pacing of
//! large writes to a shipper that falls too far behind.
//!
//! A large write is spooled without its data ([`SpoolOp::OnVolume`]): the volume holds it. A
//! shipper that keeps pace takes the data from memory; one that has fallen behind this window
//! reads each write back from the volume (from the disk, as it went around the page cache) and
//! hashes it again to check it, on the disk the writer is busy with. Counted flat out (fio's
//! 256 KiB sequential writes over a 4 GiB volume for 60 s), runs were bimodal: a shipper that
//! stayed in memory kept up (lag p99 0.26 s, 102 of 54,000 writes read back), one that fell
//! out once never came back (lag p99 10.1 s, 10,671 of 40,000 read back).
//!
//! Further behind, worse follows: past the time a writer takes to come back to the same
//! blocks, every overwrite of an unshipped write first saves its blocks to the spool, and a
//! full spool ends in a gap and a resync. So while a
//! shipper is connected, a large write waits for it once the oldest large write it has not
//! taken is [`AgentConfig::max_lag`] old (the recovery point the agent holds writers to):
//! writers go at the pace of the whole pipeline, and the lag stays near the bound. Writes under
//! the bound are not held up at all, so a burst runs at the disk's speed and the collector
//! catches up after it. The wait never holds writes up for a shipper that has taken nothing
//! for [`STALLED_AFTER`] (a collector that stopped answering, or a shipper still sending what
//! was spooled while it was away): the agent keeps serving writes, and the spool's limit and
//! its gap rule apply as when the collector is away.
//!
//! [`AgentConfig::max_lag`]: crate::config::AgentConfig::max_lag
//! [`SpoolOp::OnVolume`]: tideline_core::spool::SpoolOp::OnVolume

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tideline_core::Seq;

/// Most bytes of writes kept.
pub const RECENT_WRITES_BYTES: usize = 64 << 20;

/// A connected shipper that has taken nothing for this long is stalled: writes stop waiting.
pub const STALLED_AFTER: Duration = Duration::from_secs(1);

/// Writes kept within this long of the first of a run are one run for the lag: the lag is
/// known to this much, and a run is noted at most 100 times a second.
const RUN_GRANULE: Duration = Duration::from_millis(10);

/// Writes held up by pacing are logged at once, then summed up at most this often while it
/// goes on.
const HELD_UP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Most runs noted: a stalled shipper stays connected for as long as the collector does, and
/// past this, new writes join the newest run (so the lag is taken as larger, never smaller).
const MAX_UNTAKEN_RUNS: usize = 1 << 16;

/// Why [`RecentWrites::wait_for_shipper`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paced {
    /// No wait was needed: no shipper connected, or it is less than the bound behind.
    NotNeeded,
    /// The write waited until the shipper was back under the bound.
    Waited,
    /// The write waited [`STALLED_AFTER`] without the shipper taking anything.
    ShipperStalled,
}

pub struct RecentWrites {
    window: Mutex<Window>,
    /// Notified when the shipper takes a write or goes away.
    taken: Condvar,
    /// How far behind a connected shipper may fall before large writes wait for it; `None`
    /// never waits.
    max_lag: Option<Duration>,
    stalled_after: Duration,
}

#[derive(Default)]
struct Window {
    bytes: usize,
    /// In seq order.
    writes: VecDeque<Kept>,
    /// While a shipper is connected: the writes kept since that it has not taken, and when it
    /// last took one.
    shipper: Option<Shipper>,
    /// Writes waiting for the shipper.
    waiting: usize,
    held_up: HeldUp,
}

/// Large writes that waited for the shipper, and how long, for the log: an operator looking
/// into slow writes must be able to tell that the agent held them up, and why.
#[derive(Default)]
struct HeldUp {
    /// Since the agent started: writes, and the time they waited in all.
    writes: u64,
    waited: Duration,
    /// Since the last log line: writes, and the time they waited in all.
    unreported_writes: u64,
    unreported_waited: Duration,
    reported_at: Option<Instant>,
}

impl HeldUp {
    /// One more write waited `waited`: what to log, if no line went out within
    /// [`HELD_UP_REPORT_EVERY`].
    fn add(&mut self, waited: Duration) -> Option<HeldUpReport> {
        self.writes += 1;
        self.waited += waited;
        self.unreported_writes += 1;
        self.unreported_waited += waited;
        let now = Instant::now();
        let since_last = self.reported_at.map(|at| now.duration_since(at));
        if since_last.is_some_and(|since| since < HELD_UP_REPORT_EVERY) {
            return None;
        }
        self.reported_at = Some(now);
        Some(HeldUpReport {
            writes: std::mem::take(&mut self.unreported_writes),
            waited: std::mem::take(&mut self.unreported_waited),
            since_last,
        })
    }
}

/// Writes held up since the last report (or since the agent started).
struct HeldUpReport {
    writes: u64,
    waited: Duration,
    since_last: Option<Duration>,
}

impl HeldUpReport {
    fn log(&self, max_lag: Duration) {
        tracing::warn!(
            writes = self.writes,
            waited_ms = self.waited.as_millis() as u64,
            since_last_report_s = self.since_last.map(|s| s.as_secs()),
            max_lag_ms = max_lag.as_millis() as u64,
            "large writes waited for the shipper, which had fallen the lag bound \
             (--max-lag-ms) behind: they go at the pace it ships; the collector, its disk or the \
             network between is what holds it back (waited_ms sums each write's wait)"
        );
    }
}

struct Kept {
    seq: Seq,
    data: Bytes,
}

struct Shipper {
    /// Runs of writes it has not taken, oldest first: the last seq of each, and when its first
    /// was kept.
    untaken: VecDeque<(Seq, Instant)>,
    /// The newest seq taken.
    taken_through: Seq,
    last_took: Instant,
}

impl RecentWrites {
    /// Writers wait for a connected shipper `max_lag` behind (never if `None`).
    pub fn new(max_lag: Option<Duration>) -> Self {
        RecentWrites::with_stall(max_lag, STALLED_AFTER)
    }

    fn with_stall(max_lag: Option<Duration>, stalled_after: Duration) -> Self {
        RecentWrites {
            window: Mutex::default(),
            taken: Condvar::new(),
            max_lag,
            stalled_after,
        }
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the data of write `seq`, the newest so far, dropping the oldest past the budget.
    pub fn keep(&self, seq: Seq, data: Bytes) {
        let mut window = self.window();
        if let Some(shipper) = &mut window.shipper {
            // The shipper may read a record the moment it is spooled, before this.
            if seq > shipper.taken_through {
                shipper.kept(seq, Instant::now(), MAX_UNTAKEN_RUNS);
            }
        }
        window.bytes += data.len();
        window.writes.push_back(Kept { seq, data });
        while window.bytes > RECENT_WRITES_BYTES {
            let Some(old) = window.writes.pop_front() else {
                break;
            };
            window.bytes -= old.data.len();
        }
    }

    /// The data of write `seq`, if still kept.
    pub fn get(&self, seq: Seq) -> Option<Bytes> {
        self.window().get(seq)
    }

    /// The data of write `seq` for the shipper: every write up to it counts as taken. The
    /// shipper takes batches in seq order, a batch's writes read back side by side, so a write
    /// may count as taken at most one batch before it is.
    pub fn take(&self, seq: Seq) -> Option<Bytes> {
        let mut window = self.window();
        if let Some(shipper) = &mut window.shipper {
            // Woken only when the lag may have dropped: at most once a run.
            if shipper.took_through(seq) && window.waiting > 0 {
                self.taken.notify_all();
            }
        }
        window.get(seq)
    }

    /// The collector holds every write through `seq`: their data is no longer needed.
    pub fn forget_through(&self, seq: Seq) {
        let mut window = self.window();
        if let Some(shipper) = &mut window.shipper {
            // Woken only when the lag may have dropped: at most once a run.
            if shipper.took_through(seq) && window.waiting > 0 {
                self.taken.notify_all();
            }
        }
        while window.writes.front().is_some_and(|kept| kept.seq <= seq) {
            if let Some(old) = window.writes.pop_front() {
                window.bytes -= old.data.len();
            }
        }
    }

    /// Drops every kept write (writes are then read back from the volume).
    #[cfg(test)]
    pub fn forget_all(&self) {
        let mut window = self.window();
        window.writes.clear();
        window.bytes = 0;
    }

    /// A shipper connected (writes made from now on may wait for it) or went away (none do).
    pub fn shipper_connected(&self, connected: bool) {
        let mut window = self.window();
        window.shipper = connected.then(|| Shipper {
            untaken: VecDeque::new(),
            taken_through: Seq::ZERO,
            last_took: Instant::now(),
        });
        self.taken.notify_all();
    }

    /// Called before a large write: waits while a connected shipper has not taken a write
    /// kept `max_lag` ago, unless it has taken nothing for [`STALLED_AFTER`].
    pub fn wait_for_shipper(&self) -> Paced {
        let Some(max_lag) = self.max_lag else {
            return Paced::NotNeeded;
        };
        let started = Instant::now();
        let mut window = self.window();
        // Waited once the write has waited, whatever ends the wait.
        let mut paced = Paced::NotNeeded;
        let outcome = loop {
            let Some(shipper) = &window.shipper else {
                break paced;
            };
            let Some(&(_, oldest)) = shipper.untaken.front() else {
                break paced;
            };
            if oldest.elapsed() < max_lag {
                break paced;
            }
            let quiet = shipper.last_took.elapsed();
            if quiet >= self.stalled_after {
                break Paced::ShipperStalled;
            }
            paced = Paced::Waited;
            window.waiting += 1;
            window = self
                .taken
                .wait_timeout(window, self.stalled_after - quiet)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            window.waiting -= 1;
        };
        if paced == Paced::Waited {
            let report = window.held_up.add(started.elapsed());
            drop(window);
            if let Some(report) = report {
                report.log(max_lag);
            }
        }
        outcome
    }

    /// Writes waiting for the shipper now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.window().waiting
    }

    /// Large writes that waited for the shipper since the agent started, and the time they
    /// waited in all.
    pub fn held_up(&self) -> (u64, Duration) {
        let window = self.window();
        (window.held_up.writes, window.held_up.waited)
    }
}

impl Window {
    fn get(&self, seq: Seq) -> Option<Bytes> {
        let at = self
            .writes
            .binary_search_by_key(&seq, |kept| kept.seq)
            .ok()?;
        Some(self.writes[at].data.clone())
    }
}

impl Shipper {
    /// Write `seq` was kept at `now`: a run of its own, or the end of the newest.
    fn kept(&mut self, seq: Seq, now: Instant, max_runs: usize) {
        let full = self.untaken.len() >= max_runs;
        match self.untaken.back_mut() {
            Some((last, since)) if full || now.duration_since(*since) < RUN_GRANULE => {
                *last = seq;
            }
            _ => self.untaken.push_back((seq, now)),
        }
    }

    /// Every write through `seq` is taken. True when that finished a run (progress).
    fn took_through(&mut self, seq: Seq) -> bool {
        self.taken_through = self.taken_through.max(seq);
        let before = self.untaken.len();
        while self.untaken.front().is_some_and(|&(s, _)| s <= seq) {
            self.untaken.pop_front();
        }
        let progressed = self.untaken.len() < before;
        if progressed {
            self.last_took = Instant::now();
        }
        progressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MIB: usize = 1 << 20;
    const AN_HOUR: Duration = Duration::from_secs(3600);

    fn kept_mibs(recent: &RecentWrites, seqs: std::ops::RangeInclusive<u64>) {
        let mib = Bytes::from(vec![1u8; MIB]);
        for seq in seqs {
            recent.keep(Seq(seq), mib.clone());
        }
    }

    /// Waits, bounded, until `recent` has `count` writes waiting.
    fn until_waiting(recent: &RecentWrites, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while recent.waiting() != count {
            assert!(Instant::now() < deadline, "no write started waiting");
            std::thread::yield_now();
        }
    }

    /// A connected shipper that has taken none of writes 1..=3, with a bound of zero: any write
    /// waits for it.
    fn shipper_behind_on_three_writes() -> Arc<RecentWrites> {
        let recent = Arc::new(RecentWrites::new(Some(Duration::ZERO)));
        recent.shipper_connected(true);
        kept_mibs(&recent, 1..=3);
        recent
    }

    /// A write waiting on its own thread for the shipper of `recent`.
    fn waiting_writer(recent: &Arc<RecentWrites>) -> std::thread::JoinHandle<Paced> {
        let recent = recent.clone();
        std::thread::spawn(move || recent.wait_for_shipper())
    }

    #[test]
    fn recent_writes_hold_at_most_their_budget_and_forget_what_shipped() {
        let recent = RecentWrites::new(None);
        kept_mibs(&recent, 1..=100);
        assert_eq!(recent.window().bytes, RECENT_WRITES_BYTES);
        assert!(recent.get(Seq(36)).is_none());
        assert_eq!(recent.get(Seq(37)).map(|d| d.len()), Some(MIB));
        recent.forget_through(Seq(90));
        let window = recent.window();
        assert_eq!((window.bytes, window.writes.len()), (10 * MIB, 10));
        drop(window);
        assert!(recent.get(Seq(90)).is_none() && recent.get(Seq(91)).is_some());
    }

    #[test]
    fn a_write_waits_only_for_a_connected_shipper_behind_the_bound() {
        let unpaced = RecentWrites::new(None);
        unpaced.shipper_connected(true);
        kept_mibs(&unpaced, 1..=3);
        assert_eq!(unpaced.wait_for_shipper(), Paced::NotNeeded, "pacing off");

        let patient = RecentWrites::new(Some(AN_HOUR));
        patient.shipper_connected(true);
        kept_mibs(&patient, 1..=3);
        assert_eq!(
            patient.wait_for_shipper(),
            Paced::NotNeeded,
            "under the bound"
        );

        let strict = RecentWrites::new(Some(Duration::ZERO));
        kept_mibs(&strict, 1..=3);
        assert_eq!(strict.wait_for_shipper(), Paced::NotNeeded, "no shipper");
        strict.shipper_connected(true);
        assert_eq!(
            strict.wait_for_shipper(),
            Paced::NotNeeded,
            "writes kept before it connected are not its lag"
        );
        // The shipper may read a record before its data is kept: it is not behind on it.
        assert!(strict.take(Seq(4)).is_none());
        kept_mibs(&strict, 4..=4);
        assert_eq!(strict.wait_for_shipper(), Paced::NotNeeded, "already taken");
    }

    #[test]
    fn untaken_writes_are_noted_in_runs_of_bounded_number() {
        let mut shipper = Shipper {
            untaken: VecDeque::new(),
            taken_through: Seq::ZERO,
            last_took: Instant::now(),
        };
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        shipper.kept(Seq(1), at(0), 3);
        shipper.kept(Seq(2), at(9), 3);
        shipper.kept(Seq(3), at(10), 3);
        shipper.kept(Seq(4), at(30), 3);
        assert_eq!(
            shipper.untaken,
            [(Seq(2), at(0)), (Seq(3), at(10)), (Seq(4), at(30))]
        );
        // At the bound, a later write joins the newest run.
        shipper.kept(Seq(5), at(50), 3);
        assert_eq!(shipper.untaken.back(), Some(&(Seq(5), at(30))));
        // A run is taken once its last write is: until then its first write's age is the lag.
        assert!(shipper.took_through(Seq(2)));
        assert!(shipper.took_through(Seq(4)));
        assert_eq!(shipper.untaken, [(Seq(5), at(30))]);
        assert!(!shipper.took_through(Seq(4)), "nothing more taken");
    }

    #[test]
    fn a_write_behind_the_bound_waits_until_the_shipper_takes_every_old_write() {
        let recent = shipper_behind_on_three_writes();
        let writer = waiting_writer(&recent);
        until_waiting(&recent, 1);
        assert!(recent.take(Seq(2)).is_some());
        // Write 3 is still untaken (and older than a bound of zero): the write keeps waiting.
        assert_eq!(recent.waiting(), 1);
        assert!(recent.take(Seq(3)).is_some());
        assert_eq!(writer.join().unwrap(), Paced::Waited);
    }

    #[test]
    fn writes_that_waited_are_counted_with_the_time_they_waited() {
        let recent = shipper_behind_on_three_writes();
        assert_eq!(recent.held_up(), (0, Duration::ZERO));
        let spawned = Instant::now();
        let writers: Vec<_> = (0..2).map(|_| waiting_writer(&recent)).collect();
        until_waiting(&recent, 2);
        assert!(recent.take(Seq(3)).is_some());
        for writer in writers {
            assert_eq!(writer.join().unwrap(), Paced::Waited);
        }
        let (writes, waited) = recent.held_up();
        assert_eq!(writes, 2);
        assert!(
            waited > Duration::ZERO && waited <= 2 * spawned.elapsed(),
            "two writes, each waiting less than the test ran: counted {waited:?}"
        );
        // A write that need not wait adds nothing.
        assert_eq!(recent.wait_for_shipper(), Paced::NotNeeded);
        assert_eq!(recent.held_up().0, 2);
    }

    #[test]
    fn a_write_that_waited_for_a_stalled_shipper_is_counted_and_one_let_through_at_once_is_not() {
        let stall = Duration::from_millis(30);
        let recent = RecentWrites::with_stall(Some(Duration::ZERO), stall);
        let connected = Instant::now();
        recent.shipper_connected(true);
        kept_mibs(&recent, 1..=1);
        let asked = Instant::now();
        assert_eq!(recent.wait_for_shipper(), Paced::ShipperStalled);
        let answered = asked.elapsed();
        let (writes, waited) = recent.held_up();
        assert_eq!(writes, 1);
        // Let through once the shipper has taken nothing for `stall` since it connected.
        let at_least = stall.saturating_sub(asked - connected);
        assert!(
            waited >= at_least && waited <= answered,
            "counted {waited:?}, expected {at_least:?} to {answered:?}"
        );
        // The shipper has taken nothing for longer than the stall: the next write goes at once.
        assert_eq!(recent.wait_for_shipper(), Paced::ShipperStalled);
        assert_eq!(recent.held_up().0, 1);
    }

    #[test]
    fn held_up_writes_are_logged_at_once_then_summed_at_most_every_ten_seconds() {
        let ms = Duration::from_millis;
        let mut held_up = HeldUp::default();
        let first = held_up
            .add(ms(5))
            .expect("the first write held up is logged");
        assert_eq!(
            (first.writes, first.waited, first.since_last),
            (1, ms(5), None)
        );
        assert!(
            held_up.add(ms(7)).is_none(),
            "within ten seconds of the last line"
        );
        assert!(held_up.add(ms(11)).is_none());
        // Ten seconds on, the next line sums every write since the last one.
        let last = held_up.reported_at.unwrap();
        held_up.reported_at = last.checked_sub(HELD_UP_REPORT_EVERY);
        let next = held_up
            .add(ms(13))
            .expect("ten seconds after the last line");
        assert_eq!((next.writes, next.waited), (3, ms(31)));
        assert!(next.since_last.is_some_and(|s| s >= HELD_UP_REPORT_EVERY));
        assert_eq!((held_up.writes, held_up.waited), (4, ms(36)));
    }

    #[test]
    fn the_collectors_acknowledgement_counts_as_taken() {
        let recent = shipper_behind_on_three_writes();
        let writer = waiting_writer(&recent);
        until_waiting(&recent, 1);
        recent.forget_through(Seq(3));
        assert_eq!(writer.join().unwrap(), Paced::Waited);
    }

    #[test]
    fn a_write_stops_waiting_for_a_shipper_that_takes_nothing() {
        let recent = RecentWrites::with_stall(Some(Duration::ZERO), Duration::from_millis(50));
        let connected = Instant::now();
        recent.shipper_connected(true);
        kept_mibs(&recent, 1..=3);
        assert_eq!(recent.wait_for_shipper(), Paced::ShipperStalled);
        assert!(connected.elapsed() >= Duration::from_millis(50));
        // Taking a write is progress only once its whole run is taken: still stalled.
        assert!(recent.take(Seq(1)).is_some());
        assert_eq!(recent.wait_for_shipper(), Paced::ShipperStalled);
    }

    #[test]
    fn a_shipper_going_away_releases_the_waiting_writes() {
        let recent = shipper_behind_on_three_writes();
        let writers: Vec<_> = (0..3).map(|_| waiting_writer(&recent)).collect();
        until_waiting(&recent, 3);
        recent.shipper_connected(false);
        for writer in writers {
            assert_eq!(writer.join().unwrap(), Paced::Waited);
        }
    }
}
