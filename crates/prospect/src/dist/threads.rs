//! N ranks as threads of one process: a [`Collective`] for tests of the distributed semantics (N ranks
//! give the numbers of one process) where no MPI is installed. Every operation is one rendezvous of
//! all ranks through a mutex and a condition variable; sums run in rank order, so results are
//! deterministic. Not a transport for real jobs: those go through MPI (`dist::mpi`).

use std::sync::{Arc, Condvar, Mutex};

use super::Collective;
use crate::error::{Error, Result};

struct State {
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    result: Arc<Vec<Vec<u8>>>,
    aborted: Option<(usize, i32)>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    ready: Condvar,
}

/// One rank's handle. Move each into its own thread.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// `size` connected ranks.
pub fn group(size: usize) -> Vec<ThreadRank> {
    let shared = Arc::new(Shared {
        size,
        state: Mutex::new(State {
            generation: 0,
            slots: vec![None; size],
            arrived: 0,
            result: Arc::new(Vec::new()),
            aborted: None,
        }),
        ready: Condvar::new(),
    });
    (0..size).map(|rank| ThreadRank { rank, shared: shared.clone() }).collect()
}

impl ThreadRank {
    /// Deposit `value`, wait for every rank's, and return them all in rank order.
    fn exchange(&self, value: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let poisoned = |_| Error::Compute("thread group: a rank panicked".into());
        let mut state = self.shared.state.lock().map_err(poisoned)?;
        let generation = state.generation;
        state.slots[self.rank] = Some(value);
        state.arrived += 1;
        if state.arrived == self.shared.size {
            let all: Vec<Vec<u8>> = state.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            state.result = Arc::new(all);
            state.arrived = 0;
            state.generation += 1;
            self.shared.ready.notify_all();
        }
        while state.generation == generation && state.aborted.is_none() {
            state = self.shared.ready.wait(state).map_err(poisoned)?;
        }
        if state.generation == generation {
            // Released by an abort, not by the exchange completing.
            let (rank, code) = state.aborted.unwrap_or((usize::MAX, 0));
            return Err(Error::Compute(format!("rank {rank} aborted the job (code {code})")));
        }
        Ok(state.result.clone())
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        // Through the f64 sum: in rank order, then rounded once.
        let mut wide: Vec<f64> = buf.iter().map(|&x| f64::from(x)).collect();
        self.all_reduce_sum_f64(&mut wide)?;
        for (x, w) in buf.iter_mut().zip(wide) {
            *x = w as f32;
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.exchange(bytes)?;
        buf.fill(0.0);
        for part in all.iter() {
            for (x, b) in buf.iter_mut().zip(part.chunks_exact(8)) {
                *x += f64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            }
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let all = self.exchange(buf.to_vec())?;
        buf.copy_from_slice(&all[root]);
        Ok(())
    }

    fn all_gather(&self, value: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange(value.to_vec())?.as_ref().clone())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Vec::new()).map(|_| ())
    }

    fn abort(&self, code: i32) -> ! {
        if let Ok(mut state) = self.shared.state.lock() {
            state.aborted = Some((self.rank, code));
        }
        self.shared.ready.notify_all();
        panic!("rank {} aborted the job (code {code})", self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sum_gather_and_broadcast() {
        let handles: Vec<_> = group(3)
            .into_iter()
            .map(|rank| {
                std::thread::spawn(move || {
                    let r = rank.rank() as f32;
                    let mut buf = vec![r, 10.0 * r];
                    rank.all_reduce_sum(&mut buf).unwrap();
                    let gathered = rank.all_gather(&[rank.rank() as u8; 2][..=rank.rank().min(1)]).unwrap();
                    let mut b = [rank.rank() as u8 + 7];
                    rank.broadcast(&mut b, 2).unwrap();
                    rank.barrier().unwrap();
                    (buf, gathered, b[0])
                })
            })
            .collect();
        for h in handles {
            let (buf, gathered, b) = h.join().unwrap();
            assert_eq!(buf, vec![3.0, 30.0]); // 0 + 1 + 2
            assert_eq!(gathered, vec![vec![0], vec![1, 1], vec![2, 2]]);
            assert_eq!(b, 9);
        }
    }

    #[test]
    fn an_abort_releases_the_waiting_ranks_with_an_error() {
        let mut ranks = group(2);
        let r1 = ranks.pop().unwrap();
        let r0 = ranks.pop().unwrap();
        let waiting = std::thread::spawn(move || r0.barrier());
        let aborting = std::thread::spawn(move || r1.abort(3));
        assert!(aborting.join().is_err()); // the aborting rank's thread ends (a panic, in threads)
        let err = waiting.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank 1 aborted"), "{err}");
    }
}
