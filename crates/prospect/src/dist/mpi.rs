//! MPI through the `mpi` crate (rsmpi): Open MPI or MPICH, launched by `mpirun` or Slurm's `srun`.
//! Built with the cargo feature `mpi` (`scripts/setup_mpi.sh` installs what the build needs).

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::Collective;
use crate::error::{Error, Result};

/// The MPI world. Holding it keeps MPI initialised; dropping it finalises MPI.
pub struct Mpi {
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initialise MPI (once per process). `None` when MPI was already initialised.
    pub fn init() -> Option<Self> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        Some(Self { world, _universe: universe })
    }

    /// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, Slurm's `srun`), from the
    /// variables they set. A plain `prospect train` is not, and runs as one process without MPI.
    pub fn launched() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }
}

impl Mpi {
    /// `MPI_Allreduce(MPI_SUM)` over `buf`, one bucket of [`super::BUCKET`] values at a time, so the send
    /// copy stays bounded.
    fn sum_in_buckets<T: Equivalence + Copy>(&self, buf: &mut [T]) -> Result<()> {
        for chunk in buf.chunks_mut(super::BUCKET) {
            let send = chunk.to_vec();
            self.world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }
}

fn count(n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| Error::Compute(format!("MPI: a message of {n} elements is too long")))
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_in_buckets(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_in_buckets(buf)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.world.process_at_rank(count(root)?).broadcast_into(buf);
        Ok(())
    }

    fn all_gather(&self, value: &[u8]) -> Result<Vec<Vec<u8>>> {
        let size = self.world_size();
        let mut lengths = vec![0 as Count; size];
        self.world.all_gather_into(&count(value.len())?, &mut lengths[..]);
        let displs: Vec<Count> = lengths.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect();
        let total: usize = lengths.iter().map(|&n| n as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &lengths[..], &displs[..]);
            self.world.all_gather_varcount_into(value, &mut partition);
        }
        Ok(lengths.iter().zip(&displs).map(|(&n, &d)| all[d as usize..(d + n) as usize].to_vec()).collect())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
