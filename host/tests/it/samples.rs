//! Each sample against a CPU reference with an explicit tolerance.

use host::{Failure, Limits};

use crate::{host, run, text};

/// A seeded generator for test data (xorshift32, uniform in [-1, 1)).
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn le_bytes(words: &[u32], values: &[&[f32]]) -> Vec<u8> {
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    for v in values {
        out.extend(v.iter().flat_map(|f| f.to_le_bytes()));
    }
    out
}

#[test]
pub(crate) fn matmul() {
    let mut rng = Rng(42);
    // Odd sizes exercise the tile edges; the last is a plain square.
    for (m, k, n) in [(37, 53, 29), (1, 1, 1), (64, 200, 16), (128, 128, 128)] {
        let a = rng.vec(m * k);
        let b = rng.vec(k * n);
        let input = le_bytes(&[m as u32, k as u32, n as u32], &[&a, &b]);
        let report = run(sample_artifacts::MATMUL, &input, &Limits::default());
        assert_eq!(report.outcome, Ok(()), "log: {}", text(&report.log));
        let c: Vec<f32> = bytemuck::pod_collect_to_vec(&report.output);
        assert_eq!(c.len(), m * n);
        // f32 sums of k products of values in [-1, 1): allow 1e-5 per term.
        let tolerance = 1e-5 * k as f64;
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j])).sum();
                let got = f64::from(c[i * n + j]);
                assert!((got - want).abs() <= tolerance, "{m}x{k}x{n} c[{i}][{j}] = {got}, want {want}");
            }
        }
        let u = report.usage;
        assert_eq!(u.dispatches, 1);
        let groups = (n.div_ceil(16) * m.div_ceil(16)) as u64;
        assert_eq!(u.workgroups, groups);
        assert_eq!(u.invocations, groups * 256);
        assert_eq!(u.bytes_uploaded, 16 + 4 * (m * k + k * n) as u64);
        assert_eq!(u.bytes_downloaded, 4 * (m * n) as u64);
        assert!(u.fuel > 0);
    }
}

#[test]
fn matmul_demo_checks_itself_and_counts_are_deterministic() {
    let first = run(sample_artifacts::MATMUL, b"", &Limits::default());
    assert_eq!(first.outcome, Ok(()), "log: {}", text(&first.log));
    assert!(text(&first.output).contains("matches the CPU reference"), "{}", text(&first.output));
    let second = run(sample_artifacts::MATMUL, b"", &Limits::default());
    // Everything but GPU time is deterministic: a re-run elsewhere bills the same.
    let strip = |mut u: host::Usage| {
        u.gpu_time_ns = 0;
        u
    };
    assert_eq!(strip(first.usage), strip(second.usage));
    assert_eq!(first.output, second.output);
}

#[test]
fn matmul_rejects_malformed_input_with_a_reason() {
    let report = run(sample_artifacts::MATMUL, &le_bytes(&[4, 4, 4], &[&[1.0; 3]]), &Limits::default());
    assert_eq!(report.outcome, Err(Failure::Exit(1)));
    assert!(text(&report.log).contains("needs 140 bytes of input"), "log: {}", text(&report.log));
}

struct Mlp {
    dims: [usize; 3],
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

impl Mlp {
    fn random(rng: &mut Rng, i: usize, h: usize, o: usize) -> Mlp {
        Mlp { dims: [i, h, o], w1: rng.vec(i * h), b1: rng.vec(h), w2: rng.vec(h * o), b2: rng.vec(o) }
    }

    fn bytes(&self) -> Vec<u8> {
        let [i, h, o] = self.dims;
        le_bytes(&[i as u32, h as u32, o as u32], &[&self.w1, &self.b1, &self.w2, &self.b2])
    }

