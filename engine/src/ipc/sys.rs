//! Thin safe wrappers over the SysV IPC syscalls (`msgget`, `msgctl`,
//! `msgrcv` with `MSG_COPY`, `semctl`, `shmat` ...) and the
//! `/proc/sys/kernel/*_next_id` files. Each returns an `io::Error` from
//! errno; the callers name the object.
use std::io;

/// `IPC_PRIVATE` as a key.
pub const IPC_PRIVATE: i32 = 0;
/// Segment flags in `ipc_perm.mode` (not in libc).
pub const SHM_DEST: u32 = 0o1000;
pub const SHM_LOCKED: u32 = 0o2000;
/// Bits of `ipc_perm.mode` that `IPC_SET` sets.
pub const MODE_BITS: u32 = 0o777;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The fields of `ipc_perm` that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm {
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    pub mode: u32,
}

impl Perm {
    fn from_raw(p: &libc::ipc_perm) -> Perm {
        Perm {
            key: p.__key,
            uid: p.uid,
            gid: p.gid,
            cuid: p.cuid,
            cgid: p.cgid,
            mode: u32::from(p.mode),
        }
    }

    fn to_raw(self, p: &mut libc::ipc_perm) {
        p.uid = self.uid;
        p.gid = self.gid;
        p.mode = (self.mode & MODE_BITS) as u16;
    }
}

// ---- message queues ----

pub struct MsqStat {
    pub perm: Perm,
    pub qnum: u64,
    pub qbytes: u64,
}

pub fn msgget(key: i32, flags: i32) -> io::Result<i32> {
    // SAFETY: no pointers.
    check(unsafe { libc::msgget(key, flags) })
}

pub fn msg_stat(id: i32) -> io::Result<MsqStat> {
    // SAFETY: msqid_ds is plain old data; all-zero is valid.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one msqid_ds into `ds`, a live local.
    check(unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) })?;
    Ok(MsqStat {
        perm: Perm::from_raw(&ds.msg_perm),
        qnum: ds.msg_qnum,
        qbytes: ds.msg_qbytes,
    })
}

/// `IPC_SET`: owner, group, permission bits and the byte limit.
pub fn msg_set(id: i32, perm: Perm, qbytes: u64) -> io::Result<()> {
    // SAFETY: msqid_ds is plain old data; all-zero is valid.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    perm.to_raw(&mut ds.msg_perm);
    ds.msg_qbytes = qbytes;
    // SAFETY: IPC_SET reads one msqid_ds from `ds`, a live local.
    check(unsafe { libc::msgctl(id, libc::IPC_SET, &mut ds) }).map(drop)
}

/// A copy of message number `index` (0 = oldest) of queue `id`, without
/// removing it (`MSG_COPY`); `buf` is grown until the message fits, up to
/// `max` bytes. `Ok(None)`: no such message.
pub fn msg_copy(id: i32, index: u64, max: usize) -> io::Result<Option<(i64, Vec<u8>)>> {
    let mut size = 8192usize.min(max);
    loop {
        let mut buf = vec![0u8; 8 + size];
        // SAFETY: `buf` holds the `long mtype` and `size` bytes of text, as
        // msgrcv expects; MSG_COPY with IPC_NOWAIT never blocks or removes.
        let n = unsafe {
            libc::msgrcv(
                id,
                buf.as_mut_ptr() as *mut libc::c_void,
                size,
                index as libc::c_long,
                libc::IPC_NOWAIT | libc::MSG_COPY,
            )
        };
        if n >= 0 {
            let mtype = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
            buf.drain(..8);
            buf.truncate(n as usize);
            return Ok(Some((mtype, buf)));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOMSG) => return Ok(None),
            Some(libc::E2BIG) if size < max => size = (size * 4).min(max),
            _ => return Err(e),
        }
    }
}

pub fn msgsnd(id: i32, mtype: i64, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(8 + data.len());
    buf.extend_from_slice(&mtype.to_ne_bytes());
    buf.extend_from_slice(data);
    // SAFETY: `buf` holds the mtype followed by `data.len()` bytes.
    check(unsafe {
        libc::msgsnd(
            id,
            buf.as_ptr() as *const libc::c_void,
            data.len(),
            libc::IPC_NOWAIT,
        )
    })
    .map(drop)
}

// ---- semaphore sets ----

pub struct SemStat {
    pub perm: Perm,
    pub nsems: u64,
}

pub fn semget(key: i32, nsems: i32, flags: i32) -> io::Result<i32> {
    // SAFETY: no pointers.
    check(unsafe { libc::semget(key, nsems, flags) })
}

