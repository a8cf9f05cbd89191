//! The connections the server accepts.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::server::{Connected, TlsConnectInfo};

/// A connection that tells h2 it does not write vectored.
///
/// On a vectored connection h2 writes every DATA frame of 256 bytes or more
/// (a watch event is bigger) with a system call of its own, chained to the
/// frame headers; on one that is not, it copies frames under 1 KiB into its
/// 16 KiB write buffer, so the messages that many streams of a connection
/// send together leave in one write, one TCP segment, one wake-up of the
/// reader. Larger frames are still written from where they are.
///
/// It also counts its writes ([`Writes`]), for the watch streams of the
/// connection.
pub struct Unvectored<T> {
    io: T,
    writes: Writes,
}

impl<T> Unvectored<T> {
    pub fn new(io: T) -> Unvectored<T> {
        Unvectored {
            io,
            writes: Writes::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if written.is_ready() {
            self.writes.0.done.fetch_add(1, Ordering::Relaxed);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for Unvectored<TcpStream> {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        Connection {
            remote: self.io.peer_addr().ok(),
            accepted_at: Instant::now(),
            writes: self.writes.clone(),
        }
    }
}

/// What the server knows of the connection a request came on (tonic puts it
/// in the request's extensions, inside `TlsConnectInfo` on TLS).
#[derive(Debug, Clone)]
pub struct Connection {
    pub remote: Option<SocketAddr>,
    /// When it was accepted (tonic asks for the connect info once, then).
    pub accepted_at: Instant,
    pub writes: Writes,
}

/// The writes to one connection, counted, so that its streams can tell
/// whether the connection has written since one of them last asked.
#[derive(Debug, Clone, Default)]
pub struct Writes(Arc<WriteCount>);

#[derive(Debug)]
struct WriteCount {
    done: AtomicU64,
    /// `done` when a stream last asked.
    asked_at: AtomicU64,
}

impl Default for WriteCount {
    fn default() -> Self {
        WriteCount {
            done: AtomicU64::new(0),
            asked_at: AtomicU64::new(u64::MAX),
        }
    }
}

impl Writes {
    /// Whether this is the first time a stream asks since the connection
    /// last wrote (or since it was accepted).
    pub fn first_ask_since_write(&self) -> bool {
        let done = self.0.done.load(Ordering::Relaxed);
        self.0.asked_at.swap(done, Ordering::Relaxed) != done
    }
}

impl Connection {
    /// The connection `request` came on, plain or TLS.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Connection> {
        let extensions = request.extensions();
        extensions.get::<Connection>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<Connection>>()
                .map(TlsConnectInfo::get_ref)
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[tokio::test]
    async fn only_the_first_stream_to_ask_after_a_write_is_told_so() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut conn = Unvectored::new(near);
        let writes = conn.writes.clone();
        assert!(
            writes.first_ask_since_write(),
            "the first ask after accepting"
        );
        assert!(!writes.first_ask_since_write(), "the second finds it asked");
        conn.write_all(b"frames").await.expect("a write");
        assert!(
            writes.first_ask_since_write(),
            "the first ask after a write"
        );
        assert!(!writes.first_ask_since_write());
        assert!(!writes.clone().first_ask_since_write(), "clones share it");
    }
}
