//! `/proc/PID/fdinfo/FD`: position, open flags, mount id.
use super::ProcError;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct FdInfo {
    pub pos: u64,
    /// open(2) flags including O_CLOEXEC (octal in the file).
    pub flags: u32,
    pub mnt_id: u64,
}

impl FdInfo {
    pub fn parse(path: &Path, text: &str) -> Result<FdInfo, ProcError> {
        let mut info = FdInfo::default();
        let mut seen = 0;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let bad = || ProcError::parse(path, format!("{key}: {value:?}"));
            match key {
                "pos" => (info.pos, seen) = (value.parse().map_err(|_| bad())?, seen | 1),
                "flags" => {
                    info.flags = u32::from_str_radix(value, 8).map_err(|_| bad())?;
                    seen |= 2;
                }
                "mnt_id" => info.mnt_id = value.parse().map_err(|_| bad())?,
                _ => {}
            }
        }
        if seen != 3 {
            return Err(ProcError::parse(path, "no pos/flags lines"));
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields() {
        let i = FdInfo::parse(
            Path::new("x"),
            "pos:\t4096\nflags:\t02100001\nmnt_id:\t25\nino:\t7\n",
        )
        .unwrap();
        assert_eq!(i.pos, 4096);
        assert_eq!(i.flags, 0o2100001);
        assert_eq!(i.mnt_id, 25);
        assert!(FdInfo::parse(Path::new("x"), "pos:\tx\nflags:\t0\n").is_err());
    }
}
