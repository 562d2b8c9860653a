pub mod apiserver;
pub mod bench;
pub mod harness;
pub mod prog_run;