    fn forward(&self, x: &[f32]) -> Vec<f64> {
        let [i, h, o] = self.dims;
        let hidden: Vec<f64> = (0..h)
            .map(|j| {
                let z = f64::from(self.b1[j])
                    + (0..i).map(|p| f64::from(x[p]) * f64::from(self.w1[p * h + j])).sum::<f64>();
                z.max(0.0)
            })
            .collect();
        (0..o)
            .map(|j| f64::from(self.b2[j]) + (0..h).map(|p| hidden[p] * f64::from(self.w2[p * o + j])).sum::<f64>())
            .collect()
    }
}

#[test]
pub(crate) fn mlp() {
    let mut rng = Rng(7);
    let net = Mlp::random(&mut rng, 24, 96, 5);
    let module = host().load(&sample_artifacts::read(sample_artifacts::MLP)).unwrap();
    assert_eq!(module.kind(), host::JobKind::Service);
    let mut service = host().start_service(&module, net.bytes(), &Limits::default()).unwrap();
    let after_init = service.usage();
    assert_eq!(after_init.inferences, 0);

    for n in 0..5 {
        let x = rng.vec(24);
        let request: Vec<String> = x.iter().map(|v| v.to_string()).collect();
        let inference = service.infer(request.join(",").as_bytes()).unwrap();
        let got: Vec<f64> = text(&inference.response).split(',').map(|t| t.parse().unwrap()).collect();
        let want = net.forward(&x);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            // Sums of ~100 f32 products: 1e-4 absolute plus 1e-5 relative.
            assert!((g - w).abs() <= 1e-4 + 1e-5 * w.abs(), "request {n}: got {got:?}, want {want:?}");
        }
        assert_eq!(inference.usage.inferences, 1);
        assert_eq!(inference.usage.dispatches, 2, "one forward pass is two dispatches");
        assert_eq!(inference.usage.bytes_uploaded, 24 * 4);
        assert_eq!(inference.usage.bytes_downloaded, 5 * 4);
    }

    // A bad request fails that request only; the next one is served.
    let err = service.infer(b"1,2,three").unwrap_err();
    assert!(matches!(&err, Failure::Guest(m) if m.contains("\"three\" is not a number")), "{err}");
    let err = service.infer(b"1,2").unwrap_err();
    assert!(matches!(&err, Failure::Guest(m) if m.contains("expected 24 numbers")), "{err}");
    let x = [0.5f32; 24];
    let request: Vec<String> = x.iter().map(|v| v.to_string()).collect();
    service.infer(request.join(" ").as_bytes()).unwrap();
    assert_eq!(service.usage().inferences, 6);
}

#[test]
fn mlp_init_refuses_bad_weights() {
    let module = host().load(&sample_artifacts::read(sample_artifacts::MLP)).unwrap();
    let err = host().start_service(&module, le_bytes(&[2, 2, 2], &[&[0.0; 3]]), &Limits::default()).unwrap_err();
    let host::StartError::Failed(f) = err else { panic!("expected an init failure, got {err}") };
    assert!(matches!(&f.failure, Failure::Guest(m) if m.contains("needs")), "{}", f.failure);
}

/// The training sample's data and algorithm, on the CPU in f32.
fn train_reference(epochs: u32, lr: f32, samples: u32, features: u32, seed: u32) -> (Vec<f32>, f32) {
    let mut rng = Rng(seed.max(1));
    let truth: Vec<f32> = (0..=features).map(|_| rng.next() * 2.0).collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let row: Vec<f32> = (0..features).map(|_| rng.next()).collect();
        let z: f32 = row.iter().zip(&truth).map(|(a, b)| a * b).sum::<f32>() + truth[features as usize];
        y.push(if z > 0.0 { 1.0f32 } else { 0.0 });
        x.extend(row);
    }
    let (n, d) = (samples as usize, features as usize);
    let mut params = vec![0f32; d + 1];
    let forward = |params: &[f32]| -> (Vec<f32>, f32) {
        let mut err = vec![0f32; n];
        let mut loss = 0f64;
        for i in 0..n {
            let mut z = params[d];
            for j in 0..d {
                z += x[i * d + j] * params[j];
            }
            let p = 1.0 / (1.0 + (-z).exp());
            err[i] = p - y[i];
            let q = p.clamp(1e-7, 1.0 - 1e-7);
            loss += f64::from(-(y[i] * q.ln() + (1.0 - y[i]) * (1.0 - q).ln()));
        }
        (err, (loss / n as f64) as f32)
    };
    for _ in 0..epochs {
        let (err, _) = forward(&params);
        for j in 0..=d {
            let g: f32 = (0..n).map(|i| err[i] * if j < d { x[i * d + j] } else { 1.0 }).sum();
            params[j] -= lr * g / n as f32;
        }
    }
    let (_, loss) = forward(&params);
    (params, loss)
}

