//! The same five-deep chain as chain.c, in Rust release mode (which omits
//! frame pointers by default): level1 .. level5, where level5 spins or
//! blocks in read() on a pipe.
//!
//!   chain_rust spin|read [--stall-ms MS] [--wait]
use std::hint::black_box;
use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn level5(read_pipe: bool, stall_ms: u64, reader: &mut std::io::PipeReader) {
    if read_pipe {
        let mut byte = [0u8; 1];
        let _ = black_box(reader.read(&mut byte));
    } else {
        let until = Instant::now() + Duration::from_millis(stall_ms);
        let mut x = 0u64;
        while Instant::now() < until {
            x = black_box(x.wrapping_add(1));
        }
    }
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn level4(read_pipe: bool, stall_ms: u64, reader: &mut std::io::PipeReader) {
    level5(read_pipe, stall_ms, reader);
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn level3(read_pipe: bool, stall_ms: u64, reader: &mut std::io::PipeReader) {
    level4(read_pipe, stall_ms, reader);
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn level2(read_pipe: bool, stall_ms: u64, reader: &mut std::io::PipeReader) {
    level3(read_pipe, stall_ms, reader);
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn level1(read_pipe: bool, stall_ms: u64, reader: &mut std::io::PipeReader) {
    level2(read_pipe, stall_ms, reader);
    black_box(());
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let read_pipe = args.get(1).map(String::as_str) == Some("read");
    let mut stall_ms = 2000;
    let mut wait = false;
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--stall-ms" => {
                stall_ms = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(stall_ms);
                i += 1;
            }
            "--wait" => wait = true,
            _ => {}
        }
        i += 1;
    }
    let (mut reader, mut writer) = std::io::pipe().expect("pipe");
    if wait {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    let late_writer = read_pipe.then(|| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(stall_ms));
            let _ = writer.write_all(b"x");
        })
    });
    let start = now_ns();
    level1(read_pipe, stall_ms, &mut reader);
    println!("request 1 {start} {}", now_ns());
    if let Some(handle) = late_writer {
        let _ = handle.join();
    }
}
