//! The handoff's wire: frames over a Unix stream socket, and listening sockets passed along
//! with one of them (`SCM_RIGHTS`).
//!
//! A frame is an 11-byte header, then its payload:
//! `"PIAH"`, the protocol version (u16, big-endian), the kind (u8), the payload's length (u32,
//! big-endian). Each kind has its own length bound, checked before anything is read, so a
//! peer cannot make the other side allocate more than that. The header never changes between
//! versions; an agent that reads a protocol version it does not speak stops there.
//!
//! The conversation, new agent (B) to old agent (A):
//! - B -> A `Hello`: JSON `{"agentVersion", "stateVersion"}`;
//! - A -> B `Listeners`: JSON list of `{"address"}` (TCP) or `{"socket"}` (the handoff socket
//!   itself), one per descriptor, in order, the descriptors attached to this frame;
//! - A -> B `State`: the state version (u32, big-endian), then the state as JSON;
//! - B -> A `Taken`: B serves on the listeners; A stops.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

pub const MAGIC: [u8; 4] = *b"PIAH";
/// The framing and message set this agent speaks.
pub const PROTOCOL_VERSION: u16 = 1;
const HEADER_LEN: usize = 11;
/// Listeners passed at most: credentials on a few addresses, probe, metrics, the socket.
pub const MAX_FDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Listeners = 2,
    State = 3,
    Taken = 4,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Listeners,
            3 => Kind::State,
            4 => Kind::Taken,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    fn max_len(self) -> usize {
        match self {
            Kind::Hello | Kind::Taken => 4 * 1024,
            Kind::Listeners => 64 * 1024,
            // A full cache of the largest size the flags allow is about 2.5 KiB an entry.
            Kind::State => 512 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("not a handoff frame")]
    Magic,
    #[error("protocol version {0}, this agent speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("expected a {expected:?} frame, got kind {got}")]
    Unexpected { expected: Kind, got: u8 },
    #[error("a {0:?} frame of {1} bytes is over its bound")]
    TooLong(Kind, usize),
    #[error("more descriptors than {MAX_FDS} were passed")]
    TooManyFds,
}

fn header(kind: Kind, len: usize) -> Result<[u8; HEADER_LEN], WireError> {
    if len > kind.max_len() {
        return Err(WireError::TooLong(kind, len));
    }
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    h[6] = kind as u8;
    h[7..].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(h)
}

/// Check a header against the kind expected; the payload's length.
fn parse_header(h: &[u8; HEADER_LEN], expected: Kind) -> Result<usize, WireError> {
    if h[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    if Kind::from_byte(h[6]) != Some(expected) {
        return Err(WireError::Unexpected {
            expected,
            got: h[6],
        });
    }
    let len = u32::from_be_bytes([h[7], h[8], h[9], h[10]]) as usize;
    if len > expected.max_len() {
        return Err(WireError::TooLong(expected, len));
    }
    Ok(len)
}

pub async fn send(stream: &mut UnixStream, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    stream.write_all(&header(kind, payload.len())?).await?;
    stream.write_all(payload).await?;
    stream.flush().await?;
    Ok(())
}

/// Send a frame with `fds` attached to its first byte.
pub async fn send_with_fds(
    stream: &mut UnixStream,
    kind: Kind,
    payload: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), WireError> {
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds);
    }
    let head = header(kind, payload.len())?;
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("descriptors do not fit"));
            }
            rustix::net::sendmsg(
                stream.as_fd(),
                &[IoSlice::new(&head)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        })
        .await?;
    stream.write_all(&head[sent..]).await?;
    stream.write_all(payload).await?;
    stream.flush().await?;
    Ok(())
}

/// Read one frame of `kind`.
pub async fn recv(stream: &mut UnixStream, kind: Kind) -> Result<Vec<u8>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact(stream, &mut h).await?;
    let len = parse_header(&h, kind)?;
    read_payload(stream, len).await
}

/// Read one frame of `kind` and the descriptors that came with it (owned from here on: they
/// close when dropped).
pub async fn recv_with_fds(
    stream: &mut UnixStream,
    kind: Kind,
) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut h = [0u8; HEADER_LEN];
    let (got, fds, truncated) = stream
        .async_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                stream.as_fd(),
                &mut [IoSliceMut::new(&mut h)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            Ok((msg.bytes, fds, msg.flags.contains(ReturnFlags::CTRUNC)))
        })
        .await?;
    if truncated || fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds);
    }
    if got == 0 {
        return Err(WireError::Closed);
    }
    read_exact(stream, &mut h[got..]).await?;
    let len = parse_header(&h, kind)?;
    Ok((read_payload(stream, len).await?, fds))
}

async fn read_exact(stream: &mut UnixStream, buf: &mut [u8]) -> Result<(), WireError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// The payload, grown as it arrives: a length in the header reserves nothing by itself.
async fn read_payload(stream: &mut UnixStream, len: usize) -> Result<Vec<u8>, WireError> {
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let read = (&mut *stream)
        .take(len as u64)
        .read_to_end(&mut payload)
        .await?;
    if read < len {
        return Err(WireError::Closed);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_and_descriptors_cross_a_socket_pair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        send_with_fds(&mut a, Kind::Listeners, b"[1]", &[listener.as_fd()])
            .await
            .unwrap();
        send(&mut a, Kind::State, b"state").await.unwrap();
        let (payload, fds) = recv_with_fds(&mut b, Kind::Listeners).await.unwrap();
        assert_eq!(payload, b"[1]");
        assert_eq!(fds.len(), 1);
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        assert_eq!(recv(&mut b, Kind::State).await.unwrap(), b"state");
    }

    #[tokio::test]
    async fn a_frame_over_its_bound_or_of_another_version_is_refused_unread() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut h = header(Kind::Hello, 0).unwrap();
        h[7..].copy_from_slice(&(1u32 << 20).to_be_bytes());
        a.write_all(&h).await.unwrap();
        assert!(matches!(
            recv(&mut b, Kind::Hello).await,
            Err(WireError::TooLong(Kind::Hello, _))
        ));
        let mut h = header(Kind::Hello, 0).unwrap();
        h[4..6].copy_from_slice(&7u16.to_be_bytes());
        a.write_all(&h).await.unwrap();
        assert!(matches!(
            recv(&mut b, Kind::Hello).await,
            Err(WireError::Version(7))
        ));
        drop(a);
        assert!(matches!(
            recv(&mut b, Kind::Hello).await,
            Err(WireError::Closed)
        ));
    }
}
