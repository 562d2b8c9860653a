//! The benchmark behind `cargo xtask bench` (the binary is `src/bin/kproxy-bench.rs`): load
//! generators, machine counters, the BPF_PROG_TEST_RUN cost measurement, and the report.

pub mod change_latency;
pub mod load;
pub mod prog_cost;
pub mod report;
pub mod svg;
pub mod sys_stats;
