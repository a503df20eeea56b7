//! Reads from a target's connection at most once per pause while answers keep coming.
//!
//! A target answers copies one by one, and each write of its wakes the agent: at 10 000 copies a
//! second most of the agent's CPU went into waking up, not into the copies. After a read that
//! returned bytes, the next read waits until the pause has passed since it, and then takes all
//! that arrived meanwhile at once. An answer that comes more than a pause after the last read is
//! read as soon as it arrives, so a quiet connection gains no latency; in a burst an answer
//! waits at most one pause (the timer's granularity, about a millisecond). Writes are never
//! held.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An I/O stream whose reads are paced; see the [module](self) documentation.
pub struct PacedReads<T> {
    inner: T,
    pause: Duration,
    /// When set, no read before this deadline.
    resume: Pin<Box<Sleep>>,
    waiting: bool,
}

impl<T> PacedReads<T> {
    pub fn new(inner: T, pause: Duration) -> Self {
        Self {
            inner,
            pause,
            resume: Box::pin(tokio::time::sleep_until(Instant::now())),
            waiting: false,
        }
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
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.resume.as_mut().reset(Instant::now() + this.pause);
            this.waiting = true;
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

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_stream_is_seen() {
        let (near, far) = tokio::io::duplex(1024);
        let mut paced = PacedReads::new(near, Duration::from_millis(2));
        drop(far);
        let mut buf = [0u8; 8];
        assert_eq!(paced.read(&mut buf).await.expect("read"), 0);
    }
}
