//! The server-wide in-flight bytes budget: the wire bytes of every request
//! being received, decoded, queued or executed, on gRPC and HTTP together.
//!
//! Decoding is bounded per byte (`ferrite_proto::wire`, `http::json`); this
//! bounds the bytes. A request body is counted frame by frame as it
//! arrives, and its bytes stay counted until its response has been sent
//! (a ModelStreamInfer stream: each message from its decoding until its
//! responses are sent). A request that would take the total past the
//! budget is refused: RESOURCE_EXHAUSTED on gRPC, 429 on HTTP (before the
//! body is read when it has a Content-Length). Exported as
//! `ferrite_inflight_request_bytes`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::error::{ErrorKind, InferError};
use crate::metrics::METRICS;

/// The error type of the bodies below.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The budget, shared by every request of the server.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        METRICS.inflight_bytes_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        Arc::new(Budget { limit, used: AtomicUsize::new(0) })
    }

    /// A new, empty hold on the budget, released when dropped.
    pub(crate) fn hold(self: &Arc<Self>) -> Hold {
        Hold { budget: self.clone(), held: AtomicUsize::new(0) }
    }

    /// Whether `bytes` more would fit now (taking nothing).
    pub(crate) fn has_room(&self, bytes: usize) -> bool {
        let fits = self.used.load(Ordering::Acquire).checked_add(bytes).is_some_and(|total| total <= self.limit);
        if !fits {
            METRICS.inflight_bytes_refused.inc();
        }
        fits
    }

    fn try_take(&self, bytes: usize) -> bool {
        let taken = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|&total| total <= self.limit)
        });
        match taken {
            Ok(_) => {
                METRICS.inflight_bytes.add(bytes as i64);
                true
            }
            Err(_) => {
                METRICS.inflight_bytes_refused.inc();
                false
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        METRICS.inflight_bytes.sub(bytes as i64);
    }

    /// The error a refused request gets.
    pub(crate) fn refusal(&self) -> InferError {
        InferError::new(
            ErrorKind::QueueFull,
            format!(
                "the server is busy: requests in flight already hold {} of its {} bytes (--max-inflight-bytes); \
                 try again later",
                self.used.load(Ordering::Acquire),
                self.limit
            ),
        )
    }
}

/// Bytes one request holds on the budget.
#[derive(Debug)]
pub(crate) struct Hold {
    budget: Arc<Budget>,
    held: AtomicUsize,
}

impl Hold {
    /// Holds `bytes` more; false (holding nothing more) if the budget has
    /// no room for them.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let taken = self.budget.try_take(bytes);
        if taken {
            self.held.fetch_add(bytes, Ordering::AcqRel);
        }
        taken
    }

    pub(crate) fn refusal(&self) -> InferError {
        self.budget.refusal()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.budget.give_back(held);
        }
    }
}

/// A request body whose data frames are taken from the budget as they
/// arrive, and that fails once its timeout passes before its end
/// (DEADLINE_EXCEEDED; HTTP answers 408).
pub(crate) struct Counted<B> {
    inner: B,
    hold: Arc<Hold>,
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    /// How a refusal reaches the protocol (a gRPC `Status`, an `InferError`).
    refuse: fn(InferError) -> BoxError,
}

impl<B> Counted<B> {
    pub(crate) fn new(
        inner: B,
        hold: Arc<Hold>,
        timeout: Option<Duration>,
        refuse: fn(InferError) -> BoxError,
    ) -> Self {
        let deadline = timeout.map(|t| (Box::pin(tokio::time::sleep(t)), t));
        Counted { inner, hold, deadline, refuse }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if let Some((sleep, timeout)) = &mut this.deadline {
                    ready!(sleep.as_mut().poll(cx));
                    let message = format!(
                        "the request body was not received within {} s (--body-read-timeout-seconds)",
                        timeout.as_secs()
                    );
                    return Poll::Ready(Some(Err((this.refuse)(InferError::new(
                        ErrorKind::DeadlineExceeded,
                        message,
                    )))));
                }
                return Poll::Pending;
            }
        };
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                if this.hold.take(len) {
                    Some(Ok(frame))
                } else {
                    Some(Err((this.refuse)(this.hold.refusal())))
                }
            }
            Some(Err(error)) => Some(Err(error.into())),
            None => {
                this.deadline = None;
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request's bytes held until it is sent.
pub(crate) struct Held<B> {
    inner: B,
    _hold: Arc<Hold>,
}

impl<B> Held<B> {
    pub(crate) fn new(inner: B, hold: Arc<Hold>) -> Self {
        Held { inner, _hold: hold }
    }
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn used(budget: &Budget) -> usize {
        budget.used.load(Ordering::Acquire)
    }

    #[test]
    fn holds_take_until_the_limit_and_give_back_when_dropped() {
        let budget = Budget::new(100);
        let first = budget.hold();
        assert!(first.take(60) && first.take(0));
        let second = budget.hold();
        assert!(!second.take(41), "over the limit");
        assert!(second.take(40));
        assert_eq!(used(&budget), 100);
        drop(first);
        assert_eq!(used(&budget), 40);
        assert_eq!(second.refusal().kind, ErrorKind::QueueFull);
        drop(second);
        assert_eq!(used(&budget), 0);
    }

    #[tokio::test]
    async fn a_body_takes_its_frames_as_they_come_and_fails_when_refused() {
        let budget = Budget::new(10);
        let refuse = |error: InferError| -> BoxError { Box::new(error) };
        let hold = Arc::new(budget.hold());
        assert!(budget.has_room(10) && !budget.has_room(11));
        let body = http_body_util::Full::new(Bytes::from_static(b"123456"));
        let collected = Counted::new(body, hold.clone(), None, refuse).collect().await;
        assert_eq!(collected.unwrap().to_bytes().len(), 6);
        assert_eq!(used(&budget), 6, "the bytes received");
        assert!(!budget.has_room(5), "a declared length that does not fit now");

        let big = http_body_util::Full::new(Bytes::from(vec![0u8; 5]));
        let error = Counted::new(big, Arc::new(budget.hold()), None, refuse).collect().await.unwrap_err();
        assert_eq!(error.downcast_ref::<InferError>().map(|e| e.kind), Some(ErrorKind::QueueFull));
        drop(hold);
        assert_eq!(used(&budget), 0);
    }

    #[tokio::test]
    async fn a_body_that_stalls_fails_after_its_timeout() {
        let refuse = |error: InferError| -> BoxError { Box::new(error) };
        let stalled = http_body_util::StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, BoxError>>());
        let body = Counted::new(stalled, Arc::new(Budget::new(10).hold()), Some(Duration::from_millis(50)), refuse);
        let error = body.collect().await.unwrap_err();
        let error = error.downcast_ref::<InferError>().unwrap();
        assert_eq!(error.kind, ErrorKind::DeadlineExceeded);
        assert!(error.message.contains("--body-read-timeout-seconds"), "{error}");
    }
}
