//! The HTTP request head: any bytes parse, wait for more, or are refused, never panic; what parses
//! answers every question the router asks of it (upgrade, credential, the 101 answer).
#![no_main]
use libfuzzer_sys::fuzz_target;
use parley_server::http::{parse_head, upgrade_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(request)) = parse_head(data) {
        let _ = request.is_websocket_upgrade();
        let _ = request.credential();
        let _ = upgrade_response(&request, Some("realtime"));
        assert!(request.rest.len() <= data.len());
    }
});
