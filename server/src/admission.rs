//! Admission: the bounded waiting queue in front of every backend, with
//! the one rule for refusing a request (the model is closing: UNAVAILABLE;
//! the queue is full: QUEUE_FULL), and its depth published as
//! `ferrite_queue_depth`. The tensor scheduler and the LLM engine each keep
//! one behind their own lock.

use std::collections::VecDeque;

use prometheus::IntGauge;

use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::Priority;

/// Waiting requests in two lanes: every high-priority one leaves before
/// any normal one; each lane is first come, first served.
pub(crate) struct Admission<T> {
    high: VecDeque<T>,
    normal: VecDeque<T>,
    capacity: usize,
    closed: bool,
    depth: IntGauge,
}

impl<T> Admission<T> {
    /// An open queue holding at most `capacity` requests, its length
    /// published in `depth`.
    pub(crate) fn new(capacity: usize, depth: IntGauge) -> Admission<T> {
        depth.set(0);
        Admission { high: VecDeque::new(), normal: VecDeque::new(), capacity: capacity.max(1), closed: false, depth }
    }

    /// Queues `item`, or refuses it.
    pub(crate) fn admit(&mut self, priority: Priority, item: T) -> InferResult<()> {
        if self.closed {
            return Err(InferError::new(ErrorKind::Unavailable, "the model is shutting down"));
        }
        if self.len() >= self.capacity {
            return Err(InferError::new(
                ErrorKind::QueueFull,
                format!("the queue is full ({} requests waiting)", self.len()),
            ));
        }
        match priority {
            Priority::High => self.high.push_back(item),
            Priority::Normal => self.normal.push_back(item),
        }
        self.publish();
        Ok(())
    }

    /// Requests waiting.
    pub(crate) fn len(&self) -> usize {
        self.high.len() + self.normal.len()
    }

    /// Whether none waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses every later request; those waiting stay.
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    /// Whether [`close`](Admission::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// The waiting requests, in leaving order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.high.iter().chain(self.normal.iter())
    }

    /// The request that leaves next, to work on in place (the encoder takes
    /// a long request's inputs a batch at a time).
    pub(crate) fn front_mut(&mut self) -> Option<&mut T> {
        if self.high.is_empty() {
            self.normal.front_mut()
        } else {
            self.high.front_mut()
        }
    }

    /// Takes the request that leaves next.
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let item = self.high.pop_front().or_else(|| self.normal.pop_front());
        self.publish();
        item
    }

    /// Keeps only the requests `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.high.retain(&mut keep);
        self.normal.retain(&mut keep);
        self.publish();
    }

    /// Takes the first request `matches` accepts, in leaving order, out of
    /// the queue.
    pub(crate) fn remove_first(&mut self, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let item = [&mut self.high, &mut self.normal].into_iter().find_map(|lane| {
            let at = lane.iter().position(&mut matches)?;
            lane.remove(at)
        });
        self.publish();
        item
    }

    /// Moves requests out in leaving order while `take` says so: `Some(true)`
    /// takes the request, `Some(false)` leaves it and looks further,
    /// `None` stops.
    pub(crate) fn drain_where(&mut self, mut take: impl FnMut(&T) -> Option<bool>, mut into: impl FnMut(T)) {
        'lanes: for lane in [&mut self.high, &mut self.normal] {
            let mut at = 0;
            while at < lane.len() {
                match take(&lane[at]) {
                    None => break 'lanes,
                    Some(false) => at += 1,
                    Some(true) => into(lane.remove(at).expect("index in range")),
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        self.depth.set(self.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize) -> Admission<u32> {
        Admission::new(capacity, IntGauge::new("depth", "test").unwrap())
    }

    #[test]
    fn high_priority_leaves_first_then_arrival_order() {
        let mut q = queue(8);
        for (priority, item) in [(Priority::Normal, 1), (Priority::High, 2), (Priority::Normal, 3), (Priority::High, 4)]
        {
            q.admit(priority, item).unwrap();
        }
        assert_eq!(q.depth.get(), 4);
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_front()).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
        assert_eq!(q.depth.get(), 0);
    }

    #[test]
    fn full_and_closed_queues_refuse() {
        let mut q = queue(2);
        q.admit(Priority::Normal, 1).unwrap();
        q.admit(Priority::High, 2).unwrap();
        assert_eq!(q.admit(Priority::High, 3).unwrap_err().kind, ErrorKind::QueueFull);
        q.close();
        q.pop_front();
        assert_eq!(q.admit(Priority::Normal, 4).unwrap_err().kind, ErrorKind::Unavailable);
        assert_eq!(q.len(), 1, "closing keeps what waits");
    }

    #[test]
    fn removing_and_draining_keep_the_rest_in_order() {
        let mut q = queue(8);
        for item in 1..=6 {
            q.admit(if item % 2 == 0 { Priority::High } else { Priority::Normal }, item).unwrap();
        }
        assert_eq!(q.remove_first(|&i| i == 3), Some(3));
        let mut taken = Vec::new();
        q.drain_where(|&i| if i == 5 { None } else { Some(i != 4) }, |i| taken.push(i));
        assert_eq!(taken, vec![2, 6, 1], "stops at 5, leaves 4");
        assert_eq!(std::iter::from_fn(|| q.pop_front()).collect::<Vec<_>>(), vec![4, 5]);
    }
}
