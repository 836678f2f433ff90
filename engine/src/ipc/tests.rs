//! Round trip of each kind of object through an image, in this process:
//! create, dump (nothing consumed), remove, restore, compare; and the
//! refusal of a restore over existing objects.
use super::*;

/// Removes the objects on drop, whatever happened.
struct Objects(Vec<(Kind, i32)>);

impl Drop for Objects {
    fn drop(&mut self) {
        for &(kind, id) in &self.0 {
            let _ = kind.remove(id);
        }
    }
}

fn temp_dir() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("crm-ipc-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn owner_of(key: i32) -> sys::Perm {
    sys::Perm {
        key,
        uid: 77,
        gid: 88,
        mode: 0o604,
        ..Default::default()
    }
}

#[test]
fn round_trip_of_each_kind() {
    for k in ["msg", "sem", "shm"] {
        if !std::path::Path::new(&format!("/proc/sys/kernel/{k}_next_id")).exists() {
            println!("SKIPPED: round_trip_of_each_kind: no /proc/sys/kernel/{k}_next_id");
            return;
        }
    }
    let key = (0x4352_e000 | (std::process::id() & 0xfff)) as i32;
    let mut objs = Objects(Vec::new());
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;

    let q = sys::msgget(key, flags).unwrap();
    objs.0.push((Kind::Msg, q));
    let big: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    sys::msgsnd(q, 3, b"abc").unwrap();
    sys::msgsnd(q, 9, &big).unwrap();
    sys::msg_set(q, owner_of(key), 8000).unwrap();

    let s = sys::semget(key, 3, flags).unwrap();
    objs.0.push((Kind::Sem, s));
    sys::sem_setall(s, &[5, 0, 9]).unwrap();
    sys::sem_set(s, owner_of(key)).unwrap();

    let m = sys::shmget(key, 5000, flags).unwrap();
    objs.0.push((Kind::Shm, m));
    {
        let mut att = sys::Attached::new(m, 8192, 0).unwrap();
        for (i, b) in att.bytes_mut()[4096..5000].iter_mut().enumerate() {
            *b = i as u8 | 1;
        }
    }
    sys::shm_set(m, owner_of(key)).unwrap();

    let dir = temp_dir();
    let image = ImageDir::create(&dir).unwrap();
    let sel = Selection {
        keys: vec![key],
        ..Default::default()
    };
    let saved = dump(&image, std::process::id() as i32, &sel);
    let saved = match saved {
        Err(IpcError::Object { source, .. }) if source.raw_os_error() == Some(libc::ENOSYS) => {
            println!("SKIPPED: round_trip_of_each_kind: no msgrcv(MSG_COPY)");
            return;
        }
        other => other.unwrap(),
    };
    assert_eq!(saved.len(), 3);
    assert_eq!(
        sys::msg_stat(q).unwrap().qnum,
        2,
        "the dump consumed messages"
    );
    // Only the page with data is stored.
    assert_eq!(image.shm_pages_reader(m).unwrap().total_pages(), 1);
    let text = describe(&image.read_ipc().unwrap().unwrap()).join("\n");
    assert!(
        text.contains("2 message(s), 303 bytes, limit 8000"),
        "{text}"
    );
    assert!(text.contains("values [5, 0, 9]"), "{text}");

    saved.remove();
    assert!(sys::msg_stat(q).is_err() && sys::sem_stat(s).is_err() && sys::shm_stat(m).is_err());

    let restored = restore(&image, [m]).unwrap();
    assert_eq!(restored.len(), 3);
    restored.attached().unwrap();
    let st = sys::msg_stat(q).unwrap();
    assert_eq!(
        (st.perm.key, st.perm.uid, st.perm.gid, st.perm.mode & 0o777),
        (key, 77, 88, 0o604)
    );
    assert_eq!((st.qnum, st.qbytes), (2, 8000));
    assert_eq!(
        sys::msg_copy(q, 0, 1 << 20).unwrap(),
        Some((3, b"abc".to_vec()))
    );
    assert_eq!(sys::msg_copy(q, 1, 1 << 20).unwrap(), Some((9, big)));
    assert_eq!(sys::sem_getall(s, 3).unwrap(), vec![5, 0, 9]);
    assert_eq!(sys::sem_stat(s).unwrap().perm.uid, 77);
    let st = sys::shm_stat(m).unwrap();
    assert_eq!(
        (st.size, st.perm.gid, st.perm.mode & 0o777),
        (5000, 88, 0o604)
    );
    {
        let att = sys::Attached::new(m, 8192, libc::SHM_RDONLY).unwrap();
        let b = att.bytes();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..5000]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == i as u8 | 1));
    }

    // Over existing objects: refused, nothing removed.
    match restore(&image, []) {
        Err(IpcError::Exists {
            kind: Kind::Msg,
            id,
            ..
        }) if id == q => {}
        other => panic!("restore over existing objects: {other:?}"),
    }
    assert!(sys::msg_stat(q).is_ok());
    // A task attaching a segment the image lacks is refused.
    assert!(matches!(
        restore(&image, [m + 1]),
        Err(IpcError::Invalid { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
