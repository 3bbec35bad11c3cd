//! `microvm cp`: a file or a directory (as a tar stream of its contents)
//! into or out of the guest, as `docker cp` does: a destination that is an
//! existing directory (or, in the guest, ends in `/`) receives the source
//! under its own name.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use microvm_init::agent_proto::{DataReader, DataWriter, Frame, Payload, ProtoError, PutRequest};

use super::{AgentError, Conn};

/// The last component of a path, for "copy into a directory".
fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// Where in the guest a put goes: `dst`, or `dst/<name of src>` when `dst`
/// ends in `/`.
pub fn guest_target(src: &Path, dst: &str) -> String {
    match (dst.ends_with('/'), src.to_str().and_then(base_name)) {
        (true, Some(name)) => format!("{dst}{name}"),
        _ => dst.to_string(),
    }
}

/// Where on the host a get goes: `dst`, or `dst/<name of src>` when `dst`
/// is an existing directory.
pub fn host_target(src: &str, dst: &Path) -> PathBuf {
    match base_name(src) {
        Some(name) if dst.is_dir() => dst.join(name),
        _ => dst.to_path_buf(),
    }
}

/// Copy `src` on the host to `dst` in the guest. With `archive`, the guest
/// copy keeps the host's owners (uid/gid), else it belongs to the agent's
/// user.
pub fn put(mut conn: Conn, src: &Path, dst: &str, archive: bool) -> Result<(), AgentError> {
    let meta = std::fs::metadata(src).map_err(|e| AgentError::local(src.display(), e))?;
    let payload = if meta.is_dir() {
        Payload::Tar
    } else if meta.is_file() {
        Payload::File
    } else {
        let e = std::io::Error::other("not a regular file or directory");
        return Err(AgentError::local(src.display(), e));
    };
    let file = match payload {
        Payload::File => {
            Some(std::fs::File::open(src).map_err(|e| AgentError::local(src.display(), e))?)
        }
        Payload::Tar => None,
    };
    conn.send(&Frame::Put(PutRequest {
        path: guest_target(src, dst),
        payload,
        mode: meta.permissions().mode() & 0o7777,
        owner: archive.then(|| (meta.uid(), meta.gid())),
    }))?;
    let wr = conn.wr.clone();
    let mut lock = wr.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = DataWriter::new(&mut *lock);
    let sent = match file {
        Some(mut f) => std::io::copy(&mut f, &mut out).map(|_| ()),
        None => {
            let mut b = tar::Builder::new(&mut out);
            b.follow_symlinks(false);
            b.append_dir_all(".", src).and_then(|()| b.finish())
        }
    };
    let sent = sent.and_then(|()| out.finish().map(|_| ()));
    drop(lock);
    // A local failure midway: tell the agent, which is waiting for more.
    if let Err(e) = &sent {
        let _ = conn.send(&Frame::Error(format!("host: {e}")));
    }
    // Whatever happened to our writes, the agent's answer says more (it
    // may have closed after an error of its own).
    let answer = conn.recv();
    match (sent, answer) {
        (_, Ok(Frame::Done)) => Ok(()),
        (_, Ok(Frame::Error(m))) => Err(AgentError::Agent(m)),
        (Err(e), _) => Err(AgentError::local(format!("sending {}", src.display()), e)),
        (Ok(()), Ok(f)) => Err(AgentError::Unexpected(f.name())),
        (Ok(()), Err(e)) => Err(e),
    }
}

/// Copy `src` in the guest to `dst` on the host. With `archive`, a
/// directory's files keep the guest's owners.
pub fn get(mut conn: Conn, src: &str, dst: &Path, archive: bool) -> Result<(), AgentError> {
    conn.send(&Frame::Get {
        path: src.to_string(),
    })?;
    let (payload, mode) = match conn.recv()? {
        Frame::GetReply { payload, mode } => (payload, mode),
        Frame::Error(m) => return Err(AgentError::Agent(m)),
        f => return Err(AgentError::Unexpected(f.name())),
    };
    let target = host_target(src, dst);
    let local = |e| AgentError::local(target.display(), e);
    let mut data = DataReader::new(&mut conn.rd);
    let wrote = match payload {
        Payload::File => std::fs::File::create(&target).and_then(|mut f| {
            std::io::copy(&mut data, &mut f)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
        }),
        Payload::Tar => std::fs::create_dir_all(&target).and_then(|()| {
            let mut ar = tar::Archive::new(&mut data);
            ar.set_preserve_permissions(true);
            ar.set_preserve_ownerships(archive);
            ar.set_overwrite(true);
            ar.unpack(&target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        }),
    };
    // A fault of the stream (the agent's error midway) explains a failed
    // write better than the write's own error.
    if let Some(fault) = data.take_fault() {
        return Err(match fault {
            ProtoError::Remote(m) => AgentError::Agent(m),
            other => AgentError::Proto(other),
        });
    }
    wrote.map_err(local)?;
    data.drain()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_as_docker_cp() {
        assert_eq!(guest_target(Path::new("/h/dir"), "/tmp/"), "/tmp/dir");
        assert_eq!(guest_target(Path::new("/h/dir/"), "/tmp/x"), "/tmp/x");
        assert_eq!(guest_target(Path::new("file"), "/srv/"), "/srv/file");
        assert_eq!(guest_target(Path::new("/"), "/srv/"), "/srv/");
        let tmp = std::env::temp_dir();
        assert_eq!(host_target("/etc/hostname", &tmp), tmp.join("hostname"));
        assert_eq!(host_target("/etc/", &tmp), tmp.join("etc"));
        let new = tmp.join("microvm-cp-does-not-exist");
        assert_eq!(host_target("/etc", &new), new);
        assert_eq!(host_target("/", &tmp), tmp);
    }
}
