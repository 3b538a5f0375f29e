#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instastate::fuzz::event_batch(data));
