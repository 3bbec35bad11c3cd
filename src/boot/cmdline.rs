//! Assembling the guest kernel command line.

use base64::Engine;

use crate::config::ConsoleMode;

/// What every guest gets, whatever its console: i8042 reset on reboot,
/// reboot (not hang) on panic, no PCI probing, the i8042 probed for its
/// keyboard only.
pub const DEFAULT_CMDLINE: &str =
    "reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// The console part of the defaults. Only with the serial console does the
/// 8250 driver get a port to probe: probing and registering the absent
/// COM2-4 (and, without a console on it, COM1) costs port-I/O exits that
/// nothing needs. `--cmdline 8250.nr_uarts=1` brings ttyS0 back (the last
/// value given wins), e.g. with `earlycon` or `console=ttyS0`.
pub fn console_params(console: ConsoleMode) -> &'static str {
    match console {
        ConsoleMode::Virtio => "console=hvc0 8250.nr_uarts=0",
        ConsoleMode::Serial => "console=ttyS0 8250.nr_uarts=1",
        ConsoleMode::None => "8250.nr_uarts=0",
    }
}

/// Added only on hosts whose KVM interprets guest kernel mode (see
/// docs/ARCHITECTURE.md): keep the kernel off instructions that KVM's
/// emulator cannot execute, trust the TSC instead of re-checking it under
/// an interpreter that makes every timer look wrong, and (`nopv`) skip the
/// KVM paravirt features: CPUID there advertises the outer host's PV leaves,
/// and PV IPIs/kicks are hypercalls, which hang on such hosts.
pub const EMULATED_KVM_CMDLINE: &str = concat!(
    "noxsave clearcpuid=smap,smep,popcnt,cx16,rdrand,rdseed,avx,avx2,avx512f,bmi1,bmi2,movbe,",
    "sse4_1,sse4_2,fsgsbase,pku,ospke,erms,fsrm,pcid,invpcid,rdpid,sha_ni,aes,pclmulqdq,gfni,",
    "vaes,vpclmulqdq,f16c,fma,abm,adx,clflushopt,clwb,xsaveopt,xsavec,xsaves,umip,waitpkg,",
    "movdiri,movdir64b,serialize tsc=reliable no_timer_check nopv rcupdate.rcu_cpu_stall_suppress=1"
);

/// Kernel parameter carrying the command the rootfs init runs (see rootfs/README.md).
pub const CMD_PARAM: &str = "microvm.cmd";

/// The base command line for this host and console.
pub fn base(emulated_kvm: bool, console: ConsoleMode) -> String {
    let console = console_params(console);
    if emulated_kvm {
        format!("{console} {DEFAULT_CMDLINE} {EMULATED_KVM_CMDLINE}")
    } else {
        format!("{console} {DEFAULT_CMDLINE}")
    }
}

/// The last `console=` on a command line, without options (`ttyS0` of
/// `console=ttyS0,115200`): the kernel makes it /dev/console, so that is
/// where host stdin must go (the API's `boot_args` may name any).
pub fn last_console(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("console="))
        .next_back()
        .map(|c| c.split(',').next().unwrap_or(c))
}

/// `microvm.cmd=<base64 of each argument followed by a NUL>`: survives any
/// character in the arguments, which the kernel's own quoting does not.
pub fn command_param(argv: &[String]) -> String {
    let mut raw = Vec::new();
    for a in argv {
        raw.extend_from_slice(a.as_bytes());
        raw.push(0);
    }
    format!(
        "{CMD_PARAM}={}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Skip the guest's early TSC calibration: it is given the frequency KVM uses.
pub fn tsc_param(khz: u32) -> String {
    format!("tsc_early_khz={khz}")
}

/// `root=` for the first drive.
pub fn root_param(read_only: bool) -> &'static str {
    if read_only {
        "root=/dev/vda ro"
    } else {
        "root=/dev/vda rw"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_adds_workarounds_only_there() {
        let v = ConsoleMode::Virtio;
        assert!(!base(false, v).contains("noxsave"));
        assert!(base(true, v).contains(DEFAULT_CMDLINE));
        assert!(base(true, v).contains("clearcpuid=smap"));
        assert!(base(true, v).contains("tsc=reliable"));
        assert!(!base(true, v).contains(", "));
    }

    #[test]
    fn console_modes_pick_the_console_and_the_uarts() {
        let b = |c| base(false, c);
        assert!(b(ConsoleMode::Virtio).starts_with("console=hvc0 8250.nr_uarts=0 "));
        assert!(b(ConsoleMode::Serial).starts_with("console=ttyS0 8250.nr_uarts=1 "));
        assert!(!b(ConsoleMode::None).contains("console="));
        assert_eq!(last_console(&b(ConsoleMode::Virtio)), Some("hvc0"));
        assert_eq!(last_console(&b(ConsoleMode::Serial)), Some("ttyS0"));
        assert_eq!(last_console(&b(ConsoleMode::None)), None);
        // The last console= is /dev/console.
        assert_eq!(
            last_console("console=hvc0 x console=ttyS0,115200"),
            Some("ttyS0")
        );
        assert_eq!(last_console("console=ttyS0 console=hvc0"), Some("hvc0"));
    }

    #[test]
    fn command_encoding_round_trips() {
        let argv: Vec<String> = ["sh", "-c", "echo \"a b\"; exit 42"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = command_param(&argv);
        let b64 = p.strip_prefix("microvm.cmd=").unwrap();
        assert!(!b64.contains(' '));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        assert_eq!(parts[0], b"sh");
        assert_eq!(parts[2], b"echo \"a b\"; exit 42");
        assert_eq!(parts.len(), 4); // trailing NUL gives an empty last piece
    }
}
