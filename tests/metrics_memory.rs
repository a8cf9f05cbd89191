//! The metrics recorder's memory when nobody scrapes `/metrics`.
//!
//! A histogram keeps each sample it is given until they are folded into its
//! buckets. A scrape folds them, and so must the server on its own: a
//! process that nobody scrapes would otherwise grow by eight bytes with
//! every request it times. This binary counts the bytes its allocator holds
//! to see them go.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use ivschat_rooms::telemetry;

/// The system allocator, counting the bytes it holds for this process.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

/// Samples of a request's duration, as the access layer records them.
const SAMPLES: usize = 400_000;

#[tokio::test(start_paused = true)]
async fn timed_requests_are_folded_away_without_a_scrape() {
    telemetry::recorder();
    let listener = telemetry::bind("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("bind the metrics port");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(telemetry::serve(listener, async {
        let _ = stopped.await;
    }));
    let durations = metrics::histogram!(telemetry::REQUEST_DURATION, "method" => "test");
    // The server's first upkeep, which comes at once, is behind us.
    tokio::time::sleep(telemetry::UPKEEP_INTERVAL / 2).await;

    let before = held();
    for _ in 0..SAMPLES {
        durations.record(0.001);
    }
    let grown = held() - before;
    assert!(
        grown >= (SAMPLES * 8) as isize,
        "the histogram holds its samples until an upkeep: {SAMPLES} samples took only {grown} bytes"
    );

    // The next upkeep folds them. Their blocks are freed once every thread
    // has moved on (they are reclaimed by epochs, which recording advances).
    tokio::time::sleep(telemetry::UPKEEP_INTERVAL).await;
    let mut left = held() - before;
    for _ in 0..1000 {
        if left < grown / 10 {
            break;
        }
        for _ in 0..256 {
            durations.record(0.001);
        }
        tokio::task::yield_now().await;
        left = held() - before;
    }
    assert!(
        left < grown / 10,
        "{SAMPLES} samples took {grown} bytes and {left} are still held after an upkeep interval \
         ({:?}) without a scrape",
        telemetry::UPKEEP_INTERVAL
    );

    let _ = stop.send(());
    served
        .await
        .expect("the metrics server task")
        .expect("the metrics server stops cleanly");
}
