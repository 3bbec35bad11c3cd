//! The pure parts of `microvm-init`, the guest's PID 1: the image config file
//! that `microvm image build` writes and the init reads, the kernel command
//! line keys, `User` resolution against the image's `/etc/passwd`, the
//! environment of the started process, and the `/proc/net/tcp` readiness
//! check. No system calls here, so all of it is tested on the host.
//!
//! The protocol is described in rootfs/README.md.

use base64::Engine;

pub mod agent_proto;

/// Where the image config lives inside the guest's root filesystem.
pub const CONFIG_PATH: &str = "/etc/microvm/init.conf";
/// First line of the config file; a file without it is refused.
pub const CONFIG_MAGIC: &str = "# microvm-init config v1";
/// `PATH` when the image does not set one (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Hostname of every guest.
pub const HOSTNAME: &str = "microvm";

/// glibc 2.36 names (sysdeps/x86/cpu-tunables.c): keeps glibc's string and
/// memory functions off AVX. `-AVX,-AVX2` alone would leave memcpy on its
/// AVX variant through `AVX_Fast_Unaligned_Load`; turning AVX2/FMA off also
/// makes ld.so skip glibc-hwcaps/x86-64-v3 and -v4 library directories.
pub const HWCAPS_TUNABLE: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX_Fast_Unaligned_Load,-FMA,-FMA4,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX512ER,-AVX512PF";
/// Masks AVX/FMA/F16C (leaf 1 ECX) and AVX2, AVX-512*, VAES, VPCLMULQDQ
/// (leaf 7 EBX/ECX) for OpenSSL's libcrypto.
pub const OPENSSL_IA32CAP: &str = "~0x3000100000000000:~0x00005e42dc230020";

/// What the image says to run: the subset of the OCI image config that
/// `docker run` honours for a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`: always run; the command's arguments follow it.
    pub entrypoint: Vec<String>,
    /// `Cmd`: default arguments, replaced by a command given to the VM.
    pub cmd: Vec<String>,
    /// `Env`: `KEY=VALUE` strings in order.
    pub env: Vec<String>,
    /// `WorkingDir`; `/` when empty.
    pub working_dir: String,
    /// `User`: `user`, `uid`, `user:group` or `uid:gid`; root when empty.
    pub user: String,
    /// TCP ports from `ExposedPorts`: "ready" once one of them listens.
    pub tcp_ports: Vec<u16>,
}

/// A config file the init cannot use.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The first line is not [`CONFIG_MAGIC`].
    BadMagic,
    /// A line that is not `KEY VALUE` with a known key.
    BadLine(usize),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadMagic => write!(f, "not a microvm-init config (first line)"),
            Self::BadLine(n) => write!(f, "line {n}: unknown key or bad value"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// `\` -> `\\`, newline -> `\n`: one value per line whatever it holds.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            _ => return None,
        }
    }
    Some(out)
}

impl ImageConfig {
    /// The file format: a magic line, then one `KEY VALUE` line per list
    /// element (`entrypoint`, `cmd`, `env`, `port`) or value (`workdir`,
    /// `user`), values escaped so that any string fits on one line.
    pub fn to_text(&self) -> String {
        let mut s = format!("{CONFIG_MAGIC}\n");
        let mut put = |k: &str, v: &str| {
            s.push_str(k);
            s.push(' ');
            s.push_str(&escape(v));
            s.push('\n');
        };
        self.entrypoint.iter().for_each(|a| put("entrypoint", a));
        self.cmd.iter().for_each(|a| put("cmd", a));
        self.env.iter().for_each(|a| put("env", a));
        if !self.working_dir.is_empty() {
            put("workdir", &self.working_dir);
        }
        if !self.user.is_empty() {
            put("user", &self.user);
        }
        for p in &self.tcp_ports {
            put("port", &p.to_string());
        }
        s
    }

