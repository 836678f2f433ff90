//! `/proc/sysvipc/{msg,sem,shm}`: the key and id of every object of one
//! kind in the reader's IPC namespace (the rest is read with `IPC_STAT`).
use super::Kind;

/// `(key, id)` of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: i32,
    pub id: i32,
}

/// Parses a table: a header line, then `key id perms ...` per object.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(key), Some(id)) = (f.next(), f.next()) else {
            continue;
        };
        let key = key
            .parse::<i64>()
            .map_err(|_| format!("bad key in {line:?}"))?;
        let id = id
            .parse::<i32>()
            .map_err(|_| format!("bad id in {line:?}"))?;
        out.push(Entry {
            // Printed with %d: negative for keys with the top bit set.
            key: key as i32,
            id,
        });
    }
    Ok(out)
}

/// Every object of `kind` in our IPC namespace.
pub fn read(kind: Kind) -> std::io::Result<Vec<Entry>> {
    let path = format!("/proc/sysvipc/{}", kind.proc_name());
    let text = std::fs::read_to_string(&path)?;
    parse(&text).map_err(|e| std::io::Error::other(format!("{path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tables() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                   1128352000      32768   600                 10000  4242  4242      1     0     0     0     0 1700000000          0 1700000000                 12288                     0\n\
                   -559038737          5  1600                  4096  1 1 0 0 0 0 0 0 0 0 0 0\n";
        let t = parse(shm).unwrap();
        assert_eq!(
            t,
            vec![
                Entry {
                    key: 1128352000,
                    id: 32768
                },
                Entry {
                    key: 0xdeadbeefu32 as i32,
                    id: 5
                }
            ]
        );
        assert!(parse("h\nx 1 2\n").is_err());
        assert_eq!(parse("header only\n").unwrap(), vec![]);
    }

    #[test]
    fn reads_this_host() {
        for k in [Kind::Msg, Kind::Sem, Kind::Shm] {
            read(k).unwrap();
        }
    }
}
