//! The v1 JSON events, as the server parses a client's (and the client a server's): any text
//! parses or is refused with a code, never panics; what parses serializes to text that parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use parley_protocol::{ClientEvent, ServerEvent};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match ClientEvent::parse(text) {
        Ok(event) => assert!(ClientEvent::parse(&event.to_json()).is_ok(), "{event:?}"),
        Err(error) => {
            let _ = error.code();
        }
    }
    if let Ok(event) = ServerEvent::parse(text) {
        assert!(ServerEvent::parse(&event.to_json()).is_ok(), "{event:?}");
    }
});
