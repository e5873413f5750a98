//! A WebSocket carrying the PostgreSQL wire protocol as a byte stream (what
//! `@neondatabase/serverless` sends: binary messages whose boundaries are not the
//! protocol's), so a WebSocket client runs the same session code as a TCP client.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream as _};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket as a byte stream.
pub struct WsIo {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    /// What is left of the message being read.
    pending: Bytes,
    /// The HTTP connection's own addresses (cancel keys and logs use them).
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The HTTP connection is TLS.
    pub secure: bool,
}

impl std::fmt::Debug for WsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("peer", &self.peer)
            .field("secure", &self.secure)
            .finish()
    }
}

impl WsIo {
    pub fn new(
        ws: WebSocketStream<TokioIo<Upgraded>>,
        local: SocketAddr,
        peer: SocketAddr,
        secure: bool,
    ) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            local,
            peer,
            secure,
        }
    }
}

fn other(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // End of stream: the client closed.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Text(t))) => this.pending = Bytes::from(t),
                // Pings are answered by the WebSocket layer on the next write or flush.
                Some(Ok(_)) => {}
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(other)?;
        Pin::new(ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(other)
    }
}
