//! `/proc/PID/status`: credentials, capabilities, umask, seccomp.
use super::ProcError;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct Status {
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// 0 = off, 1 = strict, 2 = filter.
    pub seccomp: u32,
    pub umask: u32,
    pub tgid: i32,
}

impl Status {
    pub fn parse(path: &Path, text: &str) -> Result<Status, ProcError> {
        let mut st = Status::default();
        let mut seen = 0;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let bad = |what: &str| ProcError::parse(path, format!("{key}: {what}: {value:?}"));
            let ids = || -> Result<[u32; 4], ProcError> {
                let v: Vec<u32> = value
                    .split_whitespace()
                    .map(|s| s.parse().map_err(|_| bad("not a number")))
                    .collect::<Result<_, _>>()?;
                v.try_into().map_err(|_| bad("expected 4 ids"))
            };
            let hex = || u64::from_str_radix(value, 16).map_err(|_| bad("not hex"));
            match key {
                "Uid" => (st.uids, seen) = (ids()?, seen + 1),
                "Gid" => (st.gids, seen) = (ids()?, seen + 1),
                "Groups" => {
                    st.groups = value
                        .split_whitespace()
                        .map(|s| s.parse().map_err(|_| bad("not a number")))
                        .collect::<Result<_, _>>()?
                }
                "CapInh" => st.cap_inh = hex()?,
                "CapPrm" => st.cap_prm = hex()?,
                "CapEff" => st.cap_eff = hex()?,
                "CapBnd" => st.cap_bnd = hex()?,
                "CapAmb" => st.cap_amb = hex()?,
                "NoNewPrivs" => st.no_new_privs = value == "1",
                "Seccomp" => st.seccomp = value.parse().map_err(|_| bad("not a number"))?,
                "Umask" => {
                    st.umask = u32::from_str_radix(value, 8).map_err(|_| bad("not octal"))?
                }
                "Tgid" => st.tgid = value.parse().map_err(|_| bad("not a number"))?,
                _ => {}
            }
        }
        if seen != 2 {
            return Err(ProcError::parse(path, "no Uid/Gid lines"));
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields() {
        let text = "Name:\tx\nUmask:\t0022\nTgid:\t7\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 20 \nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t0\n";
        let st = Status::parse(Path::new("x"), text).unwrap();
        assert_eq!(st.uids, [1, 2, 3, 4]);
        assert_eq!(st.gids, [5, 6, 7, 8]);
        assert_eq!(st.groups, vec![10, 20]);
        assert_eq!(st.cap_prm, 0x1ff_ffff_ffff);
        assert!(st.no_new_privs);
        assert_eq!(st.umask, 0o022);
        assert_eq!(st.tgid, 7);
    }

    #[test]
    fn rejects_bad_ids() {
        assert!(Status::parse(Path::new("x"), "Uid:\t1 2\nGid:\t1 2 3 4\n").is_err());
        assert!(Status::parse(Path::new("x"), "Name:\tx\n").is_err());
    }
}
