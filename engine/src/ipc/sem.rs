//! Semaphore sets: saved with the value of each semaphore (`GETALL`),
//! restored with `SETALL`. Pending undo adjustments (`SEM_UNDO`) and the
//! last operation's pid and time are not saved.
use super::{create_flags, create_with_id, owner, perm, sys, IpcError, Kind};
use crm_proto::image::{IpcCore, IpcSemSet};

/// Largest set the kernel allows (SEMMSL).
const MAX_SEMS: usize = 32000;

/// Saves set `id` into `core`; returns its key.
pub(super) fn dump(id: i32, core: &mut IpcCore) -> Result<i32, IpcError> {
    let st = sys::sem_stat(id).map_err(IpcError::object(Kind::Sem, id, 0, "read it (IPC_STAT)"))?;
    let key = st.perm.key;
    let values = sys::sem_getall(id, st.nsems as usize).map_err(IpcError::object(
        Kind::Sem,
        id,
        key,
        "read its values (GETALL)",
    ))?;
    core.sem_sets.push(IpcSemSet {
        perm: Some(perm(&st.perm, id)),
        values: values.into_iter().map(u32::from).collect(),
    });
    Ok(key)
}

/// Creates set `s` (its id joins `created` at once) with its values.
pub(super) fn restore(s: &IpcSemSet, created: &mut Vec<(Kind, i32)>) -> Result<(), IpcError> {
    let p = s.perm.as_ref().ok_or_else(|| IpcError::Invalid {
        what: "a semaphore set has no ipc_perm".into(),
    })?;
    let (id, key) = (p.id, p.key);
    if s.values.is_empty() || s.values.len() > MAX_SEMS {
        return Err(IpcError::Invalid {
            what: format!("semaphore set {id} has {} semaphores", s.values.len()),
        });
    }
    let values: Vec<u16> = s
        .values
        .iter()
        .map(|&v| u16::try_from(v).ok().filter(|&v| v <= i16::MAX as u16))
        .collect::<Option<_>>()
        .ok_or_else(|| IpcError::Invalid {
            what: format!("semaphore set {id} has a value over 32767"),
        })?;
    create_with_id(Kind::Sem, p, || {
        sys::semget(key, values.len() as i32, create_flags(p))
    })?;
    created.push((Kind::Sem, id));
    sys::sem_setall(id, &values).map_err(IpcError::object(
        Kind::Sem,
        id,
        key,
        "set its values (SETALL)",
    ))?;
    sys::sem_set(id, owner(p)).map_err(IpcError::object(
        Kind::Sem,
        id,
        key,
        format!(
            "set its owner {}:{} and mode {:o} (IPC_SET)",
            p.uid,
            p.gid,
            p.mode & sys::MODE_BITS
        ),
    ))?;
    Ok(())
}
