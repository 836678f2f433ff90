//! Workload `wl_threads_avx`: four threads that keep distinctive values in vector,
//! mask and callee-saved general registers, and check them continuously.
//!
//! Each thread loads its own constants into ymm8–ymm15 and r12–r15 and, when the CPU
//! has AVX-512F and AVX-512BW, into zmm16–zmm31 and k1–k7; then it spins in one inline
//! asm loop that increments a per-thread progress counter and compares every register
//! with the constants in memory. On a mismatch it leaves the loop and records which
//! register differed. The registers are only ever set once, at the start, so after a
//! restore they hold exactly what the restore put there.
//!
//! Protocol: `READY pid=N mode=avx512|avx tids=T1,T2,T3,T4`; `progress P1 P2 P3 P4`
//! every 2 s; on SIGUSR2 prints `PASS ...` if every thread's counter advances (over
//! 200 ms, waiting up to 2 s on a loaded machine), no thread recorded a mismatch, the
//! constants in memory are intact and all four TIDs recorded at start are still in
//! `/proc/self/task`; else `FAIL ...`.
//! `CRM_WL_NO_AVX512=1` forces the AVX-only variant (to test it on AVX-512 machines).
//! Hook: `CRM_WL_CORRUPT=1` changes one expected constant of thread 0 in memory before
//! verifying, which its loop reports as a register mismatch.
//! Exits with 3 if the CPU has no AVX (the tests skip before starting it).

use std::arch::asm;
use std::mem::offset_of;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crm_tests::wl;

const THREADS: usize = 4;

/// The constants one thread keeps in its registers. The asm below addresses the fields
/// with literal offsets, checked by the assertions that follow.
#[repr(C, align(64))]
#[derive(Clone, Copy, PartialEq, Eq)]
struct Expected {
    zmm: [[u64; 8]; 16], // zmm16..zmm31
    ymm: [[u64; 4]; 8],  // ymm8..ymm15
    k: [u64; 7],         // k1..k7
    gp: [u64; 4],        // r12..r15
}

const _: () = assert!(offset_of!(Expected, zmm) == 0);
const _: () = assert!(offset_of!(Expected, ymm) == 1024);
const _: () = assert!(offset_of!(Expected, k) == 1280);
const _: () = assert!(offset_of!(Expected, gp) == 1336);

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: distinct inputs give distinct, irregular outputs.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Expected {
    fn for_thread(t: usize) -> Expected {
        let v = |kind: u64, reg: usize, lane: usize| {
            mix(((t as u64 + 1) << 40) | (kind << 32) | ((reg as u64) << 8) | lane as u64)
        };
        let mut e = Expected {
            zmm: [[0; 8]; 16],
            ymm: [[0; 4]; 8],
            k: [0; 7],
            gp: [0; 4],
        };
        for (r, reg) in e.zmm.iter_mut().enumerate() {
            for (l, lane) in reg.iter_mut().enumerate() {
                *lane = v(1, r + 16, l);
            }
        }
        for (r, reg) in e.ymm.iter_mut().enumerate() {
            for (l, lane) in reg.iter_mut().enumerate() {
                *lane = v(2, r + 8, l);
            }
        }
        for (r, k) in e.k.iter_mut().enumerate() {
            *k = v(3, r + 1, 0);
        }
        for (r, g) in e.gp.iter_mut().enumerate() {
            *g = v(4, r + 12, 0);
        }
        e
    }
}

/// Name of the register behind a mismatch code returned by the spin loops.
fn reg_name(code: u64) -> String {
    match code {
        8..=31 => format!("{}{code}", if code < 16 { "ymm" } else { "zmm" }),
        41..=47 => format!("k{}", code - 40),
        52..=55 => format!("r{}", code - 40),
        _ => format!("unknown register code {code}"),
    }
}

