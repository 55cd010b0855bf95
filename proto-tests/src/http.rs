//! A byte-exact HTTP/1.x client for talking to the agent.
//!
//! Real clients (hyper, reqwest, the SDKs) normalise what they send: they add a
//! `Host` header, merge duplicate headers, refuse oversized ones. The security
//! tests need to send exactly the bytes an attacker would, so requests here are
//! written by hand and responses parsed by hand. Every read and write is bounded
//! by a deadline.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

/// How long a whole exchange may take before the client gives up. Generous:
/// the agent's own upstream deadline is 5 s, and a debug build on two busy
/// cores is slow.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// A response head larger than this is treated as a protocol error: the agent
/// has no reason to send one.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A request, serialised exactly as built: no header is added or reordered.
#[derive(Clone, Debug)]
pub struct RawRequest {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawRequest {
    /// `GET <target> HTTP/1.1` with no headers at all (not even `Host`).
    pub fn get(target: impl Into<String>) -> Self {
        Self::new("GET", target)
    }

    pub fn new(method: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            target: target.into(),
            version: "HTTP/1.1".to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Override the protocol version, e.g. `HTTP/1.0`.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Append a header; calling twice with the same name sends it twice.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Append a body and the matching `Content-Length`.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        let len = self.body.len().to_string();
        self.header("Content-Length", len)
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.method, self.target, self.version).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    pub fn is_head(&self) -> bool {
        self.method.eq_ignore_ascii_case("HEAD")
    }
}

/// A parsed response.
#[derive(Clone)]
pub struct RawResponse {
    pub status: u16,
    pub version: String,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header with this name, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON, or a panic that shows the response.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }

    /// A string field of a JSON object body.
    pub fn json_str(&self, field: &str) -> Option<String> {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()?
            .get(field)?
            .as_str()
            .map(str::to_owned)
    }
}

impl fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.version, self.status, self.reason)?;
        for (n, v) in &self.headers {
            write!(f, "\n{n}: {v}")?;
        }
        write!(f, "\n\n{}", String::from_utf8_lossy(&self.body))
    }
}

/// Send `request` on a fresh connection and read one response.
pub async fn send(addr: SocketAddr, request: &RawRequest) -> io::Result<RawResponse> {
    send_bytes(
        addr,
        &request.to_bytes(),
        request.is_head(),
        DEFAULT_EXCHANGE_TIMEOUT,
    )
    .await
}

/// Write `bytes` on a fresh connection and read one response within `limit`.
///
/// A server may answer and close before it has read everything (e.g. a 431 for
/// an oversized header), so a failed write is not fatal: the response, if one
/// arrives, is still read and returned.
pub async fn send_bytes(
    addr: SocketAddr,
    bytes: &[u8],
    head_only: bool,
    limit: Duration,
) -> io::Result<RawResponse> {
    let deadline = Instant::now() + limit;
    let mut stream = timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connect"))??;
    let write_result = timeout_at(deadline, stream.write_all(bytes))
        .await
        .map_err(|_| timed_out("write"))
        .and_then(|r| r);
    match read_response(&mut stream, head_only, deadline).await {
        Ok(response) => Ok(response),
        Err(read_err) => match write_result {
            Err(write_err) => Err(io::Error::new(
                write_err.kind(),
                format!("write failed ({write_err}); then read failed ({read_err})"),
            )),
            Ok(()) => Err(read_err),
        },
    }
}

/// A connection to `addr` from the loopback address `source` (any of 127.0.0.0/8 works on
/// Linux), so one test can play several pods with different addresses.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    timeout(DEFAULT_EXCHANGE_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| timed_out("connect"))?
}

/// [`send`], from the loopback address `source`.
pub async fn send_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    request: &RawRequest,
) -> io::Result<RawResponse> {
    let deadline = Instant::now() + DEFAULT_EXCHANGE_TIMEOUT;
    let mut stream = connect_from(source, addr).await?;
    timeout_at(deadline, stream.write_all(&request.to_bytes()))
        .await
        .map_err(|_| timed_out("write"))??;
    read_response(&mut stream, request.is_head(), deadline).await
}

/// Read one response from `stream`, skipping interim (1xx) responses.
pub async fn read_response(
    stream: &mut TcpStream,
    head_only: bool,
    deadline: Instant,
) -> io::Result<RawResponse> {
    let mut buf = Vec::with_capacity(4096);
    // Bounded: each pass consumes one interim response or returns.
    for _ in 0..8 {
        let head_end = read_until_head_end(stream, &mut buf, deadline).await?;
        let head = std::str::from_utf8(&buf[..head_end])
            .map_err(|_| protocol("response head is not UTF-8"))?
            .to_owned();
        buf.drain(..head_end + 4);
        let (version, status, reason, headers) = parse_head(&head)?;
        if (100..200).contains(&status) {
            continue;
        }
        let mut response = RawResponse {
            status,
            version,
            reason,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        response.body = if chunked {
            read_chunked(stream, buf, deadline).await?
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| protocol("bad content-length"))?;
            read_exact_body(stream, buf, len, deadline).await?
        } else {
            read_to_eof(stream, buf, deadline).await?
        };
        return Ok(response);
    }
    Err(protocol("too many interim responses"))
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = timeout_at(deadline, stream.read(&mut chunk))
        .await
        .map_err(|_| timed_out("read"))??;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

async fn read_until_head_end(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            return Ok(pos);
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(protocol("response head too large"));
        }
        if fill(stream, buf, deadline).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a complete response head ({} bytes received)",
                    buf.len()
                ),
            ));
        }
    }
}

async fn read_exact_body(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    len: usize,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    while buf.len() < len {
        if fill(stream, &mut buf, deadline).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the body",
            ));
        }
    }
    buf.truncate(len);
    Ok(buf)
}

async fn read_to_eof(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    while fill(stream, &mut buf, deadline).await? != 0 {}
    Ok(buf)
}

async fn read_chunked(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(pos) = find(&buf, b"\r\n") {
                break pos;
            }
            if fill(stream, &mut buf, deadline).await? == 0 {
                return Err(protocol("connection closed inside a chunk size"));
            }
        };
        let size_line = std::str::from_utf8(&buf[..line_end])
            .map_err(|_| protocol("chunk size is not UTF-8"))?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| protocol("bad chunk size"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            return Ok(body);
        }
        while buf.len() < size + 2 {
            if fill(stream, &mut buf, deadline).await? == 0 {
                return Err(protocol("connection closed inside a chunk"));
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

type Head = (String, u16, String, Vec<(String, String)>);

fn parse_head(head: &str) -> io::Result<Head> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| protocol("empty response"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_owned();
    if !version.starts_with("HTTP/") {
        return Err(protocol("not an HTTP response"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| protocol("bad status code"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| protocol("header line without a colon"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok((version, status, reason, headers))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_serialised_verbatim() {
        let req = RawRequest::get("/v1/credentials")
            .header("Authorization", "a")
            .header("Authorization", "b");
        assert_eq!(
            String::from_utf8(req.to_bytes()).unwrap(),
            "GET /v1/credentials HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n"
        );
    }

    #[test]
    fn head_is_parsed() {
        let (v, s, r, h) = parse_head("HTTP/1.1 404 Not Found\r\nA: b\r\nC:d").unwrap();
        assert_eq!((v.as_str(), s, r.as_str()), ("HTTP/1.1", 404, "Not Found"));
        assert_eq!(h, vec![("A".into(), "b".into()), ("C".into(), "d".into())]);
    }
}