#[test]
pub(crate) fn train() {
    let input = "epochs=120 lr=0.8 samples=512 features=6 seed=11";
    let report = run(sample_artifacts::TRAIN, input.as_bytes(), &Limits::default());
    assert_eq!(report.outcome, Ok(()), "log: {}", text(&report.log));
    let out = text(&report.output);
    let losses: Vec<f32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("epoch "))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "loss must fall every 10 epochs: {losses:?}");
    assert!(losses[11] < 0.5 * losses[0], "{losses:?}");
    let final_line = out.lines().find(|l| l.starts_with("final loss")).unwrap();
    let accuracy: f32 = final_line.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!(accuracy > 0.95, "{final_line}");

    let weights: Vec<f32> =
        out.lines().find_map(|l| l.strip_prefix("weights ")).unwrap().split(' ').map(|w| w.parse().unwrap()).collect();
    let (want, want_loss) = train_reference(120, 0.8, 512, 6, 11);
    assert_eq!(weights.len(), want.len());
    for (g, w) in weights.iter().zip(&want) {
        // 120 epochs of f32 sums over 512 samples; GPU exp() may differ in the last bits.
        assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "weights {weights:?}, CPU {want:?}");
    }
    let final_loss: f32 = final_line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((final_loss - want_loss).abs() < 1e-3, "gpu loss {final_loss}, cpu loss {want_loss}");
    assert_eq!(report.usage.dispatches, 2 * 120 + 1);
}

/// Runs `cluster-train` as every member of a `world`-member cluster at once, in this process,
/// linked in a ring; returns each member's report.
fn run_cluster(world: u32, input: &str) -> Vec<host::JobReport> {
    let module = host().load(&sample_artifacts::read(sample_artifacts::CLUSTER_TRAIN)).unwrap();
    std::thread::scope(|s| {
        let members: Vec<_> = host::collective::local_ring(world)
            .into_iter()
            .zip(0..)
            .map(|(link, rank)| {
                let module = &module;
                s.spawn(move || {
                    let member = host::collective::Member::new(rank, world, link, u64::MAX);
                    host()
                        .run_member(module, input.as_bytes().to_vec(), &Limits::default(), |_| {}, None, member)
                        .unwrap()
                })
            })
            .collect();
        members.into_iter().map(|m| m.join().unwrap()).collect()
    })
}

fn numbers_after(out: &str, prefix: &str) -> Vec<f32> {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {out}"))
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
pub(crate) fn cluster_train() {
    // Synchronous data parallel: 1, 2 and 4 members on the same global batch take the same
    // steps as the CPU's full-batch gradient descent, and every member ends with the same
    // weights.
    let input = "mode=sync steps=60 lr=0.8 samples=512 features=6 seed=11";
    let (want, want_loss) = train_reference(60, 0.8, 512, 6, 11);
    for world in [1, 2, 4] {
        let reports = run_cluster(world, input);
        let first = text(&reports[0].output);
        for r in &reports {
            assert_eq!(r.outcome, Ok(()), "world {world}: {}", text(&r.log));
            assert_eq!(text(&r.output), first, "world {world}: members must agree exactly");
        }
        let weights = numbers_after(&first, "weights ");
        for (g, w) in weights.iter().zip(&want) {
            // f32 sums in another order (per member, then across), and GPU exp().
            assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "world {world}: {weights:?}, CPU {want:?}");
        }
        let loss = numbers_after(&first, "final loss ")[0];
        assert!((loss - want_loss).abs() < 1e-3, "world {world}: loss {loss}, CPU {want_loss}");
        assert_eq!(numbers_after(&first, "syncs "), vec![60.0, 420.0]);
        if world > 1 {
            // Each all-reduce of 7 f32 moves 2 (n - 1) / n of them out of each member, plus
            // frame headers; the loss reports move a little more.
            let sent = reports[0].usage.net_bytes_sent;
            assert!(sent > 0 && reports.iter().all(|r| r.usage.net_bytes_received > 0), "{sent}");
            // Time on the network is counted, and is part of the member's wall time.
            for r in &reports {
                assert!(
                    r.usage.net_wait_ns > 0 && r.usage.net_wait_ns < r.wall_time.as_nanos() as u64,
                    "{:?}",
                    r.usage
                );
            }
        } else {
            assert_eq!((reports[0].usage.net_bytes_sent, reports[0].usage.net_wait_ns), (0, 0));
        }
    }
    // DiLoCo: 4 members syncing every 20 steps, int8-compressed: the loss falls, the members
    // agree, and they talk a twentieth as often.
    let reports = run_cluster(4, "mode=diloco steps=200 lr=0.8 samples=512 features=6 seed=11 h=20 compress=int8");
    let first = text(&reports[0].output);
    for r in &reports {
        assert_eq!(r.outcome, Ok(()), "{}", text(&r.log));
        assert_eq!(text(&r.output), first);
    }
    let losses: Vec<f32> = first
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert!(losses.len() >= 5 && losses.last().unwrap() < &(0.5 * losses[0]), "{first}");
    assert_eq!(numbers_after(&first, "syncs "), vec![10.0, 70.0]);
    let accuracy = numbers_after(&first, "final loss ")[1];
    assert!(accuracy > 0.9, "{first}");
    // The same with each outer all-reduce running under the next round's inner steps: the
    // members still agree exactly, the loss ends as low (within 20 %), and a setting that
    // does not go with it is bad input.
    let diloco_loss = numbers_after(&first, "final loss ")[0];
    let reports =
        run_cluster(4, "mode=diloco steps=200 lr=0.8 samples=512 features=6 seed=11 h=20 compress=int8 overlap=1");
    let overlapped = text(&reports[0].output);
    for r in &reports {
        assert_eq!(r.outcome, Ok(()), "{}", text(&r.log));
        assert_eq!(text(&r.output), overlapped);
    }
    let loss = numbers_after(&overlapped, "final loss ")[0];
    assert!(loss < 1.2 * diloco_loss && numbers_after(&overlapped, "final loss ")[1] > 0.9, "{overlapped}\n{first}");
    assert_eq!(numbers_after(&overlapped, "syncs "), vec![10.0, 70.0]);
    let bad = run_cluster(1, "mode=sync overlap=1");
    assert!(text(&bad[0].log).contains("overlap=1 is for mode=diloco"), "{}", text(&bad[0].log));
}

