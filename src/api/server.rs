//! The API socket: created mode 0600, removed on drop; an `api` thread
//! accepts connections, and one `api-conn` thread per connection (at most
//! [`MAX_CONNECTIONS`]) reads requests, parses each into a typed action,
//! hands it to the [`ActionSink`] (the main thread's event loop) and writes
//! back the rendered answer. Requests are answered in the order the main
//! thread takes them, one at a time.

use std::io::{BufReader, BufWriter};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, HttpError, Response};
use super::{parse_request, render};
use crate::rpc::ActionSink;

/// Where the server hands actions, shared by its threads.
pub type Sink = Arc<dyn ActionSink>;

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request may wait for the main thread.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors creating the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path is taken by something that is not a stale socket.
    #[error("API socket '{0}' already exists (and is not a stale socket)")]
    Exists(String),
    /// Another process serves that socket.
    #[error("API socket '{0}' is in use by another process")]
    InUse(String),
    /// The socket could not be set up.
    #[error("cannot create API socket '{path}'")]
    Create {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Open connections: a copy of each socket (to shut it down) and its thread.
type Connections = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

/// A running API server.
pub struct ApiServer {
    path: PathBuf,
    stop: EventFd,
    accept: Option<JoinHandle<()>>,
    conns: Connections,
}

/// Remove `path` if it is a socket nobody listens on; refuse anything else.
fn clear_stale(path: &Path) -> Result<(), ServerError> {
    let shown = || path.display().to_string();
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::Exists(shown()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(shown())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ServerError::Create {
                path: shown(),
                source,
            })
        }
        Err(_) => Err(ServerError::Exists(shown())),
    }
}

fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file mode mask; the socket file
    // is created with 0600 from the start, with no window where others could
    // connect. The old mask is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl ApiServer {
    /// Create the socket at `path` and start serving; actions go to `sink`;
    /// a request body over `max_payload` bytes (at most [`http::MAX_BODY`])
    /// is refused.
    pub fn start(path: &Path, sink: Sink, max_payload: usize) -> Result<Self, ServerError> {
        let create = |source| ServerError::Create {
            path: path.display().to_string(),
            source,
        };
        clear_stale(path)?;
        let listener = bind_private(path).map_err(create)?;
        listener.set_nonblocking(true).map_err(create)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(create)?;
        let stop_copy = stop.try_clone().map_err(create)?;
        let conns: Connections = Arc::default();
        let conns_copy = conns.clone();
        let accept = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, stop_copy, sink, conns_copy, max_payload))
            .map_err(create)?;
        log::info!("API listening on {}", path.display());
        Ok(Self {
            path: path.to_owned(),
            stop,
            accept: Some(accept),
            conns,
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.stop.write(1).is_ok() {
            if let Some(t) = self.accept.take() {
                let _ = t.join();
            }
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (stream, thread) in conns {
            // Wakes the thread from its read; it then ends.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    stop: EventFd,
    sink: Sink,
    conns: Connections,
    max_payload: usize,
) {
    // The connection threads this one starts inherit its filter.
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
        log::error!("API: {}", crate::error_chain(&e));
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("API: poll failed: {}", std::io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("API: accept failed: {e}");
                continue;
            }
        };
        let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|(_, t)| !t.is_finished());
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            drop(list);
            let mut w = &stream;
            let _ = http::write_response(
                &mut w,
                &Response::fault(503, "too many API connections"),
                false,
            );
            continue;
        }
        let Ok(copy) = stream.try_clone() else {
            continue;
        };
        active.fetch_add(1, Ordering::SeqCst);
        let (sink, act) = (sink.clone(), active.clone());
        match std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                serve_connection(&stream, sink.as_ref(), max_payload);
                // The accept loop keeps a copy of the descriptor (to end us on
                // drop): shut the socket itself down so the client sees EOF.
                let _ = stream.shutdown(std::net::Shutdown::Both);
                act.fetch_sub(1, Ordering::SeqCst);
            }) {
            Ok(t) => list.push((copy, t)),
            Err(e) => {
                active.fetch_sub(1, Ordering::SeqCst);
                log::warn!("API: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Serve requests on one connection until the client closes it, asks to,
/// sends something unreadable, or stays idle past [`IDLE_TIMEOUT`].
fn serve_connection(stream: &UnixStream, sink: &dyn ActionSink, max_payload: usize) {
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
        return;
    }
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut writer = BufWriter::new(write_half);
    loop {
        let head = match http::read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) | Err(HttpError::Io(_)) => return,
            Err(HttpError::Malformed(msg)) => {
                let _ = http::write_response(&mut writer, &Response::fault(400, &msg), false);
                return;
            }
        };
        if head.content_length > max_payload {
            let msg = format!(
                "Request payload with size {} is larger than the limit of {max_payload} allowed by server.",
                head.content_length
            );
            let _ = http::write_response(&mut writer, &Response::fault(400, &msg), false);
            return;
        }
        if head.expect_continue
            && head.content_length > 0
            && http::write_continue(&mut writer).is_err()
        {
            return;
        }
        let Ok(body) = http::read_body(&mut reader, head.content_length) else {
            return;
        };
        let resp = match parse_request(&head.method, &head.path, &body) {
            Err(msg) => Response::fault(400, &msg),
            Ok(action) => {
                log::debug!("API: {} {}", head.method, head.path);
                let (tx, rx) = mpsc::channel();
                sink.submit(action.clone(), tx);
                match rx.recv_timeout(ANSWER_TIMEOUT) {
                    Ok(result) => render(&action, &result),
                    Err(_) => {
                        Response::fault(503, "the microVM did not answer (is it shutting down?)")
                    }
                }
            }
        };
        if http::write_response(&mut writer, &resp, head.keep_alive).is_err() || !head.keep_alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{ActionResult, VmmAction, VmmData};
    use std::io::{Read, Write};

    /// Hands each action to the test, as the event loop hands it to main.
    struct Queue(Mutex<mpsc::Sender<(VmmAction, mpsc::Sender<ActionResult>)>>);

    impl ActionSink for Queue {
        fn submit(&self, action: VmmAction, reply: mpsc::Sender<ActionResult>) {
            let _ = self.0.lock().unwrap().send((action, reply));
        }
    }

    fn sock_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "microvm-api-test-{tag}-{}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn socket_is_private_stale_ones_are_replaced_and_it_is_removed() {
        let path = sock_path("perm");
        let _ = std::fs::remove_file(&path);
        // A stale socket (bound, listener gone) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let (tx, actions) = mpsc::channel();
        let sink: Sink = Arc::new(Queue(Mutex::new(tx)));
        let server = ApiServer::start(&path, sink.clone(), 51200).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live one is not.
        assert!(matches!(
            ApiServer::start(&path, sink.clone(), 51200),
            Err(ServerError::InUse(_))
        ));

        // One request through the event loop and back.
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            }
        });
        let (action, reply) = actions.recv().unwrap();
        assert_eq!(action, VmmAction::GetVersion);
        reply.send(Ok(VmmData::Version)).unwrap();
        let out = client.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("firecracker_version"));

        // Malformed requests are answered by the server thread itself.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"BLAH\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("fault_message"));

        drop(server);
        assert!(!path.exists(), "socket removed on drop");

        // A regular file in the way is an error.
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            ApiServer::start(&path, sink, 51200),
            Err(ServerError::Exists(_))
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
