#![no_std]
// Empty: this library exists so proxy-userspace can name the crate as a build dependency and
// cargo rebuilds the embedded object when it changes (cargo#12375).