#[test]
pub(crate) fn allreduce() {
    let module = host().load(&sample_artifacts::read(sample_artifacts::ALLREDUCE)).unwrap();
    for (world, compress, exact) in [(1u32, "none", true), (3, "none", true), (2, "f16", true), (4, "int8", false)] {
        let input = format!("bytes={} iters=2 compress={compress}", 4 * (3 * host::collective::CHUNK_VALUES + 11));
        let reports: Vec<host::JobReport> = std::thread::scope(|s| {
            let runs: Vec<_> = host::collective::local_ring(world)
                .into_iter()
                .zip(0..)
                .map(|(link, rank)| {
                    let (module, input) = (&module, input.clone());
                    s.spawn(move || {
                        let member = host::collective::Member::new(rank, world, link, u64::MAX);
                        host().run_member(module, input.into_bytes(), &Limits::default(), |_| {}, None, member).unwrap()
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for r in &reports {
            assert_eq!(r.outcome, Ok(()), "{}", text(&r.log));
            let out = text(&r.output);
            assert!(out.starts_with(&format!("members {world} ")), "{out}");
            let error = numbers_after(&out, "max_error ")[0];
            // int8: each value within 1/254 of its chunk's largest (97), per hop.
            assert!(if exact { error == 0.0 } else { error < 97.0 / 127.0 * 2.0 }, "{compress}: {out}");
            assert!(numbers_after(&out, "busbw_gbps ")[0] >= 0.0);
        }
    }
}

#[test]
pub(crate) fn echo() {
    let module = host().load(&sample_artifacts::read(sample_artifacts::ECHO)).unwrap();
    let mut service = host().start_service(&module, Vec::new(), &Limits::default()).unwrap();
    for request in [&b"hello"[..], b"", &[0u8, 255, 7]] {
        let got = service.infer(request).unwrap();
        let want: Vec<u8> = request.iter().rev().copied().collect();
        assert_eq!(got.response, want);
        assert_eq!(got.usage.dispatches, 0);
        assert_eq!(got.usage.inferences, 1);
        assert!(got.usage.fuel > 0);
    }
}

#[test]
pub(crate) fn tensor_check() {
    // The guest checks each kernel of `wasmgrid::tensor` against an f64 CPU computation with a
    // tolerance per case, and reports one line per case.
    let report = run(sample_artifacts::TENSOR_CHECK, b"", &Limits::default());
    let out = text(&report.output);
    assert_eq!(report.outcome, Ok(()), "{out}\nlog: {}", text(&report.log));
    for kernel in
        ["matmul", "layer_norm", "gelu", "add", "softmax", "attention", "embedding", "mean_pool", "l2_normalize"]
    {
        let cases = out.lines().filter(|l| l.starts_with(&format!("{kernel} ")) && l.ends_with(" ok")).count();
        assert!(cases > 0, "no passing case of {kernel}:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    for refused in ["matmul", "add", "view", "layer_norm", "embedding", "zeros"] {
        assert!(out.contains(&format!("refused {refused}: ")), "{refused} was not refused:\n{out}");
    }
    // Every variant compiled once, however many cases used it.
    let last = out.lines().last().unwrap_or_default();
    assert!(last.contains(" 0 failed"), "{last}");
}
