//! The control channels between the restoring process (the coordinator) and
//! the tasks of a tree it recreates (`restore::tree`).
//!
//! - One **event pipe**, written by every task, read by the coordinator.
//!   An event is one `write(2)` of at most `PIPE_BUF` bytes (so events of
//!   different tasks never interleave): pid (i32 LE), kind (u32 LE), text
//!   length (u32 LE), text (UTF-8, an error message).
//! - One **go pipe** per task, written by the coordinator: one command byte
//!   per phase ([`GO_GROUPS`], [`GO_EXIT`], [`GO_RESTORE`]). End of file
//!   means "abort": the task exits.
//!
//! Every task closes the ends it does not need when it starts (the
//! coordinator's write ends, other subtrees' read ends), so a coordinator
//! that dies makes every waiting task see end of file.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// Phase 2: join your process group.
pub const GO_GROUPS: u8 = b'B';
/// Phase 3 (zombies): exit with your status.
pub const GO_EXIT: u8 = b'Z';
/// Phase 3 (live tasks): restore your memory and state.
pub const GO_RESTORE: u8 = b'G';

const HEADER: usize = 12;
/// Longest event text: header and text fit in `PIPE_BUF`.
const MAX_TEXT: usize = 4096 - HEADER;

/// What a task reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// It exists, with its session (and own group) set, and created its children.
    Created = 1,
    /// It joined its process group.
    Grouped = 2,
    /// It failed (the text says how) and exits.
    Failed = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub pid: i32,
    pub kind: Kind,
    pub text: String,
}

/// A pipe with both ends close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one event (a single write; the text is cut to fit `PIPE_BUF`).
pub fn send(fd: RawFd, pid: i32, kind: Kind, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text.as_bytes()[..end];
    let mut msg = Vec::with_capacity(HEADER + text.len());
    msg.extend_from_slice(&pid.to_le_bytes());
    msg.extend_from_slice(&(kind as u32).to_le_bytes());
    msg.extend_from_slice(&(text.len() as u32).to_le_bytes());
    msg.extend_from_slice(text);
    loop {
        // SAFETY: writing our own buffer to a descriptor number; a closed
        // or wrong descriptor only makes write fail.
        let r = unsafe { libc::write(fd, msg.as_ptr() as *const libc::c_void, msg.len()) };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break;
    }
}

