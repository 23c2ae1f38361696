//! The write side of every WebSocket connection.
//!
//! Each connection has an [`Outbox`]: a bounded queue of encoded frames.
//! Everything a connection sends goes through it, in order: the hub's
//! replies and updates, and what tungstenite itself writes (pongs, close
//! frames). A small pool of writer threads ([`Writers`]) drains outboxes into
//! sockets, so a connection needs no writer thread of its own.
//!
//! Pushing never blocks: a client whose outbox is full is too slow to keep
//! up, and is closed with 1008 instead of slowing the hub or anyone else. If
//! a writer is stuck on that client's full socket, the socket is shut down to
//! free it. This module must never block the caller of [`Outbox::push`].

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};
use log::debug;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::metrics::Metrics;
use crate::shutdown;

/// Bytes ready for the wire: one or more whole frames, shared between every
/// outbox that sends them.
pub type Bytes = Arc<[u8]>;

/// Writer threads: enough that a few clients blocking their writer for a
/// moment do not hold up the rest; each costs only a small stack.
const WRITER_THREADS: usize = 4;
const WRITER_STACK: usize = 64 * 1024;
/// One `write` call gathers up to this many queued bytes.
const WRITE_CHUNK: usize = 64 * 1024;
/// An outbox never holds more bytes than this, replies and catch-up
/// included (they are exempt from the frame limit, not from this): a client
/// that keeps asking and never reads is too slow, and is closed with 1008.
/// The largest answer to one command, a catch-up of the whole default cache
/// (100,000 updates of about 64 bytes), fits more than twice.
const MAX_QUEUED_BYTES: usize = 16 << 20;

/// Encodes a server-to-client text frame once, for any number of sockets.
pub fn text_frame(text: String) -> Bytes {
    encode(Frame::message(
        text,
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    ))
}

/// A close frame with `code` and `reason`.
pub fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    encode(Frame::close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    })))
}

fn encode(frame: Frame) -> Bytes {
    let mut bytes = Vec::with_capacity(frame.len());
    frame
        .format(&mut bytes)
        .expect("formatting a frame into a Vec cannot fail");
    bytes.into()
}

