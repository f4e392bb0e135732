//! A real PostgreSQL server for the tests: Debian's postgres 15, in a
//! temporary directory, on a Unix socket only, run as the `postgres` user.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The server executable every backend runs.
pub fn postgres_binary() -> PathBuf {
    Path::new(BIN_DIR).join("postgres")
}

pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    server: Child,
}

fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg(program);
    command
}

impl Postgres {
    /// initdb + start; panics with the server's words if it cannot.
    pub fn start() -> Self {
        assert!(
            postgres_binary().exists(),
            "PostgreSQL 15 is not installed (cargo xtask setup installs it)"
        );
        let dir =
            std::env::temp_dir().join(format!("dogslow-pg-{}-{}", std::process::id(), unique()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let data = dir.join("data");
        let out = as_postgres(&Path::new(BIN_DIR).join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = 20000 + (std::process::id() % 20000) as u16;
        let server = as_postgres(&postgres_binary())
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
            ])
            .arg("-k")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let pg = Self { dir, port, server };
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let ready = Command::new(Path::new(BIN_DIR).join("pg_isready"))
                .args(["-h", pg.dir.to_str().unwrap(), "-p", &pg.port.to_string()])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ready {
                return pg;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres did not become ready");
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    /// A psql command connected to this server.
    pub fn psql(&self) -> Command {
        let mut command = Command::new(Path::new(BIN_DIR).join("psql"));
        command
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-d", "postgres"]);
        command
    }

    /// Runs SQL to completion; returns stdout.
    pub fn query(&self, sql: &str) -> String {
        let out = self.psql().arg("-c").arg(sql).output().expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts SQL in the background (a session of its own).
    pub fn spawn_query(&self, sql: &str) -> Child {
        self.psql()
            .arg("-c")
            .arg(sql)
            .stdout(Stdio::null())
            .spawn()
            .expect("psql")
    }

    /// An interactive session fed through stdin.
    pub fn session(&self) -> Session {
        let child = self
            .psql()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql");
        Session { child }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown of the postmaster and its backends.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.server.id() as i32, libc::SIGQUIT) };
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A psql session kept open.
pub struct Session {
    child: Child,
}

impl Session {
    pub fn send(&mut self, sql: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{sql}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn close(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
