//! Drains the kernel's ring buffer into a bounded channel of packet batches, and tells how full it
//! is.
//!
//! The kernel wakes the reader only above a fill level (a wakeup per record would cost about a
//! microsecond each); below it, a short timer collects records in batches. Packets go on in
//! [`PacketBatch`]es, one channel send per batch. While the next stage has no room the reader
//! leaves records in the ring buffer: the channel never grows, and what does not fit is counted
//! by the kernel (`ringbuf_full`).
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use prometheus_client::encoding::DescriptorEncoder;
use shadow_common::InterfaceCounters;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{PacketBatch, records::PacketAssembler};
use crate::admin::export::{self, Export};

/// Counters of the reader, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct RingCounters {
    pub records_read: AtomicU64,
    pub malformed_records: AtomicU64,
    pub incomplete_packets: AtomicU64,
    pub packets_out: AtomicU64,
    /// Packets dropped at shutdown because the next stage had stopped taking them.
    pub channel_full: AtomicU64,
    /// Times the reader woke up and found records.
    pub batches: AtomicU64,
    /// Per ifindex, what the reader took from the ring buffer: see
    /// [`PacketAssembler::take_interface_counts`]. Added to once per drain; the owner removes
    /// the entries of interfaces it no longer counts.
    pub interfaces: Mutex<BTreeMap<u32, InterfaceCounters>>,
}

/// A snapshot of [`RingCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RingCountersSnapshot {
    pub records_read: u64,
    pub malformed_records: u64,
    pub incomplete_packets: u64,
    pub packets_out: u64,
    pub channel_full: u64,
    #[serde(rename = "read_batches")]
    pub batches: u64,
}

impl RingCounters {
    /// What the reader took from the ring buffer for `ifindex`.
    pub fn interface(&self, ifindex: u32) -> InterfaceCounters {
        let interfaces = self
            .interfaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        interfaces.get(&ifindex).copied().unwrap_or_default()
    }

    /// Forgets the interfaces for which `keep` is false.
    pub fn retain_interfaces(&self, keep: impl Fn(u32) -> bool) {
        let mut interfaces = self
            .interfaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        interfaces.retain(|ifindex, _| keep(*ifindex));
    }

    pub fn snapshot(&self) -> RingCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RingCountersSnapshot {
            records_read: get(&self.records_read),
            malformed_records: get(&self.malformed_records),
            incomplete_packets: get(&self.incomplete_packets),
            packets_out: get(&self.packets_out),
            channel_full: get(&self.channel_full),
            batches: get(&self.batches),
        }
    }
}

/// How often the reader collects records that did not trigger a wakeup.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The most records drained before the task yields to others.
const BATCH_LIMIT: usize = 4096;

/// How long the final drain at shutdown waits for room in the channel before it drops.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Reads the ring buffer until `shutdown` turns true, then drains what is left and returns.
///
/// While the channel is full the reader stops taking records, so a slow consumer makes the
/// kernel's ring buffer fill (and the kernel count `ringbuf_full`) instead of packets piling up
/// here. Only at shutdown, when the consumer may have stopped, are packets dropped and counted
/// as `channel_full`.
pub async fn read(
    ring: RingBuf<MapData>,
    cpus: usize,
    poll_interval: Duration,
    packets: mpsc::Sender<PacketBatch>,
    counters: Arc<RingCounters>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same for as long as the
    // `AsyncFd` owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let mut reader = Reader {
        assembler: PacketAssembler::new(cpus),
        batch: PacketBatch::default(),
        packets,
        counters,
    };
    let mut timer = tokio::time::interval(poll_interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'wakeups: loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                // Readiness is edge-like: clear it first, then drain everything that is there.
                guard?.clear_ready();
            }
            _ = timer.tick() => {}
            _ = shutdown.changed() => break 'wakeups,
        }
        loop {
            match reader.drain(ring.get_mut(), false) {
                Drain::Empty => break,
                Drain::Batch => tokio::task::yield_now().await,
                Drain::ChannelFull => {
                    let closed = tokio::select! {
                        room = reader.packets.reserve() => room.is_err(),
                        _ = shutdown.changed() => break 'wakeups,
                    };
                    if closed {
                        // Nobody takes packets any more: the batch held is dropped, counted.
                        reader.hand_on(true);
                        return Ok(());
                    }
                }
            }
        }
    }
    // Whatever the kernel wrote before detaching is still worth having.
    let mut drop_when_full = false;
    loop {
        match reader.drain(ring.get_mut(), drop_when_full) {
            Drain::Empty => return Ok(()),
            Drain::Batch => {}
            Drain::ChannelFull => {
                let room = tokio::time::timeout(SHUTDOWN_WAIT, reader.packets.reserve()).await;
                drop_when_full = !matches!(room, Ok(Ok(_)));
            }
        }
    }
}

