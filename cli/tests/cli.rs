//! The `mmu-vmm` command as users drive it: bad values exit 2 with one
//! line on stderr and no backtrace, every subcommand has `--help`, bad
//! output paths fail before any measurement, and the commands print one
//! JSON object with `--json`.

use mmu_integration::testing::kvm_or_skip;

use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmu-vmm"))
        .args(args)
        // A panic would print a backtrace: make sure it would show.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

/// Exit status 2, nothing on stdout, one `mmu-vmm: ` line on stderr.
fn assert_usage_error(args: &[&str], mentions: &str) {
    let out = vmm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("mmu-vmm: "), "{args:?}: {stderr}");
    assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(!stderr.contains("backtrace"), "{args:?}: {stderr}");
}

#[test]
fn bad_values_exit_2_with_one_line() {
    let run = ["run", "--mmu", "ept", "--workload", "touch"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        run.iter().copied().chain(extra.iter().copied()).collect()
    };
    for secs in ["-1", "NaN", "inf", "0", "1e300", "soon"] {
        assert_usage_error(&with(&["--time-limit", secs]), "--time-limit");
    }
    assert_usage_error(
        &[
            "run",
            "--time-limit",
            "-1",
            "--mmu",
            "ept",
            "--workload",
            "touch",
        ],
        "--time-limit",
    );
    assert_usage_error(&with(&["--vcpus", "-1"]), "--vcpus");
    assert_usage_error(&with(&["--vcpus", "0"]), "--vcpus");
    assert_usage_error(&with(&["--ops", "0"]), "--ops");
    assert_usage_error(&with(&["--passes", "0"]), "--passes");
    assert_usage_error(&with(&["--mem", "3M"]), "--mem");
    assert_usage_error(&with(&["--mem", "lots"]), "--mem");
    assert_usage_error(&with(&["--vcpus", "2", "--vcpus", "3"]), "--vcpus");
    assert_usage_error(&["run", "--mmu", "npt", "--workload", "touch"], "--mmu");
    assert_usage_error(&["run", "--mmu=npt", "--workload", "touch"], "--mmu");
    assert_usage_error(&["run", "--mmu", "ept", "--workload", "nap"], "--workload");
    assert_usage_error(&["run", "--mmu", "ept"], "--workload");
    assert_usage_error(&["info", "extra"], "extra");
    assert_usage_error(&["info", "--json"], "--json");
    assert_usage_error(&["touch", "--pages", "0"], "--pages");
    assert_usage_error(&["touch", "--levels", "3"], "--levels");
    assert_usage_error(&["touch", "--ops", "fast"], "--ops");
    assert_usage_error(
        &["touch", "--mem-mib", "4", "--pages", "100000"],
        "--mem-mib",
    );
    assert_usage_error(&["conformance", "--cases", "0"], "--cases");
    assert_usage_error(&["bench", "churn", "--runs", "0"], "--runs");
    assert_usage_error(&["bench", "churn", "--wait", "nap"], "--wait");
    assert_usage_error(&["bench", "churn", "--mem", "64M,3M"], "--mem");
    assert_usage_error(&["bench", "churn", "--slots", "0"], "--slots");
    assert_usage_error(&["bench", "spin"], "spin");
    assert_usage_error(&["frobnicate"], "frobnicate");
}

#[test]
fn the_equals_form_and_ept_parse() {
    // `--mmu=ept` is accepted: the error is about the missing workload.
    assert_usage_error(&["run", "--mmu=ept"], "--workload");
    assert_usage_error(&["diff", "--a=ept", "--b=shadow"], "--workload");
}

#[test]
fn every_subcommand_has_help() {
    let out = vmm(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let top = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "info",
        "touch",
        "conformance",
        "run",
        "diff",
        "bench",
        "compare",
    ] {
        assert!(top.contains(sub), "{top}");
        let out = vmm(&[sub, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{sub}: {help}");
        assert!(help.contains("Usage: mmu-vmm"), "{sub}: {help}");
        assert!(out.stderr.is_empty(), "{sub}");
    }
    let run = String::from_utf8_lossy(&vmm(&["run", "--help"]).stdout).into_owned();
    for option in ["--mmu", "--workload", "--time-limit", "--stats", "--json"] {
        assert!(run.contains(option), "{run}");
    }
    assert!(run.contains("pt-edit, multi-as"), "{run}");
    let bench = String::from_utf8_lossy(&vmm(&["bench", "--help"]).stdout).into_owned();
    assert!(bench.contains("reclaim:"), "{bench}");
}

#[test]
fn a_bad_output_path_fails_before_any_measurement() {
    // No progress line (which the bench prints as it starts) and no table.
    for args in [
        &["bench", "churn", "--quick", "--plot", "/nonexistent/x.svg"][..],
        &[
            "bench",
            "reclaim",
            "--quick",
            "--plot",
            "/nonexistent/x.png",
        ][..],
        &["compare", "--quick", "--out", "/nonexistent/a/b"][..],
    ] {
        assert_usage_error(args, "/nonexistent");
    }
    let dir = std::env::temp_dir();
    assert_usage_error(
        &["bench", "reclaim", "--plot", dir.to_str().unwrap()],
        "is a directory",
    );
}

#[test]
fn reclaim_prints_its_table_and_writes_its_plot() {
    // The soft vCPU: no KVM needed.
    let path = std::env::temp_dir().join(format!("mmu-vmm-cli-{}.svg", std::process::id()));
    let out = vmm(&[
        "bench",
        "reclaim",
        "--quick",
        "--plot",
        path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("bench reclaim: "), "{stdout}");
    assert!(std::fs::read_to_string(&path).unwrap().contains("<svg"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn run_names_its_checks_and_shows_no_debug_text() {
    if !kvm_or_skip("run_names_its_checks_and_shows_no_debug_text") {
        return;
    }
    let out = vmm(&[
        "run",
        "--mmu",
        "ept",
        "--workload",
        "touch",
        "--vcpus",
        "2",
        "--mem",
        "16M",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("vCPU 0: exited 0, "), "{stdout}");
    assert!(stdout.contains("  vCPU 1 memory: ok"), "{stdout}");
    assert!(stdout.ends_with("result: ok\n"), "{stdout}");
    assert!(!stdout.contains("Done {"), "{stdout}");
    assert!(!stdout.contains("unhandled="), "{stdout}");
    // Progress went to stderr while it ran.
    assert!(stderr.contains("running round 1 of 1"), "{stderr}");

    let out = vmm(&["info"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("CpuFeatures("), "{stdout}");
}

#[test]
fn the_command_prints_one_json_object() {
    if !kvm_or_skip("the_command_prints_one_json_object") {
        return;
    }
    let common = ["--vcpus", "2", "--mem", "16M", "--ops", "50", "--json"];
    let out = Command::new(env!("CARGO_BIN_EXE_mmu-vmm"))
        .args(["diff", "--a", "ept", "--b", "ept", "--workload", "mmio-rr"])
        .args(common)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("{\"workload\": \"mmio-rr\", \"a\": \"ept\", \"b\": \"ept\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"identical\": true"), "{stdout}");

    let out = Command::new(env!("CARGO_BIN_EXE_mmu-vmm"))
        .args(["run", "--mmu", "ept", "--workload", "pt-edit"])
        .args(common)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("\"ok\": true"), "{stdout}");

    // Shadow against ept: the guest sees the same.
    let out = Command::new(env!("CARGO_BIN_EXE_mmu-vmm"))
        .args(["diff", "--workload", "touch", "--json"])
        .args(&common[..common.len() - 1])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("\"identical\": true"), "{stdout}");
}
