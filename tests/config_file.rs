//! End-to-end: `--config-file` boots the Flask VM from the example in
//! docs/vm-config.json (its paths pointed at the test artifacts), with the
//! API up as well: it reports the file's configuration and the running
//! state, pauses and resumes, and Ctrl-Alt-Del stops the app: the init syncs
//! and reboots, microvm exits with the app's status and removes the socket.

mod common;

use std::time::Duration;

use common::api::{call, ApiVm};
use common::*;

const APP_READY: &str = "microvm-init: app ready on port 80";

#[test]
fn config_file_boots_the_flask_vm() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(rootfs) = rootfs() else { return };
    let dir = TempDir::new("config-file");
    let root = dir.path("app.ext4");
    std::fs::copy(&rootfs, &root).unwrap();

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/vm-config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    cfg["boot-source"]["kernel_image_path"] = kernel.display().to_string().into();
    cfg["drives"][0]["path_on_host"] = root.display().to_string().into();
    let file = dir.path("vm.json");
    std::fs::write(&file, cfg.to_string()).unwrap();

    let sock = dir.path("api.sock");
    let mut vm = ApiVm::start(
        &sock,
        &["--config-file", file.to_str().unwrap(), "--id", "flask"],
        &[("RUST_LOG", "info")],
    );
    let (code, body) = call(&sock, "GET", "/", None);
    assert_eq!(code, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info["id"].as_str(), info["state"].as_str()),
        (Some("flask"), Some("Running"))
    );
    let (_, body) = call(&sock, "GET", "/vm/config", None);
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        got["machine-config"]["mem_size_mib"],
        cfg["machine-config"]["mem_size_mib"]
    );
    assert_eq!(
        got["drives"][0]["path_on_host"],
        cfg["drives"][0]["path_on_host"]
    );

    let deadline = boot_deadline(Duration::from_secs(60), Duration::from_secs(900));
    let ready = vm.wait_for(deadline, |vm| {
        vm.stdout().contains(APP_READY) || vm.child_exited()
    });
    vm.check(
        ready && vm.stdout().contains(APP_READY),
        "the Flask app is ready",
    );

    for state in ["Paused", "Resumed"] {
        let r = call(
            &sock,
            "PATCH",
            "/vm",
            Some(&format!(r#"{{"state": "{state}"}}"#)),
        );
        vm.check(r.0 == 204, &format!("{state}: {r:?}"));
    }
    // Ctrl-Alt-Del: the init passes it to the app as SIGINT, then syncs and
    // reboots, which ends the VM with the app's status.
    let r = call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    vm.check(r.0 == 204, &format!("SendCtrlAltDel: {r:?}"));
    // Python can swallow a SIGINT that lands in an import-lock callback
    // ("Exception ignored in: <function _get_module_lock...>", seen once in
    // the nested lane): press again if the app is still up, as a user would.
    let mut st = vm.wait_exit(Duration::from_secs(30));
    if st.is_none() && vm.stdout().contains("Exception ignored") {
        let r = call(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        );
        vm.check(r.0 == 204, &format!("second SendCtrlAltDel: {r:?}"));
    }
    if st.is_none() {
        st = vm.wait_exit(Duration::from_secs(120));
    }
    vm.check(
        st.is_some() && vm.stdout().contains("microvm-init: exit status"),
        "Ctrl-Alt-Del stops the app and the init reboots",
    );
    let reported = vm
        .stdout()
        .split("microvm-init: exit status ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse::<i32>().ok());
    vm.check(
        st.and_then(|s| s.code()) == reported,
        &format!("microvm exits with the status the init reported ({reported:?}): {st:?}"),
    );
    assert!(!sock.exists(), "socket removed on exit");
}
