//! Opus codec wrappers for 20 ms mono frames: a decoder that rejects packets that are not one
//! 20 ms frame and conceals lost frames, and an encoder with the server's bitrate and complexity.
//! Neither allocates per frame.
use parley_protocol::{MAX_OPUS_PACKET_BYTES, frame_samples, is_supported_rate};

/// An Opus failure, or a packet that is not one 20 ms mono frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unsupported sample rate {0} Hz")]
    Rate(u32),
    #[error("not an Opus packet: {0}")]
    NotOpus(opus::Error),
    #[error("Opus packet holds {0} samples, not one 20 ms frame ({1})")]
    WrongDuration(usize, usize),
    #[error("Opus packet is not mono")]
    NotMono,
    #[error("Opus: {0}")]
    Opus(#[from] opus::Error),
}

/// Decodes one client's Opus frames at the stream rate.
pub struct OpusDecoder {
    decoder: opus::Decoder,
    rate: u32,
    frame: usize,
}

impl OpusDecoder {
    pub fn new(rate: u32) -> Result<Self, CodecError> {
        if !is_supported_rate(rate) {
            return Err(CodecError::Rate(rate));
        }
        Ok(Self { decoder: opus::Decoder::new(rate, opus::Channels::Mono)?, rate, frame: frame_samples(rate) })
    }

    /// Samples per frame at the stream rate.
    pub fn frame_len(&self) -> usize {
        self.frame
    }

    /// Decodes one packet into `out` (at least one frame long); returns the samples written.
    pub fn decode(&mut self, packet: &[u8], out: &mut [f32]) -> Result<usize, CodecError> {
        let samples = opus::packet::get_nb_samples(packet, self.rate).map_err(CodecError::NotOpus)?;
        if samples != self.frame {
            return Err(CodecError::WrongDuration(samples, self.frame));
        }
        if opus::packet::get_nb_channels(packet).map_err(CodecError::NotOpus)? != opus::Channels::Mono {
            return Err(CodecError::NotMono);
        }
        let n = self.decoder.decode_float(packet, &mut out[..self.frame], false).map_err(CodecError::NotOpus)?;
        Ok(n)
    }

    /// Packet-loss concealment: synthesizes one frame in place of a lost one.
    pub fn conceal(&mut self, out: &mut [f32]) -> Result<usize, CodecError> {
        Ok(self.decoder.decode_float(&[], &mut out[..self.frame], false)?)
    }
}

/// Encodes reply audio into 20 ms Opus frames at the stream rate.
pub struct OpusEncoder {
    encoder: opus::Encoder,
    frame: usize,
}

impl OpusEncoder {
    pub fn new(rate: u32, bitrate: i32, complexity: i32) -> Result<Self, CodecError> {
        if !is_supported_rate(rate) {
            return Err(CodecError::Rate(rate));
        }
        let mut encoder = opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip)?;
        encoder.set_bitrate(opus::Bitrate::Bits(bitrate))?;
        encoder.set_complexity(complexity)?;
        Ok(Self { encoder, frame: frame_samples(rate) })
    }

    pub fn frame_len(&self) -> usize {
        self.frame
    }

    /// Encodes exactly one frame of `pcm` into `out`; returns the packet length.
    pub fn encode(&mut self, pcm: &[f32], out: &mut [u8]) -> Result<usize, CodecError> {
        let limit = out.len().min(MAX_OPUS_PACKET_BYTES);
        Ok(self.encoder.encode_float(&pcm[..self.frame], &mut out[..limit])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let mut encoder = OpusEncoder::new(48_000, 32_000, 5).unwrap();
        let mut decoder = OpusDecoder::new(48_000).unwrap();
        let tone: Vec<f32> = (0..960).map(|i| (i as f32 * 0.05).sin() * 0.5).collect();
        let mut packet = [0u8; MAX_OPUS_PACKET_BYTES];
        let mut pcm = [0f32; 960];
        for _ in 0..5 {
            let n = encoder.encode(&tone, &mut packet).unwrap();
            assert_eq!(decoder.decode(&packet[..n], &mut pcm).unwrap(), 960);
        }
        assert!(pcm.iter().map(|s| s * s).sum::<f32>() > 10.0, "decoded audio has the tone's energy");
        assert_eq!(decoder.conceal(&mut pcm).unwrap(), 960);
        // TOC byte of a 10 ms CELT frame (config 18): valid Opus, wrong duration.
        assert!(matches!(decoder.decode(&[18 << 3, 0, 0], &mut pcm), Err(CodecError::WrongDuration(480, 960))));
        // Code-3 packet with an impossible frame count.
        assert!(decoder.decode(&[0xFF, 0xFF], &mut pcm).is_err());
        assert!(matches!(OpusDecoder::new(44_100), Err(CodecError::Rate(44_100))));
    }
}
