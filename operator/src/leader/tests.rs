//! The term's clock and the fence, without an API server (the election
//! itself is tested against a real one in `tests/leader.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tower::{Layer, Service, ServiceExt};

use super::*;

#[tokio::test]
async fn a_term_ends_by_the_clock_without_any_message() {
    let (_tx, mut leadership) = Leadership::until(Some(Instant::now() + Duration::from_millis(150)));
    assert!(leadership.is_leading());
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), leadership.lost()).await.expect("the term ends on its own");
    assert!(started.elapsed() >= Duration::from_millis(140), "{:?}", started.elapsed());
    assert!(!leadership.is_leading());
    assert_eq!(leadership.valid_until(), None);
}

#[tokio::test]
async fn a_renewal_extends_the_term_and_a_loss_ends_it_at_once() {
    let (tx, mut leadership) = Leadership::until(Some(Instant::now() + Duration::from_millis(100)));
    let renewer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_replace(Some(Instant::now() + Duration::from_millis(300)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(None);
        tx
    });
    let started = Instant::now();
    leadership.lost().await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(140) && took < Duration::from_millis(290), "{took:?}");
    drop(renewer.await);
}

fn counters() -> FenceCounters {
    FenceCounters {
        sent: prometheus::IntCounter::new("sent", "sent").unwrap(),
        refused: prometheus::IntCounter::new("refused", "refused").unwrap(),
    }
}

type Inner = tower::util::BoxCloneService<Request<Body>, Response<Body>, BoxError>;

/// A fenced service over an inner one that answers after `delay` and
/// counts the requests that reached it.
fn fenced(leadership: Leadership, counters: FenceCounters, delay: Duration) -> (Fenced<Inner>, Arc<AtomicUsize>) {
    let reached = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn({
        let reached = reached.clone();
        move |_request: Request<Body>| {
            reached.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(Response::new(Body::from(Vec::new())))
            }
        }
    });
    (FenceLayer::new(leadership, counters).layer(tower::util::BoxCloneService::new(inner)), reached)
}

fn request(method: Method) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri("/apis/apps/v1/namespaces/ns/deployments/m")
        .body(Body::from(Vec::new()))
        .unwrap()
}

#[tokio::test]
async fn the_fence_lets_reads_through_and_writes_only_within_a_term() {
    let counters = counters();
    let (tx, leadership) = Leadership::until(None);
    let (mut service, reached) = fenced(leadership, counters.clone(), Duration::ZERO);

    // Follower: reads go out, writes do not.
    service.ready().await.unwrap().call(request(Method::GET)).await.unwrap();
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let error = service.ready().await.unwrap().call(request(method)).await.unwrap_err();
        assert!(error.to_string().contains("not the leader"), "{error}");
    }
    assert_eq!((reached.load(Ordering::SeqCst), counters.sent.get(), counters.refused.get()), (1, 0, 4));

    // Leader: writes go out.
    tx.send_replace(Some(Instant::now() + Duration::from_secs(60)));
    service.ready().await.unwrap().call(request(Method::PATCH)).await.unwrap();
    assert_eq!((reached.load(Ordering::SeqCst), counters.sent.get()), (2, 1));

    // The term ended: refused again, with no message from the election.
    tx.send_replace(Some(Instant::now()));
    service.ready().await.unwrap().call(request(Method::PATCH)).await.unwrap_err();
    assert_eq!((reached.load(Ordering::SeqCst), counters.refused.get()), (2, 5));
}

#[tokio::test]
async fn a_write_in_flight_is_abandoned_when_the_term_ends() {
    let counters = counters();
    let (_tx, leadership) = Leadership::until(Some(Instant::now() + Duration::from_millis(100)));
    let (mut service, reached) = fenced(leadership, counters.clone(), Duration::from_secs(5));
    let started = Instant::now();
    let error = service.ready().await.unwrap().call(request(Method::PATCH)).await.unwrap_err();
    assert!(error.to_string().contains("term ended before the API server answered"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!((reached.load(Ordering::SeqCst), counters.sent.get(), counters.refused.get()), (1, 1, 1));
}
