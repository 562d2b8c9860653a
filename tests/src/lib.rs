pub mod apiserver;
pub mod harness;
pub mod prog_run;