/// What one call of [`Reader::drain`] left behind.
enum Drain {
    /// The ring buffer is empty and every packet read was handed on.
    Empty,
    /// A full batch of records was taken; there may be more.
    Batch,
    /// The channel has no room: the batch being filled waits, and records stay in the ring
    /// buffer.
    ChannelFull,
}

/// What the reader keeps between drains.
struct Reader {
    assembler: PacketAssembler,
    /// Packets read and not yet handed on; kept across drains while the channel is full.
    batch: PacketBatch,
    packets: mpsc::Sender<PacketBatch>,
    counters: Arc<RingCounters>,
}

impl Reader {
    /// Drains up to [`BATCH_LIMIT`] records into the batch, handing it on whenever it is full
    /// and at the end. Unless `drop_when_full`, it stops while the channel is full, so no packet
    /// is lost here.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, drop_when_full: bool) -> Drain {
        let mut read = 0;
        let result = loop {
            if self.batch.is_full() && !self.hand_on(drop_when_full) {
                break Drain::ChannelFull;
            }
            if read == BATCH_LIMIT {
                break Drain::Batch;
            }
            let Some(record) = ring.next() else {
                break if self.batch.is_empty() || self.hand_on(drop_when_full) {
                    Drain::Empty
                } else {
                    Drain::ChannelFull
                };
            };
            read += 1;
            self.assembler.push(&record, &mut self.batch);
        };
        if read > 0 {
            self.publish();
        }
        result
    }

    /// Makes the assembler's counts visible to whoever reports them.
    fn publish(&mut self) {
        let totals = self.assembler.counters();
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.records_read.store(totals.records_read, Ordering::Relaxed);
        c.malformed_records
            .store(totals.malformed_records, Ordering::Relaxed);
        c.incomplete_packets
            .store(totals.incomplete_packets, Ordering::Relaxed);
        let mut interfaces = c.interfaces.lock().unwrap_or_else(PoisonError::into_inner);
        for (ifindex, read) in self.assembler.take_interface_counts() {
            interfaces.entry(ifindex).or_default().add(&read);
        }
    }

    /// Sends the batch on, leaving an empty one in its place. When the channel is full (or
    /// closed) it keeps the batch and returns false, unless `drop_when_full`: then the packets
    /// are dropped and counted.
    fn hand_on(&mut self, drop_when_full: bool) -> bool {
        let len = self.batch.len() as u64;
        match self.packets.try_send(std::mem::take(&mut self.batch)) {
            Ok(()) => {
                self.counters.packets_out.fetch_add(len, Ordering::Relaxed);
                true
            }
            Err(
                mpsc::error::TrySendError::Full(back) | mpsc::error::TrySendError::Closed(back),
            ) => {
                if drop_when_full {
                    self.counters.channel_full.fetch_add(len, Ordering::Relaxed);
                    true
                } else {
                    self.batch = back;
                    false
                }
            }
        }
    }
}

/// Where the kernel's ring buffer stands at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingLevel {
    /// Size of the data area in bytes.
    pub size_bytes: u64,
    /// Bytes the reader has consumed since the ring buffer was made, record headers included.
    pub consumer_position: u64,
    /// Bytes reserved by the kernel program since the ring buffer was made.
    pub producer_position: u64,
}

impl RingLevel {
    /// Bytes written and not yet consumed (records being written included).
    pub fn fill_bytes(&self) -> u64 {
        self.producer_position
            .saturating_sub(self.consumer_position)
    }
}

/// Reads the kernel ring buffer's producer and consumer positions from the map's two metadata
/// pages, mapped read-only for this (as libbpf's `ring_buffer__avail_data_size` reads them).
/// aya's `RingBuf` keeps its own mapping private; this one only reads, so it never disturbs the
/// reader. Unmapped on drop.
#[derive(Debug)]
pub struct RingFill {
    /// Address of the mapping: the consumer page, then the producer page.
    addr: usize,
    page: usize,
    size: u64,
}

