pub mod prog_run;
