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

struct State {
    frames: VecDeque<Bytes>,
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
                frames: VecDeque::new(),
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
