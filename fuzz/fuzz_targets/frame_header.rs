//! The v1 binary frame header: any bytes decode or are refused, never panic; what decodes encodes
//! back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use parley_protocol::FrameHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, payload)) = FrameHeader::decode(data) {
        assert_eq!(header.encode(payload), data);
    }
});
