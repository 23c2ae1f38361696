//! One WebSocket client, after its handshake: the connection's only thread.
//!
//! The thread blocks reading the socket and hands each text frame to the
//! hub, which parses it (a big one is parsed here first: [`Request`]); it
//! never writes to the socket itself.
//! Everything it or tungstenite sends (pongs, pings, close replies) goes
//! into the connection's [`Outbox`], in order with the hub's replies and
//! updates, and the writer pool puts it on the wire. An idle connection
//! costs no CPU: the only timer is the keepalive, which pings a silent
//! client and closes one that stays silent. One command at a time goes to
//! the hub ([`Turns`]): the next waits, unread in the socket, until the hub
//! has handled the last, and longer if the client's address used up its
//! share of the hub's time. This module must never block the hub: it talks
//! to it by message only.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use log::debug;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use crate::handshake::Upgraded;
use crate::hub::{ConnEvent, ConnId, ConnSender, Request, Turns};
use crate::outbox::{Outbox, OutboxWriter};

/// Per-connection read buffer: client messages are small commands, and the
/// buffer is paid for by every idle connection for its whole life
/// (tungstenite fills it with zeros on the first read). 128 bytes hold a
/// subscription to 10 bugs in one read; 1024 cost every idle connection
/// 0.7 KiB more (measured). A larger message still arrives whole: the
/// buffer grows to its length, read this many bytes at a time.
const READ_BUFFER: usize = 128;

/// Connection limits and keepalive timing.
#[derive(Clone, Copy)]
pub struct Limits {
    pub max_message_size: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

/// The socket as tungstenite sees it: reads from the socket (shared with
/// the outbox), writes into the outbox.
struct Stream {
    socket: Arc<TcpStream>,
    out: OutboxWriter,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.socket).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Serves one client until it leaves, misbehaves or the outbox closes.
pub fn run(
    conn: ConnId,
    websocket: Upgraded,
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
    hub: &ConnSender,
    limits: Limits,
) {
    let Upgraded {
        feed,
        leftover,
        address,
    } = websocket;
    if hub
        .send(ConnEvent::Connect {
            conn,
            feed,
            outbox: Arc::clone(&outbox),
            address,
        })
        .is_err()
    {
        return;
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_message_size))
        .max_frame_size(Some(limits.max_message_size));
    let stream = Stream {
        socket,
        out: OutboxWriter(Arc::clone(&outbox)),
    };
    let mut ws = WebSocket::from_partially_read(stream, leftover, Role::Server, Some(config));
    let why = serve(conn, &mut ws, &outbox, hub, limits);
    debug!("connection {conn} ended: {why}");
    let _ = hub.send(ConnEvent::Disconnect { conn });
}

/// Reads until the connection ends; says why.
fn serve(
    conn: ConnId,
    ws: &mut WebSocket<Stream>,
    outbox: &Arc<Outbox>,
    hub: &ConnSender,
    limits: Limits,
) -> String {
    let turns = Turns::default();
    let mut pinged = false;
    loop {
        let timeout = if pinged {
            limits.ping_timeout
        } else {
            limits.ping_interval
        };
        if let Err(e) = ws.get_ref().socket.set_read_timeout(Some(timeout)) {
            return format!("socket error: {e}");
        }
        let text = match ws.read() {
            Ok(Message::Text(text)) => text.as_str().to_string(),
            // Not in the protocol, but read as text if it is some, so a
            // client library that sends binary still gets an answer.
            Ok(Message::Binary(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                // Answers a ping: tungstenite queued the pong.
                let _ = ws.flush();
                pinged = false;
                continue;
            }
            Ok(Message::Close(frame)) => {
                // One reply, from the outbox: the client's code echoed, or
                // 1002 for a code no client may send (tungstenite's
                // choice). Flushing tungstenite's own reply as well could
                // put two close frames on the wire.
                outbox.close(frame.map_or(CloseCode::Normal, |f| f.code), "");
                return "client closed".into();
            }
            Err(WsError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if pinged {
                    outbox.close(CloseCode::Away, "ping timeout");
                    return "no answer to ping".into();
                }
                if ws.send(Message::Ping(Default::default())).is_err() {
                    return "closing".into();
                }
                pinged = true;
                continue;
            }
            Err(WsError::Capacity(e)) => {
                outbox.close(CloseCode::Size, "message too big");
                return format!("closed (1009): {e}");
            }
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return "closed".into();
            }
            // A text message (or close reason) that is not UTF-8: RFC 6455
            // §7.4.1 gives it its own code.
            Err(WsError::Utf8(e)) => {
                outbox.close(CloseCode::Invalid, "invalid UTF-8");
                return format!("closed (1007): invalid UTF-8: {e}");
            }
            Err(e) => {
                outbox.close(CloseCode::Protocol, "protocol error");
                return format!("closed (1002): {e}");
            }
        };
        pinged = false;
        // Parsed by the hub, unless it is big (see `Request`).
        let Some(turn) = turns.take(|| outbox.is_closing()) else {
            return "closing".into();
        };
        let request = Request::new(text);
        if hub
            .send(ConnEvent::Command {
                conn,
                request,
                turn,
            })
            .is_err()
        {
            return "hub gone".into();
        }
    }
}
