//! The argument block shared by the engine and the restorer blob.
//!
//! This file is compiled twice: into the `#![no_std]` restorer blob and into
//! `crm-engine` (as `crate::restore::abi`). Everything is `#[repr(C)]`, made of
//! integers only (addresses are `u64`), so both sides agree on the layout
//! without sharing any code. The engine fills one `RestoreArgs` plus the
//! arrays it points to inside the restore zone, then jumps to the blob.

/// `RestoreArgs::magic`: guards against a stale or foreign argument block.
pub const ARGS_MAGIC: u64 = 0x4352_4d5f_5253_5431; // "CRM_RST1"

/// Value in `r15` at the blob's final `int3` when a thread finished its work.
pub const TRAP_OK: u64 = 0x600d_600d_600d_600d;
/// Value in `r15` at an `int3` that reports a failure; `r14` = step,
/// `r13` = negative errno, `r12` = detail (an address or an index).
pub const TRAP_FAIL: u64 = 0xbad0_bad0_bad0_bad0;

/// Steps named in a failure report (`r14`).
pub mod step {
    pub const RSEQ_UNREGISTER: u64 = 1;
    pub const MUNMAP: u64 = 2;
    pub const MOVE_SPECIAL: u64 = 3;
    pub const MOVE_VMA: u64 = 4;
    pub const MM_MAP: u64 = 5;
    pub const SIGACTION: u64 = 6;
    pub const PERSONALITY: u64 = 7;
    pub const CLONE_THREAD: u64 = 8;
    pub const SET_TID_ADDRESS: u64 = 9;
    pub const ROBUST_LIST: u64 = 10;
    pub const SIGALTSTACK: u64 = 11;
    pub const RSEQ_REGISTER: u64 = 12;
    pub const SIGQUEUE: u64 = 13;
    pub const CREDS: u64 = 14;
    pub const ITIMER: u64 = 15;
    pub const RLIMIT: u64 = 16;
    pub const CLOSE: u64 = 17;
    pub const NAME: u64 = 18;
    pub const BAD_ARGS: u64 = 19;
    pub const UMASK: u64 = 20;
    pub const POSIX_TIMER: u64 = 21;
    pub const POSIX_TIMER_ID: u64 = 22;
    pub const POSIX_TIMER_SET: u64 = 23;

    /// A human name for a step number, for error messages.
    pub fn name(step: u64) -> &'static str {
        match step {
            RSEQ_UNREGISTER => "unregister the inherited rseq area",
            MUNMAP => "unmap the restorer's own memory",
            MOVE_SPECIAL => "move [vvar]/[vvar_vclock]/[vdso]",
            MOVE_VMA => "move a premapped VMA to its address",
            MM_MAP => "prctl(PR_SET_MM_MAP)",
            SIGACTION => "rt_sigaction",
            PERSONALITY => "personality",
            CLONE_THREAD => "clone3(set_tid) of a thread",
            SET_TID_ADDRESS => "set_tid_address",
            ROBUST_LIST => "set_robust_list",
            SIGALTSTACK => "sigaltstack",
            RSEQ_REGISTER => "rseq registration",
            SIGQUEUE => "queue a pending signal",
            CREDS => "restore credentials",
            ITIMER => "setitimer",
            POSIX_TIMER => "timer_create of a POSIX timer (detail: its ID)",
            POSIX_TIMER_ID => {
                "timer_create gave another ID (kernel without PR_TIMER_CREATE_RESTORE_IDS?)"
            }
            POSIX_TIMER_SET => "timer_settime of a POSIX timer (detail: its ID)",
            RLIMIT => "prlimit",
            CLOSE => "close the restorer's descriptors",
            NAME => "prctl(PR_SET_NAME)",
            BAD_ARGS => "check the argument block",
            UMASK => "umask",
            _ => "unknown step",
        }
    }
}

/// An address range `[start, start + len)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

/// Move a premapped area to its final address with `mremap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmaMove {
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

/// `struct prctl_mm_map` of `<linux/prctl.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// The kernel's `struct sigaction` for `rt_sigaction` on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// `struct itimerval` (microseconds resolution).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ITimerVal {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

/// Most POSIX timers (timer_create) a task may have in an image.
pub const MAX_POSIX_TIMERS: usize = 32;

/// The kernel's `struct sigevent` (64 bytes on x86-64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelSigevent {
    pub value: u64,
    pub signo: i32,
    pub notify: i32,
    /// `sigev_notify_thread_id` for SIGEV_THREAD_ID.
    pub tid: i32,
    pub pad: [i32; 11],
}

