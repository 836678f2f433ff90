//! `/proc/PID/maps` and `/proc/PID/smaps`: one [`MapEntry`] per VMA. With
//! `smaps`, the `VmFlags` line of each VMA is attached to it (it tells
//! grows-down stacks, may-write/may-share and madvise state apart).
use super::ProcError;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`, ...); empty for
    /// anonymous memory. A `" (deleted)"` suffix is kept.
    pub name: String,
    /// Two-letter `VmFlags` codes; empty when read from `maps`.
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn has_flag(&self, code: &str) -> bool {
        self.vm_flags.iter().any(|f| f == code)
    }

    /// Same VMA as `other` in everything `maps` shows (range, permissions,
    /// offset, device, inode, name); `VmFlags` are not compared.
    pub fn same_mapping(&self, other: &MapEntry) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.read == other.read
            && self.write == other.write
            && self.exec == other.exec
            && self.shared == other.shared
            && self.offset == other.offset
            && self.dev_major == other.dev_major
            && self.dev_minor == other.dev_minor
            && self.inode == other.inode
            && self.name == other.name
    }

    /// PROT_* bits.
    pub fn prot(&self) -> u32 {
        let bit = |on: bool, prot: i32| if on { prot as u32 } else { 0 };
        bit(self.read, libc::PROT_READ)
            | bit(self.write, libc::PROT_WRITE)
            | bit(self.exec, libc::PROT_EXEC)
    }
}

fn parse_line(path: &Path, line: &str) -> Result<MapEntry, ProcError> {
    let bad = |what: &str| ProcError::parse(path, format!("{what} in line {line:?}"));
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(|| bad("no range"))?;
    let perms = it.next().ok_or_else(|| bad("no permissions"))?;
    let offset = it.next().ok_or_else(|| bad("no offset"))?;
    let dev = it.next().ok_or_else(|| bad("no device"))?;
    let inode = it.next().ok_or_else(|| bad("no inode"))?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-').ok_or_else(|| bad("bad range"))?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad("bad hex number"));
    let (major, minor) = dev.split_once(':').ok_or_else(|| bad("bad device"))?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad("bad permissions"));
    }
    let entry = MapEntry {
        start: hex(start)?,
        end: hex(end)?,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: hex(offset)?,
        dev_major: u32::from_str_radix(major, 16).map_err(|_| bad("bad device"))?,
        dev_minor: u32::from_str_radix(minor, 16).map_err(|_| bad("bad device"))?,
        inode: inode.parse().map_err(|_| bad("bad inode"))?,
        name,
        vm_flags: Vec::new(),
    };
    if entry.start >= entry.end
        || !entry.start.is_multiple_of(4096)
        || !entry.end.is_multiple_of(4096)
    {
        return Err(bad("bad range"));
    }
    Ok(entry)
}

/// True if `a` and `b` list the same VMAs in the same order, compared with
/// [`MapEntry::same_mapping`] (so a `maps` and an `smaps` reading compare).
pub fn same_layout(a: &[MapEntry], b: &[MapEntry]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_mapping(y))
}

/// Parses `maps` or `smaps` text. A VMA line is recognised by its range
/// field (`hex-hex`); other `smaps` lines are `Key: value`.
pub fn parse_maps(path: &Path, text: &str) -> Result<Vec<MapEntry>, ProcError> {
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let first = line.split(' ').next().unwrap_or("");
        let is_vma = first.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_hexdigit())
                && b.bytes().all(|c| c.is_ascii_hexdigit())
        });
        if is_vma {
            out.push(parse_line(path, line)?);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let last = out
                .last_mut()
                .ok_or_else(|| ProcError::parse(path, "VmFlags before any VMA"))?;
            last.vm_flags = flags.split_whitespace().map(str::to_string).collect();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_excerpt() {
        let text = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000001000 r-xs 00002000 fd:01 1234                       /usr/lib/a b.so (deleted)
VmFlags: rd ex sh mr mw me
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
";
        let m = parse_maps(Path::new("x"), text).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "[heap]");
        assert_eq!(m[0].prot(), (libc::PROT_READ | libc::PROT_WRITE) as u32);
        assert!(m[1].shared && m[1].exec && !m[1].write);
        assert_eq!(m[1].offset, 0x2000);
        assert_eq!(m[1].dev_major, 0xfd);
        assert_eq!(m[1].inode, 1234);
        assert_eq!(m[1].name, "/usr/lib/a b.so (deleted)");
        assert!(m[2].has_flag("gd"));
    }

    #[test]
    fn layout_ignores_vm_flags() {
        let smaps = "1000-2000 rw-p 00000000 00:00 0\nVmFlags: rd wr\n\
                     3000-4000 r--p 00001000 fd:01 7 /lib/x\nVmFlags: rd\n";
        let maps = "1000-2000 rw-p 00000000 00:00 0\n3000-4000 r--p 00001000 fd:01 7 /lib/x\n";
        let a = parse_maps(Path::new("a"), smaps).unwrap();
        let b = parse_maps(Path::new("b"), maps).unwrap();
        assert!(same_layout(&a, &b));
        assert!(!same_layout(&a, &b[..1]));
        let mut c = b.clone();
        c[1].end = 0x5000;
        assert!(!same_layout(&a, &c));
        c = b.clone();
        c[0].write = false;
        assert!(!same_layout(&a, &c));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_maps(Path::new("x"), "1000-0 rw-p 0 00:00 0\n").is_err());
        assert!(parse_maps(Path::new("x"), "zz-1000 rw-p 0 00:00 0\n").is_ok()); // not a VMA line
        assert!(parse_maps(Path::new("x"), "1000-2000 rw 0 00:00 0\n").is_err());
    }
}
