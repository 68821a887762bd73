//! Structured operation-sequence driver of the library: the bytes pick mm, dmirror, pin and reclaim
//! operations on two threads; nothing may panic and the oracle must stay quiet.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let r = peerdma_scenario::fuzzing::op_sequence(data);
    // The driver's dmirror devices invalidate their own migrations (test_hmm.c's own two races are pinned
    // by fuzz/regressions/): any oracle violation is a finding.
    if let peerdma_scenario::Outcome::OracleViolation(v) = &r.outcome {
        panic!("oracle violation: {v}\n{}", peerdma_scenario::fuzzing::op_sequence_text(data));
    }
});
