//! Message queues: saved with every queued message (type and bytes, in
//! queue order), read with `msgrcv(MSG_COPY)` so that nothing is consumed
//! (needs `CONFIG_CHECKPOINT_RESTORE`); restored with `msgsnd` in the same
//! order after the queue's byte limit is set.
use super::{create_flags, create_with_id, owner, perm, sys, IpcError, Kind};
use crm_proto::image::{IpcCore, IpcMsg, IpcMsgQueue};

/// Largest message read (the image record limit).
const MAX_MSG: usize = 64 << 20;

/// Saves queue `id` and its messages into `core`; returns its key.
pub(super) fn dump(id: i32, core: &mut IpcCore) -> Result<i32, IpcError> {
    let st = sys::msg_stat(id).map_err(IpcError::object(Kind::Msg, id, 0, "read it (IPC_STAT)"))?;
    let key = st.perm.key;
    let mut n = 0u32;
    loop {
        let copied = sys::msg_copy(id, u64::from(n), MAX_MSG).map_err(|source| {
            let what = if source.raw_os_error() == Some(libc::ENOSYS) {
                "copy its messages: msgrcv(MSG_COPY) needs a kernel with CONFIG_CHECKPOINT_RESTORE"
                    .to_string()
            } else {
                format!("copy message {n} (msgrcv MSG_COPY)")
            };
            IpcError::Object {
                kind: Kind::Msg,
                id,
                key,
                what,
                source,
            }
        })?;
        let Some((mtype, data)) = copied else { break };
        core.messages.push(IpcMsg {
            queue_id: id,
            mtype,
            data,
        });
        n += 1;
    }
    if u64::from(n) != st.qnum {
        tracing::warn!(
            id,
            "message queue {id} held {} messages when stat'ed and {n} when copied (another process uses it)",
            st.qnum
        );
    }
    core.queues.push(IpcMsgQueue {
        perm: Some(perm(&st.perm, id)),
        qbytes: st.qbytes,
        nr_messages: n,
    });
    Ok(key)
}

/// Checks that every message belongs to a queue of the image, that each
/// queue has its announced number, and that types are positive.
pub(super) fn check_messages(core: &IpcCore) -> Result<(), IpcError> {
    for q in &core.queues {
        let id = q.perm.as_ref().map_or(-1, |p| p.id);
        let n = core.messages.iter().filter(|m| m.queue_id == id).count();
        if n != q.nr_messages as usize {
            return Err(IpcError::Invalid {
                what: format!(
                    "queue {id} announces {} messages but has {n}",
                    q.nr_messages
                ),
            });
        }
    }
    for m in &core.messages {
        if m.mtype <= 0 {
            return Err(IpcError::Invalid {
                what: format!("a message of queue {} has type {}", m.queue_id, m.mtype),
            });
        }
        if !core
            .queues
            .iter()
            .any(|q| q.perm.as_ref().is_some_and(|p| p.id == m.queue_id))
        {
            return Err(IpcError::Invalid {
                what: format!(
                    "a message names queue {}, which the image lacks",
                    m.queue_id
                ),
            });
        }
    }
    Ok(())
}

/// Creates queue `q` (its id joins `created` at once) and queues its
/// messages.
pub(super) fn restore(
    q: &IpcMsgQueue,
    messages: &[IpcMsg],
    created: &mut Vec<(Kind, i32)>,
) -> Result<(), IpcError> {
    let p = q.perm.as_ref().ok_or_else(|| IpcError::Invalid {
        what: "a message queue has no ipc_perm".into(),
    })?;
    let (id, key) = (p.id, p.key);
    create_with_id(Kind::Msg, p, || sys::msgget(key, create_flags(p)))?;
    created.push((Kind::Msg, id));
    let qbytes = if q.qbytes == 0 {
        sys::msg_stat(id)
            .map_err(IpcError::object(Kind::Msg, id, key, "read it (IPC_STAT)"))?
            .qbytes
    } else {
        q.qbytes
    };
    sys::msg_set(id, owner(p), qbytes).map_err(IpcError::object(
        Kind::Msg,
        id,
        key,
        format!(
            "set its owner {}:{}, mode {:o} and byte limit {qbytes} (IPC_SET; a limit over \
             kernel.msgmnb needs CAP_SYS_RESOURCE)",
            p.uid,
            p.gid,
            p.mode & sys::MODE_BITS
        ),
    ))?;
    for (i, m) in messages.iter().filter(|m| m.queue_id == id).enumerate() {
        sys::msgsnd(id, m.mtype, &m.data).map_err(IpcError::object(
            Kind::Msg,
            id,
            key,
            format!(
                "queue message {i} ({} bytes, type {})",
                m.data.len(),
                m.mtype
            ),
        ))?;
    }
    Ok(())
}