    /// Parse [`Self::to_text`]'s output.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut lines = text.lines();
        if lines.next() != Some(CONFIG_MAGIC) {
            return Err(ConfigError::BadMagic);
        }
        let mut c = Self::default();
        for (i, line) in lines.enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || ConfigError::BadLine(i + 2);
            let (k, v) = line.split_once(' ').ok_or_else(bad)?;
            let v = unescape(v).ok_or_else(bad)?;
            match k {
                "entrypoint" => c.entrypoint.push(v),
                "cmd" => c.cmd.push(v),
                "env" => c.env.push(v),
                "workdir" => c.working_dir = v,
                "user" => c.user = v,
                "port" => c.tcp_ports.push(v.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        Ok(c)
    }

    /// The process to start: Entrypoint, then the command given to the VM if
    /// any, else Cmd (what `docker run IMAGE [CMD...]` does).
    pub fn argv(&self, command: Option<&[String]>) -> Vec<String> {
        let mut v = self.entrypoint.clone();
        v.extend_from_slice(command.unwrap_or(&self.cmd));
        v
    }
}

/// What PID 1 reads from `/proc/cmdline`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelArgs {
    /// `microvm.cmd=`: `Some(Ok(argv))`, or `Some(Err(()))` when it does not decode.
    pub command: Option<Result<Vec<String>, ()>>,
    /// `microvm.verbose`: print the init's lines in command mode too.
    pub verbose: bool,
    /// `noxsave`: the kernel does not save AVX state, keep user space off it.
    pub noxsave: bool,
}

impl KernelArgs {
    /// Parse the words of the kernel command line.
    pub fn parse(cmdline: &str) -> Self {
        let mut k = Self::default();
        for w in cmdline.split_ascii_whitespace() {
            if let Some(v) = w.strip_prefix("microvm.cmd=") {
                k.command = Some(decode_command(v));
            } else if w == "microvm.verbose" {
                k.verbose = true;
            } else if let Some(v) = w.strip_prefix("microvm.verbose=") {
                k.verbose = matches!(v, "1" | "y" | "Y" | "yes" | "on" | "true");
            } else if w == "noxsave" {
                k.noxsave = true;
            }
        }
        k
    }
}

/// Base64 (standard or URL-safe, padding optional) of `arg0\0arg1\0...`.
fn decode_command(b64: &str) -> Result<Vec<String>, ()> {
    let norm: String = b64
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .filter(|c| *c != '=')
        .collect();
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(norm)
        .map_err(|_| ())?;
    let body = raw.strip_suffix(&[0]).unwrap_or(&raw);
    let argv: Vec<String> = body
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(());
    }
    Ok(argv)
}

/// Who the process runs as.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the user's memberships in `/etc/group`).
    pub groups: Vec<u32>,
    /// Home directory from `/etc/passwd`, if the user has an entry.
    pub home: Option<String>,
}

