#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stepflow::fuzzing::log_record(data));
