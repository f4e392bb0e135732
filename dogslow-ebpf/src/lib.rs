#![no_std]
// The programs live in the `dogslow` binary target (src/main.rs); this empty
// library lets the userspace crate depend on this one so cargo rebuilds it.