/// A queue of frames whose first sits inline: a fan-out queues one frame
/// per outbox, and the hub and then a writer find it beside the lock,
/// instead of in a buffer of its own (a cache miss for each of them per
/// delivery: half of a writer's own time in profiles).
#[derive(Default)]
struct Frames {
    /// The oldest frame, if it is not in `rest`: everything in `rest` is
    /// newer than it.
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Frames {
    fn push_back(&mut self, frame: Bytes) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn front(&self) -> Option<&Bytes> {
        self.first.as_ref().or_else(|| self.rest.front())
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

struct State {
    frames: Frames,
    /// The bytes in `frames`.
    bytes: usize,
    /// In the writers' queue, or being written: not to be queued again.
    scheduled: bool,
    /// A writer is inside `write` on the socket right now.
    writing: bool,
    /// No more frames are accepted; the socket is shut down once the queue
    /// (at most a close frame) is written.
    closing: bool,
    /// The socket is shut down; nothing more will be written.
    closed: bool,
}

/// One connection's queue of frames to send.
pub struct Outbox {
    state: Mutex<State>,
    socket: Arc<TcpStream>,
    limit: usize,
    writers: Sender<Arc<Outbox>>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// `socket` is the connection's socket, shared with its thread, used
    /// here only to write and to shut it down.
    pub fn new(
        socket: Arc<TcpStream>,
        limit: usize,
        writers: &Writers,
        metrics: Arc<Metrics>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(State {
                frames: Frames::default(),
                bytes: 0,
                scheduled: false,
                writing: false,
                closing: false,
                closed: false,
            }),
            socket,
            limit,
            writers: writers.sender.clone(),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A writer that panicked mid-update leaves nothing inconsistent
        // worth refusing service over: take the state as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a live update. A full queue closes the client with 1008.
    /// Returns `false` if the frame was not queued.
    pub fn push(self: &Arc<Self>, frame: Bytes) -> bool {
        let mut state = self.lock();
        if state.closing {
            return false;
        }
        if self.full(&state) {
            self.too_slow(state);
            return false;
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        self.schedule(state);
        true
    }

    /// Queues a frame regardless of the frame limit: replies and catch-up,
    /// whose size the connection's own request bounds. Only a client that
    /// lets them pile up past `MAX_QUEUED_BYTES` is closed (1008).
    pub fn push_reply(self: &Arc<Self>, frame: Bytes) {
        let mut state = self.lock();
        if state.closing {
            return;
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        if state.bytes > MAX_QUEUED_BYTES {
            self.too_slow(state);
            return;
        }
        self.schedule(state);
    }

    /// Whether the queue is as long as a live update may find it.
    fn full(&self, state: &State) -> bool {
        state.frames.len() >= self.limit || state.bytes > MAX_QUEUED_BYTES
    }

    /// The client does not keep up: close it with 1008.
    fn too_slow(self: &Arc<Self>, state: MutexGuard<'_, State>) {
        drop(state);
        self.metrics
            .slow_client_closes
            .fetch_add(1, Ordering::Relaxed);
        self.close(CloseCode::Policy, "too slow: outbound queue full");
    }

    /// Drops what is queued, sends a close frame, then shuts the socket.
    pub fn close(self: &Arc<Self>, code: CloseCode, reason: &str) {
        let mut state = self.lock();
        if state.closing {
            return;
        }
        state.closing = true;
        // Writing with a full queue: the writer is stuck on this socket. A
        // writer merely inside `write` is not: it takes the close frame next.
        let stuck = state.writing && self.full(&state);
        state.frames.clear();
        state.bytes = 0;
        if stuck {
            // Free the writer now. The close frame could not get through a
            // full socket anyway.
            state.closed = true;
            let _ = self.socket.shutdown(Shutdown::Both);
            return;
        }
        let frame = close_frame(code, reason);
        state.bytes = frame.len();
        state.frames.push_back(frame);
        self.schedule(state);
    }

    /// Whether the outbox accepts no more frames.
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    fn schedule(self: &Arc<Self>, mut state: MutexGuard<'_, State>) {
        if !state.scheduled {
            state.scheduled = true;
            drop(state);
            // Unbounded, yet holds each outbox at most once: bounded by the
            // number of connections. Fails only when the writers are gone,
            // during shutdown, when nothing more needs writing.
            let _ = self.writers.send(Arc::clone(self));
        }
    }

    /// Writes everything queued; called by a writer thread.
    fn drain(&self) {
        // Allocated only when several frames are gathered: a fan-out
        // queues one frame per outbox, written straight from the shared
        // bytes (a 64 KiB buffer per drain showed up as allocator work on
        // every one of 10,000 sockets).
        let mut buffer = Vec::new();
        loop {
            let mut state = self.lock();
            if state.closed {
                state.frames.clear();
                state.bytes = 0;
                state.scheduled = false;
                return;
            }
            if state.frames.is_empty() {
                state.scheduled = false;
                if state.closing {
                    state.closed = true;
                    let _ = self.socket.shutdown(Shutdown::Both);
                }
                return;
            }
            buffer.clear();
            let single = match state.frames.len() {
                1 => state.frames.pop_front(),
                _ => None,
            };
            if let Some(frame) = &single {
                state.bytes -= frame.len();
            }
            while let Some(frame) = state.frames.front().filter(|_| single.is_none()) {
                if !buffer.is_empty() && buffer.len() + frame.len() > WRITE_CHUNK {
                    break;
                }
                let len = frame.len();
                buffer.extend_from_slice(frame);
                state.frames.pop_front();
                state.bytes -= len;
            }
            state.writing = true;
            drop(state);
            let written = (&*self.socket).write_all(single.as_deref().unwrap_or(&buffer));
            let mut state = self.lock();
            state.writing = false;
            if let Err(e) = written {
                debug!("write failed: {e}");
                // A socket that took nothing for the whole write timeout
                // belongs to a client that does not keep up, as surely as
                // a full queue does: count it with them.
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    self.metrics
                        .slow_client_closes
                        .fetch_add(1, Ordering::Relaxed);
                }
                state.closing = true;
                state.closed = true;
                state.frames.clear();
                state.bytes = 0;
                state.scheduled = false;
                let _ = self.socket.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// What tungstenite writes on a connection's thread (pongs, close replies):
/// appended to the outbox, so it stays in order with everything else.
pub struct OutboxWriter(pub Arc<Outbox>);

impl Write for OutboxWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.is_closing() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closing",
            ));
        }
        self.0.push_reply(buf.to_vec().into());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The pool of writer threads.
pub struct Writers {
    sender: Sender<Arc<Outbox>>,
    threads: Vec<JoinHandle<()>>,
}

impl Writers {
    /// Starts the pool. A writer is essential: if one dies, `shutdown`
    /// fails and the process stops (see [`shutdown::spawn_essential`]).
    pub fn start(shutdown: &shutdown::Shutdown) -> io::Result<Writers> {
        let (sender, receiver) = crossbeam_channel::unbounded::<Arc<Outbox>>();
        let threads = (0..WRITER_THREADS)
            .map(|i| {
                let receiver: Receiver<Arc<Outbox>> = receiver.clone();
                shutdown::spawn_essential(
                    format!("writer-{i}"),
                    thread::Builder::new().stack_size(WRITER_STACK),
                    shutdown,
                    move || {
                        // Ends when every sender (the pool and each outbox)
                        // is gone.
                        for outbox in receiver {
                            outbox.drain();
                        }
                    },
                )
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Writers { sender, threads })
    }

    /// Waits for the writers to finish what is queued. Call after every
    /// connection (and so every outbox) is gone.
    pub fn join(self) {
        drop(self.sender);
        for thread in self.threads {
            shutdown::join(thread);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The state machine, driven by hand: the tests own the writers' queue
    //! (no writer threads) and call `drain` themselves, so every step is
    //! deterministic. One test runs the real pool end to end.

    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    /// An outbox on one end of a loopback TCP connection, the other end
    /// (the "client") for reading what it sends, and the writers' queue.
    struct Rig {
        outbox: Arc<Outbox>,
        client: TcpStream,
        queue: Receiver<Arc<Outbox>>,
        metrics: Arc<Metrics>,
    }

    fn rig(limit: usize) -> Rig {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        let client = TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("a loopback connection");
        // A test that would otherwise wait forever fails instead.
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        let (server, _) = listener.accept().expect("the accepted connection");
        let (sender, queue) = crossbeam_channel::unbounded();
        let writers = Writers {
            sender,
            threads: Vec::new(),
        };
        let metrics = Arc::new(Metrics::new("database", 1, Default::default()));
        let outbox = Outbox::new(Arc::new(server), limit, &writers, Arc::clone(&metrics));
        Rig {
            outbox,
            client,
            queue,
            metrics,
        }
    }

    impl Rig {
        /// Runs the writer for every outbox the queue holds, as a writer
        /// thread would; returns how many there were.
        fn drain(&self) -> usize {
            self.queue.try_iter().map(|outbox| outbox.drain()).count()
        }

        fn queued(&self) -> (usize, usize) {
            let state = self.outbox.lock();
            (state.frames.len(), state.bytes)
        }

        /// Reads exactly `expected.len()` bytes and compares.
        fn expect_bytes(&mut self, expected: &[u8]) {
            let mut got = vec![0u8; expected.len()];
            self.client
                .read_exact(&mut got)
                .expect("the frames the outbox sent");
            assert_eq!(got, expected);
        }

        /// The socket is shut down: the client reads end of stream.
        fn expect_eof(&mut self) {
            let mut rest = Vec::new();
            self.client
                .read_to_end(&mut rest)
                .expect("end of stream after the shutdown");
            assert!(
                rest.is_empty(),
                "nothing after the expected bytes: {rest:?}"
            );
        }

        /// Closed once as too slow: only the 1008 close frame is queued,
        /// then written, then the socket is shut down.
        fn expect_closed_too_slow(&mut self) {
            assert_eq!(self.slow_closes(), 1);
            assert_eq!(self.queued(), (1, too_slow_frame().len()));
            self.drain();
            self.expect_bytes(&too_slow_frame());
            self.expect_eof();
        }

        fn slow_closes(&self) -> u64 {
            self.metrics.slow_client_closes.load(Ordering::Relaxed)
        }
    }

    fn text(s: &str) -> Bytes {
        text_frame(s.to_string())
    }

    fn too_slow_frame() -> Bytes {
        close_frame(CloseCode::Policy, "too slow: outbound queue full")
    }

    #[test]
    fn the_inline_first_frame_stays_in_order_with_the_rest() {
        let mut frames = Frames::default();
        frames.push_back(text("a"));
        frames.push_back(text("b"));
        assert_eq!(frames.pop_front(), Some(text("a")));
        // The inline slot is free while "b" waits: "c" must queue behind
        // "b", not take the slot ahead of it.
        frames.push_back(text("c"));
        assert_eq!(frames.len(), 2);
        assert_eq!(frames.front(), Some(&text("b")));
        assert_eq!(frames.pop_front(), Some(text("b")));
        assert_eq!(frames.pop_front(), Some(text("c")));
        assert!(frames.is_empty());
        assert_eq!(frames.pop_front(), None);
        frames.push_back(text("d"));
        frames.clear();
        assert_eq!((frames.len(), frames.pop_front()), (0, None));
    }

    #[test]
    fn frames_are_written_in_order_and_the_outbox_is_scheduled_once() {
        let mut rig = rig(8);
        for s in ["a", "b", "c"] {
            assert!(rig.outbox.push(text(s)));
        }
        rig.outbox.push_reply(text("reply"));
        let (frames, bytes) = rig.queued();
        assert_eq!(frames, 4);
        assert_eq!(
            bytes,
            [text("a"), text("b"), text("c"), text("reply")]
                .iter()
                .map(|f| f.len())
                .sum::<usize>()
        );
        assert_eq!(rig.drain(), 1, "queued for the writers once, not per frame");
        assert_eq!(rig.queued(), (0, 0));
        let expected: Vec<u8> = [text("a"), text("b"), text("c"), text("reply")]
            .iter()
            .flat_map(|f| f.iter().copied())
            .collect();
        rig.expect_bytes(&expected);
        // Drained: the next frame schedules it again.
        assert!(rig.outbox.push(text("d")));
        assert_eq!(rig.drain(), 1);
        rig.expect_bytes(&text("d"));
        assert!(!rig.outbox.is_closing());
    }

    #[test]
    fn a_live_update_into_a_full_queue_closes_the_client_with_1008() {
        let mut rig = rig(2);
        assert!(rig.outbox.push(text("a")));
        assert!(rig.outbox.push(text("b")));
        assert!(!rig.outbox.push(text("c")), "the queue holds 2");
        assert!(rig.outbox.is_closing());
        assert!(!rig.outbox.push(text("d")), "closing: nothing more");
        // What was queued is dropped: only the close frame goes out, and
        // the client is counted once.
        rig.expect_closed_too_slow();
    }

    #[test]
    fn a_live_update_past_the_byte_bound_closes_the_client_with_1008() {
        let mut rig = rig(usize::MAX);
        let big: Bytes = vec![0u8; MAX_QUEUED_BYTES / 2 + 1].into();
        assert!(rig.outbox.push(Arc::clone(&big)));
        assert!(rig.outbox.push(big), "over the byte bound only now");
        assert!(!rig.outbox.push(text("a")), "the bytes bound the queue too");
        rig.expect_closed_too_slow();
    }

    #[test]
    fn replies_pass_the_frame_limit_but_not_a_full_queue_of_updates() {
        let rig = rig(1);
        for _ in 0..5 {
            rig.outbox.push_reply(text("reply"));
        }
        assert_eq!(rig.queued().0, 5, "replies are exempt from the frame limit");
        assert!(!rig.outbox.is_closing());
        // A live update still finds the queue full.
        assert!(!rig.outbox.push(text("update")));
        assert!(rig.outbox.is_closing());
        assert_eq!(rig.slow_closes(), 1);
    }

    #[test]
    fn replies_past_the_byte_bound_close_the_client_with_1008() {
        let mut rig = rig(1);
        rig.outbox.push_reply(vec![0u8; MAX_QUEUED_BYTES].into());
        assert!(!rig.outbox.is_closing(), "exactly the bound fits");
        rig.outbox.push_reply(text("one more"));
        assert!(rig.outbox.is_closing(), "past the bound: too slow");
        rig.expect_closed_too_slow();
    }

    #[test]
    fn close_drops_the_queue_sends_one_close_frame_then_shuts_the_socket() {
        let mut rig = rig(8);
        assert!(rig.outbox.push(text("never sent")));
        rig.outbox.close(CloseCode::Away, "shutting down");
        assert!(rig.outbox.is_closing());
        rig.outbox.close(CloseCode::Error, "a second close");
        assert!(!rig.outbox.push(text("a")));
        rig.outbox.push_reply(text("b"));
        let frame = close_frame(CloseCode::Away, "shutting down");
        assert_eq!(rig.queued(), (1, frame.len()), "the first close only");
        assert_eq!(
            rig.slow_closes(),
            0,
            "a close asked for is not a slow client"
        );
        assert_eq!(rig.drain(), 1, "scheduled once");
        rig.expect_bytes(&frame);
        rig.expect_eof();
        assert!(rig.outbox.lock().closed);
    }

    #[test]
    fn closing_while_a_writer_is_stuck_on_a_full_queue_frees_it_at_once() {
        let mut rig = rig(1);
        assert!(rig.outbox.push(text("a")));
        // A writer inside `write` with the queue still full: stuck.
        rig.outbox.lock().writing = true;
        assert!(!rig.outbox.push(text("b")));
        assert_eq!(rig.slow_closes(), 1);
        {
            let state = rig.outbox.lock();
            assert!(state.closing && state.closed, "shut down without waiting");
            assert!(
                state.frames.is_empty(),
                "no close frame: it could not get through"
            );
            assert_eq!(state.bytes, 0);
        }
        rig.expect_eof();
    }

    #[test]
    fn closing_while_a_writer_is_merely_writing_still_sends_the_close_frame() {
        let mut rig = rig(8);
        assert!(rig.outbox.push(text("a")));
        rig.outbox.lock().writing = true;
        rig.outbox.close(CloseCode::Normal, "bye");
        let frame = close_frame(CloseCode::Normal, "bye");
        assert_eq!(rig.queued(), (1, frame.len()));
        assert!(!rig.outbox.lock().closed);
        rig.outbox.lock().writing = false;
        rig.drain();
        rig.expect_bytes(&frame);
        rig.expect_eof();
    }

    #[test]
    fn a_failed_write_closes_the_outbox_and_drops_the_queue() {
        let rig = rig(8);
        // Our side can no longer write: the next write fails (EPIPE).
        rig.outbox
            .socket
            .shutdown(Shutdown::Write)
            .expect("shut down the write side");
        assert!(rig.outbox.push(text("a")));
        rig.drain();
        let state = rig.outbox.lock();
        assert!(state.closing && state.closed && !state.scheduled);
        assert!(state.frames.is_empty());
        assert_eq!(state.bytes, 0);
        drop(state);
        assert_eq!(rig.slow_closes(), 0, "a broken pipe is not a slow client");
        assert!(!rig.outbox.push(text("b")));
    }

    #[test]
    fn tungstenite_writes_go_through_the_outbox_until_it_closes() {
        let mut rig = rig(1);
        let mut writer = OutboxWriter(Arc::clone(&rig.outbox));
        let pong = [0x8a, 0x00];
        // Exempt from the frame limit, like a reply.
        writer.write_all(&pong).expect("queued");
        writer
            .write_all(&pong)
            .expect("queued past the frame limit");
        writer.flush().expect("flush does nothing");
        rig.drain();
        rig.expect_bytes(&[pong, pong].concat());
        rig.outbox.close(CloseCode::Normal, "");
        let refused = writer.write(&pong).expect_err("closing: refused");
        assert_eq!(refused.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn the_writer_pool_delivers_and_joins() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        let mut client = TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("a loopback connection");
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        let (server, _) = listener.accept().expect("the accepted connection");
        let (mut trigger, shutdown) = shutdown::channel();
        let writers = Writers::start(&shutdown).expect("writer threads");
        let metrics = Arc::new(Metrics::new("database", 1, Default::default()));
        let outbox = Outbox::new(Arc::new(server), 8, &writers, metrics);
        assert!(outbox.push(text("hello")));
        let mut got = vec![0u8; text("hello").len()];
        client.read_exact(&mut got).expect("the frame");
        assert_eq!(got, &*text("hello"));
        outbox.close(CloseCode::Normal, "bye");
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .expect("the close frame, then end of stream");
        assert_eq!(got, &*close_frame(CloseCode::Normal, "bye"));
        drop(outbox);
        // As the server does: the shutdown first, so writers that end are
        // not taken for writers that died.
        trigger.fire();
        writers.join();
        assert!(shutdown.failure().is_none(), "no writer died");
    }
}
