//! Data parallelism over an existing collective engine: the [`Collective`] interface the trainer talks
//! to, and its backends.
//!
//! - [`Local`]: one process; every operation is a no-op (the default: nothing changes).
//! - [`threads::group`]: N ranks as threads of one process, for tests of the distributed semantics
//!   without an MPI installation. Not a transport for real jobs.
//! - `mpi::Mpi` (cargo feature `mpi`): MPI through the `mpi` crate (rsmpi), for `mpirun` and Slurm.
//!
//! The trainer's contract (see `train::run`): every rank loads the same config and data, cuts each
//! optimizer step into the same microbatches as one process would, and runs the microbatches dealt to
//! it ([`deal`]). Gradients are summed with [`Collective::all_reduce_sum`]; per-microbatch losses and
//! metrics are gathered and replayed in microbatch order, so every rank logs and steps exactly as one
//! process does. Every rank makes the same collective calls in the same order whatever its data, so no
//! rank waits on a call another rank skips (an empty share of microbatches still reduces zeros).

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod threads;

use crate::error::Result;

/// The collective operations data-parallel training needs. Every call is collective: all ranks make
/// it, in the same order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sum `buf` element-wise across the ranks, in place; every rank receives the sum.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// The same in f64: the trainer sums gradients in f64, so that the sum does not depend on its order.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replace `buf` on every rank with rank `root`'s `buf` (same length everywhere).
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Every rank's `value` (lengths may differ), in rank order. For small values: metrics, digests.
    fn all_gather(&self, value: &[u8]) -> Result<Vec<Vec<u8>>>;
    fn barrier(&self) -> Result<()>;
    /// End the whole job now with `code` (MPI_Abort): a rank that fails must not leave the others
    /// blocked in their next collective call.
    fn abort(&self, code: i32) -> !;
}

/// The collective a run uses (shared by the run's parts; never sent across threads).
pub type Comm = std::rc::Rc<dyn Collective>;

/// One process: rank 0 of 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, value: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![value.to_vec()])
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The local single-process collective.
pub fn local() -> Comm {
    std::rc::Rc::new(Local)
}

/// The microbatches (indices into a step's list of `count`) that `rank` of `world` runs: contiguous
/// shares, the first `count % world` ranks taking one more. A rank may get none (a short last step).
pub fn deal(count: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (count / world, count % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Fault injection for the failure tests: when the environment variable `PROSPECT_FAIL_AT` is
/// `RANK:STEP`, that rank fails as step STEP (from 1) starts. Unset, it costs one lookup per step.
/// (Bad data cannot do this: every rank reads and checks all the data before the first step.)
pub fn fail_point(rank: usize, step: usize) -> Result<()> {
    let Ok(spec) = std::env::var("PROSPECT_FAIL_AT") else { return Ok(()) };
    if spec == format!("{rank}:{step}") {
        return Err(crate::error::Error::Compute(format!("injected failure at step {step} (PROSPECT_FAIL_AT={spec})")));
    }
    Ok(())
}

/// Elements summed per collective call: 8 Mi values (64 MiB of f64), so the staging copy stays bounded
/// for any model size.
pub const BUCKET: usize = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deal_covers_every_microbatch_once_in_order() {
        for count in 0..9 {
            for world in 1..5 {
                let shares: Vec<usize> = (0..world).flat_map(|r| deal(count, r, world)).collect();
                assert_eq!(shares, (0..count).collect::<Vec<_>>(), "count {count}, world {world}");
            }
        }
        assert_eq!(deal(4, 0, 2), 0..2);
        assert_eq!(deal(4, 1, 2), 2..4);
        assert_eq!(deal(1, 1, 2), 1..1); // a short last step: rank 1 runs nothing
    }
}
