//! The InfluxQL parser takes any text from `/query`: it returns statements or an error
//! value (with a position inside the text), never panics, and a parse error's message
//! renders for any position.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match fluxgate::influxql::parse(text) {
        Ok(statements) => assert!(!statements.is_empty()),
        Err(e) => {
            let msg = e.message(text);
            assert!(!msg.is_empty());
        }
    }
});
