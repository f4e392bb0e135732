//! Issue 6 on a real PostgreSQL 15 (Debian's, with its USDT probes and
//! their semaphores): dogslow attached to the running server through the
//! binary, requests delimited by `postgresql:query__start` / `query__done`,
//! the query text captured as the request line.
use std::time::Duration;

use dogslow_tests::{pg::Postgres, *};
use serde_json::Value;

const CPU_QUERY: &str = "SELECT count(*) FROM generate_series(1,6000) a, generate_series(1,6000) b";

/// dogslow on the server's binary, started after the server.
fn watch(_pg: &Postgres) -> Agent {
    let binary = pg::postgres_binary();
    Agent::start(&[
        "attach",
        "--binary",
        binary.to_str().unwrap(),
        "--entry",
        "usdt:postgresql:query__start",
        "--exit",
        "usdt:postgresql:query__done",
        "--capture",
        "query=arg0:str",
        "--timeout",
        "500ms",
    ])
}

fn stalls_of(agent: Agent) -> (Vec<Value>, String) {
    std::thread::sleep(Duration::from_millis(300));
    let finished = agent.stop_with(libc::SIGINT);
    assert!(finished.status.success(), "{}", finished.stderr);
    (finished.stalls(), finished.stderr)
}

#[test]
fn pg_sleep_is_reported_blocked_with_its_query_and_the_backend_stack() {
    require_root();
    let pg = Postgres::start();
    let agent = watch(&pg);
    pg.query("SELECT pg_sleep(2)");
    let (stalls, stderr) = stalls_of(agent);
    assert_eq!(stalls.len(), 1, "{stalls:#?}\n{stderr}");
    let stall = &stalls[0];
    assert_eq!(stall["state"], "blocked", "{stall}");
    assert_eq!(stall["request"]["query"], "SELECT pg_sleep(2)");
    assert_eq!(stall["entry"], "usdt:postgresql:query__start");
    let elapsed = stall["elapsed_ms"].as_u64().unwrap();
    assert!((500..600).contains(&elapsed), "{elapsed}");
    let user = functions(stall, "user_stack");
    assert_in_order(
        &user,
        &[
            "pg_sleep",
            "PortalRun",
            "PostgresMain",
            "PostmasterMain",
            "main",
        ],
    );
    let kernel = functions(stall, "kernel_stack");
    assert!(
        kernel.iter().any(|f| f.contains("epoll_wait")),
        "{kernel:?}"
    );
    assert!(stall["exe"].as_str().unwrap().ends_with("/postgres"));
}

#[test]
fn a_cpu_bound_query_is_reported_running_in_the_executor() {
    require_root();
    let pg = Postgres::start();
    let agent = watch(&pg);
    pg.query(CPU_QUERY);
    let (stalls, stderr) = stalls_of(agent);
    assert_eq!(stalls.len(), 1, "{stalls:#?}\n{stderr}");
    let stall = &stalls[0];
    assert_eq!(stall["state"], "running", "{stall}");
    assert_eq!(stall["request"]["query"], CPU_QUERY);
    let elapsed = stall["elapsed_ms"].as_u64().unwrap();
    assert!((500..=500 + 1000 / 99 + 50).contains(&elapsed), "{elapsed}");
    assert_in_order(
        &functions(stall, "user_stack"),
        &["standard_ExecutorRun", "PortalRun", "PostgresMain", "main"],
    );
}

#[test]
fn a_query_waiting_on_another_sessions_lock_is_reported_with_its_own_text() {
    require_root();
    let pg = Postgres::start();
    pg.query("CREATE TABLE accounts (id int)");
    let agent = watch(&pg);
    // Session A takes the lock and stays idle in its transaction: no query
    // of its own is running, so only the waiter can stall.
    let mut holder = pg.session();
    holder.send("BEGIN;");
    holder.send("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE;");
    std::thread::sleep(Duration::from_millis(300));
    let waiter = pg.spawn_query("SELECT count(*) FROM accounts");
    std::thread::sleep(Duration::from_millis(1500));
    holder.send("COMMIT;");
    holder.close();
    let _ = waiter.wait_with_output();
    let (stalls, stderr) = stalls_of(agent);
    assert_eq!(stalls.len(), 1, "{stalls:#?}\n{stderr}");
    let stall = &stalls[0];
    assert_eq!(stall["state"], "blocked", "{stall}");
    assert_eq!(stall["request"]["query"], "SELECT count(*) FROM accounts");
    // The table lock is taken while the query is analyzed, before it runs.
    let user = functions(stall, "user_stack");
    assert_in_order(
        &user,
        &[
            "ProcSleep",
            "LockAcquireExtended",
            "LockRelationOid",
            "PostgresMain",
            "main",
        ],
    );
}

