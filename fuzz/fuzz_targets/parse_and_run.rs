//! Scenario parser (and, for valid input, a run under tight limits): no input may panic, abort or run away.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = peerdma_scenario::fuzzing::parse_and_run(data);
});
