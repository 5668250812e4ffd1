//! The binary message header: every binary WebSocket message is one header followed by exactly
//! one Opus packet holding [`FRAME_MS`](crate::FRAME_MS) of mono audio.
//!
//! ```text
//! offset  size  field
//! 0       1     version        PROTOCOL_VERSION (1)
//! 1       1     kind           1 = Opus audio; other values are reserved
//! 2       4     seq            u32, big-endian: frame number in this direction, +1 per frame
//! 6       8     timestamp_us   u64, big-endian: see below
//! 14      ..    payload        one Opus packet (1..=1275 bytes)
//! ```
//! Client → server: `timestamp_us` is the client's capture clock (µs, any monotonic origin).
//! Server → client: `timestamp_us` echoes the client timestamp of the latest input frame the
//! pipeline had consumed when this frame's audio was produced (with the echo pipeline: the frame
//! it echoes), so a client can measure per-frame round trips without a shared clock.
use crate::{MAX_OPUS_PACKET_BYTES, PROTOCOL_VERSION};

/// Header length in bytes.
pub const HEADER_LEN: usize = 14;

/// What a binary message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One Opus packet of [`FRAME_MS`](crate::FRAME_MS) mono audio.
    Audio = 1,
}

/// The decoded header of a binary message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub seq: u32,
    pub timestamp_us: u64,
}

/// Why a binary message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("binary message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("unsupported protocol version {0} (this server speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame has no payload")]
    EmptyPayload,
    #[error("payload of {0} bytes exceeds the {MAX_OPUS_PACKET_BYTES}-byte Opus packet limit")]
    PayloadTooLarge(usize),
}

impl FrameHeader {
    /// An audio frame header.
    pub fn audio(seq: u32, timestamp_us: u64) -> Self {
        Self { kind: FrameKind::Audio, seq, timestamp_us }
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`HEADER_LEN`].
    pub fn write(&self, out: &mut [u8]) {
        out[0] = PROTOCOL_VERSION;
        out[1] = self.kind as u8;
        out[2..6].copy_from_slice(&self.seq.to_be_bytes());
        out[6..14].copy_from_slice(&self.timestamp_us.to_be_bytes());
    }

    /// A complete binary message: this header followed by `payload`.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut message = vec![0; HEADER_LEN + payload.len()];
        self.write(&mut message);
        message[HEADER_LEN..].copy_from_slice(payload);
        message
    }

    /// Splits a binary message into its header and payload, validating both sizes.
    pub fn decode(message: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
        if message.len() < HEADER_LEN {
            return Err(FrameError::TooShort(message.len()));
        }
        if message[0] != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(message[0]));
        }
        let kind = match message[1] {
            1 => FrameKind::Audio,
            other => return Err(FrameError::UnknownKind(other)),
        };
        let seq = u32::from_be_bytes(message[2..6].try_into().expect("4 bytes"));
        let timestamp_us = u64::from_be_bytes(message[6..14].try_into().expect("8 bytes"));
        let payload = &message[HEADER_LEN..];
        if payload.is_empty() {
            return Err(FrameError::EmptyPayload);
        }
        if payload.len() > MAX_OPUS_PACKET_BYTES {
            return Err(FrameError::PayloadTooLarge(payload.len()));
        }
        Ok((FrameHeader { kind, seq, timestamp_us }, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = FrameHeader::audio(0xDEAD_BEEF, 0x0102_0304_0506_0708);
        let message = header.encode(&[9, 8, 7]);
        assert_eq!(message.len(), HEADER_LEN + 3);
        assert_eq!(&message[..6], &[PROTOCOL_VERSION, 1, 0xDE, 0xAD, 0xBE, 0xEF]);
        let (decoded, payload) = FrameHeader::decode(&message).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(payload, &[9, 8, 7]);
    }

    #[test]
    fn malformed_messages_are_rejected_with_the_reason() {
        assert_eq!(FrameHeader::decode(&[1, 1, 0]), Err(FrameError::TooShort(3)));
        let mut message = FrameHeader::audio(1, 2).encode(&[0xFC]);
        message[0] = 7;
        assert_eq!(FrameHeader::decode(&message), Err(FrameError::UnsupportedVersion(7)));
        message[0] = PROTOCOL_VERSION;
        message[1] = 0x42;
        assert_eq!(FrameHeader::decode(&message), Err(FrameError::UnknownKind(0x42)));
        let empty = FrameHeader::audio(1, 2).encode(&[]);
        assert_eq!(FrameHeader::decode(&empty), Err(FrameError::EmptyPayload));
        let big = FrameHeader::audio(1, 2).encode(&[0; MAX_OPUS_PACKET_BYTES + 1]);
        assert_eq!(FrameHeader::decode(&big), Err(FrameError::PayloadTooLarge(MAX_OPUS_PACKET_BYTES + 1)));
    }
}
