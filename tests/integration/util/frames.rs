//! WebSocket frames on a raw socket (RFC 6455 §5.2), for the tests and
//! benchmarks that must see or send exactly what is on the wire: client
//! frames with any first byte and any mask (or none, on purpose), and
//! server frames as the server sent them.

/// A fixed masking key: the tests need the mask to be there, not random.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The bytes of one client frame: `first` is the first byte (FIN, RSV,
/// opcode); the payload is masked with `mask` if any.
pub fn client_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(masked | n as u8),
        n if n <= 0xffff => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// One complete server frame at the start of `buf`: `(opcode, payload,
/// bytes used)`; `None` while it is not all there. Panics on a frame no
/// server may send (RSV bits, a fragment, a mask).
pub fn server_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[0] & 0x70, 0, "RSV bits set by the server");
    assert!(buf[0] & 0x80 != 0, "the server fragments nothing");
    assert_eq!(buf[1] & 0x80, 0, "the server masks nothing");
    let (len, header): (u64, usize) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
            10,
        ),
        126 | 127 => return None,
        n => (u64::from(n), 2),
    };
    let end = header.checked_add(usize::try_from(len).ok()?)?;
    (buf.len() >= end).then(|| (buf[0] & 0x0f, &buf[header..end], end))
}
