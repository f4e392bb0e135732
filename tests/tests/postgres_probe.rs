//! Smoke check of the PostgreSQL harness (the USDT tests build on it).
use dogslow_tests::pg::Postgres;

#[test]
fn postgres_runs_queries() {
    dogslow_tests::require_root();
    let pg = Postgres::start();
    assert_eq!(pg.query("SELECT 40 + 2").trim(), "42");
}
