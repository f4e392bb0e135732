//! Issue 4: complete stacks without frame pointers, unwound with DWARF CFI
//! from .eh_frame, for running and blocked threads, in C, Rust and a
//! stripped binary.
use std::{collections::HashMap, process::Command, time::Duration};

use dogslow_tests::*;
use serde_json::Value;

const CHAIN: [&str; 6] = ["level5", "level4", "level3", "level2", "level1", "main"];

/// Runs `program MODE` under dogslow with the request entry at `entry`.
fn stall_of(program: &str, mode: &str, entry: &str) -> (Value, Target) {
    require_root();
    let mut target = Target::spawn(program, &[mode, "--stall-ms", "1500", "--wait"]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        entry,
        "--timeout",
        "300ms",
    ]);
    target.go();
    let stall = agent
        .stdout
        .wait_for(Duration::from_secs(10), |line| line.contains("\"stall\""))
        .unwrap_or_else(|| panic!("no stall report for {program} {mode}"));
    drop(agent);
    (serde_json::from_str(&stall).unwrap(), target)
}

fn assert_complete_chain(stall: &Value, file: &str) {
    assert_eq!(stall["user_stack_unwinder"], "dwarf", "{stall}");
    assert_eq!(stall["user_stack_truncated"], false, "{stall}");
    let names = functions(stall, "user_stack");
    let chain: Vec<String> = names
        .iter()
        .filter(|n| CHAIN.contains(&n.as_str()) || n.as_str() == "chain::main")
        .map(|n| {
            if n == "chain::main" {
                "main".to_owned()
            } else {
                n.clone()
            }
        })
        .collect();
    // Every level once, in order, innermost first (a Rust program also has
    // the C `main` of std's runtime further out, after its own).
    assert_eq!(&chain[..CHAIN.len()], &CHAIN, "{names:?}");
    let source_frames: Vec<&str> = CHAIN[..5].to_vec();
    assert_source_lines(stall, &source_frames, file);
}

#[test]
fn c_without_frame_pointers_on_cpu() {
    let (stall, _) = stall_of("chain", "spin", "level1");
    assert_eq!(stall["state"], "running");
    assert_complete_chain(&stall, "chain.c");
    assert_source_lines(&stall, &["main"], "chain.c");
}

#[test]
fn c_without_frame_pointers_blocked_in_read() {
    let (stall, _) = stall_of("chain", "read", "level1");
    assert_eq!(stall["state"], "blocked");
    assert_eq!(stall["syscall"]["name"], "read");
    let names = functions(&stall, "user_stack");
    assert!(
        names[0].contains("read"),
        "the libc wrapper comes first: {names:?}"
    );
    assert_complete_chain(&stall, "chain.c");
}

#[test]
fn rust_release_on_cpu() {
    let (stall, _) = stall_of("chain_rust", "spin", "level1");
    assert_eq!(stall["state"], "running");
    assert_complete_chain(&stall, "chain.rs");
}

#[test]
fn rust_release_blocked_in_read() {
    let (stall, _) = stall_of("chain_rust", "read", "level1");
    assert_eq!(stall["state"], "blocked");
    assert_complete_chain(&stall, "chain.rs");
    assert!(functions(&stall, "user_stack")[0].contains("read"));
}

/// `nm -S` of the unstripped build: name -> (address, size).
fn symbols(binary: &std::path::Path) -> HashMap<String, (u64, u64)> {
    let out = Command::new("nm")
        .arg("-S")
        .arg(binary)
        .output()
        .expect("nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [addr, size, _kind, name] = parts[..] else {
                return None;
            };
            Some((
                name.to_owned(),
                (
                    u64::from_str_radix(addr, 16).ok()?,
                    u64::from_str_radix(size, 16).ok()?,
                ),
            ))
        })
        .collect()
}

/// Load address of `pid`'s executable (the mapping of file offset 0).
/// A just-spawned process may still be inside execve: wait for its maps.
fn load_base(pid: u32) -> u64 {
    let binary = target_bin("chain_stripped");
    for _ in 0..100 {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let base = maps
            .lines()
            .find(|l| {
                l.ends_with(binary.to_str().unwrap())
                    && l.split_whitespace().nth(2) == Some("00000000")
            })
            .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok());
        if let Some(base) = base {
            return base;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never mapped in {pid}", binary.display());
}

#[test]
fn stripped_binary_keeps_its_frames_through_eh_frame() {
    for mode in ["spin", "read"] {
        require_root();
        let table = symbols(&target_bin("chain"));
        // No symbols in the stripped copy: probe level1 by file offset
        // (gcc's PIE text has file offset == address).
        let level1 = format!("{:#x}", table["level1"].0);
        let mut target = Target::spawn("chain_stripped", &[mode, "--stall-ms", "1500", "--wait"]);
        let base = load_base(target.pid());
        let pid = target.pid().to_string();
        let agent = Agent::start(&[
            "attach",
            "--pid",
            &pid,
            "--entry",
            &level1,
            "--timeout",
            "300ms",
        ]);
        target.go();
        let line = agent
            .stdout
            .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
            .expect("a stall report");
        let stall: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(stall["user_stack_unwinder"], "dwarf", "{stall}");
        assert_eq!(stall["user_stack_truncated"], false, "{stall}");
        // Map every frame in the stripped executable back to the unstripped
        // symbol table: the chain must be there, in order, at the right addresses.
        let mut found = Vec::new();
        for (index, frame) in stall["user_stack"].as_array().unwrap().iter().enumerate() {
            if !frame["module"]
                .as_str()
                .unwrap_or("")
                .ends_with("chain_stripped")
            {
                continue;
            }
            let addr =
                u64::from_str_radix(frame["addr"].as_str().unwrap().trim_start_matches("0x"), 16)
                    .unwrap();
            let offset = addr - base;
            // Return addresses (every frame but the first) point after the
            // call: look them up at offset - 1.
            let lookup = if index == 0 { offset } else { offset - 1 };
            let name = table
                .iter()
                .find(|(_, (start, size))| lookup >= *start && lookup < start + size)
                .map(|(name, _)| name.as_str());
            if let Some(name) = name.filter(|n| CHAIN.contains(n)) {
                found.push(name.to_owned());
            }
        }
        assert_eq!(found, CHAIN, "{mode}: {}", stall["user_stack"]);
    }
}

#[test]
fn a_stack_deeper_than_the_copy_is_marked_truncated_and_says_why() {
    let (stall, _) = stall_of("chain", "deep", "level1");
    assert_eq!(stall["state"], "running");
    assert_eq!(stall["user_stack_truncated"], true, "{stall}");
    let reason = stall["user_stack_truncated_reason"].as_str().unwrap();
    assert!(reason.contains("raise --user-stack-bytes"), "{reason}");
    // What was copied is still unwound: the innermost frames are there.
    let names = functions(&stall, "user_stack");
    assert!(
        names.iter().filter(|n| *n == "recurse").count() > 10,
        "{names:?}"
    );

    // The copy size is the user's: 4 KiB is enough for a shallow stack.
    require_root();
    let mut target = Target::spawn("chain", &["spin", "--stall-ms", "1500", "--wait"]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        "level1",
        "--timeout",
        "300ms",
        "--user-stack-bytes",
        "4096",
    ]);
    target.go();
    let line = agent
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
        .unwrap();
    let small: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(small["user_stack_truncated"], false, "{small}");
    assert_complete_chain(&small, "chain.c");
}