/// `struct timespec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// One POSIX timer to create with its original ID and arm.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PosixTimerArgs {
    pub id: i32,
    pub clock: i32,
    pub sigev: KernelSigevent,
    /// `struct itimerspec`: interval, then time left (zero: disarmed).
    pub interval: Timespec,
    pub value: Timespec,
}

/// `struct rlimit64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RLimit64 {
    pub cur: u64,
    pub max: u64,
}

/// `struct clone_args` of `clone3(2)` (version 2, 88 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// Credentials applied by every thread (creds are per thread in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CredsArgs {
    /// 0: leave the restorer's own credentials (they already match).
    pub apply: u64,
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub ngroups: u64,
    pub groups: [u32; 64],
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub securebits: u64,
    pub no_new_privs: u64,
}

impl Default for CredsArgs {
    fn default() -> Self {
        CredsArgs {
            apply: 0,
            uids: [0; 4],
            gids: [0; 4],
            ngroups: 0,
            groups: [0; 64],
            cap_inh: 0,
            cap_prm: 0,
            cap_eff: 0,
            cap_bnd: 0,
            cap_amb: 0,
            securebits: 0,
            no_new_privs: 0,
        }
    }
}

/// Size of every thread's restorer stack (the engine reserves it).
pub const STACK_SIZE: u64 = 64 * 1024;

/// Size of one queued siginfo.
pub const SIGINFO_SIZE: usize = 128;

/// Per-thread work. Index 0 of the thread array is the main thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadArgs {
    pub tid: u64,
    /// Top of this thread's stack inside the restore zone (16-byte aligned).
    pub stack_top: u64,
    pub rseq_ptr: u64,
    pub rseq_len: u64,
    pub rseq_sig: u64,
    pub altstack_sp: u64,
    pub altstack_flags: u64,
    pub altstack_size: u64,
    pub clear_child_tid: u64,
    pub robust_head: u64,
    pub robust_len: u64,
    pub comm: [u8; 16],
    /// `nr_pending` siginfos of `SIGINFO_SIZE` bytes at `pending`.
    pub pending: u64,
    pub nr_pending: u64,
    pub clone_args: CloneArgs,
    pub set_tid: [i32; 2],
}

pub const NSIG: usize = 64;
pub const NRLIMITS: usize = 16;
pub const AUXV_WORDS: usize = 64;
/// Number of candidate lengths tried to unregister the inherited rseq area.
pub const RSEQ_UNREG_TRIES: usize = 4;

/// The whole argument block. Lives at the start of the args area.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RestoreArgs {
    pub magic: u64,
    pub pid: u64,
    /// Ranges to unmap first (everything but the zone and the vDSO areas).
    pub unmap: u64,
    pub nr_unmap: u64,
    /// [vvar], [vvar_vclock], [vdso]: `from` = now, `to` = image address.
    /// Each is first moved to its scratch address, then to `to`.
    pub specials: [VmaMove; 3],
    pub special_scratch: [u64; 3],
    pub nr_specials: u64,
    /// Premapped areas to move into place.
    pub moves: u64,
    pub nr_moves: u64,
    pub mm_map: PrctlMmMap,
    pub auxv: [u64; AUXV_WORDS],
    /// The inherited rseq registration of the restorer process, to drop.
    pub rseq_unreg_ptr: u64,
    pub rseq_unreg_lens: [u64; RSEQ_UNREG_TRIES],
    pub rseq_unreg_sig: u64,
    pub personality: u64,
    pub umask: u64,
    /// Bit n-1 set: `sigactions[n-1]` is to be installed for signal n.
    pub sigaction_mask: u64,
    pub sigactions: [KernelSigaction; NSIG],
    pub itimers: [ITimerVal; 3],
    pub posix_timers: [PosixTimerArgs; MAX_POSIX_TIMERS],
    pub nr_posix_timers: u64,
    pub nr_rlimits: u64,
    pub rlimit_res: [u64; NRLIMITS],
    pub rlimits: [RLimit64; NRLIMITS],
    pub creds: CredsArgs,
    /// Process-wide pending signals (siginfos of `SIGINFO_SIZE` bytes).
    pub shared_pending: u64,
    pub nr_shared_pending: u64,
    pub threads: u64,
    pub nr_threads: u64,
    /// Descriptors `>= close_from` belong to the restorer and are closed.
    pub close_from: u64,
}
