//! The little HTTP/1.1 the API needs: one request at a time on a stream,
//! `Content-Length` bodies only, bounded everywhere (request line and
//! headers, header count, body), persistent connections unless the client
//! says `Connection: close`.
//!
//! Written here rather than taken from a crate: the API serves one local
//! client over a Unix socket, and a parser of this size is easy to bound and
//! test completely, where the well-kept HTTP servers bring an async runtime
//! or TCP-only listeners.

use std::io::{self, BufRead, Write};

/// Longest request line or header line.
pub const MAX_LINE: usize = 4096;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 64;
/// Largest body (the biggest API body is a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection failed or timed out.
    #[error("connection error")]
    Io(#[from] io::Error),
    /// The request is not HTTP/1.x as this server speaks it.
    #[error("{0}")]
    Malformed(String),
}

/// The request line and the headers that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Body length.
    pub content_length: usize,
    /// Keep the connection open after the response.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError::Malformed(msg.into())
}

/// One line up to CRLF (or LF), at most [`MAX_LINE`] bytes. `None` at EOF
/// before any byte.
fn read_line<R: BufRead>(r: &mut R) -> Result<Option<String>, HttpError> {
    let mut line = Vec::new();
    let mut limited = <&mut R as io::Read>::take(r, MAX_LINE as u64 + 1);
    let n = limited.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            bad("header line too long")
        } else {
            bad("connection closed in the middle of a request")
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad("request head is not UTF-8"))
}

/// Read a request head. `Ok(None)`: the client closed the connection
/// between requests.
pub fn read_head<R: BufRead>(r: &mut R) -> Result<Option<Head>, HttpError> {
    let line = loop {
        match read_line(r)? {
            None => return Ok(None),
            // Tolerate blank lines between requests (RFC 9112, 2.2).
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let keep_alive_default = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad(format!("unsupported protocol '{version}'"))),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("malformed request method"));
    }
    if !target.starts_with('/') {
        return Err(bad("request target must be a path"));
    }
    let path = target.split('?').next().unwrap_or(target).to_string();

    let mut head = Head {
        method: method.to_string(),
        path,
        content_length: 0,
        keep_alive: keep_alive_default,
        expect_continue: false,
    };
    let mut seen_length = false;
    for _ in 0..=MAX_HEADERS {
        let Some(line) = read_line(r)? else {
            return Err(bad("connection closed in the middle of a request"));
        };
        if line.is_empty() {
            return Ok(Some(head));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("malformed header line"));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = value.parse().map_err(|_| bad("invalid Content-Length"))?;
                if seen_length && n != head.content_length {
                    return Err(bad("conflicting Content-Length headers"));
                }
                if n > MAX_BODY {
                    return Err(bad(format!("body larger than {MAX_BODY} bytes")));
                }
                seen_length = true;
                head.content_length = n;
            }
            "transfer-encoding" => {
                return Err(bad(
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.split(',').any(|t| t.trim() == "close") {
                    head.keep_alive = false;
                } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                    head.keep_alive = true;
                }
            }
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    Err(bad(format!("more than {MAX_HEADERS} headers")))
}

/// Read exactly `len` body bytes (`len` was bounded by [`read_head`]).
pub fn read_body<R: BufRead>(r: &mut R, len: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = vec![0u8; len.min(MAX_BODY)];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// A response: status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// 200, 204, 400, ...
    pub status: u16,
    /// JSON text.
    pub body: Option<String>,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// `200 OK` with a JSON body.
    pub fn json(value: &serde_json::Value) -> Self {
        Self {
            status: 200,
            body: Some(value.to_string()),
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        Self {
            status,
            body: Some(serde_json::json!({ "fault_message": message }).to_string()),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Write `resp`; with `keep_alive` false, announce `Connection: close`.
pub fn write_response<W: Write>(w: &mut W, resp: &Response, keep_alive: bool) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    out.push_str("Server: microvm\r\n");
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    match &resp.body {
        Some(body) => {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            out.push_str(body);
        }
        None if resp.status == 204 => out.push_str("\r\n"),
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// Tell a client that sent `Expect: 100-continue` to send its body.
pub fn write_continue<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, HttpError> {
        read_head(&mut io::Cursor::new(text.as_bytes().to_vec()))
    }

    #[test]
    fn parses_a_request_with_a_body() {
        let text =
            "PUT /drives/rootfs?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}";
        let mut c = io::Cursor::new(text.as_bytes().to_vec());
        let h = read_head(&mut c).unwrap().unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/drives/rootfs");
        assert_eq!(h.content_length, 2);
        assert!(h.keep_alive && !h.expect_continue);
        assert_eq!(read_body(&mut c, 2).unwrap(), b"{}");
        assert!(read_head(&mut c).unwrap().is_none(), "clean EOF");
    }

    #[test]
    fn connection_and_expect_headers() {
        let h = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = head("PUT /x HTTP/1.1\nExpect: 100-continue\nContent-Length: 5\n\n")
            .unwrap()
            .unwrap();
        assert!(h.expect_continue && h.content_length == 5);
    }

    #[test]
    fn refuses_what_it_does_not_speak_and_bounds_everything() {
        let err = |t: &str| head(t).unwrap_err().to_string();
        assert_eq!(err("GET /\r\n\r\n"), "malformed request line");
        assert_eq!(err("GET / HTTP/2\r\n\r\n"), "unsupported protocol 'HTTP/2'");
        assert_eq!(err("get / HTTP/1.1\r\n\r\n"), "malformed request method");
        assert_eq!(
            err("GET x HTTP/1.1\r\n\r\n"),
            "request target must be a path"
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            "malformed header line"
        );
        assert!(err("PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n").contains("larger"));
        assert!(err("PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").contains("Content-Length"));
        assert!(
            err("PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .contains("conflicting")
        );
        assert!(err("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .contains("Transfer-Encoding"));
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: x"),
            "connection closed in the middle of a request"
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE));
        assert_eq!(err(&long), "header line too long");
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(err(&many).starts_with("more than"));
        let ok = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS));
        assert!(head(&ok).unwrap().is_some());
        // A body shorter than announced is an I/O error, not a hang or a panic.
        let mut c = io::Cursor::new(b"ab".to_vec());
        assert!(read_body(&mut c, 5).is_err());
    }

    #[test]
    fn responses_are_well_formed() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::no_content(), true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 204 No Content\r\nServer: microvm\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, &Response::fault(400, "no \"kernel\""), false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"no \\\"kernel\\\"\"}"));
    }
}
