//! A device connection's byte stream: plain TCP, or TLS over TCP (mqtts), with the one
//! way of reading that keeps an idle connection's read buffer released.
//!
//! Plain TCP waits for readability with no buffer and then reads what is there. TLS is
//! read through tokio-rustls, which decrypts into the caller's buffer; after a read that
//! did not fill the buffer, rustls holds no plaintext and has processed every complete
//! record, so the connection can again wait for the socket's readability without a
//! buffer. (rustls keeps its own small record buffer per connection; the idle
//! measurement in BENCHMARKS.md includes it.)

use std::io;

use bytes::BytesMut;
use futures_util::FutureExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::tls::TlsStream;

/// Bytes read from the socket at a time (more when a packet needs it).
const READ_CHUNK: usize = 16 * 1024;

/// A device connection's stream.
pub(super) enum DeviceStream {
    /// Plaintext MQTT.
    Plain(TcpStream),
    /// mqtts. Boxed: the TLS state is large and only some connections have it.
    Tls {
        stream: Box<TlsStream<TcpStream>>,
        /// rustls may hold plaintext already (after the handshake, or after a read
        /// that filled the buffer): read before waiting for the socket. Waiting first
        /// would never wake for bytes rustls took off the socket already.
        more: bool,
    },
}

impl DeviceStream {
    /// Read more bytes into `buf`: `Ok(false)` at end of stream. While nothing is there
    /// an empty `buf` is released.
    pub(super) async fn fill(&mut self, buf: &mut BytesMut) -> Result<bool, ()> {
        match self {
            DeviceStream::Plain(stream) => loop {
                buf.reserve(READ_CHUNK);
                match stream.try_read_buf(buf) {
                    Ok(0) => return Ok(false),
                    Ok(_) => return Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing there: release the buffer while waiting, if it is empty.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        stream.readable().await.map_err(|_| ())?;
                    }
                    Err(_) => return Err(()),
                }
            },
            DeviceStream::Tls { stream, more } => loop {
                if !*more {
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                    stream.get_ref().0.readable().await.map_err(|_| ())?;
                }
                buf.reserve(READ_CHUNK);
                match read_now(stream, buf) {
                    // Nothing decrypted yet (a partial record, or a spurious wake-up).
                    None => *more = false,
                    Some(Ok((0, _))) => return Ok(false),
                    Some(Ok((_, full))) => {
                        *more = full;
                        return Ok(true);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "mqtts read failed");
                        return Err(());
                    }
                }
            },
        }
    }

    /// Write all of `data` (and, for TLS, flush the records out).
    pub(super) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            DeviceStream::Plain(stream) => stream.write_all(data).await,
            DeviceStream::Tls { stream, .. } => {
                stream.write_all(data).await?;
                stream.flush().await
            }
        }
    }
}

/// One read attempt that does not wait: `None` when nothing is readable now; otherwise
/// the bytes read and whether they filled the buffer's spare room.
fn read_now(
    stream: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
) -> Option<io::Result<(usize, bool)>> {
    let room = buf.capacity() - buf.len();
    // Polled once: a pending read has registered for the socket's readiness, which the
    // caller then waits for itself (without a buffer).
    let read = stream.read_buf(buf).now_or_never()?;
    Some(read.map(|n| (n, n == room)))
}
