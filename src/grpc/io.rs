//! The connections the server accepts.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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
pub struct Unvectored<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for Unvectored<TcpStream> {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        Connection {
            remote: self.0.peer_addr().ok(),
            accepted_at: Instant::now(),
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
