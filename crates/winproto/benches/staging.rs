//! Staging throughput and per-operation latency against a private Samba on
//! loopback, side by side with the reference clients in the same run:
//! `smbclient` for throughput, Impacket for latency.
//!
//!     CARGO_TARGET_DIR=... cargo bench -p fleetpatch-winproto --bench staging
//!
//! Sizes can be changed with FLEETPATCH_BENCH_MIB (default 100) and
//! FLEETPATCH_BENCH_OPS (default 200). Figures are printed; the README keeps
//! the ones measured on the project's machine.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fleetpatch_winproto::test_support::{SambaPeer, ADMIN_PASSWORD, ADMIN_USER};
use fleetpatch_winproto::{EncryptionPolicy, SmbOptions, TransportKind};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn mib_per_second(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

fn smbclient_put(peer: &SambaPeer, local: &Path, remote: &str, encrypt: bool) -> Duration {
    let mut command = Command::new("smbclient");
    command
        .arg("//127.0.0.1/C$")
        .arg("-p")
        .arg(peer.address().port().to_string())
        .arg("-U")
        .arg(format!("{ADMIN_USER}%{ADMIN_PASSWORD}"))
        .arg("-m")
        .arg("SMB3")
        .arg(if encrypt { "--client-protection=encrypt" } else { "--client-protection=sign" });
    command.arg("-c").arg(format!("put {} {remote}", local.display()));
    let started = Instant::now();
    let output = command.output().expect("smbclient (apt-get install -y smbclient)");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "smbclient failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

async fn ours_put(peer: &SambaPeer, data: &[u8], remote: &str, options: SmbOptions) -> Duration {
    let session = peer.connect(options).await.expect("connect");
    let started = Instant::now();
    session.put_file("C$", remote, data).await.expect("put_file");
    let elapsed = started.elapsed();
    session.close().await.expect("close");
    elapsed
}

async fn ours_latency(peer: &SambaPeer, count: usize, options: SmbOptions) -> (f64, f64) {
    let session = peer.connect(options).await.expect("connect");
    let payload = vec![b'x'; 4096];
    let mut samples = Vec::with_capacity(count);
    for index in 0..count + 5 {
        let started = Instant::now();
        session.put_file("C$", &format!("ours-latency-{}.bin", index % 8), &payload[..]).await.expect("put 4 KiB");
        if index >= 5 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    session.close().await.expect("close");
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = samples[samples.len() / 2];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    (median, mean)
}

fn impacket_latency(peer: &SambaPeer, count: usize) -> (f64, f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/impacket_latency.py");
    let output = Command::new("/usr/bin/python3")
        .arg(script)
        .args(["127.0.0.1", &peer.address().port().to_string(), ADMIN_USER, ADMIN_PASSWORD, "C$"])
        .arg(count.to_string())
        .output()
        .expect("/usr/bin/python3 with impacket (apt-get install -y python3-impacket)");
    assert!(output.status.success(), "impacket latency script failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<f64> = text.split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
    (fields[0], fields[1])
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass
    // nothing: only run the measurement when asked to bench.
    if !std::env::args().any(|argument| argument == "--bench") {
        println!("staging bench: run with `cargo bench --bench staging`");
        return;
    }
    let mib = env_number("FLEETPATCH_BENCH_MIB", 100);
    let ops = env_number("FLEETPATCH_BENCH_OPS", 200);
    let peer = SambaPeer::start_or_panic();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let size = mib * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
    let temp = tempfile::tempdir().unwrap();
    let local = temp.path().join("payload.bin");
    std::fs::write(&local, &data).unwrap();

    println!("== staging {mib} MiB to Samba on loopback (best of 3) ==");
    let signed = SmbOptions { encryption: EncryptionPolicy::Disabled, ..SmbOptions::default() };
    let encrypted = SmbOptions { encryption: EncryptionPolicy::Required, ..SmbOptions::default() };
    let mut rows = Vec::new();
    for (label, encrypt) in [("signed", false), ("encrypted", true)] {
        let best_smbclient =
            (0..3).map(|run| smbclient_put(&peer, &local, &format!("smbclient-{run}.bin"), encrypt)).min().unwrap();
        let options = if encrypt { encrypted.clone() } else { signed.clone() };
        let best_ours = (0..3)
            .map(|run| runtime.block_on(ours_put(&peer, &data, &format!("ours-{run}.bin"), options.clone())))
            .min()
            .unwrap();
        let ours = mib_per_second(size, best_ours);
        let theirs = mib_per_second(size, best_smbclient);
        println!("{label:>9}: fleetpatch {ours:8.1} MiB/s   smbclient {theirs:8.1} MiB/s   ratio {:.2}", ours / theirs);
        rows.push((label, ours, theirs));
    }

    println!("== open + write 4 KiB + close, {ops} operations (median / mean ms) ==");
    let (ours_median, ours_mean) = runtime.block_on(ours_latency(&peer, ops, signed.clone()));
    let (old_median, old_mean) = runtime.block_on(ours_latency(
        &peer,
        ops.min(40),
        SmbOptions { transport: TransportKind::SmbRsDefault, ..signed.clone() },
    ));
    let (enc_median, enc_mean) = runtime.block_on(ours_latency(&peer, ops, encrypted.clone()));
    let (impacket_median, impacket_mean) = impacket_latency(&peer, ops);
    println!("fleetpatch (no-delay transport, signed): {ours_median:7.2} / {ours_mean:7.2}");
    println!("fleetpatch (no-delay transport, encrypted): {enc_median:7.2} / {enc_mean:7.2}");
    println!("fleetpatch (smb-rs default transport, signed): {old_median:7.2} / {old_mean:7.2}");
    println!("impacket (signed): {impacket_median:7.2} / {impacket_mean:7.2}");
    println!("latency ratio fleetpatch/impacket (median, signed): {:.2}", ours_median / impacket_median);
}