pub fn sem_stat(id: i32) -> io::Result<SemStat> {
    // SAFETY: semid_ds is plain old data; all-zero is valid.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT takes a `struct semid_ds *` as its fourth argument
    // (union semun) and writes one into `ds`, a live local.
    check(unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) })?;
    Ok(SemStat {
        perm: Perm::from_raw(&ds.sem_perm),
        nsems: ds.sem_nsems,
    })
}

pub fn sem_set(id: i32, perm: Perm) -> io::Result<()> {
    // SAFETY: semid_ds is plain old data; all-zero is valid.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    perm.to_raw(&mut ds.sem_perm);
    // SAFETY: IPC_SET reads one semid_ds through the pointer, a live local.
    check(unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) }).map(drop)
}

/// `GETALL`: the value of each of the `nsems` semaphores.
pub fn sem_getall(id: i32, nsems: usize) -> io::Result<Vec<u16>> {
    let mut v = vec![0u16; nsems];
    // SAFETY: GETALL writes `nsems` unsigned shorts (the set's size, read
    // by the caller just before) into `v`.
    check(unsafe { libc::semctl(id, 0, libc::GETALL, v.as_mut_ptr()) })?;
    Ok(v)
}

/// `SETALL`: `values.len()` must be the set's size.
pub fn sem_setall(id: i32, values: &[u16]) -> io::Result<()> {
    // SAFETY: SETALL reads one unsigned short per semaphore of the set,
    // which has `values.len()` of them (created by the caller).
    check(unsafe { libc::semctl(id, 0, libc::SETALL, values.as_ptr()) }).map(drop)
}

pub fn sem_rmid(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no pointer.
    check(unsafe { libc::semctl(id, 0, libc::IPC_RMID) }).map(drop)
}

// ---- shared memory ----

pub struct ShmStat {
    pub perm: Perm,
    pub size: u64,
    pub nattch: u64,
}

pub fn shmget(key: i32, size: u64, flags: i32) -> io::Result<i32> {
    // SAFETY: no pointers.
    check(unsafe { libc::shmget(key, size as usize, flags) })
}

pub fn shm_stat(id: i32) -> io::Result<ShmStat> {
    // SAFETY: shmid_ds is plain old data; all-zero is valid.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds into `ds`, a live local.
    check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) })?;
    Ok(ShmStat {
        perm: Perm::from_raw(&ds.shm_perm),
        size: ds.shm_segsz as u64,
        nattch: ds.shm_nattch,
    })
}

pub fn shm_set(id: i32, perm: Perm) -> io::Result<()> {
    // SAFETY: shmid_ds is plain old data; all-zero is valid.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    perm.to_raw(&mut ds.shm_perm);
    // SAFETY: IPC_SET reads one shmid_ds from `ds`, a live local.
    check(unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) }).map(drop)
}

/// `SHM_LOCK`: keeps the segment's pages out of swap.
pub fn shm_lock(id: i32) -> io::Result<()> {
    // SAFETY: SHM_LOCK takes no pointer.
    check(unsafe { libc::shmctl(id, libc::SHM_LOCK, std::ptr::null_mut()) }).map(drop)
}

/// `IPC_RMID` of a message queue.
pub fn msg_rmid(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    check(unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) }).map(drop)
}

/// `IPC_RMID` of a segment: removed now, or when its last user detaches.
pub fn shm_rmid(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    check(unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) }).map(drop)
}

/// An attachment of a segment in this process, detached on drop.
pub struct Attached {
    addr: u64,
    len: u64,
}

impl Attached {
    /// `shmat(id, NULL, flags)`; `len` is the segment's size.
    pub fn new(id: i32, len: u64, flags: i32) -> io::Result<Attached> {
        // SAFETY: the kernel picks a free address: nothing of ours is
        // replaced.
        let p = unsafe { libc::shmat(id, std::ptr::null(), flags) };
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(Attached {
            addr: p as u64,
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The attachment's bytes, read-only.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes (the segment size) are mapped readable at
        // `addr` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len as usize) }
    }

    /// The attachment's bytes, writable (attached without `SHM_RDONLY`).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only reference
        // into the attachment, which the caller attached read-write.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len as usize) }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: detaching our own attachment; no reference into it
        // outlives `self`.
        if unsafe { libc::shmdt(self.addr as *const libc::c_void) } != 0 {
            tracing::warn!(
                addr = self.addr,
                error = %io::Error::last_os_error(),
                "shmdt failed"
            );
        }
    }
}

/// Writes `id` to `/proc/sys/kernel/NAME_next_id` (`-1`: no wish).
pub fn set_next_id(name: &str, id: i32) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/kernel/{name}_next_id"), id.to_string())
}
