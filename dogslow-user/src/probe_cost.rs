//! How the kernel handles a uprobe at a given instruction, which decides
//! most of what every request costs the probed process (x86-64, kernel
//! 6.18; measured in BENCHMARKS.md, item 1).
//!
//! The kernel replaces the probed instruction with a breakpoint. On a hit it
//! either emulates the instruction (one trap), or copies it out of line and
//! single-steps it (a second trap, an order of magnitude dearer); since 6.18
//! a 5-byte NOP is instead rewritten into a call to a trampoline (no trap).
use std::fmt;

use crate::elf::ElfImage;

/// How uprobes execute the probed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// A 5-byte NOP the kernel turns into a call: no trap.
    Optimized,
    /// Emulated in the trap handler: one trap.
    Emulated,
    /// Executed out of line under single-step: two traps.
    SingleStepped,
}

impl Handling {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optimized => "optimized",
            Self::Emulated => "emulated",
            Self::SingleStepped => "single-stepped",
        }
    }
}

/// A probe point's first instruction, as far as its handling goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstInstruction {
    /// `endbr64`, `push %rbp`, … or the leading bytes in hex when the
    /// instruction is none of the ones named.
    pub text: String,
    pub handling: Handling,
}

impl fmt::Display for FirstInstruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.text, self.handling.as_str())
    }
}

const REGISTERS: [&str; 8] = ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di"];

/// Classifies the instruction at the start of `code` (the bytes at the
/// probe's file offset).
pub fn classify(code: &[u8]) -> FirstInstruction {
    use Handling::*;
    let named = |text: &str, handling| FirstInstruction {
        text: text.to_owned(),
        handling,
    };
    match code {
        [0x0f, 0x1f, 0x44, 0x00, 0x00, ..] => named("nopl 0x0(%rax,%rax,1)", Optimized),
        [0xf3, 0x0f, 0x1e, 0xfa, ..] => named("endbr64", SingleStepped),
        [0x90, ..] | [0x66, 0x90, ..] => named("nop", Emulated),
        [op @ 0x50..=0x57, ..] => named(
            &format!("push %r{}", REGISTERS[usize::from(op - 0x50)]),
            Emulated,
        ),
        [0x41, op @ 0x50..=0x57, ..] => named(&format!("push %r{}", op - 0x50 + 8), Emulated),
        [0xe8, ..] => named("call", Emulated),
        [0xe9 | 0xeb, ..] => named("jmp", Emulated),
        [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..] => named("conditional jump", Emulated),
        _ => FirstInstruction {
            text: code
                .iter()
                .take(4)
                .map(|byte| format!("{byte:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
                + "…",
            handling: SingleStepped,
        },
    }
}

/// The instruction at `file_offset` in `image`.
pub fn at(image: &ElfImage, file_offset: u64) -> FirstInstruction {
    let start = usize::try_from(file_offset).unwrap_or(usize::MAX);
    classify(image.bytes().get(start..).unwrap_or_default())
}

/// The stderr note for a probe whose every hit is single-stepped, with what
/// to do about it.
pub fn single_step_note(probe: &str, object: &str, instruction: &FirstInstruction) -> String {
    format!(
        "note: probe `{probe}` in {object}: its first instruction (`{}`) is one the kernel \
         single-steps, so every hit takes two traps, many times the cost of a probe on \
         `push %rbp` (one trap) or on a 5-byte NOP (none); see \"What it costs\" in the README",
        instruction.text
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handling(code: &[u8]) -> Handling {
        classify(code).handling
    }

    #[test]
    fn names_the_instructions_that_decide_the_cost() {
        assert_eq!(
            classify(&[0x0f, 0x1f, 0x44, 0, 0, 0x55]).handling,
            Handling::Optimized
        );
        assert_eq!(classify(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55]).text, "endbr64");
        assert_eq!(handling(&[0xf3, 0x0f, 0x1e, 0xfa]), Handling::SingleStepped);
        assert_eq!(classify(&[0x55, 0x48, 0x89, 0xe5]).text, "push %rbp");
        assert_eq!(handling(&[0x55]), Handling::Emulated);
        assert_eq!(classify(&[0x41, 0x57]).text, "push %r15");
        assert_eq!(handling(&[0x90]), Handling::Emulated);
        assert_eq!(handling(&[0xe9, 0, 0, 0, 0]), Handling::Emulated);
        assert_eq!(handling(&[0x0f, 0x84, 0, 0, 0, 0]), Handling::Emulated);
        let sub = classify(&[0x48, 0x83, 0xec, 0x18, 0x90]);
        assert_eq!(sub.text, "48 83 ec 18…");
        assert_eq!(sub.handling, Handling::SingleStepped);
        assert_eq!(handling(&[]), Handling::SingleStepped);
        assert_eq!(
            classify(&[0x55]).to_string(),
            "push %rbp: emulated",
            "the probe listing's form"
        );
    }

    #[test]
    fn libc_recv_is_single_stepped() {
        // Debian's recv begins with a RIP-relative compare (other builds
        // with endbr64): either way the single-stepped kind, the case the
        // note exists for.
        let libc = ElfImage::open("/lib/x86_64-linux-gnu/libc.so.6".as_ref()).unwrap();
        let recv = libc.find_function("recv").unwrap();
        let instruction = at(&libc, recv.file_offset);
        assert_eq!(
            instruction.handling,
            Handling::SingleStepped,
            "{instruction}"
        );
        let note = single_step_note(
            "libc.so.6:recv",
            "/lib/x86_64-linux-gnu/libc.so.6",
            &instruction,
        );
        assert!(
            note.contains(&format!("(`{}`)", instruction.text)),
            "{note}"
        );
        assert!(note.contains("single-steps"), "{note}");
    }
}
