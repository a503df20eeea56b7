//! Reads from a target's connection at most once per pause while answers keep coming.
//!
//! A target answers copies one by one, and each write of its wakes the agent: at 10 000 copies a
//! second most of the agent's CPU went into waking up, not into the copies. After a read that
//! returned bytes, the next read waits until the pause has passed since it, and then takes all
//! that arrived meanwhile at once. An answer that comes more than a pause after the last read is
//! read as soon as it arrives, so a quiet connection gains no latency; in a burst an answer
//! waits at most one pause (the timer's granularity, about a millisecond). Writes are never
//! held.
//!
//! On a TCP socket the pause also keeps the kernel from waking the agent for each segment that
//! arrives in it: its receive low-water mark (`SO_RCVLOWAT`) is raised for the pause, and put
//! back to one byte before the next read. Linux wakes a reader early all the same when the
//! socket is closing or its buffer fills.
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An I/O stream whose reads are paced; see the [module](self) documentation.
pub struct PacedReads<T> {
    inner: T,
    pause: Duration,
    /// When `waiting`, no read before this deadline.
    resume: Pin<Box<Sleep>>,
    waiting: bool,
    /// The socket whose low-water mark is raised during the pause; owned by `inner`.
    socket: Option<RawFd>,
}

/// The receive low-water mark during a pause: more than a burst of small answers brings, and
/// few enough bytes that large answers are read as they stream. Linux also caps the socket's
/// receive window at the highest mark set (256 KiB: 250 MB/s at a millisecond's round trip).
const PAUSED_LOW_WATER: libc::c_int = 256 * 1024;

impl<T> PacedReads<T> {
    pub fn new(inner: T, pause: Duration) -> Self {
        Self {
            inner,
            pause,
            resume: Box::pin(tokio::time::sleep_until(Instant::now())),
            waiting: false,
            socket: None,
        }
    }
}

impl<T: AsRawFd> PacedReads<T> {
    /// Paced reads of a TCP socket, which the kernel does not wake for during a pause.
    pub fn socket(inner: T, pause: Duration) -> Self {
        let socket = Some(inner.as_raw_fd());
        Self {
            socket,
            ..Self::new(inner, pause)
        }
    }
}

/// Sets the socket's receive low-water mark. A failure leaves it as it was: the reads are
/// paced all the same, only the wakeups are not saved.
fn set_low_water(socket: RawFd, bytes: libc::c_int) {
    // SAFETY: `socket` is an open socket (its owner outlives the reader), and setsockopt only
    // reads the `c_int` it is given for its size.
    unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PacedReads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.waiting {
            ready!(this.resume.as_mut().poll(cx));
            this.waiting = false;
            if let Some(socket) = this.socket {
                // Also signals what arrived meanwhile, should the read below find nothing.
                set_low_water(socket, 1);
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.resume.as_mut().reset(Instant::now() + this.pause);
            this.waiting = true;
            if let Some(socket) = this.socket {
                set_low_water(socket, PAUSED_LOW_WATER);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PacedReads<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_read_right_after_a_read_waits_for_the_pause_and_takes_all_that_came() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut paced = PacedReads::new(near, Duration::from_millis(2));
        let mut buf = [0u8; 64];
        far.write_all(b"one").await.expect("write");
        let start = Instant::now();
        assert_eq!(paced.read(&mut buf).await.expect("read"), 3);
        // Within the pause nothing is read, however much comes.
        far.write_all(b"two").await.expect("write");
        far.write_all(b"three").await.expect("write");
        assert_eq!(paced.read(&mut buf).await.expect("read"), 8);
        assert_eq!(&buf[..8], b"twothree");
        assert_eq!(start.elapsed(), Duration::from_millis(2));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_after_a_quiet_pause_are_read_at_once() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut paced = PacedReads::new(near, Duration::from_millis(2));
        let mut buf = [0u8; 64];
        far.write_all(b"one").await.expect("write");
        assert_eq!(paced.read(&mut buf).await.expect("read"), 3);
        tokio::time::sleep(Duration::from_millis(5)).await;
        far.write_all(b"two").await.expect("write");
        let start = Instant::now();
        assert_eq!(paced.read(&mut buf).await.expect("read"), 3);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_are_never_held() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut paced = PacedReads::new(near, Duration::from_secs(60));
        let mut buf = [0u8; 64];
        far.write_all(b"answer").await.expect("write");
        assert_eq!(paced.read(&mut buf).await.expect("read"), 6);
        let start = Instant::now();
        paced.write_all(b"copy").await.expect("write");
        paced.flush().await.expect("flush");
        assert_eq!(far.read(&mut buf).await.expect("read"), 4);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Over real TCP, with the low-water mark: what comes during a pause is read after it, all
    /// at once; what comes after a quiet spell, at once; the end of the stream is seen.
    #[tokio::test]
    async fn a_socket_s_bytes_are_all_read_across_pauses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let near = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut far, _) = listener.accept().await.expect("accept");
        let pause = Duration::from_millis(50);
        let mut paced = PacedReads::socket(near, pause);
        let mut buf = [0u8; 64];
        far.write_all(b"one").await.expect("write");
        assert_eq!(paced.read(&mut buf).await.expect("read"), 3);
        far.write_all(b"two").await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
        far.write_all(b"three").await.expect("write");
        let mut got = Vec::new();
        while got.len() < 8 {
            let n = paced.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"twothree");
        // A quiet spell, then one small write: read without waiting for more.
        tokio::time::sleep(pause * 2).await;
        far.write_all(b"x").await.expect("write");
        let read = tokio::time::timeout(Duration::from_secs(5), paced.read(&mut buf)).await;
        assert_eq!(read.expect("read in time").expect("read"), 1);
        // One byte right after a read, then the end: both seen after the pause.
        far.write_all(b"y").await.expect("write");
        drop(far);
        let read = tokio::time::timeout(Duration::from_secs(5), paced.read(&mut buf)).await;
        assert_eq!(read.expect("read in time").expect("read"), 1);
        let read = tokio::time::timeout(Duration::from_secs(5), paced.read(&mut buf)).await;
        assert_eq!(read.expect("end in time").expect("read"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_stream_is_seen() {
        let (near, far) = tokio::io::duplex(1024);
        let mut paced = PacedReads::new(near, Duration::from_millis(2));
        drop(far);
        let mut buf = [0u8; 8];
        assert_eq!(paced.read(&mut buf).await.expect("read"), 0);
    }
}
