//! `/proc/PID/stat`: the fields the dumper needs. The command name is in
//! parentheses and may itself contain spaces and parentheses, so fields are
//! counted from the last `)`.
use super::ProcError;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub tty_nr: i32,
    /// Field 8: the foreground process group of the controlling terminal
    /// (-1 without one).
    pub tpgid: i32,
    pub flags: u32,
    pub num_threads: i64,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub exit_signal: i32,
    /// Field 39: the CPU the task last ran on.
    pub processor: i32,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Field 52: the exit status as `waitpid(2)` reports it (meaningful for
    /// a zombie); 0 when the kernel does not show it.
    pub exit_code: i32,
}

impl Stat {
    pub fn parse(path: &Path, text: &str) -> Result<Stat, ProcError> {
        let open = text
            .find('(')
            .ok_or_else(|| ProcError::parse(path, "no '('"))?;
        let close = text
            .rfind(')')
            .ok_or_else(|| ProcError::parse(path, "no ')'"))?;
        if close < open {
            return Err(ProcError::parse(path, "')' before '('"));
        }
        let pid = text[..open]
            .trim()
            .parse()
            .map_err(|_| ProcError::parse(path, "bad pid"))?;
        let comm = text[open + 1..close].to_string();
        // Field 3 (state) is the first after the ')'.
        let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
        let field = |n: usize| -> Result<&str, ProcError> {
            rest.get(n - 3)
                .copied()
                .ok_or_else(|| ProcError::parse(path, format!("missing field {n}")))
        };
        fn num<T: std::str::FromStr>(path: &Path, n: usize, s: &str) -> Result<T, ProcError> {
            s.parse()
                .map_err(|_| ProcError::parse(path, format!("field {n} is not a number: {s:?}")))
        }
        let u = |n: usize| -> Result<u64, ProcError> { num(path, n, field(n)?) };
        let i = |n: usize| -> Result<i64, ProcError> { num(path, n, field(n)?) };
        Ok(Stat {
            pid,
            comm,
            state: field(3)?.chars().next().unwrap_or('?'),
            ppid: i(4)? as i32,
            pgrp: i(5)? as i32,
            session: i(6)? as i32,
            tty_nr: i(7)? as i32,
            tpgid: i(8)? as i32,
            flags: u(9)? as u32,
            num_threads: i(20)?,
            start_code: u(26)?,
            end_code: u(27)?,
            start_stack: u(28)?,
            exit_signal: i(38)? as i32,
            processor: i(39)? as i32,
            start_data: u(45)?,
            end_data: u(46)?,
            start_brk: u(47)?,
            arg_start: u(48)?,
            arg_end: u(49)?,
            env_start: u(50)?,
            env_end: u(51)?,
            exit_code: i(52).unwrap_or(0) as i32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_with_parens_and_spaces() {
        let mut line = String::from("42 (a) b (c)) S 1 42 42 0 -1 4194560");
        for n in 10..=52 {
            line.push_str(&format!(" {n}"));
        }
        let s = Stat::parse(Path::new("x"), &line).unwrap();
        assert_eq!(s.pid, 42);
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.session, 42);
        assert_eq!(s.num_threads, 20);
        assert_eq!(s.env_end, 51);
        assert_eq!(s.processor, 39);
        assert_eq!(s.exit_code, 52);
    }

    #[test]
    fn truncated_is_an_error() {
        let err = Stat::parse(Path::new("/proc/1/stat"), "1 (x) S 0 1").unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        assert!(Stat::parse(Path::new("x"), "garbage").is_err());
    }
}