macro_rules! load_zmm {
    ($n:literal, $off:literal) => {
        concat!("vmovdqa64 zmm", $n, ", zmmword ptr [rsi + ", $off, "]")
    };
}
macro_rules! load_ymm {
    ($n:literal, $off:literal) => {
        concat!("vmovdqa ymm", $n, ", ymmword ptr [rsi + ", $off, "]")
    };
}
macro_rules! load_k {
    ($n:literal, $off:literal) => {
        concat!("kmovq k", $n, ", qword ptr [rsi + ", $off, "]")
    };
}
macro_rules! load_gp {
    ($n:literal, $off:literal) => {
        concat!("mov r", $n, ", qword ptr [rsi + ", $off, "]")
    };
}
// Each check leaves the register's code in ecx and jumps to 3 on a mismatch.
macro_rules! chk_zmm {
    ($n:literal, $off:literal) => {
        concat!(
            "vpcmpeqq k0, zmm",
            $n,
            ", zmmword ptr [rsi + ",
            $off,
            "]\n",
            "kmovw eax, k0\n",
            "mov ecx, ",
            $n,
            "\n",
            "cmp eax, 0xff\n",
            "jne 3f"
        )
    };
}
macro_rules! chk_ymm {
    ($n:literal, $off:literal) => {
        concat!(
            "vxorps ymm0, ymm",
            $n,
            ", ymmword ptr [rsi + ",
            $off,
            "]\n",
            "mov ecx, ",
            $n,
            "\n",
            "vptest ymm0, ymm0\n",
            "jnz 3f"
        )
    };
}
macro_rules! chk_k {
    ($n:literal, $off:literal) => {
        concat!(
            "kmovq rax, k",
            $n,
            "\n",
            "mov ecx, 4",
            $n,
            "\n",
            "cmp rax, qword ptr [rsi + ",
            $off,
            "]\n",
            "jne 3f"
        )
    };
}
macro_rules! chk_gp {
    ($n:literal, $off:literal) => {
        concat!(
            "mov ecx, 5",
            $n,
            "\n",
            "cmp r1",
            $n,
            ", qword ptr [rsi + ",
            $off,
            "]\n",
            "jne 3f"
        )
    };
}

/// Spins with constants in ymm8–15, zmm16–31, k1–k7, r12–r15 until a register
/// differs from `expected`; returns the register's code.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `progress` must be valid for writes
/// and `expected` for reads for as long as the loop runs (forever, normally).
#[target_feature(enable = "avx,avx512f,avx512bw")]
unsafe fn spin_avx512(progress: *mut u64, expected: *const Expected) -> u64 {
    let code: u64;
    // SAFETY: the caller guarantees the CPU features and the validity of both
    // pointers; every register the asm writes is declared as clobbered; it does not
    // touch the stack.
    unsafe {
        asm!(
            load_zmm!(16, 0), load_zmm!(17, 64), load_zmm!(18, 128), load_zmm!(19, 192),
            load_zmm!(20, 256), load_zmm!(21, 320), load_zmm!(22, 384), load_zmm!(23, 448),
            load_zmm!(24, 512), load_zmm!(25, 576), load_zmm!(26, 640), load_zmm!(27, 704),
            load_zmm!(28, 768), load_zmm!(29, 832), load_zmm!(30, 896), load_zmm!(31, 960),
            load_ymm!(8, 1024), load_ymm!(9, 1056), load_ymm!(10, 1088), load_ymm!(11, 1120),
            load_ymm!(12, 1152), load_ymm!(13, 1184), load_ymm!(14, 1216), load_ymm!(15, 1248),
            load_k!(1, 1280), load_k!(2, 1288), load_k!(3, 1296), load_k!(4, 1304),
            load_k!(5, 1312), load_k!(6, 1320), load_k!(7, 1328),
            load_gp!(12, 1336), load_gp!(13, 1344), load_gp!(14, 1352), load_gp!(15, 1360),
            "2:",
            "add qword ptr [rdi], 1",
            chk_zmm!(16, 0), chk_zmm!(17, 64), chk_zmm!(18, 128), chk_zmm!(19, 192),
            chk_zmm!(20, 256), chk_zmm!(21, 320), chk_zmm!(22, 384), chk_zmm!(23, 448),
            chk_zmm!(24, 512), chk_zmm!(25, 576), chk_zmm!(26, 640), chk_zmm!(27, 704),
            chk_zmm!(28, 768), chk_zmm!(29, 832), chk_zmm!(30, 896), chk_zmm!(31, 960),
            chk_ymm!(8, 1024), chk_ymm!(9, 1056), chk_ymm!(10, 1088), chk_ymm!(11, 1120),
            chk_ymm!(12, 1152), chk_ymm!(13, 1184), chk_ymm!(14, 1216), chk_ymm!(15, 1248),
            chk_k!(1, 1280), chk_k!(2, 1288), chk_k!(3, 1296), chk_k!(4, 1304),
            chk_k!(5, 1312), chk_k!(6, 1320), chk_k!(7, 1328),
            chk_gp!(2, 1336), chk_gp!(3, 1344), chk_gp!(4, 1352), chk_gp!(5, 1360),
            "pause",
            "jmp 2b",
            "3:",
            in("rdi") progress,
            in("rsi") expected,
            out("rcx") code,
            out("rax") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("zmm0") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            out("k0") _, out("k1") _, out("k2") _, out("k3") _,
            out("k4") _, out("k5") _, out("k6") _, out("k7") _,
            options(nostack),
        );
    }
    code
}

