//! Every new loss on seeded random log-probs, against `tests/fixtures/loss_reference.json`
//! (`scripts/make_loss_fixtures.py`): the loss and its gradient with respect to each input, from TRL's
//! own loss functions for SimPO (`CPOTrainer.cpo_loss`) and ORPO (`ORPOTrainer.odds_ratio_loss`), and
//! from the formula in PyTorch (float64) for the others.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{close, fixture_json};
use prospect::loss::*;
use serde_json::Value;

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn var(v: &[f64]) -> Var {
    Var::new(v, &Device::Cpu).unwrap()
}

fn tensor(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn counts(v: &[f64]) -> Vec<usize> {
    v.iter().map(|&x| x as usize).collect()
}

struct Case {
    c: Value,
}

impl Case {
    fn new(name: &str) -> Self {
        Self { c: fixture_json("loss_reference.json")["cases"][name].clone() }
    }
    fn input(&self, k: &str) -> Vec<f64> {
        vec1(&self.c["inputs"][k])
    }
    fn labels(&self) -> Vec<bool> {
        self.c["inputs"]["labels"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect()
    }
    /// Compare the loss and the gradient of each (name, var).
    fn check(&self, loss: &Tensor, vars: &[(&str, &Var)]) {
        let got = loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let want = self.c["loss"].as_f64().unwrap();
        assert!(close(got, want, 1e-6, 1e-9), "loss: prospect {got} vs reference {want}");
        let grads = loss.backward().unwrap();
        for (name, v) in vars {
            let g: Vec<f64> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f64> = match &self.c["grads"][*name] {
                Value::Array(rows) if rows.first().map(|r| r.is_array()).unwrap_or(false) => {
                    rows.iter().flat_map(vec1).collect()
                }
                other => vec1(other),
            };
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(&w) {
                assert!(close(*a, *b, 1e-6, 1e-9), "d loss / d {name}: prospect {g:?} vs reference {w:?}");
            }
        }
    }
}

#[test]
fn simpo_matches_trl_cpo_loss() {
    let c = Case::new("simpo");
    let (pc, pr) = (var(&c.input("pc")), var(&c.input("pr")));
    let out = simpo_loss(
        &SimpoConfig::default(),
        pc.as_tensor(),
        pr.as_tensor(),
        &counts(&c.input("nc")),
        &counts(&c.input("nr")),
    )
    .unwrap();
    c.check(&out.loss, &[("pc", &pc), ("pr", &pr)]);
}

#[test]
fn orpo_matches_trl_odds_ratio_loss() {
    let c = Case::new("orpo");
    let (pc, pr) = (var(&c.input("pc")), var(&c.input("pr")));
    let out = orpo_loss(
        &OrpoConfig::default(),
        pc.as_tensor(),
        pr.as_tensor(),
        &counts(&c.input("nc")),
        &counts(&c.input("nr")),
    )
    .unwrap();
    c.check(&out.loss, &[("pc", &pc), ("pr", &pr)]);
}

#[test]
fn cdpo_matches_formula() {
    let c = Case::new("cdpo");
    let (pc, pr) = (var(&c.input("pc")), var(&c.input("pr")));
    let out = cdpo_loss(
        &CdpoConfig::default(),
        pc.as_tensor(),
        pr.as_tensor(),
        &tensor(&c.input("rc")),
        &tensor(&c.input("rr")),
    )
    .unwrap();
    c.check(&out.loss, &[("pc", &pc), ("pr", &pr)]);
}

#[test]
fn ipo_matches_formula() {
    let c = Case::new("ipo");
    let (pc, pr) = (var(&c.input("pc")), var(&c.input("pr")));
    let out = ipo_loss(
        &IpoConfig::default(),
        pc.as_tensor(),
        pr.as_tensor(),
        &tensor(&c.input("rc")),
        &tensor(&c.input("rr")),
        &counts(&c.input("nc")),
        &counts(&c.input("nr")),
    )
    .unwrap();
    c.check(&out.loss, &[("pc", &pc), ("pr", &pr)]);
}

#[test]
fn slic_matches_formula() {
    let c = Case::new("slic");
    let (pc, pr) = (var(&c.input("pc")), var(&c.input("pr")));
    let out = slic_loss(&SlicConfig::default(), pc.as_tensor(), pr.as_tensor()).unwrap();
    c.check(&out.loss, &[("pc", &pc), ("pr", &pr)]);
}

#[test]
fn kto_zero_matches_formula() {
    let c = Case::new("kto_zero");
    let p = var(&c.input("p"));
    let out = kto_zero_loss(&KtoZeroConfig::default(), p.as_tensor(), &tensor(&c.input("r")), &c.labels()).unwrap();
    c.check(&out.loss, &[("p", &p)]);
}

#[test]
fn apo_zero_unpaired_matches_formula() {
    let c = Case::new("apo_zero_unpaired");
    let p = var(&c.input("p"));
    let out =
        apo_zero_unpaired_loss(&ApoZeroUnpairedConfig::default(), p.as_tensor(), &tensor(&c.input("r")), &c.labels())
            .unwrap();
    c.check(&out.loss, &[("p", &p)]);
}

#[test]
fn reward_matches_formula() {
    let c = Case::new("reward");
    let (sc, sr) = (var(&c.input("sc")), var(&c.input("sr")));
    let out = reward_loss(&RewardConfig::default(), sc.as_tensor(), sr.as_tensor()).unwrap();
    c.check(&out.loss, &[("sc", &sc), ("sr", &sr)]);
}

#[test]
fn ppo_offline_matches_halos_formula() {
    let c = Case::new("ppo_offline");
    let rows = |k: &str| -> Vec<Vec<f64>> { c.c["inputs"][k].as_array().unwrap().iter().map(vec1).collect() };
    let t2 = |v: Vec<Vec<f64>>| Tensor::new(v, &Device::Cpu).unwrap();
    let logp = Var::from_tensor(&t2(rows("logp"))).unwrap();
    let values = Var::from_tensor(&t2(rows("values"))).unwrap();
    let rewards: Vec<f32> = c.input("rewards").iter().map(|&x| x as f32).collect();
    let out = ppo_offline_loss(
        &PpoOfflineConfig::default(),
        &PpoInputs {
            policy_logps: logp.as_tensor(),
            reference_logps: &t2(rows("old")),
            values: values.as_tensor(),
            mask: &t2(rows("mask")),
            rewards: &rewards,
        },
    )
    .unwrap();
    let stats = &c.c["stats"];
    for (key, got) in
        [("loss/policy", out.policy_loss), ("loss/critic", out.critic_loss), ("kl", out.kl), ("clipfrac", out.clipfrac)]
    {
        let want = stats[key].as_f64().unwrap();
        assert!(close(got, want, 1e-6, 1e-9), "{key}: prospect {got} vs reference {want}");
    }
    c.check(&out.loss, &[("logp", &logp), ("values", &values)]);
}
