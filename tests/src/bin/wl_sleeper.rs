//! Workload `wl_sleeper`: a trivial process that sleeps in a loop (for failure tests).
//!
//! Protocol: `READY pid=N`; on SIGUSR2 prints `PASS alive, N loop iterations` (the
//! iteration count must have grown since the previous verification, else `FAIL`).

use crm_tests::wl;

fn main() {
    wl::catch(libc::SIGUSR2);
    let mut iterations: u64 = 0;
    let mut last_verified: u64 = 0;
    wl::ready("sleeping");
    loop {
        if wl::take(libc::SIGUSR2) {
            let problems = if iterations > last_verified || iterations == 0 {
                Vec::new()
            } else {
                vec![format!("loop stuck at {iterations} iterations")]
            };
            wl::verdict(&format!("alive, {iterations} loop iterations"), &problems);
            last_verified = iterations;
        }
        iterations += 1;
        wl::sleep_ms(20);
    }
}
