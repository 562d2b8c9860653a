//! kproxy's device programs on crafted packets through BPF_PROG_TEST_RUN (needs root).

use kproxy_tests::prog_run::*;

#[test]
fn all_programs_load() {
    let fx = Fixture::new();
    drop(fx);
}