#[test]
fn a_thousand_fast_queries_are_not_reported() {
    require_root();
    let pg = Postgres::start();
    let agent = watch(&pg);
    let mut session = pg.session();
    for i in 0..1000 {
        session.send(&format!("SELECT {i};"));
    }
    // The control, on the same connection: the probes were live all along,
    // and only this query is late.
    session.send("SELECT pg_sleep(0.8);");
    session.close();
    let (stalls, stderr) = stalls_of(agent);
    assert_eq!(stalls.len(), 1, "{stalls:#?}\n{stderr}");
    let query = stalls[0]["request"]["query"].as_str().unwrap_or_default();
    assert!(query.starts_with("SELECT pg_sleep(0.8)"), "{query}");
    assert!(!stderr.contains("not tracked"), "{stderr}");
}

/// The semaphore guarding `query__start`, read from a live process.
fn semaphore_value(pid: u32) -> u16 {
    use std::os::unix::fs::FileExt as _;
    let binary = pg::postgres_binary();
    let probe = dogslow::usdt::read_probes_at(&binary)
        .unwrap()
        .into_iter()
        .find(|p| p.provider == "postgresql" && p.name == "query__start")
        .unwrap();
    let vaddr = probe.semaphore.expect("query__start has a semaphore");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let base = maps
        .lines()
        .find(|l| {
            l.ends_with(binary.to_str().unwrap()) && l.split_whitespace().nth(2) == Some("00000000")
        })
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .unwrap();
    let mut value = [0u8; 2];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap()
        .read_at(&mut value, base + vaddr)
        .unwrap();
    u16::from_ne_bytes(value)
}

#[test]
fn the_query_semaphore_is_raised_while_attached_and_released_after() {
    require_root();
    let pg = Postgres::start();
    assert_eq!(semaphore_value(pg.pid()), 0, "disabled before dogslow");
    let agent = watch(&pg);
    assert!(
        semaphore_value(pg.pid()) > 0,
        "enabled in the running postmaster"
    );
    // A backend forked afterwards has it too: its queries are seen.
    pg.query("SELECT pg_sleep(0.7)");
    let (stalls, _) = stalls_of(agent);
    assert_eq!(stalls.len(), 1);
    assert_eq!(semaphore_value(pg.pid()), 0, "released when dogslow stops");
}

#[test]
fn bad_usdt_specs_say_what_exists() {
    require_root();
    let binary = pg::postgres_binary();
    let binary = binary.to_str().unwrap();
    for (entry, exit, capture, needle) in [
        (
            "usdt:postgres:query__start",
            "usdt:postgresql:query__done",
            "query=arg0:str",
            "postgresql",
        ),
        (
            "usdt:postgresql:query_start",
            "usdt:postgresql:query__done",
            "query=arg0:str",
            "query__start",
        ),
        (
            "usdt:postgresql:query__start",
            "usdt:postgresql:query__done",
            "query=arg3:str",
            "there is no arg3",
        ),
        (
            "usdt:postgresql:query__start",
            "usdt:postgresql:query__done",
            "query=arg0:text",
            "unknown type `text`",
        ),
    ] {
        let finished = run_dogslow(&[
            "attach",
            "--binary",
            binary,
            "--entry",
            entry,
            "--exit",
            exit,
            "--capture",
            capture,
        ]);
        assert!(!finished.status.success(), "{entry} {capture}");
        assert!(
            finished.stderr.contains(needle),
            "{entry} {capture}: {}",
            finished.stderr
        );
        assert!(!finished.stderr.contains("panicked"));
    }
    let finished = run_dogslow(&[
        "attach",
        "--binary",
        binary,
        "--entry",
        "usdt:postgresql:query__start",
    ]);
    assert!(
        finished.stderr.contains("needs --exit"),
        "{}",
        finished.stderr
    );
}
