//! Workload `wl_counter`: a single-threaded counter.
//!
//! The counter lives on the heap; a shadow copy lives on the stack. Every ~10 ms both
//! are incremented; every 100 increments `count N` is printed.
//!
//! Protocol: `READY pid=N heap=0xADDR`; on SIGUSR2 prints `PASS count=N ...` if the
//! heap counter equals its stack shadow and is larger than at the previous
//! verification, else `FAIL ...`. After a restore the next `count` line continues
//! from the dumped value (the test checks that it does not restart from 0).
//! Hook: `CRM_WL_CORRUPT=1` adds 7 to the heap counter before verifying.

use std::hint::black_box;

use crm_tests::wl;

fn main() {
    wl::catch(libc::SIGUSR2);
    let corrupt = wl::corrupt_requested();
    let mut heap: Box<u64> = Box::new(0);
    let mut shadow: u64 = 0;
    let mut last_verified: u64 = 0;
    wl::ready(&format!("heap={:p}", &*heap));
    loop {
        if wl::take(libc::SIGUSR2) {
            if corrupt {
                *heap += 7;
            }
            let (h, s) = (**black_box(&heap), *black_box(&shadow));
            let mut problems = Vec::new();
            if h != s {
                problems.push(format!("heap count {h} != stack shadow {s}"));
            }
            if h <= last_verified && last_verified != 0 {
                problems.push(format!(
                    "count {h} did not increase since last check ({last_verified})"
                ));
            }
            wl::verdict(
                &format!("count={h} shadow={s} increased since last check ({last_verified})"),
                &problems,
            );
            last_verified = h;
        }
        *heap += 1;
        // black_box keeps the shadow in memory (on the stack), not only in a register.
        shadow = black_box(shadow) + 1;
        black_box(&mut shadow);
        if heap.is_multiple_of(100) {
            wl::say(&format!("count {}", *heap));
        }
        wl::sleep_ms(10);
    }
}