/// Like [`spin_avx512`] with ymm8–15 and r12–r15 only.
///
/// # Safety
/// The CPU must support AVX; pointers as for [`spin_avx512`].
#[target_feature(enable = "avx")]
unsafe fn spin_avx(progress: *mut u64, expected: *const Expected) -> u64 {
    let code: u64;
    // SAFETY: the caller guarantees AVX and the validity of both pointers; every
    // register the asm writes is declared as clobbered; it does not touch the stack.
    unsafe {
        asm!(
            load_ymm!(8, 1024), load_ymm!(9, 1056), load_ymm!(10, 1088), load_ymm!(11, 1120),
            load_ymm!(12, 1152), load_ymm!(13, 1184), load_ymm!(14, 1216), load_ymm!(15, 1248),
            load_gp!(12, 1336), load_gp!(13, 1344), load_gp!(14, 1352), load_gp!(15, 1360),
            "2:",
            "add qword ptr [rdi], 1",
            chk_ymm!(8, 1024), chk_ymm!(9, 1056), chk_ymm!(10, 1088), chk_ymm!(11, 1120),
            chk_ymm!(12, 1152), chk_ymm!(13, 1184), chk_ymm!(14, 1216), chk_ymm!(15, 1248),
            chk_gp!(2, 1336), chk_gp!(3, 1344), chk_gp!(4, 1352), chk_gp!(5, 1360),
            "pause",
            "jmp 2b",
            "3:",
            in("rdi") progress,
            in("rsi") expected,
            out("rcx") code,
            out("rax") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("ymm0") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        );
    }
    code
}

/// Per-thread state shared with the main thread.
struct Slot {
    /// Incremented by the asm loop (a plain `add`; read here with relaxed loads).
    progress: AtomicU64,
    /// 0, or the code of the register that differed.
    fail: AtomicU64,
    /// gettid() recorded by the thread at start.
    tid: AtomicI32,
    /// The thread's constants (leaked; the asm reads them, the corruption hook writes).
    expected: AtomicPtr<Expected>,
}

