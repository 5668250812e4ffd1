//! The Realtime API's audio formats: base64 in JSON of 16-bit little-endian PCM at 24 kHz
//! (`audio/pcm`), or G.711 µ-law / A-law at 8 kHz (`audio/pcmu`, `audio/pcma`), both ways.
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pcm,
    Pcmu,
    Pcma,
}

impl Format {
    /// A format as the GA API names it (`{"type": "audio/pcm", "rate": 24000}`), or as the older
    /// string form (`"pcm16"`, `"g711_ulaw"`, `"g711_alaw"`).
    pub fn parse(value: &Value) -> Result<Format, String> {
        let name = match value {
            Value::String(name) => name.as_str(),
            Value::Object(object) => {
                if let Some(rate) = object.get("rate").filter(|r| !r.is_null())
                    && rate.as_u64() != Some(24_000)
                    && object.get("type").and_then(Value::as_str) == Some("audio/pcm")
                {
                    return Err(format!("unsupported audio/pcm rate {rate}: only 24000"));
                }
                object.get("type").and_then(Value::as_str).unwrap_or("audio/pcm")
            }
            other => return Err(format!("an audio format is an object or a string, not {other}")),
        };
        match name {
            "audio/pcm" | "pcm16" => Ok(Format::Pcm),
            "audio/pcmu" | "g711_ulaw" => Ok(Format::Pcmu),
            "audio/pcma" | "g711_alaw" => Ok(Format::Pcma),
            other => Err(format!("unsupported audio format {other:?} (audio/pcm, audio/pcmu or audio/pcma)")),
        }
    }

    pub fn json(self) -> Value {
        match self {
            Format::Pcm => json!({"type": "audio/pcm", "rate": 24_000}),
            Format::Pcmu => json!({"type": "audio/pcmu"}),
            Format::Pcma => json!({"type": "audio/pcma"}),
        }
    }

    /// Samples per second.
    pub fn rate(self) -> u32 {
        match self {
            Format::Pcm => 24_000,
            Format::Pcmu | Format::Pcma => 8_000,
        }
    }

    /// Bytes per sample.
    pub fn width(self) -> usize {
        match self {
            Format::Pcm => 2,
            Format::Pcmu | Format::Pcma => 1,
        }
    }

    /// Decodes audio bytes into samples in [-1, 1] (a trailing odd byte of PCM is dropped).
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Format::Pcm => {
                out.extend(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0));
            }
            Format::Pcmu => out.extend(bytes.iter().map(|&b| ulaw_to_linear(b) as f32 / 32768.0)),
            Format::Pcma => out.extend(bytes.iter().map(|&b| alaw_to_linear(b) as f32 / 32768.0)),
        }
    }

    /// Encodes samples in [-1, 1].
    pub fn encode(self, pcm: &[f32], out: &mut Vec<u8>) {
        let linear = |s: f32| (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        match self {
            Format::Pcm => out.extend(pcm.iter().flat_map(|&s| linear(s).to_le_bytes())),
            Format::Pcmu => out.extend(pcm.iter().map(|&s| linear_to_ulaw(linear(s)))),
            Format::Pcma => out.extend(pcm.iter().map(|&s| linear_to_alaw(linear(s)))),
        }
    }
}

// ITU-T G.711, as in Sun Microsystems' reference g711.c.
const ULAW_BIAS: i32 = 0x84;
const ULAW_CLIP: i32 = 8159;
const SEG_UEND: [i32; 8] = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];
const SEG_AEND: [i32; 8] = [0x1f, 0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff];

/// The segment of `value` in a G.711 segment table (8: beyond the last).
fn segment(value: i32, ends: &[i32; 8]) -> i32 {
    ends.iter().position(|&end| value <= end).unwrap_or(8) as i32
}

fn linear_to_ulaw(sample: i16) -> u8 {
    let mut pcm = sample as i32 >> 2;
    let mask = if pcm < 0 {
        pcm = -pcm;
        0x7f
    } else {
        0xff
    };
    pcm = pcm.min(ULAW_CLIP) + (ULAW_BIAS >> 2);
    let seg = segment(pcm, &SEG_UEND);
    let value = if seg >= 8 { 0x7f } else { (seg << 4) | ((pcm >> (seg + 1)) & 0x0f) };
    (value ^ mask) as u8
}

fn ulaw_to_linear(code: u8) -> i16 {
    let code = !code as i32;
    let t = (((code & 0x0f) << 3) + ULAW_BIAS) << ((code & 0x70) >> 4);
    (if code & 0x80 != 0 { ULAW_BIAS - t } else { t - ULAW_BIAS }) as i16
}

fn linear_to_alaw(sample: i16) -> u8 {
    let mut pcm = sample as i32 >> 3;
    let mask = if pcm >= 0 {
        0xd5
    } else {
        pcm = -pcm - 1;
        0x55
    };
    let seg = segment(pcm, &SEG_AEND);
    let value = match seg {
        8.. => 0x7f,
        0 | 1 => (seg << 4) | ((pcm >> 1) & 0x0f),
        _ => (seg << 4) | ((pcm >> seg) & 0x0f),
    };
    (value ^ mask) as u8
}

fn alaw_to_linear(code: u8) -> i16 {
    let code = (code ^ 0x55) as i32;
    let mut t = (code & 0x0f) << 4;
    match (code & 0x70) >> 4 {
        0 => t += 8,
        1 => t += 0x108,
        seg => t = (t + 0x108) << (seg - 1),
    }
    (if code & 0x80 != 0 { t } else { -t }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_in_both_forms_and_refuse_others() {
        assert_eq!(Format::parse(&json!({"type": "audio/pcm", "rate": 24000})), Ok(Format::Pcm));
        assert_eq!(Format::parse(&json!("pcm16")), Ok(Format::Pcm));
        assert_eq!(Format::parse(&json!({"type": "audio/pcmu"})), Ok(Format::Pcmu));
        assert_eq!(Format::parse(&json!("g711_alaw")), Ok(Format::Pcma));
        assert!(Format::parse(&json!({"type": "audio/pcm", "rate": 16000})).is_err());
        assert!(Format::parse(&json!("opus")).is_err());
        assert!(Format::parse(&json!(3)).is_err());
    }

    /// G.711 round trips within its quantisation (about 3% of the value at the top segment) and
    /// is monotonic, both laws; PCM round trips exactly to 16 bits.
    #[test]
    fn audio_round_trips_through_each_format() {
        let samples: Vec<f32> = (-400..=400).map(|i| i as f32 / 400.0 * 0.99).collect();
        for format in [Format::Pcm, Format::Pcmu, Format::Pcma] {
            let (mut bytes, mut back) = (Vec::new(), Vec::new());
            format.encode(&samples, &mut bytes);
            assert_eq!(bytes.len(), samples.len() * format.width());
            format.decode(&bytes, &mut back);
            for (a, b) in samples.iter().zip(&back) {
                assert!((a - b).abs() <= 0.002 + a.abs() * 0.07, "{format:?}: {a} came back as {b}");
            }
            assert!(back.windows(2).all(|w| w[0] <= w[1] + 1e-6), "{format:?} is not monotonic");
        }
        let mut bytes = Vec::new();
        Format::Pcm.encode(&[0.5, -0.25], &mut bytes);
        assert_eq!(bytes, [0x00, 0x40, 0x00, 0xe0]);
    }
}
