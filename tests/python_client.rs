//! The Python client (clients/python/) tested against the real agent and
//! microvm's API: runs its unittest suite with the binaries of this build.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn python_client_suite_passes() {
    if !common::have_command("python3", "--version") {
        return;
    }
    let microvm = common::microvm_bin();
    // The static build scripts/test made, else the one `cargo build
    // --workspace` put beside microvm.
    let agent = std::env::var_os("MICROVM_INIT")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| microvm.with_file_name("microvm-init"));
    if !agent.is_file() {
        common::missing(&format!(
            "no microvm-init at {} (cargo build --workspace, or set MICROVM_INIT)",
            agent.display()
        ));
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", "test_microvm"])
        .current_dir(&dir)
        .env("MICROVM_BIN", &microvm)
        .env("MICROVM_AGENT_BIN", &agent)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client tests failed:\n{err}");
    // Skips would hide a missing binary: there must be none.
    assert!(
        !err.contains("skipped"),
        "a python test was skipped:\n{err}"
    );
    assert!(err.contains("Ran 6 tests"), "{err}");
}