/// Resolve an OCI `User` value against the image's `/etc/passwd` and
/// `/etc/group` text, as runc does: names must exist, numbers need not (a uid
/// without an entry gets gid 0, unless a group is given).
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    // name:x:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u)));
    let (uid, mut gid, name, home) = match (&entry, u.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| format!("bad /etc/passwd entry for {u}"))?,
            f[3].parse()
                .map_err(|_| format!("bad /etc/passwd entry for {u}"))?,
            Some(f[0]),
            Some(f[5].to_string()),
        ),
        (None, Ok(n)) => (n, 0, None, None),
        (None, Err(_)) => return Err(format!("user {u} not found in /etc/passwd")),
    };
    // name:x:gid:member,member
    let groups_fields: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    if let Some(g) = g.filter(|g| !g.is_empty()) {
        gid = match groups_fields.iter().find(|f| f[0] == g) {
            Some(f) => f[2]
                .parse()
                .map_err(|_| format!("bad /etc/group entry for {g}"))?,
            None => g
                .parse()
                .map_err(|_| format!("group {g} not found in /etc/group"))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = name {
        for f in &groups_fields {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(id) = f[2].parse::<u32>() {
                    if !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

/// The started process's environment: the image's `Env`, plus what Docker
/// adds when absent (`PATH`, `HOSTNAME`, `HOME`), `TERM` for the console, and
/// on `noxsave` kernels the settings that keep glibc and OpenSSL off AVX.
/// `inherited` is PID 1's own environment (the kernel passes unknown
/// `NAME=value` parameters there): a `GLIBC_TUNABLES` given that way wins.
pub fn process_env(
    image_env: &[String],
    home: &str,
    noxsave: bool,
    inherited: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String, replace: bool| match env
        .iter_mut()
        .find(|(ek, _)| ek == k)
    {
        Some(e) if replace => e.1 = v,
        Some(_) => {}
        None => env.push((k.to_string(), v)),
    };
    for kv in image_env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if !k.is_empty() {
            set(&mut env, k, v.to_string(), true);
        }
    }
    let inh = |k: &str| {
        inherited
            .iter()
            .find(|(ik, _)| ik == k)
            .map(|(_, v)| v.clone())
    };
    set(&mut env, "PATH", DEFAULT_PATH.into(), false);
    set(&mut env, "HOSTNAME", HOSTNAME.into(), false);
    set(&mut env, "HOME", home.into(), false);
    set(
        &mut env,
        "TERM",
        inh("TERM").unwrap_or_else(|| "linux".into()),
        false,
    );
    if noxsave {
        let tun = env
            .iter()
            .find(|(k, _)| k == "GLIBC_TUNABLES")
            .map(|(_, v)| v.clone())
            .or_else(|| inh("GLIBC_TUNABLES"))
            .unwrap_or_default();
        let tun = with_hwcaps_tunable(&tun);
        set(&mut env, "GLIBC_TUNABLES", tun, true);
        set(&mut env, "OPENSSL_ia32cap", OPENSSL_IA32CAP.into(), false);
    }
    env
}

/// `tunables` with [`HWCAPS_TUNABLE`] appended, unless it already sets
/// `glibc.cpu.hwcaps` (then it is kept as it is).
pub fn with_hwcaps_tunable(tunables: &str) -> String {
    if tunables.contains("glibc.cpu.hwcaps=") {
        tunables.to_string()
    } else if tunables.is_empty() {
        HWCAPS_TUNABLE.to_string()
    } else {
        format!("{tunables}:{HWCAPS_TUNABLE}")
    }
}

/// Does `/proc/net/tcp` (or `tcp6`) text show a socket listening on one of `ports`?
pub fn tcp_listening(proc_net_tcp: &str, ports: &[u16]) -> Option<u16> {
    for line in proc_net_tcp.lines().skip(1) {
        let mut f = line.split_ascii_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if state != "0A" {
            continue; // not TCP_LISTEN
        }
        let Some((_, port_hex)) = local.rsplit_once(':') else {
            continue;
        };
        if let Ok(p) = u16::from_str_radix(port_hex, 16) {
            if ports.contains(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// `argv[0]` looked up in `path` (a `PATH` value) with `is_exec` deciding
/// what counts; names with a `/` are taken as they are.
pub fn find_in_path(name: &str, path: &str, is_exec: impl Fn(&str) -> bool) -> Option<String> {
    if name.contains('/') {
        return Some(name.to_string());
    }
    path.split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
        .find(|p| is_exec(p))
}

/// Exit status of a process as a shell reports it: the code, or 128+N for
/// death by signal N.
pub fn shell_status(wait_status: i32) -> u8 {
    if libc::WIFEXITED(wait_status) {
        u8::try_from(libc::WEXITSTATUS(wait_status) & 0xff).unwrap_or(255)
    } else if libc::WIFSIGNALED(wait_status) {
        u8::try_from((128 + libc::WTERMSIG(wait_status)).min(255)).unwrap_or(255)
    } else {
        255
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn config_round_trips_any_string() {
        let c = ImageConfig {
            entrypoint: s(&["/entry point.sh"]),
            cmd: s(&["sh", "-c", "echo a\\nb\nsecond line", ""]),
            env: s(&["A=1", "B=x=y"]),
            working_dir: "/app".into(),
            user: "1000:1000".into(),
            tcp_ports: vec![80, 8080],
        };
        let text = c.to_text();
        assert_eq!(text.lines().filter(|l| l.starts_with("cmd ")).count(), 4);
        assert_eq!(ImageConfig::parse(&text).unwrap(), c);
        assert_eq!(
            ImageConfig::parse(&ImageConfig::default().to_text()).unwrap(),
            ImageConfig::default()
        );
    }

    #[test]
    fn config_rejects_garbage() {
        assert_eq!(ImageConfig::parse("cmd x\n"), Err(ConfigError::BadMagic));
        let bad = format!("{CONFIG_MAGIC}\ncmd ok\nfrobnicate 1\n");
        assert_eq!(ImageConfig::parse(&bad), Err(ConfigError::BadLine(3)));
        let bad = format!("{CONFIG_MAGIC}\ncmd a\\q\n");
        assert_eq!(ImageConfig::parse(&bad), Err(ConfigError::BadLine(2)));
        let bad = format!("{CONFIG_MAGIC}\nport 99999\n");
        assert!(ImageConfig::parse(&bad).is_err());
    }

    #[test]
    fn command_replaces_cmd_not_entrypoint() {
        let c = ImageConfig {
            entrypoint: s(&["/entry"]),
            cmd: s(&["false"]),
            ..Default::default()
        };
        assert_eq!(c.argv(None), s(&["/entry", "false"]));
        assert_eq!(
            c.argv(Some(&s(&["echo", "hi"]))),
            s(&["/entry", "echo", "hi"])
        );
        let c = ImageConfig {
            cmd: s(&["python3", "/app/app.py"]),
            ..Default::default()
        };
        assert_eq!(c.argv(Some(&s(&["true"]))), s(&["true"]));
    }

    #[test]
    fn kernel_args() {
        // "sh\0-c\0exit 42\0" in standard and URL-safe alphabets, no padding.
        let k = KernelArgs::parse(
            "console=ttyS0 noxsave microvm.cmd=c2gALWMAZXhpdCA0MgA microvm.verbose",
        );
        assert_eq!(k.command, Some(Ok(s(&["sh", "-c", "exit 42"]))));
        assert!(k.verbose && k.noxsave);
        let k = KernelArgs::parse("microvm.cmd=!!! microvm.verbose=0");
        assert_eq!(k.command, Some(Err(())));
        assert!(!k.verbose && !k.noxsave);
        assert_eq!(KernelArgs::parse("quiet").command, None);
        assert_eq!(KernelArgs::parse("microvm.cmd=").command, Some(Err(())));
        // "a?\0" encodes with '/' in the standard alphabet, '_' in URL-safe.
        assert_eq!(
            KernelArgs::parse("microvm.cmd=YT8A").command,
            Some(Ok(s(&["a?"])))
        );
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nstaff:x:50:app,other\nwheel:x:10:root\n";

    #[test]
    fn users_resolve_like_runc() {
        let id = resolve_user("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            (id.uid, id.gid, id.groups.clone()),
            (1000, 1001, vec![1001, 50])
        );
        assert_eq!(id.home.as_deref(), Some("/home/app"));
        let id = resolve_user("1000:staff", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 50));
        let id = resolve_user("4242", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.home), (4242, 0, None));
        let id = resolve_user("4242:7", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (4242, 7));
        assert_eq!(resolve_user("", PASSWD, GROUP).unwrap().uid, 0);
        assert!(resolve_user("nobody", PASSWD, GROUP).is_err());
        assert!(resolve_user("app:nogroup", PASSWD, GROUP).is_err());
    }

    #[test]
    fn environment_like_docker() {
        let env = process_env(
            &s(&["PATH=/opt/bin", "MSG=hi there", "EMPTY"]),
            "/root",
            false,
            &[],
        );
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/opt/bin"));
        assert_eq!(get("MSG"), Some("hi there"));
        assert_eq!(get("EMPTY"), Some(""));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("HOSTNAME"), Some("microvm"));
        assert_eq!(get("GLIBC_TUNABLES"), None);

        let env = process_env(
            &s(&["GLIBC_TUNABLES=glibc.malloc.arena_max=1"]),
            "/",
            true,
            &[],
        );
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(
            get("GLIBC_TUNABLES"),
            Some(format!("glibc.malloc.arena_max=1:{HWCAPS_TUNABLE}").as_str())
        );
        assert_eq!(get("OPENSSL_ia32cap"), Some(OPENSSL_IA32CAP));
        let given = [(
            "GLIBC_TUNABLES".to_string(),
            "glibc.cpu.hwcaps=-AVX".to_string(),
        )];
        let env = process_env(&[], "/", true, &given);
        assert!(env.contains(&("GLIBC_TUNABLES".into(), "glibc.cpu.hwcaps=-AVX".into())));
    }

    #[test]
    fn listening_ports() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n\
           1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0\n";
        assert_eq!(tcp_listening(tcp, &[80]), Some(80));
        assert_eq!(tcp_listening(tcp, &[8080]), None); // 0x1F90 is established, not listening
        assert_eq!(tcp_listening("garbage\nmore garbage", &[80]), None);
    }

    #[test]
    fn path_lookup_and_status() {
        let found = find_in_path("echo", "/usr/bin::/bin", |p| p == "/bin/echo");
        assert_eq!(found.as_deref(), Some("/bin/echo"));
        assert_eq!(find_in_path("./x", "", |_| false).as_deref(), Some("./x"));
        assert_eq!(find_in_path("nope", "/bin", |_| false), None);
        assert_eq!(shell_status(42 << 8), 42);
        assert_eq!(shell_status(9), 137); // killed by SIGKILL
    }
}