/// Reads one command byte from a go pipe; `None` at end of file or error.
pub fn recv_command(fd: RawFd) -> Option<u8> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reading one byte into a local buffer.
        let r = unsafe { libc::read(fd, b.as_mut_ptr() as *mut libc::c_void, 1) };
        if r == 1 {
            return Some(b[0]);
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

/// The channels of one tree restore, as created by the coordinator.
#[derive(Debug)]
pub struct Channels {
    pub event_r: OwnedFd,
    /// Dropped by the coordinator once the root exists.
    pub event_w: Option<OwnedFd>,
    /// Per task (creation order): read end (dropped by the coordinator once
    /// the tasks exist) and write end.
    pub go_r: Vec<Option<OwnedFd>>,
    pub go_w: Vec<Option<OwnedFd>>,
    buf: Vec<u8>,
}

impl Channels {
    pub fn new(tasks: usize) -> io::Result<Channels> {
        let (event_r, event_w) = pipe()?;
        let mut go_r = Vec::with_capacity(tasks);
        let mut go_w = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            let (r, w) = pipe()?;
            go_r.push(Some(r));
            go_w.push(Some(w));
        }
        Ok(Channels {
            event_r,
            event_w: Some(event_w),
            go_r,
            go_w,
            buf: Vec::new(),
        })
    }

    /// Sends `cmd` to task `i`.
    pub fn command(&self, i: usize, cmd: u8) -> io::Result<()> {
        let fd = self.go_w[i]
            .as_ref()
            .ok_or_else(|| io::Error::other("go pipe already closed"))?;
        // SAFETY: writing one byte from a local buffer to our own pipe.
        let r = unsafe { libc::write(fd.as_raw_fd(), [cmd].as_ptr() as *const libc::c_void, 1) };
        if r == 1 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The next event, waiting until `deadline`. `Ok(None)` at end of file
    /// (every task is gone); an error of kind `TimedOut` at the deadline.
    pub fn next_event(&mut self, deadline: Instant) -> io::Result<Option<Event>> {
        loop {
            if let Some(e) = self.parse() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no event in time"));
            }
            let mut pfd = libc::pollfd {
                fd: self.event_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one pollfd, a live local.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                continue;
            }
            if self.fill()? == 0 {
                return Ok(None);
            }
        }
    }

    /// Every event already in the pipe, without waiting.
    pub fn pending_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            while let Some(e) = self.parse() {
                out.push(e);
            }
            let mut pfd = libc::pollfd {
                fd: self.event_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, a live local; timeout 0 never blocks.
            if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 || self.fill().unwrap_or(0) == 0 {
                return out;
            }
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            // SAFETY: reading into a local buffer of the given length.
            let r = unsafe {
                libc::read(
                    self.event_r.as_raw_fd(),
                    chunk.as_mut_ptr() as *mut libc::c_void,
                    chunk.len(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            self.buf.extend_from_slice(&chunk[..r as usize]);
            return Ok(r as usize);
        }
    }

    /// One complete event off the front of the buffer.
    fn parse(&mut self) -> Option<Event> {
        let (e, used) = parse_event(&self.buf)?;
        self.buf.drain(..used);
        Some(e)
    }
}

/// Decodes the event at the start of `buf`: the event and its length, or
/// `None` if incomplete. Unknown kinds and oversized lengths (never written
/// by a task) become a `Failed` event so that nothing waits forever.
fn parse_event(buf: &[u8]) -> Option<(Event, usize)> {
    if buf.len() < HEADER {
        return None;
    }
    let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
    let pid = i32::from_le_bytes(word(0));
    let kind = u32::from_le_bytes(word(4));
    let len = (u32::from_le_bytes(word(8)) as usize).min(MAX_TEXT);
    if buf.len() < HEADER + len {
        return None;
    }
    let text = String::from_utf8_lossy(&buf[HEADER..HEADER + len]).into_owned();
    let kind = match kind {
        1 => Kind::Created,
        2 => Kind::Grouped,
        _ => Kind::Failed,
    };
    Some((Event { pid, kind, text }, HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_pipe() {
        let mut ch = Channels::new(1).unwrap();
        let w = ch.event_w.as_ref().unwrap().as_raw_fd();
        send(w, 42, Kind::Created, "");
        send(w, 43, Kind::Failed, &"é".repeat(5000));
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        let e = ch.next_event(deadline).unwrap().unwrap();
        assert_eq!((e.pid, e.kind, e.text.as_str()), (42, Kind::Created, ""));
        let e = ch.next_event(deadline).unwrap().unwrap();
        assert_eq!((e.pid, e.kind), (43, Kind::Failed));
        assert!(e.text.len() <= MAX_TEXT && e.text.starts_with('é'));
        assert!(ch.pending_events().is_empty());
        ch.command(0, GO_GROUPS).unwrap();
        let r = ch.go_r[0].as_ref().unwrap().as_raw_fd();
        assert_eq!(recv_command(r), Some(GO_GROUPS));
        ch.event_w = None;
        assert!(ch.next_event(deadline).unwrap().is_none());
    }

    #[test]
    fn partial_events_wait_for_the_rest() {
        assert!(parse_event(&[1, 0, 0]).is_none());
        let mut b = vec![7, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, b'a'];
        assert!(parse_event(&b).is_none());
        b.extend_from_slice(b"bc");
        let (e, n) = parse_event(&b).unwrap();
        assert_eq!(
            (e.pid, e.kind, e.text.as_str(), n),
            (7, Kind::Grouped, "abc", 15)
        );
    }
}
