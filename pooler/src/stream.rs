//! A connection to a client or a server: plain TCP, TLS over it, or a WebSocket (a
//! client of the HTTP front door).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// A byte stream to a client or a server.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// TLS the pooler accepted (from a client).
    Accepted(Box<server::TlsStream<TcpStream>>),
    /// TLS the pooler opened (to PostgreSQL).
    Connected(Box<client::TlsStream<TcpStream>>),
    /// A WebSocket client (see [`crate::http`]).
    WebSocket(Box<crate::http::WsIo>),
    /// A TLS handshake failed on it: nothing more may be sent or received.
    Closed,
}

impl Stream {
    fn tcp(&self) -> io::Result<&TcpStream> {
        match self {
            Stream::Plain(s) => Ok(s),
            Stream::Accepted(s) => Ok(s.get_ref().0),
            Stream::Connected(s) => Ok(s.get_ref().0),
            Stream::WebSocket(_) | Stream::Closed => Err(closed()),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Stream::WebSocket(w) => Ok(w.local),
            _ => self.tcp()?.local_addr(),
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Stream::WebSocket(w) => Ok(w.peer),
            _ => self.tcp()?.peer_addr(),
        }
    }

    /// Whether TLS can still be started on it (a plain TCP connection).
    pub fn can_start_tls(&self) -> bool {
        matches!(self, Stream::Plain(_))
    }

    /// Whether the client came through the WebSocket front door.
    pub fn is_websocket(&self) -> bool {
        matches!(self, Stream::WebSocket(_))
    }

    /// The first byte the peer sent, without consuming it; `None` at end of stream.
    ///
    /// # Errors
    /// The read's error.
    pub async fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        let Stream::Plain(tcp) = self else {
            return Ok(None);
        };
        let mut b = [0u8; 1];
        Ok((tcp.peek(&mut b).await? == 1).then_some(b[0]))
    }

    /// The ALPN protocol agreed on in the TLS handshake.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Accepted(s) => s.get_ref().1.alpn_protocol(),
            Stream::Connected(s) => s.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// Whether the bytes travel in TLS (for a WebSocket: its HTTP connection).
    pub fn is_tls(&self) -> bool {
        match self {
            Stream::Accepted(_) | Stream::Connected(_) => true,
            Stream::WebSocket(w) => w.secure,
            Stream::Plain(_) | Stream::Closed => false,
        }
    }

    /// Accepts a client's TLS handshake on this plain stream.
    ///
    /// # Errors
    /// The handshake's error; the stream is then closed.
    pub async fn accept(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        let tcp = self.take_plain()?;
        *self = Stream::Accepted(Box::new(acceptor.accept(tcp).await?));
        Ok(())
    }

    /// Opens TLS to a server on this plain stream.
    ///
    /// # Errors
    /// The handshake's error (a certificate that fails verification among them); the
    /// stream is then closed.
    pub async fn connect(
        &mut self,
        connector: &TlsConnector,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let tcp = self.take_plain()?;
        *self = Stream::Connected(Box::new(connector.connect(name, tcp).await?));
        Ok(())
    }

    fn take_plain(&mut self) -> io::Result<TcpStream> {
        match std::mem::replace(self, Stream::Closed) {
            Stream::Plain(tcp) => Ok(tcp),
            other => {
                *self = other;
                Err(io::Error::other("TLS is already on"))
            }
        }
    }

    /// Writes all of `bytes` and, over TLS or a WebSocket, flushes what the layer holds
    /// (a plain write_all could leave it in its buffer until the next write).
    ///
    /// # Errors
    /// The write's error.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        if !matches!(self, Stream::Plain(_)) {
            self.flush().await?;
        }
        Ok(())
    }

    /// The next whole message (at most `max` bytes), reading into `buf` as needed;
    /// `None` when the peer closed the connection first. For the login exchanges; the
    /// session's hot path reads in bulk.
    ///
    /// # Errors
    /// A read error, or a length [`crate::protocol::split_frame`] refuses.
    pub async fn read_frame(
        &mut self,
        buf: &mut bytes::BytesMut,
        max: usize,
    ) -> crate::error::Result<Option<crate::protocol::Frame>> {
        loop {
            if let Some(f) = crate::protocol::split_frame(buf, max)? {
                return Ok(Some(f));
            }
            if self.read_buf(buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Whether an idle connection has something to say or was closed (it must not be
    /// reused then). Reads without waiting; what it reads is lost.
    pub fn readable_now(&mut self) -> bool {
        let mut b = [0u8; 512];
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut read = std::pin::pin!(self.read(&mut b));
        read.as_mut().poll(&mut cx).is_ready()
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection is closed")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Accepted(s) => s.is_write_vectored(),
            Stream::Connected(s) => s.is_write_vectored(),
            Stream::WebSocket(_) => false,
            Stream::Closed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::WebSocket(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}