impl RingFill {
    /// Maps the consumer page (offset 0) and the producer page (offset one page) of the ring
    /// buffer map `ring`, of `size` data bytes, read-only.
    ///
    /// # Errors
    /// When the kernel refuses the mapping.
    pub fn map(ring: BorrowedFd<'_>, size: u32) -> io::Result<Self> {
        // SAFETY: `sysconf` has no preconditions. `mmap` makes a new shared read-only mapping
        // of two pages of the map (the kernel checks the offset and length against the map and
        // keeps the map alive while the mapping exists), at an address of its choice, so no
        // memory of this process is touched; `Drop` unmaps exactly it and nothing else ever
        // does. A ring buffer map's consumer and producer pages each start with its position, an
        // `unsigned long` the kernel (and the reader) update atomically.
        let (page, addr) = unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let addr = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                ring.as_raw_fd(),
                0,
            );
            (page, addr)
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as usize,
            page,
            size: u64::from(size),
        })
    }

    /// The positions now. The consumer position is read first, as libbpf does: it never passes
    /// the producer position.
    pub fn level(&self) -> RingLevel {
        let position = |offset: usize| {
            // SAFETY: within the mapping made in `map`, which lives as long as `self`; page
            // aligned, so aligned for an atomic, and only ever accessed atomically.
            let position = unsafe { AtomicUsize::from_ptr((self.addr + offset) as *mut usize) };
            position.load(Ordering::Acquire) as u64
        };
        let consumer_position = position(0);
        RingLevel {
            size_bytes: self.size,
            consumer_position,
            producer_position: position(self.page),
        }
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; nothing refers to it afterwards.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, 2 * self.page);
        }
    }
}

impl Export for RingCountersSnapshot {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::counter(
            e,
            "ring_channel_full",
            "Captured packets dropped at shutdown because the pipeline had stopped.",
            None,
            self.channel_full,
        )?;
        export::counter(
            e,
            "ring_records_read",
            "Ring buffer records read.",
            None,
            self.records_read,
        )?;
        export::counter(
            e,
            "ring_malformed_records",
            "Ring buffer records that did not parse.",
            None,
            self.malformed_records,
        )?;
        export::counter(
            e,
            "ring_incomplete_packets",
            "Packets whose records did not all arrive.",
            None,
            self.incomplete_packets,
        )
    }
}

impl Export for RingLevel {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::gauge(
            e,
            "ring_buffer_fill_bytes",
            "Bytes in the kernel's ring buffer that the agent has not read yet.",
            self.fill_bytes() as f64,
        )?;
        export::gauge(
            e,
            "ring_buffer_size_bytes",
            "Size of the kernel's ring buffer.",
            self.size_bytes as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow_common::RecordHeader;

    fn reader(packets: mpsc::Sender<PacketBatch>, held: u32) -> Reader {
        let mut batch = PacketBatch::default();
        for i in 0..held {
            let header = RecordHeader {
                timestamp_ns: u64::from(i),
                packet_id: u64::from(i),
                ifindex: 2,
                packet_len: 3,
                captured_len: 3,
                offset: 0,
                chunk_len: 3,
                flags: 0,
            };
            batch.push(&header, b"abc");
        }
        Reader {
            assembler: PacketAssembler::new(1),
            batch,
            packets,
            counters: Arc::default(),
        }
    }

    #[test]
    fn a_batch_is_handed_on_kept_while_the_channel_is_full_or_dropped_and_counted() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut r = reader(tx, 3);
        assert!(r.hand_on(false));
        assert!(r.batch.is_empty());
        assert_eq!(r.counters.snapshot().packets_out, 3);

        // The channel is full: the next batch stays with the reader, nothing is lost.
        r.batch = reader(r.packets.clone(), 2).batch;
        assert!(!r.hand_on(false));
        assert_eq!(r.batch.len(), 2);

        // Nobody takes packets any more: dropped, and counted.
        drop(rx.try_recv().expect("the first batch"));
        drop(rx);
        assert!(!r.hand_on(false));
        assert_eq!(r.batch.len(), 2);
        assert!(r.hand_on(true));
        assert!(r.batch.is_empty());
        let counters = r.counters.snapshot();
        assert_eq!((counters.packets_out, counters.channel_full), (3, 2));
    }
}