fn main() {
    if !std::arch::is_x86_feature_detected!("avx") {
        wl::say("SETUP-ERROR no AVX on this CPU");
        std::process::exit(3);
    }
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::env::var_os("CRM_WL_NO_AVX512").is_none();
    let mode = if avx512 { "avx512" } else { "avx" };
    wl::catch(libc::SIGUSR2);
    let corrupt = wl::corrupt_requested();

    let slots: &'static [Slot] = Box::leak(
        (0..THREADS)
            .map(|t| Slot {
                progress: AtomicU64::new(0),
                fail: AtomicU64::new(0),
                tid: AtomicI32::new(0),
                expected: AtomicPtr::new(Box::into_raw(Box::new(Expected::for_thread(t)))),
            })
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    for (t, slot) in slots.iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("spin{t}"))
            .spawn(move || {
                slot.tid.store(wl::gettid(), Ordering::SeqCst);
                let progress = slot.progress.as_ptr();
                let expected = slot.expected.load(Ordering::SeqCst);
                let code = if avx512 {
                    // SAFETY: AVX-512F/BW were detected at run time; both pointers
                    // point into leaked ('static) allocations.
                    unsafe { spin_avx512(progress, expected) }
                } else {
                    // SAFETY: AVX was detected at run time; both pointers point into
                    // leaked ('static) allocations.
                    unsafe { spin_avx(progress, expected) }
                };
                slot.fail.store(code, Ordering::SeqCst);
            })
            .unwrap_or_else(|_| wl::fail_setup("spawning a thread"));
    }
    let started = Instant::now();
    while slots
        .iter()
        .any(|s| s.tid.load(Ordering::SeqCst) == 0 || s.progress.load(Ordering::Relaxed) == 0)
    {
        if started.elapsed() > Duration::from_secs(30) {
            wl::say("SETUP-ERROR threads did not start spinning");
            std::process::exit(2);
        }
        wl::sleep_ms(5);
    }
    let tids: Vec<i32> = slots.iter().map(|s| s.tid.load(Ordering::SeqCst)).collect();
    let tid_list = tids
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    wl::ready(&format!("mode={mode} tids={tid_list}"));

    let regs = if avx512 {
        "ymm8-15 zmm16-31 k1-7 r12-15"
    } else {
        "ymm8-15 r12-15"
    };
    let mut last_print = Instant::now();
    loop {
        if wl::take(libc::SIGUSR2) {
            if corrupt {
                let e = slots[0].expected.load(Ordering::SeqCst);
                // SAFETY: `e` points to thread 0's leaked Expected; a volatile write of
                // one in-bounds u64 is what the hook wants the spinning thread to see.
                unsafe {
                    let p = if avx512 {
                        std::ptr::addr_of_mut!((*e).zmm[1][3])
                    } else {
                        std::ptr::addr_of_mut!((*e).ymm[1][3])
                    };
                    p.write_volatile(p.read_volatile() ^ 1);
                }
            }
            verify(slots, &tids, regs);
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            let p: Vec<String> = slots
                .iter()
                .map(|s| s.progress.load(Ordering::Relaxed).to_string())
                .collect();
            wl::say(&format!("progress {}", p.join(" ")));
            last_print = Instant::now();
        }
        wl::sleep_ms(10);
    }
}

fn verify(slots: &[Slot], tids: &[i32], regs: &str) {
    let mut problems = Vec::new();
    // Progress: every counter must move; allow up to 2 s on a loaded 2-core machine.
    let before: Vec<u64> = slots
        .iter()
        .map(|s| s.progress.load(Ordering::Relaxed))
        .collect();
    let t0 = Instant::now();
    wl::sleep_ms(150);
    let mut after;
    loop {
        wl::sleep_ms(50);
        after = slots
            .iter()
            .map(|s| s.progress.load(Ordering::Relaxed))
            .collect::<Vec<_>>();
        if after.iter().zip(&before).all(|(a, b)| a > b) || t0.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let waited = t0.elapsed();
    for (t, (a, b)) in after.iter().zip(&before).enumerate() {
        if a <= b {
            problems.push(format!(
                "thread {t} made no progress in {waited:.1?} (stuck at {a})"
            ));
        }
    }
    for (t, s) in slots.iter().enumerate() {
        let code = s.fail.load(Ordering::SeqCst);
        if code != 0 {
            problems.push(format!(
                "thread {t}: {} differs from its constant",
                reg_name(code)
            ));
        }
        let e = s.expected.load(Ordering::SeqCst);
        // SAFETY: `e` points to a leaked, properly aligned Expected that no one frees;
        // the volatile read copies it while the owning thread only reads it.
        let now = unsafe { e.read_volatile() };
        if now != Expected::for_thread(t) {
            problems.push(format!("thread {t}: constants in memory were modified"));
        }
    }
    let present = std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for (t, tid) in tids.iter().enumerate() {
        if !present.contains(tid) {
            problems.push(format!(
                "thread {t}: tid {tid} not in /proc/self/task {present:?}"
            ));
        }
    }
    let deltas: Vec<String> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b).to_string())
        .collect();
    wl::verdict(
        &format!(
            "{} threads advanced ({} iterations in {waited:.1?}), registers {regs} intact, tids {} present",
            slots.len(),
            deltas.join(","),
            tids.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
        ),
        &problems,
    );
}
