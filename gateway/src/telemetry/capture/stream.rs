//! What the gateway sends a capture or trace client, after the request:
//! messages of a tag byte, a length (u32, little-endian) and that many
//! bytes. `H` (JSON): the session started; `P`: a packet copy; `T`
//! (JSON): a trace; `E` (JSON): the end, with the session's figures;
//! `X` (text): an error, and the end.

use std::io::{self, Read, Write};

use super::{Link, Point, Record};

/// The largest message a client takes (a GSO packet is 64 KiB).
const MAX_MESSAGE: usize = 1 << 20;

pub const HELLO: u8 = b'H';
pub const PACKET: u8 = b'P';
pub const TRACE: u8 = b'T';
pub const END: u8 = b'E';
pub const ERROR: u8 = b'X';

/// A packet copy as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub point: Point,
    pub link: Link,
    pub queue: u16,
    pub tunnel: Option<String>,
    pub reason: Option<String>,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub len: u32,
    pub data: Vec<u8>,
}

/// One message.
#[derive(Debug)]
pub enum Message {
    Json(u8, serde_json::Value),
    Packet(Packet),
    Error(String),
}

pub fn write_message(w: &mut impl Write, tag: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(body)
}

/// Encodes a copy into `out` (cleared first), as a [`PACKET`] body.
pub fn encode_packet(r: &Record, out: &mut Vec<u8>) {
    out.clear();
    out.push(r.point as u8);
    out.push(r.link as u8);
    out.extend_from_slice(&r.queue.to_le_bytes());
    out.extend_from_slice(&(r.time.as_nanos() as u64).to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
    let name = r.tunnel.as_deref().unwrap_or("").as_bytes();
    let name = &name[..name.len().min(255)];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    let reason = r.reason.map_or("", |r| r.name()).as_bytes();
    out.push(reason.len() as u8);
    out.extend_from_slice(reason);
    out.extend_from_slice(&r.data);
}

fn decode_packet(b: &[u8]) -> Option<Packet> {
    let point = Point::from_u8(*b.first()?)?;
    let link = match *b.get(1)? {
        0 => Link::Ethernet,
        1 => Link::Raw,
        _ => return None,
    };
    let queue = u16::from_le_bytes(b.get(2..4)?.try_into().ok()?);
    let time_ns = u64::from_le_bytes(b.get(4..12)?.try_into().ok()?);
    let len = u32::from_le_bytes(b.get(12..16)?.try_into().ok()?);
    let mut at = 16;
    let mut text = || -> Option<Option<String>> {
        let n = usize::from(*b.get(at)?);
        let s = std::str::from_utf8(b.get(at + 1..at + 1 + n)?).ok()?;
        at += 1 + n;
        Some((!s.is_empty()).then(|| s.to_string()))
    };
    let tunnel = text()?;
    let reason = text()?;
    Some(Packet {
        point,
        link,
        queue,
        tunnel,
        reason,
        time_ns,
        len,
        data: b.get(at..)?.to_vec(),
    })
}

/// The next message, or `None` at the end of the stream.
pub fn read_message(r: &mut impl Read) -> io::Result<Option<Message>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the gateway sent a message too long to be one of its own",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a malformed message");
    Ok(Some(match head[0] {
        PACKET => Message::Packet(decode_packet(&body).ok_or_else(bad)?),
        ERROR => Message::Error(String::from_utf8_lossy(&body).into_owned()),
        tag @ (HELLO | TRACE | END) => {
            Message::Json(tag, serde_json::from_slice(&body).map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::drop_reason::DropReason;

    #[test]
    fn a_copy_reads_back_as_written() {
        let r = Record {
            point: Point::Drop,
            link: Link::Raw,
            queue: 3,
            tunnel: Some("tun100".into()),
            reason: Some(DropReason::KeyMismatch),
            time: std::time::Duration::from_nanos(1_700_000_000_123_456_789),
            len: 1500,
            data: vec![0x45, 0, 1, 2],
        };
        let mut body = Vec::new();
        encode_packet(&r, &mut body);
        let mut wire = Vec::new();
        write_message(&mut wire, PACKET, &body).unwrap();
        let Some(Message::Packet(p)) = read_message(&mut wire.as_slice()).unwrap() else {
            panic!("not a packet");
        };
        assert_eq!(p.point, Point::Drop);
        assert_eq!(p.link, Link::Raw);
        assert_eq!(p.queue, 3);
        assert_eq!(p.tunnel.as_deref(), Some("tun100"));
        assert_eq!(p.reason.as_deref(), Some("key_mismatch"));
        assert_eq!(p.time_ns, 1_700_000_000_123_456_789);
        assert_eq!(p.len, 1500);
        assert_eq!(p.data, vec![0x45, 0, 1, 2]);
    }

    #[test]
    fn cut_or_unknown_messages_are_errors_not_panics() {
        for bad in [&b"P\x03\0\0\0\x09\x00\x00"[..], b"Z\0\0\0\0", b"P\0\0\0\0"] {
            assert!(read_message(&mut &bad[..]).is_err(), "{bad:?}");
        }
        assert!(read_message(&mut &b""[..]).unwrap().is_none());
    }
}
