//! The crash loop of issue 10: 20 rounds of writing, kill -9 at a random point and
//! restart, with quiet restarts (no writes; SIGTERM or kill -9) mixed in, into the
//! embedded default and into PostgreSQL; at the end every acknowledged row is there
//! exactly once. The rounds are drawn from a seed (`SLUICE_CRASH_SEED` to replay one).

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use sluice_test_support::pg::PgServer;

const ROWS: i64 = 500;
const ROUNDS: usize = 20;

/// A small deterministic generator (xorshift), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Self {
        let seed = std::env::var("SLUICE_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("crash loop seed: {seed} (SLUICE_CRASH_SEED={seed} replays it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs the rounds against `data_dir` with `env`; returns the batch indexes acked.
async fn crash_rounds(data_dir: &Path, env: &[(&str, &str)], rng: &mut Rng) -> Vec<i64> {
    let mut acked = Vec::new();
    for round in 0..ROUNDS {
        // A quiet restart now and then: no writes, then SIGTERM or kill -9.
        if rng.below(3) == 0 {
            let mut quiet = Sluice::start(data_dir, env);
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
            if rng.below(2) == 0 {
                assert!(quiet.terminate().success(), "round {round}: clean exit");
            } else {
                quiet.kill9();
            }
        }
        let mut server = Sluice::start(data_dir, env);
        let kill_after = 1 + rng.below(25) as usize;
        let from = round as i64 * 10_000;
        acked.extend(stream_until_killed(&mut server, from, kill_after, ROWS).await);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_into_the_embedded_default_keeps_every_ack_once() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments and quick flushes: archive commits and WAL releases happen between
    // the kills too.
    let env = [
        ("WAL__SEGMENT_SIZE", "1MiB"),
        ("BUFFER__MAX_ROWS", "7000"),
        ("BUFFER__MAX_AGE", "300ms"),
    ];
    {
        let server = Sluice::start(dir.path(), &env);
        let mut client = server.flight().await;
        action(&mut client, "register_table", EVENTS).await.unwrap();
    }
    let mut rng = Rng::from_env();
    let acked = crash_rounds(dir.path(), &env, &mut rng).await;
    assert!(acked.len() >= ROUNDS, "{} batches acked", acked.len());
    let server = Sluice::start(dir.path(), &env);
    let ids = event_ids(&server).await;
    assert_each_acked_once("SQL", &ids, &acked, ROWS);
}

sluice_test_support::pg_test! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_into_postgres_keeps_every_ack_once(flavor) {
    let pg = PgServer::start_on(flavor);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("POSTGRES__URL", pg.url.as_str()),
        ("POSTGRES__BATCH_ROWS", "3000"),
        ("POSTGRES__LINGER", "30ms"),
        ("POSTGRES__RETRY_INITIAL", "50ms"),
        ("POSTGRES__RETRY_MAX", "500ms"),
        ("WAL__SEGMENT_SIZE", "1MiB"),
        ("BUFFER__MAX_AGE", "300ms"),
    ];
    let schema = EVENTS.replace(
        r#""name":"events","#,
        r#""name":"events","sinks":["postgres","archive"],"#,
    );
    {
        let server = Sluice::start(dir.path(), &env);
        let mut client = server.flight().await;
        action(&mut client, "register_table", &schema)
            .await
            .unwrap();
    }
    let mut rng = Rng::from_env();
    let acked = crash_rounds(dir.path(), &env, &mut rng).await;
    let server = Sluice::start(dir.path(), &env);
    wait_sink_caught_up(&server, "postgres").await;
    let db = pg.client().await;
    let ids: Vec<i64> = db
        .query("SELECT id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_each_acked_once("PostgreSQL", &ids, &acked, ROWS);
    let sql = event_ids(&server).await;
    assert_each_acked_once("SQL (buffer and archive)", &sql, &acked, ROWS);
}
}
