//! A rank that fails (here at step 2, by fault injection: bad data cannot do it, as every rank reads and
//! checks all the data before the first step) ends the other ranks' run with an error within seconds,
//! instead of leaving them blocked in the next collective call. Its own binary: it sets an environment
//! variable that the other distributed tests must not see.

mod common;

use std::time::{Duration, Instant};

use common::{run_ranks, scratch, trl_config};
use prospect::loss::{KtoConfig, LossConfig};
use prospect::train::RunOptions;

#[test]
fn a_failing_rank_ends_the_other_ranks_run_with_an_error() {
    let out = scratch("dist-fail");
    let config = trl_config("unpaired.jsonl", LossConfig::Kto(KtoConfig::default()), &out);
    std::env::set_var("PROSPECT_FAIL_AT", "1:2");
    let started = Instant::now();
    let results = run_ranks(&config, 2, RunOptions::default());
    std::env::remove_var("PROSPECT_FAIL_AT");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let e1 = results[1].as_ref().unwrap_err().to_string();
    assert!(e1.contains("step 2") && e1.contains("injected failure"), "{e1}");
    let e0 = results[0].as_ref().unwrap_err().to_string();
    assert!(e0.contains("rank 1 aborted"), "{e0}");
    assert!(!out.join("final").exists());
}
